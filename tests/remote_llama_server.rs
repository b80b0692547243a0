//! The remote backend against a real llama-server serving the default model
//! (`scripts/llama-server.sh`; `.ci/run` starts one and sets `MARCO_LLAMA_SERVER_URL`).
//! Without that variable the tests say so and pass, except under CI, where they fail.
#![cfg(all(feature = "remote", feature = "cpu"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use marco::core::{
    ActionEnd, Budget, ExtendRequest, Granularity, LanguageModel, NodeId, Problem, SamplingParams, SearchOutcome,
    SearchPolicy, StepRequest,
};
use marco::remote::{RemoteConfig, RemoteError, RemoteLm, ServerKind, TokenizerSource};
use marco::search::{GenerationConfig, GreedyConfig, GreedyReflection, Mcts, MctsConfig};

/// One test at a time talks to the server: its prompt cache holds one search's states, and the
/// recompute test measures exactly that.
static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The server's URL, and the right to use it until the guard drops.
fn server_url() -> Option<(String, std::sync::MutexGuard<'static, ()>)> {
    match std::env::var("MARCO_LLAMA_SERVER_URL") {
        Ok(url) if !url.is_empty() => Some((url, SERVER.lock().unwrap_or_else(|e| e.into_inner()))),
        _ => {
            assert!(std::env::var_os("CI").is_none(), "CI must start llama-server and set MARCO_LLAMA_SERVER_URL");
            eprintln!("MARCO_LLAMA_SERVER_URL is not set: start scripts/llama-server.sh to run this test");
            None
        }
    }
}

fn default_model() -> std::path::PathBuf {
    marco::model::fetch::default_model_path().expect("the default model can be fetched")
}

fn remote(url: &str) -> RemoteLm {
    RemoteLm::connect(RemoteConfig::new(url), TokenizerSource::File(default_model())).unwrap()
}

#[derive(serde::Deserialize)]
struct Oracle {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    text: String,
    token_ids: Vec<u32>,
}

