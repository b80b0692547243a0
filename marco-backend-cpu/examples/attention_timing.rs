//! Times one batched decode-attention call ([`marco_backend_cpu::ops::attention_batch`]), for
//! profiling: `cargo run --release -p marco-backend-cpu --example attention_timing -- 8 64 32 2000`
//! (sequences, shared prefix positions, own positions per sequence, iterations) with the default
//! model's shape (9 query heads, 3 kv heads, width 64). Every sequence reads the same prefix run
//! (as forks of one prompt do) and then its own run. `MARCO_THREADS=1` times one thread.
//! Prints the best and median time per call.
//!
//! Two more arguments, `LAYERS STREAM_MB`, time it as a decode step meets it: the calls cycle
//! through `LAYERS` separate caches, and before each call the example reads its share of a
//! `STREAM_MB` buffer, as the layer's weights stream through the caches between two attention
//! calls (`… 8 64 32 3000 30 96`: the default model's 30 layers and ~90 MB of weights), so the
//! keys and values come from memory, not from a cache that the previous call warmed.

use std::time::Instant;

use anyhow::{bail, Result};
use marco_backend_cpu::ops::{attention_batch, AttentionSeq, AttentionShape, KvRun};

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (seqs, prefix, own, iterations, layers, stream_mb) = match *args.as_slice() {
        [seqs, prefix, own, iterations] => (seqs, prefix, own, iterations, 1, 0),
        [seqs, prefix, own, iterations, layers, stream_mb] if layers > 0 => {
            (seqs, prefix, own, iterations, layers, stream_mb)
        }
        _ => bail!("usage: attention_timing SEQUENCES PREFIX OWN ITERATIONS [LAYERS STREAM_MB]"),
    };
    if seqs == 0 || prefix + own == 0 || iterations == 0 {
        bail!("sequences, positions and iterations must be positive");
    }
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
    // Per layer: the shared prefix's keys and values, then each sequence's own.
    type LayerCache = (Vec<f32>, Vec<f32>, Vec<(Vec<f32>, Vec<f32>)>);
    let caches: Vec<LayerCache> = (0..layers)
        .map(|_| {
            let prefix_kv = (noise(prefix * kv_width), noise(prefix * kv_width));
            let own_kv = (0..seqs).map(|_| (noise(own * kv_width), noise(own * kv_width))).collect();
            (prefix_kv.0, prefix_kv.1, own_kv)
        })
        .collect();
    let runs: Vec<Vec<[KvRun<'_>; 2]>> = caches
        .iter()
        .map(|(prefix_k, prefix_v, own_kv)| {
            own_kv
                .iter()
                .map(|(k, v)| {
                    [
                        KvRun { k: prefix_k, v: prefix_v, capacity: prefix, len: prefix },
                        KvRun { k, v, capacity: own, len: own },
                    ]
                })
                .collect()
        })
        .collect();
    let batches: Vec<Vec<AttentionSeq<'_>>> = runs
        .iter()
        .map(|layer| {
            layer
                .iter()
                .enumerate()
                .map(|(i, runs)| AttentionSeq { rows: i..i + 1, runs, past: prefix + own - 1 })
                .collect()
        })
        .collect();
    let width = shape.heads * shape.head_dim;
    let q = noise(seqs * width);
    let mut out = vec![0.0; seqs * width];
    let stream = vec![1u8; stream_mb << 20];
    let share = stream.len() / layers;
    let mut streamed = 0u64;
    let mut times = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let layer = i % layers;
        // One byte per cache line of this layer's share: every line passes through the caches.
        streamed += stream[layer * share..(layer + 1) * share].iter().step_by(64).map(|&b| u64::from(b)).sum::<u64>();
        let start = Instant::now();
        attention_batch(&q, seqs, shape, &batches[layer], &mut out)?;
        times.push(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(streamed);
    times.sort_by(f64::total_cmp);
    let checksum: f32 = out.iter().sum();
    println!(
        "{seqs} sequences, {prefix} + {own} positions: best {:.1} us median {:.1} us  checksum {checksum:.4}",
        times[0] * 1e6,
        times[times.len() / 2] * 1e6
    );
    Ok(())
}
