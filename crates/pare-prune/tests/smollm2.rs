//! SmolLM2-135M against the LLM-Pruner-equivalent torch reference: the seed's configuration
//! (Taylor param_first, sum, layers 3..30, ratio 0.25, 10 × 64 calibration tokens) gives the
//! same scores and the same pruned channels; the uniformly pruned model runs, and its HF and
//! GGUF exports reload with the logits and perplexity transformers gave for the same pruning.

mod common;

use candle_core::{DType, Device, D};
use common::*;
use pare_model::{Model, WeightDType};
use pare_prune::calibration;
use serde_json::Value;

fn smollm2() -> pare_model::LoadedModel {
    pare_model::load("smollm2-135m", WeightDType::Float(DType::F32), &Device::Cpu)
        .expect("run `make assets` for SmolLM2")
}

fn calibration_from_c4(loaded: &pare_model::LoadedModel, fx: &Value) -> calibration::Calibration {
    let path = pare_model::loader::assets_dir().join("texts/c4.utf8");
    let text = std::fs::read_to_string(&path).unwrap();
    let calib = calibration::from_text(loaded.tokenizer().unwrap(), &text, 10, 64, "c4").unwrap();
    // pare's tokenizer cuts the same samples as transformers'.
    assert_eq!(calib.ids, ids_of(&fx["calibration_ids"]));
    calib
}

#[test]
fn seed_configuration_matches_the_reference() {
    let fx = load_json("smollm2.json");
    let loaded = smollm2();
    let calib = calibration_from_c4(&loaded, &fx);
    for case in fx["cases"].as_array().unwrap() {
        let worst = check_case(&loaded.model, case, &calib);
        eprintln!("{} {} {}: worst relative score error {worst:.2e}", case["importance"], case["taylor"], case["gqa"]);
    }
}

fn top20(logprobs: &[f32]) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = logprobs.iter().enumerate().map(|(i, &p)| (i as u32, p)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(20);
    v
}

