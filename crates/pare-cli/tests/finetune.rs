//! `pare finetune`: adapters HF peft loads (tools/reference/make_lora_fixtures.py --pare), exact
//! resumption, and one-line errors on bad settings and data.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{json, one_line_error, pare, repo};
use pare_model::WeightDType;
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = common::scratch("finetune", name);
    let _ = std::fs::remove_dir_all(&dir);
    let mut checkpoint = dir.clone().into_os_string();
    checkpoint.push(".checkpoint");
    let _ = std::fs::remove_dir_all(PathBuf::from(checkpoint));
    dir
}

fn load(path: &Path) -> pare_model::Model {
    pare_model::load(path.to_str().unwrap(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap().model
}

fn logits(model: &pare_model::Model, ids: &[u32]) -> Vec<Vec<f32>> {
    pare_test_support::logits_all(model, ids).unwrap().to_vec2::<f32>().unwrap()
}

/// The largest difference over the recorded positions and their first `columns` logits.
fn worst(got: &[Vec<f32>], want: &Value, columns: usize) -> f64 {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        let w = w.as_array().unwrap();
        assert_eq!(w.len(), columns);
        for (x, y) in g[..columns].iter().zip(w) {
            worst = worst.max((*x as f64 - y.as_f64().unwrap()).abs());
        }
    }
    worst
}

/// `pare finetune` on a dense Llama, a pruned Llama whose layers differ (transformers loads it
/// with modeling_pare.py) and GPT-NeoX: peft's `PeftModel.from_pretrained` loaded each adapter
/// and transformers each merged model, and gave the logits pare gives with `--adapter` and on
/// the merged directory.
#[test]
fn adapters_load_in_peft_and_merged_models_in_transformers_with_the_same_logits() {
    let fixture = pare_test_support::fixture("lora/pare_adapters.json");
    let ids: Vec<u32> = fixture["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let columns = fixture["columns"].as_u64().unwrap() as usize;
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let work = scratch(name);
        std::fs::create_dir_all(&work).unwrap();
        let mut base = repo().join(case["model"].as_str().unwrap());
        if let Some(prune) = case["prune"].as_array() {
            let pruned = work.join("pruned");
            let mut args = vec!["prune", "-m", base.to_str().unwrap()];
            args.extend(prune.iter().map(|f| f.as_str().unwrap()));
            args.extend(["--out", pruned.to_str().unwrap()]);
            assert!(pare(&args).status.success(), "{name}: prune");
            base = pruned;
        }
        let out = work.join("adapter");
        let mut args = vec!["finetune", "-m", base.to_str().unwrap()];
        args.extend(case["finetune"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()));
        args.extend(["--out", out.to_str().unwrap(), "--json"]);
        let report = json(&args);
        assert_eq!(report["adapter"]["targets"], case["targets"], "{name}");
        assert!((report["last_loss"].as_f64().unwrap() - case["last_loss"].as_f64().unwrap()).abs() < 1e-3, "{name}");
        for file in ["adapter_config.json", "adapter_model.safetensors", "training_log.json", "loss.svg"] {
            assert!(out.join(file).is_file(), "{name}: no {file}");
        }

        let mut model = load(&base);
        pare_finetune::peft::load(&out, &model).unwrap().attach(&mut model).unwrap();
        let adapted = logits(&model, &ids);
        let w = worst(&adapted, &case["peft_logits"], columns);
        assert!(w < 1e-4, "{name}: adapter-applied logits differ from peft's by {w}");
        let merged = logits(&load(&out.join("merged")), &ids);
        let w = worst(&merged, &case["merged_logits"], columns);
        assert!(w < 1e-4, "{name}: merged logits differ from transformers' by {w}");
        std::fs::remove_dir_all(&work).unwrap();
    }
}

const DATA: &str = "tests/fixtures/lora/ids.jsonl";
const TINY: &str = "tests/fixtures/llama-tiny/model";

fn finetune(out: &Path, extra: &[&str]) -> Value {
    finetune_model(TINY, out, extra)
}

fn finetune_model(model: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "finetune",
        "-m",
        model,
        "--data",
        DATA,
        "--batch-size",
        "3",
        "--micro-batch",
        "2",
        "--eval-examples",
        "2",
        "--warmup-steps",
        "1",
        "--lr",
        "0.01",
        "--lora-r",
        "4",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend(extra);
    json(&args)
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let store = pare_formats::SafetensorsStore::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    store
        .names()
        .into_iter()
        .map(|n| {
            let t = store.load(&n, DType::F32, &Device::Cpu).unwrap();
            (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// A run stopped after 2 of 4 steps and resumed from its checkpoint ends where the uninterrupted
/// run ends: the adapter, the optimizer's moments and the step order all carry over.
#[test]
fn a_resumed_run_ends_where_the_uninterrupted_one_does() {
    let whole = scratch("whole");
    let a = finetune(&whole, &["--steps", "4", "--checkpoint-every", "0"]);
    let first = scratch("first-half");
    finetune(&first, &["--steps", "2", "--checkpoint-every", "2"]);
    let mut checkpoint = first.clone().into_os_string();
    checkpoint.push(".checkpoint");
    let checkpoint = PathBuf::from(checkpoint);
    assert!(checkpoint.join("trainer_state.json").is_file());
    let resumed = scratch("resumed");
    let b = finetune(&resumed, &["--steps", "4", "--resume", checkpoint.to_str().unwrap()]);
    assert_eq!(a["last_loss"], b["last_loss"]);
    assert_eq!(adapter_tensors(&whole), adapter_tensors(&resumed));
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("training_log.json")).unwrap()).unwrap();
    assert_eq!(log.as_array().unwrap().len(), 4);

    // A checkpoint of another model is refused in one line.
    one_line_error(
        &[
            "finetune",
            "-m",
            "tests/fixtures/mistral-tiny/model",
            "--data",
            DATA,
            "--out",
            "/tmp/pare-never",
            "--lora-r",
            "4",
            "--eval-examples",
            "2",
            "--resume",
            checkpoint.to_str().unwrap(),
        ],
        "was trained on another model",
    );
    for dir in [whole, first, resumed, checkpoint] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn bad_settings_and_data_are_one_line_errors() {
    let out = "/tmp/pare-finetune-never";
    let base = ["finetune", "-m", TINY, "--data", DATA, "--out", out];
    let with =
        |extra: &[&'static str]| -> Vec<&'static str> { base.iter().copied().chain(extra.iter().copied()).collect() };
    one_line_error(&with(&["--lora-r", "0"]), "--lora-r must be at least 1");
    one_line_error(&with(&["--lora-alpha", "0"]), "--lora-alpha must be positive");
    one_line_error(&with(&["--lora-dropout", "1"]), "--lora-dropout must be in [0, 1)");
    one_line_error(&with(&["--lora-targets", "q,wq"]), "unknown LoRA target \"wq\"");
    one_line_error(&with(&["--gguf"]), "add --merge");
    one_line_error(
        &["finetune", "-m", "tests/fixtures/gptneox-tiny/model", "--data", DATA, "--out", out, "--lora-targets", "q"],
        "fuses q, k and v into one query_key_value module",
    );
    one_line_error(&["finetune", "-m", TINY, "--data", DATA, "--out", out, "--eval-examples", "12"], "--eval-examples");
    one_line_error(&with(&["--loss-plot", "loss.jpg"]), "--loss-plot loss.jpg: not a plot format");
    one_line_error(&with(&["--loss-plot", "plots/loss.png"]), "a file name inside --out, not a path");

    let dir = scratch("bad-data");
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("empty.jsonl", "", "no records"),
        ("malformed.jsonl", "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2\n", "malformed.jsonl:2: not JSON"),
        (
            "wrong.jsonl",
            "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": \"abc\"}\n",
            "wrong.jsonl:3: \"input_ids\" must be",
        ),
        ("labels.jsonl", "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 7, 3]}\n", "labels[1] is 7"),
        ("text.jsonl", "{\"text\": \"hello\"}\n", "need the model's tokenizer"),
        ("unknown.jsonl", "{\"question\": \"hello\"}\n", "unknown.jsonl:1:"),
        ("masked.jsonl", "{\"input_ids\": [1, 2], \"labels\": [-100, -100]}\n", "none of its 1 records"),
    ];
    for (file, text, needle) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        one_line_error(&["finetune", "-m", TINY, "--data", path.to_str().unwrap(), "--out", out], needle);
    }
    one_line_error(&["finetune", "-m", TINY, "--data", "/nonexistent/data.jsonl", "--out", out], "data.jsonl");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!Path::new(out).exists(), "a failed run left {out}");
}

/// `--adapter` reaches the commands that load a model; an adapter made for another model is a
/// one-line error there.
#[test]
fn generate_applies_an_adapter_and_refuses_one_for_another_model() {
    const NEOX: &str = "tests/fixtures/gptneox-tiny/model";
    let out = scratch("for-generate");
    finetune_model(NEOX, &out, &["--steps", "1"]);
    let adapter = out.to_str().unwrap();
    let args = ["generate", "-m", NEOX, "--prompt", "Hello", "--max-new-tokens", "4", "--json"];
    let plain = json(&args);
    let adapted = json(&[&args[..], &["--adapter", adapter]].concat());
    assert!(adapted["text"].is_string() && plain["text"].is_string());
    let llama = scratch("llama-adapter");
    finetune(&llama, &["--steps", "1", "--loss-plot", "loss.png"]);
    assert!(std::fs::read(llama.join("loss.png")).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(!llama.join("loss.svg").exists());
    one_line_error(&[&args[..5], &["--adapter", llama.to_str().unwrap()]].concat(), "--adapter");
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(&llama).unwrap();
}