fn oracle() -> Oracle {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("marco-model/tests/data/llamacpp/smollm2-135m-instruct-q4_1.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn connects_and_tokenizes_like_the_server() {
    let Some((url, _server)) = server_url() else { return };
    let lm = remote(&url);
    assert_eq!(lm.server_kind(), ServerKind::LlamaCpp);
    assert!(lm.max_context() >= 1024, "context {}", lm.max_context());
    for case in oracle().cases {
        assert_eq!(lm.server_tokenize(&case.text).unwrap(), case.token_ids, "{}", case.name);
        lm.check_tokenizer(&case.text).unwrap();
    }
}

/// The server's own tokenizer (no file): the same tokens, texts, stop token and chat prompt
/// as the model's file, and the same search.
#[test]
fn the_servers_own_tokenizer_is_the_files() {
    let Some((url, _server)) = server_url() else { return };
    let mut by_file = remote(&url);
    let mut by_server = RemoteLm::connect(RemoteConfig::new(url), TokenizerSource::Server).unwrap();
    let (file, server) = (by_file.tokenizer(), by_server.tokenizer());
    assert_eq!(server.vocab_size(), file.vocab_size());
    assert!(!server.stop_tokens().is_empty());
    assert!(server.stop_tokens().iter().all(|t| file.stop_tokens().contains(t)), "{:?}", server.stop_tokens());
    for case in oracle().cases {
        assert_eq!(server.encode(&case.text, true).unwrap(), case.token_ids, "{}", case.name);
        for skip in [false, true] {
            assert_eq!(
                server.decode(&case.token_ids, skip).unwrap(),
                file.decode(&case.token_ids, skip).unwrap(),
                "{} skip_special {skip}",
                case.name
            );
        }
    }
    let question = "Janet has 3 apples and buys 5 more. How many apples does she have now?";
    let a = Problem::from_question(file, question, None).unwrap();
    let b = Problem::from_question(server, question, None).unwrap();
    assert_eq!(a, b);
    let x = greedy(48).search(&mut by_file, &a).unwrap();
    let y = greedy(48).search(&mut by_server, &b).unwrap();
    assert_eq!(x.text, y.text);
    assert_eq!(canonical(&x), canonical(&y));
}

#[test]
fn a_foreign_tokenizer_is_refused() {
    let Some((url, _server)) = server_url() else { return };
    let foreign = Path::new(env!("CARGO_MANIFEST_DIR")).join("marco-model/tests/data/tiny-llama/tokenizer.json");
    let err = RemoteLm::connect(RemoteConfig::new(url), TokenizerSource::File(foreign)).unwrap_err();
    assert!(matches!(err, RemoteError::TokenizerMismatch { .. }), "{err}");
}

#[test]
fn a_server_that_is_not_running_is_named() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = RemoteLm::connect(RemoteConfig::new(url.clone()), TokenizerSource::File(default_model())).unwrap_err();
    assert!(matches!(err, RemoteError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
}

/// The server's log-probabilities against marco's in-process ones on the same tokens: the
/// server generates greedily, marco feeds the same tokens (teacher forcing) and compares the
/// server's top-5 at every step, as the llama.cpp oracle test does.
#[test]
fn remote_logprobs_agree_with_in_process() {
    let Some((url, _server)) = server_url() else { return };
    let mut server = remote(&url);
    let mut local = marco::model::load::<marco::Cpu>(&default_model(), &Default::default()).unwrap();
    let (mut decisive, mut flips, mut diff_sum, mut diff_count) = (0usize, Vec::new(), 0.0f64, 0usize);
    for case in oracle().cases {
        let s = server.new_sequence(&case.token_ids).unwrap();
        let l = local.new_sequence(&case.token_ids).unwrap();
        for i in 0..24 {
            let theirs = server.step(&[StepRequest::new(s, SamplingParams::greedy())]).unwrap().remove(0);
            let row = log_softmax(&local.pending_logits(l).unwrap());
            let ours = local
                .step(&[StepRequest { force: Some(theirs.token), ..StepRequest::new(l, SamplingParams::greedy()) }])
                .unwrap()
                .remove(0);
            for t in &theirs.top {
                diff_sum += (row[t.token as usize] - t.logprob as f64).abs();
                diff_count += 1;
            }
            if theirs.top.len() >= 2 && theirs.top[0].logprob - theirs.top[1].logprob > 0.2 {
                decisive += 1;
                if ours.top[0].token != theirs.top[0].token {
                    flips.push(format!("{} step {i}", case.name));
                }
            }
            if server.tokenizer().is_stop(theirs.token) {
                break;
            }
        }
        server.release(s).unwrap();
        local.release(l).unwrap();
    }
    let mean = diff_sum / diff_count.max(1) as f64;
    eprintln!("{decisive} decisive steps, top-1 flips {flips:?}, mean |Δ logprob| over the top-5 {mean:.4}");
    assert!(decisive > 100, "{decisive} decisive steps");
    assert!(mean <= 0.105, "mean |Δ logprob| {mean}");
    assert!(flips.len() <= 8, "top-1 flips at decisive steps: {flips:?}");
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn greedy(budget: u64) -> GreedyReflection {
    GreedyReflection::new(
        GreedyConfig::default()
            .with_budget(Budget::tokens(budget))
            .with_generation(GenerationConfig::default().with_granularity(Granularity::line()).with_temperature(0.0))
            .with_rounds(0),
    )
    .unwrap()
}

/// Greedy search over the server and in-process on the 10 oracle prompts, 96 tokens each.
/// How the server is asked does not matter (`actions_give_the_tokens_of_one_request`); the
/// engines' arithmetic does: both quantize activations to 8 bits in their own summation orders
/// (0.1 nats apart per step, `remote_logprobs_agree_with_in_process`), so a greedy path
/// follows the other until a near tie and may part there. llama.cpp itself on another CPU (the
/// oracle's) parts from this one within 13 tokens on 6 of the 10 prompts. Measured: 8 of 10
/// same answers (`raw-digits` and `raw-unicode` part and end on other numbers); the goal is 9.
#[test]
fn greedy_search_matches_in_process_on_the_oracle_prompts() {
    let Some((url, _server)) = server_url() else { return };
    let mut server = remote(&url);
    let mut local = marco::model::load::<marco::Cpu>(&default_model(), &Default::default()).unwrap();
    let (mut same_answer, mut same_text, mut differ) = (0, 0, Vec::new());
    for case in oracle().cases {
        let problem = Problem::from_raw(local.tokenizer(), &case.text).unwrap();
        let a = greedy(96).search(&mut server, &problem).unwrap();
        let b = greedy(96).search(&mut local, &problem).unwrap();
        assert!(a.stats.tokens_generated > 0);
        same_answer += usize::from(a.answer == b.answer);
        same_text += usize::from(a.text == b.text);
        if a.text != b.text {
            differ.push((case.name.clone(), a.text.clone(), b.text.clone()));
        }
        assert_eq!(server.counters().live_sequences, 0);
    }
    eprintln!("same answer {same_answer}/10, same text {same_text}/10; differing: {differ:#?}");
    assert!(same_answer >= 8, "same answer on {same_answer} of 10: {differ:#?}");
}

fn canonical(o: &SearchOutcome) -> Vec<Vec<u32>> {
    let mut paths: Vec<Vec<u32>> = (1..o.tree.len()).map(|i| o.tree.path_tokens(NodeId(i as u32))).collect();
    paths.sort();
    paths
}

/// MCTS with mini-steps of 32 over the server: one request per action, and the server's
/// prompt cache keeps what the tree shares (recompute ratio at most 1.05).
#[test]
fn mcts_over_the_server_computes_each_token_about_once() {
    let Some((url, _server)) = server_url() else { return };
    let mut server = remote(&url);
    // A system prompt no earlier request sent (the process id and the time), so the server's
    // cache holds nothing of this search when it starts.
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let system = format!("Session {} {nonce}. Answer briefly.", std::process::id());
    let problem = Problem::from_question(
        server.tokenizer(),
        "Janet has 3 apples and buys 5 more. How many apples does she have now?",
        Some(&system),
    )
    .unwrap();
    let mcts = Mcts::new(
        MctsConfig::default()
            .with_budget(Budget::tokens(1500))
            .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(32)).with_seed(0))
            .with_width(3),
    )
    .unwrap();
    let before = server.stats();
    let o = mcts.search(&mut server, &problem).unwrap();
    let stats = server.stats();
    let requests = stats.requests - before.requests;
    eprintln!(
        "nodes {} generated {} computed {} distinct {} recompute {:.3} requests {requests} trimmed {}",
        o.stats.nodes,
        o.stats.tokens_generated,
        o.stats.tokens_computed,
        o.stats.distinct_tokens,
        o.stats.recompute_ratio(),
        stats.tokens_trimmed
    );
    assert_eq!(o.stats.tokens_generated, 1500);
    // Every prompt token and every generated token computed at least once, and little more.
    assert!(
        o.stats.recompute_ratio() >= 0.99,
        "recompute {:.3}: counted less than computed",
        o.stats.recompute_ratio()
    );
    assert!(o.stats.recompute_ratio() <= 1.05, "recompute {:.3}", o.stats.recompute_ratio());
    // One request per action (a mini-step of 32): far fewer than one per token.
    assert!(requests * 8 <= o.stats.tokens_generated, "{requests} requests for {} tokens", o.stats.tokens_generated);
    assert_eq!(server.counters().live_sequences, 0);
    assert!(canonical(&o).len() > 10);
}

/// Cutting a greedy generation into actions (lines, mini-steps of 4, each its own request,
/// trimmed and continued on marco's side) gives the tokens of one long request: the tree
/// gains or loses nothing by how the server is asked.
#[test]
fn actions_give_the_tokens_of_one_request() {
    let Some((url, _server)) = server_url() else { return };
    let mut server = remote(&url);
    for case in oracle().cases {
        let n = 32;
        let mut generate = |granularity: Granularity| -> Vec<u32> {
            let seq = server.new_sequence(&case.token_ids).unwrap();
            let mut out = Vec::new();
            while out.len() < n {
                let request = ExtendRequest::new(seq, SamplingParams::greedy(), n - out.len());
                let action = server.extend(&[request], &granularity).unwrap().remove(0);
                assert!(!action.steps.is_empty());
                out.extend(action.steps.iter().map(|s| s.token));
                if action.end == ActionEnd::Stop {
                    break;
                }
            }
            assert_eq!(server.seq_len(seq).unwrap(), case.token_ids.len() + out.len());
            server.release(seq).unwrap();
            out
        };
        let whole = generate(Granularity::MiniStep(n));
        assert_eq!(generate(Granularity::line()), whole, "{}: by lines", case.name);
        assert_eq!(generate(Granularity::MiniStep(4)), whole, "{}: by mini-steps of 4", case.name);
    }
}
