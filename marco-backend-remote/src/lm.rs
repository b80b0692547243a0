//! [`RemoteLm`]: marco-core's [`LanguageModel`] over an inference server.
//!
//! # Sequences are token lists
//! The server owns the KV cache; marco keeps each sequence as its tokens. A fork copies a
//! list, a release forgets one, and every request sends the whole sequence as token ids: the
//! server's prefix cache (llama-server's slots and host-memory prompt cache, vLLM's automatic
//! prefix caching, SGLang's radix tree) finds the part it has computed before. The counters
//! report what the server says it computed, so the search's recompute ratio means the same as
//! in-process.
//!
//! # One request per action
//! [`LanguageModel::extend`] sends one request per sequence (concurrently, at most
//! `concurrency` at once), bounded by the granularity's [`hints`](ActionGranularity::hints):
//! its token limit and stop strings. The answer is then walked token by token on this side,
//! exactly as the in-process loop would: the action ends at the first stop token, full
//! context, completed action or token limit, and whatever the server generated after that
//! point is dropped (it counts as computed, not as kept). Where the server stopped early — at
//! a stop string inside leading whitespace, or after dropping a stop string's tokens as
//! llama-server does — the action goes on with another request from where it stands.
//!
//! # Forced first tokens
//! A search gives siblings distinct first tokens chosen among the top candidates of the state
//! they share, which an earlier answer reported. The remote model remembers those candidates
//! per state, so a forced token costs no request: its log-probability and alternatives come
//! from that answer, and the token is sent as part of the next prompt.
//!
//! # Reproducibility
//! Each request's seed is derived from the request's random stream (the search's seed and the
//! node's place in the tree) and the sequence's length, so a search replays against the same
//! server build and model when the server computes the same logits. A server that batches
//! concurrent requests together (continuous batching) may compute slightly different logits
//! for the same prompt depending on its neighbours, which can flip a sampled or even a greedy
//! token; vLLM offers batch-invariant kernels (`VLLM_BATCH_INVARIANT=1`) and SGLang a
//! deterministic mode (`--enable-deterministic-inference`, without which it ignores seeds).
//! With `--concurrency 1` against a llama-server, requests never share a batch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use marco_core::sampling::splitmix64;
use marco_core::{
    ActionEnd, ActionGranularity, Error, ExtendOutput, ExtendRequest, LanguageModel, ModelCounters, SeqId, StepOutput,
    StepRequest, TokenId, TokenLogprob, Tokenizer,
};
use marco_formats::MarcoTokenizer;
use serde_json::{json, Value};

use crate::error::{RemoteError, Result};
use crate::http::{Client, HttpOptions, Secret};
use crate::protocol::{parse_generated, request_body, Finish, Generate, Generated, ServerKind};
use crate::tokenizer::ServerTokenizer;

/// The environment variable the API key is read from by default.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";

/// The text marco and the server must tokenize alike before a search starts.
pub const TOKENIZER_PROBE: &str =
    "Janet has 3 apples, buys 15 more: 3 + 15 = 18.\n\nWait! Maybe I made some mistakes! \
     I need to rethink from scratch. 汉字 ½ résumé";

/// Where the remote model's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A `.gguf` file, a Hugging Face model directory or its `tokenizer.json` (checked against
    /// the server's tokenization at connect time).
    File(PathBuf),
    /// The server's own `/tokenize` and `/detokenize` (llama-server only): no file needed, one
    /// request per encoding or decoding ([`ServerTokenizer`]).
    Server,
}

