//! # marco-search: search policies over a model's own reasoning
//!
//! Marco-o1's inference-time search, written against the contracts of `marco_core` and no
//! ML framework, so one search runs unchanged on any [`LanguageModel`](marco_core::LanguageModel):
//!
//! - [`Mcts`]: Monte Carlo Tree Search with UCT selection, `width` children per expansion,
//!   rollouts to a terminal state, Marco-o1's confidence reward, optional reflection children;
//! - [`BeamSearch`]: B beams, K expansions each, ranked by mean confidence or log-probability;
//! - [`GreedyReflection`]: greedy decoding, then Marco-o1's "Wait! Maybe I made some
//!   mistakes!…" and another pass, R times;
//! - [`SelfConsistency`]: independent samples and a [vote](vote::vote) over their answers.
//!
//! Every policy implements [`SearchPolicy`](marco_core::SearchPolicy), respects its
//! [`Budget`](marco_core::Budget) strictly, evaluates leaves in batches (one batched model
//! step per token for all paths in flight), and returns the whole tree. The shared machinery
//! keeps every computed token in the tree and never feeds a prefix twice (see the
//! `engine` module's design notes), so `tokens computed ÷ distinct tokens` is 1.
//!
//! ```
//! use marco_core::mock::MockModel;
//! use marco_core::{Budget, Granularity, LanguageModel, Problem, SearchPolicy};
//! use marco_search::{GenerationConfig, Mcts, MctsConfig};
//!
//! let mut model = MockModel::builder().seed(7).typical_length(12).build().unwrap();
//! let problem = Problem::from_question(model.tokenizer(), "What is 2+3?", None).unwrap();
//! let config = MctsConfig::default()
//!     .with_budget(Budget::tokens(200))
//!     .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(4)));
//! let outcome = Mcts::new(config).unwrap().search(&mut model, &problem).unwrap();
//! assert!(outcome.stats.tokens_generated <= 200);
//! assert_eq!(outcome.stats.recompute_ratio(), 1.0);
//! ```
#![deny(missing_docs)]

pub mod beam;
pub mod config;
mod engine;
pub mod greedy;
pub mod mcts;
mod plugins;
pub mod self_consistency;
pub mod uct;
pub mod vote;

pub use beam::{BeamAnswerRule, BeamConfig, BeamScore, BeamSearch};
pub use config::{GenerationConfig, Reflection, ReflectionPlacement, MARCO_REFLECTION};
pub use greedy::{GreedyAnswerRule, GreedyConfig, GreedyReflection};
pub use mcts::{Mcts, MctsAnswerRule, MctsConfig};
pub use self_consistency::{SelfConsistency, SelfConsistencyConfig};
pub use vote::{vote, Vote};
