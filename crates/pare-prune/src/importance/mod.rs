//! Group importance: each coupled tensor contributes a per-channel local score along the axis
//! it is cut on (one file per method), contributions are mapped to root channels and reduced
//! (`reduction`), and a unit sums its consecutive root channels.

pub mod magnitude;
pub mod random;
pub mod reduction;
pub mod taylor;
pub mod wanda_sp;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use pare_model::layers::Linear;
use pare_model::model::Block;
use pare_model::Model;
use serde::Serialize;

pub use reduction::Reduction;
pub use taylor::TaylorVariant;

use crate::error::{PruneError, Result};
use crate::groups::{self, AttnShape, Axis, GqaMode, Kind, Member, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Importance {
    Random,
    L1,
    L2,
    Taylor(TaylorVariant),
    WandaSp,
}

impl Importance {
    /// From `--importance` and `--taylor`.
    pub fn parse(name: &str, taylor: &str) -> Result<Self> {
        Ok(match name {
            "random" => Importance::Random,
            "l1" => Importance::L1,
            "l2" => Importance::L2,
            "taylor" => Importance::Taylor(TaylorVariant::parse(taylor)?),
            "wanda-sp" | "wanda_sp" => Importance::WandaSp,
            other => {
                return Err(PruneError::input(format!(
                    "unknown `importance` {other:?} (expected random, l1, l2, taylor or wanda-sp)"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Importance::Random => "random",
            Importance::L1 => "l1",
            Importance::L2 => "l2",
            Importance::Taylor(_) => "taylor",
            Importance::WandaSp => "wanda-sp",
        }
    }

    pub fn needs_calibration(self) -> bool {
        matches!(self, Importance::Taylor(_) | Importance::WandaSp)
    }
}

/// What to score.
#[derive(Debug, Clone)]
pub struct ScoreSettings {
    pub importance: Importance,
    pub reduction: Reduction,
    pub gqa: GqaMode,
    pub attn_layers: Vec<usize>,
    pub mlp_layers: Vec<usize>,
    pub seed: u64,
}

/// Unit scores per layer. Attention units are KV heads (kv-groups) or query heads (query-heads);
/// MLP units are intermediate channels.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub attn: BTreeMap<usize, Vec<f64>>,
    pub mlp: BTreeMap<usize, Vec<f64>>,
    /// Mean calibration loss, when gradients were taken.
    pub calibration_loss: Option<f64>,
}

/// Where members' local scores come from.
enum Source {
    Magnitude(u32),
    Taylor(taylor::TaylorStats),
    Wanda(wanda_sp::InputNorms),
}

pub fn linear(block: &Block, role: Role) -> Option<&Linear> {
    match role {
        Role::Q => Some(block.attn.q()),
        Role::K => Some(block.attn.k()),
        Role::V => Some(block.attn.v()),
        Role::O => Some(block.attn.o()),
        Role::Gate => block.mlp.gate(),
        Role::Up => Some(block.mlp.up()),
        Role::Down => Some(block.mlp.down()),
    }
}

pub fn attn_shape(block: &Block) -> AttnShape {
    AttnShape {
        num_heads: block.attn.num_heads(),
        num_kv_heads: block.attn.num_kv_heads(),
        head_dim: block.attn.head_dim(),
    }
}

/// The (layer, member) pairs a configuration scores.
fn members(model: &Model, s: &ScoreSettings) -> Vec<(usize, Kind, Member)> {
    let gated = model.config().gated_mlp();
    let mut out = Vec::new();
    for &l in &s.attn_layers {
        out.extend(groups::attn_members(s.gqa).iter().map(|&m| (l, Kind::Attn, m)));
    }
    for &l in &s.mlp_layers {
        out.extend(groups::mlp_members(gated).iter().map(|&m| (l, Kind::Mlp, m)));
    }
    out
}

/// Score every unit of the configured layers. `samples` are the calibration sequences (Taylor,
/// Wanda-SP); `progress(stage, done, total)` reports each step.
pub fn score(
    model: &Model,
    s: &ScoreSettings,
    samples: Option<&[Vec<u32>]>,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Scores> {
    let need_samples = || {
        samples.ok_or_else(|| PruneError::input(format!("`importance` {} needs calibration text", s.importance.name())))
    };
    let mut scores = Scores::default();
    let source = match s.importance {
        Importance::Random => {
            for &l in &s.attn_layers {
                let shape = attn_shape(&model.blocks()[l]);
                let n = match s.gqa {
                    GqaMode::KvGroups => shape.num_kv_heads,
                    GqaMode::QueryHeads => shape.num_heads,
                };
                scores.attn.insert(l, random::unit_scores(s.seed, l, 0, n));
            }
            for &l in &s.mlp_layers {
                scores.mlp.insert(l, random::unit_scores(s.seed, l, 1, model.blocks()[l].mlp.width()));
            }
            return Ok(scores);
        }
        Importance::L1 => Source::Magnitude(1),
        Importance::L2 => Source::Magnitude(2),
        Importance::Taylor(variant) => {
            let targets: Vec<(usize, Role, Axis)> =
                members(model, s).iter().map(|&(l, _, m)| (l, m.role, m.axis)).collect();
            let stats =
                taylor::accumulate(model, &targets, variant, need_samples()?, |d, t| progress("gradients", d, t))?;
            scores.calibration_loss = Some(stats.mean_loss);
            Source::Taylor(stats)
        }
        Importance::WandaSp => {
            Source::Wanda(wanda_sp::input_norms(model, need_samples()?, |d, t| progress("activations", d, t))?)
        }
    };
    let gated = model.config().gated_mlp();
    let layers: Vec<(usize, Kind)> =
        s.attn_layers.iter().map(|&l| (l, Kind::Attn)).chain(s.mlp_layers.iter().map(|&l| (l, Kind::Mlp))).collect();
    for (i, &(l, kind)) in layers.iter().enumerate() {
        let block = &model.blocks()[l];
        let shape = attn_shape(block);
        let (member_list, root_len, unit_width) = match kind {
            Kind::Attn => (groups::attn_members(s.gqa), groups::attn_root_channels(s.gqa, shape), shape.head_dim),
            Kind::Mlp => (groups::mlp_members(gated), block.mlp.width(), 1),
        };
        let mut aligned = Vec::with_capacity(member_list.len());
        for &m in member_list {
            let lin = linear(block, m.role)
                .ok_or_else(|| PruneError::input(format!("layer {l} has no {} projection", m.role.name())))?;
            let w: Tensor = lin.dense_weight(DType::F32)?;
            let local = match &source {
                Source::Magnitude(p) => magnitude::norms(&w, m.axis, *p)?,
                Source::Taylor(stats) => stats.norms(&w, l, m.role, m.axis)?,
                Source::Wanda(norms) => norms.norms(&w, l, m.role, m.axis, gated)?,
            };
            let mut root = vec![0.0; root_len];
            for (c, v) in local.into_iter().enumerate() {
                let r = match kind {
                    Kind::Attn => groups::attn_root_of(s.gqa, shape, m, c),
                    Kind::Mlp => c,
                };
                root[r] += v;
            }
            aligned.push(root);
        }
        let units = reduction::units(&s.reduction.reduce(&aligned), unit_width);
        match kind {
            Kind::Attn => scores.attn.insert(l, units),
            Kind::Mlp => scores.mlp.insert(l, units),
        };
        progress("scoring", i + 1, layers.len());
    }
    Ok(scores)
}
