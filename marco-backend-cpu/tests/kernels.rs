//! The kernels against an independent reference: weights dequantized by the scalar ggml
//! decoder (itself checked against gguf-py), multiplied in f64 by a naive triple loop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use half::f16;
use marco_backend_cpu::{
    dequantize, matmul, matmul_many, matmul_swiglu, matmul_with, ops, ActivationMode, GgmlType, KernelError,
    MatmulOptions, PackedMatrix,
};
use proptest::prelude::*;

/// A small deterministic generator (xorshift64*), so that cases are reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// Byte offsets of the f16 scale fields of each block type (overwritten with sane values).
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random GGUF data of `ty` for `n` elements: random quants, scales in [-0.1, 0.1].
fn random_tensor(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| rng.uniform(-1.0, 1.0).to_le_bytes()).collect(),
        GgmlType::F16 => (0..n).flat_map(|_| f16::from_f32(rng.uniform(-1.0, 1.0)).to_bits().to_le_bytes()).collect(),
        GgmlType::BF16 => {
            (0..n).flat_map(|_| ((rng.uniform(-1.0, 1.0).to_bits() >> 16) as u16).to_le_bytes()).collect()
        }
        _ => {
            let size = ty.type_size();
            let mut data: Vec<u8> = (0..n / ty.block_size() * size).map(|_| rng.next() as u8).collect();
            for block in data.chunks_exact_mut(size) {
                for &off in f16_fields(ty) {
                    let v = f16::from_f32(rng.uniform(-0.1, 0.1));
                    block[off..off + 2].copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            data
        }
    }
}

/// Reference product in f64 plus, per output, `Σ |w| |x|` (for the rounding tolerance) and the
/// worst-case error of 8-bit activation quantization `Σ_blocks Σ|w| · max|x| / 254`.
fn reference(w: &[f32], x: &[f32], rows: usize, n_out: usize, n_in: usize) -> Vec<(f64, f64, f64)> {
    let mut result = Vec::with_capacity(rows * n_out);
    for r in 0..rows {
        let xr = &x[r * n_in..(r + 1) * n_in];
        for o in 0..n_out {
            let wo = &w[o * n_in..(o + 1) * n_in];
            let exact: f64 = wo.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let magnitude: f64 = wo.iter().zip(xr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let q8_bound: f64 = wo
                .chunks(32)
                .zip(xr.chunks(32))
                .map(|(wb, xb)| {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                    wb.iter().map(|v| v.abs() as f64).sum::<f64>() * amax / 254.0
                })
                .sum();
            result.push((exact, magnitude, q8_bound));
        }
    }
    result
}

fn check(ty: GgmlType, blocks_per_row: usize, n_out: usize, rows: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed | 1);
    let n_in = if ty.block_size() == 1 { blocks_per_row } else { blocks_per_row * ty.block_size() };
    let data = random_tensor(ty, n_out * n_in, &mut rng);
    let packed = PackedMatrix::from_ggml(ty, &data, n_out, n_in).unwrap();
    let w = dequantize(ty, &data, n_out * n_in).unwrap();
    prop_assert_eq!(packed.to_f32(), w.clone());
    let x: Vec<f32> = (0..rows * n_in).map(|_| rng.uniform(-2.0, 2.0)).collect();
    let want = reference(&w, &x, rows, n_out, n_in);
    let quantized = PackedMatrix::KEPT_QUANTIZED.contains(&ty);
    for mode in [ActivationMode::Q8, ActivationMode::F32] {
        let mut out = vec![f32::NAN; rows * n_out];
        let options = MatmulOptions { activations: mode, ..MatmulOptions::default() };
        matmul_with(&x, rows, &packed, &mut out, options).unwrap();
        for (i, (&got, &(exact, magnitude, q8_bound))) in out.iter().zip(&want).enumerate() {
            // Activation quantization applies to quantized weights at every batch size (f32
            // activations switch to GEMM past `small_batch_max` rows instead).
            let q8 = mode == ActivationMode::Q8 && quantized;
            let tolerance = 1e-5 * magnitude + 1e-6 + if q8 { q8_bound } else { 0.0 };
            prop_assert!(
                (got as f64 - exact).abs() <= tolerance,
                "{} {:?} rows {} out {} in {}: element {} got {} want {} (tol {})",
                ty,
                mode,
                rows,
                n_out,
                n_in,
                i,
                got,
                exact,
                tolerance
            );
        }
    }
    Ok(())
}

