//! Glue between burn's NdArray backend and the kernels.
//!
//! burn-ndarray's float tensor primitive (`<NdArray as Backend>::FloatTensorPrimitive`) is
//! [`NdArrayTensor`], an enum over element types whose `F32` variant holds shared ndarray
//! storage. These functions read such a tensor as a contiguous `&[f32]` (zero-copy when it is
//! in standard layout, one copy otherwise), run a kernel, and wrap the result `Vec<f32>` back
//! into an `NdArrayTensor` without copying. `marco-model`'s `KernelBackend` implementation for
//! NdArray calls them for its linear layers, embedding lookups and top-k.

use std::borrow::Cow;

use burn_ndarray::NdArrayTensor;
use ndarray::{ArrayD, IxDyn};

use crate::kernels::{matmul_with, MatmulOptions};
use crate::packed::PackedMatrix;
use crate::KernelError;

/// The shape and the row-major f32 values of an f32 tensor (borrowed when contiguous).
pub fn ndarray_f32_values(tensor: &NdArrayTensor) -> Result<(Vec<usize>, Cow<'_, [f32]>), KernelError> {
    let NdArrayTensor::F32(storage) = tensor else {
        return Err(KernelError::InvalidShape { reason: "expected an f32 NdArray tensor".into() });
    };
    let view = storage.view();
    let shape = view.shape().to_vec();
    let values = match view.to_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(view.iter().copied().collect()),
    };
    Ok((shape, values))
}

/// An f32 NdArray tensor of shape `shape` owning `values` (row-major; no copy).
pub fn ndarray_from_f32(values: Vec<f32>, shape: &[usize]) -> Result<NdArrayTensor, KernelError> {
    let expected = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if expected != Some(values.len()) {
        return Err(KernelError::LengthMismatch {
            what: "tensor values",
            expected: expected.unwrap_or(usize::MAX),
            actual: values.len(),
            unit: "elements",
        });
    }
    let array = ArrayD::from_shape_vec(IxDyn(shape), values)
        .map_err(|e| KernelError::InvalidShape { reason: format!("ndarray rejected shape {shape:?}: {e}") })?;
    Ok(NdArrayTensor::from(array.into_shared()))
}

/// `x · Wᵀ (+ bias)` for an f32 tensor `x` of shape `[..., in_features]`; the result has shape
/// `[..., out_features]`. Leading dimensions are flattened into rows, so `[batch, seq, in]`
/// runs as one `batch·seq`-row product (decode: 1 row; prefill: the prompt length).
pub fn linear_ndarray(x: NdArrayTensor, w: &PackedMatrix, bias: Option<&[f32]>) -> Result<NdArrayTensor, KernelError> {
    linear_ndarray_with(x, w, bias, MatmulOptions::default())
}

/// [`linear_ndarray`] with explicit [`MatmulOptions`].
pub fn linear_ndarray_with(
    x: NdArrayTensor,
    w: &PackedMatrix,
    bias: Option<&[f32]>,
    options: MatmulOptions,
) -> Result<NdArrayTensor, KernelError> {
    let (mut shape, values) = ndarray_f32_values(&x)?;
    let Some(last) = shape.last_mut() else {
        return Err(KernelError::InvalidShape { reason: "linear input is a scalar".into() });
    };
    if *last != w.in_features() {
        return Err(KernelError::InvalidShape {
            reason: format!("linear input has {} features, weight expects {}", *last, w.in_features()),
        });
    }
    *last = w.out_features();
    let rows = values.len() / w.in_features();
    let mut out = vec![0.0f32; rows * w.out_features()];
    matmul_with(&values, rows, w, &mut out, options)?;
    if let Some(bias) = bias {
        if bias.len() != w.out_features() {
            return Err(KernelError::LengthMismatch {
                what: "linear bias",
                expected: w.out_features(),
                actual: bias.len(),
                unit: "elements",
            });
        }
        for row in out.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    }
    drop(values);
    ndarray_from_f32(out, &shape)
}

/// Looks up rows `ids` of an embedding table stored as a [`PackedMatrix`] (`[vocab, dim]`,
/// e.g. a Q8_0 `token_embd` kept quantized and shared with the lm-head) and returns an f32
/// tensor of shape `[ids.len(), dim]`.
pub fn embedding_ndarray(table: &PackedMatrix, ids: &[usize]) -> Result<NdArrayTensor, KernelError> {
    let dim = table.in_features();
    let mut out = vec![0.0f32; ids.len() * dim];
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(dim.max(1))) {
        table.row_into(id, row)?;
    }
    ndarray_from_f32(out, &[ids.len(), dim])
}

