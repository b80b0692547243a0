//! The decoder layer's non-linear operations in burn's plain tensor ops: the reference
//! implementation every backend gets by default (see the hooks of [`KernelBackend`]).

use burn::tensor::activation::silu;
use burn::tensor::{Tensor, TensorData};

use crate::backend::{AttentionShape, KernelBackend, SequenceKv};
use crate::cache::KvRun;

/// Root-mean-square normalisation of the rows of `x` (`[rows, width]`), scaled by `weight`.
pub(crate) fn rms_norm<B: KernelBackend>(x: Tensor<B, 2>, weight: &Tensor<B, 2>, eps: f32) -> Tensor<B, 2> {
    let inv_rms = x.clone().square().mean_dim(1).add_scalar(eps).sqrt().recip();
    x * inv_rms * weight.clone()
}

/// Rotates `x` (`[rows, heads, head_dim]`) by the half-split rotary embedding with the
/// per-row `cos`/`sin` (`[rows, 1, head_dim]`), then multiplies by `scale`.
pub(crate) fn rope<B: KernelBackend>(
    x: Tensor<B, 3>,
    cos: &Tensor<B, 3>,
    sin: &Tensor<B, 3>,
    scale: f32,
) -> Tensor<B, 3> {
    let [rows, heads, dim] = x.dims();
    let half = dim / 2;
    let x1 = x.clone().slice([0..rows, 0..heads, 0..half]);
    let x2 = x.clone().slice([0..rows, 0..heads, half..dim]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    let out = x * cos.clone() + rotated * sin.clone();
    if scale == 1.0 {
        out
    } else {
        out.mul_scalar(scale)
    }
}

/// `silu(gate) · up`.
pub(crate) fn swiglu<B: KernelBackend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    silu(gate) * up
}

/// A batched matrix product `[b, m, k] · [b, k, n]`: burn's `matmul` on the plain path,
/// [`KernelBackend::batched_matmul`] on the kernel paths.
pub(crate) type Matmul3<B> = fn(Tensor<B, 3>, Tensor<B, 3>) -> Tensor<B, 3>;

/// Causal grouped-query attention of `q` (`[n, heads, head_dim]`, rotated and scaled) against
/// `runs` (whose lengths add up to `past + n`); returns `[n, heads * head_dim]`.
pub(crate) fn attention<B: KernelBackend>(
    q: Tensor<B, 3>,
    runs: &[KvRun<B>],
    past: usize,
    shape: AttentionShape,
    matmul: Matmul3<B>,
) -> Tensor<B, 2> {
    let AttentionShape { heads, kv_heads, head_dim: dim } = shape;
    let group = heads / kv_heads;
    let n = q.dims()[0];
    let device = q.device();
    // [n, heads, dim] -> [kv_heads, group * n, dim], row r = g * n + j.
    let q = if n == 1 {
        q.reshape([kv_heads, group, dim])
    } else {
        q.reshape([n, kv_heads, group, dim]).permute([1, 2, 0, 3]).reshape([kv_heads, group * n, dim])
    };
    // The runs are joined into one run of keys and values, so the products below have the
    // shapes (and the summation order) of an unforked sequence: a forked state then gives
    // bit-for-bit the logits of the same sequence run alone.
    let (keys_all, values_all) = match runs {
        [only] => {
            let kv = only.used();
            (kv.k, kv.v)
        }
        _ => {
            let (ks, vs): (Vec<_>, Vec<_>) = runs.iter().map(|r| r.used()).map(|kv| (kv.k, kv.v)).unzip();
            (Tensor::cat(ks, 1), Tensor::cat(vs, 1))
        }
    };
    let mut scores = matmul(q, keys_all.swap_dims(1, 2));
    let keys = past + n;
    if n > 1 {
        // Causal mask over the new positions: row j sees keys 0..=past + j.
        let mut mask = vec![0.0f32; n * keys];
        for j in 0..n {
            for key in past + j + 1..keys {
                mask[j * keys + key] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, 1, n, keys]), &device);
        scores = (scores.reshape([kv_heads, group, n, keys]) + mask).reshape([kv_heads, group * n, keys]);
    }
    let out = matmul(B::attention_softmax(scores), values_all);
    // [kv_heads, group * n, dim] -> [n, heads * dim]
    if n == 1 {
        out.reshape([1, heads * dim])
    } else {
        out.reshape([kv_heads, group, n, dim]).permute([2, 0, 1, 3]).reshape([n, heads * dim])
    }
}

