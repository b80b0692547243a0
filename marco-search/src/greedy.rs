//! Greedy decoding with reflection rounds.
//!
//! Round 0 decodes (greedily by default) from the prompt to a terminal state. If it ended at
//! a stop token, the reflection prompt is appended and round 1 continues from there, and so
//! on for `rounds` reflections. Every action is a node, every round one rollout; a round is
//! evaluated by the reward over the tokens *that round* chose (the text it sees is the whole
//! path), and the value is backed up from the round's last node. The final answer is the
//! last round's or the most confident round's ([`GreedyAnswerRule`]), extracted from the text
//! after that round's reflection.
//!
//! With `rounds = 0` this is plain greedy decoding.

use marco_core::{
    Budget, LanguageModel, NodeId, Problem, Result, SamplingParams, SearchObserver, SearchOutcome, SearchPolicy,
    StopReason,
};
use serde::{Deserialize, Serialize};

use crate::config::{GenerationConfig, Reflection};
use crate::engine::{run_search, Engine, WalkMode};
use crate::plugins::{plugin_methods, Plugins};

/// Which round gives the final answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum GreedyAnswerRule {
    /// The last round that ran.
    #[default]
    LastRound,
    /// The round of highest value (the later round on a tie).
    MostConfident,
}

/// Configuration of [`GreedyReflection`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GreedyConfig {
    /// Limits of the search.
    pub budget: Budget,
    /// How actions are generated (greedy sampling by default).
    pub generation: GenerationConfig,
    /// The reflection prompt (its `max_per_path` is ignored: `rounds` rules).
    pub reflection: Reflection,
    /// R: reflection rounds after the first pass.
    pub rounds: u32,
    /// Which round gives the answer.
    pub answer_rule: GreedyAnswerRule,
}

impl Default for GreedyConfig {
    fn default() -> Self {
        GreedyConfig {
            budget: Budget::default(),
            generation: GenerationConfig::default().with_sampling(SamplingParams::greedy()),
            reflection: Reflection::default(),
            rounds: 1,
            answer_rule: GreedyAnswerRule::LastRound,
        }
    }
}

impl GreedyConfig {
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
    /// Sets the reflection prompt.
    pub fn with_reflection(mut self, reflection: Reflection) -> Self {
        self.reflection = reflection;
        self
    }
    /// Sets the reflection rounds R.
    pub fn with_rounds(mut self, rounds: u32) -> Self {
        self.rounds = rounds;
        self
    }
    /// Sets the answer rule.
    pub fn with_answer_rule(mut self, rule: GreedyAnswerRule) -> Self {
        self.answer_rule = rule;
        self
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.budget.validate()?;
        self.generation.validate()?;
        Reflection { max_per_path: 1, ..self.reflection.clone() }.validate()
    }
}

/// Greedy decoding with reflection rounds. See the [module documentation](self).
#[derive(Default)]
pub struct GreedyReflection {
    config: GreedyConfig,
    plugins: Plugins,
}

impl GreedyReflection {
    /// The policy with `config`; fails on an invalid configuration or budget.
    pub fn new(config: GreedyConfig) -> Result<Self> {
        config.validate()?;
        Ok(GreedyReflection { config, plugins: Plugins::default() })
    }

    /// The configuration.
    pub fn config(&self) -> &GreedyConfig {
        &self.config
    }

    plugin_methods!();

    fn run(&self, engine: &mut Engine<'_>, observer: &mut dyn SearchObserver) -> Result<(NodeId, f64)> {
        let reflection = Reflection { max_per_path: self.config.rounds.max(1), ..self.config.reflection.clone() };
        let reflection_tokens = engine.reflection_tokens(Some(&reflection))?;
        let mut rounds: Vec<(NodeId, f64)> = Vec::new();
        for round in 0..=self.config.rounds {
            if engine.out_of_budget() {
                break;
            }
            let start = match rounds.last() {
                None => NodeId::ROOT,
                Some(&(last, _)) => {
                    if !engine.can_reflect(last, Some(&reflection), reflection_tokens.len()) {
                        break;
                    }
                    if engine.nodes_left() < 2 {
                        engine.stop_with(StopReason::NodeBudget);
                        break;
                    }
                    engine.reflect(last, &reflection_tokens)?
                }
            };
            engine.tracker.rollouts += 1;
            let mut walkers = vec![engine.walker(start, true, None)?];
            engine.walk(&mut walkers, WalkMode { rollout: true, keep_states: false })?;
            let Some(last) = walkers[0].last else {
                engine.tracker.rollouts -= 1;
                break;
            };
            let start_depth = engine.tree.node(start).depth;
            let path = engine.tree.path(last);
            let steps: Vec<_> = path
                .iter()
                .filter(|&&n| engine.tree.node(n).depth > start_depth)
                .flat_map(|&n| engine.tree.node(n).steps.iter().cloned())
                .collect();
            let value = engine.score(&engine.tree.path_text(last), &steps, engine.tree.node(last).terminal)?;
            engine.record_value(last, value);
            engine.tree.backpropagate(last, value);
            rounds.push((last, value));
            observer.on_progress(&engine.progress());
            if round == self.config.rounds {
                break;
            }
        }
        let chosen = match self.config.answer_rule {
            GreedyAnswerRule::LastRound => rounds.last().copied(),
            GreedyAnswerRule::MostConfident => rounds.iter().copied().fold(None, |best, r| match best {
                Some((_, b)) if b > r.1 => best,
                _ => Some(r),
            }),
        };
        Ok(chosen.unwrap_or((NodeId::ROOT, 0.0)))
    }
}

impl SearchPolicy for GreedyReflection {
    fn name(&self) -> String {
        let c = &self.config;
        format!(
            "greedy-reflection(rounds={}, answer={:?}, temperature={}, {})",
            c.rounds,
            c.answer_rule,
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
