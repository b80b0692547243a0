//! Colloquial Chinese → English with search and reflection, after the Marco-o1 article's
//! example: 这双鞋有一种踩屎感 ("these shoes feel like stepping on poop", slang for a soft,
//! comfortable sole) should become something like "This shoe has a comfortable sole".
//!
//! ```text
//! cargo run --release --example translate
//! cargo run --release --example translate -- "这个电影太上头了" --rounds 2 --width 4
//! ```
//!
//! Three searches run on the same request and every candidate they finish is shown with its
//! confidence (the mean probability share of the chosen tokens among the top 5, Marco-o1's
//! reward):
//! 1. a greedy translation, then `--rounds` times Marco-o1's reflection ("Wait! Maybe I made
//!    some mistakes! I need to rethink from scratch.") as the next chat turn and another one;
//! 2. beam search over mini-steps, ranked by confidence;
//! 3. MCTS with the confidence reward; its pick is the finished translation of highest value.
//!
//! The default model has 135M parameters and was trained mostly on English: expect literal,
//! often wrong translations. The point is to see the candidates and how confident the model
//! is in each, not to get a good translation from a tiny model.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use marco::core::{
    AnswerExtractor, Budget, ChatMessage, ConfidenceReward, Granularity, LanguageModel, NodeId, Problem, SearchOutcome,
    SearchPolicy, StepOutput, TokenId,
};
use marco::search::{
    BeamConfig, BeamSearch, GenerationConfig, GreedyConfig, GreedyReflection, Mcts, MctsAnswerRule, MctsConfig,
    MARCO_REFLECTION,
};

/// The article's example and its reference translation.
const ARTICLE_SOURCE: &str = "这双鞋有一种踩屎感";
const ARTICLE_REFERENCE: &str = "This shoe has a comfortable sole.";

/// The request before the text. (A system prompt asking for "natural, idiomatic English
/// only" made the 135M model's output worse than this plain request.)
const INSTRUCTION: &str = "Translate into English:";

#[derive(Parser, Debug)]
#[command(about = "Translate colloquial Chinese into English with search and reflection; show every candidate")]
struct Args {
    /// The Chinese text.
    #[arg(default_value = ARTICLE_SOURCE)]
    text: String,
    /// Reflection rounds after the first greedy translation.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Beam width and MCTS children per expansion.
    #[arg(long, default_value_t = 3)]
    width: usize,
    /// Most generated tokens per search.
    #[arg(long, default_value_t = 192)]
    budget_tokens: u64,
    /// What one tree edge is for beam search and MCTS: token, mini-step:N, line or step.
    #[arg(long, default_value = "mini-step:4")]
    granularity: Granularity,
    /// Sampling temperature of beam search and MCTS.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A .gguf file or Hugging Face directory (default: the default model, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    remote: common::RemoteArgs,
}

/// A translation's "answer" is its first non-empty line, without quotes: it lets the
/// policies' votes and the candidate lists compare translations.
struct FirstLine;

impl AnswerExtractor for FirstLine {
    fn extract(&self, text: &str) -> Option<String> {
        let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
        let line = line.trim_matches(|c: char| c == '"' || c == '“' || c == '”' || c == '\'').trim();
        (!line.is_empty()).then(|| line.to_string())
    }
}

fn run(args: Args) -> Result<()> {
    if args.text.trim().is_empty() {
        bail!("the text to translate is empty");
    }
    if args.width == 0 {
        bail!("--width must be at least 1");
    }
    if args.budget_tokens == 0 {
        bail!("--budget-tokens must be at least 1");
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be a finite number >= 0, got {}", args.temperature);
    }
    if let Some(path) = &args.model {
        common::check_model_path(path)?;
    }
    let budget = Budget::tokens(args.budget_tokens);
    let sampled = GenerationConfig::default()
        .with_granularity(args.granularity.clone())
        .with_temperature(args.temperature)
        .with_seed(args.seed)
        .with_max_depth(32);
    let searches: Vec<(&str, Box<dyn SearchPolicy>)> = vec![
        (
            "beam search",
            Box::new(
                BeamSearch::new(
                    BeamConfig::default()
                        .with_budget(budget)
                        .with_generation(sampled.clone())
                        .with_beam_width(args.width),
                )?
                .with_extractor(FirstLine),
            ),
        ),
        (
            "MCTS",
            Box::new(
                Mcts::new(
                    MctsConfig::default()
                        .with_budget(budget)
                        .with_generation(sampled)
                        .with_width(args.width)
                        .with_answer_rule(MctsAnswerRule::BestValue),
                )?
                .with_extractor(FirstLine),
            ),
        ),
    ];

    let mut model: Box<dyn LanguageModel> =
        common::load_any(args.model.as_deref(), marco::model::LoadOptions::default(), &args.remote)?;
    println!("Source: {}", args.text);
    if args.text == ARTICLE_SOURCE {
        println!("Reference (Marco-o1 article): {ARTICLE_REFERENCE}");
    }
    let request = ChatMessage::user(format!("{INSTRUCTION} {}", args.text));
    reflection_rounds(model.as_mut(), &request, &args)?;

    let problem = Problem::from_raw(
        model.tokenizer(),
        &model.tokenizer().apply_chat_template(std::slice::from_ref(&request), true)?,
    )?;
    for (label, policy) in &searches {
        let mut observer = common::SpinnerObserver::new(label);
        let outcome = policy.search_observed(model.as_mut(), &problem, &mut observer);
        observer.finish();
        let outcome = outcome.with_context(|| format!("{label} failed"))?;
        print_candidates(model.as_ref(), label, &outcome)?;
    }
    Ok(())
}

