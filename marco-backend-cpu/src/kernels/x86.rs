//! AVX2 + FMA + F16C kernels (x86-64), selected at run time by [`super::isa`].
//!
//! Quantized weights × 8-bit activations: one weight block (32 values) is unpacked to 32
//! unsigned bytes once, then multiplied with each activation row's block by
//! `vpmaddubsw` (u8 × i8 → pairwise i16) and `vpmaddwd` with ones (→ eight i32 partial sums),
//! converted to f32 and accumulated with the product of the two block scales. Offsets (Q4_0's
//! `-8`, Q4_1's `m`, Q4_K's mins, Q6_K's `-32`) are applied through the activation block sums
//! precomputed in [`QuantizedActs`], so the inner loop stays on unsigned bytes. Signed Q8_0
//! weights use the `|w| · sign(a, w)` identity. All partial sums fit in i16 (at most
//! `2 · 128 · 127`), so `vpmaddubsw` never saturates.
//!
//! Activation rows are processed four at a time (`R` accumulators); each loads the weight
//! block once from memory and reuses it from registers.

use std::arch::x86_64::*;

/// How far ahead (in f32 values) the one-row f32 kernel prefetches its weight stream.
const F32_PREFETCH_AHEAD: usize = 2048;
use std::ops::Range;

use super::dense::{Dense, DenseKind};
use super::{Acts, BlockRows, OutPtr, QuantizedActs};
use crate::packed::SplitBlocks;
use crate::quant::{dequantize_into, k4_scale_min, GgmlType, QK, QK_K};

