//! Helpers shared by the reference tests: fixture loading and case comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use pare_model::{Model, WeightDType};
use pare_prune::calibration;
use pare_prune::{GqaMode, Importance, PruneSettings, RatioMode, Reduction};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/prune")
}

pub fn load_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

pub fn load_model(path: &Path) -> Model {
    pare_model::load(path.to_str().unwrap(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap().model
}

pub fn range(v: &Value) -> std::ops::Range<usize> {
    v[0].as_u64().unwrap() as usize..v[1].as_u64().unwrap() as usize
}

pub fn settings_of(case: &Value) -> PruneSettings {
    PruneSettings {
        importance: Importance::parse(
            case["importance"].as_str().unwrap(),
            case["taylor"].as_str().unwrap_or("param_first"),
        )
        .unwrap(),
        reduction: Reduction::parse(case["reduction"].as_str().unwrap()).unwrap(),
        gqa: GqaMode::parse(case["gqa"].as_str().unwrap()).unwrap(),
        attn_layers: range(&case["attn_layers"]),
        mlp_layers: range(&case["mlp_layers"]),
        ratio: case["ratio"].as_f64().unwrap(),
        mode: RatioMode::Local,
        round_to: None,
        seed: 0,
    }
}

pub fn ids_of(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect()
}

pub fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// Compare scores and chosen units of one fixture case; returns the worst relative score error.
pub fn check_case(model: &Model, case: &Value, calib: &calibration::Calibration) -> f64 {
    let settings = settings_of(case);
    let label = format!("{} {} {} {}", case["importance"], case["taylor"], case["gqa"], case["reduction"]);
    let out = pare_prune::make_plan(model, &settings, Some(calib), &mut |_, _, _| {}).unwrap();
    let mut worst = 0.0f64;
    for (kind, ours) in [("attn", &out.scores.attn), ("mlp", &out.scores.mlp)] {
        let theirs = case["scores"][kind].as_object().unwrap();
        for (layer, want) in theirs {
            let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got = &ours[&layer.parse::<usize>().unwrap()];
            assert_eq!(got.len(), want.len(), "{label} {kind} layer {layer}");
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = (g - w).abs() / w.abs().max(g.abs()).max(1e-3 * scale).max(1e-30);
                assert!(err < 1e-4, "{label} {kind} layer {layer} unit {i}: pare {g} vs reference {w}");
                worst = worst.max(err);
            }
        }
    }
    let want_layers = case["layers"].as_array().unwrap();
    assert_eq!(out.plan.layers.len(), want_layers.len(), "{label}: pruned layers");
    for (lp, want) in out.plan.layers.iter().zip(want_layers) {
        let l = want["layer"].as_u64().unwrap() as usize;
        assert_eq!(lp.layer, l, "{label}");
        match (&lp.attn, want.get("kept_heads")) {
            (Some(a), Some(h)) => {
                assert_eq!(a.kept_heads, usizes(h), "{label} layer {l} heads");
                assert_eq!(a.kept_kv_heads, usizes(&want["kept_kv_heads"]), "{label} layer {l} KV heads");
            }
            (None, None) => {}
            (a, h) => {
                panic!("{label} layer {l}: attention pruned by pare {} / by the reference {}", a.is_some(), h.is_some())
            }
        }
        match (&lp.mlp, want.get("removed_channels")) {
            (Some(m), Some(r)) => {
                let width = model.blocks()[l].mlp.width();
                let removed: Vec<usize> = (0..width).filter(|c| !m.kept_channels.contains(c)).collect();
                assert_eq!(removed, usizes(r), "{label} layer {l} MLP channels");
            }
            (None, None) => {}
            (m, r) => {
                panic!("{label} layer {l}: MLP pruned by pare {} / by the reference {}", m.is_some(), r.is_some())
            }
        }
    }
    worst
}
