//! AVX-512 (F, BW, VL) kernels for the split Q8_0/Q4_0/Q4_1 layout and for f32 weights,
//! selected at run time by [`super::isa`] ([`super::Isa::Avx512`], [`super::Isa::Avx512Vnni`]).
//!
//! The integer kernels follow the AVX2 ones ([`super::x86`]) with two quant blocks per 512-bit
//! register: a pair of weight blocks is unpacked once into 64 unsigned bytes and multiplied
//! with the 64 bytes of the same two blocks of each activation row, by `vpdpbusd` (AVX512-VNNI)
//! or `vpmaddubsw` + `vpmaddwd`; the 16 lanes of i32 sums (eight per block) are converted to
//! f32 and accumulated with the per-block product of the two scales, broadcast to its eight
//! lanes by one `vpermps`. Blocks go in groups of eight, whose f16 scales (and mins) are
//! converted with one `vcvtph2ps`. A row's last, partial group has a compile-time pair count
//! and avoids masked loads, which measured several times slower than plain loads on the
//! development CPU (AMD EPYC, AVX-512): plain loads plus a register mask where the values are
//! in bounds (the activation scales are padded for this), masked loads only at the very end of
//! a matrix. Offsets (Q4_0's `-8`, Q4_1's `m`) are applied through the activation block sums,
//! eight blocks per FMA.
//!
//! Up to eight activation rows share each decoded weight pair (32 vector registers leave room
//! for eight accumulators), so a batch of eight streams the weights once.
//!
//! Every kernel is compiled twice from one macro, with and without VNNI in its target
//! features, so that the dot-product helper inlines into each.

use std::arch::x86_64::*;
use std::ops::Range;

use super::dense::{Dense, DenseKind};
use super::write_rows;
use super::{AlignedI8, OutPtr, QuantizedActs};
use crate::packed::SplitBlocks;
use crate::quant::{GgmlType, QK};

/// Split-layout kinds (const generic parameter of the dot kernels).
const KIND_Q8_0: u8 = 0;
const KIND_Q4_0: u8 = 1;
const KIND_Q4_1: u8 = 2;

/// Most activation rows per pass over a weight row.
const MAX_ROWS: usize = 8;

/// Sixteen i32 sums of four adjacent u8 × i8 products each (`vpmaddubsw` + `vpmaddwd`). The
/// pairwise i16 sums cannot saturate: weights are at most 128 (`|q8|`) and activations at most
/// 127 in magnitude, so a pair is at most `2 · 128 · 127`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn dot_u8_i8_plain(w: __m512i, a: __m512i) -> __m512i {
    _mm512_madd_epi16(_mm512_maddubs_epi16(w, a), _mm512_set1_epi16(1))
}

/// Sixteen i32 sums of four adjacent u8 × i8 products each (`vpdpbusd`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_u8_i8_vnni(w: __m512i, a: __m512i) -> __m512i {
    _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a)
}

/// The sums of the 16 lanes of each of `acc[0..R]`. From three rows on, a transposing tree
/// (23 shuffles and adds for eight rows) replaces `R` separate horizontal sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn sum_lanes<const R: usize>(acc: &[__m512; R]) -> [f32; R] {
    if R < 3 {
        return std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]));
    }
    let v = |r: usize| if r < R { acc[r] } else { _mm512_setzero_ps() };
    // [a.lo + a.hi | b.lo + b.hi] for the rows (2k, 2k + 1).
    let x: [__m512; 4] = std::array::from_fn(|k| {
        let (a, b) = (v(2 * k), v(2 * k + 1));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
    });
    // 128-bit lane i of y[j]: four partial sums of row 4j + i.
    let y: [__m512; 2] = std::array::from_fn(|j| {
        let (p, q) = (x[2 * j], x[2 * j + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(p, q), _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q))
    });
    // Lane i: [row i, row i + 4, row i, row i + 4] partial sums of two, then whole sums.
    let z = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
    let total = _mm512_add_ps(z, _mm512_permute_ps::<0b01_00_11_10>(z));
    let mut lanes = [0.0f32; 16];
    // SAFETY: `lanes` holds 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), total) };
    std::array::from_fn(|r| lanes[4 * (r % 4) + r / 4])
}

/// Raw pointers to one weight row of a split matrix.
#[derive(Clone, Copy)]
struct WeightRow {
    d: *const u16,
    /// The mins (Q4_1); the scales again otherwise (never used as mins).
    m: *const u16,
    qs: *const u8,
    /// One past the last scale (and min) of the matrix.
    d_end: *const u16,
    m_end: *const u16,
}

