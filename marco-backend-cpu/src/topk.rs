//! Top-k of a logits row without sorting the whole row.
//!
//! `select_nth_unstable_by` partitions the candidate indices in O(n) so that the k largest come
//! first; only those k are then sorted. For a 49 152-entry vocabulary and k ≤ 64 this is
//! several times cheaper than a full sort.

/// The `k` largest entries of `values` as `(index, value)`, sorted by value descending (ties:
/// lower index first). NaNs rank below every number. `k` larger than the row returns the
/// whole row, sorted.
pub fn top_k(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    // Descending by value; NaN last; ties broken by index so the result is deterministic.
    let rank = |&a: &u32, &b: &u32| {
        let (va, vb) = (values[a as usize], values[b as usize]);
        match (va.is_nan(), vb.is_nan()) {
            (false, false) => vb.total_cmp(&va).then(a.cmp(&b)),
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
        fn matches_full_sort(values in proptest::collection::vec(-5i32..5, 1..300), k in 0usize..40) {
            // Small integer values make many ties.
            let values: Vec<f32> = values.into_iter().map(|v| v as f32 * 0.5).collect();
            let got = top_k(&values, k);
            let want = full_sort(&values, k);
            prop_assert_eq!(got, want);
        }
    }
}
