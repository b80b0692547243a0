//! # marco
//!
//! Marco-o1-style inference-time reasoning in Rust: Monte Carlo Tree Search over a language
//! model's own reasoning, rewarded by the model's confidence. This facade re-exports the
//! workspace's crates; see [`core`] for the contracts, [`search`] for the policies and [`model`] for
//! the Qwen2/Llama models on burn.
#![deny(missing_docs)]

pub use marco_core as core;
pub use marco_model as model;
pub use marco_search as search;

pub mod eval;
pub mod trace_html;
