//! The engine thread: owns the model, admits waiting sequences while they fit the KV budget and
//! the concurrency limit, steps every running sequence once per iteration, streams events out,
//! and drops a sequence as soon as its request's receiver is gone (client disconnect, timeout).
//!
//! The model is synchronous and CPU-heavy, so it lives on one dedicated OS thread; HTTP handlers
//! talk to it only through [`Engine::submit`] and the event channel it returns. Each sequence is
//! its own group in pare-generate's [`Batch`] (its own cache, hooks, processors and seed), and
//! one batched decode step advances every running sequence.
//!
//! Memory: sequences with a press, a pruner or a context reserve every token they may generate
//! and are never preempted; plain sequences reserve their prompt and a watermark, and when the
//! running ones outgrow `--kv-memory` the newest is preempted (its cache dropped, its tokens run
//! again later). Plain prompts share block-aligned prefixes through [`PrefixCache`]; compressed
//! contexts ([`Context`]) are shared by copy.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Instant;

use candle_core::DType;
use pare_generate::sampling::logprob;
use pare_generate::{
    top_logprobs, Batch, Event as BatchEvent, FinishReason, GenerateError, GroupSpec, SeqId, Settings, Suspended,
};
use pare_model::{Hooks, KvCache, LoadedModel, Logits, ModelError, Phase, PrefillInput};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::metrics as m;

/// What the HTTP side hands the engine for one sequence (one choice of a request).
pub struct SeqRequest {
    pub prompt: Vec<u32>,
    /// Checked generation settings (`max_new_tokens`, seed, EOS, stop strings, processors).
    pub settings: Settings,
    pub hooks: Hooks,
    /// How many most likely alternatives each generated token reports.
    pub top_logprobs: usize,
    /// Log-probabilities of the prompt's tokens (echo + logprobs), with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// KV bytes this sequence may come to hold; admission reserves them.
    pub kv_estimate: usize,
    /// A compressed context the prompt continues (`context_id`): its cache is copied.
    pub context: Option<Arc<Context>>,
}

impl SeqRequest {
    /// Plain: no hooks and no context, so running its tokens again rebuilds its cache exactly
    /// (preemptable) and its prompt's prefix is shareable.
    fn plain(&self) -> bool {
        self.hooks.is_empty() && self.context.is_none()
    }
}

/// A context compressed once (`POST /v1/contexts`) that requests continue from a copy of.
pub struct Context {
    pub id: String,
    pub tokens: Vec<u32>,
    pub cache: KvCache,
    pub created: u64,
}

/// Contexts by id, shared by the HTTP side (list, delete, look up) and the engine (accounting).
pub type Contexts = Arc<Mutex<HashMap<String, Arc<Context>>>>;

fn context_bytes(contexts: &Contexts) -> usize {
    contexts.lock().expect("not poisoned").values().map(|c| c.cache.bytes()).sum()
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Left the queue: prefill starts.
    Admitted,
    /// One entry per prompt token; the first has no context and so no log-probability.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// A generated token; `text_delta` is the text that became final with it.
    Token { token: TokenLogprob, text_delta: String },
    /// `text_tail`: the end of the text, held back while a stop string could still begin
    /// there, now final.
    Finished { reason: FinishReason, completion_tokens: usize, text_tail: String },
    /// The sequence ended in an error; `client` when the request was at fault (a press that
    /// cannot run on this prompt, say), not the server.
    Failed { message: String, client: bool },
}

impl Event {
    fn failed(e: &GenerateError) -> Event {
        let client = matches!(e, GenerateError::Config(_) | GenerateError::Model(ModelError::Input(_)));
        Event::Failed { message: e.to_string(), client }
    }
}

/// One token's log-probability under the model's raw distribution, with the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Events of a request's sequences, tagged with the sequence's index in the request. Dropping
/// the receiver cancels every sequence of the request.
pub type Events = mpsc::UnboundedReceiver<(usize, Event)>;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub kv_memory: usize,
    /// Prompt tokens one step prefills at most.
    pub max_batched_tokens: usize,
    /// Uncompressed KV bytes of one token (all layers).
    pub kv_bytes_per_token: usize,
}

