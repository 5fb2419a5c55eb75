//! The HTTP API: OpenAI's completions, chat completions and models, plus health, metrics,
//! tokenize and detokenize; API-key auth, and one log line per request.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pare_formats::ChatMessage;
use pare_generate::FinishReason;
use pare_model::LoadedModel;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::engine::{Context, Engine, Event, Events, SeqRequest, TokenLogprob};
use crate::error::ApiError;
use crate::metrics as m;
use crate::request::{parse, split, Sampling};

/// What exists once the model has loaded.
pub struct Ready {
    pub loaded: Arc<LoadedModel>,
    pub engine: Engine,
    pub name: String,
    pub created: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub ready: Arc<OnceLock<Ready>>,
    pub api_key: Option<Arc<str>>,
    pub timeout: Duration,
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(ApiError::loading)
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/contexts", post(create_context).get(list_contexts))
        .route("/v1/contexts/{id}", axum::routing::delete(delete_context))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async { ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::status(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed")
        })
        .layer(axum::middleware::from_fn(count_requests))
        // Long prompts given as token ids are large bodies.
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

async fn auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Constant time: the comparison does not stop at the first differing byte.
        let same =
            given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !same {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn count_requests(request: Request, next: Next) -> Response {
    let endpoint =
        request.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::REQUESTS, "endpoint" => endpoint, "status" => status).increment(1);
    response
}

/// A JSON object body; axum's own rejections (bad JSON, wrong content type, too large) answer
/// in OpenAI's error shape too.
pub struct ApiJson(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for ApiJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<Value>::from_request(req, state).await {
            Ok(Json(Value::Object(map))) => Ok(ApiJson(map)),
            Ok(Json(_)) => Err(ApiError::invalid("the request body must be a JSON object", None)),
            Err(rejection) => Err(ApiError::status(rejection.status(), "invalid_request_error", rejection.body_text())),
        }
    }
}

async fn health(State(state): State<AppState>) -> Response {
    match state.ready() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_text() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m::handle().render()).into_response()
}

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": r.name, "object": "model", "created": r.created, "owned_by": "pare",
        "max_model_len": r.loaded.model.config().max_position_embeddings,
    }]})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    add_special_tokens: Option<bool>,
}

async fn tokenize(State(state): State<AppState>, ApiJson(body): ApiJson) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    let body: TokenizeBody = parse(Value::Object(body))?;
    check_model(r, body.model.as_deref())?;
    let tokens = match (body.prompt, body.messages) {
        (Some(prompt), None) => encode(r, &prompt, body.add_special_tokens.unwrap_or(true))?,
        (None, Some(messages)) => chat_prompt(r, messages)?,
        _ => return Err(ApiError::invalid("give either prompt or messages", None)),
    };
    let ctx = r.loaded.model.config().max_position_embeddings;
    Ok(Json(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": ctx})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn detokenize(State(state): State<AppState>, ApiJson(body): ApiJson) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    let body: DetokenizeBody = parse(Value::Object(body))?;
    check_model(r, body.model.as_deref())?;
    check_ids(r, &body.tokens, "tokens")?;
    let text = tokenizer(r).decode(&body.tokens, false).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}

/// The tokenizer's configuration as vLLM serves it: lm-eval-harness's `tokenizer_backend=remote`
/// reads the special tokens and the chat template here, then tokenizes through `/tokenize`.
async fn tokenizer_info(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    let tok = tokenizer(r);
    Ok(Json(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "unk_token": tok.unk_token, "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos,
        "chat_template": tok.chat_template,
        "model_max_length": r.loaded.model.config().max_position_embeddings,
    })))
}

fn tokenizer(r: &Ready) -> &pare_formats::TokenizerBundle {
    r.loaded.tokenizer.as_ref().expect("the server checked the model has a tokenizer at load")
}

fn check_model(r: &Ready, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != r.name => Err(ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("model {m:?} is not served here (this server serves {:?})", r.name),
        )
        .with_code("model_not_found")),
        _ => Ok(()),
    }
}

fn check_ids(r: &Ready, ids: &[u32], param: &str) -> Result<(), ApiError> {
    let vocab = r.loaded.model.config().vocab_size;
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => {
            Err(ApiError::invalid(format!("token id {t} is outside the vocabulary (size {vocab})"), Some(param)))
        }
        None => Ok(()),
    }
}

