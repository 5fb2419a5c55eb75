//! pare's perplexity on a quantized GGUF, run in its own blocks with an f16 KV cache (the CLI's
//! defaults, and llama.cpp's), against llama-perplexity's on the same file, text and context. The fixture records llama.cpp's number and the command that made
//! it (tests/fixtures/llama-cpp-ppl/).

use candle_core::{DType, Device};
use pare_model::{Hooks, KvDtype, LoadedModel, WeightDType};
use pare_test_support::{fixture, repo};
use serde_json::Value;

/// pare's perplexity by llama-perplexity's protocol on the fixture's text and context.
fn llama_cpp_style_ppl(fixture: &Value, loaded: &LoadedModel) -> (f64, usize) {
    let text = pare_test_support::llama_cpp_fixture_text(fixture);
    let tok = loaded.tokenizer().unwrap();
    let tokens = tok.encode(&text, true).unwrap();
    let n_ctx = fixture["n_ctx"].as_u64().unwrap() as usize;
    let bos = tok.added_bos();
    let r = pare_eval::perplexity_llama_cpp(&loaded.model, &tokens, n_ctx, bos, &Hooks::default(), |_, _| {}).unwrap();
    (r.ppl, tokens.len() / n_ctx)
}

#[test]
fn quantized_perplexity_is_llama_cpps() {
    let fixture = fixture("llama-cpp-ppl/smollm2-q4_1.json");
    let model = repo().join(fixture["model"].as_str().unwrap());
    let mut loaded = pare_model::load(model.to_str().unwrap(), WeightDType::Quantized, &Device::Cpu).unwrap();
    loaded.model.set_kv_dtype(KvDtype::Float(DType::F16)).unwrap();
    let (ppl, chunks) = llama_cpp_style_ppl(&fixture, &loaded);
    assert_eq!(chunks as u64, fixture["chunks"].as_u64().unwrap(), "tokenization differs from llama.cpp's");
    let theirs = fixture["ppl"].as_f64().unwrap();
    assert!((ppl / theirs - 1.0).abs() < 0.005, "pare {ppl} vs llama-perplexity {theirs}");
}
