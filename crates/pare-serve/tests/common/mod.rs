//! One real server per test binary (SmolLM2-135M, 127.0.0.1, an ephemeral port), and the same
//! model loaded in-process to check the server's answers against.

#![allow(dead_code)] // each test binary uses its own part of these helpers

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use pare_generate::{GenerationConfig, Generator, Prompts};
use pare_model::{Hooks, LoadedModel, WeightDType};
use pare_serve::ServeConfig;
use serde_json::Value;

pub const MODEL: &str = "smollm2-135m";
pub const KEY: &str = "test-key";

pub struct Limits {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub kv_memory: usize,
}

/// Start the binary's server once; returns its base URL when /health answers 200.
pub async fn server(limits: Limits) -> String {
    server_loading(limits, Box::new(|| load().map_err(|e| e.to_string()))).await
}

/// [`server`] with the model `load` gives.
pub async fn server_loading(limits: Limits, load: pare_serve::Loader) -> String {
    static BASE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    BASE.get_or_init(|| async move {
        let config = ServeConfig {
            load,
            served_name: MODEL.into(),
            api_key: Some(KEY.into()),
            max_concurrent: limits.max_concurrent,
            max_queue: limits.max_queue,
            kv_memory: Some(limits.kv_memory),
            max_batched_tokens: pare_serve::DEFAULT_MAX_BATCHED_TOKENS,
            timeout: Duration::from_secs(120),
        };
        let base = format!("http://{}", pare_serve::spawn_local(config).expect("the server starts"));
        let start = Instant::now();
        loop {
            let r = client().get(format!("{base}/health")).send().await;
            match r {
                Ok(r) if r.status() == 200 => break,
                Ok(r) => assert_eq!(r.status(), 503, "/health answers 503 while loading"),
                Err(e) => panic!("health: {e}"),
            }
            assert!(start.elapsed() < Duration::from_secs(120), "the server never became healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        base
    })
    .await
    .clone()
}

pub fn load() -> pare_model::Result<LoadedModel> {
    pare_model::load(MODEL, WeightDType::Float(DType::F32), &Device::Cpu)
}

/// The model in this process, for what the server's answers must equal.
pub fn model() -> &'static LoadedModel {
    pare_test_support::smollm2()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

/// POST `body` with the right key; the status and the JSON answer.
pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(format!("{base}{path}")).bearer_auth(KEY).json(body).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON body"))
}

pub async fn get_metrics(base: &str) -> String {
    let r = client().get(format!("{base}/metrics")).bearer_auth(KEY).send().await.expect("metrics");
    r.text().await.expect("text")
}

/// A gauge's or counter's value in the Prometheus text (0 when not yet recorded).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What `pare generate` gives for `prompt` with `config` (EOS and the token limit filled in).
pub fn generate_alone(
    prompt: &[u32],
    mut config: GenerationConfig,
    max_new: usize,
    press: Option<(&str, pare_press::PressOptions)>,
) -> pare_generate::Sequence {
    let m = model();
    config.max_new_tokens = Some(max_new);
    config.eos_token_id = Some(m.eos_token_ids());
    let press = press.map(|(name, opts)| pare_press::build(name, &opts).expect("press"));
    let generator = Generator::new(config, Some(m.tokenizer().expect("tokenizer")))
        .expect("config")
        .with_hooks(Hooks::new(press, None));
    let prompts = [prompt.to_vec()];
    generator.generate(&m.model, Prompts::Tokens(&prompts), |_, _, _| {}).expect("generate").sequences.remove(0)
}

pub fn encode(text: &str) -> Vec<u32> {
    model().tokenizer().expect("tokenizer").encode(text, true).expect("encode")
}

/// The `data:` payloads of a server-sent-events body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))))
        .map(str::to_string)
        .collect()
}