/// What the HTTP side sends the engine thread.
enum Msg {
    Seqs(Vec<Waiting>),
    /// Prefill a context with its hooks; the cache (or why not) goes back on `reply`.
    Context {
        tokens: Vec<u32>,
        hooks: Hooks,
        reply: oneshot::Sender<Result<Arc<Context>, ApiError>>,
    },
}

struct Waiting {
    req: SeqRequest,
    index: usize,
    events: mpsc::UnboundedSender<(usize, Event)>,
    arrived: Instant,
}

struct Active {
    index: usize,
    events: mpsc::UnboundedSender<(usize, Event)>,
    arrived: Instant,
    last_token: Option<Instant>,
    /// Tokens it may still generate: reserved KV growth, unless `preemptable`.
    remaining: usize,
    /// Text handed out so far (the finished sequence's text minus this is its held-back tail).
    text: String,
    /// Plain (see [`SeqRequest::plain`]): reserves no growth and may be preempted.
    preemptable: bool,
    /// Admission order: the newest is preempted first.
    order: u64,
    /// The prompt, to share its prefix once prefilled (plain sequences only).
    share: Option<Vec<u32>>,
}

/// The HTTP side's handle: submit sequences; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::Sender<Msg>,
    waiting: Arc<AtomicUsize>,
    pub limits: Limits,
    pub contexts: Contexts,
}

impl Engine {
    /// Start the engine thread on a loaded model.
    pub fn start(model: Arc<LoadedModel>, limits: Limits) -> (Engine, std::thread::JoinHandle<()>) {
        let (tx, rx) = std_mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let counter = waiting.clone();
        let contexts = Contexts::default();
        let shared = contexts.clone();
        let thread = std::thread::Builder::new()
            .name("pare-engine".into())
            .spawn(move || run(&model, limits, rx, &counter, &shared))
            .expect("spawning the engine thread");
        (Engine { tx, waiting, limits, contexts }, thread)
    }

    /// Prefill a context with `hooks` (its press) on the engine thread and keep it.
    pub async fn create_context(&self, tokens: Vec<u32>, hooks: Hooks) -> Result<Arc<Context>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Context { tokens, hooks, reply })
            .map_err(|_| ApiError::internal("the engine has stopped"))?;
        answer.await.map_err(|_| ApiError::internal("the engine has stopped"))?
    }

    /// Queue a request's sequences, all or none: 429 when the queue has no room for them.
    pub fn submit(&self, seqs: Vec<SeqRequest>) -> Result<Events, ApiError> {
        let n = seqs.len();
        let max = self.limits.max_queue;
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w + n <= max).then_some(w + n))
            .map_err(|_| ApiError::queue_full(max))?;
        metrics::gauge!(m::QUEUE_DEPTH).increment(n as f64);
        let (events, rx) = mpsc::unbounded_channel();
        let arrived = Instant::now();
        let batch = seqs
            .into_iter()
            .enumerate()
            .map(|(index, req)| Waiting { req, index, events: events.clone(), arrived })
            .collect();
        self.tx.send(Msg::Seqs(batch)).map_err(|_| ApiError::internal("the engine has stopped"))?;
        Ok(rx)
    }
}

/// Tokens of a long hook-free prompt prefilled per step (at most the step's budget), so running
/// sequences keep decoding beside it (a prompt with a press or pruner prefills whole: its hooks
/// act on all of it).
const PREFILL_CHUNK: usize = 256;

/// Growth a plain sequence needs room for at admission, in tokens (vLLM keeps a watermark of
/// free blocks for the same reason: so that admitting does not at once force a preemption).
const WATERMARK: usize = 16;