/// Widens a little-endian f16 at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `p`.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Eight i32 sums of four adjacent u8 × i8 products each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8_i8(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// Accumulates `dot(w, a_r[b]) · scale · d_r[b]` into `acc[r]` for the `R` rows from `r0`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_unsigned<const R: usize>(
    acc: &mut [__m256; R],
    w: __m256i,
    scale: f32,
    acts: Acts,
    r0: usize,
    b: usize,
) {
    for (r, acc_r) in acc.iter_mut().enumerate() {
        // SAFETY: rows `r0..r0 + R` and block `b` are in range (caller).
        let (a, d) = unsafe { (load256(acts.block(r0 + r, b)), acts.scale(r0 + r, b)) };
        let s = _mm256_cvtepi32_ps(dot_u8_i8(w, a));
        *acc_r = _mm256_fmadd_ps(s, _mm256_set1_ps(scale * d), *acc_r);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_dot<const R: usize>(w_row: *const u8, acts: Acts, r0: usize) -> [f32; R] {
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let mut corr = [0.0f32; R];
    let mask = _mm256_set1_epi8(0x0F);
    let n_super = acts.blocks / (QK_K / QK);
    for sb in 0..n_super {
        // SAFETY: `w_row` holds `n_super` 144-byte blocks.
        let blk = unsafe { w_row.add(144 * sb) };
        let (dw, dmin) = unsafe { (load_f16(blk), load_f16(blk.add(2))) };
        // SAFETY: the 12 scale bytes follow d and dmin.
        let scales = unsafe { std::slice::from_raw_parts(blk.add(4), 12) };
        for chunk in 0..4 {
            // SAFETY: 32 bytes of quants per chunk, after the 16-byte header.
            let q = unsafe { load256(blk.add(16 + 32 * chunk)) };
            let lo = _mm256_and_si256(q, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            let (sc0, m0) = k4_scale_min(2 * chunk, scales);
            let (sc1, m1) = k4_scale_min(2 * chunk + 1, scales);
            let b = sb * (QK_K / QK) + 2 * chunk;
            // SAFETY: rows and blocks in range (caller).
            unsafe {
                accumulate_unsigned(&mut acc0, lo, dw * sc0 as f32, acts, r0, b);
                accumulate_unsigned(&mut acc1, hi, dw * sc1 as f32, acts, r0, b + 1);
            }
            let (min0, min1) = (dmin * m0 as f32, dmin * m1 as f32);
            for (r, c) in corr.iter_mut().enumerate() {
                // SAFETY: rows and blocks in range (caller).
                unsafe { *c -= min0 * acts.scaled_sum(r0 + r, b) + min1 * acts.scaled_sum(r0 + r, b + 1) };
            }
        }
    }
    std::array::from_fn(|r| hsum(_mm256_add_ps(acc0[r], acc1[r])) + corr[r])
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_dot<const R: usize>(w_row: *const u8, acts: Acts, r0: usize) -> [f32; R] {
    let mut acc = [[_mm256_setzero_ps(); R]; 2];
    let mut corr = [0.0f32; R];
    let low_mask = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(0x03);
    let n_super = acts.blocks / (QK_K / QK);
    for sb in 0..n_super {
        // SAFETY: `w_row` holds `n_super` 210-byte blocks.
        let blk = unsafe { w_row.add(210 * sb) };
        let dw = unsafe { load_f16(blk.add(208)) };
        for half in 0..2 {
            // SAFETY: ql (128 bytes), qh (64) and scales (16) lie within the block.
            let (ql_a, ql_b, qh) = unsafe {
                (load256(blk.add(64 * half)), load256(blk.add(64 * half + 32)), load256(blk.add(128 + 32 * half)))
            };
            let scales = unsafe { std::slice::from_raw_parts(blk.add(192 + 8 * half) as *const i8, 8) };
            for group in 0..4 {
                let low = match group {
                    0 => _mm256_and_si256(ql_a, low_mask),
                    1 => _mm256_and_si256(ql_b, low_mask),
                    2 => _mm256_and_si256(_mm256_srli_epi16(ql_a, 4), low_mask),
                    _ => _mm256_and_si256(_mm256_srli_epi16(ql_b, 4), low_mask),
                };
                let high = match group {
                    0 => _mm256_and_si256(qh, two_bits),
                    1 => _mm256_and_si256(_mm256_srli_epi16(qh, 2), two_bits),
                    2 => _mm256_and_si256(_mm256_srli_epi16(qh, 4), two_bits),
                    _ => _mm256_and_si256(_mm256_srli_epi16(qh, 6), two_bits),
                };
                let w = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                let (s0, s1) = (scales[2 * group] as f32, scales[2 * group + 1] as f32);
                // Lanes 0..4 hold the first 16 values (scale s0), lanes 4..8 the next 16 (s1).
                let lane_scales = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
                let b = sb * (QK_K / QK) + 4 * half + group;
                let slot = &mut acc[group & 1];
                for (r, acc_r) in slot.iter_mut().enumerate() {
                    // SAFETY: rows and blocks in range (caller).
                    let (a, d, [sum_lo, sum_hi]) = unsafe {
                        (load256(acts.block(r0 + r, b)), acts.scale(r0 + r, b), acts.scaled_sum16(r0 + r, b))
                    };
                    let s = _mm256_cvtepi32_ps(dot_u8_i8(w, a));
                    *acc_r = _mm256_fmadd_ps(s, _mm256_mul_ps(lane_scales, _mm256_set1_ps(dw * d)), *acc_r);
                    corr[r] -= 32.0 * dw * (s0 * sum_lo + s1 * sum_hi);
                }
            }
        }
    }
    std::array::from_fn(|r| hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + corr[r])
}

/// Computes `out[r, o]` for all `rows` activation rows and the outputs `outs`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `out` must be a `[rows, n_out]` buffer whose
/// columns `outs` belong to the caller; `acts` must hold `rows` rows of `w.n_in` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantized_rows(
    w: &BlockRows<'_>,
    acts: &QuantizedActs,
    rows: usize,
    outs: Range<usize>,
    out: OutPtr,
) {
    let raw = Acts::new(acts);
    type DotFn<const R: usize> = unsafe fn(*const u8, Acts, usize) -> [f32; R];
    fn pick<const R: usize>(ty: GgmlType) -> Option<DotFn<R>> {
        // Q8_0/Q4_0/Q4_1 are always packed split or interleaved (`split_rows`,
        // `interleaved_rows`): rows in GGUF layout are only k-quants.
        Some(match ty {
            GgmlType::Q4_K => q4_k_dot::<R>,
            GgmlType::Q6_K => q6_k_dot::<R>,
            _ => return None,
        })
    }
    let (Some(dot4), Some(dot3), Some(dot2), Some(dot1)) =
        (pick::<4>(w.ty), pick::<3>(w.ty), pick::<2>(w.ty), pick::<1>(w.ty))
    else {
        super::scalar::quantized_rows(w, acts, rows, outs, out);
        return;
    };
    for o in outs {
        let w_row = w.row(o).as_ptr();
        // SAFETY: `w_row` is a full weight row and rows `r0..r0 + R` exist in `acts`;
        // output `(r, o)` belongs to this task.
        unsafe {
            four_row_groups!(rows, out, o, |r0| [
                dot1(w_row, raw, r0),
                dot2(w_row, raw, r0),
                dot3(w_row, raw, r0),
                dot4(w_row, raw, r0),
            ])
        }
    }
}

/// Eight weights at `p` widened to f32 (`W` is resolved at compile time).
///
/// # Safety
/// Eight elements are readable at `p`; the CPU has AVX2 and F16C.
#[inline(always)]
unsafe fn widen8<W: Dense>(p: *const W) -> __m256 {
    // SAFETY: the caller guarantees the eight elements.
    unsafe {
        match W::KIND {
            DenseKind::F32 => _mm256_loadu_ps(p as *const f32),
            // bf16 is the top half of an f32: shift the zero-extended bits up.
            DenseKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p as *const __m128i,
            )))),
            DenseKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        }
    }
}

