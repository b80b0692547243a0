//! Beam search over actions.
//!
//! A round (one rollout of the budget) expands every live beam into `expansions` candidate
//! actions — all candidates of all beams step together, one batched model step per token,
//! with distinct first tokens where the model allows — then keeps the best `beam_width`
//! paths among the candidates and the beams that had already finished. Paths are ranked by
//! a [`BeamScore`]; ties go to the older node, and a candidate identical to another child
//! of the same beam is dropped. The beam never holds more than `beam_width` paths. The
//! search ends when every beam is terminal or a budget is spent.
//!
//! Every candidate is evaluated by the reward once, when it is created, and that value is
//! backed up the tree, so visit counts follow the tree's convention (a node's visits count
//! the evaluations at or below it).
//!
//! With [`Reflection`] on, a kept path that finished a thought gets a reflection child and
//! keeps going from it; the finished path stays a candidate for the final answer.

use marco_core::{
    Budget, LanguageModel, NodeId, NodeKind, Problem, Result, SearchObserver, SearchOutcome, SearchPolicy, StopReason,
};
use serde::{Deserialize, Serialize};

use crate::config::{GenerationConfig, Reflection};
use crate::engine::{run_search, Engine, WalkMode};
use crate::plugins::{plugin_methods, Plugins};
use crate::vote::vote;

/// How beam search ranks paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BeamScore {
    /// The policy's reward of the whole path: the mean confidence with the default
    /// [`ConfidenceReward`](marco_core::ConfidenceReward).
    #[default]
    Reward,
    /// Sum of the chosen tokens' log-probabilities along the path.
    SumLogprob,
}

/// How beam search picks its final path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BeamAnswerRule {
    /// The best-scored finished path (the best-scored path of any kind if none finished).
    #[default]
    BestScore,
    /// Self-consistency vote over the finished paths; the best score if none holds an answer.
    Vote,
}

/// Configuration of [`BeamSearch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BeamConfig {
    /// Limits of the search.
    pub budget: Budget,
    /// How actions are generated.
    pub generation: GenerationConfig,
    /// B: most paths kept after each round.
    pub beam_width: usize,
    /// K: candidate actions per beam per round.
    pub expansions: usize,
    /// How paths are ranked.
    pub score: BeamScore,
    /// How the final path is chosen.
    pub answer_rule: BeamAnswerRule,
    /// Reflection after finished thoughts; off by default.
    pub reflection: Option<Reflection>,
}

impl Default for BeamConfig {
    fn default() -> Self {
        BeamConfig {
            budget: Budget::default(),
            generation: GenerationConfig::default(),
            beam_width: 3,
            expansions: 2,
            score: BeamScore::Reward,
            answer_rule: BeamAnswerRule::BestScore,
            reflection: None,
        }
    }
}

impl BeamConfig {
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
    /// Sets the beam width B.
    pub fn with_beam_width(mut self, beam_width: usize) -> Self {
        self.beam_width = beam_width;
        self
    }
    /// Sets the expansions K per beam.
    pub fn with_expansions(mut self, expansions: usize) -> Self {
        self.expansions = expansions;
        self
    }
    /// Sets the path score.
    pub fn with_score(mut self, score: BeamScore) -> Self {
        self.score = score;
        self
    }
    /// Sets the answer rule.
    pub fn with_answer_rule(mut self, rule: BeamAnswerRule) -> Self {
        self.answer_rule = rule;
        self
    }
    /// Turns reflection on.
    pub fn with_reflection(mut self, reflection: Reflection) -> Self {
        self.reflection = Some(reflection);
        self
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.budget.validate()?;
        self.generation.validate()?;
        if self.beam_width == 0 {
            return Err(marco_core::Error::InvalidConfig("beam width must be at least 1".into()));
        }
        if self.expansions == 0 {
            return Err(marco_core::Error::InvalidConfig("expansions per beam must be at least 1".into()));
        }
        if let Some(r) = &self.reflection {
            r.validate()?;
        }
        Ok(())
    }
}

/// The beam-search policy. See the [module documentation](self).
#[derive(Default)]
pub struct BeamSearch {
    config: BeamConfig,
    plugins: Plugins,
}

/// A path in the beam: its last node and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    node: NodeId,
    score: f64,
}

impl BeamSearch {
    /// The policy with `config`; fails on an invalid configuration or budget.
    pub fn new(config: BeamConfig) -> Result<Self> {
        config.validate()?;
        Ok(BeamSearch { config, plugins: Plugins::default() })
    }

    /// The configuration.
    pub fn config(&self) -> &BeamConfig {
        &self.config
    }

    plugin_methods!();

    /// Searches like [`SearchPolicy::search_observed`] and also returns the beam after every
    /// round (the last node of each kept path), for inspection.
    pub fn search_with_rounds(
        &self,
        model: &mut dyn LanguageModel,
        problem: &Problem,
        observer: &mut dyn SearchObserver,
    ) -> Result<(SearchOutcome, Vec<Vec<NodeId>>)> {
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
        let (engine, (chosen, value, rounds)) = run_search(engine, |e| self.run(e, observer))?;
        Ok((engine.finish(self.name(), chosen, value, &*self.plugins.extractor)?, rounds))
    }

    fn is_live(engine: &Engine<'_>, node: NodeId) -> bool {
        !engine.tree.node(node).terminal && engine.has_state(node)
    }