fn encode(r: &Ready, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    tokenizer(r).encode(text, special).map_err(|e| ApiError::invalid(format!("cannot tokenize: {e}"), Some("prompt")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: Option<Content>,
    /// A participant's name; the template has no place for it, so it is ignored.
    #[serde(rename = "name")]
    _name: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// The conversation through the model's chat template, ending in the assistant's header.
fn chat_prompt(r: &Ready, messages: Vec<Message>) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", Some("messages")));
    }
    let tok = tokenizer(r);
    let template = tok
        .chat_template
        .as_deref()
        .ok_or_else(|| ApiError::invalid("this model has no chat template: use /v1/completions", None))?;
    let mut turns = Vec::with_capacity(messages.len());
    for (i, msg) in messages.into_iter().enumerate() {
        let content = match msg.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("only text content parts are supported, got {kind:?}"),
                                Some(&format!("messages[{i}].content")),
                            ))
                        }
                    }
                }
                text
            }
        };
        turns.push(ChatMessage { role: msg.role, content });
    }
    let text = pare_formats::render_chat(template, &turns, true, tok.bos_token.as_deref(), tok.eos_token.as_deref())
        .map_err(|e| ApiError::invalid(format!("chat template: {e}"), Some("messages")))?;
    encode(r, &text, false)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextBody {
    model: Option<String>,
    /// Text (tokenized with the model's special tokens, as a prompt) or token ids.
    context: Value,
    /// A question-agnostic press: it compresses the context once, as it would a prompt.
    press: Option<pare_press::PressSpec>,
}

fn context_json(c: &Context) -> Value {
    json!({"id": c.id, "object": "context", "created": c.created, "tokens": c.tokens.len(),
           "kv_bytes": c.cache.bytes(), "kv_bytes_uncompressed": c.cache.uncompressed_bytes()})
}

/// `POST /v1/contexts`: compress a context once; requests then continue it by `context_id`.
async fn create_context(State(state): State<AppState>, ApiJson(body): ApiJson) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    let body: ContextBody = parse(Value::Object(body))?;
    check_model(r, body.model.as_deref())?;
    let tokens = match body.context {
        Value::String(text) if !text.is_empty() => encode(r, &text, true)?,
        Value::Array(items) => {
            let ids: Option<Vec<u32>> = items.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect();
            let ids = ids.ok_or_else(|| ApiError::invalid("context must be a string or token ids", Some("context")))?;
            check_ids(r, &ids, "context")?;
            ids
        }
        _ => return Err(ApiError::invalid("context must be a non-empty string or token ids", Some("context"))),
    };
    let ctx = r.loaded.model.config().max_position_embeddings;
    if tokens.is_empty() || tokens.len() >= ctx {
        return Err(ApiError::invalid(
            format!(
                "the context has {} tokens; it must have between 1 and {} (the model's context less one)",
                tokens.len(),
                ctx - 1
            ),
            Some("context"),
        )
        .with_code("context_length_exceeded"));
    }
    let press = match &body.press {
        Some(spec) => Some(spec.build().map_err(|e| ApiError::invalid(e.to_string(), Some("press")))?),
        None => None,
    };
    let mut hooks = pare_model::Hooks::new(press, None);
    hooks.bind(&r.loaded).map_err(|e| ApiError::invalid(e.to_string(), Some("press")))?;
    let context = r.engine.create_context(tokens, hooks).await?;
    Ok(Json(context_json(&context)))
}

async fn list_contexts(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    let contexts = r.engine.contexts.lock().expect("not poisoned");
    let mut data: Vec<&Arc<Context>> = contexts.values().collect();
    data.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    Ok(Json(json!({"object": "list", "data": data.iter().map(|c| context_json(c)).collect::<Vec<_>>()})))
}

/// Requests already running on the context keep their copies.
async fn delete_context(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = state.ready()?;
    match r.engine.contexts.lock().expect("not poisoned").remove(&id) {
        Some(_) => Ok(Json(json!({"id": id, "object": "context", "deleted": true}))),
        None => Err(context_not_found(&id)),
    }
}

/// One prompt of a completions request: its tokens and, for echo, its text.
struct Prompt {
    ids: Vec<u32>,
    text: String,
}

