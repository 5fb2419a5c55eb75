//! `pare bench serve` end to end: `pare serve` (SmolLM2-135M) in this process on an ephemeral
//! port, the load generator as the binary against it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use pare_model::WeightDType;
use serde_json::{json, Value};

/// Start the server once for this test binary; its base URL, once /health answers 200.
fn server() -> &'static str {
    static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let config = pare_serve::ServeConfig {
            load: Box::new(|| {
                pare_model::load("smollm2-135m", WeightDType::Float(DType::F32), &Device::Cpu)
                    .map_err(|e| e.to_string())
            }),
            served_name: "smollm2-135m".into(),
            api_key: Some("bench-key".into()),
            max_concurrent: 4,
            max_queue: 64,
            kv_memory: Some(1 << 30),
            max_batched_tokens: pare_serve::DEFAULT_MAX_BATCHED_TOKENS,
            timeout: Duration::from_secs(120),
        };
        let addr = pare_serve::spawn_local(config).expect("the server starts");
        // /health opens once the model has loaded: a raw HTTP/1.0 GET needs no client library.
        let start = Instant::now();
        while !health_ok(addr) {
            assert!(start.elapsed() < Duration::from_secs(120), "the server never became healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        format!("http://{addr}")
    })
}

/// The load tests one at a time: the peak of running sequences counts every client of the server.
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn health_ok(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
    let mut answer = String::new();
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.0 200")
}

/// A small ShareGPT file: four usable first human turns, one too long for the filter, and a
/// conversation that opens with the model's turn (its human turn is the prompt).
fn prompts_file() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(write_prompts)
}

fn write_prompts() -> PathBuf {
    let path = common::scratch("bench-serve", "sharegpt.json");
    let turn = |from: &str, value: &str| json!({"from": from, "value": value});
    let records = json!([
        {"id": "a", "conversations": [turn("human", "Tell me about the moon."), turn("gpt", "The moon ...")]},
        {"id": "b", "conversations": [turn("human", "What is Rust used for?")]},
        {"id": "c", "conversations": [turn("gpt", "Hello!"), turn("human", "Name three rivers in Europe.")]},
        {"id": "d", "conversations": [turn("human", &"very long prompt ".repeat(40))]},
        {"id": "e", "conversations": [turn("human", "Write a haiku about autumn.")]},
        {"id": "f", "conversations": []},
    ]);
    std::fs::write(&path, records.to_string()).expect("write prompts");
    path
}

fn bench(base: &str, prompts: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "serve",
        "--url",
        base,
        "--api-key",
        "bench-key",
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-prompt-chars",
        "200",
        "--json",
    ];
    args.extend_from_slice(extra);
    common::json(&args)
}

#[test]
fn completions_at_concurrency_1_and_2() {
    let base = server();
    let _alone = exclusive();
    let prompts = prompts_file();
    let max_tokens = 6;
    let report = bench(
        base,
        prompts,
        &[
            "--concurrency",
            "1,2",
            "--num-requests",
            "4",
            "--max-tokens",
            "6",
            "--peak-metric",
            "pare_running_sequences",
        ],
    );
    assert_eq!(report["model"], "smollm2-135m", "the model comes from /v1/models");
    assert_eq!(report["endpoint"], "/v1/completions");
    // Two runs of four requests over four usable prompts: the second run sends them again.
    assert_eq!(report["prompts_repeated"], true);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, concurrency) in runs.iter().zip([1u64, 2]) {
        assert_eq!(run["concurrency"], concurrency, "{run}");
        assert_eq!((run["completed"].as_u64(), run["errors"].as_u64()), (Some(4), Some(0)), "{run}");
        // ignore_eos: every request generates exactly max_tokens.
        assert_eq!(run["output_tokens"], 4 * max_tokens, "{run}");
        assert!(run["prompt_tokens"].as_u64().unwrap() >= 4 * 5, "{run}");
        let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("a number expected in {run}"));
        let duration = num(&run["duration_s"]);
        assert!(duration > 0.0);
        let tok_s = num(&run["output_tok_s"]);
        assert!((tok_s - 24.0 / duration).abs() < 1e-6 * tok_s, "{run}");
        for metric in ["ttft_ms", "itl_ms", "latency_ms"] {
            let (p50, p99, mean) = (num(&run[metric]["p50"]), num(&run[metric]["p99"]), num(&run[metric]["mean"]));
            assert!(p50 > 0.0 && p50 <= p99, "{metric} in {run}");
            assert!(mean > 0.0 && mean <= p99, "{metric} in {run}");
        }
        // A request's latency holds its first token and the gaps after it.
        assert!(num(&run["ttft_ms"]["p99"]) <= num(&run["latency_ms"]["p99"]), "{run}");
        assert!(num(&run["latency_ms"]["p99"]) <= duration * 1e3, "{run}");
        let peak = num(&run["peak_metric"]);
        assert!(
            (1.0..=concurrency as f64).contains(&peak),
            "peak running sequences {peak} at concurrency {concurrency}"
        );
    }
}

#[test]
fn chat_extra_body_and_refused_requests() {
    let base = server();
    let _alone = exclusive();
    let prompts = prompts_file();
    let report = bench(
        base,
        prompts,
        &[
            "--endpoint",
            "chat",
            "--concurrency",
            "2",
            "--num-requests",
            "3",
            "--max-tokens",
            "5",
            "--extra-body",
            r#"{"press": {"name": "knorm", "ratio": 0.5}}"#,
        ],
    );
    assert_eq!(report["endpoint"], "/v1/chat/completions");
    assert_eq!(report["extra_body"]["press"]["name"], "knorm");
    assert_eq!(report["prompts_repeated"], false);
    let run = &report["runs"][0];
    assert_eq!((run["completed"].as_u64(), run["errors"].as_u64()), (Some(3), Some(0)), "{run}");
    assert_eq!(run["output_tokens"], 15, "{run}");
    assert!(run["peak_metric"].is_null());
    // A body the server refuses: every request is a counted error with the server's message.
    let report = bench(
        base,
        prompts,
        &[
            "--concurrency",
            "1",
            "--num-requests",
            "2",
            "--max-tokens",
            "4",
            "--warmup",
            "0",
            "--extra-body",
            r#"{"top_k": -5}"#,
        ],
    );
    let run = &report["runs"][0];
    assert_eq!((run["completed"].as_u64(), run["errors"].as_u64()), (Some(0), Some(2)), "{run}");
    let first = run["first_error"].as_str().unwrap();
    assert!(first.starts_with("HTTP 400") && first.contains("top_k"), "{first}");
}

#[test]
fn bad_setups_fail_in_one_line() {
    let prompts = prompts_file();
    let p = prompts.to_str().unwrap();
    common::one_line_error(&["bench", "serve", "--prompts", "/nonexistent/sharegpt.json"], "scripts/assets.sh serve");
    common::one_line_error(
        &["bench", "serve", "--prompts", p, "--min-prompt-chars", "5000", "--max-prompt-chars", "6000"],
        "no first human turn",
    );
    common::one_line_error(&["bench", "serve", "--prompts", p, "--concurrency", "0"], "--concurrency");
    common::one_line_error(&["bench", "serve", "--prompts", p, "--extra-body", "[1]"], "JSON object");
    // Nothing listens on port 9 of localhost (discard, unused on CI machines).
    common::one_line_error(&["bench", "serve", "--prompts", p, "--url", "http://127.0.0.1:9"], "127.0.0.1:9");
    let base = server();
    common::one_line_error(&["bench", "serve", "--prompts", p, "--url", base], "401");
}
