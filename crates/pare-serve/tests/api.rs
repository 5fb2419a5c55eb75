//! The HTTP API against a real server: answers equal pare's own generation, streams equal
//! whole answers, log-probabilities equal the model's, and bad input is a 400 that harms nobody.

mod common;

use candle_core::D;
use common::{encode, generate_alone, model, post, sse_data, Limits, KEY, MODEL};
use pare_generate::GenerationConfig;
use pare_press::PressOptions;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// 128 MiB of KV: SmolLM2 in f32 holds 45 KiB a token, so about 2900 tokens at once.
const KV_MEMORY: usize = 128 << 20;

async fn base() -> String {
    common::server(Limits { max_concurrent: 8, max_queue: 64, kv_memory: KV_MEMORY }).await
}

fn greedy() -> GenerationConfig {
    GenerationConfig { do_sample: Some(false), ..GenerationConfig::default() }
}

#[tokio::test]
async fn greedy_completion_equals_pare_generate() {
    let base = base().await;
    let prompt = "The capital of France is";
    let (status, body) =
        post(&base, "/v1/completions", &json!({"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0}))
            .await;
    assert_eq!(status, 200, "{body}");
    let alone = generate_alone(&encode(prompt), greedy(), 20, None);
    assert_eq!(body["choices"][0]["text"], alone.text);
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["prompt_tokens"], encode(prompt).len());
    assert_eq!(body["usage"]["completion_tokens"], alone.tokens.len());
    assert_eq!(body["usage"]["total_tokens"], encode(prompt).len() + alone.tokens.len());
    let reason = if alone.tokens.len() == 20 { "length" } else { "stop" };
    assert_eq!(body["choices"][0]["finish_reason"], reason);
}

/// Requests with different samplers and presses, all at once (the plain ones prefilled in one
/// forward, beside the others' decode rows): each equals its run alone.
#[tokio::test]
async fn concurrent_mixed_requests_each_equal_running_alone() {
    let base = base().await;
    let knorm = PressOptions { ratio: Some(0.5), ..PressOptions::default() };
    let snapkv = PressOptions { ratio: Some(0.3), window: Some(4), ..PressOptions::default() };
    let streaming = PressOptions { budget: Some(12), sinks: Some(2), ..PressOptions::default() };
    let sampled = |t: f32, k: i64, seed: u64| GenerationConfig {
        do_sample: Some(true),
        temperature: Some(t),
        top_k: Some(k),
        seed: Some(seed),
        ..GenerationConfig::default()
    };
    type Case = (&'static str, Value, GenerationConfig, Option<(&'static str, PressOptions)>);
    let mut cases: Vec<Case> = vec![
        ("Once upon a time", json!({"temperature": 0, "max_tokens": 24}), greedy(), None),
        (
            "The three primary colors are",
            json!({"temperature": 0, "max_tokens": 16, "press": {"name": "knorm", "ratio": 0.5}}),
            greedy(),
            Some(("knorm", knorm)),
        ),
        (
            "def fibonacci(n):",
            json!({"temperature": 0.8, "top_k": 40, "seed": 7, "max_tokens": 20}),
            sampled(0.8, 40, 7),
            None,
        ),
        (
            "My favourite food is",
            json!({"temperature": 0, "max_tokens": 12, "repetition_penalty": 1.3, "presence_penalty": 0.5}),
            GenerationConfig { repetition_penalty: Some(1.3), presence_penalty: Some(0.5), ..greedy() },
            None,
        ),
        (
            "In the beginning the universe was created. This has made a lot of people very angry and",
            json!({"temperature": 0, "max_tokens": 18, "press": {"name": "snapkv", "ratio": 0.3, "window": 4}}),
            greedy(),
            Some(("snapkv", snapkv)),
        ),
        (
            "A list of fruits: apple, banana,",
            json!({"temperature": 1.2, "top_p": 0.9, "min_p": 0.05, "seed": 3, "max_tokens": 15, "top_k": 0}),
            GenerationConfig { top_p: Some(0.9), min_p: Some(0.05), ..sampled(1.2, 0, 3) },
            None,
        ),
        (
            "The quick brown fox jumps over the lazy dog. The quick brown fox",
            json!({"temperature": 0, "max_tokens": 10, "press": {"name": "streaming", "budget": 12, "sinks": 2}}),
            greedy(),
            Some(("streaming", streaming)),
        ),
        (
            "Water boils at",
            json!({"temperature": 0, "max_tokens": 8, "stop": ["\n", "."]}),
            GenerationConfig { stop: Some(vec!["\n".into(), ".".into()]), ..greedy() },
            None,
        ),
    ];
    // A hook-free prompt over the engine's prefill chunk (256 tokens) prefills over several steps.
    let long: &'static str = "The river ran past the old mill and the children counted the boats. ".repeat(24).leak();
    assert!(encode(long).len() > 256);
    cases.push((long, json!({"temperature": 0, "max_tokens": 8}), greedy(), None));
    let requests = cases.iter().map(|(prompt, extra, _, _)| {
        let mut body = json!({"model": MODEL, "prompt": prompt});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let base = base.clone();
        async move { post(&base, "/v1/completions", &body).await }
    });
    let answers = futures_util::future::join_all(requests).await;
    for ((prompt, extra, config, press), (status, body)) in cases.into_iter().zip(answers) {
        assert_eq!(status, 200, "{prompt}: {body}");
        let max = extra["max_tokens"].as_u64().expect("max_tokens") as usize;
        let alone = generate_alone(&encode(prompt), config, max, press);
        assert_eq!(body["choices"][0]["text"], alone.text, "{prompt} with {extra}");
        assert_eq!(body["usage"]["completion_tokens"], alone.tokens.len(), "{prompt}");
    }
    // The hook-free prompts that arrived together were prefilled together: some step ran more
    // than one prompt's chunk in its one forward.
    let m = common::get_metrics(&base).await;
    assert!(
        common::metric(&m, "pare_prefill_chunks_total") > common::metric(&m, "pare_prefill_steps_total"),
        "no step prefilled two prompts at once:\n{m}"
    );
}

async fn stream_text(base: &str, path: &str, body: &Value) -> (String, Vec<Value>) {
    let r = common::client().post(format!("{base}{path}")).bearer_auth(KEY).json(body).send().await.expect("stream");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = r.text().await.expect("body");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("a JSON chunk")).collect();
    let mut out = String::new();
    for c in &chunks {
        for choice in c["choices"].as_array().expect("choices") {
            out.push_str(choice["text"].as_str().or(choice["delta"]["content"].as_str()).unwrap_or(""));
        }
    }
    (out, chunks)
}

