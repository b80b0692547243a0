//! Fault injection for the remote backend: `RemoteLm` against a local fake llama-server (its
//! native `/completion` and its `/v1/completions` dialects, `/tokenize`, `/v1/models`) that
//! fails on demand (no server, busy and error statuses, broken or truncated JSON, dropped
//! connections, slow answers, foreign token ids, a different tokenizer), and checks of what
//! the client sends (API key, token limits) and counts (trimmed tokens, computed tokens).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use marco_backend_remote::{HttpOptions, RemoteConfig, RemoteError, RemoteLm, ServerKind, TokenizerSource};
use marco_core::sampling::splitmix64;
use marco_core::{
    ActionEnd, ActionGranularity, ActionHints, Budget, ExtendRequest, Granularity, LanguageModel, Problem,
    SamplingParams, SearchPolicy, SeqId, TokenId, Tokenizer,
};
use marco_formats::MarcoTokenizer;
use marco_search::{GenerationConfig, Mcts, MctsConfig};
use serde_json::{json, Value};

const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../marco-model/tests/data/tiny-llama/tokenizer.json");

/// The context length the fake server reports.
const N_CTX: usize = 512;

/// The tokenizer both the fake server and the client use.
fn tokenizer() -> &'static MarcoTokenizer {
    static TOKENIZER_CELL: OnceLock<MarcoTokenizer> = OnceLock::new();
    TOKENIZER_CELL.get_or_init(|| MarcoTokenizer::load(TOKENIZER).expect("the test tokenizer loads"))
}

