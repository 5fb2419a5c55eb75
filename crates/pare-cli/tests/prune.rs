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
    assert_eq!(r["export"]["trust_remote_code"], false);
    assert_eq!(r["export"]["gguf_arch"], "llama");

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

/// Shapes transformers' own classes cannot hold (layers that differ, pruned heads that do not
/// divide hidden_size): the export carries modeling_pare.py, and transformers, loading it with
/// trust_remote_code=True, gave the logits pare gives (tools/reference/make_export_fixtures.py).
#[test]
fn exports_transformers_cannot_hold_natively_load_with_remote_code_and_give_its_logits() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/exports/remote_code.json")).unwrap())
            .unwrap();
    let columns = fixture["columns"].as_u64().unwrap() as usize;
    let ids: Vec<u32> = fixture["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let out = scratch(name);
        let dir = out.to_str().unwrap();
        let mut args = vec!["prune", "-m", case["model"].as_str().unwrap()];
        args.extend(case["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()));
        args.extend(["--out", dir, "--json"]);
        let r = json(&args);
        assert_eq!(r["export"]["trust_remote_code"], true, "{name}");
        assert!(out.join("modeling_pare.py").is_file(), "{name}: no modeling_pare.py");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let class = case["transformers_class"].as_str().unwrap();
        assert_eq!(config["auto_map"]["AutoModelForCausalLM"], format!("modeling_pare.{class}"), "{name}");
        assert!(config["model_type"].as_str().unwrap().starts_with("pare_"), "{name}");
        for (i, layer) in case["layers"].as_array().unwrap().iter().enumerate() {
            let after = &r["layers"][i]["after"];
            assert_eq!((&after["heads"], &after["mlp_width"]), (&layer["heads"], &layer["mlp_width"]), "{name} {i}");
        }

        let loaded =
            pare_model::load(dir, pare_model::WeightDType::Float(candle_core::DType::F32), &candle_core::Device::Cpu)
                .unwrap();
        let got = pare_test_support::logits_all(&loaded.model, &ids).unwrap().to_vec2::<f32>().unwrap();
        let want = case["logits"].as_array().unwrap();
        let mut worst = 0f64;
        for (pos, (g, w)) in got.iter().zip(want).enumerate() {
            for (x, y) in g[..columns].iter().zip(w.as_array().unwrap()) {
                worst = worst.max((*x as f64 - y.as_f64().unwrap()).abs());
            }
            let argmax = g.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(argmax as u64, case["argmax"][pos].as_u64().unwrap(), "{name}: argmax at {pos}");
        }
        assert!(worst < 1e-4, "{name}: max |Δlogit| {worst} against transformers");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn gpt_neox_layers_llama_cpp_cannot_hold_refuse_gguf_before_writing() {
    let out = scratch("neox-gguf");
    let dir = out.to_str().unwrap();
    let neox = "tests/fixtures/gptneox-tiny/model";
    let args = ["prune", "-m", neox, "--importance", "l1", "--attn-layers", "1..2", "--mlp-layers", "0..1"];
    one_line_error(&[&args[..], &["--out", dir, "--gguf"]].concat(), "no llama.cpp architecture");
    assert!(!out.exists(), "nothing is written");
}

/// A GGUF element's text as the fixture's Python `str` gives it.
fn element_text(v: &pare_formats::GgufValue) -> String {
    match v {
        pare_formats::GgufValue::Str(s) => s.clone(),
        other => other.as_i64().map(|i| i.to_string()).unwrap_or_else(|| panic!("unexpected element {other:?}")),
    }
}

/// A tokenizer key as the fixture records it: scalars as JSON, arrays by length and the SHA-256
/// of each element's text, an 8-byte little-endian length first.
fn fingerprint(v: &pare_formats::GgufValue) -> serde_json::Value {
    use sha2::Digest;
    match v {
        pare_formats::GgufValue::Array(items) => {
            let mut h = sha2::Sha256::new();
            for item in items {
                let text = element_text(item);
                h.update((text.len() as u64).to_le_bytes());
                h.update(text.as_bytes());
            }
            let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({"len": items.len(), "sha256": hex})
        }
        pare_formats::GgufValue::Bool(b) => (*b).into(),
        pare_formats::GgufValue::Str(s) => s.as_str().into(),
        other => other.as_i64().expect("an integer key").into(),
    }
}

/// From an HF checkpoint (safetensors and tokenizer.json), layers pruned alike: the GGUF carries
/// the tokenizer.* keys llama.cpp's convert_hf_to_gguf.py writes for the export (each equal to
/// the fixture's), and pare's perplexity on it, by llama-perplexity's protocol, is within 1 % of
/// llama-perplexity's (tests/fixtures/llama-cpp-ppl/, tools/reference/make_llama_cpp_fixtures.sh):
/// GPT-NeoX (llama.cpp's gptneox) and SmolLM2 first exported by pare as an HF Llama directory.
#[test]
fn uniform_gguf_from_hf_carries_llama_cpps_tokenizer_and_perplexity() {
    for (name, arch) in [("gptneox-pruned-uniform", "gptneox"), ("smollm2-hf-pruned-uniform", "llama")] {
        check_gguf_from_hf(name, arch);
    }
}

fn check_gguf_from_hf(name: &str, arch: &str) {
    let fixture = pare_test_support::fixture(&format!("llama-cpp-ppl/{name}.json"));
    let (src, out) = (scratch(&format!("{name}-src")), scratch(name));
    let (src_dir, dir) = (src.to_str().unwrap(), out.to_str().unwrap());
    // SRC in the commands: the HF directory the source export writes.
    let words = |key: &str| -> Vec<String> {
        fixture[key].as_str().unwrap().split_whitespace().map(|w| if w == "SRC" { src_dir } else { w }.into()).collect()
    };
    if fixture.get("source_export").is_some() {
        let mut args = words("source_export");
        args.push("--json".into());
        json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let mut args = words("prune");
    args.extend(["--out", dir, "--json"].map(String::from));
    let r = json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r["export"]["gguf_arch"], arch, "{name}");
    assert!(r["export"]["gguf_note"].is_null(), "{name}: {}", r["export"]);

    let gguf = out.join("model.gguf");
    let f = pare_formats::GgufFile::open(&gguf).unwrap();
    let ours: serde_json::Map<String, serde_json::Value> = f
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), fingerprint(v)))
        .collect();
    let want = fixture["tokenizer_keys"].as_object().unwrap();
    let keys =
        |m: &serde_json::Map<String, serde_json::Value>| m.keys().cloned().collect::<std::collections::BTreeSet<_>>();
    assert_eq!(keys(&ours), keys(want), "{name}");
    for (key, value) in want {
        assert_eq!(&ours[key], value, "{name}: {key}");
    }

    let text = out.join("text.txt");
    std::fs::write(&text, pare_test_support::llama_cpp_fixture_text(&fixture)).unwrap();
    let n_ctx = fixture["n_ctx"].to_string();
    let (gguf, text) = (gguf.to_str().unwrap(), text.to_str().unwrap());
    let ppl = json(&[
        "eval",
        "ppl",
        "-m",
        gguf,
        "--text",
        text,
        "--ctx",
        &n_ctx,
        "--llama-cpp",
        "--kv-dtype",
        "f16",
        "--json",
    ]);
    let (ours, theirs) = (ppl["ppl"].as_f64().unwrap(), fixture["ppl"].as_f64().unwrap());
    assert!((ours / theirs - 1.0).abs() < 0.01, "{name}: pare {ours} vs llama-perplexity {theirs}");
    std::fs::remove_dir_all(&out).unwrap();
    if src.exists() {
        std::fs::remove_dir_all(&src).unwrap();
    }
}

/// A tokenizer llama.cpp's converter would not name stops `--gguf` before the work, as the
/// converter stops; nothing is written.
#[test]
fn gguf_refuses_a_tokenizer_llama_cpp_does_not_recognise_before_writing() {
    let src = repo().join("tests/fixtures/gptneox-tiny/model");
    let model = scratch("neox-other-split");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let tokenizer = model.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tokenizer).unwrap()).unwrap();
    t["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    std::fs::write(&tokenizer, t.to_string()).unwrap();
    let out = scratch("neox-other-split-out");
    let (m, dir) = (model.to_str().unwrap(), out.to_str().unwrap());
    let args = ["prune", "-m", m, "--importance", "l1", "--attn-layers", "0..0", "--mlp-layers", "0..2"];
    one_line_error(&[&args[..], &["--out", dir, "--gguf"]].concat(), "does not recognise");
    assert!(!out.exists(), "nothing is written");
    std::fs::remove_dir_all(&model).unwrap();
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