const FUSED_32: [GgmlType; 3] = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];
const FUSED_256: [GgmlType; 2] = [GgmlType::Q4_K, GgmlType::Q6_K];
const DEQUANTIZED: [GgmlType; 8] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q5_K,
    GgmlType::Q8_0,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn f32_weights(n_in in 1usize..200, n_out in 1usize..40, rows in 1usize..18, seed: u64) {
        check(GgmlType::F32, n_in, n_out, rows, seed)?;
    }

    #[test]
    fn legacy_quants(ty in 0usize..3, blocks in 1usize..24, n_out in 1usize..40, rows in 1usize..18, seed: u64) {
        check(FUSED_32[ty], blocks, n_out, rows, seed)?;
    }

    #[test]
    fn k_quants(ty in 0usize..2, blocks in 1usize..4, n_out in 1usize..24, rows in 1usize..18, seed: u64) {
        check(FUSED_256[ty], blocks, n_out, rows, seed)?;
    }

    #[test]
    fn dequantized_types(ty in 0usize..8, blocks in 1usize..3, n_out in 1usize..12, rows in 1usize..5, seed: u64) {
        check(DEQUANTIZED[ty], blocks, n_out, rows, seed)?;
    }

    #[test]
    fn prefill_sizes(ty in 0usize..3, blocks in 1usize..10, n_out in 60usize..200, rows in 17usize..70, seed: u64) {
        check(FUSED_32[ty], blocks, n_out, rows, seed)?;
    }
}

/// Weight kinds for [`matmul_many`]: every storage the kernels distinguish (f32, split or
/// interleaved Q8_0/Q4_0/Q4_1, k-quant blocks), and Q8_0 from the crate's own encoder.
const MANY_KINDS: [Option<GgmlType>; 7] = [
    Some(GgmlType::F32),
    Some(GgmlType::Q8_0),
    Some(GgmlType::Q4_0),
    Some(GgmlType::Q4_1),
    Some(GgmlType::Q4_K),
    Some(GgmlType::Q6_K),
    None,
];

fn many_weight(kind: Option<GgmlType>, n_out: usize, n_in: usize, rng: &mut Rng) -> PackedMatrix {
    match kind {
        Some(ty) => PackedMatrix::from_ggml(ty, &random_tensor(ty, n_out * n_in, rng), n_out, n_in).unwrap(),
        None => {
            let w: Vec<f32> = (0..n_out * n_in).map(|_| rng.uniform(-1.0, 1.0)).collect();
            PackedMatrix::quantize_q8_0(&w, n_out, n_in).unwrap()
        }
    }
}

