//! A server whose `--kv-memory` holds fewer tokens than its running sequences come to need:
//! the newest plain sequence is preempted and run again later, and every answer still equals
//! its run alone.

mod common;

use common::{encode, generate_alone, get_metrics, metric, post, Limits, MODEL};
use pare_generate::GenerationConfig;
use serde_json::json;

/// SmolLM2-135M in f32: 30 layers × 3 KV heads × 64 × 2 (keys, values) × 4 bytes a token.
const BYTES_PER_TOKEN: usize = 30 * 3 * 64 * 2 * 4;

#[tokio::test]
async fn outgrowing_the_budget_preempts_and_answers_do_not_change() {
    // Room for 90 tokens: one sequence (prompt + 40) fits alone, three side by side do not.
    let base = common::server(Limits { max_concurrent: 4, max_queue: 16, kv_memory: 90 * BYTES_PER_TOKEN }).await;
    let prompts = ["Once upon a time, in a small village,", "The three primary colors are", "Rust is a language that"];
    let answers = futures_util::future::join_all(prompts.iter().map(|p| {
        let body = json!({"model": MODEL, "prompt": p, "max_tokens": 40, "min_new_tokens": 40, "temperature": 0});
        let base = base.clone();
        async move { post(&base, "/v1/completions", &body).await }
    }))
    .await;
    assert!(metric(&get_metrics(&base).await, "pare_preemptions_total") >= 1.0, "nothing was preempted");
    for (prompt, (status, answer)) in prompts.iter().zip(answers) {
        assert_eq!(status, 200, "{answer}");
        let config =
            GenerationConfig { do_sample: Some(false), min_new_tokens: Some(40), ..GenerationConfig::default() };
        let alone = generate_alone(&encode(prompt), config, 40, None);
        assert_eq!(answer["choices"][0]["text"], alone.text, "{prompt:?}");
        assert_eq!(answer["usage"]["completion_tokens"], 40);
    }
}
