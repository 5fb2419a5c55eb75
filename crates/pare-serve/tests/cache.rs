//! What the server keeps between requests: exact prefix caching of plain prompts, and contexts
//! compressed once (`POST /v1/contexts`) that later requests continue.

mod common;

use common::{encode, generate_alone, get_metrics, metric, model, post, Limits, KEY, MODEL};
use pare_generate::GenerationConfig;
use pare_model::{Hooks, Logits, Phase, PrefillInput};
use pare_press::PressOptions;
use serde_json::json;

async fn base() -> String {
    common::server(Limits { max_concurrent: 4, max_queue: 16, kv_memory: 256 << 20 }).await
}

/// The tests read counters: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SHARED: &str = "You are a helpful assistant. Answer in one short sentence, and never say more than \
                      you know. The user asks about geography, history and the natural world.";

fn greedy() -> GenerationConfig {
    GenerationConfig { do_sample: Some(false), ..GenerationConfig::default() }
}

#[tokio::test]
async fn a_shared_prefix_is_reused_and_greedy_outputs_do_not_change() {
    let _one = SERIAL.lock().await;
    let base = base().await;
    let first = format!("{SHARED} Question: what is the capital of France? Answer:");
    let second = format!("{SHARED} Question: which river flows through Rome? Answer:");
    let shared_tokens = encode(&first).iter().zip(encode(&second)).take_while(|(a, b)| **a == *b).count();
    assert!(shared_tokens >= 32, "the prompts share {shared_tokens} tokens");
    for (i, prompt) in [&first, &second].into_iter().enumerate() {
        let before = get_metrics(&base).await;
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0});
        let (status, answer) = post(&base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let alone = generate_alone(&encode(prompt), greedy(), 12, None);
        assert_eq!(answer["choices"][0]["text"], alone.text, "prompt {i}");
        let after = get_metrics(&base).await;
        let delta = |name: &str| metric(&after, name) - metric(&before, name);
        let prefilled = delta("pare_prefill_tokens_total");
        if i == 1 {
            // The second prompt continues the first one's whole blocks of the shared prefix.
            assert_eq!(delta("pare_prefix_cache_hits_total"), 1.0, "{after}");
            let hit = delta("pare_prefix_cache_hit_tokens_total");
            assert!(hit >= 16.0 && hit <= shared_tokens as f64 && hit % 16.0 == 0.0, "hit tokens {hit}");
            assert_eq!(prefilled, encode(prompt).len() as f64 - hit);
        } else {
            assert_eq!(prefilled, encode(prompt).len() as f64);
        }
    }
    assert!(metric(&get_metrics(&base).await, "pare_prefix_cache_bytes") > 0.0);
}

/// kvpress's pipeline: the context (with BOS) prefilled under the press, then the question
/// (no special tokens) appended uncompressed at the positions after it, greedy, no press.
fn kvpress_answer(context: &[u32], question: &[u32], max_new: usize) -> String {
    let m = model();
    let press = pare_press::build("knorm", &PressOptions { ratio: Some(0.5), ..PressOptions::default() }).unwrap();
    let (_, mut cache) =
        m.model.prefill(PrefillInput::Tokens(&[context.to_vec()]), &mut Hooks::new(Some(press), None)).unwrap();
    let start = cache.next_positions()[0];
    let positions = vec![(start..start + question.len() as i64).collect::<Vec<_>>()];
    let x = m.model.embed(&[question.to_vec()]).unwrap();
    let mut hooks = Hooks::default();
    let mut logits = m.model.forward(x, &positions, &mut cache, &mut hooks, Phase::Extend, Logits::Last).unwrap();
    let eos = m.eos_token_ids();
    let mut tokens = Vec::new();
    while tokens.len() < max_new {
        let row: Vec<f32> = logits.squeeze(0).unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap();
        let next = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).unwrap().0 as u32;
        if eos.contains(&next) {
            break;
        }
        tokens.push(next);
        logits = m.model.decode(&mut [(&mut cache, &mut hooks)], &[next]).unwrap();
    }
    m.tokenizer().unwrap().decode(&tokens, true).unwrap()
}

#[tokio::test]
async fn a_context_is_compressed_once_and_answers_as_kvpress_does() {
    let _one = SERIAL.lock().await;
    let base = base().await;
    let text = std::fs::read_to_string(pare_test_support::asset("texts/wiki.utf8")).unwrap();
    let context: String = text.chars().take(1200).collect();
    let (status, made) =
        post(&base, "/v1/contexts", &json!({"context": context, "press": {"name": "knorm", "ratio": 0.5}})).await;
    assert_eq!(status, 200, "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    let context_ids = encode(&context);
    assert_eq!(made["tokens"], context_ids.len());
    let (kv, full) = (made["kv_bytes"].as_f64().unwrap(), made["kv_bytes_uncompressed"].as_f64().unwrap());
    assert!(kv < 0.6 * full, "knorm at 0.5 keeps half: {made}");

    let tok = model().tokenizer().unwrap();
    for question in ["\nQuestion: what is this text about?\nAnswer:", "\nSummary:"] {
        let before = get_metrics(&base).await;
        let body = json!({"model": MODEL, "context_id": id, "prompt": question, "max_tokens": 10, "temperature": 0});
        let (status, answer) = post(&base, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let q = tok.encode(question, false).unwrap();
        assert_eq!(answer["choices"][0]["text"], kvpress_answer(&context_ids, &q, 10), "{question:?}");
        assert_eq!(answer["usage"]["prompt_tokens"], context_ids.len() + q.len());
        // Only the question is prefilled: the context is not run again.
        let after = get_metrics(&base).await;
        let prefilled = metric(&after, "pare_prefill_tokens_total") - metric(&before, "pare_prefill_tokens_total");
        assert_eq!(prefilled, q.len() as f64);
    }

    // Chat continues the context too: the conversation's template after the context's tokens.
    let body = json!({"model": MODEL, "context_id": id, "messages": [{"role": "user", "content": "Summarize it."}],
                      "max_completion_tokens": 4, "temperature": 0});
    let (status, answer) = post(&base, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() > context_ids.len() as u64);
    // The context was compressed when it was made: a press on the request is refused.
    let body = json!({"model": MODEL, "context_id": id, "prompt": "x", "press": {"name": "knorm", "ratio": 0.5}});
    let (status, answer) = post(&base, "/v1/completions", &body).await;
    assert_eq!((status, &answer["error"]["param"]), (400, &json!("context_id")), "{answer}");

    let list = common::client().get(format!("{base}/v1/contexts")).bearer_auth(KEY).send().await.unwrap();
    let list: serde_json::Value = list.json().await.unwrap();
    assert!(list["data"].as_array().unwrap().iter().any(|c| c["id"] == id.as_str()), "{list}");
    assert!(metric(&get_metrics(&base).await, "pare_context_bytes") >= kv);

    let delete = || common::client().delete(format!("{base}/v1/contexts/{id}")).bearer_auth(KEY).send();
    assert_eq!(delete().await.unwrap().status(), 200);
    assert_eq!(delete().await.unwrap().status(), 404);
    let body = json!({"model": MODEL, "context_id": id, "prompt": "x", "max_tokens": 1});
    let (status, answer) = post(&base, "/v1/completions", &body).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "context_not_found");
    assert_eq!(answer["error"]["param"], "context_id");
    let (status, answer) =
        post(&base, "/v1/contexts", &json!({"context": "a", "press": {"name": "knorm", "ratoi": 0.5}})).await;
    assert_eq!(status, 400, "{answer}");
}