fn check_logprobs(model: &Model, exp: &Value, what: &str) {
    let ids: Vec<u32> = usizes(&exp["ids"]).into_iter().map(|i| i as u32).collect();
    let lp = candle_nn::ops::log_softmax(&pare_test_support::logits_all(model, &ids).unwrap(), D::Minus1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want = exp["last_positions_top20"].as_array().unwrap();
    for (row, want_row) in lp[lp.len() - want.len()..].iter().zip(want) {
        let got = top20(row);
        for (k, w) in want_row.as_array().unwrap().iter().enumerate() {
            let (id, p) = (w["id"].as_u64().unwrap() as u32, w["logprob"].as_f64().unwrap());
            assert!(
                (row[id as usize] as f64 - p).abs() < 2e-4,
                "{what}: logprob of {id} is {} vs {p}",
                row[id as usize]
            );
            if k < 5 {
                assert_eq!(got[k].0, id, "{what}: rank {k}");
            }
        }
    }
}

#[test]
fn uniform_pruning_exports_and_matches_transformers() {
    let fx = load_json("smollm2.json");
    let exp = &fx["export"];
    let loaded = smollm2();
    let settings = settings_of(&exp["config"]);
    let out = pare_prune::make_plan(&loaded.model, &settings, None, &mut |_, _, _| {}).unwrap();
    let pruned = pare_prune::apply(&loaded.model, &out.plan).unwrap();
    let b = &pruned.blocks()[10];
    assert_eq!((b.attn.num_heads(), b.attn.num_kv_heads(), b.mlp.width()), (6, 3, 1536 - 523));
    assert_eq!(pruned.config().layer_shapes, None);
    check_logprobs(&pruned, exp, "pruned in memory");

    let dir = tempfile::tempdir().unwrap();
    pare_model::export::export_hf_dir(&pruned, loaded.tokenizer.as_ref(), &loaded.eos_token_ids(), dir.path()).unwrap();
    let reloaded =
        pare_model::load(dir.path().to_str().unwrap(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap();
    check_logprobs(&reloaded.model, exp, "HF directory");

    // Perplexity with the fixed protocol (ctx 512, non-overlapping windows) on wiki.utf8.
    let ppl = &exp["ppl"];
    let text = std::fs::read_to_string(pare_model::loader::assets_dir().join("texts/wiki.utf8")).unwrap();
    let mut tokens = reloaded.tokenizer().unwrap().encode(&text, true).unwrap();
    tokens.truncate(ppl["tokens"].as_u64().unwrap() as usize);
    let got = pare_eval::perplexity(&reloaded.model, &tokens, 512, 512, |_, _| {}).unwrap().ppl;
    let want = ppl["ppl"].as_f64().unwrap();
    assert!((got - want).abs() / want < 1e-4, "ppl {got} vs transformers {want}");

    // GGUF, tokenizer keys copied from the source: pare loads it with the directory's logits.
    let src = pare_formats::GgufFile::open(&loaded.path).unwrap();
    let keys: Vec<_> =
        src.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let gguf = dir.path().join("model.gguf");
    pare_model::export::export_gguf(&pruned, &keys, pare_formats::GgmlType::F32, &gguf).unwrap();
    let from_gguf = pare_model::load(gguf.to_str().unwrap(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap();
    let probe: Vec<u32> =
        from_gguf.tokenizer().unwrap().encode("Structured pruning removes whole heads.", true).unwrap();
    assert_eq!(probe, reloaded.tokenizer().unwrap().encode("Structured pruning removes whole heads.", true).unwrap());
    let (a, b) = (
        pare_test_support::logits_all(&from_gguf.model, &probe).unwrap(),
        pare_test_support::logits_all(&reloaded.model, &probe).unwrap(),
    );
    let worst = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(worst < 1e-3, "GGUF vs HF directory: max |Δlogit| {worst}");
}

/// The seed setting leaves layers 0–2 wider than the rest; its F16 GGUF declares llama.cpp's deci
/// architecture, and pare's perplexity on it, by llama-perplexity's protocol, is within 1 % of
/// what llama-perplexity gave on the same export (tests/fixtures/llama-cpp-ppl/, written by
/// tools/reference/make_llama_cpp_fixtures.sh).
#[test]
fn seed_setting_gguf_is_llama_cpps_deci_with_its_perplexity() {
    let fixture = pare_test_support::fixture("llama-cpp-ppl/smollm2-pruned-deci.json");
    let loaded = smollm2();
    let settings = settings_of(&serde_json::json!({
        "importance": "taylor", "taylor": "param_first", "reduction": "sum", "gqa": "kv-groups",
        "ratio": 0.25, "attn_layers": [3, 30], "mlp_layers": [3, 30]
    }));
    let path = pare_model::loader::assets_dir().join("texts/c4.utf8");
    let calib =
        calibration::from_text(loaded.tokenizer().unwrap(), &std::fs::read_to_string(path).unwrap(), 10, 64, "c4")
            .unwrap();
    let out = pare_prune::make_plan(&loaded.model, &settings, Some(&calib), &mut |_, _, _| {}).unwrap();
    let pruned = pare_prune::apply(&loaded.model, &out.plan).unwrap();
    assert!(pruned.config().layer_shapes.is_some(), "layers 0-2 keep their width");

    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    let src = pare_formats::GgufFile::open(&loaded.path).unwrap();
    let keys: Vec<_> =
        src.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    pare_model::export::export_gguf(&pruned, &keys, pare_formats::GgmlType::F16, &gguf).unwrap();
    assert_eq!(pare_formats::GgufFile::open(&gguf).unwrap().architecture().unwrap(), "deci");

    let mut exported = pare_model::load(gguf.to_str().unwrap(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap();
    exported.model.set_kv_dtype(pare_model::KvDtype::Float(DType::F16)).unwrap();
    let text = pare_test_support::llama_cpp_fixture_text(&fixture);
    let tok = exported.tokenizer().unwrap();
    let tokens = tok.encode(&text, true).unwrap();
    let n_ctx = fixture["n_ctx"].as_u64().unwrap() as usize;
    assert_eq!((tokens.len() / n_ctx) as u64, fixture["chunks"].as_u64().unwrap());
    let bos = tok.added_bos();
    let ppl = pare_eval::perplexity_llama_cpp(&exported.model, &tokens, n_ctx, bos, &Default::default(), |_, _| {})
        .unwrap()
        .ppl;
    let theirs = fixture["ppl"].as_f64().unwrap();
    assert!((ppl / theirs - 1.0).abs() < 0.01, "pare {ppl} vs llama-perplexity {theirs} on the deci export");
}
