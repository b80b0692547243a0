//! # marco-core: the contracts of marco
//!
//! marco brings Marco-o1-style inference-time reasoning to Rust: a search over a model's own
//! reasoning, guided by the model's confidence. This crate holds the contracts that separate
//! the *search* from the *model*, and knows no ML framework:
//!
//! - [`LanguageModel`] and [`Tokenizer`]: sequence states behind [`SeqId`] handles, a cheap
//!   [`fork`](LanguageModel::fork), a *batched* [`step`](LanguageModel::step) that returns
//!   the chosen token with its top-k log-probabilities, seeded sampling ([`SamplingParams`]).
//!   The trait is object-safe: a policy takes `&mut dyn LanguageModel`, so one search runs
//!   unchanged on burn's CPU or CUDA backend, or on a user's own.
//! - [`Reward`] with Marco-o1's [`ConfidenceReward`]; [`ActionGranularity`] with the
//!   paper's [`Granularity`] (token, mini-step, step); [`AnswerExtractor`]s.
//! - [`Budget`]s and the [`StopReason`] a search reports; [`SearchPolicy`] and its
//!   [`SearchOutcome`], which carries the whole [`Tree`] as a serde trace (and DOT).
//! - `mock` (feature `mock`): a deterministic mock model to test rewards and policies.
//!
//! Policies themselves live in `marco-search`; models in `marco-model`.
#![deny(missing_docs)]

pub mod action;
pub mod answer;
pub mod budget;
pub mod error;
#[cfg(any(test, feature = "mock"))]
pub mod mock;
pub mod model;
pub mod reward;
pub mod sampling;
pub mod search;
pub mod token;
pub mod tree;

pub use action::{ActionGranularity, ActionHints, Granularity};
pub use answer::{AnswerExtractor, Boxed, FirstOf, LastNumber, OutputTag};
pub use budget::{Budget, BudgetTracker, StopReason};
pub use error::{Error, Result};
pub use model::{
    action_end, check_distinct, extend_by_steps, ActionEnd, ChatMessage, ExtendOutput, ExtendRequest, LanguageModel,
    ModelCounters, SeqId, StepRequest, Tokenizer,
};
pub use reward::{ConfidenceReward, OutsideTopK, PathView, Reward};
pub use sampling::SamplingParams;
pub use search::{NoObserver, Problem, Progress, SearchObserver, SearchOutcome, SearchPolicy, SearchStats};
pub use token::{StepOutput, TokenId, TokenLogprob};
pub use tree::{Node, NodeId, NodeKind, Tree};
