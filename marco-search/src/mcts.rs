//! Monte Carlo Tree Search over the model's own reasoning, Marco-o1 style.
//!
//! One iteration:
//! 1. **Select**: from the root, follow [UCT](crate::uct) through fully expanded nodes to the
//!    first node that can grow: a non-terminal node with fewer than `width` children, or a
//!    finished thought (a node that ended at a stop token) that may take a reflection child.
//!    If the walk ends at a leaf that cannot grow (a finished path), that leaf's known value
//!    is backed up once more — a simulation without new tokens, as in classic MCTS on
//!    terminal states, so good finished paths keep collecting visits. When nothing in the
//!    tree can grow any more the search is complete; after more such re-evaluations in a row
//!    than the tree has nodes, the walk skips exhausted subtrees, so a search ends even
//!    with `c = 0` and no rollout limit.
//! 2. **Expand**: create the missing children — each one action sampled at the configured
//!    temperature, with distinct first tokens where the model allows (see
//!    [`GenerationConfig::distinct_first_tokens`]) — or the single reflection child.
//! 3. **Roll out**: continue every new child to a terminal state (stop token, context limit,
//!    step cap `max_depth`). All children and their rollouts advance together, one batched
//!    model step per token. Rollouts are materialised: each rollout action is a node, which
//!    keeps its model state, so a later expansion there reuses the rollout's tokens.
//! 4. **Evaluate and back up**: each rollout's path is scored by the reward (Marco-o1's
//!    confidence by default) and [`Tree::backpropagate`](marco_core::Tree::backpropagate)d
//!    from its last node. So, as the tree module states, a node's `visits` counts the
//!    rollouts whose path passed through it: a parent's visits are the sum of its children's
//!    plus its `own_evaluations`, and the root's visits equal the search's rollouts.
//!
//! The final answer follows [`MctsAnswerRule`].

use marco_core::{
    Budget, LanguageModel, NodeId, Problem, Result, SearchObserver, SearchOutcome, SearchPolicy, TokenId,
};
use serde::{Deserialize, Serialize};

use crate::config::{GenerationConfig, Reflection};
use crate::engine::{run_search, Engine, WalkMode};
use crate::plugins::{plugin_methods, Plugins};
use crate::uct::descend;
use crate::vote::vote;

/// How MCTS picks its final path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MctsAnswerRule {
    /// From the root, follow the most visited child (ties: higher mean value, then the
    /// older child) down to a leaf.
    #[default]
    MostVisited,
    /// The evaluated terminal leaf of highest value (any evaluated leaf if none is terminal).
    BestValue,
    /// Self-consistency vote over the evaluated terminal leaves (see the [`vote`](mod@crate::vote) module); the
    /// most visited chain if no leaf holds an answer.
    Vote,
}

/// Configuration of [`Mcts`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MctsConfig {
    /// Limits of the search.
    pub budget: Budget,
    /// How actions are generated.
    pub generation: GenerationConfig,
    /// Children per expanded node.
    pub width: usize,
    /// UCT exploration constant `c`.
    pub exploration: f64,
    /// How the final path is chosen.
    pub answer_rule: MctsAnswerRule,
    /// Reflection as an extra child of finished thoughts; off by default.
    pub reflection: Option<Reflection>,
    /// Leaves selected per iteration. With more than one, each selection adds a virtual loss
    /// to its path so the next one goes elsewhere, and all their expansions and rollouts
    /// share the model's batched steps: bigger batches for an accelerator, at the price of
    /// selecting with slightly staler statistics. 1 is classic sequential MCTS.
    pub parallel_leaves: usize,
}

impl Default for MctsConfig {
    fn default() -> Self {
        MctsConfig {
            budget: Budget::default(),
            generation: GenerationConfig::default(),
            width: 3,
            exploration: std::f64::consts::SQRT_2,
            answer_rule: MctsAnswerRule::MostVisited,
            reflection: None,
            parallel_leaves: 1,
        }
    }
}

impl MctsConfig {
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
    /// Sets the children per expanded node.
    pub fn with_width(mut self, width: usize) -> Self {
        self.width = width;
        self
    }
    /// Sets the exploration constant.
    pub fn with_exploration(mut self, exploration: f64) -> Self {
        self.exploration = exploration;
        self
    }
    /// Sets the answer rule.
    pub fn with_answer_rule(mut self, rule: MctsAnswerRule) -> Self {
        self.answer_rule = rule;
        self
    }
    /// Turns reflection on.
    pub fn with_reflection(mut self, reflection: Reflection) -> Self {
        self.reflection = Some(reflection);
        self
    }
    /// Sets the leaves selected per iteration.
    pub fn with_parallel_leaves(mut self, leaves: usize) -> Self {
        self.parallel_leaves = leaves;
        self
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.budget.validate()?;
        self.generation.validate()?;
        if self.width == 0 {
            return Err(marco_core::Error::InvalidConfig("MCTS width must be at least 1".into()));
        }
        if self.parallel_leaves == 0 {
            return Err(marco_core::Error::InvalidConfig("MCTS parallel_leaves must be at least 1".into()));
        }
        if !(self.exploration.is_finite() && self.exploration >= 0.0) {
            return Err(marco_core::Error::InvalidConfig(format!(
                "the exploration constant must be finite and >= 0, got {}",
                self.exploration
            )));
        }
        if let Some(r) = &self.reflection {
            r.validate()?;
        }
        Ok(())
    }
}

