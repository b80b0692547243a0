//! The kernel seam: how a backend runs the hot linear layers and the top-k of the logits.
//!
//! burn's own ops are correct on every backend but not always fast: on NdArray a batch-1
//! matmul against a large weight runs at ~1 GFLOP/s. [`KernelBackend`] is a backend-extension
//! trait (burn's pattern for custom ops) with an associated weight type, so each backend keeps
//! its linear weights in the layout its kernel reads fastest and runs its own kernel on them:
//!
//! - `NdArray` (feature `cpu`): weights are `marco_backend_cpu` packed matrices (dense or
//!   ggml-quantised rows, read by a GEMV/GEMM with runtime SIMD dispatch), run directly on the
//!   primitive's host buffer; top-k is a partial selection on that buffer (the "device" is the
//!   host, so nothing is copied), and the log-sum-exp accumulates in f64.
//! - `Cuda` (feature `cuda`): weights are burn tensors; in f32 the products run in exact f32
//!   (`marco_backend_cuda::matmul_exact`: burn's own `matmul` uses TF32 tensor cores), in bf16 on
//!   burn's `matmul`.
//!
//! The same network can always run on burn's plain ops instead ([`LinearPath::Burn`]): the
//! model then holds `[in, out]` burn tensors and multiplies with `matmul`. Tests check both
//! paths against the oracles and the decode benchmark compares them.

use std::fmt::Debug;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::cache::{KvRun, KvShape};
use crate::error::Result;
use crate::layer_ops;

/// Probes the CUDA driver without panicking (cudarc panics when `libcuda.so` is missing): call
/// before running on [`burn_cuda::Cuda`].
#[cfg(feature = "cuda")]
pub use marco_backend_cuda::{cuda_available, probe_cuda, CudaError};

/// burn's CUDA backend in bf16 (weights, activations and KV), which [`KernelBackend`] is
/// implemented for beside the f32 `burn_cuda::Cuda`.
#[cfg(feature = "cuda")]
pub type CudaBf16 = burn_cuda::Cuda<burn::tensor::bf16>;

/// The rows of a linear layer's weight as they lie on the host, `[out_features, in_features]`
/// row-major (the Hugging Face and ggml layout).
#[derive(Debug, Clone, Copy)]
pub enum HostWeight<'a> {
    /// Dense f32 rows.
    F32(&'a [f32]),
    /// Rows in a ggml block-quantised type (each row a whole number of blocks).
    Ggml {
        /// The ggml type id (`2` = Q4_0, `3` = Q4_1, `8` = Q8_0, ...).
        ggml_type: u32,
        /// The raw blocks of all rows.
        bytes: &'a [u8],
    },
}

/// Which implementation runs the linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearPath {
    /// The backend's own kernel ([`KernelBackend::kernel_linear`]); on the CPU, quantised
    /// weights meet 8-bit activations (llama.cpp's scheme; fastest).
    #[default]
    Kernel,
    /// The backend's own kernel with exact f32 activations (on the CPU ~2× slower decode for
    /// quantised weights, closer to an exact evaluation: see the llama.cpp oracle test).
    KernelExact,
    /// burn's plain `matmul` on `[in, out]` tensors (the reference path).
    Burn,
}

/// The head layout of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// One sequence of a batched attention call: its rows of the batch and its KV cache.
#[derive(Debug, Clone)]
pub struct SequenceKv<B: Backend> {
    /// The sequence's rows of the batch (its new tokens).
    pub rows: std::ops::Range<usize>,
    /// Its cached keys and values in position order, the new rows' own last.
    pub runs: Vec<KvRun<B>>,
    /// Positions cached before the new rows.
    pub past: usize,
}

/// A burn backend with marco's kernel seam.
///
/// Besides the linear layers, the seam has defaulted hooks for the rest of a decoder layer
/// (RMSNorm, rotary embedding, SwiGLU, attention over the KV cache's runs): the defaults are
/// burn's plain tensor ops; a backend overrides them where a fused implementation is faster.
/// The network calls the hooks on the kernel paths and burn's ops on [`LinearPath::Burn`].
pub trait KernelBackend: Backend {
    /// A linear layer's weight in the layout this backend's kernel reads.
    type LinearWeight: Clone + Debug + Send + Sync + 'static;

    /// A short name of the kernel, for benchmark tables.
    fn kernel_name() -> &'static str;

    /// Builds a kernel weight from `[out_features, in_features]` host rows. Returns `Ok(None)`
    /// when the backend cannot keep this form (a quantised type its kernel does not read);
    /// the loader then dequantises and calls again with [`HostWeight::F32`], which every
    /// backend accepts.
    /// With `exact_activations`, the kernel keeps activations in f32 even for quantised weights.
    fn linear_weight(
        weight: HostWeight<'_>,
        out_features: usize,
        in_features: usize,
        exact_activations: bool,
        device: &Self::Device,
    ) -> Result<Option<Self::LinearWeight>>;

    /// `x · Wᵀ`: `x` is `[rows, in_features]`, the result `[rows, out_features]`.
    fn kernel_linear(x: Tensor<Self, 2>, weight: &Self::LinearWeight) -> Tensor<Self, 2>;

    /// Whether the model keeps its token embedding table as a [`KernelBackend::LinearWeight`]
    /// (in the weight's own storage: a 16-bit or quantised table stays that size, and a tied
    /// head shares it) and looks rows up with [`KernelBackend::kernel_embedding`]. The default
    /// (`false`) keeps an f32 burn tensor and `select`s its rows.
    fn embeds_from_linear_weight() -> bool {
        false
    }

