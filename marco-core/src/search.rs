//! The search-policy contract and what a search returns.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::budget::StopReason;
use crate::error::{Error, Result};
use crate::model::{ChatMessage, LanguageModel, ModelCounters, Tokenizer};
use crate::token::TokenId;
use crate::tree::{NodeId, Tree};

/// What to reason about: a prompt, as text and as tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The prompt text (chat template applied).
    pub prompt_text: String,
    /// Its tokens.
    pub prompt_tokens: Vec<TokenId>,
}

impl Problem {
    /// A question wrapped in the model's chat template, with an optional system message.
    pub fn from_question(tokenizer: &dyn Tokenizer, question: &str, system: Option<&str>) -> Result<Self> {
        if question.trim().is_empty() {
            return Err(Error::EmptyInput("the question is empty".into()));
        }
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::system(system));
        }
        messages.push(ChatMessage::user(question));
        let prompt_text = tokenizer.apply_chat_template(&messages, true)?;
        Self::from_raw(tokenizer, &prompt_text)
    }

    /// A prompt used as given (special tokens parsed).
    pub fn from_raw(tokenizer: &dyn Tokenizer, prompt_text: &str) -> Result<Self> {
        let prompt_tokens = tokenizer.encode(prompt_text, true)?;
        if prompt_tokens.is_empty() {
            return Err(Error::EmptyInput("the prompt has no tokens".into()));
        }
        Ok(Problem { prompt_text: prompt_text.to_string(), prompt_tokens })
    }
}

/// Counters of one search.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SearchStats {
    /// Nodes in the tree, root included.
    pub nodes: usize,
    /// Rollouts (MCTS simulations, beam rounds, greedy rounds).
    pub rollouts: usize,
    /// Tokens the model chose (sampled or greedy).
    pub tokens_generated: u64,
    /// Token positions the model computed during the search (prompt included).
    pub tokens_computed: u64,
    /// Distinct token positions in the final tree (prompt included).
    pub distinct_tokens: u64,
    /// KV-cache bytes in use when the search ended, taken just before the search released its
    /// states (0 where the model has no cache).
    pub kv_bytes_in_use: u64,
    /// KV-cache bytes one token occupies (0 where the model has no cache).
    pub kv_bytes_per_token: u64,
    /// Wall time.
    pub elapsed_secs: f64,
    /// Which limit ended the search.
    pub stop_reason: StopReason,
}

impl SearchStats {
    /// Tokens computed ÷ distinct tokens in the tree (1.0 means nothing was computed twice).
    pub fn recompute_ratio(&self) -> f64 {
        if self.distinct_tokens == 0 {
            0.0
        } else {
            self.tokens_computed as f64 / self.distinct_tokens as f64
        }
    }

    /// Generated tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.tokens_generated as f64 / self.elapsed_secs
        } else {
            0.0
        }
    }

    /// Fills the model-side counters from counters taken before (`start`) and after (`end`).
    pub fn with_model_counters(mut self, start: &ModelCounters, end: &ModelCounters) -> Self {
        self.tokens_computed = end.tokens_computed.saturating_sub(start.tokens_computed);
        self.kv_bytes_in_use = end.kv_bytes_in_use;
        self.kv_bytes_per_token = end.kv_bytes_per_token;
        self
    }
}

/// The result of a search: the answer, the path that led to it, and the whole tree.
/// Serialised, it is the search's trace (JSON round-trips).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchOutcome {
    /// Policy name and configuration.
    pub policy: String,
    /// The generated text along the chosen path.
    pub text: String,
    /// The answer extracted from [`SearchOutcome::text`], if any.
    pub answer: Option<String>,
    /// The chosen path, root first.
    pub path: Vec<NodeId>,
    /// The chosen path's value under the policy's reward.
    pub value: f64,
    /// Counters.
    pub stats: SearchStats,
    /// The whole tree.
    pub tree: Tree,
}

impl SearchOutcome {
    /// The trace as JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// An outcome from its JSON trace.
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// The tree as Graphviz DOT with the chosen path highlighted.
    pub fn to_dot(&self) -> String {
        self.tree.to_dot(&self.path)
    }
}

/// Progress of a running search, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Nodes so far.
    pub nodes: usize,
    /// Rollouts so far.
    pub rollouts: usize,
    /// Tokens generated so far.
    pub tokens_generated: u64,
    /// Time so far.
    pub elapsed: Duration,
    /// Best value seen so far.
    pub best_value: f64,
}

/// Hooks into a running search. Every method has a default that does nothing.
pub trait SearchObserver {
    /// Called after each rollout or round.
    fn on_progress(&mut self, _progress: &Progress) {}
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl SearchObserver for NoObserver {}

/// A search policy: MCTS, beam search, greedy with reflection, or a user's own.
pub trait SearchPolicy {
    /// Name and configuration, for traces and tables.
    fn name(&self) -> String;

    /// Searches, reporting progress to `observer`.
    fn search_observed(
        &self,
        model: &mut dyn LanguageModel,
        problem: &Problem,
        observer: &mut dyn SearchObserver,
    ) -> Result<SearchOutcome>;

    /// Searches.
    fn search(&self, model: &mut dyn LanguageModel, problem: &Problem) -> Result<SearchOutcome> {
        self.search_observed(model, problem, &mut NoObserver)
    }
}