fn run(
    loaded: &LoadedModel,
    limits: Limits,
    rx: std_mpsc::Receiver<Msg>,
    waiting_count: &AtomicUsize,
    contexts: &Contexts,
) {
    let mut batch = Batch::new(&loaded.model, loaded.tokenizer.as_ref())
        .with_prefill_chunk(PREFILL_CHUNK.min(limits.max_batched_tokens))
        .with_step_tokens(limits.max_batched_tokens);
    let mut engine = State { limits, contexts, prefix: PrefixCache::default(), admitted: 0 };
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    // Preempted sequences, oldest first: they go back before anything new is admitted.
    let mut resumes: VecDeque<(SeqId, Suspended, Active)> = VecDeque::new();
    let mut active: HashMap<SeqId, Active> = HashMap::new();
    let dequeued = |n: usize| {
        waiting_count.fetch_sub(n, Ordering::SeqCst);
        metrics::gauge!(m::QUEUE_DEPTH).decrement(n as f64);
    };
    loop {
        if active.is_empty() && queue.is_empty() && resumes.is_empty() {
            match rx.recv() {
                Ok(msg) => engine.receive(loaded, msg, &mut queue, &batch, &active),
                // Every handle is gone: the server has shut down.
                Err(_) => return,
            }
        }
        while let Ok(msg) = rx.try_recv() {
            engine.receive(loaded, msg, &mut queue, &batch, &active);
        }
        let before = queue.len();
        queue.retain(|w| !w.events.is_closed());
        if queue.len() < before {
            dequeued(before - queue.len());
            metrics::counter!(m::CANCELLED).increment((before - queue.len()) as u64);
        }
        let before = resumes.len();
        resumes.retain(|(_, _, a)| !a.events.is_closed());
        metrics::counter!(m::CANCELLED).increment((before - resumes.len()) as u64);

        // Cancelled sequences go first: their caches make room for the queue.
        let cancelled: Vec<SeqId> = active.iter().filter(|(_, a)| a.events.is_closed()).map(|(&id, _)| id).collect();
        for id in &cancelled {
            batch.cancel(*id);
            active.remove(id);
        }
        batch.retire_finished();
        metrics::counter!(m::CANCELLED).increment(cancelled.len() as u64);

        // Admit in arrival order (preempted sequences first) while the head fits, shared
        // prefixes giving way to it; a lone sequence always fits (requests larger than the
        // whole budget were refused at submission).
        let bpt = limits.kv_bytes_per_token;
        while active.len() < limits.max_concurrent {
            let need = match (resumes.front(), queue.front()) {
                (Some((_, s, _)), _) => (s.tokens() + WATERMARK) * bpt,
                (None, Some(w)) if w.req.plain() => {
                    (w.req.prompt.len() + WATERMARK.min(w.req.settings.config.max_new_tokens())) * bpt
                }
                (None, Some(w)) => w.req.kv_estimate,
                (None, None) => break,
            };
            if !active.is_empty() && !engine.make_room(&batch, &active, need) {
                break;
            }
            if let Some((id, suspended, a)) = resumes.pop_front() {
                metrics::counter!(m::PREFILL_TOKENS).increment(suspended.tokens() as u64);
                match batch.resume(suspended) {
                    Ok(()) => {
                        active.insert(id, a);
                    }
                    Err(e) => {
                        let _ = a.events.send((a.index, Event::failed(&e)));
                    }
                }
                continue;
            }
            let w = queue.pop_front().expect("front exists");
            dequeued(1);
            engine.admit(loaded, &mut batch, &mut active, w);
        }

        // Plain sequences grow by one token each step; when that outgrows the budget, shared
        // prefixes go first, then the newest plain sequences, to be run again later.
        let growth = |active: &HashMap<SeqId, Active>| active.values().filter(|a| a.preemptable).count() * bpt;
        while !engine.make_room(&batch, &active, growth(&active)) {
            let newest = active.iter().filter(|(_, a)| a.preemptable).max_by_key(|(_, a)| a.order).map(|(&id, _)| id);
            let Some(id) = newest.filter(|_| active.len() > 1) else { break };
            let a = active.remove(&id).expect("running");
            match batch.suspend(id) {
                Some(suspended) => {
                    metrics::counter!(m::PREEMPTIONS).increment(1);
                    let at = resumes.partition_point(|(_, _, r)| r.order < a.order);
                    resumes.insert(at, (id, suspended, a));
                }
                None => {
                    // No group to suspend (a sequence with nothing to generate, reported at
                    // the next step): it stays, and reserves what it may still generate.
                    let mut a = a;
                    a.preemptable = false;
                    active.insert(id, a);
                }
            }
        }

        let started = Instant::now();
        let stepped = batch.step();
        metrics::histogram!(m::STEP_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::FORWARD_SECONDS).record(batch.last_forward().as_secs_f64());
        if batch.last_step_prefills() > 0 {
            metrics::counter!(m::PREFILL_STEPS).increment(1);
            metrics::counter!(m::PREFILL_CHUNKS).increment(batch.last_step_prefills() as u64);
        }
        for (ids, e) in batch.take_failures() {
            let failure = Event::failed(&e);
            for a in ids.iter().filter_map(|id| active.remove(id)) {
                let _ = a.events.send((a.index, failure.clone()));
            }
        }
        match stepped {
            Ok(events) => {
                for event in events {
                    if let BatchEvent::Token { id, .. } = &event {
                        engine.share_prefix(&batch, &mut active, *id);
                    }
                    deliver(&mut active, event);
                }
            }
            // A failed batched step leaves no sequence's state trustworthy: all of them end.
            Err(e) => {
                let failure = Event::failed(&e);
                for (id, a) in active.drain() {
                    let _ = a.events.send((a.index, failure.clone()));
                    batch.cancel(id);
                }
            }
        }
        batch.retire_finished();
        let bytes = batch.cache_bytes();
        metrics::gauge!(m::RUNNING).set(active.len() as f64);
        metrics::gauge!(m::KV_IN_USE).set(bytes.in_use as f64);
        metrics::gauge!(m::KV_SAVED).set(bytes.uncompressed.saturating_sub(bytes.in_use) as f64);
        metrics::gauge!(m::KV_RESERVED).set(engine.reserved(&batch, &active) as f64);
        metrics::gauge!(m::PREFIX_CACHE_BYTES).set(engine.prefix.bytes() as f64);
        metrics::gauge!(m::CONTEXT_BYTES).set(context_bytes(contexts) as f64);
    }
}

