//! The language-model contract: tokenizer access, sequence states, fork, batched step.
//!
//! A model owns its sequence states (and their KV caches) and hands out [`SeqId`] handles,
//! the way mistral.rs keeps its cache outside the module: the search never sees a tensor.
//! The trait is object-safe, so a policy takes `&mut dyn LanguageModel` and runs unchanged on
//! any backend.
//!
//! # The life of a sequence
//! [`LanguageModel::new_sequence`] consumes the prompt and leaves the sequence holding the
//! distribution of its *next* token. [`LanguageModel::step`] chooses a token from that
//! distribution (sampled, greedy, or forced), reports it with its top-k log-probabilities,
//! feeds it, and so again leaves the next distribution pending. [`LanguageModel::fork`]
//! copies a state so that two continuations can share a prefix; an implementation is
//! expected to make this cheap (no KV copy). [`LanguageModel::release`] frees a state.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::sampling::SamplingParams;
use crate::token::{StepOutput, TokenId};

/// Handle of a sequence state owned by a [`LanguageModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqId(pub u64);

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Text ↔ token ids, special tokens and the model's own chat template.
pub trait Tokenizer {
    /// Token ids of `text`. With `parse_special`, special-token strings such as
    /// `<|im_start|>` become their ids; a BOS token is added only if the model asks for one.
    fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>>;
    /// Text of `tokens`; special tokens are left out when `skip_special`.
    fn decode(&self, tokens: &[TokenId], skip_special: bool) -> Result<String>;
    /// Number of ids in the vocabulary.
    fn vocab_size(&self) -> usize;
    /// Tokens that end a generation (EOS, `<|im_end|>`, …).
    fn stop_tokens(&self) -> &[TokenId];
    /// Renders `messages` with the model's chat template; with `add_generation_prompt` the
    /// text ends where the assistant's answer begins.
    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String>;

    /// Whether `token` ends a generation.
    fn is_stop(&self, token: TokenId) -> bool {
        self.stop_tokens().contains(&token)
    }
}

/// One entry of a batched [`LanguageModel::step`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRequest {
    /// The sequence to advance.
    pub seq: SeqId,
    /// How to choose the token.
    pub sampling: SamplingParams,
    /// Teacher forcing: feed this token instead of choosing one (its log-probability and the
    /// top-k are still reported).
    pub force: Option<TokenId>,
    /// How many top log-probabilities to report (at least 5 for the confidence reward).
    pub top_logprobs: usize,
}

impl StepRequest {
    /// A request to advance `seq` with `sampling`, reporting the top 5.
    pub fn new(seq: SeqId, sampling: SamplingParams) -> Self {
        StepRequest { seq, sampling, force: None, top_logprobs: 5 }
    }
}

/// Work counters of a model, cumulative since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCounters {
    /// Token positions run through the network (prefill and decode together).
    pub tokens_computed: u64,
    /// Forward passes (a batched step is one).
    pub forward_passes: u64,
    /// Sequence states alive now.
    pub live_sequences: u64,
    /// Bytes of KV cache in use now (0 where a model has none).
    pub kv_bytes_in_use: u64,
    /// Bytes of KV cache one token occupies (0 where a model has none).
    pub kv_bytes_per_token: u64,
}

/// A causal language model that a search can drive.
pub trait LanguageModel {
    /// The model's tokenizer.
    fn tokenizer(&self) -> &dyn Tokenizer;

    /// Maximum number of tokens a sequence may hold.
    fn max_context(&self) -> usize;

    /// Creates a sequence from `prompt` (not empty) and computes the distribution of its next token.
    fn new_sequence(&mut self, prompt: &[TokenId]) -> Result<SeqId>;

    /// A new sequence with the same tokens and pending distribution as `seq`.
    fn fork(&mut self, seq: SeqId) -> Result<SeqId>;

    /// Feeds known `tokens` (a reflection prompt, say) to `seq`, replacing its pending
    /// distribution with the one after them.
    fn append(&mut self, seq: SeqId, tokens: &[TokenId]) -> Result<()>;

    /// Advances every request's sequence by one token, in one batched evaluation where the
    /// implementation can. Returns one output per request, in order. A sequence may appear
    /// at most once per call.
    fn step(&mut self, batch: &[StepRequest]) -> Result<Vec<StepOutput>>;

    /// Frees `seq`; its handle becomes invalid.
    fn release(&mut self, seq: SeqId) -> Result<()>;

    /// Number of tokens `seq` holds.
    fn seq_len(&self, seq: SeqId) -> Result<usize>;

    /// Work counters.
    fn counters(&self) -> ModelCounters;
}