/// Greedy translation, then `--rounds` times Marco-o1's reflection prompt as the next user
/// turn of the chat, and another greedy translation. (A chat model reads a reflection best
/// as a turn of its own: appended right after its end-of-turn token it tends to stop at once.)
fn reflection_rounds(model: &mut dyn LanguageModel, request: &ChatMessage, args: &Args) -> Result<()> {
    let greedy = GreedyReflection::new(
        GreedyConfig::default()
            .with_budget(Budget::tokens(args.budget_tokens))
            .with_generation(GenerationConfig::default().with_granularity(Granularity::line()).with_temperature(0.0))
            .with_rounds(0),
    )?
    .with_extractor(FirstLine);
    println!("\ngreedy translation, then {} reflection round(s):", args.rounds);
    let mut chat = vec![request.clone()];
    for round in 0..=args.rounds {
        let prompt = model.tokenizer().apply_chat_template(&chat, true)?;
        let problem = Problem::from_raw(model.tokenizer(), &prompt)?;
        let outcome = greedy.search(model, &problem).with_context(|| format!("reflection round {round} failed"))?;
        let tokens: Vec<TokenId> =
            outcome.path.iter().skip(1).flat_map(|&n| outcome.tree.node(n).tokens.iter().copied()).collect();
        let text = model.tokenizer().decode(&tokens, true)?;
        let translation = FirstLine.extract(&text).unwrap_or_default();
        println!(
            "  round {round}: confidence {:.3}  {}",
            outcome.value,
            if translation.is_empty() { "(empty)".to_string() } else { common::truncate(&translation, 160) }
        );
        chat.push(ChatMessage::assistant(text.trim()));
        chat.push(ChatMessage::user(format!("{MARCO_REFLECTION} {INSTRUCTION} {}", args.text)));
    }
    Ok(())
}

/// One finished translation and the mean confidence of the tokens the model chose for it.
struct Candidate {
    text: String,
    confidence: f64,
    chosen: bool,
}

/// The distinct finished translations in the tree, most confident first. Texts are decoded
/// from each path's tokens at once, so characters split across tree edges come out whole.
fn candidates(model: &dyn LanguageModel, outcome: &SearchOutcome) -> Result<Vec<Candidate>> {
    let tree = &outcome.tree;
    let chosen_leaf = outcome.path.last().copied();
    let reward = ConfidenceReward::default();
    let mut found: Vec<Candidate> = Vec::new();
    for leaf in tree.terminal_nodes() {
        let path: Vec<NodeId> = tree.path(leaf).into_iter().skip(1).collect();
        let tokens: Vec<TokenId> = path.iter().flat_map(|&n| tree.node(n).tokens.iter().copied()).collect();
        let steps: Vec<StepOutput> = path.iter().flat_map(|&n| tree.node(n).steps.iter().cloned()).collect();
        let Some(text) = FirstLine.extract(&model.tokenizer().decode(&tokens, true)?) else { continue };
        let confidence = reward.mean_confidence(&steps)?;
        let chosen = chosen_leaf == Some(leaf);
        match found.iter_mut().find(|c| c.text == text) {
            Some(same) => {
                same.chosen |= chosen;
                same.confidence = same.confidence.max(confidence);
            }
            None => found.push(Candidate { text, confidence, chosen }),
        }
    }
    found.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    Ok(found)
}

fn print_candidates(model: &dyn LanguageModel, label: &str, outcome: &SearchOutcome) -> Result<()> {
    let s = &outcome.stats;
    println!(
        "\n{label}: {} nodes, {} tokens, {:.1} s, stop: {:?}; finished candidates (▶ = chosen):",
        s.nodes, s.tokens_generated, s.elapsed_secs, s.stop_reason
    );
    let found = candidates(model, outcome)?;
    if found.is_empty() {
        println!("  (no finished translation within the budget)");
    }
    for c in &found {
        println!(
            "  {} confidence {:.3}  {}",
            if c.chosen { "▶" } else { " " },
            c.confidence,
            common::truncate(&c.text, 160)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    common::run_main(run)
}
