//! Portable kernels: the fallback on CPUs without the SIMD paths, and the definition of what the
//! SIMD paths compute (same integer sums, same scale algebra).
//!
//! Loops are written over fixed-size chunks so that the compiler can vectorize them with the
//! build's baseline instruction set (SSE2 on x86-64, NEON on aarch64).

use std::ops::Range;

use super::dense::Dense;
use super::{BlockRows, OutPtr, QuantizedActs};
use crate::quant::{dequantize_into, k4_scale_min, read_f16, GgmlType, QK, QK_K};

pub(super) fn dense_rows<W: Dense>(w: &[W], n_in: usize, x: &[f32], rows: usize, outs: Range<usize>, out: OutPtr) {
    for o in outs {
        let w_row = &w[o * n_in..(o + 1) * n_in];
        for r in 0..rows {
            let value = dot_dense(w_row, &x[r * n_in..(r + 1) * n_in]);
            // SAFETY: `o` is in this task's range and `r < rows`.
            unsafe { out.write(r, o, value) };
        }
    }
}

/// Dot product of dense weights (widened) with f32 values, eight independent partial sums
/// (vectorizable).
pub(super) fn dot_dense<W: Dense>(a: &[W], b: &[f32]) -> f32 {
    let mut partial = [0.0f32; 8];
    let chunks = a.len() / 8;
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            partial[k] += ca[k].widen() * cb[k];
        }
    }
    let mut sum: f32 = partial.iter().sum();
    for k in chunks * 8..a.len() {
        sum += a[k].widen() * b[k];
    }
    sum
}

/// Integer dot product of 32 unsigned weights with 32 signed activations, split in halves.
#[inline(always)]
fn dot_u8_i8_halves(w: &[u8; 32], a: &[i8]) -> [i32; 2] {
    let mut lo = 0i32;
    let mut hi = 0i32;
    for j in 0..16 {
        lo += w[j] as i32 * a[j] as i32;
        hi += w[j + 16] as i32 * a[j + 16] as i32;
    }
    [lo, hi]
}

pub(super) fn quantized_rows(w: &BlockRows<'_>, acts: &QuantizedActs, rows: usize, outs: Range<usize>, out: OutPtr) {
    for o in outs {
        let w_row = w.row(o);
        for r in 0..rows {
            let value = dot_quantized_row(w.ty, w_row, acts, r);
            // SAFETY: `o` is in this task's range and `r < rows`.
            unsafe { out.write(r, o, value) };
        }
    }
}

