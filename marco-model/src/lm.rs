//! [`BurnLm`]: the burn network behind marco-core's [`LanguageModel`] contract.
//!
//! Each sequence state holds its [`KvCache`] and the logits of its *pending* next token: its
//! row of the `[rows, vocab]` output of the forward pass that produced it, which stays on the
//! device. [`LanguageModel::step`] takes the pending rows of the whole batch (that output as it
//! is when the batch is exactly the previous pass's sequences in order, as in a batched decode
//! loop; else the rows stacked), chooses every token from them, then feeds all chosen tokens
//! in **one** forward pass (a ragged batch: sequences of different lengths need no padding).
//!
//! What crosses to the host per step and sequence is small: the log-sum-exp (also the NaN/inf
//! check: any non-finite logit makes it non-finite), the top-k values and ids
//! (selected by [`KernelBackend::top_k`], on the device), and the logit of a forced token.
//! Only temperature sampling copies a full row, because sampling with top-p needs the whole
//! distribution; greedy and forced steps never do.
//!
//! Sampling draws come from [`marco_core::sampling::uniform`]`(seed, stream, position)` (the
//! stream: the request's key, else the sequence id),
//! so results do not depend on how sequences are grouped into batches.

use std::collections::{HashMap, HashSet};

use burn::tensor::{Int, Tensor, TensorData};
use marco_core::sampling::{sample, uniform};
use marco_core::{
    Error, LanguageModel, ModelCounters, Result, SeqId, StepOutput, StepRequest, TokenId, TokenLogprob, Tokenizer,
};

use crate::backend::KernelBackend;
use crate::cache::KvCache;
use crate::model::{ForwardItem, LogitsAt, Transformer};

/// Longest run of tokens fed in one forward during prefill or append (bounds the attention
/// score matrix of long prompts).
const PREFILL_CHUNK: usize = 512;

/// One sequence's state.
#[derive(Debug)]
struct SeqState<B: KernelBackend> {
    len: usize,
    cache: KvCache<B>,
    /// Logits of the next token.
    pending: Pending<B>,
}

/// Row `row` of `logits`, the `[rows, vocab]` output of forward pass number `forward` (shared
/// by the sequences of that pass).
#[derive(Debug, Clone)]
struct Pending<B: KernelBackend> {
    forward: u64,
    row: usize,
    logits: Tensor<B, 2>,
}

impl<B: KernelBackend> Pending<B> {
    /// This sequence's row, `[1, vocab]`.
    fn row_logits(&self) -> Tensor<B, 2> {
        let [rows, vocab] = self.logits.dims();
        if rows == 1 {
            self.logits.clone()
        } else {
            self.logits.clone().slice([self.row..self.row + 1, 0..vocab])
        }
    }
}

/// A burn model with its tokenizer and sequence states: marco's [`LanguageModel`] on burn.
pub struct BurnLm<B: KernelBackend> {
    model: Transformer<B>,
    tokenizer: Box<dyn Tokenizer>,
    seqs: HashMap<u64, SeqState<B>>,
    next_id: u64,
    tokens_computed: u64,
    forward_passes: u64,
}

impl<B: KernelBackend> std::fmt::Debug for BurnLm<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnLm")
            .field("config", self.model.config())
            .field("sequences", &self.seqs.len())
            .field("tokens_computed", &self.tokens_computed)
            .finish()
    }
}

impl<B: KernelBackend> BurnLm<B> {
    /// Wraps a loaded network and its tokenizer.
    pub fn new(model: Transformer<B>, tokenizer: Box<dyn Tokenizer>) -> Self {
        BurnLm { model, tokenizer, seqs: HashMap::new(), next_id: 0, tokens_computed: 0, forward_passes: 0 }
    }

    /// The network.
    pub fn model(&self) -> &Transformer<B> {
        &self.model
    }

