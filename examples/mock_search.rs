//! Runs every search policy on a scripted mock model where greedy decoding goes wrong.
//!
//! After the prompt the mock prefers "Try A:" (p = 0.6), which leads unconfidently to the
//! wrong answer 7; "Try B:" (p = 0.4) leads confidently to 42; after Marco-o1's reflection
//! prompt the mock takes the B branch. Greedy decoding answers 7; MCTS, beam search and
//! greedy decoding with one reflection round answer 42.
//!
//! ```text
//! cargo run --release --example mock_search -- --seed 3 --dot /tmp/marco
//! ```
//! writes `/tmp/marco-<policy>.dot` (render with `dot -Tsvg`) and, with `--json`, the traces.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use marco::core::mock::{MockModel, Rule, EOS};
use marco::core::{Budget, Granularity, LanguageModel, Problem, SearchOutcome, SearchPolicy};
use marco::search::{
    BeamConfig, BeamSearch, GenerationConfig, GreedyAnswerRule, GreedyConfig, GreedyReflection, Mcts, MctsConfig,
    SelfConsistency, SelfConsistencyConfig,
};

#[derive(Parser)]
#[command(about = "Every marco search policy on a mock model where greedy decoding is wrong")]
struct Args {
    /// Seed of the mock's fallback distributions and of sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generated-token budget of each search.
    #[arg(long, default_value_t = 400)]
    tokens: u64,
    /// Write each search tree as Graphviz DOT to `<PREFIX>-<policy>.dot`.
    #[arg(long, value_name = "PREFIX")]
    dot: Option<PathBuf>,
    /// Write each trace as JSON to `<PREFIX>-<policy>.json`.
    #[arg(long, value_name = "PREFIX")]
    json: Option<PathBuf>,
}

fn scenario(seed: u64) -> anyhow::Result<MockModel> {
    Ok(MockModel::builder()
        .seed(seed)
        .pieces(["Try A:", "Try B:", " 7", " 8", " 6", " 42"])
        .rule(Rule::ends_with("scratch.").probs([("Try B:", 0.9)]))
        .rule(Rule::ends_with("Try A:").probs([(" 7", 0.35), (" 8", 0.3), (" 6", 0.3)]))
        .rule(Rule::ends_with("Try B:").probs([(" 42", 0.95)]))
        .rule(Rule::ends_with(" 42").probs([(EOS, 0.97)]))
        .rule(Rule::ends_with(" 7").probs([(EOS, 0.55), ("?", 0.4)]))
        .rule(Rule::ends_with(" 8").probs([(EOS, 0.55), ("?", 0.4)]))
        .rule(Rule::ends_with(" 6").probs([(EOS, 0.55), ("?", 0.4)]))
        .rule(Rule::ends_with("?").probs([(EOS, 0.9)]))
        .rule(Rule::ends_with("assistant: ").probs([("Try A:", 0.6), ("Try B:", 0.4)]))
        .build()?)
}

fn with_suffix(prefix: &std::path::Path, name: &str, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(format!("-{name}.{ext}"));
    PathBuf::from(s)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let budget = Budget::tokens(args.tokens);
    let generation = GenerationConfig::default()
        .with_granularity(Granularity::Token)
        .with_max_depth(16)
        .with_seed(args.seed)
        .with_temperature(1.0);
    let greedy = generation.clone().with_temperature(0.0);
    let policies: Vec<(&str, Box<dyn SearchPolicy>)> = vec![
        (
            "greedy",
            Box::new(GreedyReflection::new(
                GreedyConfig::default().with_budget(budget).with_generation(greedy.clone()).with_rounds(0),
            )?),
        ),
        (
            "greedy-reflection",
            Box::new(GreedyReflection::new(
                GreedyConfig::default()
                    .with_budget(budget)
                    .with_generation(greedy)
                    .with_rounds(1)
                    .with_answer_rule(GreedyAnswerRule::MostConfident),
            )?),
        ),
        (
            "mcts",
            Box::new(Mcts::new(
                MctsConfig::default()
                    .with_budget(budget.with_rollouts(24))
                    .with_generation(generation.clone())
                    .with_width(2),
            )?),
        ),
        (
            "beam",
            Box::new(BeamSearch::new(
                BeamConfig::default()
                    .with_budget(budget)
                    .with_generation(generation.clone())
                    .with_beam_width(2)
                    .with_expansions(2),
            )?),
        ),
        (
            "self-consistency",
            Box::new(SelfConsistency::new(
                SelfConsistencyConfig::default().with_budget(budget).with_generation(generation).with_samples(8),
            )?),
        ),
    ];
    for (name, policy) in policies {
        let mut model = scenario(args.seed)?;
        let problem = Problem::from_question(model.tokenizer(), "What is six times seven?", None)?;
        let outcome: SearchOutcome = policy.search(&mut model, &problem)?;
        let s = &outcome.stats;
        println!(
            "{name:<18} answer {:<5} value {:.3}  | {} nodes, {} rollouts, {} tokens generated, recompute {:.3}, \
             stop {:?}, {:.2} ms  | {:?}",
            outcome.answer.as_deref().unwrap_or("-"),
            outcome.value,
            s.nodes,
            s.rollouts,
            s.tokens_generated,
            s.recompute_ratio(),
            s.stop_reason,
            s.elapsed_secs * 1e3,
            outcome.text
        );
        if let Some(prefix) = &args.dot {
            let path = with_suffix(prefix, name, "dot");
            std::fs::write(&path, outcome.to_dot()).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(prefix) = &args.json {
            let path = with_suffix(prefix, name, "json");
            std::fs::write(&path, outcome.to_json()?).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
