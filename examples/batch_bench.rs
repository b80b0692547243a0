//! Batched decode: aggregate tokens per second when 1, 2, 4, … sequences step together in one
//! [`LanguageModel::step`], the way a search advances all its leaves. A table of medians.
//!
//! ```text
//! cargo run --release --example batch_bench                          # default model, batches 1..16
//! cargo run --release --example batch_bench -- --batches 1,8,32 --gen-tokens 32 --runs 3
//! cargo run --release --example batch_bench -- --random qwen2-7b     # Marco-o1's shape, random weights
//! cargo run --release --features cuda --example batch_bench
//! cargo run --release --features cuda --example batch_bench -- --random qwen2-7b --dtype bf16
//! ```
//!
//! Each run prefills one prompt of `--prompt-tokens` tokens, forks it once per sequence (the
//! forks share the prompt's KV, as leaves of a search tree do) and appends `i mod 4` extra
//! tokens to fork `i`, so the batch is ragged, as in a search. Then every sequence decodes
//! `--gen-tokens` greedy tokens (top-5 log-probabilities reported, as the search asks), all
//! sequences in one step call per token. Only the decode is timed.
//!
//! The batch sizes take turns: each of the `--runs` rounds runs every batch size once, so that
//! a machine whose speed drifts over seconds slows all of them alike. The table gives each
//! batch size's median rate and, as "× batch 1", the median over the rounds of its rate
//! divided by the same round's batch-1 rate.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use marco::core::{LanguageModel, SamplingParams, StepRequest, TokenId};
use marco::model::loader::RandomWeights;
use marco::model::{BurnLm, KernelBackend, LinearPath, Transformer};

#[derive(Parser, Debug)]
#[command(about = "Aggregate decode tokens per second with 1, 2, 4, … sequences stepping together")]
struct Args {
    /// A `.gguf` file or a Hugging Face directory (default: the default model).
    #[arg(long, conflicts_with = "random")]
    model: Option<PathBuf>,
    /// Benchmark a random-weight model of this shape instead of loading one.
    #[arg(long, value_enum)]
    random: Option<common::RandomShape>,
    /// Batch sizes (sequences stepping together).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4, 8, 16])]
    batches: Vec<usize>,
    /// Shared prompt length.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens each sequence decodes per run.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Timed rounds; each runs every batch size once (after one warm-up run of each).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Float type of weights, activations and KV; bf16 needs `--features cuda`.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: common::FloatType,
}

fn main() -> ExitCode {
    common::run_main(|args: Args| match args.dtype {
        common::FloatType::F32 => run::<common::Backend>(args),
        common::FloatType::Bf16 => run_bf16(args),
    })
}

#[cfg(feature = "cuda")]
fn run_bf16(args: Args) -> Result<()> {
    run::<marco::CudaBf16>(args)
}

#[cfg(not(feature = "cuda"))]
fn run_bf16(_: Args) -> Result<()> {
    bail!("--dtype bf16 runs on CUDA only: build with --features cuda")
}

/// One run at `batch` sequences; returns the decode seconds.
fn one_run(model: &mut dyn LanguageModel, prompt: &[TokenId], batch: usize, gen_tokens: usize) -> Result<f64> {
    let root = model.new_sequence(prompt)?;
    let mut seqs = Vec::with_capacity(batch);
    for i in 0..batch {
        let seq = model.fork(root)?;
        let extra: Vec<TokenId> = prompt.iter().copied().take(i % 4).collect();
        model.append(seq, &extra)?;
        seqs.push(seq);
    }
    model.release(root)?;
    let requests: Vec<StepRequest> = seqs.iter().map(|&s| StepRequest::new(s, SamplingParams::greedy())).collect();
    let start = Instant::now();
    for _ in 0..gen_tokens {
        model.step(&requests)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    for seq in seqs {
        model.release(seq)?;
    }
    Ok(seconds)
}

fn run<B: KernelBackend>(args: Args) -> Result<()> {
    if args.runs == 0 || args.prompt_tokens == 0 || args.gen_tokens == 0 || args.batches.contains(&0) {
        bail!("--runs, --prompt-tokens, --gen-tokens and every batch size must be positive");
    }
    let device = B::Device::default();
    let (mut model, model_name): (BurnLm<B>, String) = match (&args.model, args.random) {
        (_, Some(shape)) => {
            let config = shape.config();
            let vocab = config.vocab_size;
            let network = Transformer::<B>::load(config, &RandomWeights::new(0), LinearPath::Kernel, &device)?;
            (BurnLm::new(network, Box::new(common::IdsOnly(vocab))), format!("random weights, shape {shape:?}"))
        }
        (path, None) => {
            let path = common::model_path(path.as_deref())?;
            (common::load_lm::<B>(&path)?, path.display().to_string())
        }
    };
    let prompt = common::bench_prompt(model.tokenizer(), args.prompt_tokens, args.random.is_none())?;
    if prompt.len() + 4 + args.gen_tokens > model.max_context() {
        bail!("{} tokens exceed the model's context of {}", prompt.len() + 4 + args.gen_tokens, model.max_context());
    }
    for &batch in &args.batches {
        one_run(&mut model, &prompt, batch, args.gen_tokens.min(4))?;
    }
    // rates[b][r]: batch size `b`'s rate in round `r`.
    let mut rates = vec![Vec::with_capacity(args.runs); args.batches.len()];
    for _ in 0..args.runs {
        for (b, &batch) in args.batches.iter().enumerate() {
            let seconds = one_run(&mut model, &prompt, batch, args.gen_tokens)?;
            rates[b].push((batch * args.gen_tokens) as f64 / seconds);
        }
    }
    let single = args.batches.iter().position(|&b| b == 1);
    let rows: Vec<(usize, f64, f64)> = args
        .batches
        .iter()
        .zip(&rates)
        .map(|(&batch, rates_b)| {
            let ratio = match single {
                Some(one) => {
                    let mut ratios: Vec<f64> = rates_b.iter().zip(&rates[one]).map(|(r, base)| r / base).collect();
                    common::median(&mut ratios)
                }
                None => f64::NAN,
            };
            (batch, common::median(&mut rates_b.clone()), ratio)
        })
        .collect();
    println!(
        "model: {model_name} · backend: {} ({}, {:?}) · prompt {} tokens shared, {} greedy tokens per sequence, median of {} interleaved rounds",
        common::backend_name(),
        B::kernel_name(),
        args.dtype,
        args.prompt_tokens,
        args.gen_tokens,
        args.runs
    );
    println!("| sequences | aggregate tok/s | ms per step | tok/s per sequence | × batch 1 |");
    println!("|---:|---:|---:|---:|---:|");
    for (batch, rate, ratio) in rows {
        println!(
            "| {batch} | {rate:.1} | {:.1} | {:.1} | {ratio:.2} |",
            1000.0 * batch as f64 / rate,
            rate / batch as f64
        );
    }
    if let Some(summary) = B::threading_summary() {
        println!("{summary}");
    }
    Ok(())
}