/// [`crate::top_k`] of every row of an f32 tensor `[..., vocab]`: one `(index, value)` list per
/// row, each sorted by value descending.
pub fn top_k_ndarray(logits: &NdArrayTensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>, KernelError> {
    let (shape, values) = ndarray_f32_values(logits)?;
    let vocab = *shape.last().ok_or_else(|| KernelError::InvalidShape { reason: "logits are a scalar".into() })?;
    if vocab == 0 {
        return Err(KernelError::InvalidShape { reason: "logits have an empty last dimension".into() });
    }
    Ok(values.chunks_exact(vocab).map(|row| crate::top_k(row, k)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgmlType;

    fn naive(x: &[f32], rows: usize, w: &[f32], n_out: usize, n_in: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n_out];
        for r in 0..rows {
            for o in 0..n_out {
                out[r * n_out + o] = (0..n_in).map(|k| x[r * n_in + k] * w[o * n_in + k]).sum();
            }
        }
        out
    }

    #[test]
    fn linear_keeps_leading_dims_and_adds_bias() {
        let (n_in, n_out) = (5, 3);
        let w: Vec<f32> = (0..n_in * n_out).map(|i| (i as f32 * 0.37).sin()).collect();
        let packed = PackedMatrix::from_f32(w.clone(), n_out, n_in).unwrap();
        let x: Vec<f32> = (0..2 * 3 * n_in).map(|i| (i as f32 * 0.11).cos()).collect();
        let tensor = ndarray_from_f32(x.clone(), &[2, 3, n_in]).unwrap();
        let bias = [0.5, -1.0, 2.0];
        let y = linear_ndarray(tensor, &packed, Some(&bias)).unwrap();
        let (shape, values) = ndarray_f32_values(&y).unwrap();
        assert_eq!(shape, vec![2, 3, n_out]);
        let want = naive(&x, 6, &w, n_out, n_in);
        for (i, (g, w)) in values.iter().zip(&want).enumerate() {
            assert!((g - (w + bias[i % n_out])).abs() < 1e-5, "{i}: {g} vs {w}");
        }
    }

    #[test]
    fn non_contiguous_input_is_read_in_logical_order() {
        // A transposed view: logical [3, 2] over storage [2, 3].
        let base = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let transposed = base.reversed_axes().into_shared();
        let tensor = NdArrayTensor::from(transposed);
        let (shape, values) = ndarray_f32_values(&tensor).unwrap();
        assert_eq!(shape, vec![3, 2]);
        assert_eq!(values.as_ref(), &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let packed = PackedMatrix::from_f32(vec![1.0, 10.0], 1, 2).unwrap();
        let y = linear_ndarray(tensor, &packed, None).unwrap();
        assert_eq!(ndarray_f32_values(&y).unwrap().1.as_ref(), &[41.0, 52.0, 63.0]);
    }

    #[test]
    fn errors_on_bad_inputs() {
        let packed = PackedMatrix::from_f32(vec![1.0; 6], 2, 3).unwrap();
        let wrong = ndarray_from_f32(vec![0.0; 4], &[1, 4]).unwrap();
        assert!(linear_ndarray(wrong, &packed, None).is_err());
        let x = ndarray_from_f32(vec![0.0; 3], &[1, 3]).unwrap();
        assert!(linear_ndarray(x, &packed, Some(&[1.0])).is_err());
        assert!(ndarray_from_f32(vec![0.0; 3], &[2, 2]).is_err());
        assert!(embedding_ndarray(&packed, &[2]).is_err());
    }

    #[test]
    fn embedding_and_top_k() {
        let table: Vec<f32> = (0..4 * 32).map(|i| (i as f32 * 0.05).sin()).collect();
        let packed = PackedMatrix::quantize_q8_0(&table, 4, 32).unwrap();
        assert_eq!(packed.ggml_type(), GgmlType::Q8_0);
        let emb = embedding_ndarray(&packed, &[3, 0]).unwrap();
        let (shape, values) = ndarray_f32_values(&emb).unwrap();
        assert_eq!(shape, vec![2, 32]);
        let all = packed.to_f32();
        assert_eq!(&values[..32], &all[96..128]);
        assert_eq!(&values[32..], &all[..32]);
        let logits = ndarray_from_f32(vec![0.1, 0.9, 0.5, 3.0, 2.0, 1.0], &[2, 3]).unwrap();
        let top = top_k_ndarray(&logits, 2).unwrap();
        assert_eq!(top, vec![vec![(1, 0.9), (2, 0.5)], vec![(0, 3.0), (1, 2.0)]]);
    }
}
