//! pare against HF transformers: fixtures written by tools/reference/make_fixtures.py.
//!
//! Tolerances are the ones pare promises: identical token ids; top-k ids identical and logprobs
//! within 1e-3 (f32); greedy continuations identical; perplexity within 0.1 %.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, D};
use pare_model::{LoadedModel, WeightDType};
use pare_test_support::{self as ts, repo};
use serde_json::Value;

fn fixture(model: &str, name: &str) -> Option<Value> {
    let path = repo().join("tests/fixtures").join(model).join(name);
    let text = std::fs::read_to_string(&path).ok()?;
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn model_path(model: &str) -> PathBuf {
    match model {
        "smollm2" => repo().join("assets/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "qwen2" => repo().join("assets/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"),
        tiny => repo().join("tests/fixtures").join(tiny).join("model"),
    }
}

fn load(model: &str) -> &'static LoadedModel {
    static SMOLLM2: OnceLock<LoadedModel> = OnceLock::new();
    static QWEN2: OnceLock<LoadedModel> = OnceLock::new();
    static NEOX: OnceLock<LoadedModel> = OnceLock::new();
    static LLAMA: OnceLock<LoadedModel> = OnceLock::new();
    static MISTRAL: OnceLock<LoadedModel> = OnceLock::new();
    static QWEN2_TINY: OnceLock<LoadedModel> = OnceLock::new();
    let cell = match model {
        "smollm2" => &SMOLLM2,
        "qwen2" => &QWEN2,
        "gptneox-tiny" => &NEOX,
        "llama-tiny" => &LLAMA,
        "mistral-tiny" => &MISTRAL,
        "qwen2-tiny" => &QWEN2_TINY,
        other => panic!("unknown fixture model {other}"),
    };
    cell.get_or_init(|| {
        let path = model_path(model);
        pare_model::load(path.to_str().unwrap(), WeightDType::Float(candle_core::DType::F32), &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn last_logprobs(loaded: &LoadedModel, prompts: &[Vec<u32>]) -> (Vec<Vec<f32>>, pare_model::KvCache) {
    let (logits, cache) = ts::prefill(&loaded.model, prompts).unwrap();
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2().unwrap();
    (lp, cache)
}

/// Top-k ids must agree rank by rank, except where HF's own logprobs tie within 1e-5.
fn check_top(model: &str, what: &str, pare: &[f32], top: &Value) {
    let top = top.as_array().unwrap();
    let mut order: Vec<usize> = (0..pare.len()).collect();
    order.sort_by(|&a, &b| pare[b].total_cmp(&pare[a]));
    for (rank, entry) in top.iter().enumerate() {
        let id = entry["id"].as_u64().unwrap() as usize;
        let hf_lp = entry["logprob"].as_f64().unwrap() as f32;
        let diff = (pare[id] - hf_lp).abs();
        assert!(diff < 1e-3, "{model} {what}: token {id} logprob pare {} vs hf {hf_lp} (Δ {diff})", pare[id]);
        if order[rank] != id {
            let tied = (pare[order[rank]] - hf_lp).abs() < 1e-5;
            assert!(tied, "{model} {what}: rank {rank} is {} in pare, {id} in hf", order[rank]);
        }
    }
}

/// A plain greedy loop without EOS stopping (the HF fixtures disable it too).
fn greedy(loaded: &LoadedModel, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let (mut logits, mut cache) = ts::prefill(&loaded.model, prompts).unwrap();
    let mut out = vec![Vec::new(); prompts.len()];
    for step in 0..n {
        let next: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        for (row, &t) in next.iter().enumerate() {
            out[row].push(t);
        }
        if step + 1 < n {
            logits = ts::decode(&loaded.model, &mut cache, &next).unwrap();
        }
    }
    out
}

fn prompt_ids(model: &str, case: &Value) -> Vec<u32> {
    let expected = ids(&case["ids"]);
    if let (Some(text), Some(tok)) = (case["prompt"].as_str(), load(model).tokenizer.as_ref()) {
        assert_eq!(tok.encode(text, true).unwrap(), expected, "{model}: prompt ids for {text:?}");
    }
    expected
}

fn check_tokenize(model: &str) {
    let fx = fixture(model, "tokenize.json").unwrap_or_else(|| panic!("{model}: no tokenize.json"));
    let tok = load(model).tokenizer().unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "{model}: ids of {text:?}");
    }
}

fn check_chat(model: &str) {
    let fx = fixture(model, "chat.json").unwrap_or_else(|| panic!("{model}: no chat.json"));
    let tok = load(model).tokenizer().unwrap();
    let template = tok.chat_template.as_deref().expect("chat template");
    for case in fx["cases"].as_array().unwrap() {
        let messages: Vec<pare_formats::ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered =
            pare_formats::render_chat(template, &messages, true, tok.bos_token.as_deref(), tok.eos_token.as_deref())
                .unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{model}: rendered chat");
        assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&case["ids"]), "{model}: chat ids");
    }
}

fn check_logits(model: &str) {
    let fx = fixture(model, "logits.json").unwrap_or_else(|| panic!("{model}: no logits.json"));
    let loaded = load(model);
    for (i, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = prompt_ids(model, case);
        let (lp, _) = last_logprobs(loaded, std::slice::from_ref(&prompt));
        check_top(model, &format!("logits case {i}"), &lp[0], &case["top"]);
    }
}

fn check_greedy(model: &str) {
    let fx = fixture(model, "greedy.json").unwrap_or_else(|| panic!("{model}: no greedy.json"));
    let loaded = load(model);
    let n = fx["max_new_tokens"].as_u64().unwrap() as usize;
    for case in fx["cases"].as_array().unwrap() {
        let prompt = prompt_ids(model, case);
        let got = greedy(loaded, std::slice::from_ref(&prompt), n);
        assert_eq!(got[0], ids(&case["new_ids"]), "{model}: greedy after {:?}", case["prompt"]);
    }
}

fn check_batch(model: &str) {
    let fx = fixture(model, "batch.json").unwrap_or_else(|| panic!("{model}: no batch.json"));
    let loaded = load(model);
    for case in fx["cases"].as_array().unwrap() {
        let rows = case["rows"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| prompt_ids(model, r)).collect();
        let (lp, _) = last_logprobs(loaded, &prompts);
        for (i, row) in rows.iter().enumerate() {
            check_top(model, &format!("batch row {i}"), &lp[i], &row["top"]);
        }
        if let Some(expected) = case["greedy"].as_array() {
            let n = expected[0].as_array().unwrap().len();
            let got = greedy(loaded, &prompts, n);
            for (i, e) in expected.iter().enumerate() {
                assert_eq!(got[i], ids(e), "{model}: batched greedy row {i}");
            }
        }
    }
}

fn check_ppl(model: &str) {
    let fx = fixture(model, "ppl.json").unwrap_or_else(|| panic!("{model}: no ppl.json"));
    let loaded = load(model);
    for case in fx["cases"].as_array().unwrap() {
        let text = std::fs::read_to_string(repo().join(case["file"].as_str().unwrap())).unwrap();
        let mut tokens = loaded.tokenizer().unwrap().encode(&text, true).unwrap();
        tokens.truncate(case["max_tokens"].as_u64().unwrap() as usize);
        assert_eq!(tokens.len() as u64, case["tokens"].as_u64().unwrap(), "{model}: token count");
        let (ctx, stride) = (case["ctx"].as_u64().unwrap() as usize, case["stride"].as_u64().unwrap() as usize);
        let r = pare_eval_ppl(loaded, &tokens, ctx, stride);
        let hf = case["ppl"].as_f64().unwrap();
        assert_eq!(r.1 as u64, case["scored_tokens"].as_u64().unwrap(), "{model}: scored tokens");
        assert!((r.0 / hf - 1.0).abs() < 1e-3, "{model}: ppl ctx {ctx} stride {stride}: pare {} vs hf {hf}", r.0);
    }
}

/// Sliding-window perplexity, written out independently of pare-eval (which has its own tests).
fn pare_eval_ppl(loaded: &LoadedModel, tokens: &[u32], ctx: usize, stride: usize) -> (f64, usize) {
    let (mut nll, mut scored, mut prev_end, mut begin) = (0.0f64, 0usize, 0usize, 0usize);
    while begin < tokens.len() {
        let end = (begin + ctx).min(tokens.len());
        let from = prev_end.max(begin + 1);
        let logits = ts::logits_all(&loaded.model, &tokens[begin..end]).unwrap();
        let lp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2().unwrap();
        for t in from..end {
            nll -= lp[t - begin - 1][tokens[t] as usize] as f64;
            scored += 1;
        }
        prev_end = end;
        if end == tokens.len() {
            break;
        }
        begin += stride;
    }
    ((nll / scored as f64).exp(), scored)
}

macro_rules! parity_tests {
    ($module:ident, $name:literal, [$($check:ident),*]) => {
        mod $module {
            $(#[test] fn $check() { super::$check($name); })*
        }
    };
}

parity_tests!(smollm2, "smollm2", [check_tokenize, check_chat, check_logits, check_greedy, check_batch, check_ppl]);
parity_tests!(qwen2, "qwen2", [check_tokenize, check_chat, check_logits, check_greedy, check_batch, check_ppl]);
parity_tests!(gptneox_tiny, "gptneox-tiny", [check_tokenize, check_logits, check_greedy, check_batch, check_ppl]);
parity_tests!(llama_tiny, "llama-tiny", [check_logits, check_greedy, check_batch]);
parity_tests!(mistral_tiny, "mistral-tiny", [check_logits, check_greedy, check_batch]);
parity_tests!(qwen2_tiny, "qwen2-tiny", [check_logits, check_greedy, check_batch]);
