//! Top-k of a logits row without sorting the whole row.
//!
//! For the small k of sampling and search (≤ 64) one pass keeps the k best seen so far in a
//! sorted buffer: after the first few hundred entries almost every value fails the single
//! comparison with the current k-th best, so the cost is about one compare per logit. Larger
//! k use `select_nth_unstable_by` (O(n) partition) and sort only the k winners.
//!
//! Order: value descending (IEEE comparison, so `-0.0 == 0.0`), ties by lower index, NaNs
//! after every number (in index order).

use std::cmp::Ordering;

/// Largest k served by the single-pass buffer.
const BUFFER_MAX_K: usize = 64;

/// Values per chunk of the single pass.
const CHUNK: usize = 32;

/// The `k` largest entries of `values` as `(index, value)`, sorted by value descending (ties:
/// lower index first). NaNs rank below every number. `k` larger than the row returns the
/// whole row, sorted.
pub fn top_k(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k <= BUFFER_MAX_K {
        return top_k_buffered(values, k);
    }
    let rank = |&a: &u32, &b: &u32| {
        let (va, vb) = (values[a as usize], values[b as usize]);
        match (va.is_nan(), vb.is_nan()) {
            (false, false) => vb.partial_cmp(&va).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
            (true, true) => a.cmp(&b),
            (nan_a, _) => nan_a.cmp(&!nan_a),
        }
    };
    let mut indices: Vec<u32> = (0..values.len() as u32).collect();
    if k < indices.len() {
        indices.select_nth_unstable_by(k - 1, rank);
        indices.truncate(k);
    }
    indices.sort_unstable_by(rank);
    indices.into_iter().map(|i| (i as usize, values[i as usize])).collect()
}

fn top_k_buffered(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    for (c, chunk) in values.chunks(CHUNK).enumerate() {
        // Once the buffer is full, a whole chunk below the k-th best (NaN compares false) is
        // skipped with one branch: the comparisons vectorize.
        if best.len() == k {
            let threshold = best[k - 1].1;
            if !chunk.iter().fold(false, |any, &v| any | (v > threshold)) {
                continue;
            }
        }
        for (j, &v) in chunk.iter().enumerate() {
            // Indices only grow, so an equal value never displaces an earlier one.
            if v.is_nan() || (best.len() == k && v <= best[k - 1].1) {
                continue;
            }
            let position = best.partition_point(|&(_, b)| b >= v);
            best.insert(position, (c * CHUNK + j, v));
            best.truncate(k);
        }
    }
    if best.len() < k {
        let missing = k - best.len();
        best.extend(values.iter().enumerate().filter(|(_, v)| v.is_nan()).take(missing).map(|(i, &v)| (i, v)));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full_sort(values: &[f32], k: usize) -> Vec<(usize, f32)> {
        let mut all: Vec<(usize, f32)> = values.iter().copied().enumerate().collect();
        all.sort_by(|a, b| match (a.1.is_nan(), b.1.is_nan()) {
            (false, false) => b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)),
            (true, true) => a.0.cmp(&b.0),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
        });
        all.truncate(k);
        all
    }

    #[test]
    fn nan_ranks_last_and_ties_by_index() {
        let v = [1.0, f32::NAN, 3.0, 3.0, -0.5];
        let top = top_k(&v, 4);
        assert_eq!(top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 3, 0, 4]);
        assert_eq!(top_k(&v, 0), vec![]);
        assert_eq!(top_k(&v, 10).len(), 5);
    }

    proptest! {
        #[test]
        fn matches_full_sort(values in proptest::collection::vec(-5i32..6, 1..700), k in 0usize..100) {
            // Small integer values make many ties; 5 stands for NaN.
            let values: Vec<f32> = values.into_iter().map(|v| if v == 5 { f32::NAN } else { v as f32 * 0.5 }).collect();
            let got = top_k(&values, k);
            let want = full_sort(&values, k);
            // Compare bit patterns so that NaN entries compare equal.
            let bits = |v: Vec<(usize, f32)>| v.into_iter().map(|(i, x)| (i, x.to_bits())).collect::<Vec<_>>();
            prop_assert_eq!(bits(got), bits(want));
        }
    }
}
