//! NEON kernels (aarch64), selected at run time by [`super::isa`].
//!
//! NEON is part of the aarch64 baseline, so [`super::Isa::Neon`] is available on every aarch64
//! CPU. The 8-bit dot products use `sdot` where the CPU has FEAT_DotProd (detected at run time:
//! [`super::Isa::NeonDotprod`]) and `smull` + `sadalp` (widening multiply, pairwise add into
//! i32) otherwise. Rust's `vdotq_s32` and its f16 vector types are not stable yet, so `sdot` and
//! the f16 → f32 widening of the scales (`fcvtl`, baseline) are one-instruction `asm!` blocks.
//!
//! The algebra is the x86 kernels' (and the portable definition's): per block of 32, the exact
//! integer sum of weight quants × activation quants, scaled in f32 by both block scales, with
//! the weights' offsets (Q4_0's `-8`, Q4_1's `m`, Q4_K's mins, Q6_K's `-32`) applied through
//! the activation block sums precomputed in [`QuantizedActs`]. The 4-bit quants stay unsigned
//! (0..15), which `sdot`'s signed × signed product takes as they are. Activation rows go four
//! at a time so that each weight block is loaded once and reused from registers.
//!
//! Each kernel body is generic over `SDOT`; the `sdot` block names the `dotprod` extension to
//! the assembler itself, so the build needs no `dotprod` target feature and the instruction
//! runs only where [`super::isa`] found it.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::dense::{Dense, DenseKind};
use super::{Acts, BlockRows, OutPtr, QuantizedActs};
use crate::packed::SplitBlocks;
use crate::quant::{dequantize_into, k4_scale_min, read_f16, GgmlType, QK, QK_K};

/// Widens four f16 values (their bits) to f32 (`fcvtl`, exact, subnormals included).
#[inline]
#[target_feature(enable = "neon")]
fn f16x4_to_f32(bits: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: `fcvtl` is in the aarch64 baseline and reads and writes only the named registers.
    unsafe {
        asm!(
            "fcvtl {out:v}.4s, {bits:v}.4h",
            out = lateout(vreg) out,
            bits = in(vreg) bits,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// Loads four f16 values at `p` and widens them.
///
/// # Safety
/// Four `u16` must be readable at `p`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_f16x4(p: *const u16) -> float32x4_t {
    // SAFETY: guaranteed by the caller.
    f16x4_to_f32(unsafe { vld1_u16(p) })
}

/// `acc + Σ a·b` over sixteen i8 pairs, spread over the four i32 lanes (how the products are
/// spread differs between the two forms; only the lanes' total is used).
///
/// # Safety
/// With `SDOT`, the CPU must have FEAT_DotProd.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot_i8<const SDOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if SDOT {
        let mut acc = acc;
        // SAFETY: guaranteed by the caller; `sdot` reads and writes only the named registers.
        unsafe {
            asm!(
                // The build may not enable `dotprod`; the caller checked the CPU has it.
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    } else {
        // |a·b| ≤ 128 · 128, so the i16 products are exact; `sadalp` widens pairs to i32.
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// The 32 quants of a block as two vectors of sixteen i8 (4-bit quants unpacked to 0..15:
/// low nibbles are values 0..16, high nibbles 16..32).
///
/// # Safety
/// 16 (`FOUR_BIT`) or 32 bytes must be readable at `qp`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn block_quants<const FOUR_BIT: bool>(qp: *const u8) -> (int8x16_t, int8x16_t) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if FOUR_BIT {
            let packed = vld1q_u8(qp);
            (vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed)))
        } else {
            (vld1q_s8(qp as *const i8), vld1q_s8(qp.add(16) as *const i8))
        }
    }
}

/// The integer dot product of a block's quants `w` with activation block `b` of row `r`, as f32.
///
/// # Safety
/// As [`dot_i8`]; row `r` and block `b` must exist in `acts`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn block_dot<const SDOT: bool>(w: (int8x16_t, int8x16_t), acts: Acts, r: usize, b: usize) -> float32x4_t {
    // SAFETY: guaranteed by the caller (32 activation bytes per block).
    unsafe {
        let a = acts.block(r, b) as *const i8;
        let s = dot_i8::<SDOT>(vdupq_n_s32(0), w.0, vld1q_s8(a));
        vcvtq_f32_s32(dot_i8::<SDOT>(s, w.1, vld1q_s8(a.add(16))))
    }
}

