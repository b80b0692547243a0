//! Plugging your own reward and your own action granularity into MCTS.
//!
//! The user code between the two rulers below (under 30 lines) is all it takes to plug in;
//! `claims`, the plain string handling that finds the claims, sits after it:
//! - `ArithmeticVerifier`, a [`Reward`]: it finds "a op b = c" claims in the path's text and
//!   scales the model's confidence by the share of claims that hold (half credit when the
//!   path states none), so a confident but wrong calculation loses to a correct one;
//! - `Sentence`, an [`ActionGranularity`]: a tree edge ends at the end of a sentence;
//! - `Mcts::new(..)?.with_reward(ArithmeticVerifier).with_granularity(Sentence)`.
//!
//! The example runs MCTS twice on one word problem, with Marco-o1's confidence reward and
//! with the verifier, and shows each answer and the claims on its path.
//!
//! ```text
//! cargo run --release --example custom_reward
//! cargo run --release --example custom_reward -- --mock
//! cargo run --release --example custom_reward -- "Tom has 12 marbles and gives away 5. How many are left?"
//! ```
//!
//! `--mock` runs on marco's scripted mock model, where the most likely calculation is wrong
//! (3 + 5 = 9, confidently) and the right one less likely: the confidence reward picks the
//! wrong answer, the verifier the right one. It finishes instantly and needs no download.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use marco::core::mock::{MockModel, Rule, EOS};
use marco::core::{
    ActionGranularity, Budget, ConfidenceReward, LanguageModel, PathView, Problem, Reward, SearchOutcome, SearchPolicy,
    TokenId,
};
use marco::search::{GenerationConfig, Mcts, MctsConfig};

// ───────────────────────────── user code ─────────────────────────────
/// Confidence × the share of "a op b = c" claims that hold (half credit with no claim).
struct ArithmeticVerifier;
impl Reward for ArithmeticVerifier {
    fn score(&self, path: &PathView<'_>) -> marco::core::Result<f64> {
        let checks = claims(path.text);
        let share =
            if checks.is_empty() { 0.5 } else { checks.iter().filter(|c| c.1).count() as f64 / checks.len() as f64 };
        Ok(share * ConfidenceReward::default().score(path)?)
    }
    fn name(&self) -> &str {
        "arithmetic-verifier"
    }
}

/// An action ends with a sentence: at `.`, `!`, `?` or a line break (or after 48 tokens).
struct Sentence;
impl ActionGranularity for Sentence {
    fn is_complete(&self, tokens: &[TokenId], text: &str) -> bool {
        let body = text.trim_start();
        tokens.len() >= 48 || body.trim_end().ends_with(['.', '!', '?']) || body.contains('\n')
    }
    fn describe(&self) -> String {
        "sentence".into()
    }
}

fn verified_mcts(config: MctsConfig) -> Result<Mcts> {
    Ok(Mcts::new(config)?.with_reward(ArithmeticVerifier).with_granularity(Sentence))
}
// ─────────────────────────────────────────────────────────────────────

/// Each "a op b = c" claim in `text` (numbers, op one of `+ - * × /`) and whether it holds.
/// A claim inside a chain ("1 + 2 + 3 = 6") is skipped rather than misread.
fn claims(text: &str) -> Vec<(String, bool)> {
    const OPS: [&str; 5] = ["+", "-", "*", "×", "/"];
    let spaced: String =
        text.chars().flat_map(|c| if "+-*×/=".contains(c) { vec![' ', c, ' '] } else { vec![c] }).collect();
    let words: Vec<&str> = spaced.split_whitespace().map(|w| w.trim_end_matches(['.', ',', '!', '?', ':'])).collect();
    let number = |w: &str| w.trim_start_matches('$').replace(',', "").parse::<f64>().ok();
    let mut found = Vec::new();
    for i in 0..words.len().saturating_sub(4) {
        let w = &words[i..i + 5];
        let chained = (i > 0 && OPS.contains(&words[i - 1])) || words.get(i + 5).is_some_and(|n| OPS.contains(n));
        let (Some(a), Some(b), Some(c)) = (number(w[0]), number(w[2]), number(w[4])) else { continue };
        if w[3] != "=" || chained {
            continue;
        }
        let value = match w[1] {
            "+" => a + b,
            "-" => a - b,
            "*" | "×" => a * b,
            "/" if b != 0.0 => a / b,
            _ => continue,
        };
        found.push((w.join(" "), (value - c).abs() < 1e-6));
    }
    found
}

