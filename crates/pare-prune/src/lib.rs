//! Structured pruning, LLM-Pruner style, on pare's own model: whole attention heads (GQA-aware)
//! and MLP channels are scored, chosen, and physically removed.
//!
//! The flow: [`make_plan`] scores the coupled groups ([`groups`]) with an [`importance`]
//! method, turns ratios into per-layer counts ([`ratios`]) and records the kept indices in a
//! [`PruningPlan`]; [`apply::apply`] slices the weights into a new [`Model`] whose layers may
//! differ in head count and MLP width. Coupled groups are written out per architecture rather
//! than traced, so nothing breaks when a framework changes its modules.

pub mod apply;
pub mod calibration;
#[cfg(test)]
mod diff_tests;
pub mod error;
pub mod groups;
pub mod importance;
pub mod plan;
pub mod ratios;
pub mod report;
#[cfg(test)]
mod testing;

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::DType;
use pare_model::Model;

pub use apply::apply;
pub use calibration::Calibration;
pub use error::{PruneError, Result};
pub use groups::GqaMode;
pub use importance::{Importance, Reduction, Scores, TaylorVariant};
pub use plan::PruningPlan;
pub use ratios::{PerLayerRatios, RatioMode};
pub use report::{LayerReport, ParamCounts};

use crate::groups::Kind;
use crate::importance::{attn_shape, ScoreSettings};
use crate::plan::{LayerPlan, MlpKeep, PlanData, PlanMethod, PlanModel};
use crate::ratios::LayerUnits;

/// One pruning configuration.
#[derive(Debug, Clone)]
pub struct PruneSettings {
    pub importance: Importance,
    pub reduction: Reduction,
    pub gqa: GqaMode,
    /// Layers whose attention is pruned (end exclusive, as LLM-Pruner's block_attention_layer_*).
    pub attn_layers: Range<usize>,
    pub mlp_layers: Range<usize>,
    pub ratio: f64,
    pub mode: RatioMode,
    pub round_to: Option<usize>,
    pub seed: u64,
}

impl PruneSettings {
    pub fn needs_calibration(&self) -> bool {
        self.importance.needs_calibration() || matches!(self.mode, RatioMode::BlockInfluence { .. })
    }

    /// The layers each kind prunes: the ranges, or the layers a per-layer file names.
    fn layers(&self, n: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        if let RatioMode::PerLayer(r) = &self.mode {
            for (kind, map) in [("attn", &r.attn), ("mlp", &r.mlp)] {
                if let Some(l) = map.keys().find(|&&l| l >= n) {
                    return Err(PruneError::input(format!(
                        "per-layer ratios: {kind} layer {l} is outside the model's {n} layers"
                    )));
                }
            }
            return Ok((r.attn.keys().copied().collect(), r.mlp.keys().copied().collect()));
        }
        for (setting, range) in [("`attn_layers`", &self.attn_layers), ("`mlp_layers`", &self.mlp_layers)] {
            if range.start > range.end || range.end > n {
                return Err(PruneError::input(format!(
                    "{setting} {}..{} is outside the model's {n} layers (ranges are start..end, end exclusive, at most {n})",
                    range.start, range.end
                )));
            }
        }
        Ok((self.attn_layers.clone().collect(), self.mlp_layers.clone().collect()))
    }
}

/// A plan and what it was chosen from.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub plan: PruningPlan,
    pub scores: Scores,
    /// Block influence per layer, when measured.
    pub block_influence: Option<Vec<f64>>,
    /// Units removed per layer, per kind.
    pub removed: BTreeMap<usize, (usize, usize)>,
}

/// The prunable units of a layer, for ratios.
fn layer_units(model: &Model, kind: Kind, gqa: GqaMode, layer: usize) -> LayerUnits {
    let b = &model.blocks()[layer];
    match kind {
        Kind::Mlp => {
            LayerUnits { layer, units: b.mlp.width(), root_width: 1, channel_width: 1, unit_name: "MLP channel" }
        }
        Kind::Attn => {
            let s = attn_shape(b);
            match gqa {
                GqaMode::KvGroups => LayerUnits {
                    layer,
                    units: s.num_kv_heads,
                    root_width: s.head_dim,
                    channel_width: s.group() * s.head_dim,
                    unit_name: "KV head",
                },
                GqaMode::QueryHeads => LayerUnits {
                    layer,
                    units: s.group(),
                    root_width: s.head_dim,
                    channel_width: s.num_kv_heads * s.head_dim,
                    unit_name: "query head of a KV group",
                },
            }
        }
    }
}