    /// The pending next-token logits of `seq`, copied to the host (a debugging and testing
    /// aid: the search itself never needs a full row).
    pub fn pending_logits(&self, seq: SeqId) -> Result<Vec<f32>> {
        let state = self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        state
            .pending
            .row_logits()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| backend_error(format!("{e:?}")))
    }

    fn state(&self, seq: SeqId) -> Result<&SeqState<B>> {
        self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))
    }

    /// Feeds `tokens` to `cache` in chunks and returns the logits after the last one.
    fn feed(&mut self, cache: &mut KvCache<B>, tokens: &[TokenId]) -> Result<Pending<B>> {
        let limit = self.max_context();
        let needed = cache.len() + tokens.len();
        if needed > limit {
            return Err(Error::ContextOverflow { needed, limit });
        }
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let mut items = [ForwardItem { tokens: chunk, cache: &mut *cache }];
            last = Some(self.model.forward(&mut items, LogitsAt::Last)?);
            self.tokens_computed += chunk.len() as u64;
            self.forward_passes += 1;
        }
        let logits = last.ok_or_else(|| Error::EmptyInput("no tokens to feed".into()))?;
        Ok(Pending { forward: self.forward_passes, row: 0, logits })
    }

    fn insert(&mut self, state: SeqState<B>) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, state);
        SeqId(id)
    }

    /// The `[batch, vocab]` pending logits of `batch`: one forward pass's output as it is when
    /// `batch` is exactly that pass's sequences in order (a batched decode loop, or one
    /// sequence after its prefill), else the rows stacked.
    fn batch_logits(&self, batch: &[StepRequest]) -> Result<Tensor<B, 2>> {
        let pending: Vec<&Pending<B>> =
            batch.iter().map(|r| self.state(r.seq).map(|s| &s.pending)).collect::<Result<_>>()?;
        let first = pending.first().ok_or_else(|| backend_error("no row".into()))?;
        let whole = first.logits.dims()[0] == batch.len()
            && pending.iter().enumerate().all(|(i, p)| p.forward == first.forward && p.row == i);
        if whole {
            return Ok(first.logits.clone());
        }
        let mut rows: Vec<Tensor<B, 2>> = pending.iter().map(|p| p.row_logits()).collect();
        Ok(if rows.len() == 1 { rows.remove(0) } else { Tensor::cat(rows, 0) })
    }

    /// Chooses the token of every request from `logits` (`[batch, vocab]`, row i for request i).
    fn choose(&self, logits: Tensor<B, 2>, batch: &[StepRequest], lens: &[usize]) -> Result<Vec<StepOutput>> {
        let [rows, vocab] = logits.dims();
        let device = self.model.device().clone();
        let k = batch.iter().map(|r| r.top_logprobs).max().unwrap_or(0).clamp(1, vocab);
        let (lse, top_values, top_ids) = B::lse_and_top_k(logits.clone(), k);
        // A gather over the whole `[rows, vocab]` logits copies them on some backends (NdArray):
        // only pay for it when a request forces its token.
        let forced_logit = if batch.iter().any(|r| r.force.is_some()) {
            let forced: Vec<i64> = batch.iter().map(|r| r.force.unwrap_or(0) as i64).collect();
            let forced = Tensor::<B, 2, Int>::from_data(TensorData::new(forced, [rows, 1]), &device);
            logits.clone().gather(1, forced)
        } else {
            Tensor::zeros([rows, 1], &device)
        };
        let k = top_values.dims()[1];
        let host = Tensor::cat(vec![lse, forced_logit, top_values], 1)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| backend_error(format!("{e:?}")))?;
        let ids =
            top_ids.into_data().convert::<i64>().into_vec::<i64>().map_err(|e| backend_error(format!("{e:?}")))?;
        let width = 2 + k;
        let mut outputs = Vec::with_capacity(rows);
        for (i, request) in batch.iter().enumerate() {
            let row = &host[i * width..(i + 1) * width];
            let (lse, forced_logit) = (row[0], row[1]);
            if !lse.is_finite() {
                return Err(Error::NonFiniteLogits { seq: request.seq.0, position: lens[i] });
            }
            let mut top: Vec<TokenLogprob> =
                (0..k).map(|j| TokenLogprob { token: ids[i * k + j] as TokenId, logprob: row[2 + j] - lse }).collect();
            top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob).then(a.token.cmp(&b.token)));
            let (token, logprob) = if let Some(token) = request.force {
                (token, forced_logit - lse)
            } else if request.sampling.is_greedy() {
                let best = top.first().copied().ok_or_else(|| Error::EmptyInput("empty logits row".into()))?;
                (best.token, best.logprob)
            } else {
                // Temperature sampling needs the whole distribution (top-p): copy this row.
                let full = logits
                    .clone()
                    .slice([i..i + 1, 0..vocab])
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| backend_error(format!("{e:?}")))?;
                let draw = uniform(request.sampling.seed, request.stream_key(), lens[i] as u64);
                let token = sample(&full, &request.sampling, draw)?;
                (token, full[token as usize] - lse)
            };
            top.truncate(request.top_logprobs);
            outputs.push(StepOutput { token, logprob, top });
        }
        Ok(outputs)
    }
}

