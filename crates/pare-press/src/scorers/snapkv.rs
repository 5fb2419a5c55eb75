//! SnapKVPress (arXiv 2404.14469): the attention that the last `window` queries pay to each
//! older entry, averaged over those queries, smoothed by average pooling, averaged over the
//! query heads of each KV head. The window's own entries are always kept.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::observation::{causal_mask, index_tensor, per_head, softmax_last_dim, to_vec, Observation};
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
        // On a GPU, one read-back instead of a host-built mask and index list per layer; the CPU
        // keeps the arithmetic below (its results stay as they were).
        // Not on a split model: the device path protects entries by the rank's own maximum.
        if !obs.device().is_cpu() && obs.shard.is_none() {
            if let Some(scores) = self.score_tensor(obs)? {
                return per_head(&scores);
            }
        }
        let window = self.window.min(obs.observed());
        let window_start = obs.query_positions[obs.observed() - window];
        let in_window = |h: usize, i: usize| obs.positions[h][i] >= window_start;
        if obs.heads_share_entries() {
            if let Some(weights) = obs.stacked_attention(window)? {
                let mut scores = shared_entry_scores(&weights.mean(2)?, |i| in_window(0, i), self.kernel)?;
                protect(obs, &mut scores, in_window)?;
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
        protect(obs, &mut scores, in_window)?;
        Ok(scores)
    }

    fn score_tensor(&self, obs: &Observation) -> Result<Option<Tensor>> {
        let window = self.window.min(obs.observed());
        let queries = &obs.query_positions[obs.observed() - window..];
        let Some(entries) = obs.positions.first().filter(|_| obs.heads_share_entries()) else {
            return Ok(None);
        };
        // With positions ascending, the window's own entries are the last ones and every older
        // entry is visible to every window query: only the window's columns need a mask, a
        // window × window block instead of window × entries built on the host.
        let ascending = |p: &[i64]| p.windows(2).all(|w| w[0] <= w[1]);
        let Some(&window_start) = queries.first().filter(|_| ascending(entries) && ascending(queries)) else {
            return Ok(None);
        };
        let Some(keys) = obs.stacked_keys()? else {
            return Ok(None);
        };
        let (kv_heads, n, dev) = (obs.kv_heads(), entries.len(), obs.device());
        let older = entries.partition_point(|&p| p < window_start);
        if older == 0 {
            // Everything is in the window: all protected alike (protect's score 1).
            return Ok(Some(Tensor::ones((kv_heads, n), DType::F32, dev)?));
        }
        let q = obs.rotated_queries(window)?.contiguous()?.reshape((kv_heads, obs.group * window, obs.head_dim))?;
        let scores =
            (q.matmul(&keys.t()?)? / (obs.head_dim as f64).sqrt())?.reshape((kv_heads, obs.group, window, n))?;
        let block = Tensor::from_vec(causal_mask(queries, &entries[older..]), (window, n - older), dev)?;
        let mask = Tensor::cat(&[Tensor::zeros((window, older), DType::F32, dev)?, block], 1)?;
        let mean = softmax_last_dim(&scores.broadcast_add(&mask)?)?.mean(2)?; // (kv_heads, group, entries)
        let selected = mean.narrow(2, 0, older)?.contiguous()?.reshape((kv_heads * obs.group, older))?;
        let pooled = avg_pool(&selected, self.kernel)?.reshape((kv_heads, obs.group, older))?.mean(1)?;
        if older == n {
            return Ok(Some(pooled));
        }
        // protect(): the window's entries score above every older entry of the row.
        let top = (pooled.max_keepdim(1)?.max_keepdim(0)? + 1.0)?.broadcast_as((kv_heads, n - older))?;
        Ok(Some(Tensor::cat(&[&pooled, &top.contiguous()?], 1)?))
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
