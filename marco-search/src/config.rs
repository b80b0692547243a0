//! Settings every policy shares: how one action is generated, and the reflection prompt.
//!
//! Policy configurations ([`MctsConfig`](crate::MctsConfig), [`BeamConfig`](crate::BeamConfig),
//! …) embed a [`GenerationConfig`] and, where reflection applies, a [`Reflection`]. All are
//! plain serde structs with a usable `Default`, so a configuration can live in a JSON file;
//! the `with_*` methods change one field at a time.

use marco_core::{Error, Granularity, Result, SamplingParams};
use serde::{Deserialize, Serialize};

/// Marco-o1's reflection prompt.
pub const MARCO_REFLECTION: &str = "Wait! Maybe I made some mistakes! I need to rethink from scratch.";

/// How actions (tree edges) are generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Sampling of every generated token (temperature, top-p, top-k, seed).
    pub sampling: SamplingParams,
    /// What one action is. A policy built with a custom
    /// [`ActionGranularity`](marco_core::ActionGranularity) ignores this field.
    pub granularity: Granularity,
    /// Step cap: most edges on one path from the root; a node at this depth is terminal.
    pub max_depth: u32,
    /// Top log-probabilities the model reports per token (at least 5, as the confidence
    /// reward needs).
    pub top_logprobs: usize,
    /// Siblings created together from one state start with *different* first tokens where the
    /// model allows: the first tokens are drawn without replacement from the state's top
    /// log-probabilities (at the sampling temperature) and fed by teacher forcing. Without
    /// this, several children of a confident state would all be the same action.
    pub distinct_first_tokens: bool,
    /// A first token is drawn without replacement only if its probability is at least this
    /// share of the most likely token's; once none is left, siblings sample freely (and may
    /// repeat). Keeps the search from forcing tokens the model all but rules out.
    pub distinct_min_ratio: f32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            sampling: SamplingParams::default(),
            granularity: Granularity::step(),
            max_depth: 64,
            top_logprobs: 5,
            distinct_first_tokens: true,
            distinct_min_ratio: 0.05,
        }
    }
}

impl GenerationConfig {
    /// Sets the sampling parameters.
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Sets the sampling temperature (0 is greedy).
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.sampling.temperature = temperature;
        self
    }

    /// Sets the seed of the run.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.sampling.seed = seed;
        self
    }

    /// Sets the action granularity.
    pub fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }

    /// Sets the step cap.
    pub fn with_max_depth(mut self, max_depth: u32) -> Self {
        self.max_depth = max_depth;
        self
    }

    /// Turns distinct first tokens of siblings on or off.
    pub fn with_distinct_first_tokens(mut self, on: bool) -> Self {
        self.distinct_first_tokens = on;
        self
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_depth == 0 {
            return Err(Error::InvalidConfig("max_depth must be at least 1".into()));
        }
        if self.top_logprobs < 5 {
            return Err(Error::InvalidConfig(format!("top_logprobs must be at least 5, got {}", self.top_logprobs)));
        }
        if !(0.0..=1.0).contains(&self.distinct_min_ratio) {
            return Err(Error::InvalidConfig(format!(
                "distinct_min_ratio must be in [0, 1], got {}",
                self.distinct_min_ratio
            )));
        }
        match &self.granularity {
            Granularity::MiniStep(0) => Err(Error::InvalidConfig("mini-step of 0 tokens".into())),
            Granularity::Step { max_tokens: 0, .. } => Err(Error::InvalidConfig("step of at most 0 tokens".into())),
            Granularity::Step { delimiters, .. } if delimiters.iter().all(|d| d.is_empty()) => {
                Err(Error::InvalidConfig("step granularity needs a non-empty delimiter".into()))
            }
            _ => Ok(()),
        }
    }
}

/// The reflection prompt and how often it may be used.
///
/// A reflection follows a *finished thought*: an action that ended at a stop token. The
/// model has consumed that stop token by the time the step reports it, so the reflection is
/// appended after it (the stop token stays in the context and in the tree). The alternative —
/// keeping a copy of every state from before each token in case it turns out to be a stop —
/// would cost a fork per generated token, and going back by feeding the thought again would
/// compute its tokens twice. Start the text with a separator if a model reads better so.
/// The answer of a path is taken from the text after its last reflection.
///
/// A chat model's stop token usually ends its *turn*: appended right after it, plain text
/// reads as a malformed conversation and such a model stops at once. With
/// [`Reflection::as_chat_turn`] the text is sent as a new user turn instead, rendered by the
/// model's own chat template (see [`ReflectionPlacement::ChatTurn`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reflection {
    /// The text appended to a finished thought.
    pub text: String,
    /// Most reflections on one path from the root.
    pub max_per_path: u32,
    /// How the text is joined to the finished thought.
    pub placement: ReflectionPlacement,
}

/// How a reflection's text is joined to the thought it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReflectionPlacement {
    /// The text as it is, right after the stop token (Marco-o1's in-thought reflection).
    #[default]
    AfterStop,
    /// The text as a new user turn: what the model's chat template writes between the end of
    /// an assistant message and the start of the next assistant message, with the reflection
    /// as the user message in between (special tokens parsed). A model without a usable
    /// template falls back to [`ReflectionPlacement::AfterStop`].
    ChatTurn,
}

impl Default for Reflection {
    fn default() -> Self {
        Reflection { text: MARCO_REFLECTION.into(), max_per_path: 1, placement: ReflectionPlacement::AfterStop }
    }
}

impl Reflection {
    /// A reflection with `text`, once per path.
    pub fn new(text: impl Into<String>) -> Self {
        Reflection { text: text.into(), ..Reflection::default() }
    }

    /// Sends the reflection as a new user turn of the chat ([`ReflectionPlacement::ChatTurn`]).
    pub fn as_chat_turn(mut self) -> Self {
        self.placement = ReflectionPlacement::ChatTurn;
        self
    }

    /// Sets how many reflections one path may hold.
    pub fn with_max_per_path(mut self, max_per_path: u32) -> Self {
        self.max_per_path = max_per_path;
        self
    }

    /// Checks the text is not blank and at least one reflection is allowed.
    pub fn validate(&self) -> Result<()> {
        if self.text.trim().is_empty() {
            return Err(Error::InvalidConfig("the reflection text is empty".into()));
        }
        if self.max_per_path == 0 {
            return Err(Error::InvalidConfig("reflection max_per_path is 0 (use no reflection instead)".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_refused() {
        assert!(GenerationConfig::default().validate().is_ok());
        assert!(Reflection::default().validate().is_ok());
        assert!(GenerationConfig::default().with_max_depth(0).validate().is_err());
        assert!(GenerationConfig { top_logprobs: 4, ..Default::default() }.validate().is_err());
        assert!(GenerationConfig::default().with_temperature(-1.0).validate().is_err());
        assert!(GenerationConfig::default().with_granularity(Granularity::MiniStep(0)).validate().is_err());
        assert!(GenerationConfig { distinct_min_ratio: 1.5, ..Default::default() }.validate().is_err());
        assert!(Reflection::new("  ").validate().is_err());
        assert!(Reflection::default().with_max_per_path(0).validate().is_err());
    }

    #[test]
    fn serde_round_trip_with_missing_fields() {
        let g: GenerationConfig = serde_json::from_str(r#"{"max_depth": 7}"#).unwrap();
        assert_eq!(g.max_depth, 7);
        assert_eq!(g.top_logprobs, 5);
        let back: GenerationConfig = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }
}
