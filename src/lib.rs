//! # marco
//!
//! Marco-o1-style inference-time reasoning in Rust: Monte Carlo Tree Search over a language
//! model's own reasoning, rewarded by the model's confidence. This facade re-exports the
//! workspace's crates; see [`core`] for the contracts and [`search`] for the policies.
#![deny(missing_docs)]

pub use marco_core as core;
pub use marco_search as search;

pub mod eval;
pub mod trace_html;