/// Softmax over the last dimension of `[b, m, n]` scores, each row's sum computed by `matmul`
/// against a column of ones. With a matmul that adds the products of one output one position
/// after another (CUDA's exact f32 kernel does), a row's sum does not depend on `n`: masked
/// positions (`-inf`, weight exactly 0) at its end change none of its bits, so a decode row
/// padded to the longest sequence of a batch normalizes as the same row alone. (burn-cubecl's
/// own row sum, in burn's `softmax`, vectorizes by `n mod 4`, which rounds a padded row
/// differently.)
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only CUDA overrides the hook with it.
pub(crate) fn softmax_with_matmul_sums<B: KernelBackend>(scores: Tensor<B, 3>, matmul: Matmul3<B>) -> Tensor<B, 3> {
    let [batch, _, n] = scores.dims();
    let row_max = scores.clone().max_dim(2);
    let weights = (scores - row_max).exp();
    let ones = Tensor::<B, 3>::ones([batch, n, 1], &weights.device());
    let total = matmul(weights.clone(), ones);
    weights / total
}

/// [`attention`] for every sequence of a batch (`q`: `[rows, heads, head_dim]`), sequence by
/// sequence; returns `[rows, heads * head_dim]`.
pub(crate) fn attention_batch<B: KernelBackend>(
    q: Tensor<B, 3>,
    seqs: &[SequenceKv<B>],
    shape: AttentionShape,
    matmul: Matmul3<B>,
) -> Tensor<B, 2> {
    let [rows, heads, dim] = q.dims();
    let mut outputs: Vec<Tensor<B, 2>> = seqs
        .iter()
        .map(|seq| {
            let q_seq =
                if seq.rows.len() == rows { q.clone() } else { q.clone().slice([seq.rows.clone(), 0..heads, 0..dim]) };
            attention(q_seq, &seq.runs, seq.past, shape, matmul)
        })
        .collect();
    if outputs.len() == 1 {
        outputs.remove(0)
    } else {
        Tensor::cat(outputs, 0)
    }
}