/// How to reach a server.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    /// The server's base URL, such as `http://127.0.0.1:8080` (`/v1` is added by marco).
    pub url: String,
    /// The environment variable holding the API key, sent as a bearer token. `None`: read
    /// [`DEFAULT_API_KEY_ENV`] if it is set, else send none. A variable that is named but unset
    /// is an error.
    pub api_key_env: Option<String>,
    /// The served model's name, for servers that check it (default: the first of
    /// `GET /v1/models`).
    pub model: Option<String>,
    /// Requests in flight at once (one per sequence of a batched call).
    pub concurrency: usize,
    /// Timeouts and retries.
    pub http: HttpOptions,
    /// The kind of server; `None` detects it from `GET /v1/models`.
    pub server: Option<ServerKind>,
    /// The context length to assume; `None` asks the server (and fails if it cannot say).
    pub max_context: Option<usize>,
    /// Let the server reuse cached prefixes (default). Off, llama-server computes every prompt
    /// whole, as a client that cannot share prefixes would make it: for benchmarks.
    pub prefix_cache: bool,
}

impl RemoteConfig {
    /// The defaults for a server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RemoteConfig {
            url: url.into(),
            api_key_env: None,
            model: None,
            concurrency: 4,
            http: HttpOptions::default(),
            server: None,
            max_context: None,
            prefix_cache: true,
        }
    }
}

/// Work counters of a [`RemoteLm`] beyond [`ModelCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Generation requests sent (retries not counted).
    pub requests: u64,
    /// Prompt tokens sent with them.
    pub prompt_tokens_sent: u64,
    /// Prompt tokens the server computed (the rest came from its cache).
    pub prompt_tokens_computed: u64,
    /// Tokens the server generated.
    pub tokens_generated: u64,
    /// Generated tokens dropped because the action had ended before them.
    pub tokens_trimmed: u64,
}

/// A language model behind an inference server. See the [module documentation](self).
pub struct RemoteLm {
    client: Client,
    kind: ServerKind,
    model: Option<String>,
    tokenizer: Box<dyn Tokenizer + Send + Sync>,
    /// The BOS token a local tokenizer puts before a text, which the server's `/tokenize`
    /// leaves out (for the probe check); `None` for the server's own tokenizer.
    local_bos: Option<Option<TokenId>>,
    max_context: usize,
    concurrency: usize,
    prefix_cache: bool,
    /// A token whose text is plain ASCII, for [`RemoteLm::probe_step`].
    probe_token: TokenId,
    seqs: HashMap<u64, Vec<TokenId>>,
    next_seq: u64,
    /// Top candidates of the next token after a token list (keyed by its hash and length),
    /// as an earlier answer reported them.
    known_next: HashMap<(u64, usize), Vec<TokenLogprob>>,
    counters: ModelCounters,
    stats: RemoteStats,
}

impl std::fmt::Debug for RemoteLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLm")
            .field("url", &self.client.base())
            .field("kind", &self.kind)
            .field("model", &self.model)
            .field("max_context", &self.max_context)
            .field("live_sequences", &self.seqs.len())
            .finish()
    }
}

/// Caps the remembered candidates: a search reads only those of states it may still fork.
const KNOWN_NEXT_MAX: usize = 1 << 16;

