//! Rewards: how good is a reasoning path?
//!
//! The built-in [`ConfidenceReward`] is Marco-o1's: the model's own confidence in the tokens
//! it chose. A user plugs in a verifier, a process reward model or a gold-answer check by
//! implementing [`Reward`] (one method).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::token::StepOutput;

/// What a reward sees of a path from the root of the search to a node.
#[derive(Debug, Clone, Copy)]
pub struct PathView<'a> {
    /// The prompt as text (after the chat template).
    pub prompt: &'a str,
    /// The text generated along the path (reflection prompts included).
    pub text: &'a str,
    /// Every token the model *chose* along the path, with its log-probability information
    /// (tokens that were appended, like a reflection prompt, are not here).
    pub steps: &'a [StepOutput],
    /// Whether the path ends in a terminal state (a stop token or the context limit).
    pub terminal: bool,
}

/// Scores a path. Values in `[0, 1]` suit the UCT formula best; the confidence reward stays
/// in that range.
pub trait Reward {
    /// The score of `path`; higher is better.
    fn score(&self, path: &PathView<'_>) -> Result<f64>;

    /// A short name for traces and tables.
    fn name(&self) -> &str {
        "custom"
    }
}

impl<R: Reward + ?Sized> Reward for &R {
    fn score(&self, path: &PathView<'_>) -> Result<f64> {
        (**self).score(path)
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

impl<R: Reward + ?Sized> Reward for Box<R> {
    fn score(&self, path: &PathView<'_>) -> Result<f64> {
        (**self).score(path)
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

/// What [`ConfidenceReward`] does when the chosen token is not among the top K.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OutsideTopK {
    /// Apply the formula unchanged: the numerator is the chosen token's own probability and
    /// the denominator the sum over the top K. This is the default. The value stays in
    /// `[0, 1/K]`, since a token outside the top K is no more likely than any of them, so a
    /// path pays for every off-distribution token in proportion to how unlikely it was.
    #[default]
    Formula,
    /// Score the token 0: an off-top-K token is no evidence of confidence at all.
    Zero,
}

/// Marco-o1's confidence score.
///
/// For each chosen token `t_i` with log-probability `p(t_i)` and the top-K candidates
/// `t_1..t_K` at that position, `c_i = exp(p(t_i)) / Σ_{k=1..K} exp(p(t_k))`; the value of a
/// path is the mean of `c_i` over its chosen tokens (0 for a path with none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceReward {
    /// K, the number of candidates in the denominator (5 in the paper).
    pub k: usize,
    /// The rule for a chosen token outside the top K.
    pub outside_top_k: OutsideTopK,
}

impl Default for ConfidenceReward {
    fn default() -> Self {
        ConfidenceReward { k: 5, outside_top_k: OutsideTopK::Formula }
    }
}

impl ConfidenceReward {
    /// The confidence `c_i` of one step, in `[0, 1]`.
    ///
    /// Fails if the step reports fewer than `k` candidates (the model was asked for too few).
    pub fn token_confidence(&self, step: &StepOutput) -> Result<f64> {
        if self.k == 0 {
            return Err(Error::InvalidConfig("ConfidenceReward needs k >= 1".into()));
        }
        if step.top.len() < self.k {
            return Err(Error::Reward(format!(
                "confidence needs the top {} log-probs, the step reports {}",
                self.k,
                step.top.len()
            )));
        }
        let top = &step.top[..self.k];
        let in_top = top.iter().any(|t| t.token == step.token);
        if !in_top && self.outside_top_k == OutsideTopK::Zero {
            return Ok(0.0);
        }
        // Relative to the best candidate so that exp() cannot overflow.
        let max = top[0].logprob.max(step.logprob) as f64;
        let denominator: f64 = top.iter().map(|t| (t.logprob as f64 - max).exp()).sum();
        let numerator = (step.logprob as f64 - max).exp();
        if !(numerator.is_finite() && denominator.is_finite()) || denominator <= 0.0 {
            return Err(Error::Reward("non-finite log-probabilities".into()));
        }
        Ok((numerator / denominator).clamp(0.0, 1.0))
    }

    /// Mean confidence over `steps` (0 for none).
    pub fn mean_confidence(&self, steps: &[StepOutput]) -> Result<f64> {
        if steps.is_empty() {
            return Ok(0.0);
        }
        let mut sum = 0.0;
        for s in steps {
            sum += self.token_confidence(s)?;
        }
        Ok(sum / steps.len() as f64)
    }
}

impl Reward for ConfidenceReward {
    fn score(&self, path: &PathView<'_>) -> Result<f64> {
        self.mean_confidence(path.steps)
    }
    fn name(&self) -> &str {
        "confidence"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenLogprob;

    fn step(token: u32, chosen_lp: f32, top: &[(u32, f32)]) -> StepOutput {
        StepOutput {
            token,
            logprob: chosen_lp,
            top: top.iter().map(|&(token, logprob)| TokenLogprob { token, logprob }).collect(),
        }
    }

    #[test]
    fn hand_computed_confidence() {
        // probabilities 0.5, 0.2, 0.1, 0.1, 0.05 -> top-5 sum 0.95
        let top = [(7, 0.5f32.ln()), (3, 0.2f32.ln()), (4, 0.1f32.ln()), (5, 0.1f32.ln()), (9, 0.05f32.ln())];
        let r = ConfidenceReward::default();
        let c = r.token_confidence(&step(7, 0.5f32.ln(), &top)).unwrap();
        assert!((c - 0.5 / 0.95).abs() < 1e-6, "{c}");
        let c = r.token_confidence(&step(9, 0.05f32.ln(), &top)).unwrap();
        assert!((c - 0.05 / 0.95).abs() < 1e-6, "{c}");
        // Chosen token outside the top 5 with p = 0.01: formula gives 0.01 / 0.95.
        let c = r.token_confidence(&step(42, 0.01f32.ln(), &top)).unwrap();
        assert!((c - 0.01 / 0.95).abs() < 1e-6, "{c}");
        let zero = ConfidenceReward { outside_top_k: OutsideTopK::Zero, ..r };
        assert_eq!(zero.token_confidence(&step(42, 0.01f32.ln(), &top)).unwrap(), 0.0);
        // A path's value is the mean.
        let steps = [step(7, 0.5f32.ln(), &top), step(3, 0.2f32.ln(), &top)];
        let v = r.mean_confidence(&steps).unwrap();
        assert!((v - (0.5 + 0.2) / 2.0 / 0.95).abs() < 1e-6);
    }

    #[test]
    fn k_other_than_five_and_too_few_candidates() {
        let top = [(1, 0.6f32.ln()), (2, 0.3f32.ln()), (3, 0.1f32.ln())];
        let r = ConfidenceReward { k: 2, ..Default::default() };
        let c = r.token_confidence(&step(2, 0.3f32.ln(), &top)).unwrap();
        assert!((c - 0.3 / 0.9).abs() < 1e-6);
        let r5 = ConfidenceReward::default();
        assert!(matches!(r5.token_confidence(&step(2, 0.3f32.ln(), &top)), Err(Error::Reward(_))));
        assert_eq!(r5.mean_confidence(&[]).unwrap(), 0.0);
    }
}