/// Split-layout kinds (const generic parameter of [`split_dot`]).
const KIND_Q8_0: u8 = 0;
const KIND_Q4_0: u8 = 1;
const KIND_Q4_1: u8 = 2;

/// Blocks `4 g + LANE` of a group of four: accumulates each row's integer dot product times
/// lane `LANE` of its combined scales.
///
/// # Safety
/// As [`block_dot`] for rows `r0..r0 + R`; `qp` points at the block's quants.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn split_block<const R: usize, const FOUR_BIT: bool, const SDOT: bool, const LANE: i32>(
    acc: &mut [float32x4_t; R],
    scales: &[float32x4_t; R],
    qp: *const u8,
    acts: Acts,
    r0: usize,
    b: usize,
) {
    // SAFETY: guaranteed by the caller.
    let w = unsafe { block_quants::<FOUR_BIT>(qp) };
    for r in 0..R {
        // SAFETY: guaranteed by the caller.
        let s = unsafe { block_dot::<SDOT>(w, acts, r0 + r, b) };
        acc[r] = vfmaq_laneq_f32::<LANE>(acc[r], s, scales[r]);
    }
}

/// Dot products of weight row `o` of a split Q8_0/Q4_0/Q4_1 matrix with `R` activation rows.
///
/// Blocks go in groups of four: the four weight scales (and mins) are widened with one
/// `fcvtl`, multiplied by the four activation scales of each row, and each block's integer
/// sum is then accumulated with its lane of that vector (`fmla` by element).
///
/// # Safety
/// As [`dot_i8`]; rows `r0..r0 + R` must exist in `acts`, whose rows have `w.blocks` blocks.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn split_dot<const R: usize, const KIND: u8, const SDOT: bool>(
    w: &SplitBlocks,
    o: usize,
    acts: Acts,
    r0: usize,
) -> [f32; R] {
    let nb = w.blocks;
    let quant = if KIND == KIND_Q8_0 { 32 } else { 16 };
    // SAFETY (pointer arithmetic and loads below): row `o` has `nb` scales (and mins) and
    // `nb * quant` quant bytes; rows `r0..r0 + R` of the activations have `nb` blocks (and
    // their scale vectors are padded by `SCALE_PAD`).
    let (d_row, m_row, qs_row) = unsafe {
        (
            w.d.as_ptr().add(o * nb),
            if KIND == KIND_Q4_1 { w.m.as_ptr().add(o * nb) } else { w.d.as_ptr() },
            w.qs.as_ptr().add(o * nb * quant),
        )
    };
    let mut acc = [[vdupq_n_f32(0.0); R]; 2];
    let mut corr = [vdupq_n_f32(0.0); R];
    let groups = nb / 4;
    for g in 0..groups {
        let dw = unsafe { load_f16x4(d_row.add(4 * g)) };
        let offset = if KIND == KIND_Q4_1 { unsafe { load_f16x4(m_row.add(4 * g)) } } else { vmulq_n_f32(dw, -8.0) };
        let mut scales = [vdupq_n_f32(0.0); R];
        for r in 0..R {
            let row_block = (r0 + r) * acts.blocks + 4 * g;
            scales[r] = vmulq_f32(dw, unsafe { vld1q_f32(acts.d.add(row_block)) });
            if KIND != KIND_Q8_0 {
                corr[r] = vfmaq_f32(corr[r], offset, unsafe { vld1q_f32(acts.dsum.add(row_block)) });
            }
        }
        let b = 4 * g;
        let qp = |i: usize| unsafe { qs_row.add((b + i) * quant) };
        let four_bit = KIND != KIND_Q8_0;
        unsafe {
            if four_bit {
                split_block::<R, true, SDOT, 0>(&mut acc[0], &scales, qp(0), acts, r0, b);
                split_block::<R, true, SDOT, 1>(&mut acc[1], &scales, qp(1), acts, r0, b + 1);
                split_block::<R, true, SDOT, 2>(&mut acc[0], &scales, qp(2), acts, r0, b + 2);
                split_block::<R, true, SDOT, 3>(&mut acc[1], &scales, qp(3), acts, r0, b + 3);
            } else {
                split_block::<R, false, SDOT, 0>(&mut acc[0], &scales, qp(0), acts, r0, b);
                split_block::<R, false, SDOT, 1>(&mut acc[1], &scales, qp(1), acts, r0, b + 1);
                split_block::<R, false, SDOT, 2>(&mut acc[0], &scales, qp(2), acts, r0, b + 2);
                split_block::<R, false, SDOT, 3>(&mut acc[1], &scales, qp(3), acts, r0, b + 3);
            }
        }
    }
    // Leftover blocks (fewer than four): per-block scalar scales.
    let mut tail = [0.0f32; R];
    for b in groups * 4..nb {
        let dw = half::f16::from_bits(unsafe { *d_row.add(b) }).to_f32();
        let offset =
            if KIND == KIND_Q4_1 { half::f16::from_bits(unsafe { *m_row.add(b) }).to_f32() } else { -8.0 * dw };
        let qp = unsafe { qs_row.add(b * quant) };
        let wq = unsafe {
            if KIND == KIND_Q8_0 {
                block_quants::<false>(qp)
            } else {
                block_quants::<true>(qp)
            }
        };
        for r in 0..R {
            let (s, da) = unsafe { (block_dot::<SDOT>(wq, acts, r0 + r, b), acts.scale(r0 + r, b)) };
            acc[0][r] = vfmaq_n_f32(acc[0][r], s, dw * da);
            if KIND != KIND_Q8_0 {
                tail[r] += offset * unsafe { acts.scaled_sum(r0 + r, b) };
            }
        }
    }
    std::array::from_fn(|r| vaddvq_f32(vaddq_f32(vaddq_f32(acc[0][r], acc[1][r]), corr[r])) + tail[r])
}

