//! A model split over 3 in-process ranks (`pare serve --tp 3`) serves what the whole model
//! generates: concurrent requests, each with its own press, stepped together by the engine, and
//! a compressed context holding what the whole model's press keeps.

mod common;

use common::{encode, generate_alone, model, post, Limits, MODEL};
use pare_generate::GenerationConfig;
use pare_model::parallel::LocalComm;
use pare_model::{Hooks, PrefillInput};
use pare_press::PressOptions;
use serde_json::{json, Value};

async fn base() -> String {
    let limits = Limits { max_concurrent: 8, max_queue: 64, kv_memory: 128 << 20 };
    common::server_loading(
        limits,
        Box::new(|| {
            let mut loaded = common::load().map_err(|e| e.to_string())?;
            // SmolLM2's 3 KV heads: one per rank.
            let comms = LocalComm::group(3).map_err(|e| e.to_string())?;
            loaded.model = loaded.model.split(comms).map_err(|e| e.to_string())?;
            Ok(loaded)
        }),
    )
    .await
}

fn greedy() -> GenerationConfig {
    GenerationConfig { do_sample: Some(false), ..GenerationConfig::default() }
}

#[tokio::test]
async fn concurrent_requests_with_their_own_presses_equal_the_whole_model() {
    let base = base().await;
    let ratio = |r: f64| PressOptions { ratio: Some(r), ..PressOptions::default() };
    type Case = (&'static str, Value, Option<(&'static str, PressOptions)>);
    let cases: Vec<Case> = vec![
        ("Once upon a time", json!(null), None),
        ("The three primary colors are", json!({"name": "knorm", "ratio": 0.5}), Some(("knorm", ratio(0.5)))),
        (
            "In the beginning the universe was created. This has made a lot of people very angry and",
            json!({"name": "adakv+snapkv", "ratio": 0.4}),
            Some(("adakv+snapkv", ratio(0.4))),
        ),
        (
            "The quick brown fox jumps over the lazy dog. The quick brown fox",
            json!({"name": "streaming", "budget": 12, "sinks": 2}),
            Some(("streaming", PressOptions { budget: Some(12), sinks: Some(2), ..PressOptions::default() })),
        ),
    ];
    let requests = cases.iter().map(|(prompt, press, _)| {
        let mut body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0});
        if !press.is_null() {
            body["press"] = press.clone();
        }
        let base = base.clone();
        async move { post(&base, "/v1/completions", &body).await }
    });
    let answers = futures_util::future::join_all(requests).await;
    for ((prompt, _, press), (status, body)) in cases.into_iter().zip(answers) {
        assert_eq!(status, 200, "{prompt}: {body}");
        let alone = generate_alone(&encode(prompt), greedy(), 12, press);
        assert_eq!(body["choices"][0]["text"], alone.text, "{prompt}");
    }
}

#[tokio::test]
async fn a_context_holds_every_rank_s_part_of_what_the_whole_model_keeps() {
    let base = base().await;
    let text = std::fs::read_to_string(pare_test_support::asset("texts/wiki.utf8")).unwrap();
    let context: String = text.chars().take(600).collect();
    let (status, made) =
        post(&base, "/v1/contexts", &json!({"context": context, "press": {"name": "knorm", "ratio": 0.5}})).await;
    assert_eq!(status, 200, "{made}");
    let press = pare_press::build("knorm", &PressOptions { ratio: Some(0.5), ..PressOptions::default() }).unwrap();
    let ids = [encode(&context)];
    let (_, whole) = model().model.prefill(PrefillInput::Tokens(&ids), &mut Hooks::new(Some(press), None)).unwrap();
    assert_eq!(made["kv_bytes"], whole.bytes(), "{made}");
    assert_eq!(made["kv_bytes_uncompressed"], whole.uncompressed_bytes());
    let body =
        json!({"model": MODEL, "context_id": made["id"], "prompt": "\nSummary:", "max_tokens": 6, "temperature": 0});
    let (status, answer) = post(&base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
}