    fn path_score(&self, engine: &Engine<'_>, node: NodeId, value: f64) -> f64 {
        match self.config.score {
            BeamScore::Reward => value,
            BeamScore::SumLogprob => engine.tree.path_steps(node).iter().map(|s| s.logprob as f64).sum(),
        }
    }

    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        engine: &mut Engine<'_>,
        observer: &mut dyn SearchObserver,
    ) -> Result<(NodeId, f64, Vec<Vec<NodeId>>)> {
        let reflection = self.config.reflection.as_ref();
        let reflection_tokens = engine.reflection_tokens(reflection)?;
        let mut beams = vec![Entry { node: NodeId::ROOT, score: 0.0 }];
        let mut finished: Vec<Entry> = Vec::new();
        let mut rounds = Vec::new();
        loop {
            if engine.out_of_budget() {
                break;
            }
            let live: Vec<Entry> = beams.iter().copied().filter(|b| Self::is_live(engine, b.node)).collect();
            if live.is_empty() {
                break;
            }
            engine.tracker.rollouts += 1;
            // Candidates of every live beam, as many as the node budget has room for.
            let mut slots = engine.nodes_left();
            let mut walkers = Vec::new();
            let mut expanded = Vec::new();
            for b in &live {
                let k = self.config.expansions.min(slots);
                if k == 0 {
                    break;
                }
                slots -= k;
                let group = if k > 1 { engine.sibling_group(b.node) } else { None };
                for i in 0..k {
                    walkers.push(engine.walker(b.node, i + 1 == k, group)?);
                }
                expanded.push(b.node);
            }
            engine.walk(&mut walkers, WalkMode { rollout: false, keep_states: false })?;
            let mut pool: Vec<Entry> = beams.iter().copied().filter(|b| !expanded.contains(&b.node)).collect();
            for w in &walkers {
                let Some(node) = w.last else { continue };
                let value = engine.evaluate(node)?;
                engine.tree.backpropagate(node, value);
                let duplicate = pool.iter().any(|p| {
                    let (a, b) = (engine.tree.node(p.node), engine.tree.node(node));
                    a.parent == b.parent && a.tokens == b.tokens
                });
                if duplicate {
                    engine.release_state(node)?;
                    continue;
                }
                pool.push(Entry { node, score: self.path_score(engine, node, value) });
            }
            // Best first; ties to the older node. A stable sort keeps the order deterministic.
            pool.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.node.cmp(&b.node)));
            for dropped in pool.iter().skip(self.config.beam_width) {
                engine.release_state(dropped.node)?;
            }
            pool.truncate(self.config.beam_width);
            beams.clear();
            for entry in pool {
                let node = entry.node;
                if engine.tree.node(node).terminal && engine.tree.node(node).kind == NodeKind::Action {
                    if !finished.iter().any(|f| f.node == node) {
                        finished.push(entry);
                    }
                    if engine.tree.node(node).children.is_empty()
                        && engine.can_reflect(node, reflection, reflection_tokens.len())
                        && engine.nodes_left() >= 2
                    {
                        let child = engine.reflect(node, &reflection_tokens)?;
                        beams.push(Entry { node: child, score: entry.score });
                        continue;
                    }
                    engine.release_state(node)?;
                }
                beams.push(entry);
            }
            rounds.push(beams.iter().map(|b| b.node).collect());
            observer.on_progress(&engine.progress());
            if walkers.iter().all(|w| w.last.is_none()) && engine.stop.is_none() {
                engine.stop_with(StopReason::TokenBudget);
            }
        }
        let (chosen, value) = self.choose(engine, &beams, &finished);
        Ok((chosen, value, rounds))
    }

    fn choose(&self, engine: &Engine<'_>, beams: &[Entry], finished: &[Entry]) -> (NodeId, f64) {
        let value_of = |node: NodeId| engine.values[node.index()].unwrap_or(0.0);
        let mut candidates: Vec<Entry> = finished.to_vec();
        for b in beams {
            if engine.tree.node(b.node).terminal && !candidates.iter().any(|c| c.node == b.node) {
                candidates.push(*b);
            }
        }
        if self.config.answer_rule == BeamAnswerRule::Vote {
            let leaves: Vec<(NodeId, f64)> = candidates.iter().map(|c| (c.node, value_of(c.node))).collect();
            if let Some(v) = vote(&engine.tree, &leaves, &*self.plugins.extractor) {
                return (v.node, v.value);
            }
        }
        if candidates.is_empty() {
            // Nothing finished: the best path still in the beam (reflection nodes carry
            // their parent's score).
            candidates = beams.iter().copied().filter(|b| b.node != NodeId::ROOT).collect();
        }
        let best = candidates.iter().fold(None, |best: Option<Entry>, c| match best {
            Some(b) if b.score > c.score || (b.score == c.score && b.node < c.node) => Some(b),
            _ => Some(*c),
        });
        match best {
            Some(b) => (b.node, value_of(b.node)),
            None => (NodeId::ROOT, 0.0),
        }
    }
}

impl SearchPolicy for BeamSearch {
    fn name(&self) -> String {
        let c = &self.config;
        format!(
            "beam(width={}, expansions={}, score={:?}, temperature={}, reflection={}, {})",
            c.beam_width,
            c.expansions,
            c.score,
            c.generation.sampling.temperature,
            c.reflection.as_ref().map_or(0, |r| r.max_per_path),
            self.plugins.describe(&c.generation.granularity)
        )
    }

    fn search_observed(
        &self,
        model: &mut dyn LanguageModel,
        problem: &Problem,
        observer: &mut dyn SearchObserver,
    ) -> Result<SearchOutcome> {
        Ok(self.search_with_rounds(model, problem, observer)?.0)
    }
}
