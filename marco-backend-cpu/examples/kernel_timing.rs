//! Times one kernel case on one thread (no pool), for profiling with `perf stat`:
//! `cargo run --release -p marco-backend-cpu --example kernel_timing -- Q4_1 1 49152 576 200`
//! (type, rows, out_features, in_features, iterations). `PARALLEL=1` uses the thread pool,
//! `SMALL_BATCH_MAX=n` moves the small-batch/GEMM threshold, `MARCO_KERNELS=avx2` (or `avx512`,
//! `scalar`) caps the instruction set. Prints the best and median time per call and the weight
//! bytes per second at the best time, and the instruction set used.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use marco_backend_cpu::{matmul_with, GgmlType, MatmulOptions, PackedMatrix};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        bail!("usage: kernel_timing TYPE ROWS OUT IN ITERATIONS [f32-acts]");
    }
    let ty = GgmlType::ALL.into_iter().find(|t| t.name() == args[0]).context("unknown type")?;
    let rows: usize = args[1].parse()?;
    let n_out: usize = args[2].parse()?;
    let n_in: usize = args[3].parse()?;
    let iterations: usize = args[4].parse()?;
    let mut state = 0x1234_5678u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let w = if ty == GgmlType::F32 {
        PackedMatrix::from_f32((0..n_out * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect(), n_out, n_in)?
    } else {
        let mut data: Vec<u8> = (0..marco_backend_cpu::row_bytes(ty, n_in)? * n_out).map(|_| next() as u8).collect();
        let fields: &[usize] = match ty {
            GgmlType::Q6_K => &[208],
            GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
            _ => &[0],
        };
        for block in data.chunks_exact_mut(ty.type_size()) {
            for &f in fields {
                block[f..f + 2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
            }
        }
        PackedMatrix::from_ggml(ty, &data, n_out, n_in)?
    };
    let x: Vec<f32> = (0..rows * n_in).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
    let mut out = vec![0.0; rows * n_out];
    let mut options = MatmulOptions { parallel: std::env::var_os("PARALLEL").is_some(), ..MatmulOptions::default() };
    if let Some(max) = std::env::var("SMALL_BATCH_MAX").ok().and_then(|v| v.parse().ok()) {
        options.small_batch_max = max;
        options.small_batch_max_f32 = max;
    }
    if args.get(5).is_some_and(|a| a == "f32-acts") {
        options.activations = marco_backend_cpu::ActivationMode::F32;
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        matmul_with(&x, rows, &w, &mut out, options)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let best = times[0];
    let median = times[times.len() / 2];
    println!(
        "{ty} rows {rows} [{n_out}x{n_in}] best {:.1} us median {:.1} us  {:.2} GB/s at best  checksum {}  {:?}",
        best * 1e6,
        median * 1e6,
        w.weight_bytes() as f64 / best / 1e9,
        out.iter().sum::<f32>(),
        marco_backend_cpu::isa()
    );
    Ok(())
}
