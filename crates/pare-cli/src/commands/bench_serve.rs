//! `pare bench serve`: a load generator for any OpenAI-compatible server (`pare serve`, llama.cpp's
//! `llama-server`, vLLM, ...). Prompts are real conversations (the first human turn of ShareGPT
//! records, a seeded choice), sent as streaming requests with a fixed number in flight; each
//! request's time to first token and the gaps between its streamed tokens are recorded. Every
//! concurrency level gets one run over prompts no earlier run sent: servers keep finished prompts'
//! caches (llama-server's slots, pare's prefix cache), and a prompt sent again would be answered
//! from them instead of prefilled.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::common::{print_json, progress_bar};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's base URL (the OpenAI API under /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// /v1/completions (the prompt as text) or /v1/chat/completions (the prompt as a user message).
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// The `model` each request names (default: the first model the server's /v1/models lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests in flight at once; one run per value, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,
    /// Requests in each run.
    #[arg(long, default_value_t = 64)]
    pub num_requests: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// ShareGPT JSON: a list of {"conversations": [{"from": "human", "value": TEXT}, ...]};
    /// each prompt is a conversation's first human turn (`scripts/assets.sh serve` fetches it).
    #[arg(long, default_value = "assets/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json")]
    pub prompts: PathBuf,
    /// Only prompts of at least this many characters.
    #[arg(long, default_value_t = 16)]
    pub min_prompt_chars: usize,
    /// Only prompts of at most this many characters (about 4 per token in English).
    #[arg(long, default_value_t = 4096)]
    pub max_prompt_chars: usize,
    /// Which prompts: a shuffle of those the filter keeps, by this seed; each run takes the next
    /// --num-requests of them.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Send `"ignore_eos": true` (llama-server, vLLM, pare serve): every request generates exactly
    /// --max-tokens, so every server does the same work.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// Sampling temperature of each request (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// More fields for every request body, as a JSON object, e.g. '{"press": {"name": "knorm", "ratio": 0.5}}'.
    #[arg(long)]
    pub extra_body: Option<String>,
    /// A gauge of the server's Prometheus /metrics (e.g. pare_running_sequences), read every
    /// 50 ms during each run; its peak is reported.
    #[arg(long)]
    pub peak_metric: Option<String>,
    /// Untimed requests before the first run (a short fixed prompt, outside the measured set).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Longest one request may take, in seconds (then it counts as an error).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs values of at least 1");
    }
    if args.num_requests == 0 || args.max_tokens == 0 {
        bail!("--num-requests and --max-tokens must be at least 1");
    }
    if args.min_prompt_chars > args.max_prompt_chars {
        bail!("--min-prompt-chars {} is above --max-prompt-chars {}", args.min_prompt_chars, args.max_prompt_chars);
    }
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds, got {}", args.timeout);
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0, got {}", args.temperature);
    }
    let extra = match &args.extra_body {
        Some(text) => match serde_json::from_str(text).context("--extra-body is not JSON")? {
            Value::Object(map) => map,
            _ => bail!("--extra-body must be a JSON object"),
        },
        None => Map::new(),
    };
    let prompts = choose_prompts(&args)?;
    // One thread: the client shares the machine with the server it measures, so it stays light.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(bench(&args, prompts, extra))?;
    if args.json {
        print_json(&report)
    } else {
        print_table(&report);
        Ok(())
    }
}

#[derive(Deserialize)]
struct Conversation {
    #[serde(default)]
    conversations: Vec<Turn>,
}

#[derive(Deserialize)]
struct Turn {
    from: String,
    value: String,
}

/// The prompts of each run, in run order: `num_requests` first human turns that pass the length
/// filter, in a seeded order, none sent twice while the file has enough.
fn choose_prompts(args: &Args) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(&args.prompts).with_context(|| {
        format!("reading {} (scripts/assets.sh serve fetches the ShareGPT prompts)", args.prompts.display())
    })?;
    let records: Vec<Conversation> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a ShareGPT conversation list", args.prompts.display()))?;
    let mut prompts: Vec<String> = records
        .into_iter()
        .filter_map(|c| c.conversations.into_iter().find(|t| t.from == "human" || t.from == "user"))
        .map(|t| t.value)
        .filter(|v| (args.min_prompt_chars..=args.max_prompt_chars).contains(&v.chars().count()))
        .collect();
    if prompts.is_empty() {
        bail!(
            "no first human turn in {} has {}..={} characters",
            args.prompts.display(),
            args.min_prompt_chars,
            args.max_prompt_chars
        );
    }
    prompts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed));
    Ok(per_run(&prompts, args.concurrency.len(), args.num_requests))
}