/// What admission and preemption weigh: the budget, the shared prefixes and contexts.
struct State<'a> {
    limits: Limits,
    contexts: &'a Contexts,
    prefix: PrefixCache,
    admitted: u64,
}

impl State<'_> {
    fn receive(
        &mut self,
        loaded: &LoadedModel,
        msg: Msg,
        queue: &mut VecDeque<Waiting>,
        batch: &Batch,
        active: &HashMap<SeqId, Active>,
    ) {
        match msg {
            Msg::Seqs(seqs) => queue.extend(seqs),
            Msg::Context { tokens, hooks, reply } => {
                let _ = reply.send(self.create_context(loaded, tokens, hooks, batch, active));
            }
        }
    }

    /// Prefill a context (its press compresses it as a prompt's) and keep it, if it fits beside
    /// what is held and reserved: contexts stay until deleted.
    fn create_context(
        &mut self,
        loaded: &LoadedModel,
        tokens: Vec<u32>,
        mut hooks: Hooks,
        batch: &Batch,
        active: &HashMap<SeqId, Active>,
    ) -> Result<Arc<Context>, ApiError> {
        let input = [tokens];
        let (_, cache) = loaded.model.prefill(PrefillInput::Tokens(&input), &mut hooks).map_err(|e| match e {
            ModelError::Input(m) => ApiError::invalid(m, Some("press")),
            e => ApiError::internal(e.to_string()),
        })?;
        let [tokens] = input;
        metrics::counter!(m::PREFILL_TOKENS).increment(tokens.len() as u64);
        if !self.make_room(batch, active, cache.bytes()) {
            return Err(ApiError::invalid(
                format!(
                    "the context's KV cache ({} bytes) does not fit beside what the server holds in its KV budget of {} bytes",
                    cache.bytes(),
                    self.limits.kv_memory
                ),
                Some("context"),
            )
            .with_code("kv_memory_exceeded"));
        }
        let id = format!("ctx-{:032x}", rand::random::<u128>());
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let context = Arc::new(Context { id: id.clone(), tokens, cache, created });
        self.contexts.lock().expect("not poisoned").insert(id, context.clone());
        Ok(context)
    }

    /// KV bytes held (running caches, shared prefixes, contexts) plus the growth reserved for
    /// what running sequences with hooks or a context may still generate.
    fn reserved(&self, batch: &Batch, active: &HashMap<SeqId, Active>) -> usize {
        let growth: usize = active.values().filter(|a| !a.preemptable).map(|a| a.remaining).sum();
        // Prompts still prefilling chunk by chunk count whole: admitting several long prompts at
        // once must not overshoot the budget while their chunks land.
        batch.cache_bytes().in_use
            + (growth + batch.pending_prefill_tokens()) * self.limits.kv_bytes_per_token
            + self.prefix.bytes()
            + context_bytes(self.contexts)
    }

    /// Whether `need` more bytes fit the budget, dropping shared prefixes (least recently used
    /// first) until they do.
    fn make_room(&mut self, batch: &Batch, active: &HashMap<SeqId, Active>, need: usize) -> bool {
        loop {
            if self.reserved(batch, active) + need <= self.limits.kv_memory {
                return true;
            }
            if !self.prefix.evict_oldest() {
                return false;
            }
        }
    }

    /// Prefill one sequence into the batch (prompt log-probabilities first, when asked for):
    /// from a copy of its context, of a shared prefix of its prompt, or from nothing.
    fn admit(&mut self, loaded: &LoadedModel, batch: &mut Batch, active: &mut HashMap<SeqId, Active>, w: Waiting) {
        let Waiting { req, index, events, arrived } = w;
        let _ = events.send((index, Event::Admitted));
        if let Some(top) = req.prompt_logprobs {
            match prompt_logprobs(&loaded.model, &req.prompt, top) {
                Ok(lps) => {
                    let _ = events.send((index, Event::PromptLogprobs(lps)));
                }
                Err(e) => {
                    let _ = events.send((index, Event::failed(&e.into())));
                    return;
                }
            }
        }
        let plain = req.plain();
        let remaining = req.settings.config.max_new_tokens();
        let mut prompt_ids = req.prompt.clone();
        let start = match &req.context {
            Some(context) => {
                prompt_ids.splice(0..0, context.tokens.iter().copied());
                Some((0, context.cache.clone()))
            }
            None if plain => {
                let hit = self.prefix.lookup(&req.prompt);
                match &hit {
                    Some((tokens, _)) => {
                        metrics::counter!(m::PREFIX_HITS).increment(1);
                        metrics::counter!(m::PREFIX_HIT_TOKENS).increment(*tokens as u64);
                    }
                    None => metrics::counter!(m::PREFIX_MISSES).increment(1),
                }
                hit
            }
            None => None,
        };
        metrics::counter!(m::TOKENS_IN).increment(prompt_ids.len() as u64);
        let skipped = start.as_ref().map_or(0, |(tokens, _)| *tokens);
        metrics::counter!(m::PREFILL_TOKENS).increment((req.prompt.len() - skipped) as u64);
        let rest = [req.prompt[skipped..].to_vec()];
        let spec = GroupSpec {
            input: PrefillInput::Tokens(&rest),
            prompt_ids: vec![prompt_ids],
            settings: req.settings,
            hooks: req.hooks,
            top_logprobs: req.top_logprobs,
        };
        let admitted = match start {
            Some((_, cache)) => batch.admit_after(cache, spec),
            None => batch.admit(spec),
        };
        match admitted {
            Ok(ids) => {
                self.admitted += 1;
                let a = Active {
                    index,
                    events,
                    arrived,
                    last_token: None,
                    remaining,
                    text: String::new(),
                    preemptable: plain,
                    order: self.admitted,
                    share: plain.then_some(req.prompt),
                };
                active.insert(ids[0], a);
            }
            Err(e) => {
                let _ = events.send((index, Event::failed(&e)));
            }
        }
    }

    /// Once a plain sequence's prompt is in its cache, keep a copy of its full blocks to share.
    fn share_prefix(&mut self, batch: &Batch, active: &mut HashMap<SeqId, Active>, id: SeqId) {
        let Some(prompt) = active.get_mut(&id).and_then(|a| a.share.take()) else { return };
        if let Some(cache) = batch.cache(id) {
            self.prefix.insert(&prompt, cache);
        }
    }
}