#[tokio::test]
async fn streamed_chunks_concatenate_to_the_whole_answer() {
    let base = base().await;
    let body = json!({"model": MODEL, "prompt": "Here is a short poem about the sea:", "max_tokens": 30,
                      "temperature": 0.7, "seed": 11, "stop": "\n\n"});
    let (_, whole) = post(&base, "/v1/completions", &body).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (text, chunks) = stream_text(&base, "/v1/completions", &streamed).await;
    assert_eq!(text, whole["choices"][0]["text"].as_str().expect("text"));
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]), "the usage chunk has no choices");
    assert_eq!(last["usage"], whole["usage"]);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
    let finishes: Vec<&Value> =
        chunks.iter().flat_map(|c| c["choices"].as_array().unwrap()).map(|c| &c["finish_reason"]).collect();
    assert_eq!(finishes.iter().filter(|f| !f.is_null()).count(), 1);

    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "max_completion_tokens": 24, "temperature": 0});
    let (status, whole) = post(&base, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (text, chunks) = stream_text(&base, "/v1/chat/completions", &streamed).await;
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().expect("content"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage without include_usage");
}

#[tokio::test]
async fn chat_uses_the_template_and_equals_pare_generate() {
    let base = base().await;
    let question = "Name a primary color.";
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 20, "temperature": 0});
    let (status, body) = post(&base, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{body}");
    let m = model();
    let tok = m.tokenizer().unwrap();
    let text = pare_formats::render_chat(
        tok.chat_template.as_deref().unwrap(),
        &[pare_formats::ChatMessage::new("user", question)],
        true,
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let alone = generate_alone(&ids, greedy(), 20, None);
    assert_eq!(body["choices"][0]["message"]["content"], alone.text);
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    // /tokenize renders the same conversation.
    let (_, t) = post(&base, "/tokenize", &json!({"messages": [{"role": "user", "content": question}]})).await;
    assert_eq!(t["tokens"], json!(ids));
    let (_, d) = post(&base, "/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(d["prompt"], text);
    // What lm-eval-harness's remote tokenizer reads: special tokens and the chat template.
    let info = common::client().get(format!("{base}/tokenizer_info")).bearer_auth(KEY).send().await.unwrap();
    let info: Value = info.json().await.unwrap();
    assert_eq!(info["eos_token"], json!(tok.eos_token));
    assert_eq!(info["chat_template"], json!(tok.chat_template));
    assert_eq!(info["model_max_length"], model().model.config().max_position_embeddings);
}

#[tokio::test]
async fn ignore_eos_runs_to_the_token_limit() {
    let base = base().await;
    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                              "max_tokens": 24, "temperature": 0});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, plain) = post(&base, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(status, 200, "{plain}");
    // The short answer ends at EOS well before the limit...
    assert_eq!(plain["choices"][0]["finish_reason"], "stop", "{plain}");
    let stopped = plain["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(stopped < 24, "{plain}");
    // ...and with ignore_eos the same greedy answer goes on to exactly max_tokens.
    let (status, full) = post(&base, "/v1/chat/completions", &chat(json!({"ignore_eos": true}))).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["choices"][0]["finish_reason"], "length", "{full}");
    assert_eq!(full["usage"]["completion_tokens"], 24, "{full}");
    let text = full["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with(plain["choices"][0]["message"]["content"].as_str().unwrap()), "{text:?}");
    let (status, _) = post(&base, "/v1/chat/completions", &chat(json!({"ignore_eos": false}))).await;
    assert_eq!(status, 200);
    let (status, err) = post(&base, "/v1/chat/completions", &chat(json!({"ignore_eos": "yes"}))).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("ignore_eos")), "{err}");
}