/// Computes `out[r, o]` for a split Q8_0/Q4_0/Q4_1 matrix with 8-bit activations.
///
/// # Safety
/// With `SDOT`, the CPU must have FEAT_DotProd. `out` must be a `[rows, n_out]` buffer whose
/// columns `outs` belong to the caller; `acts` must hold `rows` rows of `w.blocks` blocks.
#[target_feature(enable = "neon")]
pub(super) unsafe fn split_rows<const SDOT: bool>(
    w: &SplitBlocks,
    acts: &QuantizedActs,
    rows: usize,
    outs: Range<usize>,
    out: OutPtr,
) {
    let raw = Acts::new(acts);
    macro_rules! run_kind {
        ($kind:expr) => {
            for o in outs {
                // SAFETY: rows `r0..r0 + R` exist; output `(r, o)` belongs to this task.
                unsafe {
                    four_row_groups!(rows, out, o, |r0| [
                        split_dot::<1, { $kind }, SDOT>(w, o, raw, r0),
                        split_dot::<2, { $kind }, SDOT>(w, o, raw, r0),
                        split_dot::<3, { $kind }, SDOT>(w, o, raw, r0),
                        split_dot::<4, { $kind }, SDOT>(w, o, raw, r0),
                    ])
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

/// Accumulates each row's integer dot product with `w` times `scale · d_r[b]`.
///
/// # Safety
/// As [`block_dot`] for rows `r0..r0 + R`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn accumulate_block<const R: usize, const SDOT: bool>(
    acc: &mut [float32x4_t; R],
    w: (int8x16_t, int8x16_t),
    scale: f32,
    acts: Acts,
    r0: usize,
    b: usize,
) {
    for (r, acc_r) in acc.iter_mut().enumerate() {
        // SAFETY: guaranteed by the caller.
        let (s, da) = unsafe { (block_dot::<SDOT>(w, acts, r0 + r, b), acts.scale(r0 + r, b)) };
        *acc_r = vfmaq_n_f32(*acc_r, s, scale * da);
    }
}

/// Dot products of one Q4_K weight row with `R` activation rows.
///
/// # Safety
/// As [`dot_i8`]; `w_row` holds `acts.blocks / 8` 144-byte blocks; rows `r0..r0 + R` exist.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q4_k_dot<const R: usize, const SDOT: bool>(w_row: *const u8, acts: Acts, r0: usize) -> [f32; R] {
    let mut acc = [[vdupq_n_f32(0.0); R]; 2];
    let mut corr = [0.0f32; R];
    let mask = vdupq_n_u8(0x0F);
    for sb in 0..acts.blocks / (QK_K / QK) {
        // SAFETY: super-block `sb` of the row (144 bytes) exists.
        let block = unsafe { std::slice::from_raw_parts(w_row.add(144 * sb), 144) };
        let (dw, dmin) = (read_f16(block, 0), read_f16(block, 2));
        let scales = &block[4..16];
        for chunk in 0..4 {
            // SAFETY: 32 bytes of quants per chunk, after the 16-byte header.
            let (q0, q1) = unsafe {
                (vld1q_u8(block.as_ptr().add(16 + 32 * chunk)), vld1q_u8(block.as_ptr().add(32 + 32 * chunk)))
            };
            let lo = (vreinterpretq_s8_u8(vandq_u8(q0, mask)), vreinterpretq_s8_u8(vandq_u8(q1, mask)));
            let hi = (vreinterpretq_s8_u8(vshrq_n_u8::<4>(q0)), vreinterpretq_s8_u8(vshrq_n_u8::<4>(q1)));
            let (sc0, m0) = k4_scale_min(2 * chunk, scales);
            let (sc1, m1) = k4_scale_min(2 * chunk + 1, scales);
            let b = sb * (QK_K / QK) + 2 * chunk;
            // SAFETY: rows and blocks in range (caller).
            unsafe {
                accumulate_block::<R, SDOT>(&mut acc[0], lo, dw * sc0 as f32, acts, r0, b);
                accumulate_block::<R, SDOT>(&mut acc[1], hi, dw * sc1 as f32, acts, r0, b + 1);
            }
            let (min0, min1) = (dmin * m0 as f32, dmin * m1 as f32);
            for (r, c) in corr.iter_mut().enumerate() {
                // SAFETY: rows and blocks in range (caller).
                unsafe { *c -= min0 * acts.scaled_sum(r0 + r, b) + min1 * acts.scaled_sum(r0 + r, b + 1) };
            }
        }
    }
    std::array::from_fn(|r| vaddvq_f32(vaddq_f32(acc[0][r], acc[1][r])) + corr[r])
}

/// Q6_K's `(ql >> shift) & 0x0F` of one nibble half and `((qh >> 2·group) & 3) << 4`, combined.
#[inline]
#[target_feature(enable = "neon")]
fn q6_k_values(low_bytes: uint8x16_t, high_nibble: bool, qh: uint8x16_t, group: usize) -> int8x16_t {
    let low = if high_nibble { vshrq_n_u8::<4>(low_bytes) } else { vandq_u8(low_bytes, vdupq_n_u8(0x0F)) };
    let high = match group {
        0 => qh,
        1 => vshrq_n_u8::<2>(qh),
        2 => vshrq_n_u8::<4>(qh),
        _ => vshrq_n_u8::<6>(qh),
    };
    let high = vshlq_n_u8::<4>(vandq_u8(high, vdupq_n_u8(0x03)));
    vreinterpretq_s8_u8(vorrq_u8(low, high))
}

/// Dot products of one Q6_K weight row with `R` activation rows.
///
/// # Safety
/// As [`dot_i8`]; `w_row` holds `acts.blocks / 8` 210-byte blocks; rows `r0..r0 + R` exist.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q6_k_dot<const R: usize, const SDOT: bool>(w_row: *const u8, acts: Acts, r0: usize) -> [f32; R] {
    let mut acc = [[vdupq_n_f32(0.0); R]; 2];
    let mut corr = [0.0f32; R];
    for sb in 0..acts.blocks / (QK_K / QK) {
        // SAFETY: super-block `sb` of the row (210 bytes) exists.
        let block = unsafe { std::slice::from_raw_parts(w_row.add(210 * sb), 210) };
        let dw = read_f16(block, 208);
        for half in 0..2 {
            let load = |offset: usize| unsafe { vld1q_u8(block.as_ptr().add(offset)) };
            // ql: 64 bytes per half (a: values 0..32, b: 32..64 of each nibble), qh: 32.
            let (ql_a, ql_b, qh) = (
                [load(64 * half), load(64 * half + 16)],
                [load(64 * half + 32), load(64 * half + 48)],
                [load(128 + 32 * half), load(144 + 32 * half)],
            );
            for group in 0..4 {
                let low = if group % 2 == 0 { ql_a } else { ql_b };
                let w = (q6_k_values(low[0], group >= 2, qh[0], group), q6_k_values(low[1], group >= 2, qh[1], group));
                let (s0, s1) =
                    (block[192 + 8 * half + 2 * group] as i8 as f32, block[193 + 8 * half + 2 * group] as i8 as f32);
                let b = sb * (QK_K / QK) + 4 * half + group;
                for r in 0..R {
                    // SAFETY: rows and blocks in range (caller); 32 activation bytes per block.
                    let (a, d, [sum_lo, sum_hi]) = unsafe {
                        (acts.block(r0 + r, b) as *const i8, acts.scale(r0 + r, b), acts.scaled_sum16(r0 + r, b))
                    };
                    // The two halves of the block have their own scales.
                    let (lo, hi) = unsafe {
                        (
                            dot_i8::<SDOT>(vdupq_n_s32(0), w.0, vld1q_s8(a)),
                            dot_i8::<SDOT>(vdupq_n_s32(0), w.1, vld1q_s8(a.add(16))),
                        )
                    };
                    let slot = &mut acc[group & 1][r];
                    *slot = vfmaq_n_f32(*slot, vcvtq_f32_s32(lo), dw * d * s0);
                    *slot = vfmaq_n_f32(*slot, vcvtq_f32_s32(hi), dw * d * s1);
                    // Values are q - 32.
                    corr[r] -= 32.0 * dw * (s0 * sum_lo + s1 * sum_hi);
                }
            }
        }
    }
    std::array::from_fn(|r| vaddvq_f32(vaddq_f32(acc[0][r], acc[1][r])) + corr[r])
}

/// Computes `out[r, o]` for k-quant (Q4_K, Q6_K) weight rows with 8-bit activations; other
/// types take the portable path.
///
/// # Safety
/// With `SDOT`, the CPU must have FEAT_DotProd. `out` must be a `[rows, n_out]` buffer whose
/// columns `outs` belong to the caller; `acts` must hold `rows` rows of `w.n_in` values.
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantized_rows<const SDOT: bool>(
    w: &BlockRows<'_>,
    acts: &QuantizedActs,
    rows: usize,
    outs: Range<usize>,
    out: OutPtr,
) {
    let raw = Acts::new(acts);
    macro_rules! run {
        ($dot:ident) => {
            for o in outs {
                let w_row = w.row(o).as_ptr();
                // SAFETY: `w_row` is a full weight row and rows `r0..r0 + R` exist in
                // `acts`; output `(r, o)` belongs to this task.
                unsafe {
                    four_row_groups!(rows, out, o, |r0| [
                        $dot::<1, SDOT>(w_row, raw, r0),
                        $dot::<2, SDOT>(w_row, raw, r0),
                        $dot::<3, SDOT>(w_row, raw, r0),
                        $dot::<4, SDOT>(w_row, raw, r0),
                    ])
                }
            }
        };
    }
    match w.ty {
        GgmlType::Q4_K => run!(q4_k_dot),
        GgmlType::Q6_K => run!(q6_k_dot),
        // Q8_0/Q4_0/Q4_1 are kept split (see `split_rows`); GGUF-layout copies of them only
        // reach this from the portable tile path.
        _ => super::scalar::quantized_rows(w, acts, rows, outs, out),
    }
}

/// Four weights at `p` widened to f32 (`W` is resolved at compile time).
///
/// # Safety
/// Four elements are readable at `p`.
#[inline(always)]
unsafe fn widen4<W: Dense>(p: *const W) -> float32x4_t {
    // SAFETY: the caller guarantees the four elements.
    unsafe {
        match W::KIND {
            DenseKind::F32 => vld1q_f32(p as *const f32),
            // bf16 is the top half of an f32: shift the widened bits up.
            DenseKind::Bf16 => vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p as *const u16))),
            // Stable Rust has no f16 vector type: widen on the scalar side (exact either way).
            DenseKind::F16 => {
                let lanes: [f32; 4] = std::array::from_fn(|i| (*p.add(i)).widen());
                vld1q_f32(lanes.as_ptr())
            }
        }
    }
}

