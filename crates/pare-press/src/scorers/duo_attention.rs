//! DuoAttention's head scores, as kvpress computes them on the fly (`duo_attention_on_the_fly`):
//! per calibration sample and layer, the mean pre-RoPE query and key over the sample's tokens are
//! repeated `q_len` times and rotated at positions 0..q_len; the last query's attention over those
//! keys, accumulated along the keys and averaged ("area under the cumulated attention curve"),
//! scores each query head, and the mean over its group each KV head. Heads whose attention
//! concentrates on the recent end score low: they become streaming heads. Scores are averaged over
//! the samples.
//!
//! kvpress draws its 50 samples from BookSum with pandas' `sample(random_state=42)` (no torch
//! RNG is involved); pare draws windows of its own calibration text with a seeded RNG
//! ([`draw_samples`]), since nothing may be downloaded.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, D};
use pare_model::cache::LayerKv;
use pare_model::hooks::{CachePress, LayerContext};
use pare_model::{Hooks, Model, PrefillInput};
use rand::{Rng, SeedableRng};

use crate::error::{PressError, Result};

/// kvpress's `q_len`: the positions the mean query and key are rotated over.
pub const Q_LEN: usize = 500;

/// Per layer and KV head, the mean over `samples` of each sample's head score (f32, accumulated
/// as kvpress does: `scores[layer] += s / num_samples`).
pub fn score_heads(model: &Model, samples: &[Vec<u32>], q_len: usize) -> Result<Vec<Vec<f32>>> {
    if samples.is_empty() || samples.iter().any(Vec::is_empty) || q_len == 0 {
        return Err(PressError::config("duo-attention calibration needs at least one non-empty sample and q_len ≥ 1"));
    }
    let scores = Arc::new(Mutex::new(Vec::new()));
    for sample in samples {
        let recorder = HeadRecorder { scores: scores.clone(), num_samples: samples.len(), q_len };
        let mut hooks = Hooks::new(Some(Box::new(recorder)), None);
        model.prefill(PrefillInput::Tokens(std::slice::from_ref(sample)), &mut hooks)?;
    }
    let scores = scores.lock().map_err(|_| PressError::config("duo-attention calibration state poisoned"))?;
    Ok(scores.clone())
}

/// One layer's KV-head scores for one sample, from the layer's attention input and pre-RoPE
/// queries.
pub fn layer_head_scores(ctx: &LayerContext, q_len: usize) -> Result<Vec<f32>> {
    let att = ctx.attention;
    let (heads, kv_heads, d) = (att.num_heads(), att.num_kv_heads(), att.head_dim());
    let group = heads / kv_heads;
    // Mean over the sample's tokens (one row, no padding): (heads, d) and (kv_heads, d).
    let q = ctx.queries.get(0)?.to_dtype(DType::F32)?.mean(1)?;
    let k_proj = att.k().forward(ctx.hidden)?;
    let (_, seq, _) = k_proj.dims3()?;
    let k = k_proj.get(0)?.reshape((seq, kv_heads, d))?.to_dtype(DType::F32)?.mean(0)?;
    // The query at position q_len − 1, the keys at 0..q_len (kvpress rotates all q_len queries
    // and keeps the last).
    let last = [(q_len - 1) as i64];
    let (cos, sin) = ctx.rope.cos_sin(&last, 1, 1, DType::F32, q.device())?;
    let q = ctx.rope.apply(&q.reshape((1, heads, 1, d))?, &cos, &sin)?.reshape((heads, d))?;
    let positions: Vec<i64> = (0..q_len as i64).collect();
    let (cos, sin) = ctx.rope.cos_sin(&positions, 1, q_len, DType::F32, q.device())?;
    let k = k.reshape((1, kv_heads, 1, d))?.broadcast_as((1, kv_heads, q_len, d))?.contiguous()?;
    let k = ctx.rope.apply(&k, &cos, &sin)?.reshape((kv_heads, q_len, d))?;
    // (kv_heads, group, d) × (kv_heads, d, q_len) → (kv_heads, group, q_len).
    let logits = q.reshape((kv_heads, group, d))?.matmul(&k.transpose(1, 2)?.contiguous()?)?;
    let weights = softmax_last(&(logits / (d as f64).sqrt())?)?;
    let weights: Vec<Vec<Vec<f32>>> = weights.to_vec3()?;
    Ok(weights
        .iter()
        .map(|group_weights| {
            let per_head = group_weights.iter().map(|w| {
                let mut acc = 0f32;
                w.iter()
                    .map(|&x| {
                        acc += x;
                        acc
                    })
                    .sum::<f32>()
                    / q_len as f32
            });
            per_head.sum::<f32>() / group as f32
        })
        .collect())
}

/// Softmax over the last dimension, max-subtracted, in f32.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// A hook that scores every layer's heads from its prefill and adds them, divided by the number
/// of samples, to shared per-layer sums. It leaves the cache as it is.
#[derive(Debug, Clone)]
struct HeadRecorder {
    scores: Arc<Mutex<Vec<Vec<f32>>>>,
    num_samples: usize,
    q_len: usize,
}

impl CachePress for HeadRecorder {
    fn after_attention(&mut self, ctx: &LayerContext, _kv: &mut LayerKv) -> pare_model::Result<()> {
        let s = layer_head_scores(ctx, self.q_len)?;
        let mut scores =
            self.scores.lock().map_err(|_| pare_model::ModelError::Input("calibration state poisoned".into()))?;
        if scores.len() <= ctx.layer {
            scores.resize(ctx.num_layers, vec![0.0; s.len()]);
        }
        for (acc, v) in scores[ctx.layer].iter_mut().zip(s) {
            *acc += v / self.num_samples as f32;
        }
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}

/// `samples` windows of `len` tokens at uniformly drawn starts in `tokens` (seeded, so a pattern
/// is reproducible).
pub fn draw_samples(tokens: &[u32], samples: usize, len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if len == 0 || samples == 0 {
        return Err(PressError::config("duo-attention calibration needs at least one sample of at least one token"));
    }
    if tokens.len() < len {
        return Err(PressError::config(format!(
            "the calibration text holds {} tokens, fewer than one sample of {len}",
            tokens.len()
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok((0..samples)
        .map(|_| {
            let start = rng.random_range(0..=tokens.len() - len);
            tokens[start..start + len].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_windows_reproducible_from_the_seed() {
        let tokens: Vec<u32> = (0..100).collect();
        let a = draw_samples(&tokens, 5, 10, 7).unwrap();
        assert_eq!(a, draw_samples(&tokens, 5, 10, 7).unwrap());
        assert_ne!(a, draw_samples(&tokens, 5, 10, 8).unwrap());
        for w in &a {
            assert_eq!(w.len(), 10);
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1));
        }
        assert_eq!(draw_samples(&tokens, 2, 100, 0).unwrap(), vec![tokens.clone(), tokens.clone()]);
        assert!(draw_samples(&tokens, 1, 101, 0).is_err());
    }
}