/// `matmul_many` gives bit for bit the results of one `matmul_with` per weight.
fn check_many(kinds: &[usize], n_outs: &[usize], blocks: usize, rows: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(seed | 1);
    let n_in = blocks * 256;
    let weights: Vec<PackedMatrix> =
        kinds.iter().zip(n_outs).map(|(&k, &n_out)| many_weight(MANY_KINDS[k], n_out, n_in, &mut rng)).collect();
    let x: Vec<f32> = (0..rows * n_in).map(|_| rng.uniform(-2.0, 2.0)).collect();
    for mode in [ActivationMode::Q8, ActivationMode::F32] {
        for parallel in [true, false] {
            let options = MatmulOptions { activations: mode, parallel, ..MatmulOptions::default() };
            let refs: Vec<&PackedMatrix> = weights.iter().collect();
            let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![f32::NAN; rows * w.out_features()]).collect();
            let mut out_refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            matmul_many(&x, rows, &refs, &mut out_refs, options).unwrap();
            for (w, got) in weights.iter().zip(&outs) {
                let mut want = vec![f32::NAN; rows * w.out_features()];
                matmul_with(&x, rows, w, &mut want, options).unwrap();
                let (got_bits, want_bits): (Vec<u32>, Vec<u32>) =
                    (got.iter().map(|v| v.to_bits()).collect(), want.iter().map(|v| v.to_bits()).collect());
                prop_assert_eq!(
                    got_bits,
                    want_bits,
                    "{} {:?} rows {} parallel {}",
                    w.ggml_type(),
                    mode,
                    rows,
                    parallel
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn matmul_many_matches_separate_products(
        kinds in proptest::collection::vec(0usize..MANY_KINDS.len(), 1..4),
        n_outs in proptest::collection::vec(1usize..300, 3),
        blocks in 1usize..3,
        rows in 1usize..=24,
        seed: u64,
    ) {
        check_many(&kinds, &n_outs[..kinds.len()], blocks, rows, seed)?;
    }
}

#[test]
fn matmul_many_layer_shapes() {
    // q/k/v and gate/up of SmolLM2-135M (Q4_1), plus a mixed set, at decode and prefill sizes.
    for rows in [1, 3, 8, 16, 17, 40] {
        check_many(&[3, 3, 3], &[576, 192, 192], 576 / 256 + 1, rows, rows as u64).unwrap();
        check_many(&[3, 3], &[1536, 1536], 2, rows, 5).unwrap();
        check_many(&[0, 1, 4, 6], &[70, 130, 64, 9], 1, rows, 9).unwrap();
    }
}

#[test]
fn matmul_swiglu_is_the_two_products_then_swiglu() {
    // The default model's MLP width at decode and prefill batch sizes (8 and 9 rows quantize
    // their activations inside the product's job), and a ragged width for the other kernels.
    for (kind, n_out, blocks) in [(3usize, 1536usize, 3usize), (1, 200, 2), (0, 70, 1), (5, 33, 1), (4, 64, 2)] {
        for rows in [1usize, 3, 8, 9, 17, 40] {
            let mut rng = Rng(0xA11CE ^ (rows as u64 * 131 + n_out as u64));
            let n_in = blocks * 256;
            let gate = many_weight(MANY_KINDS[kind], n_out, n_in, &mut rng);
            let up = many_weight(MANY_KINDS[kind], n_out, n_in, &mut rng);
            let x: Vec<f32> = (0..rows * n_in).map(|_| rng.uniform(-2.0, 2.0)).collect();
            for mode in [ActivationMode::Q8, ActivationMode::F32] {
                for parallel in [true, false] {
                    let options = MatmulOptions { activations: mode, parallel, ..MatmulOptions::default() };
                    let mut want = vec![0.0; rows * n_out];
                    let mut ups = vec![0.0; rows * n_out];
                    matmul_with(&x, rows, &gate, &mut want, options).unwrap();
                    matmul_with(&x, rows, &up, &mut ups, options).unwrap();
                    ops::swiglu(&mut want, &ups).unwrap();
                    let mut got = vec![f32::NAN; rows * n_out];
                    matmul_swiglu(&x, rows, &gate, &up, &mut got, options).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{} rows {rows} {mode:?} parallel {parallel}",
                        gate.ggml_type()
                    );
                }
            }
        }
    }
    let gate = PackedMatrix::from_f32(vec![1.0; 6], 2, 3).unwrap();
    let wider = PackedMatrix::from_f32(vec![1.0; 9], 3, 3).unwrap();
    let options = MatmulOptions::default();
    assert!(matmul_swiglu(&[1.0; 3], 1, &gate, &wider, &mut [0.0; 2], options).is_err());
    assert!(matmul_swiglu(&[1.0; 3], 1, &gate, &gate, &mut [0.0; 3], options).is_err());
    assert!(matmul_swiglu(&[1.0; 2], 1, &gate, &gate, &mut [0.0; 2], options).is_err());
}

#[test]
fn matmul_many_rejects_bad_buffers() {
    let a = PackedMatrix::from_f32(vec![1.0; 6], 2, 3).unwrap();
    let b = PackedMatrix::from_f32(vec![1.0; 8], 2, 4).unwrap();
    let (mut o1, mut o2) = (vec![0.0; 2], vec![0.0; 2]);
    let options = MatmulOptions::default();
    assert!(matmul_many(&[1.0; 3], 1, &[&a, &b], &mut [&mut o1, &mut o2], options).is_err());
    assert!(matmul_many(&[1.0; 3], 1, &[&a, &a], &mut [&mut o1], options).is_err());
    assert!(matmul_many(&[1.0; 3], 1, &[&a, &a], &mut [&mut o1, &mut o2[..1]], options).is_err());
    assert!(matmul_many(&[1.0; 2], 1, &[&a, &a], &mut [&mut o1, &mut o2], options).is_err());
    matmul_many(&[1.0, 2.0, 3.0], 1, &[&a, &a], &mut [&mut o1, &mut o2], options).unwrap();
    assert_eq!((o1, o2), (vec![6.0, 6.0], vec![6.0, 6.0]));
    matmul_many(&[], 1, &[], &mut [], options).unwrap();
}

#[test]
fn large_shapes_split_across_threads() {
    // Big enough that every pool thread gets a share, with a ragged last share.
    for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::Q6_K] {
        check(ty, if ty.block_size() == 1 { 576 } else { 1024 / ty.block_size() }, 1001, 3, 7).unwrap();
    }
}

#[test]
fn quantize_q8_0_weights() {
    let mut rng = Rng(99);
    let (n_out, n_in) = (7, 96);
    let w: Vec<f32> = (0..n_out * n_in).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let packed = PackedMatrix::quantize_q8_0(&w, n_out, n_in).unwrap();
    assert_eq!(packed.ggml_type(), GgmlType::Q8_0);
    assert_eq!(packed.weight_bytes(), n_out * n_in / 32 * 34);
    for (a, b) in packed.to_f32().iter().zip(&w) {
        // Half a quantization step, plus the f16 rounding of the block scale (127 steps · 2^-11).
        assert!((a - b).abs() <= 1.0 / 254.0 + 1.0 / 2048.0, "{a} vs {b}");
    }
    let mut row = vec![0.0; n_in];
    packed.row_into(3, &mut row).unwrap();
    assert_eq!(row, packed.to_f32()[3 * n_in..4 * n_in]);
    assert!(matches!(packed.row_into(7, &mut row), Err(KernelError::InvalidShape { .. })));
    assert!(PackedMatrix::quantize_q8_0(&w[..n_out * 95], n_out, 95).is_err());
}

#[test]
fn bad_shapes_are_errors() {
    let w = PackedMatrix::from_f32(vec![1.0; 6], 2, 3).unwrap();
    let mut out = vec![0.0; 2];
    assert!(matches!(matmul(&[1.0; 4], 1, &w, &mut out), Err(KernelError::LengthMismatch { .. })));
    assert!(matches!(matmul(&[1.0; 3], 1, &w, &mut out[..1]), Err(KernelError::LengthMismatch { .. })));
    matmul(&[1.0, 2.0, 3.0], 1, &w, &mut out).unwrap();
    assert_eq!(out, vec![6.0, 6.0]);
    assert!(PackedMatrix::from_f32(vec![1.0; 5], 2, 3).is_err());
    assert!(PackedMatrix::from_f32(vec![], 0, 3).is_err());
    assert!(PackedMatrix::from_ggml(GgmlType::Q4_1, &[0u8; 19], 1, 32).is_err());
    assert!(PackedMatrix::from_ggml(GgmlType::Q4_K, &[0u8; 144], 1, 255).is_err());
    matmul(&[], 0, &w, &mut []).unwrap();
}