/// Dot products of one dense weight row with `R` activation rows, `U` independent accumulators
/// each (the same order for every element type).
///
/// # Safety
/// `w_row` has `n_in` values and `x` rows `r0..r0 + R` of `n_in`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f32_dot<W: Dense, const R: usize, const U: usize>(
    w_row: *const W,
    x: *const f32,
    n_in: usize,
    r0: usize,
) -> [f32; R] {
    let mut acc = [[vdupq_n_f32(0.0); U]; R];
    let mut k = 0;
    // SAFETY (loads below): guaranteed by the caller.
    while k + 4 * U <= n_in {
        for u in 0..U {
            let wv = unsafe { widen4(w_row.add(k + 4 * u)) };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv = unsafe { vld1q_f32(x.add((r0 + r) * n_in + k + 4 * u)) };
                acc_r[u] = vfmaq_f32(acc_r[u], wv, xv);
            }
        }
        k += 4 * U;
    }
    while k + 4 <= n_in {
        let wv = unsafe { widen4(w_row.add(k)) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xv = unsafe { vld1q_f32(x.add((r0 + r) * n_in + k)) };
            acc_r[0] = vfmaq_f32(acc_r[0], wv, xv);
        }
        k += 4;
    }
    std::array::from_fn(|r| {
        let v = acc[r][1..].iter().fold(acc[r][0], |v, &a| vaddq_f32(v, a));
        let mut sum = vaddvq_f32(v);
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
/// `out` must be a `[rows, n_out]` buffer whose columns `outs` belong to the caller; `w` is
/// `[n_out, n_in]` and `x` is `[rows, n_in]`.
#[target_feature(enable = "neon")]
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
                f32_dot::<W, 2, 4>(w_row, xp, n_in, r0),
                f32_dot::<W, 3, 2>(w_row, xp, n_in, r0),
                f32_dot::<W, 4, 2>(w_row, xp, n_in, r0),
            ])
        }
    }
}

