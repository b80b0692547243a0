//! The wire formats: what marco asks each kind of server and how it reads the answers.
//!
//! All three servers take the prompt as token ids and report, per generated token, its id,
//! its log-probability under the *unmodified* distribution, and the top-k alternatives:
//!
//! | server | endpoint | generated ids and top-k | prompt tokens computed |
//! | --- | --- | --- | --- |
//! | llama.cpp `llama-server` | `POST /completion` (native: the fields of `/v1/completions` plus every generated id) | `tokens` (with `return_tokens`); `completion_probabilities[i].{id, logprob, top_logprobs[j].{id, logprob}}` | `timings.prompt_n` (`timings.cache_n` were reused) |
//! | vLLM | `POST /v1/completions` with `return_tokens_as_token_ids` | `choices[0].logprobs.{tokens, token_logprobs, top_logprobs}` keyed `"token_id:N"` | `usage.prompt_tokens` − `usage.prompt_tokens_details.cached_tokens` (with `--enable-prompt-tokens-details`) |
//! | SGLang | `POST /generate` (its `/v1/completions` returns token *text* only) | `meta_info.output_token_logprobs[i] = [logprob, id, _]`, `output_top_logprobs[i][j]` | `meta_info.prompt_tokens` − `meta_info.cached_tokens` |
//!
//! Where a server does not say how much of a prompt it had cached, every prompt token counts
//! as computed: the counters never flatter a server.
//!
//! llama-server reports log-probabilities for a subset of its tokens: none for a token that
//! ends inside a UTF-8 character, and at a matched stop string it drops as many entries as the
//! string has tokens on its own. Its `tokens` list is complete, so an answer is read as the
//! tokens, each with its entry where there is one (`Generated::entries`); the client asks for a
//! missing entry separately (see [`crate::lm`]). vLLM and SGLang (with `no_stop_trim`) report
//! every token.

use marco_core::{SamplingParams, StepOutput, TokenId, TokenLogprob};
use serde_json::{json, Value};

use crate::error::{RemoteError, Result};

/// Which server marco talks to, detected at connect time from `GET /v1/models`' `owned_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerKind {
    /// llama.cpp's `llama-server`.
    LlamaCpp,
    /// vLLM's OpenAI-compatible server.
    Vllm,
    /// SGLang's server (its native `/generate` endpoint).
    Sglang,
}

impl ServerKind {
    /// Recognises a server from its `owned_by` string.
    pub fn from_owned_by(owned_by: &str) -> Option<Self> {
        match owned_by.to_ascii_lowercase().as_str() {
            "llamacpp" | "llama.cpp" | "llama-cpp" => Some(ServerKind::LlamaCpp),
            "vllm" => Some(ServerKind::Vllm),
            "sglang" => Some(ServerKind::Sglang),
            _ => None,
        }
    }

    /// Whether the server keeps the tokens of a matched stop string in its log-probabilities.
    pub fn keeps_stop_tokens(self) -> bool {
        !matches!(self, ServerKind::LlamaCpp)
    }

    /// The endpoint that generates.
    pub fn generate_path(self) -> &'static str {
        match self {
            ServerKind::LlamaCpp => "/completion",
            ServerKind::Sglang => "/generate",
            ServerKind::Vllm => "/v1/completions",
        }
    }
}

impl std::str::FromStr for ServerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llama.cpp" | "llamacpp" | "llama-server" => Ok(ServerKind::LlamaCpp),
            "vllm" => Ok(ServerKind::Vllm),
            "sglang" => Ok(ServerKind::Sglang),
            other => Err(format!("unknown server kind {other:?} (llama.cpp, vllm, sglang)")),
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Generate {
    pub prompt: Vec<TokenId>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u32,
    pub top_logprobs: usize,
    pub stop: Vec<String>,
    /// Served model name (vLLM checks it).
    pub model: Option<String>,
    /// A token to generate whatever the distribution says (llama-server's `logit_bias`): its
    /// entry still reports the raw distribution's top alternatives.
    pub bias_to: Option<TokenId>,
    /// Let the server reuse a cached prefix (llama-server's `cache_prompt`; vLLM and SGLang
    /// decide on the server's command line).
    pub cache_prompt: bool,
}

