//! pare's pruning against the LLM-Pruner-equivalent torch reference (tools/reference/
//! make_prune_fixtures.py) on a tiny random Llama with 8 query heads over 2 KV heads: the same
//! unit scores within 1e-4 relative and the same chosen heads and channels, for every importance,
//! both GQA modes and every reduction; and the HF-exported uniform model gives the logits
//! transformers gave.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use common::*;
use pare_model::{Model, WeightDType};
use pare_prune::calibration;
use pare_prune::plan::PruningPlan;
use pare_prune::{Importance, RatioMode};
use serde_json::Value;

#[test]
fn tiny_gqa_scores_and_choices_match_the_reference() {
    let fx = load_json("tiny.json");
    let model = load_model(&fixtures().join("llama-gqa-tiny/model"));
    assert_eq!((model.blocks()[0].attn.num_heads(), model.blocks()[0].attn.num_kv_heads()), (8, 2));
    let ids: Vec<u32> = ids_of(&fx["calibration_ids"]).concat();
    let calib = calibration::from_tokens(&ids, 4, 16, "fixture").unwrap();
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    for case in fx["cases"].as_array().unwrap() {
        let err = check_case(&model, case, &calib);
        let key = format!("{}/{}", case["importance"].as_str().unwrap(), case["taylor"].as_str().unwrap_or("-"));
        let e = worst.entry(key).or_default();
        *e = e.max(err);
    }
    assert_eq!(fx["cases"].as_array().unwrap().len(), 18);
    eprintln!("worst relative score error per method: {worst:?}");
}

#[test]
fn tiny_uniform_export_gives_the_transformers_logits() {
    let fx = load_json("tiny.json");
    let exp = &fx["export"];
    let model = load_model(&fixtures().join("llama-gqa-tiny/model"));
    let mut settings = settings_of(&exp["config"]);
    settings.importance = Importance::L2;
    let out = pare_prune::make_plan(&model, &settings, None, &mut |_, _, _| {}).unwrap();
    let pruned = pare_prune::apply(&model, &out.plan).unwrap();
    assert_eq!(pruned.config().layer_shapes, None, "every layer pruned alike");
    let dir = tempfile::tempdir().unwrap();
    pare_model::export::export_hf_dir(&pruned, None, &[2], dir.path()).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["intermediate_size"], 64);
    assert_eq!(config["head_dim"], 8);
    assert!(config.get("num_attention_heads_per_layer").is_none());

    let ids: Vec<u32> = usizes(&exp["ids"]).into_iter().map(|i| i as u32).collect();
    let want: Vec<Vec<f64>> = exp["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
        .collect();
    let check = |m: &Model, what: &str| {
        let got = pare_test_support::logits_all(m, &ids).unwrap().to_vec2::<f32>().unwrap();
        let worst =
            got.iter().flatten().zip(want.iter().flatten()).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4, "{what}: max |Δlogit| {worst}");
    };
    check(&pruned, "pruned in memory");
    let reloaded = load_model(dir.path());
    check(&reloaded, "HF directory reloaded");

    // GGUF (F32): pare reads it back with the same logits as the directory.
    let gguf = dir.path().join("model.gguf");
    pare_model::export::export_gguf(&pruned, &[], pare_formats::GgmlType::F32, &gguf).unwrap();
    check(&load_model(&gguf), "GGUF reloaded");

    // The plan written beside it re-applies to the original model.
    let plan = PruningPlan::from_json(&out.plan.to_json(), "plan").unwrap();
    check(&pare_prune::apply(&model, &plan).unwrap(), "plan re-applied");
}

