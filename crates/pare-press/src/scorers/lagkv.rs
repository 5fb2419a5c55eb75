//! LagKVPress (arXiv 2504.04704): the entries after the sinks are cut into partitions of
//! `lag` entries, and each partition is judged against the next one (its "lag" reference): every
//! key and value channel is min-max normalized by the reference's range, and an entry whose
//! normalized channels spread widely (their standard deviation, softmaxed over the partition)
//! carries information the reference does not. Keys and values count equally; within a partition
//! the entries are ranked, rank/lag being the score. The sinks and the last partition with the
//! remainder have no reference and are always kept (score 1). Query-agnostic.

use crate::error::Result;
use crate::observation::{per_head_on_host, Observation};
use crate::scorer::Scorer;

#[derive(Debug, Clone)]
pub struct LagKv {
    pub sinks: usize,
    pub lag: usize,
}

impl Default for LagKv {
    fn default() -> Self {
        LagKv { sinks: 4, lag: 128 }
    }
}

impl LagKv {
    /// Scores of one KV head's entries, `keys` and `values` row-major (entries × d).
    fn head_scores(&self, keys: &[f32], values: &[f32], d: usize) -> Vec<f32> {
        let (n, sinks, lag) = (keys.len() / d, self.sinks, self.lag);
        if n < sinks + 2 * lag {
            // Too short for a reference partition: the sinks, then older entries first out.
            return (0..n).map(|i| if i < sinks { 1.0 } else { (i - sinks) as f32 / (n - sinks) as f32 }).collect();
        }
        let partitions = (n - sinks) / lag;
        let mut scores = vec![1.0f32; n];
        // Every partition but the last has the next one as its reference.
        for p in 0..partitions - 1 {
            let start = sinks + p * lag;
            let spread_k = spread(&keys[start * d..(start + 2 * lag) * d], lag, d);
            let spread_v = spread(&values[start * d..(start + 2 * lag) * d], lag, d);
            let combined: Vec<f32> = spread_k.iter().zip(&spread_v).map(|(k, v)| (k + v) / 2.0).collect();
            let mut order: Vec<usize> = (0..lag).collect();
            order.sort_by(|&a, &b| combined[a].total_cmp(&combined[b]));
            for (rank, &i) in order.iter().enumerate() {
                scores[start + i] = rank as f32 / lag as f32;
            }
        }
        scores
    }
}

/// For `rows` = a partition of `lag` entries followed by its reference partition (2·lag × d):
/// softmax over the partition of each entry's channel standard deviation (unbiased, as torch's
/// `std`) after min-max normalization by the reference's per-channel range.
fn spread(rows: &[f32], lag: usize, d: usize) -> Vec<f32> {
    let (part, reference) = rows.split_at(lag * d);
    let mut lo = vec![f32::INFINITY; d];
    let mut hi = vec![f32::NEG_INFINITY; d];
    for row in reference.chunks(d) {
        for (c, &x) in row.iter().enumerate() {
            lo[c] = lo[c].min(x);
            hi[c] = hi[c].max(x);
        }
    }
    let stds: Vec<f32> = part
        .chunks(d)
        .map(|row| {
            let norm: Vec<f32> = row.iter().enumerate().map(|(c, &x)| (x - lo[c]) / (hi[c] - lo[c])).collect();
            let mean = norm.iter().sum::<f32>() / d as f32;
            (norm.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / (d - 1).max(1) as f32).sqrt()
        })
        .collect();
    let max = stds.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = stds.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

impl Scorer for LagKv {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        per_head_on_host(obs, |k, v, d| self.head_scores(k, v, d))
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_too_short_for_a_reference_keeps_sinks_then_the_newest() {
        let lag = LagKv { sinks: 2, lag: 4 };
        let s = lag.head_scores(&[0.0; 9 * 2], &[0.0; 9 * 2], 2);
        assert_eq!(s[..2], [1.0, 1.0]);
        assert!(s[2..].windows(2).all(|w| w[0] < w[1]), "{s:?}");
    }

    #[test]
    fn the_last_partition_and_the_remainder_are_always_kept() {
        let lag = LagKv { sinks: 1, lag: 2 };
        let d = 2;
        let n = 1 + 3 * 2 + 1;
        let keys: Vec<f32> = (0..n * d).map(|i| ((i * 7) % 5) as f32).collect();
        let s = lag.head_scores(&keys, &keys, d);
        // Partitions [1,3), [3,5) are ranked (rank/lag in {0, 0.5}); [5,7) and the remainder are not.
        assert_eq!(s[0], 1.0);
        assert!(s[1..5].iter().all(|&x| x == 0.0 || x == 0.5), "{s:?}");
        assert!(s[5..].iter().all(|&x| x == 1.0), "{s:?}");
    }
}