/// Dot products of one dense weight row with `R` activation rows, `U` independent accumulators
/// each (the same order for every element type, so 16-bit weights give the bits of their f32
/// widening).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_dot<W: Dense, const R: usize, const U: usize>(
    w_row: *const W,
    x: *const f32,
    n_in: usize,
    r0: usize,
) -> [f32; R] {
    let mut acc = [[_mm256_setzero_ps(); U]; R];
    let mut k = 0;
    // One prefetch per 64-byte line of weights.
    let line_elems = 64 / std::mem::size_of::<W>();
    // SAFETY (loads below): `w_row` has `n_in` values and `x` rows `r0..r0 + R` of `n_in`.
    while k + 8 * U <= n_in {
        if R == 1 {
            // One activation row streams the weights at memory speed; prefetching 8 KB ahead
            // (across row ends: rows are contiguous) measured ~7 % faster f32 decode than the
            // hardware prefetcher alone. A prefetch never faults, so running past the end of
            // the matrix is harmless.
            let ahead = F32_PREFETCH_AHEAD * 4 / std::mem::size_of::<W>();
            let mut line = 0;
            while line < 8 * U {
                _mm_prefetch::<_MM_HINT_T0>(w_row.wrapping_add(k + ahead + line) as *const i8);
                line += line_elems;
            }
        }
        for u in 0..U {
            let wv = unsafe { widen8(w_row.add(k + 8 * u)) };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(x.add((r0 + r) * n_in + k + 8 * u)) };
                acc_r[u] = _mm256_fmadd_ps(wv, xv, acc_r[u]);
            }
        }
        k += 8 * U;
    }
    while k + 8 <= n_in {
        let wv = unsafe { widen8(w_row.add(k)) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xv = unsafe { _mm256_loadu_ps(x.add((r0 + r) * n_in + k)) };
            acc_r[0] = _mm256_fmadd_ps(wv, xv, acc_r[0]);
        }
        k += 8;
    }
    std::array::from_fn(|r| {
        let v = acc[r][1..].iter().fold(acc[r][0], |v, &a| _mm256_add_ps(v, a));
        let mut sum = hsum(v);
        for j in k..n_in {
            // SAFETY: `j < n_in`.
            sum += unsafe { (*w_row.add(j)).widen() * *x.add((r0 + r) * n_in + j) };
        }
        sum
    })
}

/// Dense weights: `out[r, o] = dot(w[o], x[r])`.
///
/// # Safety
/// As [`quantized_rows`]; `w` is `[n_out, n_in]` and `x` is `[rows, n_in]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dense_rows<W: Dense>(
    w: &[W],
    n_in: usize,
    x: &[f32],
    rows: usize,
    outs: Range<usize>,
    out: OutPtr,
) {
    let xp = x.as_ptr();
    for o in outs {
        let w_row = w[o * n_in..(o + 1) * n_in].as_ptr();
        // SAFETY: rows `r0..r0 + R` exist; output `(r, o)` belongs to this task.
        unsafe {
            four_row_groups!(rows, out, o, |r0| [
                f32_dot::<W, 1, 4>(w_row, xp, n_in, r0),
                f32_dot::<W, 2, 2>(w_row, xp, n_in, r0),
                f32_dot::<W, 3, 1>(w_row, xp, n_in, r0),
                f32_dot::<W, 4, 1>(w_row, xp, n_in, r0),
            ])
        }
    }
}

