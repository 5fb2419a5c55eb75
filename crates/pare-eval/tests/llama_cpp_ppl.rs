//! pare's perplexity on a quantized GGUF, run in its own blocks with an f16 KV cache (the CLI's
//! defaults, and llama.cpp's), against llama-perplexity's on the same file, text and context. The fixture records llama.cpp's number and the command that made
//! it (tests/fixtures/llama-cpp-ppl/).

use candle_core::{DType, Device, D};
use pare_model::{KvDtype, WeightDType};
use pare_test_support::{fixture, logits_all, repo};
use serde_json::Value;

/// llama-perplexity's procedure: the tokens in consecutive chunks of n_ctx, each evaluated alone
/// (its first token replaced by BOS when the vocabulary adds one), and only the second half of
/// each chunk scored, so every scored token has at least n_ctx/2 tokens of context.
fn llama_cpp_style_ppl(fixture: &Value) -> (f64, usize) {
    let model = repo().join(fixture["model"].as_str().unwrap());
    let mut loaded = pare_model::load(model.to_str().unwrap(), WeightDType::Quantized, &Device::Cpu).unwrap();
    loaded.model.set_kv_dtype(KvDtype::Float(DType::F16)).unwrap();
    let text = std::fs::read_to_string(repo().join(fixture["text"].as_str().unwrap())).unwrap();
    let lines = fixture["text_lines"].as_u64().unwrap() as usize;
    let text: String = text.split_inclusive('\n').take(lines).collect();
    let tok = loaded.tokenizer().unwrap();
    let tokens = tok.encode(&text, true).unwrap();
    let n_ctx = fixture["n_ctx"].as_u64().unwrap() as usize;
    let chunks = tokens.len() / n_ctx;
    let first = n_ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if tok.add_bos {
            chunk[0] = tok.bos_token_id.unwrap();
        }
        let logits = logits_all(&loaded.model, &chunk).unwrap().narrow(0, first, n_ctx - 1 - first).unwrap();
        let logprobs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32).unwrap(), D::Minus1).unwrap();
        let rows: Vec<Vec<f32>> = logprobs.to_vec2().unwrap();
        for (row, &target) in rows.iter().zip(&chunk[first + 1..]) {
            nll -= row[target as usize] as f64;
            count += 1;
        }
    }
    ((nll / count as f64).exp(), chunks)
}

#[test]
fn quantized_perplexity_is_llama_cpps() {
    let fixture = fixture("llama-cpp-ppl/smollm2-q4_1.json");
    let (ppl, chunks) = llama_cpp_style_ppl(&fixture);
    assert_eq!(chunks as u64, fixture["chunks"].as_u64().unwrap(), "tokenization differs from llama.cpp's");
    let theirs = fixture["ppl"].as_f64().unwrap();
    assert!((ppl / theirs - 1.0).abs() < 0.005, "pare {ppl} vs llama-perplexity {theirs}");
}
