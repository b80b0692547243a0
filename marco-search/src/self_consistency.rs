//! Self-consistency: sample several independent chains, vote over their answers.
//!
//! All `samples` chains start from the one prompt state (forks) and advance together, one
//! batched step per token. The default configuration samples them independently (no
//! distinct first tokens), so that the vote reflects the model's own distribution. Each chain is a
//! rollout; its path is evaluated by the reward and backed up. The answer is the
//! [vote](mod@crate::vote) over the chains that finished (over all chains if none did); the best
//! value decides if no chain holds an answer.

use marco_core::{
    Budget, LanguageModel, NodeId, Problem, Result, SearchObserver, SearchOutcome, SearchPolicy, StopReason,
};
use serde::{Deserialize, Serialize};

use crate::config::GenerationConfig;
use crate::engine::{run_search, Engine, WalkMode};
use crate::plugins::{plugin_methods, Plugins};
use crate::vote::vote;

/// Configuration of [`SelfConsistency`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SelfConsistencyConfig {
    /// Limits of the search.
    pub budget: Budget,
    /// How actions are generated (by default without distinct first tokens: the chains are
    /// independent samples).
    pub generation: GenerationConfig,
    /// Chains sampled.
    pub samples: usize,
}

impl Default for SelfConsistencyConfig {
    fn default() -> Self {
        SelfConsistencyConfig {
            budget: Budget::default(),
            generation: GenerationConfig::default().with_distinct_first_tokens(false),
            samples: 8,
        }
    }
}

impl SelfConsistencyConfig {
    /// Sets the budget.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }
    /// Sets the generation settings.
    pub fn with_generation(mut self, generation: GenerationConfig) -> Self {
        self.generation = generation;
        self
    }
    /// Sets the number of chains.
    pub fn with_samples(mut self, samples: usize) -> Self {
        self.samples = samples;
        self
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.budget.validate()?;
        self.generation.validate()?;
        if self.samples == 0 {
            return Err(marco_core::Error::InvalidConfig("self-consistency needs at least 1 sample".into()));
        }
        Ok(())
    }
}

/// The self-consistency policy. See the [module documentation](self).
#[derive(Default)]
pub struct SelfConsistency {
    config: SelfConsistencyConfig,
    plugins: Plugins,
}

impl SelfConsistency {
    /// The policy with `config`; fails on an invalid configuration or budget.
    pub fn new(config: SelfConsistencyConfig) -> Result<Self> {
        config.validate()?;
        Ok(SelfConsistency { config, plugins: Plugins::default() })
    }

    /// The configuration.
    pub fn config(&self) -> &SelfConsistencyConfig {
        &self.config
    }

    plugin_methods!();

    fn run(&self, engine: &mut Engine<'_>, observer: &mut dyn SearchObserver) -> Result<(NodeId, f64)> {
        if engine.out_of_budget() {
            return Ok((NodeId::ROOT, 0.0));
        }
        let count = self.config.samples.min(engine.nodes_left()).min(engine.rollouts_left());
        // The node or rollout cap is recorded after the walk: where the token or time budget runs
        // out during the walk (the walk records it), some samples get no token and that budget is
        // the reason the search stopped.
        let capped = (count < self.config.samples).then(|| {
            if engine.nodes_left() < self.config.samples {
                StopReason::NodeBudget
            } else {
                StopReason::RolloutBudget
            }
        });
        let group = if count > 1 { engine.sibling_group(NodeId::ROOT) } else { None };
        let mut walkers = Vec::with_capacity(count);
        for i in 0..count {
            walkers.push(engine.walker(NodeId::ROOT, i + 1 == count, group)?);
        }
        engine.tracker.rollouts += count;
        engine.walk(&mut walkers, WalkMode { rollout: true, keep_states: false })?;
        let mut leaves = Vec::new();
        for w in &walkers {
            match w.last {
                Some(last) => {
                    let value = engine.evaluate(last)?;
                    engine.tree.backpropagate(last, value);
                    leaves.push((last, value));
                }
                None => engine.tracker.rollouts -= 1,
            }
        }
        if let Some(reason) = capped {
            engine.stop_with(reason);
        }
        observer.on_progress(&engine.progress());
        let finished: Vec<(NodeId, f64)> =
            leaves.iter().copied().filter(|(n, _)| engine.tree.node(*n).terminal).collect();
        let voters = if finished.is_empty() { &leaves } else { &finished };
        if let Some(v) = vote(&engine.tree, voters, &*self.plugins.extractor) {
            return Ok((v.node, v.value));
        }
        Ok(leaves
            .into_iter()
            .fold((NodeId::ROOT, 0.0), |best, l| if l.1 > best.1 || best.0 == NodeId::ROOT { l } else { best }))
    }
}

impl SearchPolicy for SelfConsistency {
    fn name(&self) -> String {
        let c = &self.config;
        format!(
            "self-consistency(samples={}, temperature={}, {})",
            c.samples,
            c.generation.sampling.temperature,
            self.plugins.describe(&c.generation.granularity)
        )
    }

    fn search_observed(
        &self,
        model: &mut dyn LanguageModel,
        problem: &Problem,
        observer: &mut dyn SearchObserver,
    ) -> Result<SearchOutcome> {
        self.config.validate()?;
        let granularity = self.plugins.granularity(&self.config.generation.granularity);
        let engine = Engine::start(
            model,
            problem,
            self.config.budget,
            &self.config.generation,
            granularity,
            &*self.plugins.reward,
        )?;
        let (engine, (chosen, value)) = run_search(engine, |e| self.run(e, observer))?;
        engine.finish(self.name(), chosen, value, &*self.plugins.extractor)
    }
}