/// Decodes one Q8_0/Q4_0/Q4_1 block to four vectors of eight f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_block(ty: GgmlType, blk: *const u8) -> [__m256; 4] {
    // SAFETY (all loads): `blk` points at a whole block of type `ty` (caller).
    unsafe {
        match ty {
            GgmlType::Q8_0 => {
                let d = _mm256_set1_ps(load_f16(blk));
                std::array::from_fn(|i| {
                    let q = _mm_loadl_epi64(blk.add(2 + 8 * i) as *const __m128i);
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
                })
            }
            _ => {
                let has_min = ty == GgmlType::Q4_1;
                let dw = load_f16(blk);
                let d = _mm256_set1_ps(dw);
                let m = _mm256_set1_ps(if has_min { load_f16(blk.add(2)) } else { -8.0 * dw });
                let packed = _mm_loadu_si128(blk.add(if has_min { 4 } else { 2 }) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(packed, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
                let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                std::array::from_fn(|i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), d, m))
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_dot<const R: usize>(
    ty: GgmlType,
    w_row: *const u8,
    x: *const f32,
    n_in: usize,
    r0: usize,
) -> [f32; R] {
    let size = ty.type_size();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..n_in / QK {
        // SAFETY: block `b` of the row, and values `32 b..32 b + 32` of rows `r0..r0 + R`, exist.
        let values = unsafe { decode_block(ty, w_row.add(size * b)) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xr = unsafe { x.add((r0 + r) * n_in + QK * b) };
            for (i, v) in values.iter().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(xr.add(8 * i)) };
                acc_r[i & 1] = _mm256_fmadd_ps(*v, xv, acc_r[i & 1]);
            }
        }
    }
    std::array::from_fn(|r| hsum(_mm256_add_ps(acc[r][0], acc[r][1])))
}

/// Quantized weights decoded to f32 in registers, exact f32 activations.
///
/// # Safety
/// As [`f32_rows`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn float_decode_rows(w: &BlockRows<'_>, x: &[f32], rows: usize, outs: Range<usize>, out: OutPtr) {
    let n_in = w.n_in;
    if !matches!(w.ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
        // No fused f32 decoder for the k-quants: decode a row, then the f32 kernel.
        let mut decoded = vec![0.0f32; n_in];
        for o in outs {
            let _ = dequantize_into(w.ty, w.row(o), &mut decoded);
            // SAFETY: `decoded` is one row; this task owns column `o`.
            unsafe { dense_rows(&decoded[..], n_in, x, rows, 0..1, OutPtr { ptr: out.ptr.add(o), n_out: out.n_out }) };
        }
        return;
    }
    let xp = x.as_ptr();
    for o in outs {
        let w_row = w.row(o).as_ptr();
        // SAFETY: rows `r0..r0 + R` exist; output `(r, o)` belongs to this task.
        unsafe {
            four_row_groups!(rows, out, o, |r0| [
                decode_dot::<1>(w.ty, w_row, xp, n_in, r0),
                decode_dot::<2>(w.ty, w_row, xp, n_in, r0),
                decode_dot::<3>(w.ty, w_row, xp, n_in, r0),
                decode_dot::<4>(w.ty, w_row, xp, n_in, r0),
            ])
        }
    }
}

/// Split-layout kinds (const generic parameter of [`split_dot`]).
const KIND_Q8_0: u8 = 0;
const KIND_Q4_0: u8 = 1;
const KIND_Q4_1: u8 = 2;