/// `special`: add the tokenizer's special tokens (BOS); not after a context, which has them.
fn completion_prompts(r: &Ready, value: Option<Value>, special: bool) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
            Some("prompt"),
        )
    };
    let ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
    };
    let from_ids = |ids: Vec<u32>| -> Result<Prompt, ApiError> {
        check_ids(r, &ids, "prompt")?;
        let text = tokenizer(r).decode(&ids, false).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Prompt { ids, text })
    };
    let from_text = |text: &str| {
        if text.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
        }
        Ok(Prompt { ids: encode(r, text, special)?, text: text.to_string() })
    };
    let prompts = match value {
        None => return Err(ApiError::invalid("prompt is required", Some("prompt"))),
        Some(Value::String(s)) => vec![from_text(&s)?],
        Some(Value::Array(items)) if items.is_empty() => vec![],
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => {
                items.iter().map(|s| s.as_str().ok_or_else(bad).and_then(from_text)).collect::<Result<_, _>>()?
            }
            Value::Number(_) => vec![from_ids(ids(&Value::Array(items)).ok_or_else(bad)?)?],
            Value::Array(_) => {
                items.iter().map(|p| ids(p).ok_or_else(bad).and_then(from_ids)).collect::<Result<_, _>>()?
            }
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    if prompts.is_empty() || prompts.iter().any(|p| p.ids.is_empty()) {
        return Err(ApiError::invalid("the prompt is empty (it encodes to no tokens)", Some("prompt")));
    }
    Ok(prompts)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionFields {
    echo: Option<bool>,
    logprobs: Option<usize>,
    max_tokens: Option<usize>,
    suffix: Option<String>,
    best_of: Option<usize>,
}

/// The most alternatives per token a request may ask for.
const MAX_TOP_LOGPROBS: usize = 20;

async fn completions(State(state): State<AppState>, ApiJson(body): ApiJson) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let r = state.ready()?;
    let (mut own, common) = split(body, &["prompt", "echo", "logprobs", "max_tokens", "suffix", "best_of"]);
    let prompt = own.as_object_mut().and_then(|o| o.remove("prompt"));
    let fields: CompletionFields = parse(own)?;
    let sampling = Sampling::parse(common)?;
    check_model(r, sampling.model())?;
    if fields.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported", Some("suffix")));
    }
    let n = sampling.n()?;
    if fields.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::invalid("best_of other than n is not supported", Some("best_of")));
    }
    if let Some(l) = fields.logprobs.filter(|&l| l > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            format!("logprobs must be at most {MAX_TOP_LOGPROBS}, got {l}"),
            Some("logprobs"),
        ));
    }
    let echo = fields.echo.unwrap_or(false);
    let context = context_of(r, &sampling)?;
    if echo && context.is_some() {
        return Err(ApiError::invalid("echo is not supported with context_id", Some("echo")));
    }
    let prompts = completion_prompts(r, prompt, context.is_none())?;
    let max_tokens = fields.max_tokens.unwrap_or(16);
    let ids = prompts.iter().map(|p| p.ids.clone()).collect();
    let seqs = sequences(r, &sampling, ids, n, max_tokens, fields.logprobs, echo, context)?;
    let format = Format::Completion { echo, logprobs: fields.logprobs.is_some(), prompts };
    respond(&state, r, format, &sampling, seqs, n, arrived).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatFields {
    messages: Vec<Message>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    max_completion_tokens: Option<usize>,
    max_tokens: Option<usize>,
}

async fn chat_completions(State(state): State<AppState>, ApiJson(body): ApiJson) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let r = state.ready()?;
    let (own, common) = split(body, &["messages", "logprobs", "top_logprobs", "max_completion_tokens", "max_tokens"]);
    let fields: ChatFields = parse(own)?;
    let sampling = Sampling::parse(common)?;
    check_model(r, sampling.model())?;
    let n = sampling.n()?;
    let logprobs = fields.logprobs.unwrap_or(false);
    let top = match fields.top_logprobs {
        Some(t) if t > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {t}"),
                Some("top_logprobs"),
            ))
        }
        Some(_) if !logprobs => {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true", Some("top_logprobs")))
        }
        t => t.unwrap_or(0),
    };
    let prompt = chat_prompt(r, fields.messages)?;
    let context = context_of(r, &sampling)?;
    let ctx = r.loaded.model.config().max_position_embeddings;
    // OpenAI's default: as much as the context leaves.
    let before = prompt.len() + context.as_ref().map_or(0, |c| c.tokens.len());
    let max_tokens = fields.max_completion_tokens.or(fields.max_tokens).unwrap_or(ctx.saturating_sub(before));
    let seqs = sequences(r, &sampling, vec![prompt], n, max_tokens, logprobs.then_some(top), false, context)?;
    respond(&state, r, Format::Chat { logprobs }, &sampling, seqs, n, arrived).await
}

