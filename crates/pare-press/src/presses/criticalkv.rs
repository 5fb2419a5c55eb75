//! CriticalKVPress (arXiv 2502.03805) around any scorer: an entry matters by its attention score
//! and by what its value adds to the layer's output. Each KV head first keeps its best
//! `first_stage_ratio` of the budget by the scorer alone; the rest of the budget goes to the best
//! entries by (score + ε) × ‖v·W_o‖₁, the L1 norm of the value through the output projection of
//! each query head of the group, averaged over the group. `critical+adakv+X` is kvpress's
//! CriticalAdaKVPress: the same two stages inside AdaKV's per-head budgets.

use candle_core::{DType, Tensor};

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::Result;
use crate::observation::{to_vec, Observation};
use crate::presses::AdaKv;
use crate::scorer::Scorer;
use crate::select::Selector;

#[derive(Debug)]
pub struct CriticalKv {
    pub scorer: Box<dyn Scorer>,
    pub first_stage_ratio: f64,
    pub epsilon: f32,
}

/// Per KV head, ‖v_j·W_o,q‖₁ averaged over its query heads q, per entry j. The output
/// projection is read (dequantized, for a quantized model) once for all heads.
fn projected_value_norms(obs: &Observation) -> Result<Vec<Vec<f32>>> {
    let d = obs.head_dim;
    // (hidden, heads·head_dim): the columns of query head q are q·d..(q+1)·d.
    let w = obs.output.dense_weight(DType::F32)?;
    obs.values()?
        .iter()
        .enumerate()
        .map(|(head, values)| {
            let w = w.to_device(values.device())?;
            let mut sum = Tensor::zeros(values.dim(0)?, DType::F32, values.device())?;
            for q in head * obs.group..(head + 1) * obs.group {
                sum = (sum + values.matmul(&w.narrow(1, q * d, d)?.t()?)?.abs()?.sum(1)?)?;
            }
            to_vec(&(sum / obs.group as f64)?)
        })
        .collect()
}

impl Selector for CriticalKv {
    fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    fn select(&self, obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        let norms = projected_value_norms(obs)?;
        scores
            .iter()
            .zip(&norms)
            .map(|(s, norms)| {
                let kept = budget.kept(s.len());
                // kvpress's int((1 − ratio)·n·first_stage_ratio), at least one entry.
                let first = if self.first_stage_ratio > 0.0 && kept > 0 {
                    ((kept as f64 * self.first_stage_ratio) as usize).max(1)
                } else {
                    0
                };
                let mut weighted: Vec<f32> = s.iter().zip(norms).map(|(x, n)| (x + self.epsilon) * n).collect();
                for i in top_k(s, first) {
                    weighted[i] = f32::MAX;
                }
                Ok(top_k(&weighted, kept))
            })
            .collect()
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(CriticalKv {
            scorer: self.scorer.box_clone(),
            first_stage_ratio: self.first_stage_ratio,
            epsilon: self.epsilon,
        })
    }
}

/// CriticalAdaKVPress: AdaKV's per-head budgets (spent on the best entries across heads, each
/// head guaranteed `alpha_safeguard` of its share), then CriticalKV's two stages inside each
/// head's budget: the safeguarded entries and the best `first_stage_ratio` of the budget by the
/// scorer, the rest by (score + ε) × ‖v·W_o‖₁.
#[derive(Debug)]
pub struct CriticalAdaKv {
    pub critical: CriticalKv,
    pub alpha_safeguard: f64,
}

impl Selector for CriticalAdaKv {
    fn scorer(&self) -> &dyn Scorer {
        self.critical.scorer.as_ref()
    }

    fn select(&self, obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        let ada = AdaKv { scorer: self.critical.scorer.box_clone(), alpha_safeguard: self.alpha_safeguard };
        let head_budgets: Vec<usize> = ada.select(obs, scores, budget)?.iter().map(Vec::len).collect();
        let norms = projected_value_norms(obs)?;
        scores
            .iter()
            .zip(head_budgets)
            .zip(&norms)
            .map(|((s, head_budget), norms)| {
                let safe = top_k(s, (budget.kept(s.len()) as f64 * self.alpha_safeguard) as usize);
                let mut guarded = s.clone();
                safe.iter().for_each(|&i| guarded[i] = f32::MAX);
                let first = (head_budget as f64 * self.critical.first_stage_ratio) as usize;
                let mut weighted: Vec<f32> =
                    s.iter().zip(norms).map(|(x, n)| (x + self.critical.epsilon) * n).collect();
                for i in safe.into_iter().chain(top_k(&guarded, first)) {
                    weighted[i] = f32::MAX;
                }
                Ok(top_k(&weighted, head_budget))
            })
            .collect()
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(CriticalAdaKv {
            critical: CriticalKv {
                scorer: self.critical.scorer.box_clone(),
                first_stage_ratio: self.critical.first_stage_ratio,
                epsilon: self.critical.epsilon,
            },
            alpha_safeguard: self.alpha_safeguard,
        })
    }
}
