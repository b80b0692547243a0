//! A deterministic mock language model, for testing rewards and search policies without a
//! network (feature `mock`).
//!
//! The vocabulary is a list of text pieces (every printable ASCII character and `\n` are
//! added, so any ASCII text encodes) plus one stop token, `<eos>`. The next-token
//! distribution of a context is, in order of precedence:
//! 1. the first [`Rule`] whose condition holds on the decoded context;
//! 2. otherwise a seeded pseudo-random distribution of the last `ngram` tokens (the same
//!    context always gives the same distribution), whose `<eos>` logit grows with the number
//!    of tokens generated since the prompt, so rollouts end.
//!
//! ```
//! use marco_core::mock::{MockModel, Rule};
//! use marco_core::{LanguageModel, SamplingParams, StepRequest};
//!
//! let mut model = MockModel::builder()
//!     .pieces(["yes", "no"])
//!     .rule(Rule::ends_with("?").probs([("yes", 0.7), ("no", 0.3)]))
//!     .build()
//!     .unwrap();
//! let prompt = model.tokenizer().encode("ok?", true).unwrap();
//! let seq = model.new_sequence(&prompt).unwrap();
//! let out = model.step(&[StepRequest::new(seq, SamplingParams::greedy())]).unwrap();
//! assert_eq!(model.tokenizer().decode(&[out[0].token], true).unwrap(), "yes");
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{ChatMessage, LanguageModel, ModelCounters, SeqId, StepRequest, Tokenizer};
use crate::sampling::{check_finite, logprob_of, sample, splitmix64, top_k_logprobs, uniform};
use crate::token::{StepOutput, TokenId};

/// The stop token's text.
pub const EOS: &str = "<eos>";

/// When a [`Rule`] applies, tested on the decoded context (prompt and everything after).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The context ends with this text.
    EndsWith(String),
    /// The context contains this text.
    Contains(String),
    /// Both conditions hold.
    All(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
}

impl Condition {
    fn holds(&self, context: &str) -> bool {
        match self {
            Condition::EndsWith(s) => context.ends_with(s.as_str()),
            Condition::Contains(s) => context.contains(s.as_str()),
            Condition::All(cs) => cs.iter().all(|c| c.holds(context)),
            Condition::Not(c) => !c.holds(context),
        }
    }
}

/// A scripted next-token distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    condition: Condition,
    probs: Vec<(String, f64)>,
}

impl Rule {
    /// A rule that applies when the context ends with `text`.
    pub fn ends_with(text: &str) -> Self {
        Rule { condition: Condition::EndsWith(text.into()), probs: Vec::new() }
    }

    /// A rule that applies when `condition` holds.
    pub fn when(condition: Condition) -> Self {
        Rule { condition, probs: Vec::new() }
    }

    /// The distribution: probabilities of pieces (use [`EOS`] for the stop token). The
    /// probability left over is spread evenly over every other token.
    pub fn probs<'a>(mut self, probs: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        self.probs = probs.into_iter().map(|(p, q)| (p.to_string(), q)).collect();
        self
    }
}

/// Builds a [`MockModel`].
#[derive(Debug, Clone)]
pub struct MockModelBuilder {
    pieces: Vec<String>,
    rules: Vec<Rule>,
    seed: u64,
    sharpness: f32,
    ngram: usize,
    typical_length: usize,
    max_context: usize,
    step_cost: Duration,
}

impl Default for MockModelBuilder {
    fn default() -> Self {
        MockModelBuilder {
            pieces: Vec::new(),
            rules: Vec::new(),
            seed: 0,
            sharpness: 3.0,
            ngram: 2,
            typical_length: 24,
            max_context: 4096,
            step_cost: Duration::ZERO,
        }
    }
}