/// Dot products of weight row `o` of a split Q8_0/Q4_0/Q4_1 matrix with `R` activation rows.
///
/// Blocks go in groups of eight: the eight weight scales (and mins) are converted with one
/// `vcvtph2ps`, multiplied by the eight activation scales of each row, and each block's scale
/// is then broadcast from that vector with one `vpermps`. Offsets are accumulated as vectors.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split_dot<const R: usize, const KIND: u8>(w: &SplitBlocks, o: usize, acts: Acts, r0: usize) -> [f32; R] {
    let nb = w.blocks;
    let quant = if KIND == KIND_Q8_0 { 32 } else { 16 };
    // SAFETY (pointer arithmetic and loads below): row `o` has `nb` scales (and mins) and
    // `nb * quant` quant bytes; rows `r0..r0 + R` of the activations have `nb` blocks.
    let (d_row, m_row, qs_row) = unsafe {
        (
            w.d.as_ptr().add(o * nb),
            if KIND == KIND_Q4_1 { w.m.as_ptr().add(o * nb) } else { w.d.as_ptr() },
            w.qs.as_ptr().add(o * nb * quant),
        )
    };
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); R]; 2];
    let mut corr = [_mm256_setzero_ps(); R];
    let groups = nb / 8;
    for g in 0..groups {
        let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(d_row.add(8 * g) as *const __m128i) });
        let offset = match KIND {
            KIND_Q4_1 => _mm256_cvtph_ps(unsafe { _mm_loadu_si128(m_row.add(8 * g) as *const __m128i) }),
            _ => _mm256_mul_ps(dw, _mm256_set1_ps(-8.0)),
        };
        let mut scales = [_mm256_setzero_ps(); R];
        for r in 0..R {
            let row_block = (r0 + r) * acts.blocks + 8 * g;
            let da = unsafe { _mm256_loadu_ps(acts.d.add(row_block)) };
            scales[r] = _mm256_mul_ps(dw, da);
            if KIND != KIND_Q8_0 {
                let dsum = unsafe { _mm256_loadu_ps(acts.dsum.add(row_block)) };
                corr[r] = _mm256_fmadd_ps(offset, dsum, corr[r]);
            }
        }
        for i in 0..8 {
            let b = 8 * g + i;
            let qp = unsafe { qs_row.add(b * quant) };
            let wq = if KIND == KIND_Q8_0 {
                unsafe { load256(qp) }
            } else {
                let packed = unsafe { _mm_loadu_si128(qp as *const __m128i) };
                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask)
            };
            let w_unsigned = if KIND == KIND_Q8_0 { _mm256_sign_epi8(wq, wq) } else { wq };
            let lane = _mm256_set1_epi32(i as i32);
            for r in 0..R {
                let a = unsafe { load256(acts.block(r0 + r, b)) };
                let a = if KIND == KIND_Q8_0 { _mm256_sign_epi8(a, wq) } else { a };
                let s = _mm256_cvtepi32_ps(dot_u8_i8(w_unsigned, a));
                let scale = _mm256_permutevar8x32_ps(scales[r], lane);
                acc[i & 1][r] = _mm256_fmadd_ps(s, scale, acc[i & 1][r]);
            }
        }
    }
    // Leftover blocks (fewer than eight): per-block scalar scales.
    let mut tail = [0.0f32; R];
    for b in groups * 8..nb {
        let (dw, qp) = unsafe { (load_f16(d_row.add(b) as *const u8), qs_row.add(b * quant)) };
        let offset = match KIND {
            KIND_Q4_1 => unsafe { load_f16(m_row.add(b) as *const u8) },
            _ => -8.0 * dw,
        };
        let wq = if KIND == KIND_Q8_0 {
            unsafe { load256(qp) }
        } else {
            let packed = unsafe { _mm_loadu_si128(qp as *const __m128i) };
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask)
        };
        let w_unsigned = if KIND == KIND_Q8_0 { _mm256_sign_epi8(wq, wq) } else { wq };
        for r in 0..R {
            let (a, da) = unsafe { (load256(acts.block(r0 + r, b)), acts.scale(r0 + r, b)) };
            let a = if KIND == KIND_Q8_0 { _mm256_sign_epi8(a, wq) } else { a };
            let s = _mm256_cvtepi32_ps(dot_u8_i8(w_unsigned, a));
            acc[0][r] = _mm256_fmadd_ps(s, _mm256_set1_ps(dw * da), acc[0][r]);
            if KIND != KIND_Q8_0 {
                tail[r] += offset * unsafe { acts.scaled_sum(r0 + r, b) };
            }
        }
    }
    std::array::from_fn(|r| hsum(_mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), corr[r])) + tail[r])
}

/// Output rows per tile of [`split_rows`]: 64 rows of a 576-wide Q4_1 matrix are ~23 KB.
const SPLIT_OUTPUT_TILE: usize = 64;

