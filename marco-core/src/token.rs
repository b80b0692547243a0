//! Tokens and what one decoding step reports about them.

use serde::{Deserialize, Serialize};

/// A token id of a model's vocabulary.
pub type TokenId = u32;

/// One token and its log-probability under the model's *unmodified* distribution
/// (log-softmax of the raw logits: no temperature, top-k or top-p applied).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token.
    pub token: TokenId,
    /// Its natural-log probability.
    pub logprob: f32,
}

/// What one decoding step produced for one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The token that was chosen (sampled, greedy, or forced) and fed to the sequence.
    pub token: TokenId,
    /// The chosen token's log-probability under the unmodified distribution. Always present,
    /// also when the token is not among [`StepOutput::top`].
    pub logprob: f32,
    /// The most likely tokens at this position, sorted by log-probability, descending.
    pub top: Vec<TokenLogprob>,
}

impl StepOutput {
    /// Rank of the chosen token among [`StepOutput::top`] (0 = most likely), if it is there.
    pub fn rank_in_top(&self) -> Option<usize> {
        self.top.iter().position(|t| t.token == self.token)
    }
}