/// The context a request names (`context_id`): 404 when there is none by that id. The context
/// was compressed once, when it was made; the request's own tokens run without press or pruning.
fn context_of(r: &Ready, sampling: &Sampling) -> Result<Option<Arc<Context>>, ApiError> {
    let Some(id) = &sampling.fields.context_id else { return Ok(None) };
    if sampling.fields.press.is_some() || sampling.fields.prune_tokens.is_some() {
        return Err(ApiError::invalid(
            "press and prune_tokens do not apply with context_id: the context was compressed when it was made",
            Some("context_id"),
        ));
    }
    let context = r.engine.contexts.lock().expect("not poisoned").get(id).cloned();
    context.map(Some).ok_or_else(|| context_not_found(id).with_param("context_id"))
}

fn context_not_found(id: &str) -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", format!("no context {id:?}"))
        .with_code("context_not_found")
}

/// Every choice of every prompt as one sequence (prompt-major, as OpenAI numbers choices).
#[allow(clippy::too_many_arguments)]
fn sequences(
    r: &Ready,
    sampling: &Sampling,
    prompts: Vec<Vec<u32>>,
    n: usize,
    max_tokens: usize,
    logprobs: Option<usize>,
    echo: bool,
    context: Option<Arc<Context>>,
) -> Result<Vec<SeqRequest>, ApiError> {
    let ctx = r.loaded.model.config().max_position_embeddings;
    let before: &[u32] = context.as_ref().map_or(&[], |c| &c.tokens);
    // The checks below see what the model will: the context's tokens, then the prompt's.
    let full: Vec<Vec<u32>> = prompts.iter().map(|p| [before, p].concat()).collect();
    for p in &full {
        if p.len() >= ctx {
            return Err(ApiError::invalid(
                format!("the prompt has {} tokens; the model's context is {ctx}", p.len()),
                Some("prompt"),
            )
            .with_code("context_length_exceeded"));
        }
        if p.len() + max_tokens > ctx {
            return Err(ApiError::invalid(
                format!(
                    "the prompt ({} tokens) plus max_tokens ({max_tokens}) is longer than the model's context of {ctx} tokens",
                    p.len()
                ),
                Some("max_tokens"),
            )
            .with_code("context_length_exceeded"));
        }
    }
    let settings = sampling.settings(&r.loaded, max_tokens)?;
    let limits = r.engine.limits;
    let mut seqs = Vec::new();
    for prompt in prompts {
        for j in 0..n {
            let mut settings = settings.clone();
            settings.config.seed = settings.config.seed.map(|s| s.wrapping_add(j as u64));
            seqs.push(SeqRequest {
                prompt: prompt.clone(),
                settings,
                hooks: sampling.hooks(&r.loaded)?,
                top_logprobs: logprobs.unwrap_or(0),
                prompt_logprobs: logprobs.filter(|_| echo),
                kv_estimate: context.as_ref().map_or(0, |c| c.cache.bytes())
                    + sampling.kv_estimate(prompt.len(), max_tokens, limits.kv_bytes_per_token),
                context: context.clone(),
            });
        }
    }
    let total: usize = seqs.iter().map(|s| s.kv_estimate).sum();
    if total > limits.kv_memory {
        return Err(ApiError::invalid(
            format!(
                "the request needs up to {total} bytes of KV cache (n × (prompt + max_tokens)), more than the server's budget of {} bytes",
                limits.kv_memory
            ),
            Some("max_tokens"),
        ));
    }
    Ok(seqs)
}

/// How a request's events become OpenAI's JSON.
enum Format {
    Completion { echo: bool, logprobs: bool, prompts: Vec<Prompt> },
    Chat { logprobs: bool },
}

