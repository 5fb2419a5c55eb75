//! Taylor importance from calibration gradients, with LLM-Pruner's variants
//! (`TaylorImportance` in LLMPruner/pruner/hf_llama_pruner.py):
//!
//! - `param_first`: Σ |w·g| — first-order loss change of zeroing each weight;
//! - `vectorize`: |Σ w·g| — the first-order change of removing the whole channel at once;
//! - `param_second`: Σ w·F·w with F the diagonal Fisher, the mean of squared per-sample gradients;
//! - `param_mix`: Σ |w·g − ½ w·F·w|.
//!
//! g is the gradient of the mean loss over all samples (equal lengths, so the mean of the
//! per-sample gradients). Samples run one at a time and only accumulators are kept: the mean
//! gradient (first-order variants), the mean squared gradient (`param_mix`), or, for
//! `param_second`, which is linear in F, just its per-channel sums.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use pare_model::Model;
use serde::{Deserialize, Serialize};

use crate::error::{PruneError, Result};
use crate::groups::{Axis, Role};
use pare_model::diff::{DiffModel, Probe};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaylorVariant {
    ParamFirst,
    Vectorize,
    ParamSecond,
    ParamMix,
}

impl TaylorVariant {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "param_first" => Ok(TaylorVariant::ParamFirst),
            "vectorize" => Ok(TaylorVariant::Vectorize),
            "param_second" => Ok(TaylorVariant::ParamSecond),
            "param_mix" => Ok(TaylorVariant::ParamMix),
            other => Err(PruneError::input(format!(
                "unknown `taylor` {other:?} (expected param_first, vectorize, param_second or param_mix)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TaylorVariant::ParamFirst => "param_first",
            TaylorVariant::Vectorize => "vectorize",
            TaylorVariant::ParamSecond => "param_second",
            TaylorVariant::ParamMix => "param_mix",
        }
    }

    fn needs_grad(self) -> bool {
        self != TaylorVariant::ParamSecond
    }
}

/// Accumulated gradient statistics of the tensors being scored.
pub struct TaylorStats {
    variant: TaylorVariant,
    grad: HashMap<(usize, Role), Tensor>,
    sq: HashMap<(usize, Role), Tensor>,
    second: HashMap<(usize, Role, Axis), Tensor>,
    /// Mean calibration loss before pruning.
    pub mean_loss: f64,
}

fn add_into<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Tensor>, key: K, t: Tensor) -> Result<()> {
    let sum = match map.remove(&key) {
        Some(acc) => (acc + t)?,
        None => t,
    };
    map.insert(key, sum);
    Ok(())
}

/// Run every sample forward and backward, accumulating what `variant` needs for the `targets`
/// (layer, role, axis). `progress(done, total)` after each sample.
pub fn accumulate(
    model: &Model,
    targets: &[(usize, Role, Axis)],
    variant: TaylorVariant,
    samples: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<TaylorStats> {
    if samples.is_empty() {
        return Err(PruneError::input("Taylor importance needs calibration samples"));
    }
    let diff = DiffModel::new(model, DType::F32, |l, r| targets.iter().any(|&(tl, tr, _)| tl == l && tr == r))?;
    let n = samples.len() as f64;
    let mut stats =
        TaylorStats { variant, grad: HashMap::new(), sq: HashMap::new(), second: HashMap::new(), mean_loss: 0.0 };
    for (i, ids) in samples.iter().enumerate() {
        let loss = diff.loss(ids, &mut Probe::default())?;
        stats.mean_loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / n;
        let grads = loss.backward()?;
        for (layer, role, var) in diff.vars() {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| PruneError::input(format!("no gradient reached layer {layer} {}", role.name())))?;
            if variant.needs_grad() {
                add_into(&mut stats.grad, (layer, role), (g / n)?)?;
            }
            match variant {
                TaylorVariant::ParamMix => add_into(&mut stats.sq, (layer, role), (g.sqr()? / n)?)?,
                TaylorVariant::ParamSecond => {
                    let s = ((var.as_tensor() * g)?.sqr()? / n)?;
                    for &(_, _, axis) in targets.iter().filter(|&&(tl, tr, _)| tl == layer && tr == role) {
                        let along = match axis {
                            Axis::Rows => s.sum(1)?,
                            Axis::Cols => s.sum(0)?,
                        };
                        add_into(&mut stats.second, (layer, role, axis), along)?;
                    }
                }
                _ => {}
            }
        }
        progress(i + 1, samples.len());
    }
    Ok(stats)
}

impl TaylorStats {
    /// Per-channel local importance of `weight` (the layer's `role`) along `axis`.
    pub fn norms(&self, weight: &Tensor, layer: usize, role: Role, axis: Axis) -> Result<Vec<f64>> {
        let missing = || PruneError::input(format!("no Taylor statistics for layer {layer} {}", role.name()));
        let along = |t: &Tensor| -> Result<Tensor> {
            Ok(match axis {
                Axis::Rows => t.sum(1)?,
                Axis::Cols => t.sum(0)?,
            })
        };
        let w = weight.to_dtype(DType::F32)?;
        let v = match self.variant {
            TaylorVariant::ParamSecond => self.second.get(&(layer, role, axis)).ok_or_else(missing)?.clone(),
            TaylorVariant::ParamFirst => along(&(&w * self.grad.get(&(layer, role)).ok_or_else(missing)?)?.abs()?)?,
            TaylorVariant::Vectorize => along(&(&w * self.grad.get(&(layer, role)).ok_or_else(missing)?)?)?.abs()?,
            TaylorVariant::ParamMix => {
                let first = (&w * self.grad.get(&(layer, role)).ok_or_else(missing)?)?;
                let second = (w.sqr()? * self.sq.get(&(layer, role)).ok_or_else(missing)?)?;
                along(&(first - (second * 0.5)?)?.abs()?)?
            }
        };
        Ok(v.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }
}