impl WeightRow {
    /// # Safety
    /// `o` must be a row of `w`, and `KIND` must match `w.ty`.
    unsafe fn new<const KIND: u8>(w: &SplitBlocks, o: usize) -> WeightRow {
        let nb = w.blocks;
        let quant = if KIND == KIND_Q8_0 { 32 } else { 16 };
        // SAFETY: row `o` has `nb` scales (and mins) and `nb * quant` quant bytes.
        unsafe {
            let m = if KIND == KIND_Q4_1 { &w.m } else { &w.d };
            WeightRow {
                d: w.d.as_ptr().add(o * nb),
                m: m.as_ptr().add(o * nb),
                qs: w.qs.as_ptr().add(o * nb * quant),
                d_end: w.d.as_ptr_range().end,
                m_end: m.as_ptr_range().end,
            }
        }
    }
}

impl WeightRow {
    /// The eight f16 values at `scales + b0` (the row's scales `d` or mins `m`), lanes outside
    /// `mask` zeroed: a plain load and a register mask where eight values are in bounds
    /// (masked loads measured slow), else a masked load.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL; the lanes in `mask` must exist.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn scales_tail(self, scales: *const u16, b0: usize, mask: __mmask8) -> __m128i {
        let end = if std::ptr::eq(scales, self.d) { self.d_end } else { self.m_end };
        // SAFETY: the lanes in `mask` exist (caller); the plain load only when all eight do.
        unsafe {
            let p = scales.add(b0);
            if (end as usize).saturating_sub(p as usize) >= 16 {
                _mm_maskz_mov_epi16(mask, _mm_loadu_si128(p as *const __m128i))
            } else {
                _mm_maskz_loadu_epi16(mask, p as *const i16)
            }
        }
    }
}

/// Raw pointers to activation rows from `r0` of [`QuantizedActs`].
#[derive(Clone, Copy)]
struct ActRows {
    qs: *const u8,
    d: *const f32,
    dsum: *const f32,
    blocks: usize,
}

impl ActRows {
    /// The same views from row `r0` on.
    ///
    /// # Safety
    /// Row `r0` must exist.
    unsafe fn at_row(self, r0: usize) -> ActRows {
        let nb = self.blocks;
        // SAFETY: row `r0` exists.
        unsafe {
            ActRows { qs: self.qs.add(r0 * nb * QK), d: self.d.add(r0 * nb), dsum: self.dsum.add(r0 * nb), blocks: nb }
        }
    }

    /// # Safety
    /// Row `r0` must exist in `acts`.
    unsafe fn new(acts: &QuantizedActs, r0: usize) -> ActRows {
        let nb = acts.blocks;
        // SAFETY: row `r0` exists.
        unsafe {
            ActRows {
                qs: acts.qs.as_ptr().add(r0 * nb * QK) as *const u8,
                d: acts.d.as_ptr().add(r0 * nb),
                dsum: acts.dsum.as_ptr().add(r0 * nb),
                blocks: nb,
            }
        }
    }
}

