//! [`ServerTokenizer`]: the served model's own tokenizer, asked over HTTP (llama-server's
//! `/tokenize`, `/detokenize` and `/props`), for when no tokenizer file is at hand.
//!
//! Every `encode` and `decode` is a request, so a search is slower than with a local file
//! (`TokenizerSource::File`): a search decodes each action after every token to see whether
//! it is complete. Decodings are cached by their tokens. Whether a token is special (left out
//! of a decoding with `skip_special`) is found once per token: its text, tokenized with
//! special tokens parsed, gives the token back, and tokenized as plain text does not.

use std::collections::HashMap;
use std::sync::Mutex;

use marco_core::{ChatMessage, Error, TokenId, Tokenizer};
use marco_formats::ChatTemplate;
use serde_json::{json, Value};

use crate::error::{RemoteError, Result};
use crate::http::Client;
use crate::protocol::ServerKind;

/// Decodings kept (a search asks for the same prefixes again and again).
const DECODE_CACHE_MAX: usize = 1 << 14;

/// A tokenizer that asks a llama-server.
pub struct ServerTokenizer {
    client: Client,
    vocab_size: usize,
    stop: Vec<TokenId>,
    template: Option<ChatTemplate>,
    decoded: Mutex<HashMap<Vec<TokenId>, String>>,
    special: Mutex<HashMap<TokenId, bool>>,
}

impl std::fmt::Debug for ServerTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTokenizer")
            .field("url", &self.client.base())
            .field("vocab_size", &self.vocab_size)
            .field("stop", &self.stop)
            .field("has_chat_template", &self.template.is_some())
            .finish()
    }
}

impl ServerTokenizer {
    /// The tokenizer of the llama-server behind `client`: its vocabulary size from
    /// `GET /v1/models`, its end-of-generation token and chat template from `GET /props`.
    pub(crate) fn connect(client: Client, kind: ServerKind, models: &Value) -> Result<Self> {
        if kind != ServerKind::LlamaCpp {
            return Err(RemoteError::Unsupported(format!(
                "{kind:?} does not report its vocabulary and end-of-sequence token: pass the model's tokenizer file"
            )));
        }
        let bad = |url: &str, reason: &str| RemoteError::Malformed { url: url.to_string(), reason: reason.to_string() };
        let vocab_size = models
            .pointer("/data/0/meta/n_vocab")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(client.base(), "GET /v1/models reports no meta.n_vocab"))?
            as usize;
        let props = client.get("/props")?;
        let text = |key: &str| props.json.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
        let eos = text("eos_token").ok_or_else(|| bad(&props.url, "no eos_token"))?.to_string();
        let bos = text("bos_token").map(str::to_string);
        let template = match text("chat_template") {
            Some(source) => Some(ChatTemplate::new(source, bos.as_deref(), Some(&eos))?),
            None => None,
        };
        let mut tokenizer = ServerTokenizer {
            client,
            vocab_size,
            stop: Vec::new(),
            template,
            decoded: Mutex::new(HashMap::new()),
            special: Mutex::new(HashMap::new()),
        };
        let stop = tokenizer.tokenize(&eos, true)?;
        if stop.len() != 1 {
            return Err(bad(&props.url, &format!("the eos_token {eos:?} is not one token: {stop:?}")));
        }
        tokenizer.stop = stop;
        Ok(tokenizer)
    }

    fn detokenize(&self, tokens: &[TokenId]) -> Result<String> {
        let answer = self.client.post("/detokenize", &json!({ "tokens": tokens }))?;
        let text = answer
            .json
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| RemoteError::Malformed { url: answer.url.clone(), reason: "no content string".into() })?;
        Ok(text.to_string())
    }

    /// Whether `token` is a special (control) token.
    fn is_special(&self, token: TokenId) -> Result<bool> {
        if self.stop.contains(&token) {
            return Ok(true);
        }
        if let Some(&known) = self.special.lock().ok().as_ref().and_then(|m| m.get(&token)) {
            return Ok(known);
        }
        let text = self.detokenize(&[token])?;
        let special =
            !text.is_empty() && self.tokenize(&text, true)? == [token] && self.tokenize(&text, false)? != [token];
        if let Ok(mut known) = self.special.lock() {
            known.insert(token, special);
        }
        Ok(special)
    }

    fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>> {
        let answer = self
            .client
            .post("/tokenize", &json!({ "content": text, "add_special": false, "parse_special": parse_special }))?;
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
}

impl Tokenizer for ServerTokenizer {
    fn encode(&self, text: &str, parse_special: bool) -> marco_core::Result<Vec<TokenId>> {
        Ok(self.tokenize(text, parse_special)?)
    }

    fn decode(&self, tokens: &[TokenId], skip_special: bool) -> marco_core::Result<String> {
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::TokenOutOfRange { token, vocab_size: self.vocab_size });
        }
        // The server renders every token, special ones included.
        let mut kept = Vec::with_capacity(tokens.len());
        for &t in tokens {
            if !(skip_special && self.is_special(t)?) {
                kept.push(t);
            }
        }
        if let Some(text) = self.decoded.lock().ok().and_then(|cache| cache.get(&kept).cloned()) {
            return Ok(text);
        }
        let text = self.detokenize(&kept)?;
        if let Ok(mut cache) = self.decoded.lock() {
            if cache.len() >= DECODE_CACHE_MAX {
                cache.clear();
            }
            cache.insert(kept, text.clone());
        }
        Ok(text)
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn stop_tokens(&self) -> &[TokenId] {
        &self.stop
    }

    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> marco_core::Result<String> {
        match &self.template {
            Some(template) => Ok(template.render(messages, add_generation_prompt)?),
            None => Err(Error::Tokenizer("the server reports no chat template".into())),
        }
    }
}