impl RemoteLm {
    /// Connects to the server: checks that it answers, detects its kind and context length,
    /// loads the tokenizer and checks that the server tokenizes [`TOKENIZER_PROBE`] the same.
    pub fn connect(config: RemoteConfig, tokenizer: TokenizerSource) -> Result<Self> {
        if config.concurrency == 0 {
            return Err(RemoteError::InvalidConfig("concurrency must be at least 1".into()));
        }
        let key = match &config.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Secret::new(Some(v)),
                _ => {
                    return Err(RemoteError::InvalidConfig(format!("the API key variable {var} is not set (or empty)")))
                }
            },
            None => Secret::new(std::env::var(DEFAULT_API_KEY_ENV).ok()),
        };
        let client = Client::new(&config.url, key, config.http)?;
        let models = client.get("/v1/models")?;
        let first = models.json.pointer("/data/0").cloned().unwrap_or(Value::Null);
        let kind = match config.server {
            Some(kind) => kind,
            None => {
                first.get("owned_by").and_then(Value::as_str).and_then(ServerKind::from_owned_by).ok_or_else(|| {
                    RemoteError::Unsupported(format!(
                        "{}: cannot tell which server this is (GET /v1/models says owned_by {:?}); marco speaks to \
                     llama-server, vLLM and SGLang: name one",
                        models.url,
                        first.get("owned_by")
                    ))
                })?
            }
        };
        let model = config.model.clone().or_else(|| first.get("id").and_then(Value::as_str).map(str::to_string));
        let served_context = first
            .get("max_model_len")
            .or_else(|| first.pointer("/meta/n_ctx"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        let max_context = match (config.max_context, served_context) {
            (Some(mine), Some(theirs)) => mine.min(theirs),
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => {
                return Err(RemoteError::InvalidConfig(format!(
                    "{} does not report its context length: set it (RemoteConfig::max_context)",
                    models.url
                )))
            }
        };
        if max_context < 2 {
            return Err(RemoteError::InvalidConfig(format!("a context of {max_context} tokens is too short")));
        }
        let (tokenizer, local_bos): (Box<dyn Tokenizer + Send + Sync>, _) = match tokenizer {
            TokenizerSource::File(path) => {
                let local = MarcoTokenizer::load(&path)?;
                let bos = local.bos_token().filter(|_| local.adds_bos());
                (Box::new(local), Some(bos))
            }
            TokenizerSource::Server => (Box::new(ServerTokenizer::connect(client.clone(), kind, &models.json)?), None),
        };
        let probe_token = tokenizer
            .encode("a", false)
            .ok()
            .and_then(|t| t.last().copied())
            .ok_or_else(|| RemoteError::Unsupported("the tokenizer cannot encode \"a\"".into()))?;
        let lm = RemoteLm {
            probe_token,
            client,
            kind,
            model,
            tokenizer,
            local_bos,
            max_context,
            concurrency: config.concurrency,
            prefix_cache: config.prefix_cache,
            seqs: HashMap::new(),
            next_seq: 0,
            known_next: HashMap::new(),
            counters: ModelCounters::default(),
            stats: RemoteStats::default(),
        };
        if lm.local_bos.is_some() {
            lm.check_tokenizer(TOKENIZER_PROBE)?;
        }
        Ok(lm)
    }

    /// The kind of server.
    pub fn server_kind(&self) -> ServerKind {
        self.kind
    }

    /// The served model's name, if known.
    pub fn model_name(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        self.client.base()
    }

    /// Requests and tokens so far.
    pub fn stats(&self) -> RemoteStats {
        self.stats
    }

    /// The server's tokenization of `text` (no BOS, special tokens parsed as marco parses
    /// them in prompts).
    pub fn server_tokenize(&self, text: &str) -> Result<Vec<TokenId>> {
        let (path, body) = match self.kind {
            ServerKind::LlamaCpp => {
                ("/tokenize", json!({ "content": text, "add_special": false, "parse_special": true }))
            }
            ServerKind::Vllm => {
                ("/tokenize", json!({ "prompt": text, "add_special_tokens": false, "model": self.model }))
            }
            ServerKind::Sglang => ("/v1/tokenize", json!({ "prompt": text, "add_special_tokens": false })),
        };
        let answer = self.client.post(path, &body)?;
        let tokens = answer
            .json
            .get("tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| RemoteError::Malformed { url: answer.url.clone(), reason: "no tokens array".into() })?;
        tokens
            .iter()
            .map(|t| {
                t.as_u64().and_then(|n| TokenId::try_from(n).ok()).ok_or_else(|| RemoteError::Malformed {
                    url: answer.url.clone(),
                    reason: format!("token {t} is not a token id"),
                })
            })
            .collect()
    }

    /// Fails with [`RemoteError::TokenizerMismatch`] unless marco and the server tokenize
    /// `probe` alike.
    pub fn check_tokenizer(&self, probe: &str) -> Result<()> {
        let local = self.tokenizer.encode(probe, true).map_err(|e| RemoteError::Unsupported(e.to_string()))?;
        let local = match (self.local_bos.flatten(), local.split_first()) {
            (Some(bos), Some((&first, rest))) if first == bos => rest.to_vec(),
            _ => local,
        };
        let server = self.server_tokenize(probe)?;
        if local != server {
            return Err(RemoteError::TokenizerMismatch { probe: probe.to_string(), local, server });
        }
        Ok(())
    }

    fn tokens(&self, seq: SeqId) -> marco_core::Result<&Vec<TokenId>> {
        self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))
    }

    fn check_vocab(&self, tokens: impl IntoIterator<Item = TokenId>) -> Result<()> {
        let vocab_size = self.tokenizer.vocab_size();
        match tokens.into_iter().find(|&t| t as usize >= vocab_size) {
            Some(token) => Err(RemoteError::TokenOutOfVocab { token, vocab_size }),
            None => Ok(()),
        }
    }

    /// Sends `jobs` (at most `concurrency` at once) and returns their answers in order.
    fn generate_all(&mut self, jobs: &[Generate]) -> Vec<Result<Generated>> {
        let results: Vec<Mutex<Option<Result<Generated>>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let kind = self.kind;
        let run = |client: &Client| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(g) = jobs.get(i) else { break };
            let body = request_body(kind, g);
            let result = client
                .post(kind.generate_path(), &body)
                .and_then(|a| parse_generated(kind, &a.url, &a.json, g.top_logprobs));
            if let Ok(mut slot) = results[i].lock() {
                *slot = Some(result);
            }
        };
        let workers = self.concurrency.min(jobs.len());
        if workers <= 1 {
            run(&self.client);
        } else {
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    let client = self.client.clone();
                    let run = &run;
                    scope.spawn(move || run(&client));
                }
            });
        }
        let results: Vec<Result<Generated>> = results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Err(RemoteError::Unsupported("a request thread ended without an answer".into())))
            })
            .collect();
        for (Generate { prompt, .. }, r) in jobs.iter().zip(&results) {
            self.stats.requests += 1;
            self.counters.forward_passes += 1;
            self.stats.prompt_tokens_sent += prompt.len() as u64;
            if let Ok(g) = r {
                let computed = g.prompt_computed.unwrap_or(prompt.len() as u64);
                let generated = g.generated.unwrap_or(g.tokens.len() as u64).max(g.tokens.len() as u64);
                self.stats.prompt_tokens_computed += computed;
                self.stats.tokens_generated += generated;
                // A generation of n tokens runs n - 1 positions after the prompt: the last token
                // is sampled but only run through the model when a later prompt sends it (and
                // is counted there). In-process, a step runs the token it chose at once.
                self.counters.tokens_computed += computed + generated.saturating_sub(1);
            }
        }
        results
    }

    /// The step of `token` after `prefix` where an answer reported no entry for it
    /// (llama-server: a token that ends inside a UTF-8 character). One more request at that
    /// position, biased to a plain ASCII token so that the server reports an entry, gives the
    /// raw distribution's top alternatives; the token's log-probability is read among them.
    fn probe_step(&mut self, prefix: &[TokenId], token: TokenId, top_logprobs: usize) -> Result<StepOutput> {
        const PROBE_ALTERNATIVES: usize = 40;
        let jobs = [Generate {
            prompt: prefix.to_vec(),
            max_tokens: 1,
            sampling: marco_core::SamplingParams::greedy(),
            seed: 0,
            top_logprobs: PROBE_ALTERNATIVES.max(top_logprobs),
            stop: Vec::new(),
            model: self.model.clone(),
            bias_to: Some(self.probe_token),
            cache_prompt: self.prefix_cache,
        }];
        let answer = self.generate_all(&jobs).pop().ok_or_else(|| RemoteError::Unsupported("no answer".into()))??;
        let entry = answer.entries.into_iter().flatten().next().ok_or_else(|| RemoteError::Malformed {
            url: self.client.base().to_string(),
            reason: "the probe for a missing log-probability got no entry either".into(),
        })?;
        let logprob = entry.top.iter().find(|t| t.token == token).map(|t| t.logprob).ok_or_else(|| {
            RemoteError::Unsupported(format!(
                "the server reported no log-probability for token {token} (it ends inside a UTF-8 character) and it \
                 is not among the {} most likely tokens there",
                entry.top.len()
            ))
        })?;
        let mut top = entry.top;
        top.truncate(top_logprobs.max(1));
        Ok(StepOutput { token, logprob, top })
    }

    fn seed(stream: u64, position: usize) -> u32 {
        (splitmix64(stream ^ splitmix64(position as u64)) & 0x7fff_ffff) as u32
    }

    fn remember_next(&mut self, tokens: &[TokenId], top: &[TokenLogprob]) {
        if self.known_next.len() >= KNOWN_NEXT_MAX {
            self.known_next.clear();
        }
        self.known_next.insert(key_of(tokens), top.to_vec());
    }

    /// The step of feeding `token` after `tokens`, from remembered candidates.
    fn forced_step(&self, tokens: &[TokenId], token: TokenId) -> Result<StepOutput> {
        let top = self.known_next.get(&key_of(tokens)).ok_or_else(|| {
            RemoteError::Unsupported(format!(
                "forcing token {token} at position {}: the server never reported the candidates there",
                tokens.len()
            ))
        })?;
        let logprob = top.iter().find(|t| t.token == token).map(|t| t.logprob).ok_or_else(|| {
            RemoteError::Unsupported(format!(
                "forcing token {token} at position {}: it is not among the {} candidates the server reported",
                tokens.len(),
                top.len()
            ))
        })?;
        Ok(StepOutput { token, logprob, top: top.clone() })
    }
}