/// Generates `split_dot` (one weight row against `R` activation rows) and `split_rows` (the
/// entry point) for one target-feature set and dot-product helper.
macro_rules! split_kernels {
    ($module:ident, $features:literal, $dot:ident, $unsigned_acts:literal) => {
        pub(super) mod $module {
            use super::*;

            /// Q8_0 weights meet the activations offset by 128 (unsigned bytes, see
            /// [`flip_signs`]) and stay signed: `vpdpbusd` then takes `Σ (a + 128) w` from an
            /// accumulator preset to `-128 Σ w` (once per weight pair), which saves the sign
            /// transfer per activation row. VNNI only: `vpmaddubsw` could saturate.
            const UNSIGNED_ACTS: bool = $unsigned_acts;

            /// Accumulates blocks `b0..b0 + n` (`n <= 8`, in `PAIRS = ceil(n / 2)` pairs; `FULL`
            /// means `n == 8`) of weight row
            /// `row` against the activation rows `acts` into `acc`.
            ///
            /// # Safety
            /// The CPU must have the target features; the blocks exist in the weight row and in
            /// each of the `R` activation rows (partial groups are read with masked loads).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn group<const R: usize, const KIND: u8, const PAIRS: usize, const FULL: bool>(
                acc: &mut [__m512; R],
                row: WeightRow,
                acts: ActRows,
                b0: usize,
                n: usize,
            ) {
                let n = if FULL { 8 } else { n };
                let quant = if KIND == KIND_Q8_0 { 32 } else { 16 };
                let group_mask: __mmask8 = if FULL { 0xFF } else { (1u8 << n) - 1 };
                // SAFETY: `n` scales (and mins) from block `b0` exist; masked lanes are not read.
                let (dw, mw) = unsafe {
                    if FULL {
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(row.d.add(b0) as *const __m128i)),
                            _mm256_cvtph_ps(_mm_loadu_si128(row.m.add(b0) as *const __m128i)),
                        )
                    } else {
                        (
                            _mm256_cvtph_ps(row.scales_tail(row.d, b0, group_mask)),
                            _mm256_cvtph_ps(row.scales_tail(row.m, b0, group_mask)),
                        )
                    }
                };
                let dw = _mm512_zextps256_ps512(dw);
                let offset = match KIND {
                    KIND_Q4_1 => _mm512_zextps256_ps512(mw),
                    _ => _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
                };
                // A compile-time pair count keeps the pair loops unrolled and their arrays in
                // registers (a run-time count measured several times slower).
                let pairs = PAIRS;
                let mut wv = [_mm512_setzero_si512(); 4];
                let mut negative: [__mmask64; 4] = [0; 4];
                let mut preset = [_mm512_setzero_si512(); 4];
                for p in 0..pairs {
                    let whole = FULL || 2 * p + 2 <= n;
                    // SAFETY: block `b0 + 2p` (and `b0 + 2p + 1` when `whole`) exist.
                    let qp = unsafe { row.qs.add((b0 + 2 * p) * quant) };
                    if KIND == KIND_Q8_0 {
                        // SAFETY: 64 bytes (two blocks) or, masked, 32 bytes (one) at `qp`.
                        let wq = unsafe {
                            if whole {
                                _mm512_loadu_si512(qp as *const __m512i)
                            } else {
                                _mm512_maskz_loadu_epi8(0xFFFF_FFFF, qp as *const i8)
                            }
                        };
                        if UNSIGNED_ACTS {
                            // -128 Σ w per lane of four bytes.
                            // SAFETY: only in the VNNI module (`UNSIGNED_ACTS`), compiled with VNNI
                            // (where the block is not needed; the other module needs it to compile).
                            #[allow(unused_unsafe)]
                            let sum = unsafe { dot_u8_i8_vnni(_mm512_set1_epi8(-128), wq) };
                            preset[p] = _mm512_sub_epi32(_mm512_setzero_si512(), sum);
                            wv[p] = wq;
                        } else {
                            // |w| as unsigned bytes; the activations take the weights' signs.
                            negative[p] = _mm512_movepi8_mask(wq);
                            wv[p] = _mm512_abs_epi8(wq);
                        }
                    } else {
                        // SAFETY: 32 bytes (two blocks) or, masked, 16 bytes (one) at `qp`.
                        let packed = unsafe {
                            if whole {
                                _mm256_loadu_si256(qp as *const __m256i)
                            } else {
                                _mm256_maskz_loadu_epi8(0xFFFF, qp as *const i8)
                            }
                        };
                        let z = _mm512_castsi256_si512(packed);
                        let doubled = _mm512_shuffle_i64x2::<0b01_01_00_00>(z, z);
                        // Per 64-bit lane: 128-bit lanes 0 and 2 keep the low nibbles, 1 and 3
                        // the high ones.
                        let shifts = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
                        wv[p] = _mm512_and_si512(_mm512_srlv_epi64(doubled, shifts), _mm512_set1_epi8(0x0F));
                    }
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let row_block = r * acts.blocks + b0;
                    // SAFETY: `n` scales and sums of activation row `r` from block `b0` exist.
                    let (da, dsum) = unsafe {
                        if FULL {
                            (
                                _mm512_zextps256_ps512(_mm256_loadu_ps(acts.d.add(row_block))),
                                _mm512_zextps256_ps512(_mm256_loadu_ps(acts.dsum.add(row_block))),
                            )
                        } else {
                            // The scales and sums are padded: eight values from any block are readable.
                            let mask = group_mask as __mmask16;
                            (
                                _mm512_maskz_mov_ps(
                                    mask,
                                    _mm512_zextps256_ps512(_mm256_loadu_ps(acts.d.add(row_block))),
                                ),
                                _mm512_maskz_mov_ps(
                                    mask,
                                    _mm512_zextps256_ps512(_mm256_loadu_ps(acts.dsum.add(row_block))),
                                ),
                            )
                        }
                    };
                    let scales = _mm512_mul_ps(dw, da);
                    if KIND != KIND_Q8_0 {
                        *acc_r = _mm512_fmadd_ps(offset, dsum, *acc_r);
                    }
                    for p in 0..pairs {
                        let whole = FULL || 2 * p + 2 <= n;
                        // SAFETY: 64 bytes (two blocks) or, masked, 32 (one) of activation row `r`.
                        let a = unsafe {
                            let ap = acts.qs.add((row_block + 2 * p) * QK);
                            if whole {
                                _mm512_loadu_si512(ap as *const __m512i)
                            } else {
                                _mm512_maskz_loadu_epi8(0xFFFF_FFFF, ap as *const i8)
                            }
                        };
                        let dot = if KIND == KIND_Q8_0 && UNSIGNED_ACTS {
                            // SAFETY: only in the VNNI module (`UNSIGNED_ACTS`), compiled with VNNI
                            // (where the block is not needed; the other module needs it to compile).
                            #[allow(unused_unsafe)]
                            let dot = unsafe { _mm512_dpbusd_epi32(preset[p], a, wv[p]) };
                            dot
                        } else if KIND == KIND_Q8_0 {
                            $dot(wv[p], _mm512_mask_sub_epi8(a, negative[p], _mm512_setzero_si512(), a))
                        } else {
                            $dot(wv[p], a)
                        };
                        let s = _mm512_cvtepi32_ps(dot);
                        // Lanes 0..8 take the scale of block `2p`, lanes 8..16 that of `2p + 1`.
                        let (lo, hi) = (2 * p as i32, 2 * p as i32 + 1);
                        let lanes = _mm512_setr_epi32(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi);
                        *acc_r = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(lanes, scales), *acc_r);
                    }
                }
            }

            /// Dot products of weight row `o` with the `R` activation rows from `r0`.
            ///
            /// # Safety
            /// The CPU must have the target features; `o < n_out` of `w`; rows `r0..r0 + R`
            /// exist in `acts`, whose rows have `w.blocks` blocks.
            #[target_feature(enable = $features)]
            unsafe fn split_dot<const R: usize, const KIND: u8>(
                w: &SplitBlocks,
                o: usize,
                acts: ActRows,
                r0: usize,
            ) -> [f32; R] {
                // SAFETY: as this function's contract.
                let (row, acts) = unsafe { (WeightRow::new::<KIND>(w, o), acts.at_row(r0)) };
                let nb = w.blocks;
                let mut acc = [_mm512_setzero_ps(); R];
                let mut b0 = 0;
                while b0 + 8 <= nb {
                    // SAFETY: blocks `b0..b0 + 8` exist.
                    unsafe { group::<R, KIND, 4, true>(&mut acc, row, acts, b0, 8) };
                    b0 += 8;
                }
                if b0 < nb {
                    // SAFETY: blocks `b0..nb` exist.
                    unsafe {
                        let n = nb - b0;
                        match n.div_ceil(2) {
                            1 => group::<R, KIND, 1, false>(&mut acc, row, acts, b0, n),
                            2 => group::<R, KIND, 2, false>(&mut acc, row, acts, b0, n),
                            3 => group::<R, KIND, 3, false>(&mut acc, row, acts, b0, n),
                            _ => group::<R, KIND, 4, false>(&mut acc, row, acts, b0, n),
                        }
                    }
                }
                sum_lanes(&acc)
            }

            /// Computes `out[r, o]` for a split Q8_0/Q4_0/Q4_1 matrix.
            ///
            /// # Safety
            /// The CPU must have the target features; `out` must be a `[rows, n_out]` buffer
            /// whose columns `outs` belong to the caller; `acts` must hold `rows` rows of
            /// `w.blocks` blocks.
            #[target_feature(enable = $features)]
            pub(in crate::kernels) unsafe fn split_rows(
                w: &SplitBlocks,
                acts: &QuantizedActs,
                rows: usize,
                outs: Range<usize>,
                out: OutPtr,
            ) {
                // SAFETY: row 0 exists when `rows > 0`; no row is read otherwise.
                let mut base = unsafe { ActRows::new(acts, 0) };
                let flipped = (UNSIGNED_ACTS && w.ty == GgmlType::Q8_0).then(|| flip_signs(&acts.qs));
                if let Some(flipped) = &flipped {
                    base.qs = flipped.as_ptr() as *const u8;
                }
                let acts = base;
                macro_rules! run_kind {
                    ($kind:expr) => {
                        for o in outs {
                            let mut r0 = 0;
                            while r0 < rows {
                                // SAFETY: rows `r0..r0 + R` exist; output `(r, o)` belongs to
                                // this task.
                                unsafe {
                                    match rows - r0 {
                                        1 => write_rows(out, r0, o, &split_dot::<1, { $kind }>(w, o, acts, r0)),
                                        2 => write_rows(out, r0, o, &split_dot::<2, { $kind }>(w, o, acts, r0)),
                                        3 => write_rows(out, r0, o, &split_dot::<3, { $kind }>(w, o, acts, r0)),
                                        4 => write_rows(out, r0, o, &split_dot::<4, { $kind }>(w, o, acts, r0)),
                                        5 => write_rows(out, r0, o, &split_dot::<5, { $kind }>(w, o, acts, r0)),
                                        6 => write_rows(out, r0, o, &split_dot::<6, { $kind }>(w, o, acts, r0)),
                                        7 => write_rows(out, r0, o, &split_dot::<7, { $kind }>(w, o, acts, r0)),
                                        _ => write_rows(out, r0, o, &split_dot::<MAX_ROWS, { $kind }>(w, o, acts, r0)),
                                    }
                                }
                                r0 += MAX_ROWS;
                            }
                        }
                    };
                }
                match w.ty {
                    GgmlType::Q8_0 => run_kind!(KIND_Q8_0),
                    GgmlType::Q4_0 => run_kind!(KIND_Q4_0),
                    _ => run_kind!(KIND_Q4_1),
                }
            }
        }
    };
}

