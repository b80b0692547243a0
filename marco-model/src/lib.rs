//! # marco-model: Qwen2 and Llama models on burn (being built by the model issue).
#![deny(missing_docs)]

pub mod backend;
pub mod cache;
pub mod config;
pub mod error;
pub mod fetch;
pub mod gguf;
mod layer_ops;
pub mod lm;
pub mod loader;
pub mod model;
pub mod tokenizer;

pub use backend::{KernelBackend, LinearPath};
pub use config::{Architecture, ModelConfig, RopeFreqRounding};
pub use error::{ModelError, Result};
pub use lm::BurnLm;
pub use loader::{load, load_default, load_with, LoadOptions, QuantizeAtLoad};
pub use model::Transformer;