#[derive(Parser, Debug)]
#[command(about = "MCTS with a user-defined reward (an arithmetic verifier) and a custom action granularity")]
struct Args {
    /// The word problem.
    #[arg(default_value = "Janet has 3 apples and buys 5 more. How many apples does she have now?")]
    question: String,
    /// Run on a scripted mock model (instant, no download) instead of the default model.
    #[arg(long)]
    mock: bool,
    /// Most generated tokens per search.
    #[arg(long, default_value_t = 256)]
    budget_tokens: u64,
    /// MCTS children per expansion.
    #[arg(long, default_value_t = 3)]
    width: usize,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A .gguf file or Hugging Face directory (default: the default model, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
}

/// A mock where the likeliest calculation is wrong and confidently followed through.
fn mock_model() -> Result<MockModel> {
    let wrong = " She buys 5 more, so 3 + 5 = 9.";
    let right = " She buys 5 more, so 3 + 5 = 8.";
    Ok(MockModel::builder()
        .pieces(["Janet starts with 3 apples.", wrong, right, " The answer is 9.", " The answer is 8."])
        .rule(Rule::ends_with("assistant: ").probs([("Janet starts with 3 apples.", 0.95)]))
        .rule(Rule::ends_with("3 apples.").probs([(wrong, 0.6), (right, 0.35)]))
        .rule(Rule::ends_with("= 9.").probs([(" The answer is 9.", 0.97)]))
        .rule(Rule::ends_with("= 8.").probs([(" The answer is 8.", 0.6)]))
        .rule(Rule::ends_with("The answer is 9.").probs([(EOS, 0.97)]))
        .rule(Rule::ends_with("The answer is 8.").probs([(EOS, 0.97)]))
        .build()?)
}

fn run(args: Args) -> Result<()> {
    if args.question.trim().is_empty() {
        bail!("the question is empty");
    }
    if args.budget_tokens == 0 {
        bail!("--budget-tokens must be at least 1");
    }
    if args.width == 0 {
        bail!("--width must be at least 1");
    }
    if let Some(path) = &args.model {
        common::check_model_path(path)?;
    }
    let budget = Budget::tokens(args.budget_tokens);
    let config = MctsConfig::default()
        .with_budget(budget)
        .with_width(args.width)
        .with_generation(GenerationConfig::default().with_seed(args.seed));
    // The same search twice: Marco-o1's confidence reward, then the verifier.
    let confidence_only = Mcts::new(config.clone())?.with_granularity(Sentence);
    let verified = verified_mcts(config)?;

    let mut model: Box<dyn LanguageModel> =
        if args.mock { Box::new(mock_model()?) } else { common::load_model(args.model.as_deref())? };
    let problem = Problem::from_question(model.tokenizer(), &args.question, None)?;
    println!("Question: {}", args.question);
    for (label, policy) in [("confidence reward", &confidence_only), ("arithmetic verifier", &verified)] {
        let mut observer = common::SpinnerObserver::new(label);
        let outcome = policy.search_observed(model.as_mut(), &problem, &mut observer);
        observer.finish();
        show(label, &outcome?);
    }
    Ok(())
}

fn show(label: &str, outcome: &SearchOutcome) {
    let s = &outcome.stats;
    println!(
        "\nMCTS with the {label}: answer {} (value {:.3}; {} nodes, {} tokens, {:.1} s)",
        outcome.answer.as_deref().unwrap_or("(none)"),
        outcome.value,
        s.nodes,
        s.tokens_generated,
        s.elapsed_secs
    );
    let steps = outcome.path.iter().skip(1).map(|id| outcome.tree.node(*id).text.trim()).filter(|t| !t.is_empty());
    for (i, text) in steps.enumerate() {
        println!("  [{}] {text}", i + 1);
    }
    let checks = claims(&outcome.text);
    if checks.is_empty() {
        println!("  claims: none");
    }
    for (claim, holds) in checks {
        println!("  claim {claim}: {}", if holds { "holds" } else { "WRONG" });
    }
}

fn main() -> ExitCode {
    common::run_main(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_checked() {
        let found = claims("So 3 + 5 = 8 apples, and 12-4=9. Then 1 + 2 + 3 = 6 and 6 × 7 = 42.");
        let texts: Vec<(&str, bool)> = found.iter().map(|(c, h)| (c.as_str(), *h)).collect();
        assert_eq!(texts, [("3 + 5 = 8", true), ("12 - 4 = 9", false), ("6 × 7 = 42", true)]);
    }
}