/// Decodes one Q8_0/Q4_0/Q4_1 block (GGUF layout) to eight vectors of four f32.
///
/// # Safety
/// `blk` points at a whole block of type `ty`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn decode_block(ty: GgmlType, blk: &[u8]) -> [float32x4_t; 8] {
    let widen_u8 = |v: uint8x16_t| -> [float32x4_t; 4] {
        let (lo, hi) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
        [
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
            vcvtq_f32_u32(vmovl_high_u16(lo)),
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
            vcvtq_f32_u32(vmovl_high_u16(hi)),
        ]
    };
    let widen_i8 = |v: int8x16_t| -> [float32x4_t; 4] {
        let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        [
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
            vcvtq_f32_s32(vmovl_high_s16(lo)),
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
            vcvtq_f32_s32(vmovl_high_s16(hi)),
        ]
    };
    let dw = read_f16(blk, 0);
    if ty == GgmlType::Q8_0 {
        // SAFETY: a Q8_0 block has 32 quant bytes after its scale.
        let (q0, q1) =
            unsafe { (vld1q_s8(blk.as_ptr().add(2) as *const i8), vld1q_s8(blk.as_ptr().add(18) as *const i8)) };
        let (a, b) = (widen_i8(q0), widen_i8(q1));
        return std::array::from_fn(|i| vmulq_n_f32(if i < 4 { a[i] } else { b[i - 4] }, dw));
    }
    let has_min = ty == GgmlType::Q4_1;
    let m = vdupq_n_f32(if has_min { read_f16(blk, 2) } else { -8.0 * dw });
    // SAFETY: a Q4_0/Q4_1 block has 16 quant bytes after its header.
    let packed = unsafe { vld1q_u8(blk.as_ptr().add(if has_min { 4 } else { 2 })) };
    let (lo, hi) = (widen_u8(vandq_u8(packed, vdupq_n_u8(0x0F))), widen_u8(vshrq_n_u8::<4>(packed)));
    std::array::from_fn(|i| vfmaq_n_f32(m, if i < 4 { lo[i] } else { hi[i - 4] }, dw))
}