/// [`attention_batch`] for a decode step (each sequence one new row, `q` row `i` being sequence
/// `i`'s) as one set of products for the whole batch: every sequence's keys and values are
/// gathered into `[sequences · kv_heads, longest, head_dim]`, zero-padded, and the padded
/// positions masked out of the softmax (their weights are exactly 0). On a backend where each
/// op is a kernel launch (CUDA without fusion) this replaces a dozen launches per sequence by a
/// few; the masked padding changes nothing but the products' summation order. `None` where a
/// sequence has other than one new row, or the batch has a single sequence. The default of
/// [`KernelBackend::attention`].
pub(crate) fn attention_decode_padded<B: KernelBackend>(
    q: Tensor<B, 3>,
    seqs: &[SequenceKv<B>],
    shape: AttentionShape,
    matmul: Matmul3<B>,
) -> Option<Tensor<B, 2>> {
    let AttentionShape { heads, kv_heads, head_dim: dim } = shape;
    let sequences = seqs.len();
    if sequences < 2 || q.dims()[0] != sequences || seqs.iter().enumerate().any(|(i, seq)| seq.rows != (i..i + 1)) {
        return None;
    }
    let lens: Vec<usize> = seqs.iter().map(|seq| seq.past + 1).collect();
    let longest = lens.iter().copied().max()?;
    let device = q.device();
    // One zero buffer, sliced for each sequence's padding.
    let padding =
        (lens.iter().any(|&len| len < longest)).then(|| Tensor::<B, 3>::zeros([kv_heads, longest, dim], &device));
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for (seq, &len) in seqs.iter().zip(&lens) {
        for run in &seq.runs {
            let kv = run.used();
            ks.push(kv.k);
            vs.push(kv.v);
        }
        if let Some(zeros) = padding.as_ref().filter(|_| len < longest) {
            let pad = zeros.clone().slice([0..kv_heads, 0..longest - len, 0..dim]);
            ks.push(pad.clone());
            vs.push(pad);
        }
    }
    // [kv_heads, sequences · longest, dim] -> [sequences · kv_heads, longest, dim]
    let gather = |parts: Vec<Tensor<B, 3>>| {
        Tensor::cat(parts, 1).reshape([kv_heads, sequences, longest, dim]).swap_dims(0, 1).reshape([
            sequences * kv_heads,
            longest,
            dim,
        ])
    };
    let (keys, values) = (gather(ks), gather(vs));
    // [sequences, heads, dim] -> [sequences · kv_heads, group, dim]: query head h reads kv head
    // h / group.
    let q = q.reshape([sequences * kv_heads, heads / kv_heads, dim]);
    let mut scores = matmul(q, keys.swap_dims(1, 2));
    if padding.is_some() {
        let mut mask = vec![0.0f32; sequences * longest];
        for (i, &len) in lens.iter().enumerate() {
            mask[i * longest + len..(i + 1) * longest].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::<B, 3>::from_data(TensorData::new(mask, [sequences, 1, longest]), &device);
        scores = (scores.reshape([sequences, heads, longest]) + mask).reshape([
            sequences * kv_heads,
            heads / kv_heads,
            longest,
        ]);
    }
    Some(matmul(B::attention_softmax(scores), values).reshape([sequences, heads * dim]))
}

/// Writes rows `rows` of `new` (`[total, kv_heads, head_dim]`) into `buffer` (`[kv_heads,
/// capacity, head_dim]`) at positions `at..at + rows.len()`.
pub(crate) fn write_kv<B: KernelBackend>(
    buffer: Tensor<B, 3>,
    at: usize,
    new: &Tensor<B, 3>,
    rows: std::ops::Range<usize>,
) -> Tensor<B, 3> {
    let [total, kv_heads, dim] = new.dims();
    let n = rows.len();
    let part = if n == total { new.clone() } else { new.clone().slice([rows, 0..kv_heads, 0..dim]) };
    buffer.slice_assign([0..kv_heads, at..at + n, 0..dim], part.swap_dims(0, 1))
}

#[cfg(all(test, feature = "cpu"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use burn::tensor::{Distribution, Tensor};
    use burn_ndarray::NdArray;

    use super::*;

    type B = NdArray;

    fn random(dims: [usize; 3]) -> Tensor<B, 3> {
        Tensor::random(dims, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// The padded decode path against the per-sequence one, on sequences of different lengths
    /// made of one to three runs (shared prefixes and tails), with burn's plain ops.
    #[test]
    fn padded_decode_attention_equals_per_sequence_attention() {
        let shape = AttentionShape { heads: 6, kv_heads: 2, head_dim: 16 };
        let run = |len: usize, capacity: usize| KvRun {
            k: random([shape.kv_heads, capacity, shape.head_dim]),
            v: random([shape.kv_heads, capacity, shape.head_dim]),
            len,
        };
        let shared = run(5, 5);
        let seqs: Vec<SequenceKv<B>> = [
            vec![run(1, 4)],
            vec![shared.clone(), run(3, 8)],
            vec![shared.clone(), run(2, 2), run(9, 12)],
            vec![shared, run(1, 1)],
        ]
        .into_iter()
        .enumerate()
        .map(|(i, runs)| {
            let past = runs.iter().map(|r| r.len).sum::<usize>() - 1;
            SequenceKv { rows: i..i + 1, runs, past }
        })
        .collect();
        let q = random([seqs.len(), shape.heads, shape.head_dim]);
        let per_sequence: Vec<f32> =
            attention_batch(q.clone(), &seqs, shape, Tensor::matmul).into_data().to_vec().unwrap();
        let padded: Vec<f32> =
            attention_decode_padded(q.clone(), &seqs, shape, Tensor::matmul).unwrap().into_data().to_vec().unwrap();
        assert_eq!(per_sequence.len(), seqs.len() * shape.heads * shape.head_dim);
        assert_eq!(padded.len(), per_sequence.len());
        let worst = per_sequence.iter().zip(&padded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "padded decode attention differs by {worst}");
        // Prefill rows and single sequences take the per-sequence path.
        assert!(
            attention_decode_padded(q.clone().slice([0..1, 0..6, 0..16]), &seqs[..1], shape, Tensor::matmul).is_none()
        );
        let two_rows = [SequenceKv { rows: 0..2, ..seqs[2].clone() }, SequenceKv { rows: 2..3, ..seqs[3].clone() }];
        assert!(attention_decode_padded(q.slice([0..3, 0..6, 0..16]), &two_rows, shape, Tensor::matmul).is_none());
    }

    /// The matmul-summed softmax is a softmax: against burn's, rows summing to 1, and `-inf`
    /// padding weighs 0 and leaves the rest close (bit-equality needs a matmul that sums in
    /// order, which the CUDA tests check end to end).
    #[test]
    fn softmax_with_matmul_sums_is_a_softmax() {
        let (rows, keys, padded_keys) = (6, 37, 44);
        let scores = random([2, rows, keys]);
        let ours: Vec<f32> = softmax_with_matmul_sums(scores.clone(), Tensor::matmul).into_data().to_vec().unwrap();
        let burns: Vec<f32> = burn::tensor::activation::softmax(scores.clone(), 2).into_data().to_vec().unwrap();
        let worst = ours.iter().zip(&burns).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "matmul-summed softmax differs from burn's by {worst}");
        for row in ours.chunks(keys) {
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "a row sums to {total}");
        }
        let padding = Tensor::<B, 3>::full([2, rows, padded_keys - keys], f32::NEG_INFINITY, &Default::default());
        let padded: Vec<f32> = softmax_with_matmul_sums(Tensor::cat(vec![scores, padding], 2), Tensor::matmul)
            .into_data()
            .to_vec()
            .unwrap();
        for (row, padded_row) in ours.chunks(keys).zip(padded.chunks(padded_keys)) {
            let worst = row.iter().zip(padded_row).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-6, "padding moved a row by {worst}");
            assert!(padded_row[keys..].iter().all(|&w| w == 0.0));
        }
    }
}
