//! ExpectedAttentionPress (kvpress): the attention that future queries are expected to pay to
//! each entry. Queries (before RoPE) are modelled as Gaussian from the observed ones; RoPE is
//! averaged over the next `n_future` positions; E[exp(q·k/√d)] ∝ exp(μ·k/√d + kᵀΣk/2d). Scores
//! are the softmax of that over the entries, averaged over the group's query heads, times ‖v‖.
//! The first `sinks` entries are always kept and left out of the statistics.

use candle_core::{DType, Tensor, D};

use crate::error::{PressError, Result};
use crate::observation::{per_head, to_vec, Observation};
use crate::scorer::{protect, Scorer};

#[derive(Debug, Clone)]
pub struct ExpectedAttention {
    pub n_future: usize,
    pub sinks: usize,
    pub use_covariance: bool,
    pub use_vnorm: bool,
    pub epsilon: f32,
}

impl Default for ExpectedAttention {
    fn default() -> Self {
        ExpectedAttention { n_future: 512, sinks: 4, use_covariance: true, use_vnorm: true, epsilon: 0.0 }
    }
}

impl ExpectedAttention {
    /// RoPE's rotation averaged over the positions [start, start + n_future): (head_dim, head_dim).
    fn mean_rotation(&self, obs: &Observation, start: i64) -> Result<Tensor> {
        let d = obs.head_dim;
        let inv_freq = obs.rope.inv_freq();
        let half = inv_freq.len();
        let mut r = vec![0f32; d * d];
        for i in 0..d {
            r[i * d + i] = 1.0; // channels past the rotary dims pass through
        }
        for (i, &f) in inv_freq.iter().enumerate() {
            let (mut c, mut s) = (0f64, 0f64);
            for p in start..start + self.n_future as i64 {
                let angle = (p as f32) * f;
                c += angle.cos() as f64;
                s += angle.sin() as f64;
            }
            let (c, s) = ((c / self.n_future as f64) as f32, (s / self.n_future as f64) as f32);
            let j = i + half;
            r[i * d + i] = c;
            r[j * d + j] = c;
            r[i * d + j] = -s;
            r[j * d + i] = s;
        }
        Ok(Tensor::from_vec(r, (d, d), obs.device())?)
    }

    /// The future queries' mean (heads, 1, d) and, with `use_covariance`, covariance (heads, d,
    /// d), both rotated by the mean RoPE of the next `n_future` positions.
    fn query_statistics(&self, obs: &Observation) -> Result<(Tensor, Option<Tensor>)> {
        let n_obs = obs.observed();
        let skip = self.sinks.min(n_obs.saturating_sub(1));
        let q = obs.queries()?.narrow(1, skip, n_obs - skip)?; // (heads, s, d)
        let mu = q.mean_keepdim(1)?; // (heads, 1, d)
        let rotation = self.mean_rotation(obs, obs.next_position())?;
        let mu = mu.broadcast_matmul(&rotation.t()?)?; // (heads, 1, d)
        let cov = if self.use_covariance {
            let centered = q.broadcast_sub(&q.mean_keepdim(1)?)?;
            let cov = (centered.t()?.matmul(&centered)? / (n_obs - skip) as f64)?; // (heads, d, d)
            Some(rotation.broadcast_matmul(&cov)?.broadcast_matmul(&rotation.t()?)?)
        } else {
            None
        };
        Ok((mu, cov))
    }
}