/// log_softmax of the model's logits at every position of `ids`.
fn model_logprobs(ids: &[u32]) -> Vec<Vec<f32>> {
    let logits = pare_test_support::logits_all(&model().model, ids).unwrap();
    candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2().unwrap()
}

#[tokio::test]
async fn echoed_logprobs_equal_the_models() {
    let base = base().await;
    let prompt = "The capital of France is Paris, and the capital of Italy is Rome.";
    let ids = encode(prompt);
    // lm-eval-harness's loglikelihood request: echo, logprobs, nothing generated.
    let (status, body) = post(
        &base,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), ids.len());
    assert!(token_logprobs[0].is_null(), "the first token has no context");
    let expected = model_logprobs(&ids);
    for i in 1..ids.len() {
        let got = token_logprobs[i].as_f64().unwrap();
        let want = expected[i - 1][ids[i] as usize] as f64;
        assert!((got - want).abs() < 1e-4, "token {i}: {got} vs {want}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let best = expected[i - 1].iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let top_max = top.values().map(|v| v.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert!((top_max - best).abs() < 1e-4, "token {i}: top {top_max} vs {best}");
    }
    assert_eq!(body["choices"][0]["text"], model().tokenizer().unwrap().decode(&ids, false).unwrap());
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(body["usage"]["completion_tokens"], 0);

    // Generated tokens: their log-probabilities are the model's next-token distribution (`pare score`).
    let short = "The capital of France is";
    let (status, body) = post(
        &base,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": short, "max_tokens": 1, "logprobs": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200);
    let short_ids = encode(short);
    let next = &model_logprobs(&short_ids)[short_ids.len() - 1];
    let mut order: Vec<usize> = (0..next.len()).collect();
    order.sort_by(|&a, &b| next[b].total_cmp(&next[a]));
    let got = body["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().unwrap();
    assert!((got - next[order[0]] as f64).abs() < 1e-4, "greedy takes the most likely token");
    let top = body["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap();
    assert_eq!(top.len(), 5);
    let tok = model().tokenizer().unwrap();
    for &id in &order[..5] {
        let v = top[&tok.decode(&[id as u32], false).unwrap()].as_f64().unwrap();
        assert!((v - next[id] as f64).abs() < 1e-4);
    }

    // Chat's format: content entries with top_logprobs.
    let (status, body) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
                "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), body["usage"]["completion_tokens"].as_u64().unwrap() as usize);
    for c in content {
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2);
        assert!(c["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(c["top_logprobs"][0]["logprob"], c["logprob"], "greedy: the chosen token is the top one");
    }
}

#[tokio::test]
async fn n_choices_and_many_prompts() {
    let base = base().await;
    let (status, body) = post(
        &base,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ["Hello", "Goodbye"], "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    // Choice j of a prompt draws with seed + j: choice 1 of "Goodbye" is the seed-6 sample.
    let config = GenerationConfig {
        do_sample: Some(true),
        temperature: Some(1.0),
        top_k: Some(0),
        seed: Some(6),
        ..GenerationConfig::default()
    };
    assert_eq!(choices[3]["text"], generate_alone(&encode("Goodbye"), config, 5, None).text);
    assert_eq!(body["usage"]["prompt_tokens"], encode("Hello").len() + encode("Goodbye").len());
}

#[tokio::test]
async fn models_health_and_auth() {
    let base = base().await;
    let c = common::client();
    let health = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "health needs no key");
    let models: Value = c.get(format!("{base}/v1/models")).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    for key in [Some("wrong-key"), None] {
        let mut r = c.post(format!("{base}/v1/completions")).json(&json!({"prompt": "hi", "max_tokens": 1}));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    let metrics = c.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 401);
}

fn is_error_body(body: &Value) -> bool {
    let e = &body["error"];
    e["message"].as_str().is_some_and(|m| !m.is_empty())
        && e["type"].is_string()
        && e.as_object().is_some_and(|o| o.contains_key("param") && o.contains_key("code"))
}

/// Raw body → (status, JSON answer).
async fn post_raw(base: &str, path: &str, body: &str, content_type: &str) -> (u16, Value) {
    let r = common::client()
        .post(format!("{base}{path}"))
        .bearer_auth(KEY)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .expect("the server answers");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}")))
}

#[tokio::test]
async fn bad_input_is_a_400_with_an_openai_error() {
    let base = base().await;
    let long: Vec<u32> = vec![42; 9000];
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("malformed JSON", r#"{"prompt": "a","#.into(), None),
        ("not an object", "[1, 2]".into(), None),
        ("NaN", r#"{"prompt": "a", "temperature": NaN}"#.into(), None),
        ("prompt of the wrong type", r#"{"prompt": 5}"#.into(), Some("prompt")),
        ("temperature as a string", r#"{"prompt": "a", "temperature": "hot"}"#.into(), Some("temperature")),
        ("negative temperature", r#"{"prompt": "a", "temperature": -1}"#.into(), Some("temperature")),
        ("overflowing float", r#"{"prompt": "a", "top_p": 1e300}"#.into(), Some("top_p")),
        ("top_p above 1", r#"{"prompt": "a", "top_p": 1.5}"#.into(), Some("top_p")),
        ("n zero", r#"{"prompt": "a", "n": 0}"#.into(), Some("n")),
        ("negative max_tokens", r#"{"prompt": "a", "max_tokens": -1}"#.into(), Some("max_tokens")),
        ("too many logprobs", r#"{"prompt": "a", "logprobs": 50}"#.into(), Some("logprobs")),
        ("unknown field", r#"{"prompt": "a", "temprature": 0}"#.into(), None),
        ("empty prompt", r#"{"prompt": ""}"#.into(), Some("prompt")),
        ("token id outside the vocabulary", r#"{"prompt": [1, 99999999]}"#.into(), Some("prompt")),
        ("prompt longer than the context", json!({"prompt": long}).to_string(), Some("prompt")),
        ("unknown press", r#"{"prompt": "a", "press": {"name": "squeeze", "ratio": 0.5}}"#.into(), Some("press")),
        ("unknown press option", r#"{"prompt": "a", "press": {"name": "knorm", "ratoi": 0.5}}"#.into(), None),
        (
            "press option on the wrong press",
            r#"{"prompt": "a", "press": {"name": "knorm", "ratio": 0.5, "window": 8}}"#.into(),
            Some("press"),
        ),
        ("press without a budget", r#"{"prompt": "a", "press": {"name": "knorm"}}"#.into(), Some("press")),
        (
            "press option out of range",
            r#"{"prompt": "a", "press": {"name": "compactor", "ratio": 0.5, "blending": 2}}"#.into(),
            Some("press"),
        ),
        (
            "a file on the server's disk",
            r#"{"prompt": "a", "press": {"name": "duo-attention", "head_ratio": 0.5, "duo_pattern": "/etc/passwd"}}"#
                .into(),
            None,
        ),
        ("bad prune spec", r#"{"prompt": "a", "prune_tokens": "99:0.5"}"#.into(), Some("prune_tokens")),
        (
            "n × max_tokens beyond the KV budget",
            r#"{"prompt": "a", "n": 8, "max_tokens": 2000}"#.into(),
            Some("max_tokens"),
        ),
        ("logit_bias out of range", r#"{"prompt": "a", "logit_bias": {"5": 500}}"#.into(), Some("logit_bias")),
        ("logit_bias on a non-token", r#"{"prompt": "a", "logit_bias": {"x": 1}}"#.into(), Some("logit_bias")),
        ("stream_options without stream", r#"{"prompt": "a", "stream_options": {"include_usage": true}}"#.into(), None),
        ("wrong model", r#"{"prompt": "a", "model": "gpt-4"}"#.into(), None),
    ];
    for (what, body, param) in &cases {
        let (status, answer) = post_raw(&base, "/v1/completions", body, "application/json").await;
        let want = if *what == "wrong model" { 404 } else { 400 };
        assert_eq!(status, want, "{what}: {answer}");
        assert!(is_error_body(&answer), "{what}: {answer}");
        if let Some(p) = param {
            assert_eq!(answer["error"]["param"], *p, "{what}: {answer}");
        }
    }
    let chat_cases = [
        r#"{"messages": []}"#,
        r#"{"messages": "hi"}"#,
        r#"{"messages": [{"role": "user"}], "top_logprobs": 3}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
    ];
    for body in chat_cases {
        let (status, answer) = post_raw(&base, "/v1/chat/completions", body, "application/json").await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(is_error_body(&answer), "{body}: {answer}");
    }
    let (status, answer) = post_raw(&base, "/v1/completions", r#"{"prompt": "a"}"#, "text/plain").await;
    assert_eq!(status, 415, "axum's content-type rejection, in OpenAI's shape");
    assert!(is_error_body(&answer));
    let (status, answer) = post_raw(&base, "/v1/nothing", "{}", "application/json").await;
    assert_eq!(status, 404);
    assert!(is_error_body(&answer));
}

/// Random mutations of valid bodies: every answer is JSON (an OpenAI error or a completion), and
/// the server still answers a good request afterwards.
#[tokio::test]
async fn fuzzed_bodies_never_break_the_server() {
    let base = base().await;
    let seeds = [
        r#"{"model":"smollm2-135m","prompt":"Hi","max_tokens":1,"temperature":0,"logprobs":2,"echo":true}"#,
        r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1,"top_k":5,"seed":1,"press":{"name":"knorm","ratio":0.5}}"#,
        r#"{"prompt":[1,2,3],"max_tokens":1,"n":2,"stop":["a"],"logit_bias":{"3":1.5},"prune_tokens":"2:0.5"}"#,
    ];
    let junk =
        ["", "null", "-1", "1e309", "\"x\"", "[]", "{}", "true", "0.0", "99999999999999999999", "[[1]]", "\u{1F600}"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for i in 0..150 {
        let path = if i % 3 == 1 { "/v1/chat/completions" } else { "/v1/completions" };
        let mut body: Vec<char> = seeds[i % 3].chars().collect();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..body.len());
            match rng.random_range(0..3) {
                0 => {
                    body.remove(at);
                }
                1 => body.insert(at, ['{', '}', '"', ',', ':', '[', ']', '-', '9'][rng.random_range(0..9)]),
                _ => {
                    let j = junk[rng.random_range(0..junk.len())];
                    // Replace the value after a colon, keeping the JSON's outline.
                    if let Some(colon) = body[at..].iter().position(|&c| c == ':').map(|p| p + at + 1) {
                        let end =
                            body[colon..].iter().position(|&c| c == ',' || c == '}').map_or(body.len(), |p| p + colon);
                        body.splice(colon..end, j.chars());
                    }
                }
            }
        }
        let text: String = body.into_iter().collect();
        let (status, answer) = post_raw(&base, path, &text, "application/json").await;
        assert!(status == 200 || (400..500).contains(&status), "{text} → {status}: {answer}");
        if status != 200 {
            assert!(is_error_body(&answer), "{text} → {answer}");
        }
    }
    let (status, _) = post(&base, "/v1/completions", &json!({"prompt": "Still there?", "max_tokens": 2})).await;
    assert_eq!(status, 200);
}