    /// Whether the weights live in host memory (then loading first checks that they fit; see
    /// [`crate::memory`]). The default (`false`: a device's memory) skips the check.
    fn weights_in_host_memory() -> bool {
        false
    }

    /// Rows `ids` of the `[vocab, hidden]` table `weight`, as `[ids.len(), hidden]`; called only
    /// when [`KernelBackend::embeds_from_linear_weight`] is true, with ids the model checked
    /// against the vocabulary. The default (for backends that never embed this way) is NaN,
    /// which surfaces as non-finite logits.
    fn kernel_embedding(
        weight: &Self::LinearWeight,
        ids: &[marco_core::TokenId],
        hidden: usize,
        device: &Self::Device,
    ) -> Tensor<Self, 2> {
        let _ = weight;
        Tensor::full([ids.len(), hidden], f32::NAN, device)
    }

    /// `x · W_iᵀ` for several weights sharing the input `x` (a layer's q/k/v or gate/up
    /// projections). The default runs [`KernelBackend::kernel_linear`] once per weight.
    fn kernel_linear_many(x: Tensor<Self, 2>, weights: &[&Self::LinearWeight]) -> Vec<Tensor<Self, 2>> {
        weights.iter().map(|w| Self::kernel_linear(x.clone(), w)).collect()
    }

    /// Root-mean-square normalisation of the rows of `x` (`[rows, width]`), scaled by
    /// `weight` (`[1, width]`).
    fn rms_norm(x: Tensor<Self, 2>, weight: &Tensor<Self, 2>, eps: f32) -> Tensor<Self, 2> {
        layer_ops::rms_norm(x, weight, eps)
    }

    /// Runs `work(0)`, …, `work(tasks - 1)`, on several host threads where the backend has a
    /// pool (the per-sequence KV cache bookkeeping of a batch, which mostly waits on memory).
    /// The default runs them in order on the calling thread.
    fn for_each_parallel(tasks: usize, work: &(dyn Fn(usize) + Sync)) {
        (0..tasks).for_each(work)
    }

    /// A residual connection followed by the next RMSNorm: `(x + delta, rms_norm(x + delta))`
    /// (`x` and `delta` `[rows, width]`, `weight` `[1, width]`). The default adds with burn and
    /// calls [`KernelBackend::rms_norm`]; a backend may do both in one pass, in place.
    fn add_rms_norm(
        x: Tensor<Self, 2>,
        delta: Tensor<Self, 2>,
        weight: &Tensor<Self, 2>,
        eps: f32,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        add_then_rms_norm(x, delta, weight, eps)
    }

    /// The half-split rotary embedding of `x` (`[rows, heads, head_dim]`) with each row's
    /// `cos`/`sin` (`[rows, 1, head_dim]`), multiplied by `scale`.
    fn rope(x: Tensor<Self, 3>, cos: &Tensor<Self, 3>, sin: &Tensor<Self, 3>, scale: f32) -> Tensor<Self, 3> {
        layer_ops::rope(x, cos, sin, scale)
    }