/// Tokens per shared block: prefixes are shared in whole blocks.
const BLOCK: usize = 16;

/// Exact prefix caching: uncompressed caches of earlier plain prompts, cut to whole blocks. A
/// prompt that starts with one of them (for at least one block) continues from a copy; least
/// recently used entries go first when memory is needed.
#[derive(Default)]
struct PrefixCache {
    entries: Vec<PrefixEntry>,
    clock: u64,
}

struct PrefixEntry {
    tokens: Vec<u32>,
    cache: KvCache,
    used: u64,
}

impl PrefixCache {
    fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.bytes()).sum()
    }

    /// The longest whole-block prefix of `prompt` held, leaving at least one token to run (its
    /// logits choose the first token): how many tokens, and a copy of their cache.
    fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let usable = |e: &PrefixEntry| {
            let common = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
            common.min(prompt.len() - 1) / BLOCK * BLOCK
        };
        let best = self.entries.iter_mut().max_by_key(|e| usable(e)).filter(|e| usable(e) > 0)?;
        let tokens = usable(best);
        self.clock += 1;
        best.used = self.clock;
        let mut cache = best.cache.clone();
        cache.truncate(tokens).ok()?;
        Some((tokens, cache))
    }

    /// Keep the whole blocks of `prompt` from `cache` (which holds at least the prompt), unless an
    /// entry already covers them; entries they cover are dropped.
    fn insert(&mut self, prompt: &[u32], cache: &KvCache) {
        let len = prompt.len() / BLOCK * BLOCK;
        if len == 0 {
            return;
        }
        let blocks = &prompt[..len];
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens.starts_with(blocks)) {
            e.used = self.clock;
            return;
        }
        self.entries.retain(|e| !blocks.starts_with(&e.tokens));
        let mut cache = cache.clone();
        if cache.truncate(len).is_ok() {
            self.entries.push(PrefixEntry { tokens: blocks.to_vec(), cache, used: self.clock });
        }
    }

    fn evict_oldest(&mut self) -> bool {
        let Some(i) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used).map(|(i, _)| i) else {
            return false;
        };
        self.entries.remove(i);
        true
    }
}

