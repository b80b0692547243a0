//! Reproducible sampling on a host-side logits row.
//!
//! Randomness is *counter-based*: the uniform draw for a step is a pure function of the run's
//! seed, a stream key and the position in the sequence. The stream is the request's own key
//! ([`StepRequest::stream`](crate::StepRequest::stream): a search derives it from its seed and
//! the node's place in the tree) or else the sequence id. A run is therefore reproducible
//! however a backend groups sequences into batches, and two forks of one state draw different
//! tokens because their streams differ.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::token::{TokenId, TokenLogprob};

/// How the next token is chosen from a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; `0.0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens before sampling; `0` keeps all.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set whose probability reaches `top_p`; `1.0` keeps all.
    pub top_p: f32,
    /// Seed of the run.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.95, seed: 0 }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    /// Sampling at `temperature` with `seed`, no truncation.
    pub fn with_temperature(temperature: f32, seed: u64) -> Self {
        SamplingParams { temperature, top_k: 0, top_p: 1.0, seed }
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidConfig(format!("temperature must be finite and >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidConfig(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// SplitMix64: a tiny, well-mixed 64-bit hash used as a counter-based generator.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The uniform draw in `[0, 1)` for (`seed`, `seq`, `position`).
pub fn uniform(seed: u64, seq: u64, position: u64) -> f64 {
    let h = splitmix64(splitmix64(splitmix64(seed) ^ seq) ^ position);
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Checks that every logit is finite.
pub fn check_finite(logits: &[f32], seq: u64, position: usize) -> Result<()> {
    if logits.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFiniteLogits { seq, position })
    }
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` most likely tokens of a logits row as log-probabilities, sorted descending,
/// without sorting the whole row (partial selection, O(n + k log k)).
/// Ties are broken by the smaller token id.
pub fn top_k_logprobs(logits: &[f32], k: usize) -> Vec<TokenLogprob> {
    if logits.is_empty() || k == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(logits.len());
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit_desc);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_logit_desc);
    idx.into_iter().map(|t| TokenLogprob { token: t, logprob: logits[t as usize] - lse }).collect()
}

/// Log-probability of `token` under the unmodified distribution of `logits`.
pub fn logprob_of(logits: &[f32], token: TokenId) -> Option<f32> {
    let x = *logits.get(token as usize)?;
    Some(x - log_sum_exp(logits))
}

/// Chooses a token from a logits row under `params`, with `draw` a uniform number in `[0, 1)`
/// (see [`uniform`]). Greedy picks the argmax (smallest id on ties).
pub fn sample(logits: &[f32], params: &SamplingParams, draw: f64) -> Result<TokenId> {
    if logits.is_empty() {
        return Err(Error::EmptyInput("logits row is empty".into()));
    }
    if params.is_greedy() {
        let mut best = 0usize;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return Ok(best as TokenId);
    }
    // Candidates by logit, descending (ties: smaller id first), truncated by top-k; then top-p
    // on the tempered distribution; then the draw picks a token walking down from the most
    // likely. Only the head of the order that the top-p cut and the walk reach is sorted (a
    // sort of a whole 50k–150k vocabulary per token cost more than the model's forward pass).
    let n = logits.len();
    let k = if params.top_k == 0 { n } else { params.top_k.min(n) };
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if k < n {
        idx.select_nth_unstable_by(k - 1, desc);
        idx.truncate(k);
    }
    let inv_t = 1.0 / params.temperature as f64;
    // The first candidate in the order (as the full sort had it first).
    let first = idx.iter().copied().min_by(desc).unwrap_or(0);
    let max = logits[first as usize] as f64;
    let weight = |t: u32| ((logits[t as usize] as f64 - max) * inv_t).exp();
    let total: f64 = idx.iter().map(|&t| weight(t)).sum();
    let mut order = SortedHead { idx, sorted: 0, weights: Vec::new(), desc, weight };
    let mut keep = k;
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let mut i = 0;
        while let Some((_, w)) = order.get(i) {
            acc += w / total;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
            i += 1;
        }
    }
    // A cut has weighed the candidates it keeps; without one every candidate is kept, and their
    // sum is `total`.
    let kept_total: f64 = if keep == k { total } else { order.weights[..keep].iter().sum() };
    let target = draw.clamp(0.0, 1.0) * kept_total;
    let mut acc = 0.0;
    for i in 0..keep {
        let Some((t, w)) = order.get(i) else { break };
        acc += w;
        if target < acc {
            return Ok(t);
        }
    }
    // Rounding left the target at the very end: the last kept candidate.
    Ok(order.get(keep - 1).map_or(first, |(t, _)| t))
}

/// The candidates in order, sorted on demand: the first `sorted` entries of `idx` are the
/// largest, in order, and the rest are sorted further in chunks that double, so a walk that
/// stops early sorts little. `weights` holds the weights of the entries visited so far, in order.
struct SortedHead<D, W> {
    idx: Vec<u32>,
    sorted: usize,
    weights: Vec<f64>,
    desc: D,
    weight: W,
}

impl<D: Fn(&u32, &u32) -> std::cmp::Ordering, W: Fn(u32) -> f64> SortedHead<D, W> {
    /// The `i`-th candidate in order and its weight (`None` past the last).
    fn get(&mut self, i: usize) -> Option<(u32, f64)> {
        if i >= self.idx.len() {
            return None;
        }
        if i >= self.sorted {
            let rest = &mut self.idx[self.sorted..];
            let take = (i + 1 - self.sorted).max(self.sorted).max(64).min(rest.len());
            if take < rest.len() {
                rest.select_nth_unstable_by(take - 1, &self.desc);
            }
            rest[..take].sort_unstable_by(&self.desc);
            self.sorted += take;
        }
        while self.weights.len() <= i {
            self.weights.push((self.weight)(self.idx[self.weights.len()]));
        }
        Some((self.idx[i], self.weights[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_normalised() {
        let logits = [1.0, 3.0, 2.0, 3.0, -1.0];
        let top = top_k_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f32 = top_k_logprobs(&logits, 5).iter().map(|t| t.logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn greedy_is_argmax_and_sampling_follows_draw() {
        let logits = [0.0, 5.0, 1.0];
        assert_eq!(sample(&logits, &SamplingParams::greedy(), 0.3).unwrap(), 1);
        let p = SamplingParams::with_temperature(1.0, 0);
        // The most likely token owns the low end of [0, 1).
        assert_eq!(sample(&logits, &p, 0.0).unwrap(), 1);
        assert_eq!(sample(&logits, &p, 0.99999).unwrap(), 0);
    }

    /// The sampler before it sorted lazily: the whole candidate list sorted, for reference.
    fn sample_by_full_sort(logits: &[f32], params: &SamplingParams, draw: f64) -> TokenId {
        let k = if params.top_k == 0 { logits.len() } else { params.top_k.min(logits.len()) };
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        idx.sort_unstable_by(desc);
        idx.truncate(k);
        let max = logits[idx[0] as usize] as f64;
        let weights: Vec<f64> = idx
            .iter()
            .map(|&t| ((logits[t as usize] as f64 - max) * (1.0 / params.temperature as f64)).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut keep = weights.len();
        let mut acc = 0.0;
        for (i, w) in weights.iter().enumerate() {
            acc += w / total;
            if params.top_p < 1.0 && acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let target = draw * weights[..keep].iter().sum::<f64>();
        let mut acc = 0.0;
        for (i, w) in weights[..keep].iter().enumerate() {
            acc += w;
            if target < acc {
                return idx[i];
            }
        }
        idx[keep - 1]
    }

    #[test]
    fn lazy_sorting_samples_what_a_full_sort_does() {
        let mut state = 7u64;
        let mut next = || {
            state = splitmix64(state);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for case in 0..400 {
            // Vocabularies below and above the first sorted chunk; flat and peaked rows; ties.
            let n = [3usize, 50, 64, 65, 300, 5000][case % 6];
            let spread = [0.5, 4.0, 12.0][case % 3];
            let mut logits: Vec<f32> = (0..n).map(|_| ((next() - 0.5) * spread) as f32).collect();
            if case % 5 == 0 {
                logits[n / 2] = 20.0;
            }
            if case % 7 == 0 && n > 1 {
                logits[n - 1] = logits[0];
            }
            let params = SamplingParams {
                temperature: [0.3f32, 0.7, 1.0, 1.5][case % 4],
                top_k: [0usize, 1, 40, 100000][(case / 4) % 4],
                top_p: [1.0f32, 0.95, 0.5, 0.1][(case / 16) % 4],
                seed: 0,
            };
            for draw in [0.0, next(), next(), 0.999_999] {
                assert_eq!(
                    sample(&logits, &params, draw).unwrap(),
                    sample_by_full_sort(&logits, &params, draw),
                    "case {case}: n {n}, {params:?}, draw {draw}"
                );
            }
        }
    }

    #[test]
    fn top_p_truncates() {
        let logits = [10.0, 0.0, 0.0];
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 0 };
        for d in [0.0, 0.5, 0.999] {
            assert_eq!(sample(&logits, &p, d).unwrap(), 0);
        }
    }

    #[test]
    fn uniform_is_deterministic_and_spread() {
        assert_eq!(uniform(1, 2, 3), uniform(1, 2, 3));
        assert_ne!(uniform(1, 2, 3), uniform(1, 3, 3));
        let mean: f64 = (0..10_000).map(|i| uniform(7, 0, i)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02);
    }

    #[test]
    fn invalid_params_are_errors() {
        assert!(SamplingParams { temperature: f32::NAN, ..SamplingParams::greedy() }.validate().is_err());
        assert!(SamplingParams { top_p: 0.0, ..SamplingParams::greedy() }.validate().is_err());
        assert!(check_finite(&[0.0, f32::NAN], 0, 0).is_err());
    }
}
