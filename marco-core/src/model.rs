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
//!
//! # Whole actions
//! [`LanguageModel::extend`] advances each of a batch of sequences until its *action* ends
//! (the granularity's [`is_complete`](ActionGranularity::is_complete), a stop token, the
//! context, or a token limit). Its default is a loop of batched [`step`](LanguageModel::step)s,
//! so in-process backends keep their batching and their bits; a model behind an HTTP server
//! overrides it to send one request per action, and says so with
//! [`LanguageModel::generates_whole_actions`] so that a search hands it whole actions.
//!
//! # Randomness
//! A sampled token's uniform draw is [`uniform`](crate::sampling::uniform)`(seed, stream,
//! position)`, where the stream is [`StepRequest::stream`] (the search passes a key derived
//! from the seed and the node's place in the tree) or, when that is `None`, the sequence id. A
//! search's result then depends on its seed and choices only, not on which handles the model
//! gave out before it.

use serde::{Deserialize, Serialize};

use crate::action::ActionGranularity;
use crate::error::{Error, Result};
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
    /// Key of the random stream the draw comes from; `None` uses the sequence id.
    pub stream: Option<u64>,
}

impl StepRequest {
    /// A request to advance `seq` with `sampling`, reporting the top 5.
    pub fn new(seq: SeqId, sampling: SamplingParams) -> Self {
        StepRequest { seq, sampling, force: None, top_logprobs: 5, stream: None }
    }

    /// The key of this request's random stream: [`StepRequest::stream`], else the sequence id.
    pub fn stream_key(&self) -> u64 {
        self.stream.unwrap_or(self.seq.0)
    }
}

/// One entry of a batched [`LanguageModel::extend`]: generate one action on `seq`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtendRequest {
    /// The sequence to extend; it holds the action's tokens afterwards.
    pub seq: SeqId,
    /// How to choose the tokens.
    pub sampling: SamplingParams,
    /// Feed this token as the action's first instead of choosing one (its log-probability and
    /// top-k are still reported).
    pub force_first: Option<TokenId>,
    /// How many top log-probabilities to report per token.
    pub top_logprobs: usize,
    /// Most tokens this call may add to the sequence (a budget's share, the context's room).
    pub max_tokens: usize,
    /// Key of the random stream (see [`StepRequest::stream`]); a model that cannot take it
    /// (a server) derives its request seed from it.
    pub stream: Option<u64>,
}

impl ExtendRequest {
    /// A request to extend `seq` by one action of at most `max_tokens` tokens with `sampling`,
    /// reporting the top 5.
    pub fn new(seq: SeqId, sampling: SamplingParams, max_tokens: usize) -> Self {
        ExtendRequest { seq, sampling, force_first: None, top_logprobs: 5, max_tokens, stream: None }
    }
}

/// Why a [`LanguageModel::extend`] stopped extending a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionEnd {
    /// The granularity says the action is complete.
    Complete,
    /// The last token is a stop token.
    Stop,
    /// The sequence filled the model's context.
    Context,
    /// [`ExtendRequest::max_tokens`] tokens were added before any of the above.
    Length,
}

/// What [`LanguageModel::extend`] generated for one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtendOutput {
    /// One entry per token added, in order (possibly none when `max_tokens` was 0).
    pub steps: Vec<StepOutput>,
    /// Why it stopped.
    pub end: ActionEnd,
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

    /// Extends every request's sequence by one action: token after token until the last one is
    /// a stop token, the sequence fills the context, `action` says the action is complete
    /// (asked after each token, on the tokens added by this call and their text), or
    /// `max_tokens` tokens were added. Returns one output per request, in order; a sequence may
    /// appear at most once.
    ///
    /// The default advances all open sequences together with one batched
    /// [`step`](LanguageModel::step) per token, exactly as a search driving `step` would. A
    /// model that generates many tokens per call (an inference server) overrides it, using
    /// [`ActionGranularity::hints`] to bound each call, and must return the same tokens a
    /// token-by-token loop would have kept: nothing past the point where the action ends.
    fn extend(&mut self, batch: &[ExtendRequest], action: &dyn ActionGranularity) -> Result<Vec<ExtendOutput>> {
        extend_by_steps(self, batch, action)
    }

    /// Whether a search should hand this model whole actions ([`LanguageModel::extend`])
    /// rather than drive it token by token ([`LanguageModel::step`]). `false` by default:
    /// token steps let a search batch walkers whose actions end at different times.
    fn generates_whole_actions(&self) -> bool {
        false
    }
}