    /// `silu(gate) · up`, elementwise.
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        layer_ops::swiglu(gate, up)
    }

    /// A gated MLP's first half, `silu(x · Gᵀ) · (x · Uᵀ)`, for two weights of one shape, in
    /// one fused pass where the backend has one (the CPU kernels apply the SwiGLU to each
    /// task's share of both products while it is in cache). `None` (the default): the model
    /// runs [`KernelBackend::kernel_linear_many`] and [`KernelBackend::swiglu`] instead.
    fn kernel_swiglu_linear(
        _x: &Tensor<Self, 2>,
        _gate: &Self::LinearWeight,
        _up: &Self::LinearWeight,
    ) -> Option<Tensor<Self, 2>> {
        None
    }

    /// Into how many parts a forward of `sequences` sequences and `tokens` new tokens is cut,
    /// each part's sequences run through the whole model on a thread of its own
    /// ([`KernelBackend::for_each_parallel`]) instead of sharing every product (the same bits
    /// either way: every kernel is batch invariant). The default, 1, never cuts; the CPU
    /// backend cuts when its threads sit far apart (see `marco_backend_cpu::batch_parts`).
    fn batch_parts(_sequences: usize, _tokens: usize) -> usize {
        1
    }

    /// One line on how this backend shares a batched step between its threads, for benchmark
    /// output (`None`: nothing to say).
    fn threading_summary() -> Option<String> {
        None
    }

    /// Writes rows `rows` of `new` (`[total, kv_heads, head_dim]`: one step's keys or values
    /// of every sequence) into a cache buffer (`[kv_heads, capacity, head_dim]`, uniquely
    /// owned) at positions `at..at + rows.len()`, and returns the buffer. The default slices,
    /// transposes and `slice_assign`s with burn.
    fn write_kv(
        buffer: Tensor<Self, 3>,
        at: usize,
        new: &Tensor<Self, 3>,
        rows: std::ops::Range<usize>,
    ) -> Tensor<Self, 3> {
        layer_ops::write_kv(buffer, at, new, rows)
    }

    /// A KV cache buffer `[kv_heads, capacity, head_dim]` whose first `used` positions are
    /// copied from `old` (how the cache grows and compacts its tail; see
    /// [`crate::cache::ResizeKv`]). The default uses burn's `empty` and `slice_assign`.
    fn resize_kv(
        old: Option<Tensor<Self, 3>>,
        used: usize,
        capacity: usize,
        shape: KvShape,
        device: &Self::Device,
    ) -> Tensor<Self, 3> {
        crate::cache::resize_kv_with_burn(old, used, capacity, shape, device)
    }

    /// Causal grouped-query attention of a batch of sequences: `q` (`[rows, heads, head_dim]`,
    /// rotated and scaled by `1/sqrt(head_dim)`) holds every sequence's new queries, and each
    /// [`SequenceKv`] names its rows and its cache (runs in position order, lengths adding up
    /// to `past + new rows`, the new positions last). Returns `[rows, heads * head_dim]`. A
    /// sequence's result must not depend on the rest of the batch or on how its positions are
    /// cut into runs, so that forked and batched sequences compute what they would alone.
    ///
    /// The default runs a decode step (one new row per sequence) for the whole batch in one set
    /// of burn ops (keys and values padded to the longest sequence and masked), where each op is
    /// a kernel launch on a GPU backend, and other batches sequence by sequence.
    fn attention(q: Tensor<Self, 3>, seqs: &[SequenceKv<Self>], shape: AttentionShape) -> Tensor<Self, 2> {
        match layer_ops::attention_decode_padded(q.clone(), seqs, shape, Self::batched_matmul) {
            Some(out) => out,
            None => layer_ops::attention_batch(q, seqs, shape, Self::batched_matmul),
        }
    }

    /// The softmax of the default attention's scores over their last dimension (`[b, m,
    /// keys]`, masked and padded positions at `-inf`). The default is burn's `softmax`. A
    /// backend whose row sums round differently with the row's length (so that a decode row
    /// padded to the batch's longest sequence would not give the bits of the same row alone)
    /// overrides it (CUDA in f32 sums each row by its exact matmul, position after position).
    fn attention_softmax(scores: Tensor<Self, 3>) -> Tensor<Self, 3> {
        burn::tensor::activation::softmax(scores, 2)
    }

    /// A batched matrix product `[b, m, k] · [b, k, n]` (the default attention's scores and
    /// weighted values). The default is burn's `matmul`.
    fn batched_matmul(lhs: Tensor<Self, 3>, rhs: Tensor<Self, 3>) -> Tensor<Self, 3> {
        lhs.matmul(rhs)
    }

    /// Bytes the weight occupies.
    fn linear_weight_bytes(weight: &Self::LinearWeight) -> usize;

    /// The log-sum-exp of every row of `logits` (`[rows, vocab]` → `[rows, 1]`); non-finite
    /// when any entry of the row is (NaN, ±inf), so it doubles as the NaN check. The default
    /// reduces on the device in the backend's float type.
    fn log_sum_exp(logits: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let row_max = logits.clone().max_dim(1);
        let lse = (logits.clone() - row_max.clone()).exp().sum_dim(1).log() + row_max;
        // `0 * sum` is 0 for finite rows and NaN when any entry is NaN or infinite.
        lse + logits.sum_dim(1).mul_scalar(0.0)
    }

    /// [`KernelBackend::log_sum_exp`] and [`KernelBackend::top_k`] of the same logits in one
    /// call (a backend may reduce each row once, or rows in parallel): `(lse [rows, 1],
    /// values [rows, k], indices [rows, k])`. The default calls the two hooks.
    fn lse_and_top_k(logits: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        lse_then_top_k(logits, k)
    }

    /// The `k` largest entries of every row of `logits` (`[rows, vocab]`) and their column
    /// indices, each row sorted descending. The default sorts on the device with burn.
    fn top_k(logits: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        let vocab = logits.dims()[1];
        let k = k.clamp(1, vocab);
        logits.topk_with_indices(k, 1)
    }
}

/// [`KernelBackend::add_rms_norm`] as two steps: burn's add, then the backend's RMSNorm hook.
fn add_then_rms_norm<B: KernelBackend>(
    x: Tensor<B, 2>,
    delta: Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    eps: f32,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let sum = x + delta;
    let normed = B::rms_norm(sum.clone(), weight, eps);
    (sum, normed)
}

/// [`KernelBackend::lse_and_top_k`] as two separate hooks.
fn lse_then_top_k<B: KernelBackend>(logits: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2, Int>) {
    let lse = B::log_sum_exp(logits.clone());
    let (values, indices) = B::top_k(logits, k);
    (lse, values, indices)
}

/// `[out, in]` row-major host rows to an `[in, out]` burn tensor (the layout `x.matmul(w)` wants).
pub(crate) fn dense_in_out<B: Backend>(
    rows: &[f32],
    out_features: usize,
    in_features: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    // Transposed straight into the backend's float type (bf16 on `Cuda<bf16>`), so that
    // `from_data` has nothing left to convert; rows of the result are split among threads.
    let zero: B::FloatElem = 0.0f32.elem();
    let mut transposed = vec![zero; rows.len()];
    const BLOCK: usize = 32;
    for_each_chunk_parallel(&mut transposed, BLOCK * out_features.max(1), |block, chunk| {
        let i0 = block * BLOCK;
        let i_count = chunk.len() / out_features.max(1);
        // Blocked over the outputs too: keeps both sides in cache for large matrices.
        for o0 in (0..out_features).step_by(BLOCK) {
            for i in 0..i_count {
                for o in o0..(o0 + BLOCK).min(out_features) {
                    chunk[i * out_features + o] = rows[o * in_features + i0 + i].elem();
                }
            }
        }
    });
    Tensor::from_data(TensorData::new(transposed, [in_features, out_features]), device)
}