/// One choice as its events build it.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<TokenLogprob>,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Time => "length",
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// Token texts for OpenAI's logprobs: each token decoded alone.
fn token_text(r: &Ready, id: u32) -> String {
    tokenizer(r).decode(&[id], false).unwrap_or_default()
}

impl Format {
    fn object(&self, stream: bool) -> &'static str {
        match (self, stream) {
            (Format::Completion { .. }, _) => "text_completion",
            (Format::Chat { .. }, false) => "chat.completion",
            (Format::Chat { .. }, true) => "chat.completion.chunk",
        }
    }

    fn prefix(&self) -> &'static str {
        match self {
            Format::Completion { .. } => "cmpl",
            Format::Chat { .. } => "chatcmpl",
        }
    }

    /// OpenAI's legacy completions logprobs: parallel lists, `text_offset` counting characters
    /// of the returned text from `offset`.
    fn legacy_logprobs(r: &Ready, entries: &[Option<&TokenLogprob>], ids: &[u32], offset: usize) -> Value {
        let mut tokens = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top = Vec::new();
        let mut text_offset = Vec::new();
        let mut at = offset;
        for (entry, &id) in entries.iter().zip(ids) {
            let text = token_text(r, id);
            text_offset.push(at);
            at += text.chars().count();
            tokens.push(text);
            token_logprobs.push(entry.map(|e| e.logprob));
            top.push(entry.map(|e| {
                let mut m = Map::new();
                for &(alt, lp) in &e.top {
                    m.entry(token_text(r, alt)).or_insert(json!(lp));
                }
                Value::Object(m)
            }));
        }
        json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset})
    }

    fn chat_logprob(r: &Ready, t: &TokenLogprob) -> Value {
        let entry = |id: u32, lp: f32| {
            let text = token_text(r, id);
            json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
        };
        let mut e = entry(t.id, t.logprob);
        e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
        e
    }

    /// The completion's logprobs for `tokens`, the prompt's first when echoed.
    fn completion_logprobs(
        &self,
        r: &Ready,
        index: usize,
        n: usize,
        choice: &Choice,
        tokens: &[TokenLogprob],
    ) -> Value {
        let Format::Completion { echo, prompts, .. } = self else { unreachable!("completions only") };
        let prompt = &prompts[index / n];
        let mut entries: Vec<Option<&TokenLogprob>> = Vec::new();
        let mut ids = Vec::new();
        if *echo {
            if let Some(p) = &choice.prompt_logprobs {
                entries.extend(p.iter().map(Option::as_ref));
                ids.extend(&prompt.ids);
            }
        }
        entries.extend(tokens.iter().map(Some));
        ids.extend(tokens.iter().map(|t| t.id));
        // Echoed, the prompt's tokens come first and offsets run on through the completion.
        Format::legacy_logprobs(r, &entries, &ids, 0)
    }

    fn response(&self, r: &Ready, id: &str, created: u64, choices: &[Choice], n: usize, usage: &Value) -> Value {
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let finish = c.finish.map(finish_reason);
                match self {
                    Format::Completion { echo, logprobs, prompts } => {
                        let text = if *echo { format!("{}{}", prompts[i / n].text, c.text) } else { c.text.clone() };
                        let lp = logprobs.then(|| self.completion_logprobs(r, i, n, c, &c.tokens));
                        json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
                    }
                    Format::Chat { logprobs } => {
                        let lp = logprobs.then(|| {
                            json!({"content": c.tokens.iter().map(|t| Format::chat_logprob(r, t)).collect::<Vec<_>>()})
                        });
                        json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                               "finish_reason": finish})
                    }
                }
            })
            .collect();
        json!({"id": id, "object": self.object(false), "created": created, "model": r.name, "choices": out, "usage": usage})
    }

    /// Streamed chunks' `choices` entry for one event of choice `index`; None when the event shows nothing.
    fn chunk_choice(&self, r: &Ready, index: usize, n: usize, choice: &Choice, event: &Event) -> Option<Value> {
        match (self, event) {
            (Format::Chat { .. }, Event::Admitted) => Some(
                json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
            ),
            (Format::Completion { echo: true, logprobs: false, prompts }, Event::Admitted) => {
                Some(json!({"index": index, "text": prompts[index / n].text, "logprobs": null, "finish_reason": null}))
            }
            (Format::Completion { echo: true, logprobs: true, prompts }, Event::PromptLogprobs(_)) => {
                let lp = self.completion_logprobs(r, index, n, choice, &[]);
                Some(json!({"index": index, "text": prompts[index / n].text, "logprobs": lp, "finish_reason": null}))
            }
            (Format::Completion { logprobs, .. }, Event::Token { token, text_delta }) => {
                if text_delta.is_empty() && !logprobs {
                    return None;
                }
                let lp = logprobs.then(|| {
                    let offset = choice.text.chars().count() - text_delta.chars().count();
                    let Format::Completion { echo, prompts, .. } = self else { unreachable!() };
                    let base = if *echo { prompts[index / n].text.chars().count() } else { 0 };
                    Format::legacy_logprobs(r, &[Some(token)], &[token.id], base + offset)
                });
                Some(json!({"index": index, "text": text_delta, "logprobs": lp, "finish_reason": null}))
            }
            (Format::Chat { logprobs }, Event::Token { token, text_delta }) => {
                if text_delta.is_empty() && !logprobs {
                    return None;
                }
                let lp = logprobs.then(|| json!({"content": [Format::chat_logprob(r, token)]}));
                Some(json!({"index": index, "delta": {"content": text_delta}, "logprobs": lp, "finish_reason": null}))
            }
            (Format::Completion { .. }, Event::Finished { reason, .. }) => {
                Some(json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_reason(*reason)}))
            }
            (Format::Chat { .. }, Event::Finished { reason, .. }) => {
                Some(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason(*reason)}))
            }
            _ => None,
        }
    }
}

