//! Operations against a one-at-a-time server (`--max-concurrent 1 --max-queue 1`): a client that
//! leaves frees its KV cache, a full queue answers 429, and shutdown lets running requests finish.

mod common;

use std::time::{Duration, Instant};

use common::{get_metrics, metric, Limits, KEY, MODEL};
use futures_util::StreamExt;
use serde_json::{json, Value};

async fn base() -> String {
    common::server(Limits { max_concurrent: 1, max_queue: 1, kv_memory: 256 << 20 }).await
}

/// The tests below read the server's gauges: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A streaming completion that runs long (EOS is held off), returned once its first chunk has arrived.
async fn start_stream(base: &str, max_tokens: usize) -> reqwest::Response {
    let body = json!({"model": MODEL, "prompt": "Tell me a very long story about a dragon.", "max_tokens": max_tokens,
                      "min_new_tokens": max_tokens, "temperature": 0, "stream": true});
    let mut r =
        common::client().post(format!("{base}/v1/completions")).bearer_auth(KEY).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"data: "));
    r
}

async fn wait_for(base: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = get_metrics(base).await;
        if ok(&text) {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: never happened\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_kv_cache() {
    let _serial = SERIAL.lock().await;
    let base = base().await;
    let before = metric(&get_metrics(&base).await, "pare_cancelled_sequences_total");
    let stream = start_stream(&base, 2000).await;
    let running = wait_for(&base, "running", |m| metric(m, "pare_running_sequences") == 1.0).await;
    assert!(metric(&running, "pare_kv_cache_bytes") > 0.0, "a running sequence holds KV");
    drop(stream);
    let after = wait_for(&base, "cancel", |m| {
        metric(m, "pare_running_sequences") == 0.0 && metric(m, "pare_kv_cache_bytes") == 0.0
    })
    .await;
    assert_eq!(metric(&after, "pare_cancelled_sequences_total"), before + 1.0);
    assert_eq!(metric(&after, "pare_kv_cache_bytes_reserved"), 0.0);
}

#[tokio::test]
async fn a_full_queue_answers_429() {
    let _serial = SERIAL.lock().await;
    let base = base().await;
    let running = start_stream(&base, 2000).await;
    // The second request waits: the one slot is taken.
    let waiting_body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0});
    let waiting = tokio::spawn({
        let base = base.clone();
        async move { common::post(&base, "/v1/completions", &waiting_body).await }
    });
    wait_for(&base, "queued", |m| metric(m, "pare_queue_depth") == 1.0).await;
    let (status, body) = common::post(&base, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "queue_full");
    // The running request leaves; the waiting one then runs and is answered in full.
    drop(running);
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

/// A second server in this binary: shutting it down lets the streaming request finish.
#[tokio::test]
async fn shutdown_drains_running_requests() {
    let _serial = SERIAL.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = pare_serve::ServeConfig {
        load: Box::new(|| common::load().map_err(|e| e.to_string())),
        served_name: MODEL.into(),
        api_key: None,
        max_concurrent: 2,
        max_queue: 4,
        kv_memory: Some(256 << 20),
        max_batched_tokens: pare_serve::DEFAULT_MAX_BATCHED_TOKENS,
        timeout: Duration::from_secs(60),
    };
    let server = tokio::spawn(pare_serve::serve(listener, config, async {
        let _ = stop_rx.await;
    }));
    let c = common::client();
    let start = Instant::now();
    while !matches!(c.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200) {
        assert!(start.elapsed() < Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = json!({"prompt": "Count to ten: one, two,", "max_tokens": 40, "temperature": 0, "stream": true});
    let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    let mut chunks = r.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    stop_tx.send(()).unwrap();
    let mut rest = Vec::from(&first[..]);
    while let Some(chunk) = chunks.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(rest).unwrap();
    let data = common::sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the stream ran to its end");
    let finished: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(finished.iter().any(|c| !c["choices"][0]["finish_reason"].is_null()));
    server.await.unwrap().expect("serve returns Ok after draining");
    assert!(c.get(format!("{base}/health")).send().await.is_err(), "no longer listening");
}

/// A third server whose requests may take one second: a longer one answers 408 and stops.
#[tokio::test]
async fn a_request_past_the_timeout_is_stopped() {
    let _serial = SERIAL.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = pare_serve::ServeConfig {
        load: Box::new(|| common::load().map_err(|e| e.to_string())),
        served_name: MODEL.into(),
        api_key: Some(KEY.into()),
        max_concurrent: 1,
        max_queue: 1,
        kv_memory: Some(256 << 20),
        max_batched_tokens: pare_serve::DEFAULT_MAX_BATCHED_TOKENS,
        timeout: Duration::from_secs(1),
    };
    tokio::spawn(pare_serve::serve(listener, config, std::future::pending()));
    let c = common::client();
    let start = Instant::now();
    while !matches!(c.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200) {
        assert!(start.elapsed() < Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "min_new_tokens": 4000, "temperature": 0});
    let asked = Instant::now();
    let (status, answer) = common::post(&base, "/v1/completions", &body).await;
    assert_eq!(status, 408, "{answer}");
    assert_eq!(answer["error"]["code"], "timeout");
    assert!(asked.elapsed() < Duration::from_secs(30), "answered at the limit, not at the end");
    wait_for(&base, "stopped", |m| {
        metric(m, "pare_running_sequences") == 0.0 && metric(m, "pare_kv_cache_bytes") == 0.0
    })
    .await;
}

#[tokio::test]
async fn every_step_is_timed_and_its_forward_is_part_of_it() {
    let _serial = SERIAL.lock().await;
    let base = base().await;
    let before = get_metrics(&base).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 5, "min_new_tokens": 5, "temperature": 0});
    let (status, _) = common::post(&base, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    let after = get_metrics(&base).await;
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    // The prompt's step chooses the first token; each later token is a step of its own.
    assert!(delta("pare_engine_step_seconds_count") >= 5.0, "{after}");
    assert_eq!(delta("pare_engine_step_seconds_count"), delta("pare_model_forward_seconds_count"));
    let (step, forward) = (delta("pare_engine_step_seconds_sum"), delta("pare_model_forward_seconds_sum"));
    assert!(forward > 0.0 && forward <= step, "forward {forward} s of steps {step} s");
}