impl Scorer for ExpectedAttention {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        // On a GPU, all heads in one batch of operations and one read-back instead of one per
        // head; the CPU keeps the per-head arithmetic below (its results stay as they were).
        // Not on a split model: the device path protects entries by the rank's own maximum.
        if !obs.device().is_cpu() && obs.shard.is_none() {
            if let Some(scores) = self.score_tensor(obs)? {
                return per_head(&scores);
            }
        }
        let d = obs.head_dim;
        let (mu, cov) = self.query_statistics(obs)?;
        let mut scores = Vec::with_capacity(obs.kv_heads());
        for h in 0..obs.kv_heads() {
            let n = obs.positions[h].len();
            let sinks = self.sinks.min(n);
            let mut s = vec![0f32; n];
            if n > sinks {
                let keys = obs.keys()?[h].narrow(0, sinks, n - sinks)?; // (m, d)
                let heads = h * obs.group..(h + 1) * obs.group;
                let mu_h = mu.narrow(0, heads.start, obs.group)?.squeeze(1)?; // (group, d)
                let mut logits = (mu_h.matmul(&keys.t()?)? / (d as f64).sqrt())?; // (group, m)
                if let Some(cov) = &cov {
                    let cov_h = cov.narrow(0, heads.start, obs.group)?; // (group, d, d)
                    let kc = keys.unsqueeze(0)?.broadcast_matmul(&cov_h)?; // (group, m, d)
                    let quad = kc.broadcast_mul(&keys.unsqueeze(0)?)?.sum(D::Minus1)?;
                    logits = (logits + (quad / (2.0 * d as f64))?)?;
                }
                let probs = softmax(&logits)?.mean(0)?; // (m,)
                let probs = if self.use_vnorm {
                    let vnorm = obs.values()?[h].narrow(0, sinks, n - sinks)?.sqr()?.sum(1)?.sqrt()?;
                    ((probs + self.epsilon as f64)? * vnorm)?
                } else {
                    probs
                };
                s[sinks..].copy_from_slice(&to_vec(&probs)?);
            }
            scores.push(s);
        }
        protect(obs, &mut scores, |_, i| i < self.sinks)?;
        Ok(scores)
    }

    /// [`Scorer::score`] for every KV head in one batch of operations.
    fn score_tensor(&self, obs: &Observation) -> Result<Option<Tensor>> {
        let Some(n) = obs.positions.first().map(Vec::len).filter(|_| obs.heads_share_entries()) else {
            return Ok(None);
        };
        let Some(keys) = obs.stacked_keys()? else {
            return Ok(None);
        };
        let (kv_heads, group, d, sinks) = (obs.kv_heads(), obs.group, obs.head_dim, self.sinks.min(n));
        if n == sinks {
            // Every entry is a sink: all protected alike (protect's score 1).
            return Ok(Some(Tensor::ones((kv_heads, n), DType::F32, obs.device())?));
        }
        let (mu, cov) = self.query_statistics(obs)?;
        let keys = keys.narrow(1, sinks, n - sinks)?.unsqueeze(1)?; // (kv_heads, 1, m, d)
        let mu = mu.reshape((kv_heads, group, 1, d))?;
        let mut logits = (mu.broadcast_matmul(&keys.transpose(2, 3)?)?.squeeze(2)? / (d as f64).sqrt())?;
        if let Some(cov) = &cov {
            let kc = keys.broadcast_matmul(&cov.reshape((kv_heads, group, d, d))?)?; // (kv_heads, group, m, d)
            let quad = kc.broadcast_mul(&keys)?.sum(D::Minus1)?;
            logits = (logits + (quad / (2.0 * d as f64))?)?;
        }
        let mut probs = softmax(&logits)?.mean(1)?; // (kv_heads, m)
        if self.use_vnorm {
            let values = obs.stacked_values()?.ok_or_else(|| PressError::config("expected attention: no values"))?;
            let vnorm = values.narrow(1, sinks, n - sinks)?.sqr()?.sum(D::Minus1)?.sqrt()?;
            probs = ((probs + self.epsilon as f64)? * vnorm)?;
        }
        if sinks == 0 {
            return Ok(Some(probs));
        }
        // protect(): the sinks score above every other entry of the row.
        let top = (probs.max_keepdim(1)?.max_keepdim(0)? + 1.0)?.broadcast_as((kv_heads, sinks))?;
        Ok(Some(Tensor::cat(&[&top.contiguous()?, &probs], 1)?))
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}

fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
