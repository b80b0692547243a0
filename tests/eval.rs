//! The evaluation harness on a mock-built dataset and a mock model: loading, gold parsing,
//! scoring, resumable results files and the aggregate table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::path::PathBuf;

use marco::eval::{
    answers_match, format_table, gsm8k_gold, load_jsonl, majority_answer, parse_gold, parse_jsonl, run_sample,
    summarize, Dataset, EvalError, EvalRecord, GoldFormat, LoadOptions, Problem, ResultsFile, DEFAULT_SYSTEM_PROMPT,
};
use marco_core::answer::{default_extractor, AnswerExtractor};
use marco_core::mock::{Condition, MockModel, Rule, EOS};
use marco_core::{
    LanguageModel, NodeId, NodeKind, SamplingParams, SearchObserver, SearchOutcome, SearchPolicy, SearchStats,
    StepRequest, StopReason, Tree,
};

/// A scratch directory unique to one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("marco-eval-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const GSM8K_LIKE: &str = r#"{"question":"Janet’s ducks lay 16 eggs per day. She eats 3 and bakes with 4, and sells the rest at $2. How much does she make?","answer":"Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18","idx":0}
{"question":"A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?","answer":"It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3","idx":1}

{"question":"A house costs $80,000 plus $50,000 of repairs; it sells for 2,125 thousand?","answer":"...\n#### 2,125","idx":2}
"#;

#[test]
fn loads_gsm8k_style_jsonl_with_gold_after_the_marker() {
    let problems = parse_jsonl(GSM8K_LIKE, "mini", &LoadOptions::default()).unwrap();
    assert_eq!(problems.len(), 3, "the blank line is skipped");
    assert_eq!(problems[0].id, "0");
    assert_eq!(problems[0].answer, "18");
    assert!(problems[0].question.starts_with("Janet’s ducks"));
    assert_eq!(problems[1].answer, "3");
    assert_eq!(problems[2].answer, "2125", "thousands separators are dropped");
    assert_eq!(problems[2].id, "2");
}

#[test]
fn configurable_fields_plain_golds_and_row_index_ids() {
    let text = "{\"q\":\"What is 6 times 7?\",\"a\":42}\n{\"q\":\"Capital of France?\",\"a\":\" Paris \"}\n";
    let options =
        LoadOptions { question_field: "q".into(), answer_field: "a".into(), id_field: None, gold: GoldFormat::Plain };
    let problems = parse_jsonl(text, "custom", &options).unwrap();
    assert_eq!(
        problems,
        vec![
            Problem { id: "0".into(), question: "What is 6 times 7?".into(), answer: "42".into() },
            Problem { id: "1".into(), question: "Capital of France?".into(), answer: "Paris".into() },
        ]
    );
    // The default field names do not exist in this file: a typed error naming line 1.
    match parse_jsonl(text, "custom", &LoadOptions::default()) {
        Err(EvalError::BadRow { line: 1, message, .. }) => assert!(message.contains("question"), "{message}"),
        other => panic!("expected a BadRow error, got {other:?}"),
    }
}