/// Fails with [`Error::InvalidConfig`] if a sequence appears twice among `seqs`, the sequences
/// of one batched `call` (`"step"`, `"extend"`).
pub fn check_distinct(seqs: impl IntoIterator<Item = SeqId>, call: &str) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for seq in seqs {
        if !seen.insert(seq) {
            return Err(Error::InvalidConfig(format!("sequence {} appears twice in one {call}", seq.0)));
        }
    }
    Ok(())
}

/// Whether an action ends with its last token, by the rules of [`LanguageModel::extend`], in
/// their order: a stop token, a full context, the granularity's completion, the token limit.
/// `tokens` are the action's tokens so far (the last one just added) and `seq_len` the
/// sequence's length with them. Every whole-action generator, in-process or remote, decides
/// with this one function, so their trees agree token for token.
pub fn action_end(
    tokenizer: &dyn Tokenizer,
    action: &dyn ActionGranularity,
    tokens: &[TokenId],
    seq_len: usize,
    max_context: usize,
    max_tokens: usize,
) -> Result<Option<ActionEnd>> {
    let Some(&last) = tokens.last() else { return Ok(None) };
    if tokenizer.is_stop(last) {
        return Ok(Some(ActionEnd::Stop));
    }
    if seq_len >= max_context {
        return Ok(Some(ActionEnd::Context));
    }
    let text = tokenizer.decode(tokens, true)?;
    Ok(if action.is_complete(tokens, &text) {
        Some(ActionEnd::Complete)
    } else if tokens.len() >= max_tokens {
        Some(ActionEnd::Length)
    } else {
        None
    })
}

/// [`LanguageModel::extend`] as a loop of batched [`LanguageModel::step`]s: the default of
/// that method, callable by an implementation that overrides it for some requests only.
pub fn extend_by_steps<M: LanguageModel + ?Sized>(
    model: &mut M,
    batch: &[ExtendRequest],
    action: &dyn ActionGranularity,
) -> Result<Vec<ExtendOutput>> {
    check_distinct(batch.iter().map(|r| r.seq), "extend")?;
    let max_context = model.max_context();
    let mut lens = batch.iter().map(|r| model.seq_len(r.seq)).collect::<Result<Vec<_>>>()?;
    let mut outputs: Vec<ExtendOutput> =
        batch.iter().map(|_| ExtendOutput { steps: Vec::new(), end: ActionEnd::Length }).collect();
    let mut open: Vec<bool> = batch.iter().zip(&lens).map(|(r, &len)| r.max_tokens > 0 && len < max_context).collect();
    for (i, &len) in lens.iter().enumerate() {
        if len >= max_context {
            outputs[i].end = ActionEnd::Context;
        }
    }
    loop {
        let members: Vec<usize> = (0..batch.len()).filter(|&i| open[i]).collect();
        if members.is_empty() {
            return Ok(outputs);
        }
        let requests: Vec<StepRequest> = members
            .iter()
            .map(|&i| {
                let r = &batch[i];
                StepRequest {
                    seq: r.seq,
                    sampling: r.sampling,
                    force: if outputs[i].steps.is_empty() { r.force_first } else { None },
                    top_logprobs: r.top_logprobs,
                    stream: r.stream,
                }
            })
            .collect();
        let steps = model.step(&requests)?;
        if steps.len() != requests.len() {
            return Err(Error::backend(std::io::Error::other(format!(
                "the model answered {} of {} step requests",
                steps.len(),
                requests.len()
            ))));
        }
        for (&i, step) in members.iter().zip(steps) {
            outputs[i].steps.push(step);
            lens[i] += 1;
            let tokens: Vec<TokenId> = outputs[i].steps.iter().map(|s| s.token).collect();
            let end = action_end(model.tokenizer(), action, &tokens, lens[i], max_context, batch[i].max_tokens)?;
            if let Some(end) = end {
                outputs[i].end = end;
                open[i] = false;
            }
        }
    }
}