split_kernels!(plain, "avx512f,avx512bw,avx512vl,avx2,fma,f16c", dot_u8_i8_plain, false);
split_kernels!(vnni, "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c", dot_u8_i8_vnni, true);

/// The activation quants plus 128, as unsigned bytes (`q ^ 0x80`), in a buffer of the same
/// layout and alignment.
fn flip_signs(qs: &AlignedI8) -> AlignedI8 {
    let mut flipped = AlignedI8::zeroed(qs.len());
    for (f, &q) in flipped.iter_mut().zip(qs.iter()) {
        *f = q ^ i8::MIN;
    }
    flipped
}

/// Sixteen weights at `p` widened to f32, or the first `n` of them (the rest zero) when
/// `mask` is `Some(n)` (`W` is resolved at compile time).
///
/// # Safety
/// The elements read are readable; the CPU has AVX-512 F/BW/VL.
#[inline(always)]
unsafe fn widen16<W: Dense>(p: *const W, mask: __mmask16) -> __m512 {
    // SAFETY: the caller guarantees the elements under `mask`; masked-off lanes are not read.
    unsafe {
        match W::KIND {
            DenseKind::F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
            // bf16 is the top half of an f32: shift the zero-extended bits up.
            DenseKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_maskz_loadu_epi16(mask, p as *const i16),
            ))),
            DenseKind::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
        }
    }
}