/// Runs `work(chunk index, chunk)` over `chunk_len`-sized chunks of `data` (the last may be
/// shorter) on all cores. Load-time work only: large, uniform and rare.
pub(crate) fn for_each_chunk_parallel<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk_len = chunk_len.max(1);
    let chunks = data.len().div_ceil(chunk_len);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(chunks);
    if threads <= 1 {
        for (index, chunk) in data.chunks_mut(chunk_len).enumerate() {
            work(index, chunk);
        }
        return;
    }
    let per_thread = chunks.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, part) in data.chunks_mut(per_thread * chunk_len).enumerate() {
            let work = &work;
            scope.spawn(move || {
                for (index, chunk) in part.chunks_mut(chunk_len).enumerate() {
                    work(t * per_thread + index, chunk);
                }
            });
        }
    });
}

#[cfg(feature = "cpu")]
mod cpu {
    //! NdArray: marco_backend_cpu's kernels on the primitive's host buffer.

    use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
    use burn_ndarray::{NdArray, NdArrayDevice, NdArrayTensor};

    use std::borrow::Cow;
    use std::sync::Arc;

    use marco_backend_cpu::ops::{self, KvRun as HostRun};
    use marco_backend_cpu::{ActivationMode, GgmlType, MatmulOptions, PackedMatrix};

    use super::{AttentionShape, HostWeight, KernelBackend, SequenceKv};
    use crate::cache::KvShape;
    use crate::error::{ModelError, Result};
    use crate::layer_ops;

    /// The f32 primitive of a tensor (a shared handle, no copy).
    fn primitive<const D: usize>(tensor: &Tensor<NdArray, D>) -> Option<NdArrayTensor> {
        match tensor.clone().into_primitive() {
            TensorPrimitive::Float(p @ NdArrayTensor::F32(_)) => Some(p),
            _ => None,
        }
    }

