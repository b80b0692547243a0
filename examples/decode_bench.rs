//! Prefill and decode speed of a model, burn's plain ops against marco's kernel seam, in one
//! run: a table of medians.
//!
//! ```text
//! cargo run --release --example decode_bench                      # default model, both paths
//! cargo run --release --example decode_bench -- --runs 5 --prompt-tokens 128 --gen-tokens 128
//! cargo run --release --example decode_bench -- --model path/to/model.gguf --paths kernel
//! cargo run --release --features cuda --example decode_bench
//! cargo run --release --features cuda --example decode_bench -- --random qwen2-7b --paths kernel
//! ```
//!
//! `--random` builds a model of a known shape with seeded random weights instead of loading
//! one (for machines without the checkpoint; speed does not depend on the weights' values).
//!
//! Each run prefills a fixed prompt of `--prompt-tokens` tokens (a paragraph tokenised and
//! repeated) as one new sequence, then decodes `--gen-tokens` greedy tokens (stop tokens are
//! fed like any other). Prefill and decode are timed separately; the table shows the median
//! over `--runs` runs after one warm-up run per path.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use marco::core::{LanguageModel, SamplingParams, StepRequest, TokenId};
use marco::model::loader::RandomWeights;
use marco::model::{BurnLm, KernelBackend, LinearPath, LoadOptions, Transformer};

#[derive(Parser, Debug)]
#[command(about = "Prefill/decode tokens per second: burn's plain ops vs marco's kernel seam")]
struct Args {
    /// A `.gguf` file or a Hugging Face directory (default: the default model).
    #[arg(long, conflicts_with = "random")]
    model: Option<PathBuf>,
    /// Quantize the model's dense (f32/f16/bf16) linear weights at load: `q8_0` or `q4_0`
    /// (converted once and cached as a GGUF file under $MARCO_HOME).
    #[arg(long, value_parser = common::parse_quantize)]
    quantize: Option<marco::model::loader::QuantizeAtLoad>,
    /// Benchmark a random-weight model of this shape instead of loading one.
    #[arg(long, value_enum)]
    random: Option<common::RandomShape>,
    /// Prompt length.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Timed runs per path (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which linear-layer paths to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [common::PathArg::Burn, common::PathArg::KernelExact, common::PathArg::Kernel])]
    paths: Vec<common::PathArg>,
}

fn main() -> ExitCode {
    common::run_main(run::<common::Backend>)
}

/// One prefill + decode; returns (prefill seconds, decode seconds).
fn one_run(model: &mut dyn LanguageModel, prompt: &[TokenId], gen_tokens: usize) -> Result<(f64, f64)> {
    let start = Instant::now();
    let seq = model.new_sequence(prompt)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..gen_tokens {
        model.step(&[StepRequest::new(seq, SamplingParams::greedy())])?;
    }
    let decode = start.elapsed().as_secs_f64();
    model.release(seq)?;
    Ok((prefill, decode))
}

fn run<B: KernelBackend>(args: Args) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Err(reason) = marco::model::backend::probe_cuda() {
        bail!("the CUDA backend cannot run here: {reason}");
    }
    if args.runs == 0 || args.prompt_tokens == 0 || args.gen_tokens == 0 {
        bail!("--runs, --prompt-tokens and --gen-tokens must be positive");
    }
    let path = match args.random {
        Some(_) => None,
        None => Some(common::model_path(args.model.as_deref())?),
    };
    let device = B::Device::default();
    let mut rows = Vec::new();
    for &which in &args.paths {
        let linear_path = LinearPath::from(which);
        let load_start = Instant::now();
        let mut model: BurnLm<B> = match (&path, args.random) {
            (Some(path), _) => marco::model::load_with::<B>(
                path,
                &device,
                LoadOptions { linear_path, quantize: args.quantize, ..LoadOptions::default() },
            )
            .with_context(|| format!("cannot load the model {}", path.display()))?,
            (None, Some(shape)) => {
                let config = shape.config();
                let vocab = config.vocab_size;
                let network = Transformer::<B>::load(config, &RandomWeights::new(0), linear_path, &device)?;
                BurnLm::new(network, Box::new(common::IdsOnly(vocab)))
            }
            (None, None) => bail!("no model"),
        };
        let load = load_start.elapsed().as_secs_f64();
        let weight_mb = model.model().weight_bytes() as f64 / 1e6;
        let prompt = common::bench_prompt(model.tokenizer(), args.prompt_tokens, path.is_some())?;
        if prompt.len() + args.gen_tokens > model.max_context() {
            bail!("{} tokens exceed the model's context of {}", prompt.len() + args.gen_tokens, model.max_context());
        }
        one_run(&mut model, &prompt, args.gen_tokens)?;
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            let (p, d) = one_run(&mut model, &prompt, args.gen_tokens)?;
            prefill.push(args.prompt_tokens as f64 / p);
            decode.push(args.gen_tokens as f64 / d);
        }
        let kernel = match linear_path {
            LinearPath::Kernel => B::kernel_name().to_string(),
            LinearPath::KernelExact => format!("{} (f32 activations)", B::kernel_name()),
            LinearPath::Burn => "burn matmul".to_string(),
        };
        rows.push((kernel, load, weight_mb, common::median(&mut prefill), common::median(&mut decode)));
    }
    let model_name = match (&path, args.random) {
        (Some(path), _) => path.display().to_string(),
        (None, shape) => format!("random weights, shape {shape:?}"),
    };
    println!(
        "model: {model_name} · backend: {} · prompt {} tokens, {} greedy tokens, median of {} runs",
        common::backend_name(),
        args.prompt_tokens,
        args.gen_tokens,
        args.runs
    );
    println!("| linear path | load s | weights MB | prefill tok/s | decode tok/s | decode ms/token |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (kernel, load, weight_mb, prefill, decode) in rows {
        println!("| {kernel} | {load:.2} | {weight_mb:.0} | {prefill:.1} | {decode:.1} | {:.2} |", 1000.0 / decode);
    }
    Ok(())
}
