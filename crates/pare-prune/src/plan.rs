//! A pruning plan: which heads and channels every layer keeps, with how they were chosen. It is
//! written next to every export (`pruning_plan.json`) and re-applied by `pare prune --plan`.

use std::collections::BTreeMap;

use pare_model::Model;
use serde::{Deserialize, Serialize};

use crate::error::{PruneError, Result};
use crate::groups::{self, AttnShape, GqaMode};
use crate::importance::attn_shape;

pub const FORMAT: &str = "pare-pruning-plan";
pub const VERSION: u32 = 1;

/// The unpruned model a plan applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanModel {
    pub arch: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub head_dim: usize,
    pub num_heads: Vec<usize>,
    pub num_kv_heads: Vec<usize>,
    pub intermediate_size: Vec<usize>,
}

impl PlanModel {
    pub fn of(model: &Model) -> Self {
        PlanModel {
            arch: model.config().arch.model_type().to_string(),
            num_layers: model.blocks().len(),
            hidden_size: model.config().hidden_size,
            head_dim: model.config().head_dim,
            num_heads: model.blocks().iter().map(|b| b.attn.num_heads()).collect(),
            num_kv_heads: model.blocks().iter().map(|b| b.attn.num_kv_heads()).collect(),
            intermediate_size: model.blocks().iter().map(|b| b.mlp.width()).collect(),
        }
    }
}

/// How the plan was chosen (a record; re-applying does not need it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanMethod {
    pub importance: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub taylor: Option<String>,
    pub reduction: String,
    pub gqa: GqaMode,
    pub mode: String,
    pub ratio: f64,
    pub attn_layers: [usize; 2],
    pub mlp_layers: [usize; 2],
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub round_to: Option<usize>,
    pub seed: u64,
    /// Per-layer ratios actually reached (pruned / original units).
    #[serde(default)]
    pub layer_ratios: BTreeMap<String, BTreeMap<usize, f64>>,
}