impl MockModelBuilder {
    /// Adds multi-character pieces to the vocabulary.
    pub fn pieces<'a>(mut self, pieces: impl IntoIterator<Item = &'a str>) -> Self {
        self.pieces.extend(pieces.into_iter().map(str::to_string));
        self
    }
    /// Adds a scripted rule (earlier rules take precedence).
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }
    /// Seed of the pseudo-random fallback distributions.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Spread of the fallback logits (larger: more peaked distributions).
    pub fn sharpness(mut self, sharpness: f32) -> Self {
        self.sharpness = sharpness;
        self
    }
    /// How many trailing tokens the fallback distribution depends on.
    pub fn ngram(mut self, n: usize) -> Self {
        self.ngram = n.max(1);
        self
    }
    /// Around how many generated tokens a fallback continuation lasts before `<eos>` dominates.
    pub fn typical_length(mut self, n: usize) -> Self {
        self.typical_length = n.max(1);
        self
    }
    /// Context length.
    pub fn max_context(mut self, n: usize) -> Self {
        self.max_context = n;
        self
    }
    /// Busy-waits this long in every `step` call, to model a network's cost in benchmarks.
    pub fn step_cost(mut self, cost: Duration) -> Self {
        self.step_cost = cost;
        self
    }

    /// The model; fails if a rule names a piece outside the vocabulary or has a bad probability.
    pub fn build(self) -> Result<MockModel> {
        let mut vocab: Vec<String> = vec![EOS.to_string()];
        let push = |p: String, vocab: &mut Vec<String>| {
            if !p.is_empty() && !vocab.contains(&p) {
                vocab.push(p);
            }
        };
        for c in (0x20u8..0x7f).map(char::from).chain(['\n']) {
            push(c.to_string(), &mut vocab);
        }
        for p in self.pieces {
            push(p, &mut vocab);
        }
        let index: HashMap<String, TokenId> =
            vocab.iter().enumerate().map(|(i, p)| (p.clone(), i as TokenId)).collect();
        let mut rules = Vec::new();
        for r in self.rules {
            let mut dist = Vec::new();
            let mut total = 0.0;
            for (piece, p) in r.probs {
                let id = *index
                    .get(&piece)
                    .ok_or_else(|| Error::InvalidConfig(format!("mock rule names unknown piece {piece:?}")))?;
                if !(p.is_finite() && p > 0.0) {
                    return Err(Error::InvalidConfig(format!("mock rule probability {p} for {piece:?}")));
                }
                total += p;
                dist.push((id, p));
            }
            if total > 1.0 + 1e-9 {
                return Err(Error::InvalidConfig(format!("mock rule probabilities sum to {total} > 1")));
            }
            rules.push((r.condition, dist));
        }
        let max_piece = vocab.iter().map(|p| p.len()).max().unwrap_or(1);
        Ok(MockModel {
            tokenizer: MockTokenizer { vocab, index, max_piece, stop: [0] },
            rules,
            seed: self.seed,
            sharpness: self.sharpness,
            ngram: self.ngram,
            typical_length: self.typical_length,
            max_context: self.max_context,
            step_cost: self.step_cost,
            seqs: HashMap::new(),
            next_seq: 0,
            counters: ModelCounters::default(),
        })
    }
}

/// The mock's tokenizer: greedy longest-match over the vocabulary pieces.
#[derive(Debug, Clone)]
pub struct MockTokenizer {
    vocab: Vec<String>,
    index: HashMap<String, TokenId>,
    max_piece: usize,
    stop: [TokenId; 1],
}

impl Tokenizer for MockTokenizer {
    fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>> {
        let mut out = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            let mut len = self.max_piece.min(rest.len());
            while len > 0 {
                if let Some(piece) = rest.get(..len) {
                    if let Some(&id) = self.index.get(piece) {
                        if id != self.stop[0] || parse_special {
                            out.push(id);
                            rest = &rest[len..];
                            continue 'outer;
                        }
                    }
                }
                len -= 1;
            }
            return Err(Error::Tokenizer(format!(
                "the mock vocabulary cannot encode {:?}",
                rest.chars().next().unwrap_or(' ')
            )));
        }
        Ok(out)
    }

    fn decode(&self, tokens: &[TokenId], skip_special: bool) -> Result<String> {
        let mut out = String::new();
        for &t in tokens {
            let piece =
                self.vocab.get(t as usize).ok_or(Error::TokenOutOfRange { token: t, vocab_size: self.vocab.len() })?;
            if !(skip_special && t == self.stop[0]) {
                out.push_str(piece);
            }
        }
        Ok(out)
    }

    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn stop_tokens(&self) -> &[TokenId] {
        &self.stop
    }

    /// `role: content` lines; the generation prompt is `assistant: `.
    fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut out = String::new();
        for m in messages {
            out.push_str(&format!("{}: {}\n", m.role, m.content));
        }
        if add_generation_prompt {
            out.push_str("assistant: ");
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
struct MockSeq {
    tokens: Vec<TokenId>,
    prompt_len: usize,
}

/// The mock language model. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct MockModel {
    tokenizer: MockTokenizer,
    rules: Vec<(Condition, Vec<(TokenId, f64)>)>,
    seed: u64,
    sharpness: f32,
    ngram: usize,
    typical_length: usize,
    max_context: usize,
    step_cost: Duration,
    seqs: HashMap<u64, MockSeq>,
    next_seq: u64,
    counters: ModelCounters,
}