#[test]
fn bad_rows_are_typed_errors_with_line_numbers() {
    let options = LoadOptions::default();
    for (text, line) in [
        ("{\"question\":\"x\",\"answer\":\"#### 1\"}\nnot json\n", 2),
        ("[1,2]\n", 1),
        ("{\"question\":\"\",\"answer\":\"1\"}\n", 1),
        ("{\"question\":\"x\",\"answer\":\"worked #### \"}\n", 1),
        ("{\"question\":\"x\"}\n", 1),
    ] {
        match parse_jsonl(text, "bad", &options) {
            Err(EvalError::BadRow { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
            other => panic!("{text:?}: expected BadRow, got {other:?}"),
        }
    }
    assert!(matches!(parse_gold("#### 12", GoldFormat::Gsm8k), Some(ref g) if g == "12"));
    assert_eq!(parse_gold("no marker", GoldFormat::Gsm8k), None);
    assert_eq!(parse_gold("   ", GoldFormat::Plain), None);
}

#[test]
fn load_jsonl_limits_and_refuses_duplicates_and_empty_files() {
    let dir = scratch("load");
    let path = dir.join("mini.jsonl");
    std::fs::write(&path, GSM8K_LIKE).unwrap();
    let two = load_jsonl(&path, &LoadOptions::default(), Some(2)).unwrap();
    assert_eq!(two.iter().map(|p| p.answer.as_str()).collect::<Vec<_>>(), ["18", "3"]);
    let dup = dir.join("dup.jsonl");
    std::fs::write(
        &dup,
        "{\"question\":\"a\",\"answer\":\"1\",\"idx\":5}\n{\"question\":\"b\",\"answer\":\"2\",\"idx\":5}\n",
    )
    .unwrap();
    assert!(matches!(load_jsonl(&dup, &LoadOptions::default(), None), Err(EvalError::BadRow { line: 2, .. })));
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert!(matches!(load_jsonl(&empty, &LoadOptions::default(), None), Err(EvalError::EmptyDataset(_))));
    assert!(matches!(load_jsonl(&dir.join("missing.jsonl"), &LoadOptions::default(), None), Err(EvalError::Io { .. })));
}

#[test]
fn gold_parsing_and_numeric_matching() {
    assert_eq!(gsm8k_gold("so 5 + 5 = 10\n#### 10"), Some("10".into()));
    assert_eq!(gsm8k_gold("#### 1,450,000"), Some("1450000".into()));
    assert_eq!(gsm8k_gold("#### -3"), Some("-3".into()));
    assert_eq!(gsm8k_gold("#### 0.50"), Some("0.5".into()));
    assert!(answers_match("1,000.00", "1000"));
    assert!(answers_match("$18", "18"));
    assert!(answers_match("The answer is 0.5.", "0.50"));
    assert!(answers_match("-3", "-3"));
    assert!(!answers_match("3", "-3"));
    assert!(!answers_match("18.5", "18"));
    assert!(!answers_match("no number here", "18"));
    assert!(answers_match("PARIS", "paris"));
    assert!(!answers_match("London", "Paris"));
}

#[test]
fn dataset_names_parse() {
    assert_eq!("gsm8k".parse::<Dataset>().unwrap(), Dataset::Gsm8k);
    assert_eq!("MGSM-en".parse::<Dataset>().unwrap(), Dataset::MgsmEn);
    assert_eq!(Dataset::MgsmEn.row_limit(), Some(250));
    assert_eq!("data/x.jsonl".parse::<Dataset>().unwrap(), Dataset::Jsonl("data/x.jsonl".into()));
    assert!(matches!("gsm9k".parse::<Dataset>(), Err(EvalError::UnknownDataset(_))));
}

/// A minimal greedy decoder written for this test, so that `run_sample` runs a real
/// search against the mock model (the workspace's own policies are tested in marco-search).
struct TestGreedy {
    max_tokens: usize,
}

impl SearchPolicy for TestGreedy {
    fn name(&self) -> String {
        format!("test-greedy(max_tokens={})", self.max_tokens)
    }

    fn search_observed(
        &self,
        model: &mut dyn LanguageModel,
        problem: &marco_core::Problem,
        _observer: &mut dyn SearchObserver,
    ) -> marco_core::Result<SearchOutcome> {
        let start = model.counters();
        let seq = model.new_sequence(&problem.prompt_tokens)?;
        let mut tokens = Vec::new();
        let mut steps = Vec::new();
        let mut terminal = false;
        while tokens.len() < self.max_tokens {
            let out = model.step(&[StepRequest::new(seq, SamplingParams::greedy())])?.remove(0);
            let stop = model.tokenizer().is_stop(out.token);
            tokens.push(out.token);
            steps.push(out);
            if stop {
                terminal = true;
                break;
            }
        }
        model.release(seq)?;
        let text = model.tokenizer().decode(&tokens, true)?;
        let mut tree = Tree::new(problem.prompt_tokens.clone(), problem.prompt_text.clone());
        let leaf = tree.add_child(NodeId::ROOT, NodeKind::Action, tokens.clone(), steps, text.clone());
        tree.node_mut(leaf).terminal = terminal;
        tree.backpropagate(leaf, 1.0);
        let stats = SearchStats {
            nodes: tree.len(),
            rollouts: 1,
            tokens_generated: tokens.len() as u64,
            tokens_computed: 0,
            distinct_tokens: tree.distinct_tokens(),
            kv_bytes_in_use: 0,
            kv_bytes_per_token: 0,
            elapsed_secs: 0.0,
            stop_reason: if terminal { StopReason::Completed } else { StopReason::TokenBudget },
        }
        .with_model_counters(&start, &model.counters());
        Ok(SearchOutcome {
            policy: self.name(),
            answer: default_extractor().extract(&text),
            text,
            path: tree.path(leaf),
            value: 1.0,
            stats,
            tree,
        })
    }
}

/// A mock model that answers the duck question right (18) and the robe question wrong (7).
fn scripted_model() -> MockModel {
    let prompt_end = "assistant: ";
    MockModel::builder()
        .pieces(["The answer is 18.", "The answer is 7."])
        .rule(
            Rule::when(Condition::All(vec![
                Condition::Contains("ducks".into()),
                Condition::EndsWith(prompt_end.into()),
            ]))
            .probs([("The answer is 18.", 0.9)]),
        )
        .rule(
            Rule::when(Condition::All(vec![
                Condition::Contains("robe".into()),
                Condition::EndsWith(prompt_end.into()),
            ]))
            .probs([("The answer is 7.", 0.9)]),
        )
        .rule(Rule::ends_with(".").probs([(EOS, 0.95)]))
        .build()
        .unwrap()
}

/// The mock vocabulary is ASCII: the dataset's questions are made ASCII for it.
fn ascii_problems() -> Vec<Problem> {
    parse_jsonl(GSM8K_LIKE, "mini", &LoadOptions::default())
        .unwrap()
        .into_iter()
        .take(2)
        .map(|p| Problem { question: p.question.replace('’', "'"), ..p })
        .collect()
}

#[test]
fn run_sample_scores_a_real_search_on_the_mock_model() {
    let mut model = scripted_model();
    let policy = TestGreedy { max_tokens: 16 };
    let problems = ascii_problems();
    let right = run_sample(&mut model, &policy, "greedy", 0, &problems[0], Some(DEFAULT_SYSTEM_PROMPT)).unwrap();
    assert_eq!(right.text, "The answer is 18.");
    assert_eq!(right.predicted.as_deref(), Some("18"));
    assert!(right.correct);
    assert_eq!(right.gold, "18");
    assert_eq!(right.tokens_generated, 2, "the answer piece and the stop token");
    assert!(right.tokens_computed > right.tokens_generated, "the prompt is computed too");
    assert_eq!(right.nodes, 2);
    assert_eq!(right.policy_config, "test-greedy(max_tokens=16)");
    assert_eq!(right.stop_reason, Some(StopReason::Completed));
    let wrong = run_sample(&mut model, &policy, "greedy", 0, &problems[1], None).unwrap();
    assert_eq!(wrong.predicted.as_deref(), Some("7"));
    assert!(!wrong.correct);

    // A problem the mock tokenizer cannot encode is the problem's failure: a wrong sample.
    let unencodable = Problem { id: "u".into(), question: "combien coûte-t-il ?".into(), answer: "1".into() };
    let failed = run_sample(&mut model, &policy, "greedy", 0, &unencodable, None).unwrap();
    assert!(!failed.correct && failed.error.is_some() && failed.predicted.is_none());
}

/// A policy whose model side breaks: the error is returned, not recorded as a wrong answer.
struct Broken;

impl SearchPolicy for Broken {
    fn name(&self) -> String {
        "broken".into()
    }
    fn search_observed(
        &self,
        _model: &mut dyn LanguageModel,
        _problem: &marco_core::Problem,
        _observer: &mut dyn SearchObserver,
    ) -> marco_core::Result<SearchOutcome> {
        Err(marco_core::Error::backend(std::io::Error::other("device lost")))
    }
}

#[test]
fn backend_failures_abort_instead_of_counting_as_wrong() {
    let mut model = scripted_model();
    let problems = ascii_problems();
    match run_sample(&mut model, &Broken, "broken", 0, &problems[0], None) {
        Err(EvalError::Search { policy, problem_id, .. }) => {
            assert_eq!((policy.as_str(), problem_id.as_str()), ("broken", "0"))
        }
        other => panic!("expected a Search error, got {other:?}"),
    }
}

fn record(problem: &str, policy: &str, sample: u32, predicted: Option<&str>, gold: &str, value: f64) -> EvalRecord {
    EvalRecord {
        problem_id: problem.into(),
        policy: policy.into(),
        policy_config: format!("{policy}(test)"),
        sample,
        gold: gold.into(),
        predicted: predicted.map(str::to_string),
        correct: predicted.is_some_and(|p| answers_match(p, gold)),
        value,
        tokens_generated: 10 * (sample as u64 + 1),
        tokens_computed: 100,
        nodes: 3,
        seconds: 0.5,
        stop_reason: Some(StopReason::Completed),
        error: None,
        text: String::new(),
    }
}

#[test]
fn resumable_results_file_skips_what_it_holds() {
    let dir = scratch("resume");
    let path = dir.join("results.jsonl");
    let mut results = ResultsFile::open(&path).unwrap();
    assert!(results.records().is_empty());
    results.append(record("0", "mcts", 0, Some("18"), "18", 0.9)).unwrap();
    results.append(record("1", "mcts", 0, Some("7"), "3", 0.4)).unwrap();
    drop(results);

    // A crash in the middle of a write leaves a partial last line without a newline.
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"problem_id\":\"2\",\"pol").unwrap();
    drop(f);

    let mut results = ResultsFile::open(&path).unwrap();
    assert_eq!(results.records().len(), 2);
    assert_eq!(results.skipped_lines(), 1);
    assert!(results.contains("0", "mcts", 0));
    assert!(results.contains("1", "mcts", 0));
    assert!(!results.contains("0", "mcts", 1), "another sample of the same problem is not done");
    assert!(!results.contains("0", "greedy", 0), "another policy is not done");
    assert!(!results.contains("2", "mcts", 0), "the cut-off record is redone");
    results.append(record("2", "mcts", 0, Some("5"), "5", 0.7)).unwrap();
    drop(results);

    let reopened = ResultsFile::open(&path).unwrap();
    assert_eq!(reopened.records().len(), 3, "the record after the cut-off line starts on its own line");
    assert_eq!(reopened.records()[2].problem_id, "2");
    assert_eq!(reopened.records()[0], record("0", "mcts", 0, Some("18"), "18", 0.9), "records round-trip");
}

#[test]
fn summary_accuracy_test_at_k_and_majority_vote() {
    // Policy "mcts", k = 3, two problems:
    //  p0 (gold 18): 18, 18, 7   -> 2 of 3 right, any right, majority 18 right
    //  p1 (gold 3):  5, 3, 5     -> 1 of 3 right, any right, majority 5 wrong
    // Policy "greedy", k = 1:
    //  p0: 18 right; p1: no answer
    let records = vec![
        record("p0", "mcts", 0, Some("18"), "18", 0.9),
        record("p0", "greedy", 0, Some("18"), "18", 0.8),
        record("p0", "mcts", 1, Some("18"), "18", 0.5),
        record("p0", "mcts", 2, Some("7"), "18", 0.95),
        record("p1", "mcts", 0, Some("5"), "3", 0.2),
        record("p1", "mcts", 1, Some("3"), "3", 0.9),
        record("p1", "mcts", 2, Some("5.0"), "3", 0.3),
        record("p1", "greedy", 0, None, "3", 0.1),
    ];
    let summaries = summarize(&records);
    assert_eq!(summaries.len(), 2);
    let mcts = &summaries[0];
    assert_eq!((mcts.policy.as_str(), mcts.problems, mcts.samples, mcts.k), ("mcts", 2, 6, 3));
    assert!((mcts.accuracy - 3.0 / 6.0).abs() < 1e-12);
    assert!((mcts.test_at_k - 1.0).abs() < 1e-12);
    assert!((mcts.majority_accuracy - 0.5).abs() < 1e-12);
    // Tokens: samples 0,1,2 generate 10, 20, 30 -> 60 per problem.
    assert!((mcts.tokens_per_problem - 60.0).abs() < 1e-12);
    assert!((mcts.computed_per_problem - 300.0).abs() < 1e-12);
    assert!((mcts.seconds_per_problem - 1.5).abs() < 1e-12);
    let greedy = &summaries[1];
    assert_eq!((greedy.problems, greedy.samples, greedy.k), (2, 2, 1));
    assert!((greedy.accuracy - 0.5).abs() < 1e-12);
    assert!((greedy.test_at_k - 0.5).abs() < 1e-12);
    assert!((greedy.majority_accuracy - 0.5).abs() < 1e-12);
    assert!((greedy.answered - 0.5).abs() < 1e-12);
    assert!((greedy.tokens_per_problem - 10.0).abs() < 1e-12);
}

#[test]
fn majority_ties_go_to_the_larger_summed_value() {
    let a = record("p", "beam", 0, Some("4"), "4", 0.2);
    let b = record("p", "beam", 1, Some("9"), "4", 0.7);
    assert_eq!(majority_answer(&[&a, &b]).as_deref(), Some("9"));
    let c = record("p", "beam", 2, Some("4.0"), "4", 0.1);
    assert_eq!(majority_answer(&[&a, &b, &c]).as_deref(), Some("4"), "4 and 4.0 are one vote");
    let none = record("p", "beam", 0, None, "4", 0.9);
    assert_eq!(majority_answer(&[&none]), None);
}

#[test]
fn table_is_aligned_and_holds_every_policy() {
    let records = vec![
        record("p0", "greedy", 0, Some("18"), "18", 0.8),
        record("p1", "greedy", 0, Some("1"), "3", 0.8),
        record("p0", "mcts-with-a-long-label", 0, Some("18"), "18", 0.8),
    ];
    let table = format_table(&summarize(&records));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("policy") && lines[0].contains("test@k") && lines[0].contains("s/prob"));
    assert!(lines[2].starts_with("greedy ") && lines[2].contains("50.0%"));
    assert!(lines[3].starts_with("mcts-with-a-long-label") && lines[3].contains("100.0%"));
    // Right-aligned columns: every row's "accuracy" cell ends where the header's does.
    let header_end = lines[0].find("accuracy").unwrap() + "accuracy".len();
    for line in &lines[2..] {
        let cell_end = line[..header_end].trim_end().len();
        assert_eq!(cell_end, header_end, "{table}");
        assert!(line[..header_end].ends_with('%'), "{table}");
    }
}