/// The entries of an answer, each at the token it belongs to. llama-server gives a token an
/// entry only when the text generated so far ends on a whole character, so an entry belongs
/// to the last token of its character; matching by id alone could give it to an earlier token
/// with the same id inside that character (a repeated byte). Where the answer has gaps, the
/// entries are placed by that rule (decoding each prefix); if the rule cannot place them all
/// (a tokenizer that decodes differently), they stay where the ids put them.
fn align_entries(
    tokenizer: &dyn Tokenizer,
    tokens: &[TokenId],
    entries: Vec<Option<StepOutput>>,
) -> marco_core::Result<Vec<Option<StepOutput>>> {
    if entries.iter().all(Option::is_some) {
        return Ok(entries);
    }
    let reported: Vec<&StepOutput> = entries.iter().flatten().collect();
    let mut placed = Vec::with_capacity(tokens.len());
    let mut next = reported.iter().peekable();
    for (j, &token) in tokens.iter().enumerate() {
        let matches = next.peek().is_some_and(|e| e.token == token);
        if matches && !tokenizer.decode(&tokens[..=j], false)?.ends_with('\u{FFFD}') {
            placed.push(next.next().map(|e| (*e).clone()));
        } else {
            placed.push(None);
        }
    }
    Ok(if next.next().is_none() { placed } else { entries })
}

