//! Search budgets and which limit stopped a search.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Limits of one search. A search stops at the first limit it reaches and never exceeds a
/// token, node or rollout limit; the time limit is checked between model steps, so a search
/// overruns it by at most one batched step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Most tokens the model may generate (chosen tokens, all paths together).
    pub max_generated_tokens: Option<u64>,
    /// Most nodes the tree may hold, root included.
    pub max_nodes: Option<usize>,
    /// Most rollouts (MCTS simulations, beam rounds, greedy rounds).
    pub max_rollouts: Option<usize>,
    /// Most wall time.
    #[serde(with = "opt_secs")]
    pub max_time: Option<Duration>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { max_generated_tokens: Some(2048), max_nodes: None, max_rollouts: None, max_time: None }
    }
}

impl Budget {
    /// A budget of `tokens` generated tokens and nothing else.
    pub fn tokens(tokens: u64) -> Self {
        Budget { max_generated_tokens: Some(tokens), ..Budget::unlimited() }
    }

    /// No limit at all (a search refuses it: see [`Budget::validate`]).
    pub fn unlimited() -> Self {
        Budget { max_generated_tokens: None, max_nodes: None, max_rollouts: None, max_time: None }
    }

    /// Sets the node limit.
    pub fn with_nodes(mut self, nodes: usize) -> Self {
        self.max_nodes = Some(nodes);
        self
    }

    /// Sets the rollout limit.
    pub fn with_rollouts(mut self, rollouts: usize) -> Self {
        self.max_rollouts = Some(rollouts);
        self
    }

    /// Sets the time limit.
    pub fn with_time(mut self, time: Duration) -> Self {
        self.max_time = Some(time);
        self
    }

    /// Refuses a zero limit, and a budget with no limit at all (a search must end).
    pub fn validate(&self) -> Result<()> {
        if self.max_generated_tokens == Some(0) {
            return Err(Error::InvalidBudget("max_generated_tokens is 0".into()));
        }
        if self.max_nodes == Some(0) {
            return Err(Error::InvalidBudget("max_nodes is 0".into()));
        }
        if self.max_rollouts == Some(0) {
            return Err(Error::InvalidBudget("max_rollouts is 0".into()));
        }
        if self.max_time == Some(Duration::ZERO) {
            return Err(Error::InvalidBudget("max_time is 0".into()));
        }
        if self.max_generated_tokens.is_none()
            && self.max_nodes.is_none()
            && self.max_rollouts.is_none()
            && self.max_time.is_none()
        {
            return Err(Error::InvalidBudget("no limit set: a search needs at least one".into()));
        }
        Ok(())
    }
}

/// Why a search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The policy finished by itself (every path terminal, rounds done).
    Completed,
    /// The generated-token limit.
    TokenBudget,
    /// The node limit.
    NodeBudget,
    /// The rollout limit.
    RolloutBudget,
    /// The wall-time limit.
    TimeBudget,
}

/// Keeps count against a [`Budget`] during one search.
#[derive(Debug, Clone)]
pub struct BudgetTracker {
    budget: Budget,
    start: Instant,
    /// Tokens generated so far.
    pub generated_tokens: u64,
    /// Rollouts so far.
    pub rollouts: usize,
}

impl BudgetTracker {
    /// Starts the clock; fails on an invalid budget.
    pub fn start(budget: Budget) -> Result<Self> {
        budget.validate()?;
        Ok(BudgetTracker { budget, start: Instant::now(), generated_tokens: 0, rollouts: 0 })
    }

    /// The budget being tracked.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Tokens that may still be generated (`u64::MAX` without a limit).
    pub fn tokens_left(&self) -> u64 {
        self.budget.max_generated_tokens.map_or(u64::MAX, |m| m.saturating_sub(self.generated_tokens))
    }

    /// Nodes that may still be added to a tree of `nodes` nodes.
    pub fn nodes_left(&self, nodes: usize) -> usize {
        self.budget.max_nodes.map_or(usize::MAX, |m| m.saturating_sub(nodes))
    }

    /// The limit reached, if any, for a tree of `nodes` nodes.
    pub fn exhausted(&self, nodes: usize) -> Option<StopReason> {
        if self.tokens_left() == 0 {
            return Some(StopReason::TokenBudget);
        }
        if self.nodes_left(nodes) == 0 {
            return Some(StopReason::NodeBudget);
        }
        if self.budget.max_rollouts.is_some_and(|m| self.rollouts >= m) {
            return Some(StopReason::RolloutBudget);
        }
        if self.budget.max_time.is_some_and(|m| self.start.elapsed() >= m) {
            return Some(StopReason::TimeBudget);
        }
        None
    }
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let secs: Option<f64> = Option::deserialize(d)?;
        Ok(secs.filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_missing_limits_are_errors() {
        assert!(Budget::tokens(0).validate().is_err());
        assert!(Budget::unlimited().validate().is_err());
        assert!(Budget::tokens(5).with_nodes(0).validate().is_err());
        assert!(Budget::tokens(5).with_time(Duration::ZERO).validate().is_err());
        assert!(Budget::default().validate().is_ok());
    }

    #[test]
    fn tracker_reports_the_limit() {
        let mut t = BudgetTracker::start(Budget::tokens(3).with_nodes(10)).unwrap();
        assert_eq!(t.exhausted(1), None);
        t.generated_tokens = 3;
        assert_eq!(t.exhausted(1), Some(StopReason::TokenBudget));
        t.generated_tokens = 0;
        assert_eq!(t.exhausted(10), Some(StopReason::NodeBudget));
    }
}