fn backend_error(message: String) -> Error {
    Error::Backend(message.into())
}

impl<B: KernelBackend> LanguageModel for BurnLm<B> {
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.tokenizer.as_ref()
    }

    fn max_context(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    fn new_sequence(&mut self, prompt: &[TokenId]) -> Result<SeqId> {
        if prompt.is_empty() {
            return Err(Error::EmptyInput("the prompt is empty".into()));
        }
        let mut cache = self.model.new_cache();
        let pending = self.feed(&mut cache, prompt)?;
        Ok(self.insert(SeqState { len: prompt.len(), cache, pending }))
    }

    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let state = self.seqs.get_mut(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        let child = SeqState { len: state.len, cache: state.cache.fork(), pending: state.pending.clone() };
        Ok(self.insert(child))
    }

    fn append(&mut self, seq: SeqId, tokens: &[TokenId]) -> Result<()> {
        if tokens.is_empty() {
            self.state(seq)?;
            return Ok(());
        }
        let mut state = self.seqs.remove(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        let result = self.feed(&mut state.cache, tokens);
        let result = result.map(|pending| {
            state.pending = pending;
            state.len += tokens.len();
        });
        self.seqs.insert(seq.0, state);
        result
    }

    fn step(&mut self, batch: &[StepRequest]) -> Result<Vec<StepOutput>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let limit = self.max_context();
        let vocab = self.model.config().vocab_size;
        let mut seen = HashSet::new();
        let mut lens = Vec::with_capacity(batch.len());
        for request in batch {
            let state = self.state(request.seq)?;
            if !seen.insert(request.seq.0) {
                return Err(Error::InvalidConfig(format!("sequence {} appears twice in one step", request.seq.0)));
            }
            request.sampling.validate()?;
            if let Some(token) = request.force {
                if token as usize >= vocab {
                    return Err(Error::TokenOutOfRange { token, vocab_size: vocab });
                }
            }
            if state.len + 1 > limit {
                return Err(Error::ContextOverflow { needed: state.len + 1, limit });
            }
            lens.push(state.len);
        }
        let logits = self.batch_logits(batch)?;
        let outputs = self.choose(logits, batch, &lens)?;

        // Feed every chosen token in one forward pass.
        let mut states: Vec<SeqState<B>> = batch.iter().filter_map(|r| self.seqs.remove(&r.seq.0)).collect();
        let tokens: Vec<[TokenId; 1]> = outputs.iter().map(|o| [o.token]).collect();
        let result = {
            let mut items: Vec<ForwardItem<'_, B>> = states
                .iter_mut()
                .zip(&tokens)
                .map(|(state, token)| ForwardItem { tokens: token, cache: &mut state.cache })
                .collect();
            self.model.forward(&mut items, LogitsAt::Last)
        };
        let new_logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                for (request, state) in batch.iter().zip(states) {
                    self.seqs.insert(request.seq.0, state);
                }
                return Err(e.into());
            }
        };
        self.tokens_computed += batch.len() as u64;
        self.forward_passes += 1;
        let forward = self.forward_passes;
        for (i, (request, mut state)) in batch.iter().zip(states).enumerate() {
            state.pending = Pending { forward, row: i, logits: new_logits.clone() };
            state.len += 1;
            self.seqs.insert(request.seq.0, state);
        }
        Ok(outputs)
    }

    fn release(&mut self, seq: SeqId) -> Result<()> {
        self.seqs.remove(&seq.0).map(|_| ()).ok_or(Error::UnknownSequence(seq.0))
    }

    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.state(seq)?.len)
    }

    fn counters(&self) -> ModelCounters {
        let shape = self.model.kv_shape();
        let mut seen = HashSet::new();
        let mut bytes = 0usize;
        for state in self.seqs.values() {
            bytes += state.cache.owned_bytes();
            for segment in state.cache.frozen_segments() {
                if seen.insert(std::sync::Arc::as_ptr(segment)) {
                    bytes += state.cache.segment_bytes(segment);
                }
            }
        }
        ModelCounters {
            tokens_computed: self.tokens_computed,
            forward_passes: self.forward_passes,
            live_sequences: self.seqs.len() as u64,
            kv_bytes_in_use: bytes as u64,
            kv_bytes_per_token: shape.bytes_per_token() as u64,
        }
    }
}