/// The MCTS policy. See the [module documentation](self).
#[derive(Default)]
pub struct Mcts {
    config: MctsConfig,
    plugins: Plugins,
}

impl Mcts {
    /// The policy with `config`; fails on an invalid configuration or budget.
    pub fn new(config: MctsConfig) -> Result<Self> {
        config.validate()?;
        Ok(Mcts { config, plugins: Plugins::default() })
    }

    /// The configuration.
    pub fn config(&self) -> &MctsConfig {
        &self.config
    }

    plugin_methods!();

    /// Whether `node` can grow: a non-terminal node short of `width` children that holds
    /// its state, or a finished thought that may take a reflection.
    fn expandable(&self, engine: &Engine<'_>, node: NodeId, reflection_len: usize) -> bool {
        let n = engine.tree.node(node);
        if n.terminal {
            engine.can_reflect(node, self.config.reflection.as_ref(), reflection_len)
        } else {
            n.children.len() < self.config.width && engine.has_state(node)
        }
    }

    fn run(&self, engine: &mut Engine<'_>, observer: &mut dyn SearchObserver) -> Result<(NodeId, f64)> {
        let reflection = self.config.reflection.as_ref();
        let reflection_tokens: Vec<TokenId> = engine.reflection_tokens(reflection)?;
        let width = self.config.width;
        let mut exhausted = vec![false];
        let mut revisits_in_a_row = 0usize;
        loop {
            if exhausted[0] {
                break;
            }
            if engine.out_of_budget() {
                break;
            }
            // Selection stops at a node that can grow, or at a leaf that cannot (a finished
            // path, which is simply evaluated again). After many re-evaluations in a row the
            // walk skips exhausted subtrees, so that the search always ends.
            let force_growth = revisits_in_a_row > engine.tree.len();
            let mut leaves: Vec<NodeId> = Vec::new();
            let mut revisit = None;
            while leaves.len() < self.config.parallel_leaves {
                let leaf = {
                    let e = &*engine;
                    descend(
                        &e.tree,
                        self.config.exploration,
                        |id| {
                            !leaves.contains(&id)
                                && (self.expandable(e, id, reflection_tokens.len())
                                    || e.tree.node(id).children.is_empty())
                        },
                        |id| (force_growth && exhausted[id.index()]) || leaves.contains(&id),
                    )
                };
                let Some(leaf) = leaf else { break };
                if !self.expandable(engine, leaf, reflection_tokens.len()) {
                    if leaves.is_empty() {
                        revisit = Some(leaf);
                    }
                    break;
                }
                // A virtual loss (one more visit, no value) on the path steers the next
                // selection of this batch elsewhere; it is taken back below.
                for id in engine.tree.path(leaf) {
                    engine.tree.node_mut(id).visits += 1;
                }
                leaves.push(leaf);
            }
            for &leaf in &leaves {
                for id in engine.tree.path(leaf) {
                    engine.tree.node_mut(id).visits -= 1;
                }
            }
            if let Some(leaf) = revisit {
                // A leaf with nothing left to grow: one more evaluation of its known value.
                engine.tracker.rollouts += 1;
                let value = match engine.values[leaf.index()] {
                    Some(v) => v,
                    None => engine.evaluate(leaf)?,
                };
                engine.tree.backpropagate(leaf, value);
                revisits_in_a_row += 1;
                observer.on_progress(&engine.progress());
                continue;
            }
            if leaves.is_empty() {
                break;
            }
            revisits_in_a_row = 0;
            let old_len = engine.tree.len();
            let mut walkers = Vec::new();
            for &leaf in &leaves {
                // Walkers in flight each hold a node and a rollout of the budget.
                let nodes_left = engine.nodes_left().saturating_sub(walkers.len());
                let rollouts_left = engine.rollouts_left().saturating_sub(walkers.len());
                if engine.tree.node(leaf).terminal {
                    // A reflection child and one rollout from it; needs a node for each.
                    if nodes_left < 2 || rollouts_left == 0 {
                        if walkers.is_empty() {
                            engine.stop_with(marco_core::StopReason::NodeBudget);
                        }
                        break;
                    }
                    let child = engine.reflect(leaf, &reflection_tokens)?;
                    walkers.push(engine.walker(child, width == 1, None)?);
                } else {
                    let missing = width - engine.tree.node(leaf).children.len();
                    let count = missing.min(nodes_left).min(rollouts_left);
                    if count == 0 {
                        break;
                    }
                    let group = if count > 1 || !engine.tree.node(leaf).children.is_empty() {
                        engine.sibling_group(leaf)
                    } else {
                        None
                    };
                    for i in 0..count {
                        // The last child of a fully expanded node takes its state over.
                        let take = i + 1 == count && count == missing;
                        walkers.push(engine.walker(leaf, take, group)?);
                    }
                }
            }
            if walkers.is_empty() {
                break;
            }
            engine.tracker.rollouts += walkers.len();
            engine.walk(&mut walkers, WalkMode { rollout: true, keep_states: true })?;
            for w in &walkers {
                match w.last {
                    Some(last) => {
                        let value = engine.evaluate(last)?;
                        engine.tree.backpropagate(last, value);
                    }
                    // Nothing was generated (the budget ran out first): no rollout happened.
                    None => engine.tracker.rollouts -= 1,
                }
            }
            // Finished thoughts that can take no reflection need their state no more.
            for i in old_len..engine.tree.len() {
                let id = NodeId(i as u32);
                if engine.tree.node(id).terminal && !self.expandable(engine, id, reflection_tokens.len()) {
                    engine.release_state(id)?;
                }
            }
            // Exhaustion changes only among the new nodes and the leaf's ancestors.
            exhausted.resize(engine.tree.len(), false);
            let refresh = |id: NodeId, exhausted: &mut Vec<bool>| {
                let done = !self.expandable(engine, id, reflection_tokens.len())
                    && engine.tree.node(id).children.iter().all(|c| exhausted[c.index()]);
                exhausted[id.index()] = done;
            };
            for i in (old_len..engine.tree.len()).rev() {
                refresh(NodeId(i as u32), &mut exhausted);
            }
            for &leaf in &leaves {
                for id in engine.tree.path(leaf).into_iter().rev() {
                    refresh(id, &mut exhausted);
                }
            }
            observer.on_progress(&engine.progress());
            if engine.tree.len() == old_len {
                break; // nothing could be added: the budget ran out first
            }
        }
        Ok(self.choose(engine))
    }

