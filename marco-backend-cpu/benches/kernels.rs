//! Kernel benchmarks on SmolLM2-135M shapes: the lm-head GEMV `[1,576]×[576,49152]`, the MLP
//! up/gate `[1,576]×[576,1536]` and down `[1,1536]×[1536,576]` (k-quants need 256 | in),
//! small batches 8 and 16, a layer's q/k/v as one `matmul_many` against three products, and a
//! 128-row prefill. Throughput is weight bytes per second, so the decode figures compare
//! directly with the machine's memory bandwidth. `MARCO_KERNELS=avx2` (or `avx512`, `scalar`)
//! measures a lower instruction set.
//!
//! `cargo bench -p marco-backend-cpu --bench kernels` (filter with a trailing name pattern).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use marco_backend_cpu::{matmul_many, matmul_with, top_k, ActivationMode, GgmlType, MatmulOptions, PackedMatrix};
use std::hint::black_box;
use std::time::Duration;

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 20_001) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

/// A weight of type `ty`: random f32 values, quantized by a codec-independent route where
/// possible (Q8_0 through the crate's encoder; other block types from random bytes with sane
/// f16 scales, which exercises the same code as real data), packed as a GGUF tensor is (so in
/// the layout a model loads: `--quantize q8_0` goes the same way).
fn weight(ty: GgmlType, n_out: usize, n_in: usize) -> PackedMatrix {
    let w = values(n_out * n_in, 7);
    match ty {
        GgmlType::F32 => PackedMatrix::from_f32(w, n_out, n_in).unwrap(),
        GgmlType::Q8_0 => {
            let bytes = marco_backend_cpu::quant::quantize_q8_0(&w).unwrap();
            PackedMatrix::from_ggml(ty, &bytes, n_out, n_in).unwrap()
        }
        _ => {
            let size = marco_backend_cpu::row_bytes(ty, n_in).unwrap() * n_out;
            let mut data: Vec<u8> = values(size, 3).iter().map(|v| (v.to_bits() >> 7) as u8).collect();
            let fields: &[usize] = match ty {
                GgmlType::Q6_K => &[208],
                GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
                _ => &[0],
            };
            let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
            for block in data.chunks_exact_mut(ty.type_size()) {
                for &f in fields {
                    block[f..f + 2].copy_from_slice(&scale);
                }
            }
            PackedMatrix::from_ggml(ty, &data, n_out, n_in).unwrap()
        }
    }
}

fn bench_case(
    c: &mut Criterion,
    group_name: &str,
    ty: GgmlType,
    rows: usize,
    n_out: usize,
    n_in: usize,
    options: MatmulOptions,
) {
    let w = weight(ty, n_out, n_in);
    let x = values(rows * n_in, 11);
    let mut out = vec![0.0f32; rows * n_out];
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(w.weight_bytes() as u64));
    let label = if ty == GgmlType::F32 {
        format!("F32-rows{rows}")
    } else {
        format!("{ty}-{:?}acts-rows{rows}", options.activations)
    };
    group.bench_function(BenchmarkId::from_parameter(label), |b| {
        b.iter(|| matmul_with(black_box(&x), rows, &w, &mut out, options).unwrap())
    });
    group.finish();
}

/// A layer's q/k/v projections (Q4_1, `[576→576]`, `[576→192]` twice) as one `matmul_many`
/// against three `matmul_with` calls, at decode batch sizes.
fn bench_qkv(c: &mut Criterion, rows: usize) {
    let weights =
        [weight(GgmlType::Q4_1, 576, 576), weight(GgmlType::Q4_1, 192, 576), weight(GgmlType::Q4_1, 192, 576)];
    let x = values(rows * 576, 11);
    let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0.0f32; rows * w.out_features()]).collect();
    let options = MatmulOptions::default();
    let mut group = c.benchmark_group("qkv_576_q4_1");
    group.throughput(Throughput::Bytes(weights.iter().map(|w| w.weight_bytes() as u64).sum()));
    group.bench_function(BenchmarkId::from_parameter(format!("matmul_many-rows{rows}")), |b| {
        let refs: Vec<&PackedMatrix> = weights.iter().collect();
        b.iter(|| {
            let mut out_refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            matmul_many(black_box(&x), rows, &refs, &mut out_refs, options).unwrap()
        })
    });
    group.bench_function(BenchmarkId::from_parameter(format!("separate-rows{rows}")), |b| {
        b.iter(|| {
            for (w, out) in weights.iter().zip(outs.iter_mut()) {
                matmul_with(black_box(&x), rows, w, out, options).unwrap();
            }
        })
    });
    group.finish();
}

fn kernels(c: &mut Criterion) {
    for rows in [1, 8] {
        bench_qkv(c, rows);
    }
    let q8 = MatmulOptions::default();
    let f32_acts = MatmulOptions { activations: ActivationMode::F32, ..q8 };
    let legacy = [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];
    for ty in legacy {
        bench_case(c, "lm_head_576x49152", ty, 1, 49152, 576, q8);
    }
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        bench_case(c, "lm_head_576x49152", ty, 1, 49152, 576, f32_acts);
    }
    for ty in legacy {
        bench_case(c, "mlp_up_576x1536", ty, 1, 1536, 576, q8);
    }
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
        bench_case(c, "mlp_up_576x1536", ty, 1, 1536, 576, f32_acts);
    }
    for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::Q6_K] {
        bench_case(c, "mlp_down_1536x576", ty, 1, 576, 1536, q8);
    }
    for rows in [4, 8, 16] {
        for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_1] {
            bench_case(c, "mlp_up_576x1536_batch", ty, rows, 1536, 576, q8);
        }
        bench_case(c, "mlp_down_1536x576_batch", GgmlType::Q4_1, rows, 576, 1536, q8);
    }
    for rows in [8, 16] {
        bench_case(c, "lm_head_576x49152_batch", GgmlType::Q8_0, rows, 49152, 576, q8);
    }
    // Prefill: the integer kernels (8-bit activations take them at every batch size) vs the
    // GEMM (f32 activations, and f32 weights, past `small_batch_max` rows).
    let int_path = MatmulOptions { small_batch_max_f32: usize::MAX, ..q8 };
    for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_1] {
        bench_case(c, "prefill128_576x1536_gemm", ty, 128, 1536, 576, f32_acts);
        bench_case(c, "prefill128_576x1536_int", ty, 128, 1536, 576, int_path);
    }
    let logits = values(49152, 5);
    c.bench_function("top_k_40_of_49152", |b| b.iter(|| top_k(black_box(&logits), 40)));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = kernels
}
criterion_main!(benches);