/// Block influence of every layer over the calibration samples.
pub fn measure_block_influence(
    model: &Model,
    samples: &[Vec<u32>],
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<f64>> {
    let diff = pare_model::diff::DiffModel::new(model, DType::F32, |_, _| false)?;
    let mut hidden = Vec::with_capacity(samples.len());
    for (i, ids) in samples.iter().enumerate() {
        let mut probe = pare_model::diff::Probe { record_hidden: true, ..Default::default() };
        diff.forward(ids, &mut probe)?;
        hidden.push(probe.hidden);
        progress("block influence", i + 1, samples.len());
    }
    ratios::block_influence_of(&hidden)
}

/// Score, count and choose: the plan for `settings` on `model`.
pub fn make_plan(
    model: &Model,
    settings: &PruneSettings,
    calibration: Option<&Calibration>,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Outcome> {
    let n = model.blocks().len();
    let (attn_layers, mlp_layers) = settings.layers(n)?;
    if let Some(n) = settings.round_to {
        if n == 0 {
            return Err(PruneError::input("`round_to` must be at least 1"));
        }
    }
    let samples = match (settings.needs_calibration(), calibration) {
        (true, None) => {
            return Err(PruneError::input(format!(
                "{} needs calibration text (`calib_text`)",
                if settings.importance.needs_calibration() {
                    format!("`importance` {}", settings.importance.name())
                } else {
                    "`mode` block-influence".into()
                }
            )))
        }
        (_, c) => c.map(|c| c.ids.as_slice()),
    };
    let score_settings = ScoreSettings {
        importance: settings.importance,
        reduction: settings.reduction,
        gqa: settings.gqa,
        attn_layers: attn_layers.clone(),
        mlp_layers: mlp_layers.clone(),
        seed: settings.seed,
    };
    let scores = importance::score(model, &score_settings, samples, progress)?;
    let block_influence = match (&settings.mode, samples) {
        (RatioMode::BlockInfluence { .. }, Some(s)) => Some(measure_block_influence(model, s, progress)?),
        _ => None,
    };

    // Ranking scores: KV heads, query-head slots, or channels.
    let attn_rank: BTreeMap<usize, Vec<f64>> = scores
        .attn
        .iter()
        .map(|(&l, s)| {
            let v = match settings.gqa {
                GqaMode::KvGroups => s.clone(),
                GqaMode::QueryHeads => plan::query_head_slots(attn_shape(&model.blocks()[l]), s),
            };
            (l, v)
        })
        .collect();
    let units = |kind: Kind, layers: &[usize]| -> Vec<LayerUnits> {
        layers.iter().map(|&l| layer_units(model, kind, settings.gqa, l)).collect()
    };
    let attn_units = units(Kind::Attn, &attn_layers);
    let mlp_units = units(Kind::Mlp, &mlp_layers);
    let bi = block_influence.as_deref();
    let attn_counts =
        ratios::counts(Kind::Attn, &attn_units, &attn_rank, &settings.mode, settings.ratio, bi, settings.round_to)?;
    let mlp_counts =
        ratios::counts(Kind::Mlp, &mlp_units, &scores.mlp, &settings.mode, settings.ratio, bi, settings.round_to)?;

    let mut layers: BTreeMap<usize, LayerPlan> = BTreeMap::new();
    let mut removed: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut layer_ratios: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
    for (&l, &p) in &attn_counts {
        let u = attn_units.iter().find(|u| u.layer == l).expect("counted layer");
        layer_ratios.entry("attn".into()).or_default().insert(l, p as f64 / u.units as f64);
        if p == 0 {
            continue;
        }
        let keep = plan::attn_keep(attn_shape(&model.blocks()[l]), settings.gqa, &scores.attn[&l], p);
        layers.entry(l).or_insert(LayerPlan { layer: l, attn: None, mlp: None }).attn = Some(keep);
        removed.entry(l).or_default().0 = p;
    }
    for (&l, &p) in &mlp_counts {
        let u = mlp_units.iter().find(|u| u.layer == l).expect("counted layer");
        layer_ratios.entry("mlp".into()).or_default().insert(l, p as f64 / u.units as f64);
        if p == 0 {
            continue;
        }
        let kept_channels = plan::keep_highest(&scores.mlp[&l], p);
        layers.entry(l).or_insert(LayerPlan { layer: l, attn: None, mlp: None }).mlp = Some(MlpKeep { kept_channels });
        removed.entry(l).or_default().1 = p;
    }
    let range = |r: &Range<usize>| [r.start, r.end];
    let plan = PruningPlan {
        format: plan::FORMAT.into(),
        version: plan::VERSION,
        model: PlanModel::of(model),
        method: Some(PlanMethod {
            importance: settings.importance.name().into(),
            taylor: match settings.importance {
                Importance::Taylor(v) => Some(v.name().into()),
                _ => None,
            },
            reduction: settings.reduction.name().into(),
            gqa: settings.gqa,
            mode: settings.mode.name().into(),
            ratio: settings.ratio,
            attn_layers: range(&settings.attn_layers),
            mlp_layers: range(&settings.mlp_layers),
            round_to: settings.round_to,
            seed: settings.seed,
            layer_ratios,
        }),
        data: calibration.filter(|_| settings.needs_calibration()).map(|c| PlanData {
            source: c.source.clone(),
            samples: c.samples,
            tokens_per_sample: c.tokens_per_sample,
            text_tokens: c.text_tokens,
        }),
        layers: layers.into_values().collect(),
    };
    Ok(Outcome { plan, scores, block_influence, removed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_model;
    use candle_core::{Device, Tensor};

    fn settings(importance: Importance, gqa: GqaMode, ratio: f64) -> PruneSettings {
        PruneSettings {
            importance,
            reduction: Reduction::Sum,
            gqa,
            attn_layers: 0..3,
            mlp_layers: 0..3,
            ratio,
            mode: RatioMode::Local,
            round_to: None,
            seed: 1,
        }
    }

    fn samples() -> Calibration {
        let ids: Vec<u32> = (0..48).map(|i| (i * 71 % 250) as u32 + 2).collect();
        calibration::from_tokens(&ids, 3, 16, "test").unwrap()
    }

    /// The tiny model (3 layers, 8 heads over 2 KV heads, seed 11) with removed heads' o columns
    /// and removed channels' down columns set to zero: what the pruned model must compute exactly.
    fn masked(plan: &PruningPlan) -> Model {
        let head_dim = 8;
        crate::testing::tiny_model_with(&Device::Cpu, 3, 8, 2, 11, |tensors| {
            for lp in &plan.layers {
                let zero_cols = |name: &str, keep: &[usize], tensors: &mut Vec<(String, Tensor)>| {
                    let (_, w) = tensors.iter_mut().find(|(n, _)| n == name).unwrap();
                    let cols = w.dim(1).unwrap();
                    let mask: Vec<f32> = (0..cols).map(|c| if keep.contains(&c) { 1.0 } else { 0.0 }).collect();
                    *w = w.broadcast_mul(&Tensor::from_vec(mask, (1, cols), &Device::Cpu).unwrap()).unwrap();
                };
                let p = format!("model.layers.{}", lp.layer);
                if let Some(a) = &lp.attn {
                    let q_rows = pare_model::attention::head_channels(&a.kept_heads, head_dim);
                    zero_cols(&format!("{p}.self_attn.o_proj.weight"), &q_rows, tensors);
                }
                if let Some(mk) = &lp.mlp {
                    zero_cols(&format!("{p}.mlp.down_proj.weight"), &mk.kept_channels, tensors);
                }
            }
        })
    }

    #[test]
    fn pruned_model_equals_the_masked_original() {
        let model = tiny_model(&Device::Cpu, 3, 8, 2, 11);
        let ids: Vec<u32> = (0..20).map(|i| (i * 13 % 200) as u32 + 5).collect();
        for gqa in [GqaMode::KvGroups, GqaMode::QueryHeads] {
            let out = make_plan(&model, &settings(Importance::L2, gqa, 0.5), None, &mut |_, _, _| {}).unwrap();
            let pruned = apply(&model, &out.plan).unwrap();
            for b in pruned.blocks() {
                assert_eq!(b.mlp.width(), 12);
                match gqa {
                    GqaMode::KvGroups => assert_eq!((b.attn.num_heads(), b.attn.num_kv_heads()), (4, 1)),
                    GqaMode::QueryHeads => assert_eq!((b.attn.num_heads(), b.attn.num_kv_heads()), (4, 2)),
                }
            }
            let got = pare_test_support::logits_all(&pruned, &ids).unwrap();
            let want = pare_test_support::logits_all(&masked(&out.plan), &ids).unwrap();
            assert!(
                pare_test_support::max_abs_diff(&got, &want) < 1e-4,
                "{gqa:?}: {}",
                pare_test_support::max_abs_diff(&got, &want)
            );
            // Uniform result: the config holds the new shapes, no per-layer lists.
            assert_eq!(pruned.config().layer_shapes, None);
            assert_eq!(pruned.config().intermediate_size, 12);
            assert!(ParamCounts::of(&pruned).total < ParamCounts::of(&model).total);
            assert_eq!(ParamCounts::of(&pruned).total, pruned.param_count());
        }
    }

    #[test]
    fn partial_ranges_give_per_layer_shapes() {
        let model = tiny_model(&Device::Cpu, 3, 8, 2, 12);
        let mut s = settings(Importance::L1, GqaMode::KvGroups, 0.5);
        s.attn_layers = 1..2;
        s.mlp_layers = 1..3;
        let out = make_plan(&model, &s, None, &mut |_, _, _| {}).unwrap();
        let pruned = apply(&model, &out.plan).unwrap();
        let shapes = pruned.config().layer_shapes.clone().expect("non-uniform");
        assert_eq!(shapes.num_heads, vec![8, 4, 8]);
        assert_eq!(shapes.num_kv_heads, vec![2, 1, 2]);
        assert_eq!(shapes.intermediate_size, vec![24, 12, 12]);
    }

    #[test]
    fn every_importance_runs_and_plans_reapply() {
        let model = tiny_model(&Device::Cpu, 3, 4, 2, 13);
        let calib = samples();
        for imp in [
            Importance::Random,
            Importance::L1,
            Importance::L2,
            Importance::Taylor(TaylorVariant::ParamFirst),
            Importance::Taylor(TaylorVariant::Vectorize),
            Importance::Taylor(TaylorVariant::ParamSecond),
            Importance::Taylor(TaylorVariant::ParamMix),
            Importance::WandaSp,
        ] {
            let out =
                make_plan(&model, &settings(imp, GqaMode::QueryHeads, 0.5), Some(&calib), &mut |_, _, _| {}).unwrap();
            assert!(out.scores.mlp.values().flatten().all(|v| v.is_finite() && *v >= 0.0), "{imp:?}");
            let text = out.plan.to_json();
            let back = PruningPlan::from_json(&text, "plan.json").unwrap();
            assert_eq!(back, out.plan);
            let a = apply(&model, &out.plan).unwrap();
            let b = apply(&model, &back).unwrap();
            assert_eq!(
                pare_test_support::logits_all(&a, &[3, 4, 5]).unwrap().to_vec2::<f32>().unwrap(),
                pare_test_support::logits_all(&b, &[3, 4, 5]).unwrap().to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn vectorized_taylor_is_the_loss_derivative_of_removing_a_channel() {
        // For one down_proj column c, |Σᵢ w_ic·g_ic| is |d/dε L(W − ε·W_c)| at ε = 0, L the
        // mean calibration loss. Check it against central differences in f64.
        let model = tiny_model(&Device::Cpu, 2, 4, 2, 14);
        let calib = samples();
        let stats = importance::taylor::accumulate(
            &model,
            &[(1, groups::Role::Down, groups::Axis::Cols)],
            TaylorVariant::Vectorize,
            &calib.ids,
            |_, _| {},
        )
        .unwrap();
        let w = model.blocks()[1].mlp.down().dense_weight(DType::F32).unwrap();
        let taylor = stats.norms(&w, 1, groups::Role::Down, groups::Axis::Cols).unwrap();
        let diff =
            pare_model::diff::DiffModel::new(&model, DType::F64, |l, r| l == 1 && r == groups::Role::Down).unwrap();
        let var = diff.vars()[0].2;
        // A copy: a Var's tensor shares storage with it, and `set` writes in place.
        let w0 = var.as_tensor().copy().unwrap();
        let mean_loss = || -> f64 {
            calib
                .ids
                .iter()
                .map(|ids| diff.loss(ids, &mut Default::default()).unwrap().to_scalar::<f64>().unwrap())
                .sum::<f64>()
                / calib.ids.len() as f64
        };
        for c in [0usize, 7, 23] {
            let at = |eps: f64| -> f64 {
                let mut scale = vec![1.0f64; w0.dim(1).unwrap()];
                scale[c] = 1.0 - eps;
                let scale = Tensor::from_vec(scale, (1, w0.dim(1).unwrap()), &Device::Cpu).unwrap();
                var.set(&w0.broadcast_mul(&scale).unwrap()).unwrap();
                mean_loss()
            };
            let h = 1e-4;
            let fd = ((at(h) - at(-h)) / (2.0 * h)).abs();
            assert!(
                (fd - taylor[c]).abs() < 1e-6 + 1e-3 * fd,
                "column {c}: Taylor {} vs finite difference {fd}",
                taylor[c]
            );
        }
        var.set(&w0).unwrap();
    }

    #[test]
    fn bad_settings_are_errors() {
        let model = tiny_model(&Device::Cpu, 3, 4, 2, 15);
        let mut s = settings(Importance::L2, GqaMode::KvGroups, 0.25);
        s.attn_layers = 2..5;
        let e = make_plan(&model, &s, None, &mut |_, _, _| {}).unwrap_err().to_string();
        assert!(e.contains("`attn_layers` 2..5 is outside the model's 3 layers"), "{e}");
        let e = make_plan(&model, &settings(Importance::L2, GqaMode::KvGroups, 1.0), None, &mut |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("would remove every KV head of layer 0"), "{e}");
        let e = make_plan(
            &model,
            &settings(Importance::Taylor(TaylorVariant::ParamFirst), GqaMode::KvGroups, 0.5),
            None,
            &mut |_, _, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("needs calibration text"), "{e}");
        let mut s = settings(Importance::L2, GqaMode::KvGroups, 0.5);
        s.round_to = Some(1000);
        let e = make_plan(&model, &s, None, &mut |_, _, _| {}).unwrap_err().to_string();
        assert!(e.contains("`round_to` 1000 is larger than layer 0's"), "{e}");
        // A plan for another model is refused.
        let other = tiny_model(&Device::Cpu, 2, 4, 2, 16);
        let out =
            make_plan(&model, &settings(Importance::L2, GqaMode::KvGroups, 0.5), None, &mut |_, _, _| {}).unwrap();
        let e = apply(&other, &out.plan).unwrap_err().to_string();
        assert!(e.contains("2 layers, the plan was made for 3"), "{e}");
    }

    #[test]
    fn block_influence_mode_keeps_the_local_total() {
        let model = tiny_model(&Device::Cpu, 3, 4, 2, 17);
        let calib = samples();
        let mut s = settings(Importance::L2, GqaMode::KvGroups, 0.5);
        let local = make_plan(&model, &s, None, &mut |_, _, _| {}).unwrap();
        s.mode = RatioMode::BlockInfluence { strength: 1.0 };
        let bi = make_plan(&model, &s, Some(&calib), &mut |_, _, _| {}).unwrap();
        let total = |o: &Outcome| o.removed.values().map(|r| r.1).sum::<usize>();
        assert_eq!(total(&local), total(&bi));
        let influence = bi.block_influence.unwrap();
        assert_eq!(influence.len(), 3);
        assert!(influence.iter().all(|&x| x > 0.0 && x < 2.0), "{influence:?}");
    }
}
