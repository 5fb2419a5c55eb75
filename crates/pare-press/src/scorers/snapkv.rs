//! SnapKVPress (arXiv 2404.14469): the attention that the last `window` queries pay to each
//! older entry, averaged over those queries, smoothed by average pooling, averaged over the
//! query heads of each KV head. The window's own entries are always kept.

use candle_core::Tensor;

use crate::error::Result;
use crate::observation::{index_tensor, per_head, to_vec, Observation};
use crate::scorer::{protect, Scorer};

#[derive(Debug, Clone)]
pub struct SnapKv {
    pub window: usize,
    pub kernel: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        SnapKv { window: 64, kernel: 5 }
    }
}

impl Scorer for SnapKv {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        let window = self.window.min(obs.observed());
        let window_start = obs.query_positions[obs.observed() - window];
        let in_window = |h: usize, i: usize| obs.positions[h][i] >= window_start;
        if obs.heads_share_entries() {
            if let Some(weights) = obs.stacked_attention(window)? {
                let mut scores = shared_entry_scores(&weights.mean(2)?, |i| in_window(0, i), self.kernel)?;
                protect(&mut scores, in_window);
                return Ok(scores);
            }
        }
        let mut scores = Vec::with_capacity(obs.kv_heads());
        for head in 0..obs.kv_heads() {
            let n = obs.positions[head].len();
            // Pooling runs over the older entries only, as kvpress slices the window off first.
            let older: Vec<usize> = (0..n).filter(|&i| !in_window(head, i)).collect();
            let mut s = vec![0f32; n];
            if !older.is_empty() {
                let mean = obs.attention(head, window)?.mean(1)?; // (group, entries)
                let idx = index_tensor(&older, mean.device())?;
                let pooled = to_vec(&avg_pool(&mean.index_select(&idx, 1)?, self.kernel)?.mean(0)?)?;
                for (&i, v) in older.iter().zip(pooled) {
                    s[i] = v;
                }
            }
            scores.push(s);
        }
        protect(&mut scores, in_window);
        Ok(scores)
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}

/// Scores of every KV head at once when the heads hold the same entries, from the window's mean
/// attention (kv_heads, group, entries): pooled over the older entries, averaged over the group.
fn shared_entry_scores(mean: &Tensor, in_window: impl Fn(usize) -> bool, kernel: usize) -> Result<Vec<Vec<f32>>> {
    let (kv_heads, group, n) = mean.dims3()?;
    let older: Vec<usize> = (0..n).filter(|&i| !in_window(i)).collect();
    let mut scores = vec![vec![0f32; n]; kv_heads];
    if older.is_empty() {
        return Ok(scores);
    }
    let idx = index_tensor(&older, mean.device())?;
    let selected = mean.index_select(&idx, 2)?.reshape((kv_heads * group, older.len()))?;
    let pooled = avg_pool(&selected, kernel)?.reshape((kv_heads, group, older.len()))?.mean(1)?;
    for (s, pooled) in scores.iter_mut().zip(per_head(&pooled)?) {
        for (&i, v) in older.iter().zip(pooled) {
            s[i] = v;
        }
    }
    Ok(scores)
}

/// avg_pool1d over the last dim with stride 1 and zero padding kernel/2, dividing by the kernel
/// size (PyTorch's count_include_pad default): (rows, n) → (rows, n).
pub(crate) fn avg_pool(x: &Tensor, kernel: usize) -> Result<Tensor> {
    let n = x.dim(1)?;
    let pad = kernel / 2;
    let padded = x.pad_with_zeros(1, pad, pad)?;
    let mut sum = padded.narrow(1, 0, n)?;
    for k in 1..kernel {
        sum = (sum + padded.narrow(1, k, n)?)?;
    }
    Ok((sum / kernel as f64)?)
}