/// Computes `out[r, o]` for a split Q8_0/Q4_0/Q4_1 matrix.
///
/// # Safety
/// As [`quantized_rows`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn split_rows(w: &SplitBlocks, acts: &QuantizedActs, rows: usize, outs: Range<usize>, out: OutPtr) {
    let raw = Acts::new(acts);
    // Outputs in tiles, and within a tile each group of four activation rows meets every
    // weight row of the tile: a prompt's rows are then read once per tile (from L1) instead of
    // once per output (from L2), and the tile's weights stay in L1/L2 between row groups. Each
    // `(row, output)` is still one `split_dot` of the same row group, so the bits do not change.
    // With `MARCO_KERNELS=avx2` (six alternating pairs of `decode_bench --runs 3`, medians):
    // prefill 813 -> 848 tok/s, decode 276 -> 293.
    macro_rules! run_kind {
        ($kind:expr) => {{
            let mut tile_start = outs.start;
            while tile_start < outs.end {
                let tile = tile_start..(tile_start + SPLIT_OUTPUT_TILE).min(outs.end);
                let mut r0 = 0;
                while r0 < rows {
                    for o in tile.clone() {
                        // SAFETY: rows `r0..r0 + R` exist; output `(r, o)` belongs to this task.
                        unsafe {
                            row_group!(
                                rows,
                                out,
                                o,
                                r0,
                                [
                                    split_dot::<1, { $kind }>(w, o, raw, r0),
                                    split_dot::<2, { $kind }>(w, o, raw, r0),
                                    split_dot::<3, { $kind }>(w, o, raw, r0),
                                    split_dot::<4, { $kind }>(w, o, raw, r0),
                                ]
                            )
                        }
                    }
                    r0 += 4;
                }
                tile_start = tile.end;
            }
        }};
    }
    match w.ty {
        GgmlType::Q8_0 => run_kind!(KIND_Q8_0),
        GgmlType::Q4_0 => run_kind!(KIND_Q4_0),
        _ => run_kind!(KIND_Q4_1),
    }
}

/// [`QuantizedActs::quantize`] with AVX2, bit-identical to it: the block maximum is exact, the
/// scale and its inverse are the same scalar f32 operations, `x · inv` is the same f32 product,
/// and rounding half away from zero is `trunc(t) + copysign(|t − trunc(t)| ≥ ½, t)` (the
/// difference is exact). NaN products (NaN inputs, `∞ · 0`, `0 · ∞`) become 0 as the scalar
/// `as i8` cast makes them; NaN inputs are ignored by the maximum as by `f32::max`.
///
/// # Safety
/// The CPU must support AVX2. `out` holds one entry per block of 32 values of `x` (extra
/// entries are left alone).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_acts(x: &[f32], out: super::ActsMut<'_>) {
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let blocks = x.chunks_exact(QK).zip(out.qs.chunks_exact_mut(QK));
    let scales = out.d.iter_mut().zip(out.dsum.iter_mut()).zip(out.dsum16.iter_mut());
    for ((xb, qb), ((d_out, dsum_out), dsum16_out)) in blocks.zip(scales) {
        // SAFETY: `xb` holds 32 values.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * i)) });
        // NaN lanes of the first operand leave the running maximum unchanged (`vmaxps`
        // returns its second operand when either is NaN), as `f32::max` ignores NaN.
        let mut m = _mm256_setzero_ps();
        for vi in v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, vi), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            let t = _mm256_mul_ps(v[i], inv);
            let trunc = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(t, trunc));
            let away = _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), _mm256_or_ps(_mm256_and_ps(t, sign), one));
            let rounded = _mm256_and_ps(_mm256_add_ps(trunc, away), _mm256_cmp_ps(t, t, _CMP_ORD_Q));
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, lo), hi))
        });
        let words = _mm256_packs_epi32(q[0], q[1]);
        let words_hi = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_packs_epi16(words, words_hi);
        // The packs work per 128-bit lane: restore the element order.
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `qb` holds 32 bytes.
        unsafe { _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, bytes) };
        let sum_i32 = |a: __m256i, b: __m256i| {
            let s = _mm256_add_epi32(a, b);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
        };
        let sums = [sum_i32(q[0], q[1]), sum_i32(q[2], q[3])];
        *d_out = d;
        *dsum16_out = [d * sums[0] as f32, d * sums[1] as f32];
        *dsum_out = d * (sums[0] + sums[1]) as f32;
    }
}