/// `runs` consecutive slices of `n` prompts, wrapping around when there are fewer than `runs · n`.
fn per_run(prompts: &[String], runs: usize, n: usize) -> Vec<Vec<String>> {
    let mut all = prompts.iter().cycle();
    (0..runs).map(|_| all.by_ref().take(n).cloned().collect()).collect()
}

#[derive(Serialize)]
struct Report {
    url: String,
    endpoint: &'static str,
    model: String,
    prompts: String,
    /// Whether a run sent a prompt an earlier run had sent (the file held too few).
    prompts_repeated: bool,
    num_requests: usize,
    max_tokens: usize,
    ignore_eos: bool,
    temperature: f64,
    extra_body: Map<String, Value>,
    peak_metric: Option<String>,
    runs: Vec<RunStats>,
}

#[derive(Serialize)]
struct RunStats {
    concurrency: usize,
    completed: usize,
    errors: usize,
    first_error: Option<String>,
    duration_s: f64,
    prompt_tokens: u64,
    output_tokens: u64,
    output_tok_s: f64,
    requests_per_s: f64,
    ttft_ms: Percentiles,
    itl_ms: Percentiles,
    latency_ms: Percentiles,
    peak_metric: Option<f64>,
}

#[derive(Serialize)]
struct Percentiles {
    mean: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (seconds), reported in milliseconds.
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * values.len() as f64).ceil() as usize;
            values.get(i.max(1) - 1).map(|v| v * 1e3)
        };
        let mean = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64 * 1e3);
        Percentiles { mean, p50: rank(50.0), p99: rank(99.0) }
    }
}

/// One request's timings (seconds) and counts.
struct Timed {
    ttft: f64,
    gaps: Vec<f64>,
    latency: f64,
    prompt_tokens: u64,
    output_tokens: u64,
}

struct Client {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
}

impl Client {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.get(format!("{}{path}", self.url)))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.post(format!("{}{path}", self.url)))
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => r.bearer_auth(key),
            None => r,
        }
    }
}

async fn bench(args: &Args, prompts: Vec<Vec<String>>, extra: Map<String, Value>) -> Result<Report> {
    let client = Arc::new(Client {
        // A fresh connection per request: with pooled connections every other request to
        // llama-server failed ("connection closed before message completed": it had closed the
        // kept-alive connection after the streamed answer). On localhost a connect costs ~0.1 ms.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(args.timeout))
            .pool_max_idle_per_host(0)
            .build()?,
        url: args.url.trim_end_matches('/').to_string(),
        api_key: args.api_key.clone(),
    });
    let model = match &args.model {
        Some(m) => m.clone(),
        None => served_model(&client).await?,
    };
    let body = |prompt: &str| {
        let mut body = match args.endpoint {
            Endpoint::Completions => json!({"prompt": prompt}),
            Endpoint::Chat => json!({"messages": [{"role": "user", "content": prompt}]}),
        };
        let fields = body.as_object_mut().expect("an object");
        fields.extend([
            ("model".into(), json!(model)),
            ("max_tokens".into(), json!(args.max_tokens)),
            ("temperature".into(), json!(args.temperature)),
            ("stream".into(), json!(true)),
            ("stream_options".into(), json!({"include_usage": true})),
        ]);
        if args.ignore_eos {
            fields.insert("ignore_eos".into(), json!(true));
        }
        fields.extend(extra.clone());
        body
    };
    for _ in 0..args.warmup {
        let mut warm = body("Write one sentence about the sea.");
        warm["max_tokens"] = json!(args.max_tokens.min(8));
        request(&client, args.endpoint, warm).await.map_err(|e| anyhow!("warm-up request failed: {e}"))?;
    }
    let distinct: std::collections::HashSet<&String> = prompts.iter().flatten().collect();
    let prompts_repeated = distinct.len() < prompts.iter().map(Vec::len).sum::<usize>();
    let mut runs = Vec::new();
    for (&concurrency, prompts) in args.concurrency.iter().zip(&prompts) {
        let bodies: Arc<Vec<Value>> = Arc::new(prompts.iter().map(|p| body(p)).collect());
        runs.push(run_level(&client, args, &bodies, concurrency).await);
    }
    Ok(Report {
        url: args.url.clone(),
        endpoint: args.endpoint.path(),
        model,
        prompts: args.prompts.display().to_string(),
        prompts_repeated,
        num_requests: args.num_requests,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        temperature: args.temperature,
        extra_body: extra,
        peak_metric: args.peak_metric.clone(),
        runs,
    })
}

