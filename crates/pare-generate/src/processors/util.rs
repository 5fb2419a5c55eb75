//! Numeric helpers shared by the processors: softmax and orderings that mirror what torch does on
//! one row of float32 scores.

use std::cmp::Ordering;

/// `torch.softmax(scores, -1)` in float32: `exp(s - max) / sum`, the sum accumulated in f64.
/// `-inf` scores get probability 0. A row with no finite score gets all zeros (torch gives NaN).
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY || max.is_nan() {
        return vec![0.0; scores.len()];
    }
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f64 = exps.iter().map(|&e| e as f64).sum();
    exps.iter().map(|&e| (e as f64 / sum) as f32).collect()
}

/// `torch.log_softmax(scores, -1)` in float32: `s - max - log(sum(exp(s - max)))`.
pub fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY || max.is_nan() {
        return vec![f32::NEG_INFINITY; scores.len()];
    }
    let sum: f64 = scores.iter().map(|&s| (s - max).exp() as f64).sum();
    let log_sum = sum.ln() as f32;
    scores.iter().map(|&s| s - max - log_sum).collect()
}

/// Descending order for scores, NaN last; ties keep index order.
pub fn desc(a: f32, b: f32) -> Ordering {
    b.partial_cmp(&a).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

/// Ascending order for scores, NaN last; ties keep index order.
pub fn asc(a: f32, b: f32) -> Ordering {
    a.partial_cmp(&b).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

/// Indices of `values` sorted by `cmp` (a stable sort: ties stay in index order).
pub fn argsort(values: &[f32], cmp: fn(f32, f32) -> Ordering) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&i, &j| cmp(values[i], values[j]));
    idx
}

/// The indices of the `k` largest values, largest first (ties: lower index first) — the first `k`
/// of `argsort(values, desc)`, without sorting the whole row.
pub fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |&i: &usize, &j: &usize| desc(values[i], values[j]).then(i.cmp(&j));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// The `k`-th largest score (`torch.topk(scores, k).values[-1]`); `k` is clamped to `1..=len`.
pub fn kth_largest(scores: &[f32], k: usize) -> f32 {
    let k = k.clamp(1, scores.len());
    let mut sorted: Vec<f32> = scores.iter().copied().filter(|s| !s.is_nan()).collect();
    if sorted.is_empty() {
        return f32::NAN;
    }
    let k = k.min(sorted.len());
    sorted.select_nth_unstable_by(k - 1, |a, b| desc(*a, *b));
    sorted[k - 1]
}
