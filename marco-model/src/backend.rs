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
//! - `Cuda` (feature `cuda`): weights are burn tensors and the kernel is burn's `matmul`.
//!
//! The same network can always run on burn's plain ops instead ([`LinearPath::Burn`]): the
//! model then holds `[in, out]` burn tensors and multiplies with `matmul`. Tests check both
//! paths against the oracles and the decode benchmark compares them.

use std::fmt::Debug;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::Result;

/// Probes the CUDA driver without panicking (cudarc panics when `libcuda.so` is missing): call
/// before running on [`burn_cuda::Cuda`].
#[cfg(feature = "cuda")]
pub use marco_backend_cuda::{cuda_available, probe_cuda, CudaUnavailable};

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

/// A burn backend with marco's kernel seam.
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

    /// The `k` largest entries of every row of `logits` (`[rows, vocab]`) and their column
    /// indices, each row sorted descending. The default sorts on the device with burn.
    fn top_k(logits: Tensor<Self, 2>, k: usize) -> (Tensor<Self, 2>, Tensor<Self, 2, Int>) {
        let vocab = logits.dims()[1];
        let k = k.clamp(1, vocab);
        logits.topk_with_indices(k, 1)
    }
}

/// `[out, in]` row-major host rows to an `[in, out]` burn tensor (the layout `x.matmul(w)` wants).
pub(crate) fn dense_in_out<B: Backend>(
    rows: &[f32],
    out_features: usize,
    in_features: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut transposed = vec![0.0f32; rows.len()];
    // Blocked transpose: keeps both sides in cache for large matrices.
    const BLOCK: usize = 32;
    for o0 in (0..out_features).step_by(BLOCK) {
        for i0 in (0..in_features).step_by(BLOCK) {
            for o in o0..(o0 + BLOCK).min(out_features) {
                for i in i0..(i0 + BLOCK).min(in_features) {
                    transposed[i * out_features + o] = rows[o * in_features + i];
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(transposed, [in_features, out_features]), device)
}

#[cfg(feature = "cpu")]
mod cpu {
    //! NdArray: marco_backend_cpu's kernels on the primitive's host buffer.

    use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
    use burn_ndarray::{NdArray, NdArrayDevice, NdArrayTensor};

    use std::sync::Arc;

    use marco_backend_cpu::{ActivationMode, GgmlType, MatmulOptions, PackedMatrix};

    use super::{HostWeight, KernelBackend};
    use crate::error::{ModelError, Result};

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
            let packed = match weight {
                HostWeight::F32(rows) => PackedMatrix::from_f32(rows.to_vec(), out_features, in_features),
                HostWeight::Ggml { ggml_type, bytes } => match GgmlType::from_id(ggml_type) {
                    Some(ty) => PackedMatrix::from_ggml(ty, bytes, out_features, in_features),
                    None => return Ok(None),
                },
            };
            let activations = if exact_activations { ActivationMode::F32 } else { ActivationMode::Q8 };
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
            Tensor::from_data(TensorData::new(out, [rows, out_features]), &device)
        }

        fn linear_weight_bytes(weight: &Self::LinearWeight) -> usize {
            weight.matrix.weight_bytes()
        }

        fn log_sum_exp(logits: Tensor<Self, 2>) -> Tensor<Self, 2> {
            let [rows, vocab] = logits.dims();
            let device = logits.device();
            // f64 accumulation: an f32 sum over a 49k vocabulary drifts by ~1e-4.
            let lse: Vec<f32> = with_host_f32(&logits, |all| {
                all.chunks(vocab.max(1))
                    .map(|row| {
                        if row.iter().any(|x| !x.is_finite()) {
                            return f32::NAN;
                        }
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                        (max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()) as f32
                    })
                    .collect()
            });
            Tensor::from_data(TensorData::new(lse, [rows, 1]), &device)
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
    //! CUDA: burn's own matmul on `[in, out]` tensors; top-k sorted on the device.

    use burn::tensor::Tensor;
    use burn_cuda::{Cuda, CudaDevice};

    use super::{dense_in_out, HostWeight, KernelBackend};
    use crate::error::Result;

    impl KernelBackend for Cuda {
        type LinearWeight = Tensor<Cuda, 2>;

        fn kernel_name() -> &'static str {
            "burn-cuda-matmul"
        }

        fn linear_weight(
            weight: HostWeight<'_>,
            out_features: usize,
            in_features: usize,
            _exact_activations: bool,
            device: &CudaDevice,
        ) -> Result<Option<Self::LinearWeight>> {
            match weight {
                HostWeight::F32(rows) => Ok(Some(dense_in_out::<Cuda>(rows, out_features, in_features, device))),
                HostWeight::Ggml { .. } => Ok(None),
            }
        }

        fn kernel_linear(x: Tensor<Self, 2>, weight: &Self::LinearWeight) -> Tensor<Self, 2> {
            x.matmul(weight.clone())
        }

        fn linear_weight_bytes(weight: &Self::LinearWeight) -> usize {
            weight.shape().num_elements() * std::mem::size_of::<f32>()
        }
    }
}