/// Dot products of one Q8_0/Q4_0/Q4_1 row (decoded in registers) with `R` f32 activation rows.
///
/// # Safety
/// `x` holds rows `r0..r0 + R` of `n_in` values; `w_row` holds `n_in / 32` blocks of `ty`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn decode_dot<const R: usize>(ty: GgmlType, w_row: &[u8], x: *const f32, n_in: usize, r0: usize) -> [f32; R] {
    let mut acc = [[vdupq_n_f32(0.0); 2]; R];
    for (b, blk) in w_row.chunks_exact(ty.type_size()).enumerate().take(n_in / QK) {
        // SAFETY: `blk` is a whole block.
        let values = unsafe { decode_block(ty, blk) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: values `32 b..32 b + 32` of row `r0 + r` exist (caller).
            let xr = unsafe { x.add((r0 + r) * n_in + QK * b) };
            for (i, v) in values.iter().enumerate() {
                let xv = unsafe { vld1q_f32(xr.add(4 * i)) };
                acc_r[i & 1] = vfmaq_f32(acc_r[i & 1], *v, xv);
            }
        }
    }
    std::array::from_fn(|r| vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1])))
}

/// Quantized weights decoded to f32 in registers, exact f32 activations (the k-quants decode a
/// whole row, then take the f32 kernel).
///
/// # Safety
/// As [`f32_rows`], with `x` of `w.n_in` values per row.
#[target_feature(enable = "neon")]
pub(super) unsafe fn float_decode_rows(w: &BlockRows<'_>, x: &[f32], rows: usize, outs: Range<usize>, out: OutPtr) {
    let n_in = w.n_in;
    if !matches!(w.ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
        let mut decoded = vec![0.0f32; n_in];
        for o in outs {
            // Lengths were validated when the matrix was packed.
            let _ = dequantize_into(w.ty, w.row(o), &mut decoded);
            // SAFETY: `decoded` is one row; this task owns column `o`.
            unsafe { dense_rows(&decoded[..], n_in, x, rows, 0..1, OutPtr { ptr: out.ptr.add(o), n_out: out.n_out }) };
        }
        return;
    }
    let xp = x.as_ptr();
    for o in outs {
        let w_row = w.row(o);
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

/// [`QuantizedActs::quantize`] with NEON, bit-identical to it: the block maximum is exact
/// (`fmaxnm` ignores NaN as `f32::max` does), the scale and its inverse are the same scalar f32
/// operations, `x · inv` is the same f32 product, and `fcvtas` rounds half away from zero as
/// `f32::round` does, maps NaN to 0 as the `as i8` cast does, and saturates (the clamp to
/// ±127 follows in integers).
///
/// # Safety
/// `out` holds one entry per block of 32 values of `x` (extra entries are left alone).
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_acts(x: &[f32], out: super::ActsMut<'_>) {
    let blocks = x.chunks_exact(QK).zip(out.qs.chunks_exact_mut(QK));
    let scales = out.d.iter_mut().zip(out.dsum.iter_mut()).zip(out.dsum16.iter_mut());
    for ((xb, qb), ((d_out, dsum_out), dsum16_out)) in blocks.zip(scales) {
        // SAFETY: `xb` holds 32 values.
        let v: [float32x4_t; 8] = std::array::from_fn(|i| unsafe { vld1q_f32(xb.as_ptr().add(4 * i)) });
        let m = v.iter().fold(vdupq_n_f32(0.0), |m, &vi| vmaxnmq_f32(m, vabsq_f32(vi)));
        let amax = vmaxnmvq_f32(m);
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let q: [int32x4_t; 8] = std::array::from_fn(|i| {
            let rounded = vcvtaq_s32_f32(vmulq_n_f32(v[i], inv));
            vminq_s32(vmaxq_s32(rounded, vdupq_n_s32(-127)), vdupq_n_s32(127))
        });
        let narrow = |a: int32x4_t, b: int32x4_t, c: int32x4_t, e: int32x4_t| {
            let lo = vcombine_s16(vmovn_s32(a), vmovn_s32(b));
            let hi = vcombine_s16(vmovn_s32(c), vmovn_s32(e));
            vcombine_s8(vmovn_s16(lo), vmovn_s16(hi))
        };
        // SAFETY: `qb` holds 32 bytes.
        unsafe {
            vst1q_s8(qb.as_mut_ptr(), narrow(q[0], q[1], q[2], q[3]));
            vst1q_s8(qb.as_mut_ptr().add(16), narrow(q[4], q[5], q[6], q[7]));
        }
        let sum = |a: &[int32x4_t]| vaddvq_s32(a.iter().fold(vdupq_n_s32(0), |s, &v| vaddq_s32(s, v)));
        let sums = [sum(&q[..4]), sum(&q[4..])];
        *d_out = d;
        *dsum16_out = [d * sums[0] as f32, d * sums[1] as f32];
        *dsum_out = d * (sums[0] + sums[1]) as f32;
    }
}