/// Dot products of one dense weight row with `R` activation rows, `U` accumulators each; the
/// last `n_in % 16` values use masked loads (the same order for every element type, so
/// 16-bit weights give the bits of their f32 widening).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f32_dot<W: Dense, const R: usize, const U: usize>(
    w_row: *const W,
    x: *const f32,
    n_in: usize,
    r0: usize,
) -> [f32; R] {
    let mut acc = [[_mm512_setzero_ps(); U]; R];
    let mut k = 0;
    // `w_row` has `n_in` values and `x` rows `r0..r0 + R` of `n_in` each (caller).
    while k + 16 * U <= n_in {
        for u in 0..U {
            // SAFETY: values `k + 16u..k + 16u + 16` of the weight row exist (`k + 16U <= n_in`).
            let wv = unsafe { widen16(w_row.add(k + 16 * u), 0xFFFF) };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: the same values of activation row `r0 + r` exist.
                let xv = unsafe { _mm512_loadu_ps(x.add((r0 + r) * n_in + k + 16 * u)) };
                acc_r[u] = _mm512_fmadd_ps(wv, xv, acc_r[u]);
            }
        }
        k += 16 * U;
    }
    while k < n_in {
        let left = n_in - k;
        let mask: __mmask16 = if left >= 16 { 0xFFFF } else { (1u16 << left) - 1 };
        // SAFETY: the masked loads read only values `k..n_in`.
        let wv = unsafe { widen16(w_row.add(k), mask) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: as above, for activation row `r0 + r`.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add((r0 + r) * n_in + k)) };
            acc_r[0] = _mm512_fmadd_ps(wv, xv, acc_r[0]);
        }
        k += 16;
    }
    sum_lanes(&std::array::from_fn(|r| acc[r][1..].iter().fold(acc[r][0], |v, &a| _mm512_add_ps(v, a))))
}