/// The first model of the server's /v1/models.
async fn served_model(client: &Client) -> Result<String> {
    let url = format!("{}/v1/models", client.url);
    let r = client.get("/v1/models").send().await.map_err(|e| anyhow!("{url}: {}", one_line(&e)))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| anyhow!("{url}: {}", one_line(&e)))?;
    if !status.is_success() {
        bail!("{url}: HTTP {status}: {}", clip(&text));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{url}: not JSON: {e}"))?;
    v["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| anyhow!("{url} lists no model: {}", clip(&text)))
}

/// All requests at `concurrency` in flight: each worker takes the next body until none is left.
async fn run_level(client: &Arc<Client>, args: &Args, bodies: &Arc<Vec<Value>>, concurrency: usize) -> RunStats {
    let bar = progress_bar(bodies.len() as u64, &format!("concurrency {concurrency}"));
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let poller = args.peak_metric.clone().map(|name| tokio::spawn(peak_gauge(client.clone(), name, done.clone())));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(bodies.len()) {
        let (client, bodies, next, bar, endpoint) =
            (client.clone(), bodies.clone(), next.clone(), bar.clone(), args.endpoint);
        workers.spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                results.push(request(&client, endpoint, body.clone()).await);
                bar.inc(1);
            }
            results
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = workers.join_next().await {
        // A worker only ends by returning: its requests' errors are values, never panics.
        results.extend(joined.unwrap_or_default());
    }
    let duration = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let peak = match poller {
        Some(p) => p.await.ok().flatten(),
        None => None,
    };
    bar.finish_and_clear();
    let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let ok: Vec<Timed> = ok.into_iter().filter_map(Result::ok).collect();
    let output_tokens: u64 = ok.iter().map(|t| t.output_tokens).sum();
    RunStats {
        concurrency,
        completed: ok.len(),
        errors: failed.len(),
        first_error: failed.into_iter().find_map(Result::err),
        duration_s: duration,
        prompt_tokens: ok.iter().map(|t| t.prompt_tokens).sum(),
        output_tokens,
        output_tok_s: output_tokens as f64 / duration,
        requests_per_s: ok.len() as f64 / duration,
        ttft_ms: Percentiles::of(ok.iter().map(|t| t.ttft).collect()),
        itl_ms: Percentiles::of(ok.iter().flat_map(|t| t.gaps.iter().copied()).collect()),
        latency_ms: Percentiles::of(ok.iter().map(|t| t.latency).collect()),
        peak_metric: peak,
    }
}

/// The largest value of gauge `name` in /metrics until `done` (None if it never appeared).
async fn peak_gauge(client: Arc<Client>, name: String, done: Arc<AtomicBool>) -> Option<f64> {
    let mut peak: Option<f64> = None;
    while !done.load(Ordering::Relaxed) {
        if let Ok(r) = client.get("/metrics").send().await {
            if let Ok(text) = r.text().await {
                let values = text
                    .lines()
                    .filter(|l| l.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with([' ', '{'])))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
                for v in values {
                    peak = Some(peak.map_or(v, |p: f64| p.max(v)));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak
}

/// Send one streaming request and time its server-sent events. Any failure is one line.
async fn request(client: &Client, endpoint: Endpoint, body: Value) -> Result<Timed, String> {
    let start = Instant::now();
    let mut r = client.post(endpoint.path()).json(&body).send().await.map_err(|e| one_line(&e))?;
    let status = r.status();
    if !status.is_success() {
        let text = r.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", clip(&text)));
    }
    let mut events = Events::default();
    let mut pending = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| one_line(&e))? {
        let now = start.elapsed().as_secs_f64();
        pending.extend_from_slice(&chunk);
        // Whole lines only: an event may arrive split over several chunks.
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            events.line(String::from_utf8_lossy(&line).trim(), now, endpoint)?;
        }
    }
    if !events.done {
        return Err("the stream ended before data: [DONE]".into());
    }
    let ttft = events.first.ok_or("the stream held no token")?;
    Ok(Timed {
        ttft,
        gaps: events.gaps,
        latency: start.elapsed().as_secs_f64(),
        prompt_tokens: events.prompt_tokens.unwrap_or(0),
        // The server's own count when it sends usage; else one token per content event.
        output_tokens: events.completion_tokens.unwrap_or(events.content_events),
    })
}

/// What a stream has said so far.
#[derive(Default)]
struct Events {
    first: Option<f64>,
    last: f64,
    gaps: Vec<f64>,
    content_events: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    done: bool,
}

impl Events {
    fn line(&mut self, line: &str, now: f64, endpoint: Endpoint) -> Result<(), String> {
        let Some(data) = line.strip_prefix("data:").map(str::trim) else { return Ok(()) };
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("an event is not JSON ({e}): {}", clip(data)))?;
        if let Some(e) = v.get("error") {
            return Err(format!("error event: {}", clip(&e.to_string())));
        }
        let choice = &v["choices"][0];
        let text = match endpoint {
            Endpoint::Completions => &choice["text"],
            Endpoint::Chat => &choice["delta"]["content"],
        };
        if text.as_str().is_some_and(|t| !t.is_empty()) {
            match self.first {
                None => self.first = Some(now),
                Some(_) => self.gaps.push(now - self.last),
            }
            self.last = now;
            self.content_events += 1;
        }
        if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
            self.prompt_tokens = usage["prompt_tokens"].as_u64().or(self.prompt_tokens);
            self.completion_tokens = usage["completion_tokens"].as_u64().or(self.completion_tokens);
        }
        Ok(())
    }
}