    /// A tensor owning `values` (row-major, `shape`), built without copying.
    fn from_host<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &NdArrayDevice) -> Tensor<NdArray, D> {
        match marco_backend_cpu::ndarray_from_f32(values, &shape) {
            Ok(p) => Tensor::from_primitive(TensorPrimitive::Float(p)),
            // Unreachable for matching lengths; an empty tensor would hide a bug, NaNs surface it.
            Err(_) => Tensor::full(shape, f32::NAN, device),
        }
    }

    /// The shape of an f32 primitive, borrowed (where `Tensor::dims` builds a `Vec` on this
    /// backend).
    fn shape_of(p: &NdArrayTensor) -> Option<&[usize]> {
        match p {
            NdArrayTensor::F32(storage) => Some(storage.shape()),
            _ => None,
        }
    }

    /// The values of an f32 primitive (borrowed when contiguous).
    fn values(p: &NdArrayTensor) -> Option<Cow<'_, [f32]>> {
        // Not `ndarray_f32_values`: its shape vector is an allocation per call, and a decode
        // step makes thousands of these calls (every cached run of every sequence and layer).
        let NdArrayTensor::F32(storage) = p else { return None };
        let view = storage.view();
        Some(match view.to_slice() {
            Some(slice) => Cow::Borrowed(slice),
            None => Cow::Owned(view.iter().copied().collect()),
        })
    }

    /// Runs `f` on the row-major f32 contents of an NdArray tensor without copying when the
    /// tensor is contiguous (a copy is made otherwise).
    pub(crate) fn with_host_f32<const D: usize, R>(tensor: &Tensor<NdArray, D>, f: impl FnOnce(&[f32]) -> R) -> R {
        match tensor.clone().into_primitive() {
            TensorPrimitive::Float(NdArrayTensor::F32(storage)) => {
                let view = storage.view();
                match view.as_slice() {
                    Some(slice) => f(slice),
                    None => {
                        let owned: Vec<f32> = view.iter().copied().collect();
                        f(&owned)
                    }
                }
            }
            other => {
                let data = Tensor::<NdArray, D>::from_primitive(other).into_data().convert::<f32>();
                let values = data.to_vec::<f32>().unwrap_or_default();
                f(&values)
            }
        }
    }

    /// A linear layer for marco's CPU kernels: the packed weight and how to multiply it.
    #[derive(Debug, Clone)]
    pub struct CpuLinear {
        /// The weight, dense or in ggml blocks.
        pub matrix: PackedMatrix,
        /// Activation handling and threading of the product.
        pub options: MatmulOptions,
    }

    fn kernel_error(e: marco_backend_cpu::KernelError) -> ModelError {
        ModelError::InvalidConfig { path: "<linear weight>".into(), reason: e.to_string() }
    }

    impl KernelBackend for NdArray {
        // Shared: cloning a model must not copy its weights.
        type LinearWeight = Arc<CpuLinear>;

        fn kernel_name() -> &'static str {
            "marco-cpu"
        }

        fn linear_weight(
            weight: HostWeight<'_>,
            out_features: usize,
            in_features: usize,
            exact_activations: bool,
            _device: &NdArrayDevice,
        ) -> Result<Option<Self::LinearWeight>> {
            let activations = if exact_activations { ActivationMode::F32 } else { ActivationMode::Q8 };
            let packed = match weight {
                HostWeight::F32(rows) => PackedMatrix::from_f32(rows.to_vec(), out_features, in_features),
                HostWeight::Ggml { ggml_type, bytes } => match GgmlType::from_id(ggml_type) {
                    Some(ty) => PackedMatrix::from_ggml_for(ty, bytes, out_features, in_features, activations),
                    None => return Ok(None),
                },
            };
            let options = MatmulOptions { activations, ..MatmulOptions::default() };
            packed.map(|matrix| Some(Arc::new(CpuLinear { matrix, options }))).map_err(kernel_error)
        }

        fn kernel_linear(x: Tensor<Self, 2>, weight: &Self::LinearWeight) -> Tensor<Self, 2> {
            let [rows, _] = x.dims();
            let out_features = weight.matrix.out_features();
            let device = x.device();
            let mut out = vec![0.0f32; rows * out_features];
            // Shapes were checked when the model was built, so the kernel cannot fail here;
            // should it, the NaNs surface as `NonFiniteLogits` instead of a panic.
            if with_host_f32(&x, |input| {
                marco_backend_cpu::matmul_with(input, rows, &weight.matrix, &mut out, weight.options)
            })
            .is_err()
            {
                out.iter_mut().for_each(|v| *v = f32::NAN);
            }
            from_host(out, [rows, out_features], &device)
        }

        fn linear_weight_bytes(weight: &Self::LinearWeight) -> usize {
            weight.matrix.weight_bytes()
        }

        fn embeds_from_linear_weight() -> bool {
            true
        }

        fn weights_in_host_memory() -> bool {
            true
        }

        fn kernel_embedding(
            weight: &Self::LinearWeight,
            ids: &[marco_core::TokenId],
            hidden: usize,
            device: &NdArrayDevice,
        ) -> Tensor<Self, 2> {
            let ids: Vec<usize> = ids.iter().map(|&id| id as usize).collect();
            match marco_backend_cpu::embedding_ndarray(&weight.matrix, &ids) {
                Ok(rows) => Tensor::from_primitive(TensorPrimitive::Float(rows)),
                // The model checked every id against the vocabulary, so a row cannot be
                // missing; should one be, its NaNs surface as non-finite logits.
                Err(_) => Tensor::full([ids.len(), hidden], f32::NAN, device),
            }
        }

        fn kernel_swiglu_linear(
            x: &Tensor<Self, 2>,
            gate: &Self::LinearWeight,
            up: &Self::LinearWeight,
        ) -> Option<Tensor<Self, 2>> {
            if gate.options != up.options {
                return None;
            }
            let [rows, _] = x.dims();
            let out_features = gate.matrix.out_features();
            let mut out = vec![0.0f32; rows * out_features];
            with_host_f32(x, |input| {
                marco_backend_cpu::matmul_swiglu(input, rows, &gate.matrix, &up.matrix, &mut out, gate.options)
            })
            .ok()?;
            Some(from_host(out, [rows, out_features], &x.device()))
        }

        fn kernel_linear_many(x: Tensor<Self, 2>, weights: &[&Self::LinearWeight]) -> Vec<Tensor<Self, 2>> {
            let options = weights.first().map(|w| w.options);
            let same_options = weights.iter().all(|w| Some(w.options) == options);
            let (Some(options), true) = (options, same_options) else {
                return weights.iter().map(|w| Self::kernel_linear(x.clone(), w)).collect();
            };
            let [rows, _] = x.dims();
            let device = x.device();
            let mut outs: Vec<Vec<f32>> =
                weights.iter().map(|w| vec![0.0f32; rows * w.matrix.out_features()]).collect();
            let matrices: Vec<&PackedMatrix> = weights.iter().map(|w| &w.matrix).collect();
            let ok = with_host_f32(&x, |input| {
                let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                marco_backend_cpu::matmul_many(input, rows, &matrices, &mut slices, options).is_ok()
            });
            weights
                .iter()
                .zip(outs)
                .map(|(w, mut out)| {
                    if !ok {
                        out.iter_mut().for_each(|v| *v = f32::NAN);
                    }
                    from_host(out, [rows, w.matrix.out_features()], &device)
                })
                .collect()
        }

        fn rms_norm(x: Tensor<Self, 2>, weight: &Tensor<Self, 2>, eps: f32) -> Tensor<Self, 2> {
            let dims = x.dims();
            let (Some(xp), Some(wp)) = (primitive(&x), primitive(weight)) else {
                return layer_ops::rms_norm(x, weight, eps);
            };
            let (Some(xs), Some(ws)) = (values(&xp), values(&wp)) else {
                return layer_ops::rms_norm(x, weight, eps);
            };
            let mut out = vec![0.0f32; xs.len()];
            match ops::rms_norm(&xs, &ws, eps, &mut out) {
                Ok(()) => from_host(out, dims, &x.device()),
                Err(_) => layer_ops::rms_norm(x, weight, eps),
            }
        }

        fn for_each_parallel(tasks: usize, work: &(dyn Fn(usize) + Sync)) {
            marco_backend_cpu::parallel_for(tasks, work)
        }

        fn batch_parts(sequences: usize, tokens: usize) -> usize {
            marco_backend_cpu::batch_parts(sequences, tokens)
        }

        fn threading_summary() -> Option<String> {
            let threads = marco_backend_cpu::num_threads();
            let trip = marco_backend_cpu::round_trip()
                .map_or_else(|| "not measured".to_string(), |trip| format!("{} ns", trip.as_nanos()));
            Some(format!(
                "{threads} kernel threads; cache-line round trip between them {trip}: batched steps are cut by \
                 sequence at {} ns and up (MARCO_BATCH_SPLIT=auto|always|never)",
                marco_backend_cpu::FAR_ROUND_TRIP.as_nanos()
            ))
        }

        fn add_rms_norm(
            x: Tensor<Self, 2>,
            delta: Tensor<Self, 2>,
            weight: &Tensor<Self, 2>,
            eps: f32,
        ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
            let separate = |x, delta| super::add_then_rms_norm::<Self>(x, delta, weight, eps);
            let (Some(dp), Some(wp)) = (primitive(&delta), primitive(weight)) else { return separate(x, delta) };
            let (Some(ds), Some(ws)) = (values(&dp), values(&wp)) else { return separate(x, delta) };
            let device = x.device();
            match x.into_primitive() {
                TensorPrimitive::Float(NdArrayTensor::F32(mut storage)) => {
                    let shape = match (storage.shape(), shape_of(&dp)) {
                        (&[rows, width], Some(&[delta_rows, delta_width]))
                            if (rows, width) == (delta_rows, delta_width) =>
                        {
                            Some([rows, width])
                        }
                        _ => None,
                    };
                    // The residual stream is uniquely owned here (each layer's sum replaces it),
                    // so the add happens in place.
                    let target = shape.and_then(|shape| storage.ensure_owned().as_slice_mut().map(|xs| (shape, xs)));
                    if let Some((shape, xs)) = target {
                        let mut out = vec![0.0f32; xs.len()];
                        // The shapes were checked, so this cannot fail, and it checks before writing.
                        if ops::add_rms_norm(xs, &ds, &ws, eps, &mut out).is_ok() {
                            let sum = Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::F32(storage)));
                            return (sum, from_host(out, shape, &device));
                        }
                    }
                    separate(Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::F32(storage))), delta)
                }
                other => separate(Tensor::from_primitive(other), delta),
            }
        }

        fn rope(x: Tensor<Self, 3>, cos: &Tensor<Self, 3>, sin: &Tensor<Self, 3>, scale: f32) -> Tensor<Self, 3> {
            let (Some(cp), Some(sp)) = (primitive(cos), primitive(sin)) else {
                return layer_ops::rope(x, cos, sin, scale);
            };
            let (Some(cs), Some(ss)) = (values(&cp), values(&sp)) else {
                return layer_ops::rope(x, cos, sin, scale);
            };
            match x.into_primitive() {
                TensorPrimitive::Float(NdArrayTensor::F32(mut storage)) => {
                    let heads_and_dim = match *storage.shape() {
                        [_, heads, head_dim] => Some((heads, head_dim)),
                        _ => None,
                    };
                    // In place: the projections' outputs are uniquely owned (a shared tensor is
                    // copied first by `ensure_owned`). `ops::rope` checks before it writes.
                    let rotated = heads_and_dim.and_then(|(heads, head_dim)| {
                        let xs = storage.ensure_owned().as_slice_mut()?;
                        ops::rope(xs, heads, head_dim, &cs, &ss, scale).ok()
                    });
                    let x = Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::F32(storage)));
                    match rotated {
                        Some(()) => x,
                        None => layer_ops::rope(x, cos, sin, scale),
                    }
                }
                other => layer_ops::rope(Tensor::from_primitive(other), cos, sin, scale),
            }
        }

        fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
            let dims = gate.dims();
            let (Some(gp), Some(up_p)) = (primitive(&gate), primitive(&up)) else {
                return layer_ops::swiglu(gate, up);
            };
            let (Some(gs), Some(us)) = (values(&gp), values(&up_p)) else {
                return layer_ops::swiglu(gate, up);
            };
            let mut out = gs.into_owned();
            match ops::swiglu(&mut out, &us) {
                Ok(()) => from_host(out, dims, &gate.device()),
                Err(_) => layer_ops::swiglu(gate, up),
            }
        }

        fn write_kv(
            buffer: Tensor<Self, 3>,
            at: usize,
            new: &Tensor<Self, 3>,
            rows: std::ops::Range<usize>,
        ) -> Tensor<Self, 3> {
            // Shapes read from the storages: `Tensor::dims` allocates on this backend, and a
            // decode step writes every layer of every sequence.
            let Some(np) = primitive(new) else { return layer_ops::write_kv(buffer, at, new, rows) };
            let (Some(&[total, new_heads, new_dim]), Some(src)) = (shape_of(&np), values(&np)) else {
                return layer_ops::write_kv(buffer, at, new, rows);
            };
            match buffer.into_primitive() {
                TensorPrimitive::Float(NdArrayTensor::F32(mut storage)) => {
                    let n = rows.len();
                    let fits = match *storage.shape() {
                        [kv_heads, capacity, dim] => {
                            (new_heads == kv_heads && new_dim == dim && rows.end <= total && at + n <= capacity)
                                .then_some((kv_heads, capacity, dim))
                        }
                        _ => None,
                    };
                    // In place when the buffer is uniquely owned (the cache takes it out first).
                    let target = fits.and_then(|shape| storage.ensure_owned().as_slice_mut().map(|dst| (shape, dst)));
                    let Some(((kv_heads, capacity, dim), dst)) = target else {
                        let buffer = Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::F32(storage)));
                        return layer_ops::write_kv(buffer, at, new, rows);
                    };
                    for (j, row) in rows.enumerate() {
                        for head in 0..kv_heads {
                            let from = (row * kv_heads + head) * dim;
                            let to = (head * capacity + at + j) * dim;
                            dst[to..to + dim].copy_from_slice(&src[from..from + dim]);
                        }
                    }
                    Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::F32(storage)))
                }
                other => layer_ops::write_kv(Tensor::from_primitive(other), at, new, rows),
            }
        }

        fn resize_kv(
            old: Option<Tensor<Self, 3>>,
            used: usize,
            capacity: usize,
            shape: KvShape,
            device: &NdArrayDevice,
        ) -> Tensor<Self, 3> {
            let KvShape { kv_heads, head_dim, .. } = shape;
            let old_capacity = old.as_ref().map_or(0, |t| t.dims()[1]);
            let prim = old.as_ref().and_then(primitive);
            let src = prim.as_ref().and_then(values);
            let fits = used <= capacity && used <= old_capacity;
            match (&old, src, fits) {
                (Some(_), Some(src), true) if src.len() == kv_heads * old_capacity * head_dim => {
                    // Each element written once: the used part copied, the rest zeroed.
                    let mut out = Vec::with_capacity(kv_heads * capacity * head_dim);
                    for head in 0..kv_heads {
                        let from = head * old_capacity * head_dim;
                        out.extend_from_slice(&src[from..from + used * head_dim]);
                        out.resize((head + 1) * capacity * head_dim, 0.0);
                    }
                    from_host(out, [kv_heads, capacity, head_dim], device)
                }
                (None, _, _) => {
                    from_host(vec![0.0f32; kv_heads * capacity * head_dim], [kv_heads, capacity, head_dim], device)
                }
                _ => crate::cache::resize_kv_with_burn(old, used, capacity, shape, device),
            }
        }

        fn attention(q: Tensor<Self, 3>, seqs: &[SequenceKv<Self>], shape: AttentionShape) -> Tensor<Self, 2> {
            let rows = q.dims()[0];
            let fallback = || layer_ops::attention_batch(q.clone(), seqs, shape, Self::batched_matmul);
            let Some(qp) = primitive(&q) else { return fallback() };
            // Shared handles of every run's buffers, then borrowed views of them.
            let mut prims = Vec::with_capacity(seqs.len());
            for seq in seqs {
                let mut runs = Vec::with_capacity(seq.runs.len());
                for run in &seq.runs {
                    let (Some(k), Some(v)) = (primitive(&run.k), primitive(&run.v)) else { return fallback() };
                    let Some(&[_, capacity, _]) = shape_of(&k) else { return fallback() };
                    runs.push((k, v, capacity, run.len));
                }
                prims.push(runs);
            }
            let mut views = Vec::with_capacity(prims.len());
            for runs in &prims {
                let mut seq_views = Vec::with_capacity(runs.len());
                for (k, v, capacity, len) in runs {
                    match (values(k), values(v)) {
                        (Some(k), Some(v)) => seq_views.push((k, v, *capacity, *len)),
                        _ => return fallback(),
                    }
                }
                views.push(seq_views);
            }
            let host_runs: Vec<Vec<HostRun<'_>>> = views
                .iter()
                .map(|runs| {
                    runs.iter().map(|(k, v, capacity, len)| HostRun { k, v, capacity: *capacity, len: *len }).collect()
                })
                .collect();
            let host_seqs: Vec<ops::AttentionSeq<'_>> = seqs
                .iter()
                .zip(&host_runs)
                .map(|(seq, runs)| ops::AttentionSeq { rows: seq.rows.clone(), runs, past: seq.past })
                .collect();
            let Some(qs) = values(&qp) else { return fallback() };
            let width = shape.heads * shape.head_dim;
            let mut out = vec![0.0f32; rows * width];
            let host_shape =
                ops::AttentionShape { heads: shape.heads, kv_heads: shape.kv_heads, head_dim: shape.head_dim };
            match ops::attention_batch(&qs, rows, host_shape, &host_seqs, &mut out) {
                Ok(()) => from_host(out, [rows, width], &q.device()),
                Err(_) => fallback(),
            }
        }

        fn log_sum_exp(logits: Tensor<Self, 2>) -> Tensor<Self, 2> {
            let [rows, vocab] = logits.dims();
            let device = logits.device();
            // Max-shifted, terms summed in f64; NaN for a row with any non-finite entry.
            let lse: Vec<f32> = with_host_f32(&logits, |all| {
                all.chunks(vocab.max(1)).map(|row| ops::log_sum_exp(row) as f32).collect()
            });
            Tensor::from_data(TensorData::new(lse, [rows, 1]), &device)
        }

        fn lse_and_top_k(
            logits: Tensor<Self, 2>,
            k: usize,
        ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2, Int>) {
            let [rows, vocab] = logits.dims();
            let k = k.clamp(1, vocab.max(1));
            let device = logits.device();
            let stats = with_host_f32(&logits, |all| ops::row_stats(all, vocab.max(1), k));
            let Ok(stats) = stats else { return super::lse_then_top_k(logits, k) };
            let lse: Vec<f32> = stats.iter().map(|s| s.log_sum_exp as f32).collect();
            let values: Vec<f32> = stats.iter().flat_map(|s| s.top.iter().map(|&(_, v)| v)).collect();
            let indices: Vec<i64> = stats.iter().flat_map(|s| s.top.iter().map(|&(i, _)| i as i64)).collect();
            (
                Tensor::from_data(TensorData::new(lse, [rows, 1]), &device),
                Tensor::from_data(TensorData::new(values, [rows, k]), &device),
                Tensor::from_data(TensorData::new(indices, [rows, k]), &device),
            )
        }

        fn top_k(logits: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2, Int>) {
            let [rows, vocab] = logits.dims();
            let k = k.clamp(1, vocab.max(1));
            let device = logits.device();
            let mut values = Vec::with_capacity(rows * k);
            let mut indices: Vec<i64> = Vec::with_capacity(rows * k);
            with_host_f32(&logits, |all| {
                for row in all.chunks(vocab.max(1)) {
                    for (index, value) in marco_backend_cpu::top_k(row, k) {
                        values.push(value);
                        indices.push(index as i64);
                    }
                }
            });
            (
                Tensor::from_data(TensorData::new(values, [rows, k]), &device),
                Tensor::from_data(TensorData::new(indices, [rows, k]), &device),
            )
        }
    }
}

