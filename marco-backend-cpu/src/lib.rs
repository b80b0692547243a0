//! # marco-backend-cpu: quantized weights and fast CPU kernels for marco's NdArray backend
//!
//! This crate knows nothing of models; `marco-model` builds on it.
//!
//! * [`quant`] (re-exported from `marco-formats`): ggml/GGUF tensor types ([`GgmlType`]), block
//!   layouts and exact scalar reference dequantizers ([`dequantize`], [`row_bytes`]), plus the
//!   Q8_0 encoder behind `--quantize q8_0`.
//! * [`PackedMatrix`]: a linear layer's weight `W[out_features, in_features]` (each output
//!   feature's weights contiguous, the HF/GGUF layout), stored as f32 or kept as GGUF blocks
//!   ([`PackedMatrix::KEPT_QUANTIZED`]: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
//!   Built with [`PackedMatrix::from_f32`], [`PackedMatrix::quantize_q8_0`] or
//!   [`PackedMatrix::from_ggml`] / [`PackedMatrix::from_ggml_for`]. Q8_0/Q4_0/Q4_1 blocks are
//!   reordered at pack time, same bytes: scales apart from quants, and on AVX512-VNNI machines
//!   (for 8-bit activations) sixteen rows interleaved word by word, so that one vector lane
//!   holds one output and each activation word is broadcast to all lanes of a `vpdpbusd`:
//!   no horizontal sums, and a 4-bit decode step becomes bound by memory instead of by
//!   instructions.
//! * [`matmul`]`(x, rows, &w, out)`: `out[rows, out_features] = x[rows, in_features] · Wᵀ`,
//!   row-major slices. Quantized weights run fused dequantize-dot SIMD kernels chosen at run
//!   time ([`isa`]) over 8-bit activations for every batch size, so that each row's result
//!   does not depend on the rows beside it (batch invariance: a sequence's logits are the same
//!   alone, batched or prefilled). f32 weights, and quantized ones with exact f32 activations,
//!   switch to a tiled dequantize + `gemm` for large batches (more than [`SMALL_BATCH_MAX_F32`]
//!   / [`SMALL_BATCH_MAX`] rows). Work is split across a persistent pool of
//!   [`num_threads`] threads (default 2; `MARCO_THREADS` overrides). [`matmul_with`] takes
//!   [`MatmulOptions`] (e.g. exact f32 activations instead of 8-bit ones).
//! * [`matmul_many`]: several weights sharing one input (a layer's q/k/v or gate/up) as one
//!   product: activations prepared once, one thread-pool job.
//! * [`ops`]: the rest of a decoder layer on host buffers — RMSNorm, rotary embedding, SwiGLU,
//!   batched causal attention reading a KV cache's segments in place, log-sum-exp.
//! * [`batch_parts`]: whether a batched decode step shares every product between the threads
//!   (tensor-parallel) or gives each thread a share of the sequences through the whole model
//!   (data-parallel), chosen from a measured cache-line round trip between the threads.
//! * [`top_k`]: the k largest logits without a full sort.
//! * NdArray glue: [`linear_ndarray`]`(x, &w, bias)` runs [`matmul`] on burn-ndarray's float
//!   primitive ([`NdArrayTensor`], shape `[..., in]` → `[..., out]`), plus
//!   [`embedding_ndarray`], [`top_k_ndarray`] and the conversions [`ndarray_f32_values`] /
//!   [`ndarray_from_f32`].
//!
//! Every fallible function returns [`KernelError`]; no function panics on bad input.
//!
//! Environment: `MARCO_THREADS=n` sets the kernel thread count (default `min(2, cores)`; use 1
//! on an oversubscribed machine, where a descheduled worker stalls each product), and
//! `MARCO_KERNELS=scalar|avx2|avx512` caps the instruction set the kernels dispatch to (the
//! best the CPU has by default; `scalar` forces the portable kernels, for testing), and
//! `MARCO_BATCH_SPLIT=auto|always|never` how a batched step is shared by the threads
//! ([`batch_parts`]: by default measured, from where the cores sit).
//!
//! ```
//! use marco_backend_cpu::{matmul, top_k, PackedMatrix};
//! // W[out = 2, in = 32]: row 0 all ones, row 1 all twos; quantized to Q8_0 at pack time.
//! let w: Vec<f32> = (0..64).map(|i| if i < 32 { 1.0 } else { 2.0 }).collect();
//! let packed = PackedMatrix::quantize_q8_0(&w, 2, 32)?;
//! let x = vec![0.5f32; 32];
//! let mut y = vec![0.0f32; 2];
//! matmul(&x, 1, &packed, &mut y)?;
//! // Exact up to the f16 rounding of the block scales (relative 2^-11).
//! assert!((y[0] - 16.0).abs() < 1e-2 && (y[1] - 32.0).abs() < 2e-2);
//! assert_eq!(top_k(&y, 1)[0].0, 1);
//! # Ok::<(), marco_backend_cpu::KernelError>(())
//! ```
#![deny(missing_docs)]

mod alloc;
mod error;
mod kernels;
mod ndarray_glue;
pub mod ops;
mod packed;
mod pool;
/// The ggml tensor types and their reference codecs (they live in `marco-formats`).
pub use marco_formats::quant;
mod topk;

pub use burn_ndarray::NdArrayTensor;
pub use error::KernelError;
pub use kernels::{
    isa, matmul, matmul_many, matmul_swiglu, matmul_with, ActivationMode, Isa, MatmulOptions, SMALL_BATCH_MAX,
    SMALL_BATCH_MAX_F32,
};
pub use ndarray_glue::{
    embedding_ndarray, linear_ndarray, linear_ndarray_with, ndarray_f32_values, ndarray_from_f32, top_k_ndarray,
};
pub use packed::PackedMatrix;
pub use pool::{
    batch_parts, num_threads, parallel_for, round_trip, set_batch_split, BatchSplit, BATCH_SPLIT_MAX_TOKENS,
    FAR_ROUND_TRIP,
};
pub use quant::{dequantize, row_bytes, GgmlType};
pub use topk::top_k;
