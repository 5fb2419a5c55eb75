//! PyramidKVPress (arXiv 2406.02069): SnapKV scores with per-layer budgets that shrink linearly
//! from the first layer to the last, for the same total as a uniform budget. The budget formula
//! is kvpress's (after KVCache-Factory), which always applies the ratio.

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::Result;
use crate::observation::Observation;
use crate::scorer::Scorer;
use crate::scorers::SnapKv;
use crate::select::Selector;

#[derive(Debug, Clone)]
pub struct PyramidKv {
    pub snapkv: SnapKv,
    pub beta: usize,
}

impl PyramidKv {
    /// Entries layer `layer` of `num_layers` keeps out of `n`.
    pub fn layer_budget(&self, layer: usize, num_layers: usize, n: usize, ratio: f64) -> usize {
        let window = self.snapkv.window as f64;
        let q_len = n as f64;
        let max_capacity = window + q_len * (1.0 - ratio);
        let mut min_num = (max_capacity - window) / self.beta as f64;
        let mut max_num = (max_capacity - window) * 2.0 - min_num;
        if max_num >= q_len - window {
            max_num = q_len - window;
            min_num = (max_capacity - window) * 2.0 - max_num;
        }
        if !(q_len >= max_num && max_num >= min_num && min_num >= window) {
            return (q_len * (1.0 - ratio)).round() as usize;
        }
        let steps = (max_num - min_num) / (num_layers.max(2) - 1) as f64;
        (max_num - layer as f64 * steps).round() as usize
    }
}

impl Selector for PyramidKv {
    fn scorer(&self) -> &dyn Scorer {
        &self.snapkv
    }

    fn select(&self, obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        Ok(scores
            .iter()
            .map(|s| {
                let kept = self.layer_budget(obs.layer, obs.num_layers, s.len(), budget.ratio_of(s.len()));
                top_k(s, kept.min(s.len()))
            })
            .collect())
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(self.clone())
    }
}
