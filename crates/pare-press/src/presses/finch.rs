//! FinchPress (FINCH, TACL 2024): SnapKV's window attention, guided by the prompt's last
//! `window` tokens (the question, which kvpress finds after a delimiter token), with each query's
//! weights multiplied by the number of entries before it (so late queries, whose attention is
//! spread thinner, count as much as early ones), no pooling, and the window always kept. With
//! `chunk_length`, every chunk of entries keeps its own share of the budget.

use candle_core::Tensor;

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::{PressError, Result};
use crate::observation::{per_head, to_vec, Observation};
use crate::scorer::{protect, Scorer};
use crate::select::Selector;

#[derive(Debug, Clone)]
pub struct FinchScorer {
    pub window: usize,
}

impl Scorer for FinchScorer {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        let window = self.window.min(obs.observed());
        let window_start = obs.query_positions[obs.observed() - window];
        // kvpress multiplies query j of the window by k_len − window + j.
        let weighted_mean = |weights: &Tensor, n: usize| -> Result<Tensor> {
            let counts: Vec<f32> = (0..window).map(|j| (n - window.min(n) + j) as f32).collect();
            let counts = Tensor::from_vec(counts, (window, 1), weights.device())?;
            Ok(weights.broadcast_mul(&counts)?.mean(weights.rank() - 2)?)
        };
        let mut scores = match obs.stacked_attention(window)? {
            // (kv_heads, group, window, entries) → mean over the window, then the group.
            Some(weights) => per_head(&weighted_mean(&weights, weights.dim(3)?)?.mean(1)?)?,
            None => (0..obs.kv_heads())
                .map(|h| to_vec(&weighted_mean(&obs.attention(h, window)?, obs.positions[h].len())?.mean(0)?))
                .collect::<Result<_>>()?,
        };
        protect(obs, &mut scores, |h, i| obs.positions[h][i] >= window_start)?;
        Ok(scores)
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}

#[derive(Debug, Clone)]
pub struct Finch {
    pub scorer: FinchScorer,
    pub chunk_length: Option<usize>,
}

impl Selector for Finch {
    fn scorer(&self) -> &dyn Scorer {
        &self.scorer
    }

    fn select(&self, _obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        scores
            .iter()
            .map(|s| {
                let Some(chunk) = self.chunk_length else {
                    return Ok(top_k(s, budget.kept(s.len())));
                };
                let ratio = budget.ratio_of(s.len());
                // kvpress asserts this: every chunk keeps more than a window's worth.
                if chunk as f64 <= self.scorer.window as f64 / (1.0 - ratio) {
                    return Err(PressError::config(format!(
                        "finch: `chunk_length` must exceed `window` / (1 − ratio) = {:.0}",
                        self.scorer.window as f64 / (1.0 - ratio)
                    )));
                }
                Ok((0..s.len())
                    .step_by(chunk)
                    .flat_map(|start| {
                        let part = &s[start..(start + chunk).min(s.len())];
                        // kvpress's compute_n_kept: at least one entry per chunk.
                        let kept = ((part.len() as f64 * (1.0 - ratio)) as usize).max(1);
                        top_k(part, kept).into_iter().map(move |i| start + i)
                    })
                    .collect())
            })
            .collect()
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(self.clone())
    }
}