/// Dot product of one weight row (blocks of `ty`) with activation row `r`.
pub(super) fn dot_quantized_row(ty: GgmlType, w_row: &[u8], acts: &QuantizedActs, r: usize) -> f32 {
    let nb = acts.blocks;
    let qs = &acts.qs[r * nb * QK..(r + 1) * nb * QK];
    let d = &acts.d[r * nb..(r + 1) * nb];
    let dsum = &acts.dsum[r * nb..(r + 1) * nb];
    let dsum16 = &acts.dsum16[r * nb..(r + 1) * nb];
    let mut total = 0.0f32;
    let mut unpacked = [0u8; 32];
    match ty {
        GgmlType::Q8_0 => {
            for (b, block) in w_row.chunks_exact(34).enumerate() {
                let dw = read_f16(block, 0);
                let a = &qs[b * QK..(b + 1) * QK];
                let s: i32 = block[2..34].iter().zip(a).map(|(&q, &x)| q as i8 as i32 * x as i32).sum();
                total += s as f32 * (dw * d[b]);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let size = if ty == GgmlType::Q4_0 { 18 } else { 20 };
            for (b, block) in w_row.chunks_exact(size).enumerate() {
                let dw = read_f16(block, 0);
                let nibbles = &block[size - 16..];
                for j in 0..16 {
                    unpacked[j] = nibbles[j] & 0x0F;
                    unpacked[j + 16] = nibbles[j] >> 4;
                }
                let [lo, hi] = dot_u8_i8_halves(&unpacked, &qs[b * QK..(b + 1) * QK]);
                total += (lo + hi) as f32 * (dw * d[b]);
                // Q4_0 values are q - 8; Q4_1 values are q * d + m.
                let offset = if ty == GgmlType::Q4_0 { -8.0 * dw } else { read_f16(block, 2) };
                total += offset * dsum[b];
            }
        }
        GgmlType::Q4_K => {
            for (sb, block) in w_row.chunks_exact(144).enumerate() {
                let dw = read_f16(block, 0);
                let dmin = read_f16(block, 2);
                let scales = &block[4..16];
                for chunk in 0..4 {
                    let q = &block[16 + 32 * chunk..48 + 32 * chunk];
                    for part in 0..2 {
                        for (j, &byte) in q.iter().enumerate() {
                            unpacked[j] = if part == 0 { byte & 0x0F } else { byte >> 4 };
                        }
                        let sub = 2 * chunk + part;
                        let b = sb * (QK_K / QK) + sub;
                        let (sc, m) = k4_scale_min(sub, scales);
                        let [lo, hi] = dot_u8_i8_halves(&unpacked, &qs[b * QK..(b + 1) * QK]);
                        total += (lo + hi) as f32 * (dw * sc as f32 * d[b]);
                        total -= dmin * m as f32 * dsum[b];
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (sb, block) in w_row.chunks_exact(210).enumerate() {
                let dw = read_f16(block, 208);
                for half in 0..2 {
                    let ql = &block[64 * half..64 * half + 64];
                    let qh = &block[128 + 32 * half..160 + 32 * half];
                    let sc = &block[192 + 8 * half..200 + 8 * half];
                    for group in 0..4 {
                        for l in 0..32 {
                            let low = if group % 2 == 0 { ql[l] } else { ql[l + 32] };
                            let low = if group < 2 { low & 0x0F } else { low >> 4 };
                            let high = (qh[l] >> (2 * group)) & 3;
                            unpacked[l] = low | (high << 4);
                        }
                        let b = sb * (QK_K / QK) + 4 * half + group;
                        let [lo, hi] = dot_u8_i8_halves(&unpacked, &qs[b * QK..(b + 1) * QK]);
                        let (s0, s1) = (sc[2 * group] as i8 as f32, sc[2 * group + 1] as i8 as f32);
                        total += dw * d[b] * (s0 * lo as f32 + s1 * hi as f32);
                        // Values are q - 32.
                        total -= 32.0 * dw * (s0 * dsum16[b][0] + s1 * dsum16[b][1]);
                    }
                }
            }
        }
        // Other types are never stored as blocks (see `PackedMatrix::KEPT_QUANTIZED`).
        _ => {}
    }
    total
}

pub(super) fn float_decode_rows(w: &BlockRows<'_>, x: &[f32], rows: usize, outs: Range<usize>, out: OutPtr) {
    let n_in = w.n_in;
    let mut decoded = vec![0.0f32; n_in];
    for o in outs {
        // Lengths were validated when the matrix was packed.
        let _ = dequantize_into(w.ty, w.row(o), &mut decoded);
        for r in 0..rows {
            let value = dot_dense(&decoded[..], &x[r * n_in..(r + 1) * n_in]);
            // SAFETY: `o` is in this task's range and `r < rows`.
            unsafe { out.write(r, o, value) };
        }
    }
}

/// The offset of a weight block's values in [`crate::packed::Interleaved16`]'s algebra:
/// `value = d · q + offset`, with `q` the stored unsigned quant (Q8_0 is stored plus 128).
#[inline(always)]
pub(super) fn interleaved_offset(ty: GgmlType, d: f32, m: f32) -> f32 {
    match ty {
        GgmlType::Q4_1 => m,
        GgmlType::Q4_0 => d * -8.0,
        _ => d * -128.0,
    }
}

/// Outputs `outs` (whole groups of sixteen) of an interleaved Q8_0/Q4_0/Q4_1 matrix with 8-bit
/// activations: the definition of what the AVX512-VNNI kernel computes, in the same order, so
/// that the two agree bit for bit. Per output and block: the exact integer sum `Σ q·a`, then
/// `acc = fma(sum, d_w · d_a, acc)` and `acc = fma(offset, d_a · Σa, acc)`.
pub(super) fn interleaved_rows(
    w: &crate::packed::Interleaved16,
    acts: &QuantizedActs,
    rows: usize,
    outs: Range<usize>,
    out: OutPtr,
) {
    use crate::packed::{Interleaved16, SplitBlocks};
    const ROWS: usize = Interleaved16::ROWS;
    let group_block = Interleaved16::group_block_bytes(w.ty);
    let header = Interleaved16::header_bytes(w.ty);
    let words = SplitBlocks::quant_bytes(w.ty) / 4;
    let four_bit = w.ty != GgmlType::Q8_0;
    for o in outs {
        let (g, i) = (o / ROWS, o % ROWS);
        for r in 0..rows {
            let mut acc = 0.0f32;
            for b in 0..w.blocks {
                let src = &w.data[(g * w.blocks + b) * group_block..][..group_block];
                let d = read_f16(src, 2 * i);
                let m = if w.ty == GgmlType::Q4_1 { read_f16(src, 32 + 2 * i) } else { 0.0 };
                let a = &acts.qs[(r * acts.blocks + b) * QK..][..QK];
                let mut sum = 0i32;
                for s in 0..words {
                    for k in 0..4 {
                        let byte = src[header + (s * ROWS + i) * 4 + k];
                        if four_bit {
                            sum += (byte & 0x0F) as i32 * a[4 * s + k] as i32;
                            sum += (byte >> 4) as i32 * a[16 + 4 * s + k] as i32;
                        } else {
                            sum += byte as i32 * a[4 * s + k] as i32;
                        }
                    }
                }
                let (da, dsum) = (acts.d[r * acts.blocks + b], acts.dsum[r * acts.blocks + b]);
                acc = (sum as f32).mul_add(d * da, acc);
                acc = interleaved_offset(w.ty, d, m).mul_add(dsum, acc);
            }
            // SAFETY: `o` is in this task's range and `r < rows`.
            unsafe { out.write(r, o, acc) };
        }
    }
}
