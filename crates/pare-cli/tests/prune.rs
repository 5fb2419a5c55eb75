//! `pare prune` end to end on the tiny GQA Llama (8 heads, 2 KV heads, 4 layers): export, inspect,
//! re-apply the plan, GGUF, and one-line errors for settings that cannot be carried out.

mod common;

use std::path::PathBuf;

use common::{json, one_line_error, repo};

const TINY: &str = "tests/fixtures/prune/llama-gqa-tiny/model";

/// Logits of a fixed token sequence at every position (the tiny model has no tokenizer).
fn logits(model: &str) -> Vec<f32> {
    let loaded = pare_model::load(
        &repo().join(model).display().to_string(),
        pare_model::WeightDType::Float(candle_core::DType::F32),
        &candle_core::Device::Cpu,
    )
    .expect("load the pruned model");
    let logits = pare_test_support::logits_all(&loaded.model, &[5, 17, 42, 99, 3, 250, 7]).expect("forward");
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn uniform_pruning_exports_a_directory_a_plan_and_a_gguf_that_agree() {
    let out = scratch("uniform");
    let dir = out.to_str().unwrap();
    let r = json(&[
        "prune",
        "-m",
        TINY,
        "--importance",
        "l2",
        "--gqa",
        "query-heads",
        "--ratio",
        "0.5",
        "--attn-layers",
        "0..4",
        "--mlp-layers",
        "0..4",
        "--out",
        dir,
        "--gguf",
        "--gguf-dtype",
        "f32",
        "--json",
    ]);
    // Half the query heads of each KV group and half the MLP channels of every layer.
    for l in r["layers"].as_array().unwrap() {
        assert_eq!(
            (l["after"]["heads"].as_u64(), l["after"]["kv_heads"].as_u64(), l["after"]["mlp_width"].as_u64()),
            (Some(4), Some(2), Some(64))
        );
    }
    let (before, after) =
        (r["parameters"]["before"]["total"].as_u64().unwrap(), r["parameters"]["after"]["total"].as_u64().unwrap());
    // Per layer: q and o lose 4 heads × 8 × 64 each, the MLP 64 channels × 3 × 64.
    assert_eq!(before - after, 4 * (2 * 4 * 8 * 64 + 3 * 64 * 64));
    assert_eq!(r["export"]["hf_loadable"], true);

    let inspected = json(&["inspect", "-m", dir, "--json"]);
    assert_eq!(inspected["parameters"]["total"].as_u64(), Some(after));

    // The HF directory and the f32 GGUF are the same model.
    let gguf = out.join("model.gguf");
    let (a, b) = (logits(dir), logits(gguf.to_str().unwrap()));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{a:?} vs {b:?}");

    // Re-applying the plan to the original reproduces the pruned model.
    let again = scratch("replay");
    let plan = out.join("pruning_plan.json");
    json(&["prune", "-m", TINY, "--plan", plan.to_str().unwrap(), "--out", again.to_str().unwrap(), "--json"]);
    assert_eq!(logits(again.to_str().unwrap()), a);
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&again).unwrap();
}

#[test]
fn layers_of_different_widths_load_in_pare_and_say_why_hf_cannot() {
    let out = scratch("partial");
    let dir = out.to_str().unwrap();
    let r = json(&[
        "prune",
        "-m",
        TINY,
        "--importance",
        "l1",
        "--ratio",
        "0.5",
        "--attn-layers",
        "1..3",
        "--mlp-layers",
        "2..4",
        "--out",
        dir,
        "--json",
    ]);
    assert_eq!(r["export"]["hf_loadable"], false);
    assert!(r["export"]["hf_note"].as_str().unwrap().contains("per-layer shapes"));
    let inspected = json(&["inspect", "-m", dir, "--json"]);
    assert_eq!(inspected["parameters"]["total"], r["parameters"]["after"]["total"]);
    assert_eq!(logits(dir).len(), 7 * 256);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn impossible_settings_are_one_line_errors() {
    one_line_error(&["prune", "-m", TINY, "--importance", "l2", "--ratio", "1.0", "--attn-layers", "0..4"], "every");
    one_line_error(&["prune", "-m", TINY, "--importance", "l2", "--attn-layers", "2..9"], "layer");
    one_line_error(&["prune", "-m", TINY, "--importance", "l2", "--mlp-layers", "3..1"], "start is after end");
    one_line_error(&["prune", "-m", TINY, "--importance", "l2", "--round-to", "4096"], "round");
    one_line_error(&["prune", "-m", TINY, "--importance", "magnitude"], "magnitude");
    one_line_error(&["prune", "-m", TINY, "--importance", "l2", "--ratio", "1.5"], "--ratio");
    one_line_error(&["prune", "-m", TINY, "--plan", "no/such/plan.json"], "no/such/plan.json");
    one_line_error(&["prune", "-m", TINY, "--gguf"], "--out");
}

#[test]
fn calibration_text_shorter_than_asked_is_a_one_line_error() {
    let short = std::env::temp_dir().join(format!("pare-prune-short-{}.txt", std::process::id()));
    std::fs::write(&short, "Only a few words of calibration text.").unwrap();
    one_line_error(
        &[
            "prune",
            "-m",
            "assets/SmolLM2-135M-Instruct.Q4_1.gguf",
            "--importance",
            "taylor",
            "--calib-text",
            short.to_str().unwrap(),
        ],
        "fewer than the 10 × 64",
    );
    std::fs::remove_file(&short).unwrap();
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("prune", name)
}