fn key_of(tokens: &[TokenId]) -> (u64, usize) {
    let mut h = 0x6d61_7263_6f5f_6b76u64;
    for &t in tokens {
        h = splitmix64(h ^ u64::from(t));
    }
    (h, tokens.len())
}

/// One action in progress inside [`RemoteLm::extend`].
struct Pending {
    base: Vec<TokenId>,
    steps: Vec<StepOutput>,
    end: Option<ActionEnd>,
    /// The last answer stopped at a stop string whose tokens the server dropped: continue
    /// without stop strings for a few tokens.
    after_dropped_stop: bool,
    empty_answers: u32,
}

impl LanguageModel for RemoteLm {
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.tokenizer.as_ref()
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn new_sequence(&mut self, prompt: &[TokenId]) -> marco_core::Result<SeqId> {
        if prompt.is_empty() {
            return Err(Error::EmptyInput("the prompt has no tokens".into()));
        }
        if prompt.len() >= self.max_context {
            return Err(Error::ContextOverflow { needed: prompt.len() + 1, limit: self.max_context });
        }
        self.check_vocab(prompt.iter().copied())?;
        let id = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(id, prompt.to_vec());
        Ok(SeqId(id))
    }

    fn fork(&mut self, seq: SeqId) -> marco_core::Result<SeqId> {
        let tokens = self.tokens(seq)?.clone();
        let id = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(id, tokens);
        Ok(SeqId(id))
    }