/// How a generation ended, as the server says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// `max_tokens` reached.
    Length,
    /// An end-of-sequence token or a stop string.
    Stop,
    /// Anything else (aborted, an unknown reason).
    Other,
}

/// What one generation request returned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Generated {
    /// Every generated token.
    pub tokens: Vec<TokenId>,
    /// Each token's step, where the server reported one.
    pub entries: Vec<Option<StepOutput>>,
    pub finish: Finish,
    /// Prompt tokens the server computed (not taken from its cache); `None` if it did not say.
    pub prompt_computed: Option<u64>,
    /// Tokens the server generated (its count, which includes tokens whose log-probabilities
    /// it dropped at a stop string).
    pub generated: Option<u64>,
}

impl Generated {
    fn complete(steps: Vec<StepOutput>, finish: Finish, prompt_computed: Option<u64>, generated: Option<u64>) -> Self {
        Generated {
            tokens: steps.iter().map(|s| s.token).collect(),
            entries: steps.into_iter().map(Some).collect(),
            finish,
            prompt_computed,
            generated,
        }
    }
}

/// The request body for `kind`.
pub(crate) fn request_body(kind: ServerKind, g: &Generate) -> Value {
    let temperature = if g.sampling.is_greedy() { 0.0 } else { g.sampling.temperature };
    let top_p = g.sampling.top_p;
    // 0 and -1 both mean "no top-k" on the servers that take it; llama.cpp wants 0.
    let top_k = if g.sampling.top_k == 0 { None } else { Some(g.sampling.top_k) };
    match kind {
        ServerKind::LlamaCpp => {
            let mut body = json!({
                "prompt": g.prompt,
                "max_tokens": g.max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k.unwrap_or(0),
                // Plain sampling: no min-p, typical-p, penalties, DRY or XTC (llama.cpp's
                // defaults turn some of them on).
                "min_p": 0.0,
                "typical_p": 1.0,
                "repeat_penalty": 1.0,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
                "dry_multiplier": 0.0,
                "xtc_probability": 0.0,
                "seed": g.seed,
                "n_probs": g.top_logprobs,
                "post_sampling_probs": false,
                "stop": g.stop,
                "cache_prompt": g.cache_prompt,
                "return_tokens": true,
                // marco's order: temperature, then the nucleus (llama.cpp's default chain cuts
                // top-p before the temperature).
                "samplers": ["top_k", "temperature", "top_p"],
                "stream": false,
            });
            if let Some(token) = g.bias_to {
                body["logit_bias"] = json!([[token, 1000.0]]);
            }
            body
        }
        ServerKind::Vllm => {
            let mut body = json!({
                "prompt": g.prompt,
                "max_tokens": g.max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k.map_or(-1, |k| k as i64),
                "min_p": 0.0,
                "repetition_penalty": 1.0,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
                "seed": g.seed,
                "logprobs": g.top_logprobs,
                "return_tokens_as_token_ids": true,
                "stop": g.stop,
                "include_stop_str_in_output": true,
                "skip_special_tokens": false,
                "stream": false,
            });
            if let Some(model) = &g.model {
                body["model"] = json!(model);
            }
            body
        }
        ServerKind::Sglang => json!({
            "input_ids": g.prompt,
            "sampling_params": {
                "max_new_tokens": g.max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k.map_or(-1, |k| k as i64),
                "min_p": 0.0,
                "stop": g.stop,
                "no_stop_trim": true,
                "skip_special_tokens": false,
                "sampling_seed": g.seed,
            },
            "return_logprob": true,
            "top_logprobs_num": g.top_logprobs,
            "logprob_start_len": -1,
            "return_text_in_logprobs": false,
            "stream": false,
        }),
    }
}

