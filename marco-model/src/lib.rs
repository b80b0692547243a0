//! # marco-model: Qwen2 and Llama models on burn (being built by the model issue).
#![deny(missing_docs)]

pub mod error;
pub mod fetch;
pub mod gguf;
pub mod tokenizer;

pub use error::{ModelError, Result};
