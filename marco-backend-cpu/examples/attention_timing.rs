//! Times one batched decode-attention call ([`marco_backend_cpu::ops::attention_batch`]), for
//! profiling: `cargo run --release -p marco-backend-cpu --example attention_timing -- 8 64 32 2000`
//! (sequences, shared prefix positions, own positions per sequence, iterations) with the default
//! model's shape (9 query heads, 3 kv heads, width 64). Every sequence reads the same prefix run
//! (as forks of one prompt do) and then its own run. `MARCO_THREADS=1` times one thread.
//! Prints the best and median time per call.

use std::time::Instant;

use anyhow::{bail, Result};
use marco_backend_cpu::ops::{attention_batch, AttentionSeq, AttentionShape, KvRun};

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let &[seqs, prefix, own, iterations] = args.as_slice() else {
        bail!("usage: attention_timing SEQUENCES PREFIX OWN ITERATIONS");
    };
    let shape = AttentionShape { heads: 9, kv_heads: 3, head_dim: 64 };
    let mut state = 0x9e37_79b9u32;
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    let kv_width = shape.kv_heads * shape.head_dim;
    let (prefix_k, prefix_v) = (noise(prefix * kv_width), noise(prefix * kv_width));
    let own_kv: Vec<(Vec<f32>, Vec<f32>)> = (0..seqs).map(|_| (noise(own * kv_width), noise(own * kv_width))).collect();
    let runs: Vec<[KvRun<'_>; 2]> = own_kv
        .iter()
        .map(|(k, v)| {
            [
                KvRun { k: &prefix_k, v: &prefix_v, capacity: prefix, len: prefix },
                KvRun { k, v, capacity: own, len: own },
            ]
        })
        .collect();
    let batch: Vec<AttentionSeq<'_>> = runs
        .iter()
        .enumerate()
        .map(|(i, runs)| AttentionSeq { rows: i..i + 1, runs, past: prefix + own - 1 })
        .collect();
    let width = shape.heads * shape.head_dim;
    let q = noise(seqs * width);
    let mut out = vec![0.0; seqs * width];
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        attention_batch(&q, seqs, shape, &batch, &mut out)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let checksum: f32 = out.iter().sum();
    println!(
        "{seqs} sequences, {prefix} + {own} positions: best {:.1} us median {:.1} us  checksum {checksum:.4}",
        times[0] * 1e6,
        times[times.len() / 2] * 1e6
    );
    Ok(())
}