#[cfg(feature = "cpu")]
pub use cpu::CpuLinear;

#[cfg(feature = "cuda")]
mod cuda {
    //! CUDA: weights are `[in, out]` burn tensors. In f32 the linear layers and attention's
    //! products run through [`marco_backend_cuda::matmul_exact`] (f32 fused multiply-adds;
    //! burn's own `matmul` would round the inputs to TF32 on the tensor cores); in bf16 they run
    //! on burn's `matmul` (the tensor cores, as bf16 checkpoints are meant to run). Attention is
    //! the trait's default (a decode step for all sequences at once). Top-k is sorted on the
    //! device.

    use burn::tensor::{bf16, Tensor, TensorPrimitive};
    use burn_cuda::{Cuda, CudaDevice};

    use super::{dense_in_out, HostWeight, KernelBackend};
    use crate::error::Result;

    /// `lhs · rhs` in exact f32 on the device. Where no exact routine accepts the problem
    /// (none is known: cubek's naive kernel takes any shape), burn's `matmul` runs instead.
    fn exact_f32<const D: usize>(lhs: Tensor<Cuda, D>, rhs: Tensor<Cuda, D>) -> Tensor<Cuda, D> {
        match marco_backend_cuda::matmul_exact(
            lhs.clone().into_primitive().tensor(),
            rhs.clone().into_primitive().tensor(),
        ) {
            Ok(out) => Tensor::from_primitive(TensorPrimitive::Float(out)),
            Err(error) => {
                tracing::warn!(%error, "exact f32 matmul unavailable: burn's TF32 matmul runs instead");
                lhs.matmul(rhs)
            }
        }
    }

