//! `pare flops`: the seed example from a config alone, the measured cache against the theory on
//! the tiny LLaVA, and one-line errors for bad input.

mod common;

use std::path::PathBuf;

use common::{json, one_line_error, pare};

/// llava-hf/llava-1.5-7b-hf's config.json alone: `pare flops` reads no weights.
fn llava_7b_config() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pare-flops-llava7b-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000, "model_type": "llava",
            "pad_token_id": 32001, "projector_hidden_act": "gelu",
            "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama",
              "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
            "tie_word_embeddings": false, "torch_dtype": "float16",
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}"#,
    )
    .unwrap();
    dir
}

#[test]
fn seed_example_on_llava_1_5_7b_from_its_config() {
    let dir = llava_7b_config();
    let m = dir.to_str().unwrap();
    let r = json(&[
        "flops",
        "-m",
        m,
        "--prompt-len",
        "100",
        "--gen-len",
        "1",
        "--prune-tokens",
        "10:276",
        "--prune-span",
        "image",
        "--formula",
        "attention",
        "--json",
    ]);
    // A LLaVA model brings its 576 image tokens and the vision tower's FLOPs.
    assert_eq!(r["scenario"]["image_tokens"], 576);
    assert!(r["run"]["prefill"]["vision"].as_u64().unwrap() > 0);
    let runs = r["tokens_per_layer"].as_array().unwrap();
    assert_eq!((runs[0]["last_layer"].as_u64(), runs[0]["tokens"].as_u64()), (Some(9), Some(676)));
    assert_eq!((runs[1]["first_layer"].as_u64(), runs[1]["tokens"].as_u64()), (Some(10), Some(376)));
    // Seed 000's function gives 47.5 % (its text's "~38 %" does not follow from it).
    let seed = r["formula"]["reduction"].as_f64().unwrap();
    assert!((seed - 0.4748).abs() < 1e-4, "{seed}");
    // The exact count, projections and MLPs included, saves far less.
    let exact = r["reduction"]["prefill"].as_f64().unwrap();
    assert!((0.25..0.32).contains(&exact), "{exact}");
    // Layers 10.. cache only the 376 kept tokens: K and V × 32 heads × 128 × 4 B (f32 on cpu).
    let kv = r["run"]["kv_bytes_after_prefill"].as_u64().unwrap();
    assert_eq!(kv, 2 * 32 * 128 * 4 * (10 * 676 + 22 * 376));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn measured_cache_bytes_equal_the_theory_on_tiny_llava() {
    let r = json(&[
        "flops",
        "-m",
        "tests/fixtures/llava-tiny/model",
        "--prompt-len",
        "7",
        "--gen-len",
        "4",
        "--prune-tokens",
        "1:4",
        "--prune-span",
        "image",
        "--measure",
        "--repeats",
        "1",
        "--json",
    ]);
    let m = &r["measured"];
    assert_eq!(m["pruned"]["kv_bytes_after_prefill"], r["run"]["kv_bytes_after_prefill"]);
    assert_eq!(m["pruned"]["kv_bytes_final"], r["run"]["kv_bytes_final"]);
    assert_eq!(m["baseline"]["kv_bytes_after_prefill"], r["baseline"]["kv_bytes_after_prefill"]);
    assert_eq!(m["baseline"]["kv_bytes_final"], r["baseline"]["kv_bytes_final"]);
    // Layer 1 keeps 4 of the 16 image tokens: 23 → 11 entries (2 KV heads × 16 × 2 × 4 B each).
    assert_eq!(r["run"]["kv_bytes_after_prefill"], 2 * 16 * 2 * 4 * (23 + 11));
    assert!(m["pruned"]["prefill_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn measured_cache_bytes_equal_the_theory_with_a_press() {
    let r = json(&[
        "flops",
        "-m",
        "tests/fixtures/llama-tiny/model",
        "--prompt-len",
        "64",
        "--gen-len",
        "5",
        "--press",
        "knorm",
        "--ratio",
        "0.5",
        "--measure",
        "--repeats",
        "1",
        "--json",
    ]);
    assert_eq!(r["measured"]["pruned"]["kv_bytes_after_prefill"], r["run"]["kv_bytes_after_prefill"]);
    assert_eq!(r["measured"]["pruned"]["kv_bytes_final"], r["run"]["kv_bytes_final"]);
    assert_eq!(r["reduction"]["kv_after_prefill"].as_f64(), Some(0.5));
}

#[test]
fn text_report_names_components_and_savings() {
    let out = pare(&[
        "flops",
        "-m",
        "tests/fixtures/llama-tiny/model",
        "--prompt-len",
        "50",
        "--gen-len",
        "3",
        "--prune-tokens",
        "1:0.5",
        "--formula",
        "lecture",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in ["projections", "attention", "mlp", "lm_head", "saved", "KV", "formula lecture"] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn bad_input_is_one_line() {
    let m = "tests/fixtures/llama-tiny/model";
    one_line_error(
        &["flops", "-m", m, "--prompt-len", "10", "--gen-len", "1", "--formula", "cubic"],
        "unknown --formula",
    );
    one_line_error(
        &["flops", "-m", m, "--prompt-len", "100", "--gen-len", "1", "--prune-tokens", "1:500"],
        "more than the 92",
    );
    one_line_error(
        &["flops", "-m", m, "--prompt-len", "100", "--gen-len", "1", "--prune-tokens", "5:0.5"],
        "beyond the model's 2 layers",
    );
    one_line_error(
        &[
            "flops",
            "-m",
            m,
            "--prompt-len",
            "100",
            "--gen-len",
            "1",
            "--prune-tokens",
            "1:0.5",
            "--prune-span",
            "image",
        ],
        "no image tokens",
    );
    one_line_error(&["flops", "-m", m, "--prompt-len", "0", "--gen-len", "1"], "at least one token");
    one_line_error(&["flops", "-m", m, "--prompt-len", "10", "--gen-len", "1", "--press", "nope"], "unknown press");
    one_line_error(
        &[
            "flops",
            "-m",
            "tests/fixtures/llava-tiny/model",
            "--prompt-len",
            "5",
            "--gen-len",
            "1",
            "--image-tokens",
            "20",
        ],
        "whole number of images",
    );
}
