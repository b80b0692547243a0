//! The tree-shaped KV cache against recomputation: one MCTS run on a model whose forks share
//! their prefix's KV (marco's cache), and the same run on a naive wrapper whose every fork
//! prefills the node's whole sequence from scratch (what a search without a prefix cache
//! does). A table of medians: wall time, tokens computed, tokens/s, recompute ratio, KV bytes.
//!
//! ```text
//! cargo run --release --example tree_bench                               # default model
//! cargo run --release --example tree_bench -- --budget 512 --width 4 --mini-step 32 --runs 3
//! cargo run --release --features cuda --example tree_bench
//! ```
//!
//! Both variants run the same seeded search: sampling draws depend on (seed, sequence id,
//! position), and the wrapper hands out the same sequence ids, so the trees agree up to float
//! rounding. "KV bytes" is the model's KV memory in use when the search ended (before it
//! released its states); the naive variant holds a full private cache per live state.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use marco::core::{
    Budget, Granularity, LanguageModel, ModelCounters, Problem, SearchPolicy, SearchStats, SeqId, StepOutput,
    StepRequest, TokenId, Tokenizer,
};
use marco::model::KernelBackend;
use marco::search::{GenerationConfig, Mcts, MctsConfig};

#[derive(Parser, Debug)]
#[command(about = "MCTS with marco's shared KV cache vs. recomputing every node's prefix")]
struct Args {
    /// A `.gguf` file or a Hugging Face directory (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Token budget of the search.
    #[arg(long, default_value_t = 256)]
    budget: u64,
    /// Children per expansion.
    #[arg(long, default_value_t = 4)]
    width: usize,
    /// Tokens per mini-step (one tree edge).
    #[arg(long, default_value_t = 32)]
    mini_step: usize,
    /// Timed runs per variant.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The question.
    #[arg(long, default_value = "A farmer has 17 sheep. All but 9 run away. How many sheep are left?")]
    question: String,
}

/// A model without a prefix cache: a fork re-creates the sequence from its full token list
/// (recomputing the whole prefix), so every node pays for its whole path.
struct Recompute<M: LanguageModel> {
    inner: M,
    tokens: HashMap<SeqId, Vec<TokenId>>,
}

impl<M: LanguageModel> LanguageModel for Recompute<M> {
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.inner.tokenizer()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn new_sequence(&mut self, prompt: &[TokenId]) -> marco::core::Result<SeqId> {
        let seq = self.inner.new_sequence(prompt)?;
        self.tokens.insert(seq, prompt.to_vec());
        Ok(seq)
    }
    fn fork(&mut self, seq: SeqId) -> marco::core::Result<SeqId> {
        let tokens = self.tokens.get(&seq).cloned().ok_or(marco::core::Error::UnknownSequence(seq.0))?;
        self.new_sequence(&tokens)
    }
    fn append(&mut self, seq: SeqId, tokens: &[TokenId]) -> marco::core::Result<()> {
        self.inner.append(seq, tokens)?;
        self.tokens.entry(seq).or_default().extend_from_slice(tokens);
        Ok(())
    }
    fn step(&mut self, batch: &[StepRequest]) -> marco::core::Result<Vec<StepOutput>> {
        let outputs = self.inner.step(batch)?;
        for (request, output) in batch.iter().zip(&outputs) {
            self.tokens.entry(request.seq).or_default().push(output.token);
        }
        Ok(outputs)
    }
    fn release(&mut self, seq: SeqId) -> marco::core::Result<()> {
        self.tokens.remove(&seq);
        self.inner.release(seq)
    }
    fn seq_len(&self, seq: SeqId) -> marco::core::Result<usize> {
        self.inner.seq_len(seq)
    }
    fn counters(&self) -> ModelCounters {
        self.inner.counters()
    }
}

fn main() -> ExitCode {
    common::run_main(run::<common::Backend>)
}

fn run<B: KernelBackend>(args: Args) -> Result<()> {
    if args.runs == 0 || args.budget == 0 || args.width == 0 || args.mini_step == 0 {
        bail!("--runs, --budget, --width and --mini-step must be positive");
    }
    let path = common::model_path(args.model.as_deref())?;
    let mut shared = common::load_lm::<B>(&path)?;
    let mut naive = Recompute { inner: common::load_lm::<B>(&path)?, tokens: HashMap::new() };
    let problem = Problem::from_question(shared.tokenizer(), &args.question, None)?;
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(args.budget))
        .with_width(args.width)
        .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(args.mini_step)));
    let mcts = Mcts::new(config)?;

    let mut results: Vec<(&str, Vec<SearchStats>)> =
        vec![("shared KV cache", Vec::new()), ("naive recompute", Vec::new())];
    for run in 0..args.runs {
        // Alternate the order so that machine load drifts hit both variants alike.
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for variant in order {
            let model: &mut dyn LanguageModel = if variant == 0 { &mut shared } else { &mut naive };
            let outcome = mcts.search(model, &problem)?;
            results[variant].1.push(outcome.stats);
        }
    }
    println!(
        "model: {} · backend: {} ({}) · MCTS width {} · mini-step {} · budget {} tokens · prompt {} tokens · median of {} runs",
        path.display(),
        common::backend_name(),
        B::kernel_name(),
        args.width,
        args.mini_step,
        args.budget,
        problem.prompt_tokens.len(),
        args.runs
    );
    println!(
        "| variant | wall s | tokens computed | distinct tokens | computed tok/s | generated tok/s | recompute ratio | KV MB at end | KV MB / distinct-token MB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, stats) in &results {
        let m = |f: &dyn Fn(&SearchStats) -> f64| common::median(&mut stats.iter().map(f).collect::<Vec<f64>>());
        let wall = m(&|s| s.elapsed_secs);
        println!(
            "| {name} | {wall:.2} | {:.0} | {:.0} | {:.1} | {:.1} | {:.3} | {:.2} | {:.3} |",
            m(&|s| s.tokens_computed as f64),
            m(&|s| s.distinct_tokens as f64),
            m(&|s| s.tokens_computed as f64 / s.elapsed_secs),
            m(&|s| s.tokens_per_second()),
            m(&|s| s.recompute_ratio()),
            m(&|s| s.kv_bytes_in_use as f64 / 1e6),
            m(&|s| s.kv_bytes_in_use as f64 / (s.distinct_tokens * s.kv_bytes_per_token).max(1) as f64),
        );
    }
    Ok(())
}