/// Dense weights: `out[r, o] = dot(w[o], x[r])`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, AVX2, FMA and F16C; `w` is `[n_out, n_in]`, `x` is
/// `[rows, n_in]`, and `out` a `[rows, n_out]` buffer whose columns `outs` belong to the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
        let mut r0 = 0;
        while r0 < rows {
            // SAFETY: rows `r0..r0 + R` exist; output `(r, o)` belongs to this task.
            unsafe {
                match rows - r0 {
                    1 => write_rows(out, r0, o, &f32_dot::<W, 1, 4>(w_row, xp, n_in, r0)),
                    2 => write_rows(out, r0, o, &f32_dot::<W, 2, 4>(w_row, xp, n_in, r0)),
                    3 => write_rows(out, r0, o, &f32_dot::<W, 3, 2>(w_row, xp, n_in, r0)),
                    4 => write_rows(out, r0, o, &f32_dot::<W, 4, 2>(w_row, xp, n_in, r0)),
                    5 => write_rows(out, r0, o, &f32_dot::<W, 5, 1>(w_row, xp, n_in, r0)),
                    6 => write_rows(out, r0, o, &f32_dot::<W, 6, 1>(w_row, xp, n_in, r0)),
                    7 => write_rows(out, r0, o, &f32_dot::<W, 7, 1>(w_row, xp, n_in, r0)),
                    _ => write_rows(out, r0, o, &f32_dot::<W, MAX_ROWS, 1>(w_row, xp, n_in, r0)),
                }
            }
            r0 += MAX_ROWS;
        }
    }
}

/// Outputs `outs` (whole groups of sixteen) of an interleaved Q8_0/Q4_0/Q4_1 matrix
/// ([`crate::packed::Interleaved16`]) with 8-bit activations, up to eight activation rows per
/// pass over the weights. Lane `i` of every vector belongs to output `16 g + i`: each 32-bit
/// word of activations is broadcast to all lanes and meets the matching word of sixteen weight
/// rows in one `vpdpbusd`, so a block of sixteen rows costs eight of them per activation row
/// and no horizontal sum. Computes exactly what `scalar::interleaved_rows` computes.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; `outs` must be whole groups of
/// sixteen inside the matrix, owned by the caller in `out`; `acts` must hold `rows` rows of
/// `w.blocks` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn interleaved_rows(
    w: &crate::packed::Interleaved16,
    acts: &QuantizedActs,
    rows: usize,
    outs: Range<usize>,
    out: OutPtr,
) {
    const ROWS: usize = crate::packed::Interleaved16::ROWS;
    macro_rules! run_kind {
        ($kind:expr) => {
            for g in outs.start / ROWS..outs.end / ROWS {
                let mut r0 = 0;
                while r0 < rows {
                    // SAFETY: group `g` and rows `r0..r0 + R` exist (this function's contract).
                    unsafe {
                        match rows - r0 {
                            1 => interleaved_group::<1, { $kind }>(w, g, acts, r0, out),
                            2 => interleaved_group::<2, { $kind }>(w, g, acts, r0, out),
                            3 => interleaved_group::<3, { $kind }>(w, g, acts, r0, out),
                            4 => interleaved_group::<4, { $kind }>(w, g, acts, r0, out),
                            5 => interleaved_group::<5, { $kind }>(w, g, acts, r0, out),
                            6 => interleaved_group::<6, { $kind }>(w, g, acts, r0, out),
                            7 => interleaved_group::<7, { $kind }>(w, g, acts, r0, out),
                            _ => interleaved_group::<MAX_ROWS, { $kind }>(w, g, acts, r0, out),
                        }
                    }
                    r0 += MAX_ROWS;
                }
            }
        };
    }
    match w.ty {
        GgmlType::Q8_0 => run_kind!(KIND_Q8_0),
        GgmlType::Q4_0 => run_kind!(KIND_Q4_0),
        _ => run_kind!(KIND_Q4_1),
    }
}