impl MockModel {
    /// A builder with the default settings.
    pub fn builder() -> MockModelBuilder {
        MockModelBuilder::default()
    }

    /// The mock's tokenizer.
    pub fn mock_tokenizer(&self) -> &MockTokenizer {
        &self.tokenizer
    }

    /// The id of a vocabulary piece.
    pub fn token_id(&self, piece: &str) -> Option<TokenId> {
        self.tokenizer.index.get(piece).copied()
    }

    /// The next-token logits after `tokens`, of which the first `prompt_len` are the prompt.
    pub fn logits(&self, tokens: &[TokenId], prompt_len: usize) -> Result<Vec<f32>> {
        let vocab = self.tokenizer.vocab.len();
        if !self.rules.is_empty() {
            let context = self.tokenizer.decode(tokens, false)?;
            if let Some((_, dist)) = self.rules.iter().find(|(c, _)| c.holds(&context)) {
                let listed: f64 = dist.iter().map(|(_, p)| p).sum();
                let rest = ((1.0 - listed).max(1e-9) / (vocab - dist.len()).max(1) as f64).ln() as f32;
                let mut logits = vec![rest; vocab];
                for &(t, p) in dist {
                    logits[t as usize] = p.ln() as f32;
                }
                return Ok(logits);
            }
        }
        let tail = &tokens[tokens.len().saturating_sub(self.ngram)..];
        let mut h = splitmix64(self.seed);
        for &t in tail {
            h = splitmix64(h ^ t as u64);
        }
        let mut logits: Vec<f32> = (0..vocab as u64)
            .map(|t| {
                let u = (splitmix64(h ^ t.wrapping_mul(0x2545_F491_4F6C_DD1D)) >> 11) as f32 / (1u64 << 53) as f32;
                (2.0 * u - 1.0) * self.sharpness
            })
            .collect();
        let generated = tokens.len().saturating_sub(prompt_len) as f32;
        logits[0] = -self.sharpness + 2.5 * self.sharpness * generated / self.typical_length as f32;
        Ok(logits)
    }

    fn seq(&self, seq: SeqId) -> Result<&MockSeq> {
        self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))
    }

    fn check_tokens(&self, tokens: &[TokenId]) -> Result<()> {
        let vocab_size = self.tokenizer.vocab.len();
        match tokens.iter().find(|&&t| t as usize >= vocab_size) {
            Some(&token) => Err(Error::TokenOutOfRange { token, vocab_size }),
            None => Ok(()),
        }
    }

    fn new_id(&mut self) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        SeqId(id)
    }
}

impl LanguageModel for MockModel {
    fn tokenizer(&self) -> &dyn Tokenizer {
        &self.tokenizer
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn new_sequence(&mut self, prompt: &[TokenId]) -> Result<SeqId> {
        if prompt.is_empty() {
            return Err(Error::EmptyInput("the prompt has no tokens".into()));
        }
        if prompt.len() > self.max_context {
            return Err(Error::ContextOverflow { needed: prompt.len(), limit: self.max_context });
        }
        self.check_tokens(prompt)?;
        let id = self.new_id();
        self.seqs.insert(id.0, MockSeq { tokens: prompt.to_vec(), prompt_len: prompt.len() });
        self.counters.tokens_computed += prompt.len() as u64;
        self.counters.forward_passes += 1;
        self.counters.live_sequences = self.seqs.len() as u64;
        Ok(id)
    }

    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let copy = self.seq(seq)?.clone();
        let id = self.new_id();
        self.seqs.insert(id.0, copy);
        self.counters.live_sequences = self.seqs.len() as u64;
        Ok(id)
    }

