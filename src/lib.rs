//! # marco
//!
//! Marco-o1-style inference-time reasoning in Rust: Monte Carlo Tree Search over a language
//! model's own reasoning, rewarded by the model's confidence. This facade re-exports the
//! workspace's crates; see [`core`] for the contracts, [`search`] for the policies, [`model`] for
//! the Qwen2/Llama models on burn and `remote` (feature `remote`) for models behind an
//! inference server.
//!
//! ```no_run
//! use marco::core::{Budget, LanguageModel, Problem, SearchPolicy};
//! use marco::search::{Mcts, MctsConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut model = marco::model::load_default::<marco::Cpu>(&Default::default())?;
//! let problem = Problem::from_question(model.tokenizer(), "What is 17 * 3?", None)?;
//! let mcts = Mcts::new(MctsConfig::default().with_budget(Budget::tokens(512)))?;
//! let outcome = mcts.search(&mut model, &problem)?;
//! println!("{}\nanswer: {:?} (value {:.3})", outcome.text, outcome.answer, outcome.value);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

/// Models behind an inference server: llama-server, vLLM, SGLang (feature `remote`, on by
/// default).
#[cfg(feature = "remote")]
pub use marco_backend_remote as remote;
pub use marco_core as core;
pub use marco_formats as formats;
pub use marco_model as model;
pub use marco_search as search;

pub mod eval;
pub mod trace_html;

/// burn's NdArray backend, whose linear layers, embeddings and top-k run on marco's CPU
/// kernels (feature `cpu`, on by default).
#[cfg(feature = "cpu")]
pub type Cpu = burn_ndarray::NdArray;

/// burn's CUDA backend (feature `cuda`).
#[cfg(feature = "cuda")]
pub type Cuda = burn_cuda::Cuda;

/// burn's CUDA backend in bf16: weights, activations and KV stored as bf16, the format of
/// Marco-o1's checkpoint (feature `cuda`).
#[cfg(feature = "cuda")]
pub type CudaBf16 = marco_model::backend::CudaBf16;