    fn append(&mut self, seq: SeqId, tokens: &[TokenId]) -> marco_core::Result<()> {
        self.check_vocab(tokens.iter().copied())?;
        let max_context = self.max_context;
        let s = self.seqs.get_mut(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        if s.len() + tokens.len() >= max_context {
            return Err(Error::ContextOverflow { needed: s.len() + tokens.len() + 1, limit: max_context });
        }
        s.extend_from_slice(tokens);
        Ok(())
    }

    fn step(&mut self, batch: &[StepRequest]) -> marco_core::Result<Vec<StepOutput>> {
        marco_core::check_distinct(batch.iter().map(|r| r.seq), "step")?;
        for r in batch {
            r.sampling.validate()?;
            let len = self.tokens(r.seq)?.len();
            if len >= self.max_context {
                return Err(Error::ContextOverflow { needed: len + 1, limit: self.max_context });
            }
        }
        let mut outputs: Vec<Option<StepOutput>> = vec![None; batch.len()];
        let mut jobs = Vec::new();
        let mut members = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            let tokens = self.tokens(r.seq)?.clone();
            match r.force {
                Some(token) => {
                    self.check_vocab([token])?;
                    outputs[i] = Some(self.forced_step(&tokens, token)?);
                }
                None => {
                    jobs.push(Generate {
                        seed: Self::seed(r.stream_key(), tokens.len()),
                        prompt: tokens,
                        max_tokens: 1,
                        sampling: r.sampling,
                        top_logprobs: r.top_logprobs.max(1),
                        stop: Vec::new(),
                        model: self.model.clone(),
                        bias_to: None,
                        cache_prompt: self.prefix_cache,
                    });
                    members.push(i);
                }
            }
        }
        let answers = self.generate_all(&jobs);
        for ((&i, answer), Generate { prompt, .. }) in members.iter().zip(answers).zip(&jobs) {
            let g = answer?;
            let entries = align_entries(self.tokenizer.as_ref(), &g.tokens, g.entries)?;
            let (token, entry) = g.tokens.into_iter().zip(entries).next().ok_or_else(|| RemoteError::Malformed {
                url: self.client.base().to_string(),
                reason: "the server generated no token for a one-token request".into(),
            })?;
            let step = match entry {
                Some(step) => step,
                None => self.probe_step(prompt, token, batch[i].top_logprobs)?,
            };
            self.check_vocab(std::iter::once(step.token).chain(step.top.iter().map(|t| t.token)))?;
            self.remember_next(prompt, &step.top);
            outputs[i] = Some(step);
        }
        let mut result = Vec::with_capacity(batch.len());
        for (r, out) in batch.iter().zip(outputs) {
            let out = out.ok_or_else(|| Error::Internal("a step request got no output".into()))?;
            if let Some(s) = self.seqs.get_mut(&r.seq.0) {
                s.push(out.token);
            }
            result.push(out);
        }
        Ok(result)
    }