    /// One implementation per float type: `Cuda` (f32) and `Cuda<bf16>` (weights, activations
    /// and KV in bf16, as Marco-o1's checkpoint is stored; host data converts on upload).
    macro_rules! cuda_kernel_backend {
        ($float:ty, $name:literal, $matmul2:expr, $matmul3:expr $(, $attention_softmax:expr)?) => {
            impl KernelBackend for Cuda<$float> {
                type LinearWeight = Tensor<Cuda<$float>, 2>;

                fn kernel_name() -> &'static str {
                    $name
                }

                fn linear_weight(
                    weight: HostWeight<'_>,
                    out_features: usize,
                    in_features: usize,
                    _exact_activations: bool,
                    device: &CudaDevice,
                ) -> Result<Option<Self::LinearWeight>> {
                    match weight {
                        HostWeight::F32(rows) => {
                            Ok(Some(dense_in_out::<Cuda<$float>>(rows, out_features, in_features, device)))
                        }
                        HostWeight::Ggml { .. } => Ok(None),
                    }
                }

                fn kernel_linear(x: Tensor<Self, 2>, weight: &Self::LinearWeight) -> Tensor<Self, 2> {
                    $matmul2(x, weight.clone())
                }

                fn batched_matmul(lhs: Tensor<Self, 3>, rhs: Tensor<Self, 3>) -> Tensor<Self, 3> {
                    $matmul3(lhs, rhs)
                }

                $(
                    fn attention_softmax(scores: Tensor<Self, 3>) -> Tensor<Self, 3> {
                        $attention_softmax(scores)
                    }
                )?

                fn linear_weight_bytes(weight: &Self::LinearWeight) -> usize {
                    weight.shape().num_elements() * std::mem::size_of::<$float>()
                }
            }
        };
    }

    // f32: cubecl's row sum vectorizes by the row length mod 4, so burn's `softmax` would round
    // a padded decode row differently from the same row prefilled alone; the exact matmul sums
    // in order. bf16 runs burn's tensor-core matmul, which promises no order, so it keeps the
    // hook's default (burn's `softmax`).
    cuda_kernel_backend!(f32, "cubek-unit-matmul-f32", exact_f32::<2>, exact_f32::<3>, |scores| {
        crate::layer_ops::softmax_with_matmul_sums(scores, exact_f32::<3>)
    });
    cuda_kernel_backend!(bf16, "burn-cuda-matmul-bf16", Tensor::matmul, Tensor::matmul);
}