/// The calibration data used, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanData {
    pub source: String,
    pub samples: usize,
    pub tokens_per_sample: usize,
    pub text_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttnKeep {
    /// Query heads kept, original numbering, ascending.
    pub kept_heads: Vec<usize>,
    /// KV heads kept, original numbering, ascending.
    pub kept_kv_heads: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpKeep {
    /// Intermediate channels kept, original numbering, ascending.
    pub kept_channels: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlan {
    pub layer: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attn: Option<AttnKeep>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mlp: Option<MlpKeep>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruningPlan {
    pub format: String,
    pub version: u32,
    pub model: PlanModel,
    pub method: Option<PlanMethod>,
    pub data: Option<PlanData>,
    /// Only the layers that change.
    pub layers: Vec<LayerPlan>,
}

/// Indices 0..n without the `remove` lowest-scoring ones (ties: the lower index goes first).
pub fn keep_highest(scores: &[f64], remove: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order[remove.min(scores.len())..].to_vec();
    kept.sort_unstable();
    kept
}

/// Under query-heads mode: slot r of a layer is the r-th weakest query head of every KV group,
/// scored by their sum (so removing the p weakest slots removes p heads from each group).
pub fn query_head_slots(s: AttnShape, head_scores: &[f64]) -> Vec<f64> {
    let g = s.group();
    let sorted: Vec<Vec<f64>> = (0..s.num_kv_heads)
        .map(|kv| {
            let mut v = head_scores[kv * g..(kv + 1) * g].to_vec();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    (0..g).map(|r| sorted.iter().map(|v| v[r]).sum()).collect()
}

/// Heads kept when `remove` units go, by mode.
pub fn attn_keep(s: AttnShape, mode: GqaMode, unit_scores: &[f64], remove: usize) -> AttnKeep {
    match mode {
        GqaMode::KvGroups => {
            let kept_kv_heads = keep_highest(unit_scores, remove);
            let g = s.group();
            let kept_heads = kept_kv_heads.iter().flat_map(|&kv| kv * g..(kv + 1) * g).collect();
            AttnKeep { kept_heads, kept_kv_heads }
        }
        GqaMode::QueryHeads => {
            let g = s.group();
            let kept_heads = (0..s.num_kv_heads)
                .flat_map(|kv| {
                    keep_highest(&unit_scores[kv * g..(kv + 1) * g], remove).into_iter().map(move |h| kv * g + h)
                })
                .collect();
            AttnKeep { kept_heads, kept_kv_heads: (0..s.num_kv_heads).collect() }
        }
    }
}

impl PruningPlan {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a plan serializes") + "\n"
    }

    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let plan: PruningPlan = serde_json::from_str(text).map_err(|e| PruneError::Plan(format!("{source}: {e}")))?;
        if plan.format != FORMAT || plan.version != VERSION {
            return Err(PruneError::Plan(format!(
                "{source}: format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                plan.format, plan.version
            )));
        }
        Ok(plan)
    }

    /// Check that the plan fits `model` (the unpruned model it was made for) and is consistent.
    pub fn validate(&self, model: &Model) -> Result<()> {
        let actual = PlanModel::of(model);
        if actual != self.model {
            let what = if actual.num_layers != self.model.num_layers {
                format!("{} layers, the plan was made for {}", actual.num_layers, self.model.num_layers)
            } else if actual.arch != self.model.arch || actual.hidden_size != self.model.hidden_size {
                format!(
                    "{} with hidden size {}, the plan was made for {} with {}",
                    actual.arch, actual.hidden_size, self.model.arch, self.model.hidden_size
                )
            } else {
                "its layer shapes differ from the ones the plan was made for (apply a plan to the unpruned model)"
                    .into()
            };
            return Err(PruneError::Plan(format!("the model does not match: {what}")));
        }
        let mut seen = std::collections::HashSet::new();
        for lp in &self.layers {
            if lp.layer >= actual.num_layers || !seen.insert(lp.layer) {
                return Err(PruneError::Plan(format!("layer {} is out of range or listed twice", lp.layer)));
            }
            let block = &model.blocks()[lp.layer];
            if let Some(a) = &lp.attn {
                groups::check_attn_keep(attn_shape(block), &a.kept_heads, &a.kept_kv_heads)
                    .map_err(|e| PruneError::Plan(format!("layer {} attention: {e}", lp.layer)))?;
            }
            if let Some(m) = &lp.mlp {
                let w = block.mlp.width();
                let ok = !m.kept_channels.is_empty()
                    && m.kept_channels.windows(2).all(|p| p[0] < p[1])
                    && m.kept_channels.iter().all(|&c| c < w);
                if !ok {
                    return Err(PruneError::Plan(format!(
                        "layer {} MLP: kept channels must be ascending, below {w}, and at least one",
                        lp.layer
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: AttnShape = AttnShape { num_heads: 6, num_kv_heads: 2, head_dim: 4 };

    #[test]
    fn keep_highest_drops_the_lowest() {
        assert_eq!(keep_highest(&[0.5, 0.1, 0.9, 0.3], 2), vec![0, 2]);
        assert_eq!(keep_highest(&[1.0, 1.0, 1.0], 1), vec![1, 2], "ties: lower index goes");
        assert_eq!(keep_highest(&[1.0], 0), vec![0]);
    }

    #[test]
    fn kv_groups_keep_whole_groups() {
        let k = attn_keep(S, GqaMode::KvGroups, &[0.2, 0.1], 1);
        assert_eq!(k, AttnKeep { kept_heads: vec![0, 1, 2], kept_kv_heads: vec![0] });
    }

    #[test]
    fn query_heads_leave_equal_groups() {
        let scores = [0.3, 0.1, 0.2, 0.9, 0.8, 0.05];
        let k = attn_keep(S, GqaMode::QueryHeads, &scores, 1);
        assert_eq!(k, AttnKeep { kept_heads: vec![0, 2, 3, 4], kept_kv_heads: vec![0, 1] });
        assert_eq!(query_head_slots(S, &scores), vec![0.1 + 0.05, 0.2 + 0.8, 0.3 + 0.9]);
    }
}
