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
    /// Its natural-log probability (`-inf` for an impossible token; JSON writes it as `null`).
    #[serde(deserialize_with = "logprob_or_null")]
    pub logprob: f32,
}

/// What one decoding step produced for one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The token that was chosen (sampled, greedy, or forced) and fed to the sequence.
    pub token: TokenId,
    /// The chosen token's log-probability under the unmodified distribution. Always present,
    /// also when the token is not among [`StepOutput::top`].
    #[serde(deserialize_with = "logprob_or_null")]
    pub logprob: f32,
    /// The most likely tokens at this position, sorted by log-probability, descending.
    pub top: Vec<TokenLogprob>,
}

/// JSON has no infinities: serde_json writes `-inf` as `null`, so `null` reads back as `-inf`.
fn logprob_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NEG_INFINITY))
}

impl StepOutput {
    /// Rank of the chosen token among [`StepOutput::top`] (0 = most likely), if it is there.
    pub fn rank_in_top(&self) -> Option<usize> {
        self.top.iter().position(|t| t.token == self.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_token_round_trips_through_json() {
        let step = StepOutput {
            token: 3,
            logprob: f32::NEG_INFINITY,
            top: vec![TokenLogprob { token: 1, logprob: -0.1 }, TokenLogprob { token: 3, logprob: f32::NEG_INFINITY }],
        };
        let json = serde_json::to_string(&step).unwrap();
        assert_eq!(serde_json::from_str::<StepOutput>(&json).unwrap(), step);
        assert_eq!(step.rank_in_top(), Some(1));
    }
}