#[test]
fn gsm8k_and_mgsm_en_come_from_the_pinned_wheel_and_parse_completely() {
    // Fetched through marco's own fetch code (pip, checksum-verified, cached after the first run).
    let mut events = Vec::new();
    let gsm8k = Dataset::Gsm8k.load(&LoadOptions::default(), None, &mut |e| events.push(e)).unwrap();
    assert_eq!(gsm8k.len(), marco::eval::GSM8K_ROWS);
    assert_eq!(gsm8k[0].answer, "18");
    assert!(gsm8k[0].question.starts_with("Janet"));
    assert_eq!((gsm8k[0].id.as_str(), gsm8k[1318].id.as_str()), ("0", "1318"));
    // Every gold is an integer (14 of them written with thousands separators in the file).
    assert!(gsm8k.iter().all(|p| p.answer.trim_start_matches('-').chars().all(|c| c.is_ascii_digit())));
    assert!(gsm8k.iter().any(|p| p.answer == "1450000"));
    let mgsm = Dataset::MgsmEn.load(&LoadOptions::default(), None, &mut |_| {}).unwrap();
    assert_eq!(mgsm.len(), marco::eval::MGSM_EN_ROWS);
    assert_eq!(mgsm[..], gsm8k[..250]);
    let five = Dataset::MgsmEn.load(&LoadOptions::default(), Some(5), &mut |_| {}).unwrap();
    assert_eq!(five[..], gsm8k[..5]);
    // The pins agree with marco-model's.
    assert_eq!(marco::eval::GSM8K_SHA256, marco::model::fetch::GSM8K_TEST_SHA256);
    assert_eq!(marco::eval::GSM8K_MEMBER, marco::model::fetch::GSM8K_TEST_MEMBER);
    assert_eq!(marco::eval::GSM8K_WHEEL, marco::model::fetch::GSM8K_PACKAGE);
}