/// Fold one event into its choice; an error ends the request.
fn apply(choice: &mut Choice, event: &Event) -> Result<(), ApiError> {
    match event {
        Event::Admitted => {}
        Event::PromptLogprobs(p) => choice.prompt_logprobs = Some(p.clone()),
        Event::Token { token, text_delta } => {
            choice.text.push_str(text_delta);
            choice.tokens.push(token.clone());
        }
        Event::Finished { reason, completion_tokens, text_tail } => {
            choice.text.push_str(text_tail);
            choice.finish = Some(*reason);
            choice.completion_tokens = *completion_tokens;
        }
        Event::Failed { message, client } => {
            return Err(if *client {
                ApiError::invalid(message.clone(), None)
            } else {
                ApiError::internal(format!("generation failed: {message}"))
            });
        }
    }
    Ok(())
}

/// Timings and counts of one request, for its log line.
struct Trace {
    endpoint: &'static str,
    arrived: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

impl Trace {
    fn see(&mut self, event: &Event) {
        let now = Some(Instant::now());
        match event {
            Event::Admitted if self.admitted.is_none() => self.admitted = now,
            Event::Token { .. } if self.first_token.is_none() => self.first_token = now,
            _ => {}
        }
    }

    fn log(&self, id: &str, status: &str, choices: &[Choice], prompt_tokens: usize) {
        // Milliseconds with one decimal; -1 for what never happened (an error before admission).
        let ms = |t: Option<Instant>| t.map_or(-1.0, |t| ((t - self.arrived).as_secs_f64() * 1e4).round() / 10.0);
        let total = self.arrived.elapsed();
        metrics::histogram!(m::REQUEST_SECONDS).record(total.as_secs_f64());
        tracing::info!(
            id,
            endpoint = self.endpoint,
            status,
            prompt_tokens,
            completion_tokens = choices.iter().map(|c| c.completion_tokens).sum::<usize>(),
            queued_ms = ms(self.admitted),
            ttft_ms = ms(self.first_token),
            total_ms = ms(Some(Instant::now())),
            "request"
        );
    }
}

fn usage(prompt_tokens: usize, choices: &[Choice]) -> Value {
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion})
}

