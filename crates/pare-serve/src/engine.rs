//! The engine thread: owns the model, admits waiting sequences while they fit the KV budget and
//! the concurrency limit, steps every running sequence once per iteration, streams events out,
//! and drops a sequence as soon as its request's receiver is gone (client disconnect, timeout).
//!
//! The model is synchronous and CPU-heavy, so it lives on one dedicated OS thread; HTTP handlers
//! talk to it only through [`Engine::submit`] and the event channel it returns. Each sequence is
//! its own group in pare-generate's [`Batch`] (its own cache, hooks, processors and seed), and
//! one batched decode step advances every running sequence.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use candle_core::DType;
use pare_generate::sampling::logprob;
use pare_generate::{
    top_logprobs, Batch, Event as BatchEvent, FinishReason, GenerateError, GroupSpec, SeqId, Settings,
};
use pare_model::{Hooks, LoadedModel, Logits, ModelError, Phase, PrefillInput};
use tokio::sync::mpsc;

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
    /// Uncompressed KV bytes of one token (all layers).
    pub kv_bytes_per_token: usize,
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
    /// Tokens it may still generate: reserved KV growth.
    remaining: usize,
    /// Text handed out so far (the finished sequence's text minus this is its held-back tail).
    text: String,
}

/// The HTTP side's handle: submit sequences; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::Sender<Vec<Waiting>>,
    waiting: Arc<AtomicUsize>,
    pub limits: Limits,
}

impl Engine {
    /// Start the engine thread on a loaded model.
    pub fn start(model: Arc<LoadedModel>, limits: Limits) -> (Engine, std::thread::JoinHandle<()>) {
        let (tx, rx) = std_mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let counter = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("pare-engine".into())
            .spawn(move || run(&model, limits, rx, &counter))
            .expect("spawning the engine thread");
        (Engine { tx, waiting, limits }, thread)
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
        self.tx.send(batch).map_err(|_| ApiError::internal("the engine has stopped"))?;
        Ok(rx)
    }
}

/// Tokens of a long hook-free prompt prefilled per step, so running sequences keep decoding
/// beside it (a prompt with a press or pruner prefills whole: its hooks act on all of it).
const PREFILL_CHUNK: usize = 256;

fn run(loaded: &LoadedModel, limits: Limits, rx: std_mpsc::Receiver<Vec<Waiting>>, waiting_count: &AtomicUsize) {
    let mut batch = Batch::new(&loaded.model, loaded.tokenizer.as_ref()).with_prefill_chunk(PREFILL_CHUNK);
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    let mut active: HashMap<SeqId, Active> = HashMap::new();
    let dequeued = |n: usize| {
        waiting_count.fetch_sub(n, Ordering::SeqCst);
        metrics::gauge!(m::QUEUE_DEPTH).decrement(n as f64);
    };
    loop {
        if active.is_empty() && queue.is_empty() {
            match rx.recv() {
                Ok(seqs) => queue.extend(seqs),
                // Every handle is gone: the server has shut down.
                Err(_) => return,
            }
        }
        while let Ok(seqs) = rx.try_recv() {
            queue.extend(seqs);
        }
        let before = queue.len();
        queue.retain(|w| !w.events.is_closed());
        if queue.len() < before {
            dequeued(before - queue.len());
            metrics::counter!(m::CANCELLED).increment((before - queue.len()) as u64);
        }

        // Cancelled sequences go first: their caches make room for the queue.
        let cancelled: Vec<SeqId> = active.iter().filter(|(_, a)| a.events.is_closed()).map(|(&id, _)| id).collect();
        for id in &cancelled {
            batch.cancel(*id);
            active.remove(id);
        }
        batch.retire_finished();
        metrics::counter!(m::CANCELLED).increment(cancelled.len() as u64);

        // Admit in arrival order while the head fits; a lone sequence always fits (requests
        // larger than the whole budget were refused at submission).
        while active.len() < limits.max_concurrent {
            let Some(front) = queue.front() else { break };
            if !active.is_empty() && reserved(&batch, &active, limits) + front.req.kv_estimate > limits.kv_memory {
                break;
            }
            let w = queue.pop_front().expect("front exists");
            dequeued(1);
            admit(loaded, &mut batch, &mut active, w);
        }

        match batch.step() {
            Ok(events) => {
                for event in events {
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
        metrics::gauge!(m::KV_RESERVED).set(reserved(&batch, &active, limits) as f64);
    }
}

/// KV bytes held plus the growth reserved for what running sequences may still generate.
fn reserved(batch: &Batch, active: &HashMap<SeqId, Active>, limits: Limits) -> usize {
    batch.cache_bytes().in_use + active.values().map(|a| a.remaining).sum::<usize>() * limits.kv_bytes_per_token
}

/// Prefill one sequence into the batch (prompt log-probabilities first, when asked for).
fn admit(loaded: &LoadedModel, batch: &mut Batch, active: &mut HashMap<SeqId, Active>, w: Waiting) {
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
    metrics::counter!(m::TOKENS_IN).increment(req.prompt.len() as u64);
    let remaining = req.settings.config.max_new_tokens();
    let spec = GroupSpec {
        input: PrefillInput::Tokens(std::slice::from_ref(&req.prompt)),
        prompt_ids: vec![req.prompt.clone()],
        settings: req.settings,
        hooks: req.hooks,
        top_logprobs: req.top_logprobs,
    };
    match batch.admit(spec) {
        Ok(ids) => {
            let a = Active { index, events, arrived, last_token: None, remaining, text: String::new() };
            active.insert(ids[0], a);
        }
        Err(e) => {
            let _ = events.send((index, Event::failed(&e)));
        }
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
    let mut out = vec![None];
    for (i, &token) in prompt.iter().enumerate().skip(1) {
        let row: Vec<f32> = logits.get(i - 1)?.to_vec1()?;
        out.push(Some(token_logprob(&row, token, top)));
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
