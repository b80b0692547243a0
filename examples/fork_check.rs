//! Checks, on prompts you choose, that the tree-shaped KV cache changes nothing: a sequence
//! forked from a shared prompt, stepped in a batch with its siblings (ragged lengths), forked
//! again and given a reflection, has the logits of the same tokens prefilled alone in a fresh
//! state; and each token of the tree was computed once. Prints one line per prompt and exits
//! with status 1 if any difference exceeds `--tolerance` or any token was recomputed.
//!
//! ```text
//! cargo run --release --example fork_check -- "What is 17 × 23?" "Name three prime numbers."
//! cargo run --release --example fork_check -- --forks 24 --steps 12 "Write a limerick."
//! cargo run --release --features cuda --example fork_check -- "Explain gravity briefly."
//! ```
//!
//! Per prompt: the prompt is prefilled once and forked `--forks` times; fork `i` appends the
//! first `i mod 4` prompt tokens (so the batch is ragged), then all forks step together
//! `--steps` times, sampling at temperature 1 with a seed per fork and step (so they diverge).
//! Halfway, the first fork is forked again and the child appends Marco-o1's reflection and
//! joins the batch. At the end every leaf's pending logits are compared with those of its
//! whole token sequence prefilled in one call.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use marco::core::{LanguageModel, SamplingParams, SeqId, StepRequest, TokenId};
use marco::model::KernelBackend;
use marco::search::MARCO_REFLECTION;

#[derive(Parser, Debug)]
#[command(about = "Forked and batched states against the same sequences run alone, on your prompts")]
struct Args {
    /// Prompts (plain text, tokenized without a chat template).
    #[arg(required = true)]
    prompts: Vec<String>,
    /// A `.gguf` file or a Hugging Face directory (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Forks of each prompt stepping together.
    #[arg(long, default_value_t = 8)]
    forks: usize,
    /// Batched steps after the forks.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Largest allowed |logit difference| (default 1e-4; 0 asks for bit-for-bit).
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
}

fn main() -> ExitCode {
    common::run_main(run::<common::Backend>)
}

/// One leaf of the tree: its state and every token it was fed, in order.
struct Leaf {
    seq: SeqId,
    tokens: Vec<TokenId>,
}

fn run<B: KernelBackend>(args: Args) -> Result<()> {
    if args.forks == 0 || args.steps == 0 {
        bail!("--forks and --steps must be positive");
    }
    let path = common::model_path(args.model.as_deref())?;
    let mut model = common::load_lm::<B>(&path)?;
    let reflection = model.tokenizer().encode(&format!(" {MARCO_REFLECTION}"), false)?;
    println!("model: {} · backend: {} ({})", path.display(), common::backend_name(), B::kernel_name());
    println!("| prompt | tokens | leaves | computed / distinct | max abs logit diff |");
    println!("|---|---:|---:|---:|---:|");
    let mut failed = false;
    for prompt_text in &args.prompts {
        let prompt = model.tokenizer().encode(prompt_text, false)?;
        if prompt.is_empty() {
            bail!("the prompt {prompt_text:?} has no tokens");
        }
        let needed = prompt.len() + 3 + reflection.len() + args.steps;
        if needed > model.max_context() {
            bail!("{needed} tokens exceed the model's context of {}", model.max_context());
        }
        let before = model.counters().tokens_computed;
        let mut distinct = prompt.len() as u64;
        let root = model.new_sequence(&prompt)?;
        let mut leaves = Vec::with_capacity(args.forks + 1);
        for i in 0..args.forks {
            let seq = model.fork(root)?;
            let extra = &prompt[..(i % 4).min(prompt.len())];
            model.append(seq, extra)?;
            distinct += extra.len() as u64;
            leaves.push(Leaf { seq, tokens: [prompt.as_slice(), extra].concat() });
        }
        model.release(root)?;
        for step in 0..args.steps {
            if step == args.steps / 2 {
                let child = model.fork(leaves[0].seq)?;
                model.append(child, &reflection)?;
                distinct += reflection.len() as u64;
                leaves.push(Leaf { seq: child, tokens: [leaves[0].tokens.as_slice(), &reflection].concat() });
            }
            let requests: Vec<StepRequest> = leaves
                .iter()
                .enumerate()
                .map(|(i, leaf)| {
                    StepRequest::new(leaf.seq, SamplingParams::with_temperature(1.0, (i * 1000 + step) as u64))
                })
                .collect();
            for (leaf, output) in leaves.iter_mut().zip(model.step(&requests)?) {
                leaf.tokens.push(output.token);
            }
            distinct += leaves.len() as u64;
        }
        let computed = model.counters().tokens_computed - before;
        let mut worst = 0.0f32;
        for leaf in &leaves {
            let forked = model.pending_logits(leaf.seq)?;
            let alone_seq = model.new_sequence(&leaf.tokens)?;
            let alone = model.pending_logits(alone_seq)?;
            model.release(alone_seq)?;
            model.release(leaf.seq)?;
            let diff = forked.iter().zip(&alone).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            // NaN counts as a failure.
            worst = if diff.is_nan() || worst.is_nan() { f32::NAN } else { worst.max(diff) };
        }
        let ok = worst <= args.tolerance && computed == distinct;
        failed |= !ok;
        println!(
            "| {} | {} | {} | {computed} / {distinct} | {worst:e}{} |",
            common::truncate(&common::one_line(prompt_text), 40),
            prompt.len(),
            leaves.len(),
            if ok { "" } else { " (FAILED)" }
        );
    }
    if failed {
        bail!(
            "a forked or batched state differed from its sequence alone by more than {:e}, or a token was recomputed",
            args.tolerance
        );
    }
    Ok(())
}