    fn extend(
        &mut self,
        batch: &[ExtendRequest],
        action: &dyn ActionGranularity,
    ) -> marco_core::Result<Vec<ExtendOutput>> {
        marco_core::check_distinct(batch.iter().map(|r| r.seq), "extend")?;
        for r in batch {
            r.sampling.validate()?;
        }
        // Requests are bounded by the granularity's hints; without them, one token each.
        let (hint_max, stops) = match action.hints() {
            Some(h) => (h.max_tokens.unwrap_or(usize::MAX).max(1), h.stop_strings),
            None => (1, Vec::new()),
        };
        let max_context = self.max_context;
        let mut pending = Vec::with_capacity(batch.len());
        for r in batch {
            let base = self.tokens(r.seq)?.clone();
            let end = if base.len() >= max_context {
                Some(ActionEnd::Context)
            } else if r.max_tokens == 0 {
                Some(ActionEnd::Length)
            } else {
                None
            };
            pending.push(Pending { base, steps: Vec::new(), end, after_dropped_stop: false, empty_answers: 0 });
        }
        // Forced first tokens come from remembered candidates, without a request.
        for (p, r) in pending.iter_mut().zip(batch) {
            if let (None, Some(token)) = (p.end, r.force_first) {
                self.check_vocab([token])?;
                let step = self.forced_step(&p.base, token)?;
                p.end = self.add_step(p, step, r, action)?;
            }
        }
        loop {
            let open: Vec<usize> = (0..batch.len()).filter(|&i| pending[i].end.is_none()).collect();
            if open.is_empty() {
                break;
            }
            let jobs: Vec<Generate> = open
                .iter()
                .map(|&i| {
                    let (p, r) = (&pending[i], &batch[i]);
                    let mut prompt = p.base.clone();
                    prompt.extend(p.steps.iter().map(|s| s.token));
                    let room = max_context.saturating_sub(prompt.len());
                    let left = r.max_tokens.saturating_sub(p.steps.len());
                    let (limit, stop) = if p.after_dropped_stop {
                        (4, Vec::new())
                    } else {
                        (hint_max.saturating_sub(p.steps.len()).max(1), stops.clone())
                    };
                    Generate {
                        seed: Self::seed(r.stream.unwrap_or(r.seq.0), prompt.len()),
                        prompt,
                        max_tokens: limit.min(left).min(room).max(1),
                        sampling: r.sampling,
                        top_logprobs: r.top_logprobs.max(1),
                        stop,
                        model: self.model.clone(),
                        bias_to: None,
                        cache_prompt: self.prefix_cache,
                    }
                })
                .collect();
            let answers = self.generate_all(&jobs);
            for ((&i, answer), job) in open.iter().zip(answers).zip(&jobs) {
                let g = answer?;
                let (r, p) = (&batch[i], &mut pending[i]);
                let returned = g.tokens.len();
                let mut prefix = job.prompt.clone();
                let entries = align_entries(self.tokenizer.as_ref(), &g.tokens, g.entries)?;
                for (token, entry) in g.tokens.into_iter().zip(entries) {
                    let step = match entry {
                        Some(step) => step,
                        None => self.probe_step(&prefix, token, r.top_logprobs)?,
                    };
                    self.check_vocab(std::iter::once(step.token).chain(step.top.iter().map(|t| t.token)))?;
                    if prefix.len() == job.prompt.len() {
                        // The candidates at this state, for siblings forced to other first tokens.
                        self.remember_next(&prefix, &step.top);
                    }
                    prefix.push(token);
                    p.end = self.add_step(p, step, r, action)?;
                    if p.end.is_some() {
                        break;
                    }
                }
                self.stats.tokens_trimmed += (returned - (prefix.len() - job.prompt.len())) as u64;
                if p.end.is_none() {
                    p.empty_answers = if returned == 0 { p.empty_answers + 1 } else { 0 };
                    if p.empty_answers >= 3 {
                        return Err(RemoteError::Malformed {
                            url: self.client.base().to_string(),
                            reason: "the server keeps generating nothing for an open action".into(),
                        }
                        .into());
                    }
                    // Stopped at a stop string before the action was complete: the string sat in
                    // leading whitespace (go on as before), or the server dropped the tokens that
                    // made it up (go on without stop strings for a few tokens, which generates
                    // them again).
                    p.after_dropped_stop =
                        g.finish == Finish::Stop && (returned == 0 || !self.kind.keeps_stop_tokens());
                }
            }
        }
        let mut outputs = Vec::with_capacity(batch.len());
        for (p, r) in pending.into_iter().zip(batch) {
            if let Some(s) = self.seqs.get_mut(&r.seq.0) {
                s.extend(p.steps.iter().map(|s| s.token));
            }
            outputs.push(ExtendOutput { steps: p.steps, end: p.end.unwrap_or(ActionEnd::Length) });
        }
        Ok(outputs)
    }

