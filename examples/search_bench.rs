//! The same seeded MCTS search in-process and over an inference server, four ways:
//!
//! - `in-process`: the default model on marco's CPU kernels and tree-shaped KV cache;
//! - `remote actions`: one request per action, the server's prefix cache on;
//! - `remote tokens`: one request per token (a granularity without hints);
//! - `remote no reuse`: one request per action, the whole prompt computed every time (what a
//!   client that re-sends text without prefix caching costs).
//!
//! and, for scale, the server's own single-stream decode (one request of `--decode-tokens`).
//!
//! ```text
//! scripts/llama-server.sh &
//! cargo run --release --example search_bench -- --url http://127.0.0.1:8080
//! ```

mod common;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use marco::core::{
    ActionGranularity, Budget, ExtendRequest, Granularity, LanguageModel, Problem, SamplingParams, SearchPolicy,
    SearchStats, TokenId,
};
use marco::remote::{RemoteConfig, RemoteLm, TokenizerSource};
use marco::search::{GenerationConfig, Mcts, MctsConfig};

#[derive(Parser, Debug)]
#[command(about = "MCTS in-process vs over an inference server: wall time, tokens computed, requests")]
struct Args {
    /// The server (e.g. `scripts/llama-server.sh`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Generated tokens per search.
    #[arg(long, default_value_t = 2000)]
    budget_tokens: u64,
    /// Tokens of a mini-step (one tree edge).
    #[arg(long, default_value_t = 32)]
    mini_step: usize,
    /// MCTS width.
    #[arg(long, default_value_t = 3)]
    width: usize,
    /// Seed of the search.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rounds (each runs every variant once, in turn); the table gives medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Tokens of the server's single-stream decode measurement.
    #[arg(long, default_value_t = 256)]
    decode_tokens: usize,
    /// Leave out the one-request-per-token variant (thousands of requests).
    #[arg(long)]
    skip_tokens: bool,
    /// Leave out the variant without prefix reuse.
    #[arg(long)]
    skip_no_reuse: bool,
    /// The question.
    #[arg(long, default_value = "Janet has 3 apples and buys 5 more. How many apples does she have now?")]
    question: String,
    /// The system prompt (the default, a reasoning instruction in the manner of Marco-o1's,
    /// makes a prompt of about 200 tokens, a size servers commonly see).
    #[arg(long, default_value = SYSTEM)]
    system: String,
}

const SYSTEM: &str = "You are a careful assistant that solves problems by reasoning step by step. \
    Read the question and restate what is given and what is asked. Then work through the problem \
    in short numbered steps, one calculation per step, writing every intermediate result. Check \
    each step against the question before you go on, and if a step looks wrong, say so and redo \
    it. Use plain arithmetic and keep units with every number. When you are done, state the final \
    answer on its own line as 'Answer: <number>'. Do not skip steps, do not guess, and do not add \
    anything after the final answer. If the question is ambiguous, choose the most natural \
    reading and say which one you chose. Keep your language simple and your steps short.";

/// A mini-step that gives a whole-action model no hints, so it is asked token by token.
struct NoHints(Granularity);

impl ActionGranularity for NoHints {
    fn is_complete(&self, tokens: &[TokenId], text: &str) -> bool {
        self.0.is_complete(tokens, text)
    }
    fn describe(&self) -> String {
        format!("{} without hints", self.0.describe())
    }
}