/// An HTTP client error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

/// At most 200 characters of a server's answer, on one line.
fn clip(text: &str) -> String {
    let line = text.replace(['\n', '\r'], " ");
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

fn print_table(r: &Report) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "server  {} ({}, model {}, {} requests per run, max_tokens {}{})",
        r.url,
        r.endpoint,
        r.model,
        r.num_requests,
        r.max_tokens,
        if r.ignore_eos { ", ignore_eos" } else { "" }
    );
    let repeated =
        if r.prompts_repeated { " (some sent more than once: a server's prompt cache may answer them)" } else { "" };
    println!("prompts {}{repeated}", r.prompts);
    if !r.extra_body.is_empty() {
        println!("body    {}", Value::Object(r.extra_body.clone()));
    }
    let peak = r.peak_metric.as_deref().map(|m| format!("  peak {m}")).unwrap_or_default();
    println!(
        "{:>5} {:>5} {:>4} {:>10} {:>6} {:>9} {:>9} {:>8} {:>8}{peak}",
        "conc", "ok", "err", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"
    );
    for s in &r.runs {
        let peak = match (&r.peak_metric, s.peak_metric) {
            (Some(_), Some(v)) => format!("  {v}"),
            (Some(_), None) => "  -".into(),
            (None, _) => String::new(),
        };
        println!(
            "{:>5} {:>5} {:>4} {:>10.1} {:>6.2} {:>9} {:>9} {:>8} {:>8}{peak}",
            s.concurrency,
            s.completed,
            s.errors,
            s.output_tok_s,
            s.requests_per_s,
            ms(s.ttft_ms.p50),
            ms(s.ttft_ms.p99),
            ms(s.itl_ms.p50),
            ms(s.itl_ms.p99)
        );
    }
    println!("(TTFT and ITL in ms)");
    for s in r.runs.iter().filter(|s| s.errors > 0) {
        println!(
            "errors at concurrency {}: {} (first: {})",
            s.concurrency,
            s.errors,
            s.first_error.as_deref().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_in_ms() {
        let p = Percentiles::of((1..=100).map(|i| i as f64 / 1e3).collect());
        assert_eq!((p.p50, p.p99), (Some(50.0), Some(99.0)));
        assert!((p.mean.unwrap() - 50.5).abs() < 1e-9);
        let one = Percentiles::of(vec![0.002]);
        assert_eq!((one.p50, one.p99), (Some(2.0), Some(2.0)));
        assert!(Percentiles::of(Vec::new()).p50.is_none());
    }

    #[test]
    fn each_run_sends_prompts_no_earlier_run_sent() {
        let prompts: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
        assert_eq!(per_run(&prompts, 2, 2), [["p0", "p1"], ["p2", "p3"]]);
        // Too few: the runs wrap around.
        assert_eq!(per_run(&prompts, 3, 2), [["p0", "p1"], ["p2", "p3"], ["p4", "p0"]]);
        assert_eq!(per_run(&prompts[..1], 1, 3), [["p0", "p0", "p0"]]);
    }

    #[test]
    fn events_time_content_and_read_usage() {
        let mut e = Events::default();
        let chat = Endpoint::Chat;
        e.line(r#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#, 0.1, chat).unwrap();
        e.line(r#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#, 0.5, chat).unwrap();
        e.line("", 0.5, chat).unwrap();
        e.line(r#"data: {"choices":[{"delta":{"content":" there"}}]}"#, 0.7, chat).unwrap();
        e.line(r#"data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#, 0.8, chat).unwrap();
        assert!(!e.done);
        e.line("data: [DONE]", 0.8, chat).unwrap();
        assert_eq!((e.first, e.content_events, e.completion_tokens, e.prompt_tokens), (Some(0.5), 2, Some(2), Some(9)));
        assert_eq!(e.gaps.len(), 1);
        assert!((e.gaps[0] - 0.2).abs() < 1e-12);
        let err = e.line(r#"data: {"error":{"message":"boom"}}"#, 0.9, chat).unwrap_err();
        assert!(err.contains("boom"), "{err}");
    }
}