/// What the fake server does with one generation request (`/completion` or `/v1/completions`).
enum Fault {
    /// Answer as llama-server would.
    Normal,
    /// Answer 200 with this JSON.
    Json(Value),
    /// Answer with this status, extra headers and body.
    Status { status: u16, headers: Vec<(&'static str, String)>, body: String },
    /// Write these bytes as the whole response.
    Raw(Vec<u8>),
    /// Close the connection without answering.
    Close,
    /// Wait, then answer as llama-server would.
    Sleep(Duration),
    /// Close the connection without answering and stop serving: the listener is dropped and
    /// every later connection is closed unanswered.
    Shutdown,
}

impl Fault {
    fn status(status: u16, body: &str) -> Fault {
        Fault::Status { status, headers: Vec::new(), body: body.to_string() }
    }
}

type Hook = dyn Fn(usize, &Value) -> Fault + Send + Sync;

/// One request the fake server received.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

struct Shared {
    /// Decides the answer to each generation request (its index among them, its body).
    hook: Box<Hook>,
    /// Added to every token id `/tokenize` answers (0: the same tokenizer as the client's).
    tokenize_shift: TokenId,
    log: Mutex<Vec<Recorded>>,
    completions: AtomicUsize,
    stopped: AtomicBool,
}

/// A fake llama-server on `127.0.0.1`, serving until dropped (or told to shut down).
struct Fake {
    url: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(hook: impl Fn(usize, &Value) -> Fault + Send + Sync + 'static) -> Fake {
        Self::with_tokenize_shift(hook, 0)
    }

    fn normal() -> Fake {
        Self::start(|_, _| Fault::Normal)
    }

    fn with_tokenize_shift(hook: impl Fn(usize, &Value) -> Fault + Send + Sync + 'static, shift: TokenId) -> Fake {
        // Loaded before any connection thread needs it.
        tokenizer();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let shared = Arc::new(Shared {
            hook: Box::new(hook),
            tokenize_shift: shift,
            log: Mutex::new(Vec::new()),
            completions: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        });
        let serving = Arc::clone(&shared);
        let thread = std::thread::spawn(move || serve(listener, &serving));
        Fake { url, shared, thread: Some(thread) }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn completions(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| is_generation(&r.path)).collect()
    }

    fn config(&self) -> RemoteConfig {
        let mut config = RemoteConfig::new(self.url.clone());
        config.http = fast_http();
        config.concurrency = 2;
        config
    }

    fn connect_with(&self, config: RemoteConfig) -> RemoteLm {
        RemoteLm::connect(config, TokenizerSource::File(TOKENIZER.into())).expect("connect to the fake server")
    }

    fn connect(&self) -> RemoteLm {
        self.connect_with(self.config())
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The endpoint `RemoteLm` generates with on llama-server.
fn generate_path() -> &'static str {
    ServerKind::LlamaCpp.generate_path()
}

/// Whether `path` is one of llama-server's generation endpoints.
fn is_generation(path: &str) -> bool {
    path == "/completion" || path == "/v1/completions"
}

/// Short timeouts and retries: no test waits long.
fn fast_http() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(1500),
        max_retries: 2,
        retry_base: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
    }
}

/// Accepts connections until stopped (or a minute passed), one thread per connection.
fn serve(listener: TcpListener, shared: &Arc<Shared>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !shared.stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = Arc::clone(shared);
                std::thread::spawn(move || handle(stream, &shared));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn handle(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Some(request) = read_request(&stream) else { return };
    if shared.stopped.load(Ordering::SeqCst) {
        return;
    }
    shared.log.lock().unwrap_or_else(PoisonError::into_inner).push(request.clone());
    let fault = if is_generation(&request.path) {
        let index = shared.completions.fetch_add(1, Ordering::SeqCst);
        (shared.hook)(index, &request.json())
    } else {
        Fault::Normal
    };
    match fault {
        Fault::Normal => {
            let (status, body) = answer(shared, &request);
            respond(&mut stream, status, &[], body.as_bytes());
        }
        Fault::Json(json) => respond(&mut stream, 200, &[], json.to_string().as_bytes()),
        Fault::Status { status, headers, body } => respond(&mut stream, status, &headers, body.as_bytes()),
        Fault::Raw(bytes) => {
            let _ = stream.write_all(&bytes);
            let _ = stream.flush();
        }
        Fault::Close => {}
        Fault::Sleep(wait) => {
            std::thread::sleep(wait);
            let (status, body) = answer(shared, &request);
            respond(&mut stream, status, &[], body.as_bytes());
        }
        Fault::Shutdown => shared.stopped.store(true, Ordering::SeqCst),
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads one HTTP/1.1 request: request line, headers up to the blank line, then a
/// `Content-Length` (or chunked) body.
fn read_request(stream: &TcpStream) -> Option<Recorded> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    for _ in 0..200 {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(length) = find("content-length") {
        let length: usize = length.parse().ok()?;
        body.resize(length.min(64 << 20), 0);
        reader.read_exact(&mut body).ok()?;
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        for _ in 0..100_000 {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(Recorded { method, path, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn respond(stream: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

/// llama-server's answer to `request`.
fn answer(shared: &Shared, request: &Recorded) -> (u16, String) {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/v1/models") => (
            200,
            json!({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "llamacpp", "meta": {"n_ctx": N_CTX}}]})
                .to_string(),
        ),
        ("POST", "/tokenize") => {
            let text = request.json().get("content").and_then(Value::as_str).unwrap_or_default().to_string();
            let mut tokens = tokenizer().encode(&text, true).unwrap_or_default();
            if tokenizer().adds_bos() && tokens.first().copied() == tokenizer().bos_token() {
                tokens.remove(0);
            }
            let tokens: Vec<TokenId> = tokens.into_iter().map(|t| t + shared.tokenize_shift).collect();
            (200, json!({ "tokens": tokens }).to_string())
        }
        ("POST", "/completion") => (200, completion(&request.json()).to_string()),
        ("POST", "/v1/completions") => (200, oai_completion(&request.json()).to_string()),
        _ => (404, json!({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}).to_string()),
    }
}

/// The token the fake generates at `position`: a hash of it, never a stop token.
fn token_at(position: usize) -> TokenId {
    let vocab = tokenizer().vocab_size() as u64;
    let mut token = (splitmix64(position as u64 ^ 0x6661_6b65) % vocab) as TokenId;
    while tokenizer().is_stop(token) {
        token = ((u64::from(token) + 1) % vocab) as TokenId;
    }
    token
}

/// `k` candidates with `chosen` the most likely, log-probabilities descending, no stop token.
fn top_of(chosen: TokenId, k: usize) -> Vec<(TokenId, f64)> {
    let vocab = tokenizer().vocab_size() as u64;
    let k = k.min(tokenizer().vocab_size() - tokenizer().stop_tokens().len());
    let mut top = vec![(chosen, -0.05)];
    let mut candidate = u64::from(chosen);
    for _ in 0..vocab {
        if top.len() >= k {
            break;
        }
        candidate = (candidate + 37) % vocab;
        let id = candidate as TokenId;
        if !tokenizer().is_stop(id) && top.iter().all(|&(t, _)| t != id) {
            top.push((id, -0.5 - top.len() as f64));
        }
    }
    top
}

/// A generated token: its id, log-probability and the top alternatives.
type Generated = (TokenId, f64, Vec<(TokenId, f64)>);

/// What the fake generates for `body`: per token, its id, log-probability and alternatives.
/// A positive `logit_bias` forces the first token, whose alternatives stay those of the raw
/// distribution (as llama-server reports them without `post_sampling_probs`).
fn generate(body: &Value) -> Vec<Generated> {
    let prompt_len = body.get("prompt").and_then(Value::as_array).map_or(0, Vec::len);
    let n = body.get("max_tokens").and_then(Value::as_u64).unwrap_or(1).min(N_CTX as u64) as usize;
    let k = body.get("n_probs").and_then(Value::as_u64).unwrap_or(1).clamp(1, 100) as usize;
    let biased = body
        .pointer("/logit_bias/0")
        .and_then(Value::as_array)
        .filter(|b| b.get(1).and_then(Value::as_f64).is_some_and(|x| x > 0.0))
        .and_then(|b| b.first().and_then(Value::as_u64))
        .map(|t| t as TokenId);
    (0..n)
        .map(|i| {
            let raw = token_at(prompt_len + i);
            let top = top_of(raw, k);
            match biased {
                Some(forced) if i == 0 => {
                    let logprob = top.iter().find(|&&(t, _)| t == forced).map_or(-12.0, |&(_, lp)| lp);
                    (forced, logprob, top)
                }
                _ => (raw, top[0].1, top),
            }
        })
        .collect()
}

fn entry_json(id: TokenId, logprob: f64, top: &[(TokenId, f64)]) -> Value {
    let top: Vec<Value> =
        top.iter().map(|&(id, logprob)| json!({"id": id, "token": "", "bytes": [], "logprob": logprob})).collect();
    json!({"id": id, "token": "", "bytes": [], "logprob": logprob, "top_logprobs": top})
}

/// llama-server's native `/completion` answer to `body` (with `return_tokens`).
fn completion(body: &Value) -> Value {
    let prompt_len = body.get("prompt").and_then(Value::as_array).map_or(0, Vec::len);
    let generated = generate(body);
    let n = generated.len();
    let tokens: Vec<TokenId> = generated.iter().map(|g| g.0).collect();
    let probabilities: Vec<Value> = generated.iter().map(|(id, lp, top)| entry_json(*id, *lp, top)).collect();
    json!({
        "index": 0, "content": "", "tokens": tokens, "id_slot": 0, "stop": true, "model": "fake",
        "tokens_predicted": n, "tokens_evaluated": prompt_len, "stop_type": "limit", "stopping_word": "",
        "tokens_cached": prompt_len + n, "truncated": false,
        "timings": {"cache_n": 0, "prompt_n": prompt_len, "predicted_n": n},
        "completion_probabilities": probabilities,
    })
}

/// llama-server's OpenAI-compatible `/v1/completions` answer to `body`.
fn oai_completion(body: &Value) -> Value {
    let prompt_len = body.get("prompt").and_then(Value::as_array).map_or(0, Vec::len);
    let generated = generate(body);
    let n = generated.len();
    let content: Vec<Value> = generated.iter().map(|(id, lp, top)| entry_json(*id, *lp, top)).collect();
    json!({
        "choices": [{"text": "", "index": 0, "finish_reason": "length", "logprobs": {"content": content}}],
        "usage": {"completion_tokens": n, "prompt_tokens": prompt_len, "prompt_tokens_details": {"cached_tokens": 0}},
        "timings": {"prompt_n": prompt_len, "predicted_n": n},
    })
}

/// The prompt tokens of `body`.
fn prompt_of(body: &Value) -> Vec<u64> {
    body.get("prompt")
        .and_then(Value::as_array)
        .map(|p| p.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn prompt() -> Vec<TokenId> {
    vec![5, 6, 7, 8, 9, 10]
}

fn extend_once(model: &mut RemoteLm, seq: SeqId, action: &dyn ActionGranularity) -> marco_core::Result<Vec<TokenId>> {
    let out = model.extend(&[ExtendRequest::new(seq, SamplingParams::greedy(), 100)], action)?;
    Ok(out[0].steps.iter().map(|s| s.token).collect())
}

/// The `RemoteError` inside a `marco_core::Error::Backend`.
fn remote(e: &marco_core::Error) -> &RemoteError {
    match e {
        marco_core::Error::Backend(source) => {
            source.downcast_ref::<RemoteError>().unwrap_or_else(|| panic!("not a RemoteError: {source:?}"))
        }
        other => panic!("not a backend error: {other:?}"),
    }
}

/// Opens a sequence and extends it by one mini-step of 4, expecting an error.
fn failing_extend(model: &mut RemoteLm) -> marco_core::Error {
    let seq = model.new_sequence(&prompt()).unwrap();
    let err = extend_once(model, seq, &Granularity::MiniStep(4)).expect_err("the extend must fail");
    // A failed extend leaves the sequence as it was.
    assert_eq!(model.seq_len(seq).unwrap(), prompt().len());
    err
}

#[test]
fn the_test_tokenizer_is_what_the_fake_assumes() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 1024);
    assert_eq!(t.stop_tokens(), &[2]);
    assert_eq!(t.encode("<t5> <t6>", true).unwrap(), vec![5, 6]);
    let top = top_of(token_at(3), 5);
    assert_eq!(top.len(), 5);
    assert!(top.windows(2).all(|w| w[0].1 > w[1].1));
    assert!(top.iter().all(|&(t, _)| !tokenizer().is_stop(t)));
}

#[test]
fn a_server_that_is_not_running_is_a_connect_error_naming_the_url() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let mut config = RemoteConfig::new(url.clone());
    config.http = fast_http();
    let started = Instant::now();
    let err = RemoteLm::connect(config, TokenizerSource::File(TOKENIZER.into())).unwrap_err();
    assert!(matches!(err, RemoteError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
    // A refused connection is not retried.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[test]
fn busy_answers_are_retried_until_the_server_answers() {
    let fake = Fake::start(|i, _| {
        if i < 2 {
            Fault::status(503, r#"{"error":{"code":503,"message":"Loading model"}}"#)
        } else {
            Fault::Normal
        }
    });
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    let out =
        model.extend(&[ExtendRequest::new(seq, SamplingParams::greedy(), 100)], &Granularity::MiniStep(4)).unwrap();
    assert_eq!(out[0].end, ActionEnd::Complete);
    let tokens: Vec<TokenId> = out[0].steps.iter().map(|s| s.token).collect();
    assert_eq!(tokens, (6..10).map(token_at).collect::<Vec<_>>());
    let sent = fake.completions();
    assert_eq!(sent.len(), 3, "two 503s and one answer");
    assert!(sent.iter().all(|r| r.body == sent[0].body), "a retry resends the same request");
    assert_eq!(model.stats().requests, 1, "retries are not requests");
    assert_eq!(model.counters().forward_passes, 1);
    model.release(seq).unwrap();

    // A whole search on the same connection then works.
    let problem = Problem::from_raw(model.tokenizer(), "<t5> <t6> <t7> <t8>").unwrap();
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(40))
        .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(4)));
    let outcome = Mcts::new(config).unwrap().search(&mut model, &problem).unwrap();
    assert!(outcome.stats.tokens_generated > 0 && outcome.stats.tokens_generated <= 40);
    assert_eq!(model.counters().live_sequences, 0);
}

#[test]
fn a_server_busy_for_good_is_overloaded_after_every_retry() {
    let fake = Fake::start(|_, _| Fault::status(429, r#"{"error":{"code":429,"message":"slots busy"}}"#));
    let mut config = fake.config();
    config.http = HttpOptions {
        max_retries: 3,
        retry_base: Duration::from_millis(40),
        retry_max: Duration::from_secs(1),
        ..fast_http()
    };
    let mut model = fake.connect_with(config);
    let started = Instant::now();
    let err = failing_extend(&mut model);
    let elapsed = started.elapsed();
    match remote(&err) {
        RemoteError::Overloaded { url, status, attempts, message } => {
            assert_eq!((*status, *attempts), (429, 4));
            assert!(url.ends_with(generate_path()), "{url}");
            assert_eq!(message, "slots busy");
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert_eq!(fake.completions().len(), 4);
    // Backoff waits at least half of 40 + 80 + 160 ms.
    assert!(elapsed >= Duration::from_millis(140), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn retry_after_is_honoured_up_to_the_longest_wait() {
    let fake = Fake::start(|i, _| {
        if i < 2 {
            Fault::Status { status: 503, headers: vec![("Retry-After", "30".into())], body: "busy".into() }
        } else {
            Fault::Normal
        }
    });
    let mut config = fake.config();
    config.http = HttpOptions { retry_max: Duration::from_millis(80), ..fast_http() };
    let mut model = fake.connect_with(config);
    let seq = model.new_sequence(&prompt()).unwrap();
    let started = Instant::now();
    assert_eq!(extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap().len(), 4);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(160), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(fake.completions().len(), 3);
}

#[test]
fn an_error_status_carries_the_servers_message() {
    let fake = Fake::start(|_, _| {
        Fault::status(
            400,
            r#"{"error":{"code":400,"message":"the prompt is too long","type":"invalid_request_error"}}"#,
        )
    });
    let mut model = fake.connect();
    let err = failing_extend(&mut model);
    assert!(err.to_string().contains("the prompt is too long"), "{err}");
    match remote(&err) {
        RemoteError::Http { status, message, .. } => {
            assert_eq!(*status, 400);
            assert_eq!(message, "the prompt is too long");
        }
        other => panic!("expected Http, got {other:?}"),
    }
    assert_eq!(fake.completions().len(), 1, "a 400 is not retried");
}

#[test]
fn malformed_answers_are_malformed_errors() {
    let truncated = {
        let full = completion(&json!({"prompt": prompt(), "max_tokens": 4, "n_probs": 5})).to_string();
        full[..full.len() / 2].to_string()
    };
    let answers: Vec<(&str, Fault)> = vec![
        (
            "not JSON",
            Fault::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{choices:".to_vec()),
        ),
        ("truncated JSON", Fault::Status { status: 200, headers: Vec::new(), body: truncated }),
        (
            "log-probabilities not a list",
            Fault::Json(json!({"content": "", "tokens": [5, 6], "stop_type": "limit", "completion_probabilities": {}})),
        ),
        ("no tokens", Fault::Json(json!({"content": "abc", "stop_type": "limit", "completion_probabilities": []}))),
        (
            "entries of other tokens",
            Fault::Json(
                json!({"tokens": [5], "stop_type": "limit", "completion_probabilities": [entry_json(6, -0.1, &[(6, -0.1)])]}),
            ),
        ),
    ];
    for (what, fault) in answers {
        let fault = Mutex::new(Some(fault));
        let fake = Fake::start(move |_, _| fault.lock().unwrap().take().unwrap_or(Fault::Normal));
        let mut model = fake.connect();
        let err = failing_extend(&mut model);
        assert!(matches!(remote(&err), RemoteError::Malformed { .. }), "{what}: {err:?}");
        assert!(err.to_string().contains(generate_path()), "{what}: {err}");
        assert_eq!(fake.completions().len(), 1, "{what}: a malformed answer is not retried");
    }
}

#[test]
fn a_server_that_never_reports_log_probabilities_is_malformed() {
    // No entries at all (`n_probs` ignored): the client asks for the first token's entry
    // once, gets none either, and gives up.
    let fake = Fake::start(|_, body| {
        let mut answer = completion(body);
        answer["completion_probabilities"] = Value::Null;
        Fault::Json(answer)
    });
    let mut model = fake.connect();
    let err = failing_extend(&mut model);
    assert!(matches!(remote(&err), RemoteError::Malformed { .. }), "{err:?}");
    assert_eq!(fake.completions().len(), 2, "the answer, then one probe");
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let chosen: &[&str] = &["/tokens/1", "/completion_probabilities/1/id"];
    let alternative: &[&str] = &["/completion_probabilities/1/top_logprobs/2/id"];
    for (what, pointers) in [("chosen", chosen), ("alternative", alternative)] {
        let fake = Fake::start(move |_, body| {
            let mut answer = completion(body);
            for pointer in pointers {
                *answer.pointer_mut(pointer).unwrap() = json!(5000);
            }
            Fault::Json(answer)
        });
        let mut model = fake.connect();
        let err = failing_extend(&mut model);
        match err {
            marco_core::Error::TokenOutOfRange { token, vocab_size } => assert_eq!((token, vocab_size), (5000, 1024)),
            other => panic!("{what}: expected TokenOutOfRange, got {other:?}"),
        }
    }
}

#[test]
fn a_server_killed_mid_search_fails_the_search_and_frees_every_state() {
    let fake = Fake::start(|i, _| if i < 3 { Fault::Normal } else { Fault::Shutdown });
    let mut model = fake.connect();
    let problem = Problem::from_raw(model.tokenizer(), "<t5> <t6> <t7> <t8>").unwrap();
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(200))
        .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(4)));
    let started = Instant::now();
    let result = Mcts::new(config).unwrap().search(&mut model, &problem);
    let elapsed = started.elapsed();
    let err = result.expect_err("a dead server fails the search");
    assert!(matches!(remote(&err), RemoteError::Connect { .. }), "{err:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(fake.completions().len() >= 4, "three answers, then the fatal request");
    assert_eq!(model.counters().live_sequences, 0);
}

#[test]
fn a_connection_closed_without_answer_is_retried() {
    let fake = Fake::start(|i, _| if i == 0 { Fault::Close } else { Fault::Normal });
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    assert_eq!(extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap().len(), 4);
    assert_eq!(fake.completions().len(), 2);
}

#[test]
fn an_answer_cut_short_is_retried_then_a_connect_error() {
    // The header promises more body than arrives before the connection closes.
    let cut = |_: usize, _: &Value| {
        Fault::Raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\nConnection: close\r\n\r\n{\"choices\":[".to_vec())
    };
    let fake = Fake::start(cut);
    let mut model = fake.connect();
    let started = Instant::now();
    let err = failing_extend(&mut model);
    assert!(started.elapsed() < Duration::from_secs(5));
    match remote(&err) {
        RemoteError::Connect { url, .. } => assert!(url.ends_with(generate_path()), "{url}"),
        other => panic!("expected Connect after the retries, got {other:?}"),
    }
    assert_eq!(fake.completions().len(), 3, "max_retries + 1 attempts");

    let once = Fake::start(move |i, body| if i == 0 { cut(i, body) } else { Fault::Normal });
    let mut model = once.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    assert_eq!(extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap().len(), 4);
    assert_eq!(once.completions().len(), 2);
}

#[test]
fn a_slow_server_times_out() {
    let fake = Fake::start(|_, _| Fault::Sleep(Duration::from_millis(6000)));
    let mut config = fake.config();
    config.http = HttpOptions { request_timeout: Duration::from_millis(300), ..fast_http() };
    let mut model = fake.connect_with(config);
    let started = Instant::now();
    let err = failing_extend(&mut model);
    let elapsed = started.elapsed();
    match remote(&err) {
        RemoteError::Timeout { url, after } => {
            assert!(url.ends_with(generate_path()), "{url}");
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(fake.completions().len(), 1, "a timeout is not retried");
}

#[test]
fn the_api_key_is_sent_as_a_bearer_token_and_never_shown() {
    const SECRET: &str = "sk-test-secret";
    std::env::set_var("MARCO_FAULTS_TEST_KEY", SECRET);
    let fake = Fake::start(|i, _| if i == 0 { Fault::Normal } else { Fault::status(400, r#"{"error":"bad"}"#) });
    let mut config = fake.config();
    config.api_key_env = Some("MARCO_FAULTS_TEST_KEY".into());
    let mut model = fake.connect_with(config.clone());
    let seq = model.new_sequence(&prompt()).unwrap();
    extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap();
    let err = extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap_err();
    let requests = fake.requests();
    let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/v1/models", "/tokenize", generate_path(), generate_path()]);
    for r in &requests {
        assert_eq!(r.header("authorization"), Some("Bearer sk-test-secret"), "{} {}", r.method, r.path);
    }
    for text in [format!("{model:?}"), format!("{config:?}"), err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(SECRET), "{text}");
    }

    // A variable that is named but unset (or empty) is refused before any request.
    for (var, value) in [("MARCO_FAULTS_TEST_UNSET_KEY", None), ("MARCO_FAULTS_TEST_EMPTY_KEY", Some(""))] {
        match value {
            Some(v) => std::env::set_var(var, v),
            None => std::env::remove_var(var),
        }
        let fake = Fake::normal();
        let mut config = fake.config();
        config.api_key_env = Some(var.into());
        let err = RemoteLm::connect(config, TokenizerSource::File(TOKENIZER.into())).unwrap_err();
        assert!(matches!(err, RemoteError::InvalidConfig(_)), "{err:?}");
        assert!(err.to_string().contains(var), "{err}");
        assert!(fake.requests().is_empty());
    }
}

#[test]
fn a_different_server_tokenizer_is_refused_at_connect() {
    let fake = Fake::with_tokenize_shift(|_, _| Fault::Normal, 1);
    let err = RemoteLm::connect(fake.config(), TokenizerSource::File(TOKENIZER.into())).unwrap_err();
    match &err {
        RemoteError::TokenizerMismatch { probe, local, server } => {
            assert_eq!(probe, marco_backend_remote::TOKENIZER_PROBE);
            assert!(!local.is_empty());
            assert_eq!(server, &local.iter().map(|t| t + 1).collect::<Vec<_>>());
        }
        other => panic!("expected TokenizerMismatch, got {other:?}"),
    }
    assert!(fake.completions().is_empty());
}

/// Complete at 3 tokens; a whole-action generator may ask for 8.
struct ThreeOfEight;

impl ActionGranularity for ThreeOfEight {
    fn is_complete(&self, tokens: &[TokenId], _text: &str) -> bool {
        tokens.len() >= 3
    }
    fn describe(&self) -> String {
        "three of eight".into()
    }
    fn hints(&self) -> Option<ActionHints> {
        Some(ActionHints { max_tokens: Some(8), stop_strings: Vec::new() })
    }
}

#[test]
fn tokens_past_the_actions_end_are_trimmed_here() {
    let fake = Fake::normal();
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    let out = model.extend(&[ExtendRequest::new(seq, SamplingParams::greedy(), 100)], &ThreeOfEight).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].end, ActionEnd::Complete);
    let tokens: Vec<TokenId> = out[0].steps.iter().map(|s| s.token).collect();
    assert_eq!(tokens, (6..9).map(token_at).collect::<Vec<_>>());
    assert_eq!(model.seq_len(seq).unwrap(), prompt().len() + 3);
    let stats = model.stats();
    assert_eq!((stats.tokens_generated, stats.tokens_trimmed), (8, 5));
    let sent = fake.completions();
    assert_eq!(sent.len(), 1);
    let body = sent[0].json();
    assert_eq!(body["max_tokens"].as_u64(), Some(8));
    assert_eq!(prompt_of(&body), prompt().iter().map(|&t| u64::from(t)).collect::<Vec<_>>());
    // The next action starts after the kept tokens, not after the trimmed ones.
    extend_once(&mut model, seq, &ThreeOfEight).unwrap();
    assert_eq!(prompt_of(&fake.completions()[1].json()).len(), prompt().len() + 3);
}

#[test]
fn counters_report_what_the_server_computed() {
    // First answer: the server computed 2 prompt tokens (the rest came from its cache) and
    // says it generated 5 tokens, one more than it listed. Second: no timings and no count,
    // so every prompt token and every listed token counts. A generation of n tokens runs
    // n - 1 positions after the prompt: the last token is sampled, not run, until a later
    // prompt sends it.
    let fake = Fake::start(|i, body| {
        let mut answer = completion(body);
        if i == 0 {
            answer["timings"]["prompt_n"] = json!(2);
            answer["timings"]["cache_n"] = json!(4);
            answer["tokens_predicted"] = json!(5);
        } else {
            answer.as_object_mut().unwrap().remove("timings");
            answer.as_object_mut().unwrap().remove("tokens_predicted");
        }
        Fault::Json(answer)
    });
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    assert_eq!(model.counters().tokens_computed, 0);
    assert_eq!(extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap().len(), 4);
    let counters = model.counters();
    assert_eq!((counters.tokens_computed, counters.forward_passes, counters.live_sequences), (2 + 4, 1, 1));
    let stats = model.stats();
    assert_eq!((stats.prompt_tokens_sent, stats.prompt_tokens_computed, stats.tokens_generated), (6, 2, 5));

    assert_eq!(extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap().len(), 4);
    let counters = model.counters();
    assert_eq!((counters.tokens_computed, counters.forward_passes), (2 + 4 + 10 + 3, 2));
    let stats = model.stats();
    assert_eq!((stats.prompt_tokens_sent, stats.prompt_tokens_computed, stats.tokens_generated), (6 + 10, 2 + 10, 9));
}

#[test]
fn a_batch_with_one_failed_request_changes_no_sequence() {
    let fake = Fake::start(|i, _| if i == 1 { Fault::status(400, "nope") } else { Fault::Normal });
    let mut model = fake.connect();
    let a = model.new_sequence(&prompt()).unwrap();
    let b = model.new_sequence(&[11, 12, 13]).unwrap();
    let batch =
        [ExtendRequest::new(a, SamplingParams::greedy(), 100), ExtendRequest::new(b, SamplingParams::greedy(), 100)];
    let err = model.extend(&batch, &Granularity::MiniStep(4)).unwrap_err();
    assert!(matches!(remote(&err), RemoteError::Http { status: 400, .. }), "{err:?}");
    assert_eq!((model.seq_len(a).unwrap(), model.seq_len(b).unwrap()), (6, 3));
    // The same batch succeeds once the server does.
    let out = model.extend(&batch, &Granularity::MiniStep(4)).unwrap();
    assert!(out.iter().all(|o| o.steps.len() == 4 && o.end == ActionEnd::Complete));
    assert_eq!((model.seq_len(a).unwrap(), model.seq_len(b).unwrap()), (10, 7));
}

#[test]
fn a_server_that_generates_nothing_is_an_error_not_a_loop() {
    let fake = Fake::start(|_, body| {
        let mut answer = completion(body);
        answer["tokens"] = json!([]);
        answer["completion_probabilities"] = json!([]);
        answer["tokens_predicted"] = json!(0);
        answer["timings"]["predicted_n"] = json!(0);
        Fault::Json(answer)
    });
    let mut model = fake.connect();
    let started = Instant::now();
    let err = failing_extend(&mut model);
    assert!(matches!(remote(&err), RemoteError::Malformed { .. }), "{err:?}");
    assert_eq!(fake.completions().len(), 3);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_forced_first_token_needs_candidates_the_server_reported() {
    let fake = Fake::normal();
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    let mut request = ExtendRequest::new(seq, SamplingParams::greedy(), 100);
    request.force_first = Some(token_at(6));
    let err = model.extend(&[request], &Granularity::MiniStep(4)).unwrap_err();
    assert!(matches!(remote(&err), RemoteError::Unsupported(_)), "{err:?}");
    assert!(fake.completions().is_empty());
    assert_eq!(model.seq_len(seq).unwrap(), prompt().len());
}

#[test]
fn a_forced_first_token_costs_no_request_and_the_rest_of_the_action_one() {
    let fake = Fake::normal();
    let mut model = fake.connect();
    let first = model.new_sequence(&prompt()).unwrap();
    let sibling = model.fork(first).unwrap();
    let out =
        model.extend(&[ExtendRequest::new(first, SamplingParams::greedy(), 100)], &Granularity::MiniStep(4)).unwrap();
    let alternative = out[0].steps[0].top[2];
    assert_ne!(alternative.token, out[0].steps[0].token);

    let mut request = ExtendRequest::new(sibling, SamplingParams::greedy(), 100);
    request.force_first = Some(alternative.token);
    let out = model.extend(&[request], &Granularity::MiniStep(4)).unwrap();
    assert_eq!(out[0].end, ActionEnd::Complete);
    assert_eq!(out[0].steps.len(), 4);
    assert_eq!((out[0].steps[0].token, out[0].steps[0].logprob), (alternative.token, alternative.logprob));
    let sent = fake.completions();
    assert_eq!(sent.len(), 2, "the forced token is not asked for");
    let body = sent[1].json();
    let mut expected: Vec<u64> = prompt().iter().map(|&t| u64::from(t)).collect();
    expected.push(u64::from(alternative.token));
    assert_eq!(prompt_of(&body), expected);
    // The action has 3 tokens left: asking for 4 would generate one only to trim it.
    assert_eq!(body["max_tokens"].as_u64(), Some(3), "max_tokens of the request after a forced token");
    assert_eq!(model.stats().tokens_trimmed, 0);
}

/// The first action of a fresh sequence holding `prompt()`, against a server without faults.
fn reference_action(action: &dyn ActionGranularity) -> marco_core::ExtendOutput {
    let fake = Fake::normal();
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    model.extend(&[ExtendRequest::new(seq, SamplingParams::greedy(), 100)], action).unwrap().remove(0)
}

/// An answer without the entry of its second token, as llama-server leaves out the entry of
/// a token that ends inside a UTF-8 character.
fn without_second_entry(body: &Value) -> Value {
    let mut answer = completion(body);
    answer["completion_probabilities"].as_array_mut().unwrap().remove(1);
    answer
}

#[test]
fn a_token_without_an_entry_is_asked_for_once() {
    let fake = Fake::start(|i, body| Fault::Json(if i == 0 { without_second_entry(body) } else { completion(body) }));
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    let out =
        model.extend(&[ExtendRequest::new(seq, SamplingParams::greedy(), 100)], &Granularity::MiniStep(4)).unwrap();
    assert_eq!(out[0], reference_action(&Granularity::MiniStep(4)));
    let sent = fake.completions();
    assert_eq!(sent.len(), 2, "the answer, then one probe");
    let probe = sent[1].json();
    let mut expected: Vec<u64> = prompt().iter().map(|&t| u64::from(t)).collect();
    expected.push(u64::from(token_at(prompt().len())));
    assert_eq!(prompt_of(&probe), expected);
    assert_eq!(probe["max_tokens"].as_u64(), Some(1));
    assert!(probe["n_probs"].as_u64().unwrap() >= 5);
    assert!(probe.get("logit_bias").is_some_and(|b| !b.is_null()), "{probe}");
    assert_eq!(model.seq_len(seq).unwrap(), prompt().len() + 4);
}

#[test]
fn a_token_the_probe_does_not_report_either_is_an_error() {
    let fake = Fake::start(|i, body| {
        if i == 0 {
            return Fault::Json(without_second_entry(body));
        }
        let mut answer = completion(body);
        let missing = u64::from(token_at(prompt().len() + 1));
        for entry in answer["completion_probabilities"].as_array_mut().unwrap() {
            entry["top_logprobs"].as_array_mut().unwrap().retain(|t| t["id"].as_u64() != Some(missing));
        }
        Fault::Json(answer)
    });
    let mut model = fake.connect();
    let err = failing_extend(&mut model);
    assert!(matches!(remote(&err), RemoteError::Unsupported(_)), "{err:?}");
    assert_eq!(fake.completions().len(), 2);
}

/// An answer without the entry of its first token.
fn without_first_entry(body: &Value) -> Value {
    let mut answer = completion(body);
    answer["completion_probabilities"].as_array_mut().unwrap().remove(0);
    answer
}

#[test]
fn candidates_of_a_probed_first_token_serve_forced_siblings() {
    // The leader's first token has no entry (its candidates come from a probe); a sibling is
    // then forced to one of those candidates, as a search with distinct first tokens does.
    let fake = Fake::start(|i, body| Fault::Json(if i == 0 { without_first_entry(body) } else { completion(body) }));
    let mut model = fake.connect();
    let leader = model.new_sequence(&prompt()).unwrap();
    let sibling = model.fork(leader).unwrap();
    let out =
        model.extend(&[ExtendRequest::new(leader, SamplingParams::greedy(), 100)], &Granularity::MiniStep(4)).unwrap();
    assert_eq!(out[0], reference_action(&Granularity::MiniStep(4)));
    assert_eq!(fake.completions().len(), 2, "the answer, then one probe");
    let alternative = out[0].steps[0].top[1];
    let mut request = ExtendRequest::new(sibling, SamplingParams::greedy(), 100);
    request.force_first = Some(alternative.token);
    let out = model.extend(&[request], &Granularity::MiniStep(4)).unwrap();
    assert_eq!((out[0].steps[0].token, out[0].steps[0].logprob), (alternative.token, alternative.logprob));
}

#[test]
fn a_search_survives_first_tokens_without_entries() {
    let fake = Fake::start(|_, body| {
        // A probe (one token, biased) gets its entry; every other answer lacks its first one.
        let probe = body.get("logit_bias").is_some_and(|b| !b.is_null());
        Fault::Json(if probe { completion(body) } else { without_first_entry(body) })
    });
    let mut model = fake.connect();
    let problem = Problem::from_raw(model.tokenizer(), "<t5> <t6> <t7> <t8>").unwrap();
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(60))
        .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(4)));
    let outcome = Mcts::new(config).unwrap().search(&mut model, &problem).unwrap();
    assert!(outcome.stats.tokens_generated > 0);
    assert_eq!(model.counters().live_sequences, 0);
}

#[test]
fn candidates_of_a_refused_answer_are_not_remembered() {
    // The first answer names a token outside the vocabulary among its first alternatives and
    // is refused; forcing a first token at that state must not hand out those alternatives.
    let fake = Fake::start(|i, body| {
        let mut answer = completion(body);
        if i == 0 {
            answer["completion_probabilities"][0]["top_logprobs"][3]["id"] = json!(5000);
        }
        Fault::Json(answer)
    });
    let mut model = fake.connect();
    let seq = model.new_sequence(&prompt()).unwrap();
    let err = extend_once(&mut model, seq, &Granularity::MiniStep(4)).unwrap_err();
    assert!(matches!(err, marco_core::Error::TokenOutOfRange { token: 5000, .. }), "{err:?}");
    let mut request = ExtendRequest::new(seq, SamplingParams::greedy(), 100);
    request.force_first = Some(token_at(prompt().len()));
    match model.extend(&[request], &Granularity::MiniStep(4)) {
        Ok(out) => assert!(out[0].steps.iter().flat_map(|s| &s.top).all(|t| t.token < 1024), "{out:?}"),
        Err(e) => assert!(matches!(remote(&e), RemoteError::Unsupported(_)), "{e:?}"),
    }
}