    fn append(&mut self, seq: SeqId, tokens: &[TokenId]) -> Result<()> {
        self.check_tokens(tokens)?;
        let limit = self.max_context;
        let s = self.seqs.get_mut(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        if s.tokens.len() + tokens.len() > limit {
            return Err(Error::ContextOverflow { needed: s.tokens.len() + tokens.len(), limit });
        }
        s.tokens.extend_from_slice(tokens);
        self.counters.tokens_computed += tokens.len() as u64;
        self.counters.forward_passes += 1;
        Ok(())
    }

    fn step(&mut self, batch: &[StepRequest]) -> Result<Vec<StepOutput>> {
        let started = Instant::now();
        crate::model::check_distinct(batch.iter().map(|r| r.seq), "step")?;
        for r in batch {
            r.sampling.validate()?;
            let s = self.seq(r.seq)?;
            if s.tokens.len() >= self.max_context {
                return Err(Error::ContextOverflow { needed: s.tokens.len() + 1, limit: self.max_context });
            }
        }
        let mut outputs = Vec::with_capacity(batch.len());
        for r in batch {
            let s = self.seq(r.seq)?;
            let logits = self.logits(&s.tokens, s.prompt_len)?;
            check_finite(&logits, r.seq.0, s.tokens.len())?;
            let token = match r.force {
                Some(t) => {
                    self.check_tokens(&[t])?;
                    t
                }
                None => sample(&logits, &r.sampling, uniform(r.sampling.seed, r.stream_key(), s.tokens.len() as u64))?,
            };
            let logprob = logprob_of(&logits, token).unwrap_or(f32::NEG_INFINITY);
            outputs.push(StepOutput { token, logprob, top: top_k_logprobs(&logits, r.top_logprobs) });
        }
        for (r, o) in batch.iter().zip(&outputs) {
            if let Some(s) = self.seqs.get_mut(&r.seq.0) {
                s.tokens.push(o.token);
            }
        }
        self.counters.tokens_computed += batch.len() as u64;
        self.counters.forward_passes += 1;
        while started.elapsed() < self.step_cost {
            std::hint::spin_loop();
        }
        Ok(outputs)
    }

    fn release(&mut self, seq: SeqId) -> Result<()> {
        self.seqs.remove(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        self.counters.live_sequences = self.seqs.len() as u64;
        Ok(())
    }

    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.seq(seq)?.tokens.len())
    }

    fn counters(&self) -> ModelCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    #[test]
    fn rules_fork_and_determinism() {
        let mut m = MockModel::builder()
            .pieces(["yes", "no"])
            .rule(Rule::ends_with("?").probs([("yes", 0.7), ("no", 0.2)]))
            .build()
            .unwrap();
        let prompt = m.tokenizer().encode("ok?", true).unwrap();
        assert_eq!(prompt.len(), 3);
        let a = m.new_sequence(&prompt).unwrap();
        let b = m.fork(a).unwrap();
        let out = m
            .step(&[
                StepRequest::new(a, SamplingParams::greedy()),
                StepRequest { force: Some(m.token_id("no").unwrap()), ..StepRequest::new(b, SamplingParams::greedy()) },
            ])
            .unwrap();
        assert_eq!(out[0].token, m.token_id("yes").unwrap());
        assert!((out[0].logprob - 0.7f32.ln()).abs() < 1e-5);
        assert!((out[1].logprob - 0.2f32.ln()).abs() < 1e-5);
        assert_eq!(out[0].top[0].token, out[0].token);
        assert_eq!(m.seq_len(a).unwrap(), 4);
        assert_eq!(m.counters().tokens_computed, 5);
        m.release(a).unwrap();
        assert!(matches!(m.step(&[StepRequest::new(a, SamplingParams::greedy())]), Err(Error::UnknownSequence(_))));
        // Fallback distributions are a pure function of the context.
        let l1 = m.logits(&prompt, 1).unwrap();
        let l2 = m.logits(&prompt, 1).unwrap();
        assert_eq!(l1, l2);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(MockModel::builder().rule(Rule::ends_with("x").probs([("nope", 0.5)])).build().is_err());
        let mut m = MockModel::builder().max_context(4).build().unwrap();
        assert!(matches!(m.new_sequence(&[]), Err(Error::EmptyInput(_))));
        assert!(matches!(m.new_sequence(&[1, 2, 3, 4, 5]), Err(Error::ContextOverflow { .. })));
        assert!(matches!(m.new_sequence(&[100_000]), Err(Error::TokenOutOfRange { .. })));
        assert!(m.tokenizer().encode("é", false).is_err());
    }
}