/// Reads a generation answer of `kind`; `top_logprobs` is how many alternatives to keep.
pub(crate) fn parse_generated(kind: ServerKind, url: &str, json: &Value, top_logprobs: usize) -> Result<Generated> {
    let bad = |reason: String| RemoteError::Malformed { url: url.to_string(), reason };
    match kind {
        ServerKind::LlamaCpp => {
            let finish = match json.get("stop_type").and_then(Value::as_str) {
                Some("eos") | Some("word") => Finish::Stop,
                Some("limit") => Finish::Length,
                _ => Finish::Other,
            };
            let tokens: Vec<TokenId> = match json.get("tokens") {
                Some(Value::Array(items)) => items
                    .iter()
                    .enumerate()
                    .map(|(i, t)| id_of(Some(t)).ok_or_else(|| bad(format!("tokens[{i}] is not a token id"))))
                    .collect::<Result<_>>()?,
                _ => return Err(bad("no tokens array (does this llama-server take return_tokens?)".into())),
            };
            let content = match json.get("completion_probabilities") {
                Some(Value::Array(items)) => items.as_slice(),
                // Absent when no token got an entry (one token that ends inside a character).
                None | Some(Value::Null) => &[],
                _ => return Err(bad("completion_probabilities is not an array".into())),
            };
            let mut reported = Vec::with_capacity(content.len());
            for (i, item) in content.iter().enumerate() {
                let token =
                    id_of(item.get("id")).ok_or_else(|| bad(format!("completion_probabilities[{i}].id missing")))?;
                let logprob = logprob_of(item.get("logprob"))
                    .ok_or_else(|| bad(format!("completion_probabilities[{i}].logprob missing")))?;
                let alts = item
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad(format!("completion_probabilities[{i}].top_logprobs missing")))?;
                let mut top = Vec::with_capacity(alts.len());
                for (j, alt) in alts.iter().enumerate() {
                    let t = id_of(alt.get("id")).ok_or_else(|| bad(format!("top_logprobs[{i}][{j}].id missing")))?;
                    let lp = logprob_of(alt.get("logprob"))
                        .ok_or_else(|| bad(format!("top_logprobs[{i}][{j}].logprob missing")))?;
                    top.push(TokenLogprob { token: t, logprob: lp });
                }
                reported.push(step(token, logprob, top, top_logprobs));
            }
            // Entries come in token order, skipping some tokens: align them.
            let mut entries = Vec::with_capacity(tokens.len());
            let mut next = reported.into_iter().peekable();
            for &t in &tokens {
                match next.peek() {
                    Some(e) if e.token == t => entries.push(next.next()),
                    _ => entries.push(None),
                }
            }
            if next.next().is_some() {
                return Err(bad("completion_probabilities do not follow the generated tokens".into()));
            }
            let prompt_computed = json.pointer("/timings/prompt_n").and_then(Value::as_u64);
            let generated = json.get("tokens_predicted").and_then(Value::as_u64);
            Ok(Generated { tokens, entries, finish, prompt_computed, generated })
        }
        ServerKind::Vllm => {
            let choice = json.pointer("/choices/0").ok_or_else(|| bad("no choices[0]".into()))?;
            let finish = finish_of(choice.get("finish_reason").and_then(Value::as_str));
            let generated = json.pointer("/usage/completion_tokens").and_then(Value::as_u64);
            let logprobs = match choice.get("logprobs") {
                Some(l) if l.is_object() => l,
                _ if generated == Some(0) => {
                    return Ok(Generated {
                        tokens: Vec::new(),
                        entries: Vec::new(),
                        finish,
                        prompt_computed: None,
                        generated,
                    });
                }
                _ => return Err(bad("no logprobs in the answer".into())),
            };
            let tokens = logprobs
                .get("tokens")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("logprobs.tokens missing".into()))?;
            let lps = logprobs
                .get("token_logprobs")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("logprobs.token_logprobs missing".into()))?;
            let tops = logprobs
                .get("top_logprobs")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("logprobs.top_logprobs missing".into()))?;
            if lps.len() != tokens.len() || tops.len() != tokens.len() {
                return Err(bad("logprobs arrays of different lengths".into()));
            }
            let mut steps = Vec::with_capacity(tokens.len());
            for i in 0..tokens.len() {
                let token = token_id_string(&tokens[i]).ok_or_else(|| {
                    bad(format!("logprobs.tokens[{i}] is not \"token_id:N\" (send return_tokens_as_token_ids)"))
                })?;
                let logprob = logprob_of(Some(&lps[i])).ok_or_else(|| bad(format!("token_logprobs[{i}] missing")))?;
                let map = tops[i].as_object().ok_or_else(|| bad(format!("top_logprobs[{i}] is not an object")))?;
                let mut top = Vec::with_capacity(map.len());
                for (key, value) in map {
                    let t = key
                        .strip_prefix("token_id:")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| bad(format!("top_logprobs[{i}] key {key:?} is not \"token_id:N\"")))?;
                    let lp = logprob_of(Some(value)).ok_or_else(|| bad(format!("top_logprobs[{i}][{key}] missing")))?;
                    top.push(TokenLogprob { token: t, logprob: lp });
                }
                steps.push(step(token, logprob, top, top_logprobs));
            }
            let prompt = json.pointer("/usage/prompt_tokens").and_then(Value::as_u64);
            let cached = json.pointer("/usage/prompt_tokens_details/cached_tokens").and_then(Value::as_u64);
            let prompt_computed = prompt.map(|p| p.saturating_sub(cached.unwrap_or(0)));
            Ok(Generated::complete(steps, finish, prompt_computed, generated))
        }
        ServerKind::Sglang => {
            let meta = json.get("meta_info").ok_or_else(|| bad("meta_info missing".into()))?;
            let finish = finish_of(meta.pointer("/finish_reason/type").and_then(Value::as_str));
            let generated = meta.get("completion_tokens").and_then(Value::as_u64);
            let lps = meta
                .get("output_token_logprobs")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("meta_info.output_token_logprobs missing".into()))?;
            let tops = meta
                .get("output_top_logprobs")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("meta_info.output_top_logprobs missing".into()))?;
            if tops.len() != lps.len() {
                return Err(bad("output_token_logprobs and output_top_logprobs differ in length".into()));
            }
            let triple = |v: &Value, what: &str| -> Result<TokenLogprob> {
                let a = v.as_array().ok_or_else(|| bad(format!("{what} is not [logprob, id, text]")))?;
                let logprob = logprob_of(a.first()).ok_or_else(|| bad(format!("{what}: logprob missing")))?;
                let token = id_of(a.get(1)).ok_or_else(|| bad(format!("{what}: token id missing")))?;
                Ok(TokenLogprob { token, logprob })
            };
            let mut steps = Vec::with_capacity(lps.len());
            for i in 0..lps.len() {
                let chosen = triple(&lps[i], &format!("output_token_logprobs[{i}]"))?;
                let mut top = Vec::new();
                if let Some(alts) = tops[i].as_array() {
                    for (j, alt) in alts.iter().enumerate() {
                        top.push(triple(alt, &format!("output_top_logprobs[{i}][{j}]"))?);
                    }
                }
                steps.push(step(chosen.token, chosen.logprob, top, top_logprobs));
            }
            let prompt = meta.get("prompt_tokens").and_then(Value::as_u64);
            let cached = meta.get("cached_tokens").and_then(Value::as_u64);
            let prompt_computed = prompt.map(|p| p.saturating_sub(cached.unwrap_or(0)));
            Ok(Generated::complete(steps, finish, prompt_computed, generated))
        }
    }
}