async fn respond(
    state: &AppState,
    r: &Ready,
    format: Format,
    sampling: &Sampling,
    seqs: Vec<SeqRequest>,
    n: usize,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let stream = sampling.stream();
    let include_usage = sampling.include_usage()?;
    // Prompt tokens (a context's included) count once per prompt, however many choices it has.
    let prompt_tokens: usize =
        seqs.iter().step_by(n).map(|s| s.prompt.len() + s.context.as_ref().map_or(0, |c| c.tokens.len())).sum();
    let count = seqs.len();
    let events = r.engine.submit(seqs)?;
    let endpoint = match format {
        Format::Completion { .. } => "/v1/completions",
        Format::Chat { .. } => "/v1/chat/completions",
    };
    let trace = Trace { endpoint, arrived, admitted: None, first_token: None };
    let id = request_id(format.prefix());
    let ready = state.ready.clone();
    let job = Job {
        format,
        id,
        created: now_unix(),
        n,
        count,
        prompt_tokens,
        trace,
        deadline: arrived + state.timeout,
        timeout: state.timeout,
    };
    if stream {
        let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(async move {
            let r = ready.get().expect("ready before submission");
            job.stream(r, events, tx, include_usage).await
        });
        let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        Ok(Sse::new(body).into_response())
    } else {
        job.collect(r, events).await.map(|v| Json(v).into_response())
    }
}

struct Job {
    format: Format,
    id: String,
    created: u64,
    n: usize,
    count: usize,
    prompt_tokens: usize,
    trace: Trace,
    deadline: Instant,
    timeout: Duration,
}

impl Job {
    async fn collect(mut self, r: &Ready, mut events: Events) -> Result<Value, ApiError> {
        let mut choices: Vec<Choice> = (0..self.count).map(|_| Choice::default()).collect();
        let mut done = 0;
        let result = loop {
            if done == self.count {
                let usage = usage(self.prompt_tokens, &choices);
                break Ok(self.format.response(r, &self.id, self.created, &choices, self.n, &usage));
            }
            let event = match tokio::time::timeout_at(self.deadline.into(), events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => break Err(ApiError::internal("the engine stopped")),
                Err(_) => break Err(ApiError::timeout(self.timeout.as_secs_f64())),
            };
            let (i, event) = event;
            self.trace.see(&event);
            if let Err(e) = apply(&mut choices[i], &event) {
                break Err(e);
            }
            done += usize::from(matches!(event, Event::Finished { .. }));
        };
        let status = result.as_ref().map_or_else(|e| e.status.as_u16().to_string(), |_| "200".into());
        self.trace.log(&self.id, &status, &choices, self.prompt_tokens);
        result
    }

    fn chunk(&self, r: &Ready, choices: Vec<Value>, usage: Option<Value>, include_usage: bool) -> SseEvent {
        let mut c = json!({"id": self.id, "object": self.format.object(true), "created": self.created, "model": r.name,
                           "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(c.to_string())
    }

    async fn stream(
        mut self,
        r: &Ready,
        mut events: Events,
        tx: mpsc::Sender<Result<SseEvent, Infallible>>,
        include_usage: bool,
    ) {
        let mut choices: Vec<Choice> = (0..self.count).map(|_| Choice::default()).collect();
        let mut done = 0;
        let status = loop {
            if done == self.count {
                if include_usage {
                    let usage = usage(self.prompt_tokens, &choices);
                    let _ = tx.send(Ok(self.chunk(r, vec![], Some(usage), true))).await;
                }
                let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                break "200".to_string();
            }
            let next = tokio::select! {
                // The client left: dropping `events` cancels the sequences.
                _ = tx.closed() => break "499".to_string(),
                e = tokio::time::timeout_at(self.deadline.into(), events.recv()) => e,
            };
            let (i, event) = match next {
                Ok(Some(e)) => e,
                Ok(None) => break self.fail(&tx, ApiError::internal("the engine stopped")).await,
                Err(_) => break self.fail(&tx, ApiError::timeout(self.timeout.as_secs_f64())).await,
            };
            self.trace.see(&event);
            if let Err(e) = apply(&mut choices[i], &event) {
                break self.fail(&tx, e).await;
            }
            done += usize::from(matches!(event, Event::Finished { .. }));
            if let Some(choice) = self.format.chunk_choice(r, i, self.n, &choices[i], &event) {
                if tx.send(Ok(self.chunk(r, vec![choice], None, include_usage))).await.is_err() {
                    break "499".to_string();
                }
            }
        };
        self.trace.log(&self.id, &status, &choices, self.prompt_tokens);
    }

    /// A stream that already answered 200 reports an error as one more event, as vLLM does.
    async fn fail(&self, tx: &mpsc::Sender<Result<SseEvent, Infallible>>, e: ApiError) -> String {
        let _ = tx.send(Ok(SseEvent::default().data(e.body().to_string()))).await;
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        e.status.as_u16().to_string()
    }
}