    fn generates_whole_actions(&self) -> bool {
        true
    }

    fn release(&mut self, seq: SeqId) -> marco_core::Result<()> {
        self.seqs.remove(&seq.0).map(|_| ()).ok_or(Error::UnknownSequence(seq.0))
    }

    fn seq_len(&self, seq: SeqId) -> marco_core::Result<usize> {
        Ok(self.tokens(seq)?.len())
    }

    fn counters(&self) -> ModelCounters {
        ModelCounters { live_sequences: self.seqs.len() as u64, ..self.counters }
    }
}

impl RemoteLm {
    /// Adds `step` to an action in progress and says whether the action ends with it
    /// ([`marco_core::action_end`], the rule of the in-process loop).
    fn add_step(
        &self,
        p: &mut Pending,
        step: StepOutput,
        r: &ExtendRequest,
        action: &dyn ActionGranularity,
    ) -> marco_core::Result<Option<ActionEnd>> {
        p.steps.push(step);
        let tokens: Vec<TokenId> = p.steps.iter().map(|s| s.token).collect();
        let len = p.base.len() + tokens.len();
        marco_core::action_end(self.tokenizer.as_ref(), action, &tokens, len, self.max_context, r.max_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE tokenizer whose token `b` is the byte `b` (GPT-2's byte alphabet, no
    /// merges): multi-byte characters take several tokens, as in real vocabularies.
    fn byte_tokenizer() -> MarcoTokenizer {
        let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut chars = bytes.clone();
        let mut n = 0;
        for b in 0..256 {
            if !bytes.contains(&b) {
                bytes.push(b);
                chars.push(256 + n);
                n += 1;
            }
        }
        let vocab: serde_json::Map<String, Value> = bytes
            .iter()
            .zip(&chars)
            .map(|(&b, &c)| (char::from_u32(c).map(String::from).unwrap_or_default(), json!(b)))
            .collect();
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        let dir = std::env::temp_dir().join(format!("marco-remote-byte-tokenizer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let t = MarcoTokenizer::load(dir.join("tokenizer.json")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        t
    }

    fn entry(token: TokenId, logprob: f32) -> Option<StepOutput> {
        Some(StepOutput { token, logprob, top: vec![TokenLogprob { token, logprob }] })
    }

    #[test]
    fn entries_go_to_the_last_token_of_their_character() {
        let t = byte_tokenizer();
        assert_eq!(t.encode("\u{2000}", false).unwrap(), vec![0xE2, 0x80, 0x80]);
        // "a", then U+2000 (E2 80 80): the server reports "a" and the character's last byte.
        let tokens = [u32::from(b'a'), 0xE2, 0x80, 0x80];
        let by_id = vec![entry(u32::from(b'a'), -0.1), None, entry(0x80, -0.7), None];
        let placed = align_entries(&t, &tokens, by_id).unwrap();
        assert_eq!(placed.iter().map(Option::is_some).collect::<Vec<_>>(), vec![true, false, false, true]);
        assert_eq!(placed[3].as_ref().unwrap().logprob, -0.7);
        // Complete answers stay as they are.
        let full = vec![entry(1, -0.1), entry(2, -0.2)];
        assert_eq!(align_entries(&t, &[1, 2], full.clone()).unwrap(), full);
        // Entries the rule cannot place keep the places their ids gave them.
        let odd = vec![None, entry(0x80, -0.5)];
        assert_eq!(align_entries(&t, &[0xE2, 0x80], odd.clone()).unwrap(), odd);
    }
}