#[derive(Default)]
struct Row {
    wall: Vec<f64>,
    generated: Vec<f64>,
    prompt_computed: Vec<f64>,
    requests: Vec<f64>,
    recompute: Vec<f64>,
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mcts(args: &Args, hints: bool) -> Result<Mcts> {
    let generation =
        GenerationConfig::default().with_granularity(Granularity::MiniStep(args.mini_step)).with_seed(args.seed);
    let mcts = Mcts::new(
        MctsConfig::default()
            .with_budget(Budget::tokens(args.budget_tokens))
            .with_generation(generation)
            .with_width(args.width),
    )?;
    Ok(if hints { mcts } else { mcts.with_granularity(NoHints(Granularity::MiniStep(args.mini_step))) })
}

fn remote(args: &Args, prefix_cache: bool, tokenizer: &std::path::Path) -> Result<RemoteLm> {
    let mut config = RemoteConfig::new(args.url.clone());
    config.prefix_cache = prefix_cache;
    RemoteLm::connect(config, TokenizerSource::File(tokenizer.to_path_buf()))
        .with_context(|| format!("cannot use the server at {} (start scripts/llama-server.sh)", args.url))
}

fn record(row: &mut Row, stats: &SearchStats, prompt_computed: u64, requests: u64) {
    row.wall.push(stats.elapsed_secs);
    row.generated.push(stats.tokens_generated as f64);
    row.prompt_computed.push(prompt_computed as f64);
    row.requests.push(requests as f64);
    row.recompute.push(stats.recompute_ratio());
}

/// Single-stream decode of the server: one request of `tokens` tokens on a cached prompt.
fn server_decode(lm: &mut RemoteLm, problem: &Problem, tokens: usize) -> Result<f64> {
    let seq = lm.new_sequence(&problem.prompt_tokens)?;
    let warm = lm.fork(seq)?;
    lm.extend(&[ExtendRequest::new(warm, SamplingParams::greedy(), 1)], &Granularity::MiniStep(1))?;
    let start = Instant::now();
    let out =
        lm.extend(&[ExtendRequest::new(seq, SamplingParams::greedy(), tokens)], &Granularity::MiniStep(tokens))?;
    let secs = start.elapsed().as_secs_f64();
    lm.release(seq)?;
    lm.release(warm)?;
    Ok(out[0].steps.len() as f64 / secs)
}

fn run(args: Args) -> Result<()> {
    let model_path = common::fetch_default_model()?;
    let mut local = common::load_lm::<common::Backend>(&model_path)?;
    // Each search gets its own first tokens ("[run 1 of <pid>, remote tokens] ..."), so that no
    // variant, and no earlier invocation, left states in the server's prefix cache for it.
    let tokenizer = marco::formats::MarcoTokenizer::load(&model_path)?;
    let problem = |round: usize, variant: &str| {
        let system = format!("[run {} of {}, {variant}] {}", round + 1, std::process::id(), args.system);
        Problem::from_question(&tokenizer, &args.question, Some(&system))
    };
    let mut with_cache = remote(&args, true, &model_path)?;
    let mut without_cache = remote(&args, false, &model_path)?;
    let names = ["in-process", "remote actions", "remote tokens", "remote no reuse"];
    let mut rows: Vec<Row> = names.iter().map(|_| Row::default()).collect();
    let mut decode = Vec::new();
    for round in 0..args.runs.max(1) {
        eprintln!("round {} of {}", round + 1, args.runs.max(1));
        let p = problem(round, names[0])?;
        let o = mcts(&args, true)?.search(&mut local, &p)?;
        record(&mut rows[0], &o.stats, 0, 0);
        for (i, hints) in [(1usize, true), (2, false)] {
            if i == 2 && args.skip_tokens {
                continue;
            }
            let before = with_cache.stats();
            let p = problem(round, names[i])?;
            let o = mcts(&args, hints)?.search(&mut with_cache, &p)?;
            let after = with_cache.stats();
            record(
                &mut rows[i],
                &o.stats,
                after.prompt_tokens_computed - before.prompt_tokens_computed,
                after.requests - before.requests,
            );
        }
        if !args.skip_no_reuse {
            let before = without_cache.stats();
            let p = problem(round, names[3])?;
            let o = mcts(&args, true)?.search(&mut without_cache, &p)?;
            let after = without_cache.stats();
            record(
                &mut rows[3],
                &o.stats,
                after.prompt_tokens_computed - before.prompt_tokens_computed,
                after.requests - before.requests,
            );
        }
        decode.push(server_decode(&mut with_cache, &problem(round, "decode")?, args.decode_tokens)?);
    }
    let server_decode = median(&decode);
    println!(
        "MCTS width {}, mini-step:{}, {} tokens, seed {}, prompt {} tokens; {:?} at {}; medians of {} round(s)\n",
        args.width,
        args.mini_step,
        args.budget_tokens,
        args.seed,
        problem(0, names[0])?.prompt_tokens.len(),
        with_cache.server_kind(),
        args.url,
        args.runs.max(1)
    );
    println!(
        "| variant | wall s | tokens generated | search tok/s | × server decode | server prompt tokens computed | \
         HTTP requests | recompute |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let base_wall = median(&rows[1].wall);
    for (name, row) in names.iter().zip(&rows) {
        if row.wall.is_empty() {
            continue;
        }
        let wall = median(&row.wall);
        let rate = median(&row.generated) / wall;
        let remote = *name != "in-process";
        println!(
            "| {name} | {wall:.2} | {:.0} | {rate:.1} | {:.2} | {} | {} | {:.3} |",
            median(&row.generated),
            rate / server_decode,
            if remote { format!("{:.0}", median(&row.prompt_computed)) } else { "–".into() },
            if remote { format!("{:.0}", median(&row.requests)) } else { "–".into() },
            median(&row.recompute),
        );
    }
    println!("\nserver single-stream decode: {server_decode:.1} tok/s ({} tokens, one request)", args.decode_tokens);
    for (i, name) in names.iter().enumerate().skip(2) {
        if !rows[i].wall.is_empty() {
            println!("remote actions vs {name}: {:.2}× faster", median(&rows[i].wall) / base_wall);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    common::run_main(run)
}