#[test]
fn non_uniform_shapes_round_trip_through_config_json_and_gguf_arrays() {
    let model = load_model(&fixtures().join("llama-gqa-tiny/model"));
    let mut settings = settings_of(&serde_json::json!({
        "importance": "l1", "taylor": null, "reduction": "sum", "gqa": "kv-groups", "ratio": 0.5,
        "attn_layers": [1, 3], "mlp_layers": [2, 4]
    }));
    settings.mode = RatioMode::Local;
    let out = pare_prune::make_plan(&model, &settings, None, &mut |_, _, _| {}).unwrap();
    let pruned = pare_prune::apply(&model, &out.plan).unwrap();
    let shapes = pruned.config().layer_shapes.clone().expect("non-uniform");
    assert_eq!(shapes.num_heads, vec![8, 4, 4, 8]);
    assert_eq!(shapes.num_kv_heads, vec![2, 1, 1, 2]);
    assert_eq!(shapes.intermediate_size, vec![128, 128, 64, 64]);
    let ids = [5u32, 9, 200, 17, 3, 88, 41];
    let want = pare_test_support::logits_all(&pruned, &ids).unwrap().to_vec2::<f32>().unwrap();

    let dir = tempfile::tempdir().unwrap();
    pare_model::export::export_hf_dir(&pruned, None, &[2], dir.path()).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_attention_heads_per_layer"], serde_json::json!([8, 4, 4, 8]));
    assert_eq!(config["intermediate_size_per_layer"], serde_json::json!([128, 128, 64, 64]));
    let reloaded = load_model(dir.path());
    assert_eq!(reloaded.config().layer_shapes, Some(shapes.clone()));
    assert_eq!(pare_test_support::logits_all(&reloaded, &ids).unwrap().to_vec2::<f32>().unwrap(), want);

    // A config that states other shapes than the weights is refused.
    let mut wrong = config.clone();
    wrong["num_attention_heads_per_layer"] = serde_json::json!([8, 8, 4, 8]);
    std::fs::write(dir.path().join("config.json"), wrong.to_string()).unwrap();
    let err = pare_model::load(dir.path().to_str().unwrap(), WeightDType::Float(DType::F32), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("layer 1"), "{err}");

    let gguf = dir.path().join("model.gguf");
    pare_model::export::export_gguf(&pruned, &[], pare_formats::GgmlType::F32, &gguf).unwrap();
    let file = pare_formats::GgufFile::open(&gguf).unwrap();
    assert_eq!(file.architecture().unwrap(), "deci", "llama.cpp's llama reads one shape for all layers");
    let heads: Vec<u64> =
        file.get_array("deci.attention.head_count").unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(heads, vec![8, 4, 4, 8]);
    let from_gguf = load_model(&gguf);
    assert_eq!(from_gguf.config().layer_shapes, Some(shapes));
    let got = pare_test_support::logits_all(&from_gguf, &ids).unwrap().to_vec2::<f32>().unwrap();
    let worst = got.iter().flatten().zip(want.iter().flatten()).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "GGUF logits differ by {worst}");
}

/// Qwen2 layers of different shapes go to GGUF as llama.cpp's deci (q/k permuted as for llama,
/// q/k/v biases kept), and pare reads that file back with the same logits.
#[test]
fn qwen2_layers_of_different_shapes_round_trip_through_a_deci_gguf() {
    let model = load_model(&fixtures().join("../qwen2-tiny/model"));
    let mut settings = settings_of(&serde_json::json!({
        "importance": "l1", "taylor": null, "reduction": "sum", "gqa": "kv-groups", "ratio": 0.5,
        "attn_layers": [1, 2], "mlp_layers": [0, 1]
    }));
    settings.mode = RatioMode::Local;
    let out = pare_prune::make_plan(&model, &settings, None, &mut |_, _, _| {}).unwrap();
    let pruned = pare_prune::apply(&model, &out.plan).unwrap();
    assert!(pruned.config().layer_shapes.is_some());
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    pare_model::export::export_gguf(&pruned, &[], pare_formats::GgmlType::F32, &gguf).unwrap();
    let file = pare_formats::GgufFile::open(&gguf).unwrap();
    assert_eq!(file.architecture().unwrap(), "deci");
    assert!(file.tensor_info("blk.1.attn_q.bias").is_some());
    let ids = [5u32, 9, 200, 17, 3, 88, 41];
    let want = pare_test_support::logits_all(&pruned, &ids).unwrap();
    let got = pare_test_support::logits_all(&load_model(&gguf), &ids).unwrap();
    let worst = pare_test_support::max_abs_diff(&got, &want);
    assert!(worst < 1e-4, "deci GGUF logits differ by {worst}");
}
