//! The pluggable parts every policy carries: reward, answer extractor, custom granularity.
//!
//! Kept out of the serde configurations (trait objects do not serialise); each policy gets
//! the same `with_reward`, `with_extractor` and `with_granularity` methods from one macro.

use marco_core::answer::default_extractor;
use marco_core::{ActionGranularity, AnswerExtractor, ConfidenceReward, Granularity, Reward};

/// Reward, extractor and an optional custom granularity.
pub(crate) struct Plugins {
    pub reward: Box<dyn Reward + Send + Sync>,
    pub extractor: Box<dyn AnswerExtractor + Send + Sync>,
    pub granularity: Option<Box<dyn ActionGranularity + Send + Sync>>,
}

impl Default for Plugins {
    fn default() -> Self {
        Plugins {
            reward: Box::new(ConfidenceReward::default()),
            extractor: Box::new(default_extractor()),
            granularity: None,
        }
    }
}

impl Plugins {
    /// The custom granularity if one was set, else the configured one.
    pub fn granularity<'a>(&'a self, configured: &'a Granularity) -> &'a dyn ActionGranularity {
        match &self.granularity {
            Some(custom) => custom.as_ref(),
            None => configured,
        }
    }

    /// A description of the plug-ins for policy names.
    pub fn describe(&self, configured: &Granularity) -> String {
        format!("reward={}, granularity={}", self.reward.name(), self.granularity(configured).describe())
    }
}

/// Adds `with_reward`, `with_extractor` and `with_granularity` to a policy with a
/// `plugins: Plugins` field.
macro_rules! plugin_methods {
    () => {
        /// Replaces the reward (Marco-o1's confidence by default).
        pub fn with_reward(mut self, reward: impl marco_core::Reward + Send + Sync + 'static) -> Self {
            self.plugins.reward = Box::new(reward);
            self
        }

        /// Replaces the answer extractor (`<Output>`, then `\boxed{}`, then the last number).
        pub fn with_extractor(mut self, extractor: impl marco_core::AnswerExtractor + Send + Sync + 'static) -> Self {
            self.plugins.extractor = Box::new(extractor);
            self
        }

        /// Uses a custom action granularity instead of the configured one.
        pub fn with_granularity(
            mut self,
            granularity: impl marco_core::ActionGranularity + Send + Sync + 'static,
        ) -> Self {
            self.plugins.granularity = Some(Box::new(granularity));
            self
        }
    };
}

pub(crate) use plugin_methods;