/// Hand one batch event to its request (timing the token on the way).
fn deliver(active: &mut HashMap<SeqId, Active>, event: BatchEvent) {
    match event {
        BatchEvent::Token { id, token, logprob, top, text } => {
            let Some(a) = active.get_mut(&id) else { return };
            let now = Instant::now();
            match a.last_token {
                None => metrics::histogram!(m::TTFT).record((now - a.arrived).as_secs_f64()),
                Some(t) => metrics::histogram!(m::ITL).record((now - t).as_secs_f64()),
            }
            a.last_token = Some(now);
            a.remaining = a.remaining.saturating_sub(1);
            a.text.push_str(&text);
            metrics::counter!(m::TOKENS_OUT).increment(1);
            let token = TokenLogprob { id: token, logprob, top };
            let _ = a.events.send((a.index, Event::Token { token, text_delta: text }));
        }
        BatchEvent::Finished { id, sequence } => {
            let Some(a) = active.remove(&id) else { return };
            let text_tail = sequence.text.strip_prefix(a.text.as_str()).unwrap_or_default().to_string();
            let done =
                Event::Finished { reason: sequence.finish_reason, completion_tokens: sequence.tokens.len(), text_tail };
            let _ = a.events.send((a.index, done));
        }
    }
}

/// Each prompt token's log-probability given the tokens before it (one full-logits forward).
fn prompt_logprobs(
    model: &pare_model::Model,
    prompt: &[u32],
    top: usize,
) -> Result<Vec<Option<TokenLogprob>>, pare_model::ModelError> {
    let positions = vec![(0..prompt.len() as i64).collect::<Vec<_>>()];
    let mut cache = model.new_cache(1);
    let x = model.embed(&[prompt.to_vec()])?;
    let logits = model
        .forward(x, &positions, &mut cache, &mut Hooks::default(), Phase::Prefill, Logits::All)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    // One read-back: on a GPU, reading a row of the tensor would copy all of it, once per token.
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let mut out = vec![None];
    for (row, &token) in rows.iter().zip(&prompt[1..]) {
        out.push(Some(token_logprob(row, token, top)));
    }
    Ok(out)
}

/// log p(token) under `logits` with the `top` most likely tokens (ties: lower id first).
fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    TokenLogprob { id: token, logprob: logprob(logits, token) as f32, top: top_logprobs(logits, top) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_normalized_and_top_is_ordered() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let t = token_logprob(&logits, 4, 3);
        let total: f64 = logits.iter().map(|&l| ((l as f64) - 3.0).exp()).sum();
        assert!((t.logprob as f64 - (0.5 - 3.0 - total.ln())).abs() < 1e-6);
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, vec![1, 2, 0], "ties keep the lower id first");
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }
}
