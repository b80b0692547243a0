//! The error type of `marco-core`, shared by every implementation of its traits.

use std::time::Duration;

/// Everything that can go wrong in a contract of `marco-core`.
///
/// Model and backend crates wrap their own errors in [`Error::Backend`], so a search
/// policy only ever sees this one type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A budget limit was zero, or no limit was set where one is required.
    #[error("invalid budget: {0}")]
    InvalidBudget(String),
    /// A configuration value is out of its range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A sequence would grow past the model's context window.
    #[error("context overflow: {needed} tokens needed, the model's context holds {limit}")]
    ContextOverflow {
        /// Tokens the sequence would hold.
        needed: usize,
        /// The model's context length.
        limit: usize,
    },
    /// A sequence handle is unknown to the model (never created, or already released).
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending token id.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The model produced logits that are NaN or infinite.
    #[error("the model produced non-finite logits (sequence {seq}, position {position})")]
    NonFiniteLogits {
        /// Sequence whose logits were bad.
        seq: u64,
        /// Position in that sequence.
        position: usize,
    },
    /// An empty prompt or an empty batch where one is needed.
    #[error("empty input: {0}")]
    EmptyInput(String),
    /// Tokenising, detokenising or rendering a chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A reward could not score a path.
    #[error("reward: {0}")]
    Reward(String),
    /// A wall-time limit passed while a single operation was still running.
    #[error("time limit of {0:?} exceeded")]
    Timeout(Duration),
    /// Serialising or parsing a trace failed.
    #[error("trace serialisation: {0}")]
    Trace(#[from] serde_json::Error),
    /// An invariant of marco itself was broken: a bug, reported instead of a panic.
    #[error("internal error (a bug in marco, please report it): {0}")]
    Internal(String),
    /// An error from a model or backend implementation.
    #[error("backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// Wraps any error of a model or backend crate.
    pub fn backend<E: std::error::Error + Send + Sync + 'static>(error: E) -> Self {
        Error::Backend(Box::new(error))
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