/// A step with its alternatives sorted (log-probability descending, smaller id first on ties,
/// as marco's own top-k) and cut to `k`.
fn step(token: TokenId, logprob: f32, mut top: Vec<TokenLogprob>, k: usize) -> StepOutput {
    top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob).then(a.token.cmp(&b.token)));
    top.dedup_by_key(|t| t.token);
    top.truncate(k);
    StepOutput { token, logprob, top }
}

fn finish_of(reason: Option<&str>) -> Finish {
    match reason {
        Some("length") => Finish::Length,
        Some("stop") | Some("eos") => Finish::Stop,
        _ => Finish::Other,
    }
}

fn id_of(v: Option<&Value>) -> Option<TokenId> {
    v.and_then(Value::as_u64).and_then(|n| TokenId::try_from(n).ok())
}

fn token_id_string(v: &Value) -> Option<TokenId> {
    v.as_str()?.strip_prefix("token_id:")?.parse().ok()
}

/// A log-probability; servers write an impossible token as a huge negative number (llama.cpp:
/// the lowest f32; vLLM: -9999) or `null`, which become `-inf`.
fn logprob_of(v: Option<&Value>) -> Option<f32> {
    match v? {
        Value::Null => Some(f32::NEG_INFINITY),
        other => {
            let x = other.as_f64()?;
            if x.is_nan() || x > 1e-3 {
                return None;
            }
            Some(if x <= -9999.0 { f32::NEG_INFINITY } else { x.min(0.0) as f32 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"content":" Hi","tokens":[28,40,9],"stop_type":"limit","tokens_predicted":3,"completion_probabilities":[
        {"id":28,"token":" H","bytes":[32,72],"logprob":-0.25,"top_logprobs":[{"id":28,"token":" H","bytes":[],"logprob":-0.25},{"id":5,"token":"x","bytes":[],"logprob":-1.5},{"id":7,"token":"y","bytes":[],"logprob":-3.4028234663852886e38}]},
        {"id":9,"token":"i","bytes":[105],"logprob":-2.0,"top_logprobs":[{"id":3,"token":"a","bytes":[],"logprob":-0.5},{"id":9,"token":"i","bytes":[],"logprob":-2.0}]}],
        "timings":{"cache_n":7,"prompt_n":3,"predicted_n":3}}"#;

    #[test]
    fn llama_cpp_answers_parse() {
        let json: Value = serde_json::from_str(LLAMA).unwrap();
        let g = parse_generated(ServerKind::LlamaCpp, "u", &json, 5).unwrap();
        assert_eq!(g.finish, Finish::Length);
        assert_eq!(g.prompt_computed, Some(3));
        assert_eq!(g.generated, Some(3));
        assert_eq!(g.tokens, vec![28, 40, 9]);
        // Token 40 ends inside a character: no entry.
        assert!(g.entries[1].is_none());
        let (first, last) = (g.entries[0].as_ref().unwrap(), g.entries[2].as_ref().unwrap());
        assert_eq!((first.token, first.logprob), (28, -0.25));
        assert_eq!(first.top[2].logprob, f32::NEG_INFINITY);
        assert_eq!(last.top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![3, 9]);
        assert_eq!(last.rank_in_top(), Some(1));
        let shuffled: Value = serde_json::from_str(
            r#"{"tokens":[1],"stop_type":"limit","completion_probabilities":[{"id":2,"logprob":-1,"top_logprobs":[]}]}"#,
        )
        .unwrap();
        assert!(parse_generated(ServerKind::LlamaCpp, "u", &shuffled, 5).is_err());
    }

    #[test]
    fn vllm_answers_parse() {
        let json: Value = serde_json::from_str(
            r#"{"choices":[{"index":0,"text":"ab","finish_reason":"stop","logprobs":{"text_offset":[0,11],
            "tokens":["token_id:4","token_id:2"],"token_logprobs":[-1.0,-0.1],
            "top_logprobs":[{"token_id:4":-1.0,"token_id:1":-0.7,"token_id:0":-9999.0},{"token_id:2":-0.1}]}}],
            "usage":{"prompt_tokens":20,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":16}}}"#,
        )
        .unwrap();
        let g = parse_generated(ServerKind::Vllm, "u", &json, 5).unwrap();
        assert_eq!(g.finish, Finish::Stop);
        assert_eq!(g.prompt_computed, Some(4));
        let first = g.entries[0].as_ref().unwrap();
        assert_eq!(first.top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![1, 4, 0]);
        assert_eq!(first.top[2].logprob, f32::NEG_INFINITY);
        let text_tokens: Value = serde_json::from_str(
            r#"{"choices":[{"finish_reason":"length","logprobs":{"tokens":["ab"],"token_logprobs":[-1.0],"top_logprobs":[{"ab":-1.0}]}}]}"#,
        )
        .unwrap();
        let err = parse_generated(ServerKind::Vllm, "u", &text_tokens, 5).unwrap_err();
        assert!(err.to_string().contains("return_tokens_as_token_ids"), "{err}");
    }

    #[test]
    fn sglang_answers_parse() {
        let json: Value = serde_json::from_str(
            r#"{"text":"ab","output_ids":[4,2],"meta_info":{"finish_reason":{"type":"length","length":2},
            "prompt_tokens":12,"completion_tokens":2,"cached_tokens":11,
            "output_token_logprobs":[[-1.0,4,null],[-0.1,2,null]],
            "output_top_logprobs":[[[-0.7,1,null],[-1.0,4,null]],[[-0.1,2,null]]]}}"#,
        )
        .unwrap();
        let g = parse_generated(ServerKind::Sglang, "u", &json, 5).unwrap();
        assert_eq!(g.prompt_computed, Some(1));
        assert_eq!(g.tokens, vec![4, 2]);
        assert_eq!(g.entries[0].as_ref().unwrap().top[0].token, 1);
    }

    #[test]
    fn broken_answers_are_typed_errors() {
        let cases = [
            r#"{}"#,
            r#"{"tokens":"x"}"#,
            r#"{"tokens":[1,2,3],"completion_probabilities":{}}"#,
            r#"{"tokens":[1],"completion_probabilities":[{"id":"x","logprob":-1,"top_logprobs":[]}]}"#,
            r#"{"tokens":[1],"completion_probabilities":[{"id":1,"logprob":-1}]}"#,
            r#"{"tokens":[1],"completion_probabilities":[{"id":1,"logprob":3.5,"top_logprobs":[]}]}"#,
            r#"{"tokens":[1],"completion_probabilities":"nope"}"#,
        ];
        for case in cases {
            let json: Value = serde_json::from_str(case).unwrap();
            let err = parse_generated(ServerKind::LlamaCpp, "http://x", &json, 5).unwrap_err();
            assert!(matches!(err, RemoteError::Malformed { .. }), "{case}: {err:?}");
        }
        let json: Value =
            serde_json::from_str(r#"{"meta_info":{"output_token_logprobs":[[-1.0]],"output_top_logprobs":[[]]}}"#)
                .unwrap();
        assert!(parse_generated(ServerKind::Sglang, "u", &json, 5).is_err());
    }

    #[test]
    fn request_bodies_carry_what_the_confidence_reward_needs() {
        let g = Generate {
            prompt: vec![1, 2, 3],
            max_tokens: 32,
            sampling: SamplingParams::with_temperature(0.7, 9),
            seed: 77,
            top_logprobs: 5,
            stop: vec!["\n".to_string()],
            model: Some("m".into()),
            bias_to: Some(4),
            cache_prompt: true,
        };
        let l = request_body(ServerKind::LlamaCpp, &g);
        assert_eq!((l["n_probs"].as_u64(), l["seed"].as_u64()), (Some(5), Some(77)));
        assert_eq!((l["stop"].clone(), l["logit_bias"].clone()), (json!(["\n"]), json!([[4, 1000.0]])));
        assert_eq!(l["prompt"], json!([1, 2, 3]));
        assert_eq!((l["cache_prompt"].as_bool(), l["return_tokens"].as_bool()), (Some(true), Some(true)));
        let v = request_body(ServerKind::Vllm, &g);
        assert_eq!((v["logprobs"].as_u64(), v["return_tokens_as_token_ids"].as_bool()), (Some(5), Some(true)));
        assert_eq!(v["model"], json!("m"));
        let s = request_body(ServerKind::Sglang, &g);
        assert_eq!(s["input_ids"], json!([1, 2, 3]));
        assert_eq!(s["sampling_params"]["max_new_tokens"].as_u64(), Some(32));
        let greedy = Generate { sampling: SamplingParams::greedy(), ..g.clone() };
        assert_eq!(request_body(ServerKind::LlamaCpp, &greedy)["temperature"].as_f64(), Some(0.0));
    }
}