    /// The final path's last node and its value.
    fn choose(&self, engine: &Engine<'_>) -> (NodeId, f64) {
        let tree = &engine.tree;
        let evaluated = |terminal_only: bool| -> Vec<(NodeId, f64)> {
            engine
                .values
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| (NodeId(i as u32), v)))
                .filter(|(id, _)| !terminal_only || tree.node(*id).terminal)
                .collect()
        };
        match self.config.answer_rule {
            MctsAnswerRule::MostVisited => most_visited(engine),
            MctsAnswerRule::BestValue => {
                let mut leaves = evaluated(true);
                if leaves.is_empty() {
                    leaves = evaluated(false);
                }
                leaves
                    .into_iter()
                    .fold(None, |best: Option<(NodeId, f64)>, (id, v)| match best {
                        Some((_, b)) if b >= v => best,
                        _ => Some((id, v)),
                    })
                    .unwrap_or((NodeId::ROOT, 0.0))
            }
            MctsAnswerRule::Vote => match vote(tree, &evaluated(true), &*self.plugins.extractor) {
                Some(v) => (v.node, v.value),
                None => most_visited(engine),
            },
        }
    }
}

/// The most visited chain's last node and its mean value.
fn most_visited(engine: &Engine<'_>) -> (NodeId, f64) {
    let tree = &engine.tree;
    let mut current = NodeId::ROOT;
    loop {
        let node = tree.node(current);
        let next = node.children.iter().copied().filter(|&c| tree.node(c).visits > 0).fold(None, |best, c| {
            let better = |b: NodeId| {
                let (x, y) = (tree.node(c), tree.node(b));
                x.visits > y.visits || (x.visits == y.visits && x.mean_value() > y.mean_value())
            };
            match best {
                Some(b) if !better(b) => Some(b),
                _ => Some(c),
            }
        });
        match next {
            Some(n) => current = n,
            None => break,
        }
    }
    let node = tree.node(current);
    let value = engine.values[current.index()].unwrap_or_else(|| node.mean_value());
    (current, value)
}

impl SearchPolicy for Mcts {
    fn name(&self) -> String {
        let c = &self.config;
        format!(
            "mcts(width={}, c={:.3}, leaves={}, temperature={}, answer={:?}, reflection={}, {})",
            c.width,
            c.exploration,
            c.parallel_leaves,
            c.generation.sampling.temperature,
            c.answer_rule,
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