/// How far ahead of the block being read [`interleaved_group`] prefetches, in bytes.
const INTERLEAVED_PREFETCH_AHEAD: usize = 8192;

/// Sixteen outputs (group `g`) for activation rows `r0..r0 + R`.
///
/// # Safety
/// As [`interleaved_rows`], for one group and `R` existing rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn interleaved_group<const R: usize, const KIND: u8>(
    w: &crate::packed::Interleaved16,
    g: usize,
    acts: &QuantizedActs,
    r0: usize,
    out: OutPtr,
) {
    use crate::packed::Interleaved16;
    let group_block = Interleaved16::group_block_bytes(w.ty);
    let header = Interleaved16::header_bytes(w.ty);
    let nibble_mask = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    // SAFETY (all pointer arithmetic below): group `g` has `w.blocks` blocks of `group_block`
    // bytes in `w.data`; activation rows `r0..r0 + R` have `acts.blocks` blocks of 32 quants
    // and one scale and sum each.
    let base = unsafe { w.data.as_ptr().add(g * w.blocks * group_block) };
    for b in 0..w.blocks {
        let p = unsafe { base.add(b * group_block) };
        // The weights stream from memory once per step. With several activation rows the
        // kernel computes long enough per byte that the hardware prefetcher alone falls behind:
        // fetching 8 KB ahead measured +18 % at eight rows and +7 % at one (alternating runs of
        // `batch_bench`). A prefetch never faults, so running past the matrix is harmless.
        // Into L1 (T0), not non-temporal: NTA kept the caches for the KV cache on one AMD
        // machine (+3 % batched), but on an Intel Xeon it throttled the stream to well under
        // half the memory's bandwidth (a 7B Q8_0 decode 1.2 → 3.3 tok/s with T0).
        let mut line = 0;
        while line < group_block {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(INTERLEAVED_PREFETCH_AHEAD + line) as *const i8);
            line += 64;
        }
        let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) });
        let offset = match KIND {
            KIND_Q4_1 => _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p.add(32) as *const __m256i) }),
            KIND_Q4_0 => _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
            _ => _mm512_mul_ps(dw, _mm512_set1_ps(-128.0)),
        };
        let q = unsafe { p.add(header) } as *const __m512i;
        // Word `s` of all sixteen rows: the weights that meet activation word `s`.
        let mut wv = [_mm512_setzero_si512(); 8];
        if KIND == KIND_Q8_0 {
            for (s, v) in wv.iter_mut().enumerate() {
                *v = unsafe { _mm512_loadu_si512(q.add(s)) };
            }
        } else {
            for s in 0..4 {
                let packed = unsafe { _mm512_loadu_si512(q.add(s)) };
                wv[s] = _mm512_and_si512(packed, nibble_mask);
                wv[s + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble_mask);
            }
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let row_block = (r0 + r) * acts.blocks + b;
            let a = unsafe { acts.qs.as_ptr().add(row_block * QK) } as *const i32;
            // Two chains of four `vpdpbusd` instead of one of eight (latency 4, two per cycle on
            // the development CPU): the integer sum is the same, and 8-row products measured
            // 3-6 % faster (`kernels` bench, five alternating runs).
            let mut sums = [_mm512_setzero_si512(); 2];
            for (s, v) in wv.iter().enumerate() {
                let word = unsafe { a.add(s).read_unaligned() };
                sums[s & 1] = _mm512_dpbusd_epi32(sums[s & 1], *v, _mm512_set1_epi32(word));
            }
            let sum = _mm512_add_epi32(sums[0], sums[1]);
            let (da, dsum) = unsafe { (*acts.d.get_unchecked(row_block), *acts.dsum.get_unchecked(row_block)) };
            *acc_r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(da)), *acc_r);
            *acc_r = _mm512_fmadd_ps(offset, _mm512_set1_ps(dsum), *acc_r);
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        // SAFETY: outputs `16 g..16 g + 16` of row `r0 + r` belong to the caller.
        unsafe { _mm512_storeu_ps(out.ptr.add((r0 + r) * out.n_out + g * Interleaved16::ROWS), *acc_r) };
    }
}
