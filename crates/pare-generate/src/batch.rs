//! The generation loop, over many sequences at once.
//!
//! A [`Batch`] holds groups of rows. A group is what one prefill made: one KV cache with its
//! hooks, one row per prompt and returned sequence, one random stream. The CLI admits one group
//! holding all its prompts (left-padded, as HF batches them); the server admits one group per
//! request, whenever it arrives. Each [`Batch::step`] runs ONE forward over every group that
//! still runs — a decode row per running row, beside the next chunk of every prompt waiting to
//! be prefilled, caches of different lengths and budgets side by side — and then chooses the next
//! token of every row whose logits are ready (processors, then greedy or sampling) and reports
//! it. A group whose rows are all finished is no longer decoded, and [`Batch::retire_finished`]
//! frees its cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use pare_formats::TokenizerBundle;
use pare_kernels::Candidates;
use pare_model::{Hooks, KvCache, Logits, Model, Phase, PrefillInput};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::GenerationConfig;
use crate::generate::{candidate_count, candidate_scores, step_scores, FinishReason, Sequence};
use crate::processors::chain::{ProcessorChain, ProcessorConfig};
use crate::processors::ProcessContext;
use crate::sampling::{argmax, sample};
use crate::stopping::TextStream;
use crate::{GenerateError, Result};

/// A sequence's handle in a batch.
pub type SeqId = u64;

/// Settings checked once and shared by every row they generate: the generation config with the
/// tokenizer-dependent parts (bad words as ids, DRY's vocabulary texts) resolved.
#[derive(Clone)]
pub struct Settings {
    pub config: GenerationConfig,
    processors: ProcessorConfig,
    vocab_texts: Option<Arc<Vec<String>>>,
}

impl Settings {
    pub fn new(config: GenerationConfig, tokenizer: Option<&TokenizerBundle>) -> Result<Self> {
        config.validate().map_err(GenerateError::Config)?;
        let needs_tokenizer = config.stop.as_ref().is_some_and(|s| !s.is_empty())
            || config.bad_words.as_ref().is_some_and(|b| !b.is_empty())
            || config.dry_multiplier.is_some_and(|m| m > 0.0);
        let tok = match tokenizer {
            Some(t) => Some(t),
            None if needs_tokenizer => {
                return Err(GenerateError::Config("stop strings, bad words and DRY need a tokenizer".into()))
            }
            None => None,
        };
        let mut bad_words_ids = Vec::new();
        for word in config.bad_words.iter().flatten() {
            let tok = tok.expect("checked above");
            let ids = tok.encode(word, false).map_err(|e| GenerateError::Config(e.to_string()))?;
            if ids.is_empty() {
                return Err(GenerateError::Config(format!("bad word {word:?} encodes to no tokens")));
            }
            bad_words_ids.push(ids);
        }
        let vocab_texts = match (tok, config.dry_multiplier) {
            (Some(t), Some(m)) if m > 0.0 => Some(Arc::new(
                (0..t.vocab_size() as u32).map(|id| t.decode(&[id], false).unwrap_or_default()).collect(),
            )),
            _ => None,
        };
        let processors = config.processor_config(&bad_words_ids).map_err(GenerateError::Config)?;
        Ok(Settings { config, processors, vocab_texts })
    }

    /// Whether every prompt leaves room for `max_new_tokens` in a context of `ctx` positions.
    pub fn check_fits(&self, ctx: usize, prompt_ids: &[Vec<u32>]) -> Result<()> {
        let max_new = self.config.max_new_tokens();
        match prompt_ids.iter().find(|p| p.len().saturating_add(max_new) > ctx) {
            Some(p) => Err(GenerateError::Config(format!(
                "the prompt ({} tokens) plus max_new_tokens {max_new} exceeds the model's context of {ctx}",
                p.len()
            ))),
            None => Ok(()),
        }
    }

    /// A fresh processor chain (one per row: some processors keep state).
    pub fn chain(&self) -> Result<ProcessorChain> {
        ProcessorChain::new(&self.processors, self.vocab_texts.clone()).map_err(GenerateError::Config)
    }
}

/// What one group generates from.
pub struct GroupSpec<'a> {
    /// The prompts, as token ids, or as input embeddings with their positions.
    pub input: PrefillInput<'a>,
    /// Each prompt's token ids, as the processors see them (for embeddings: the ids the
    /// embeddings stand for, image placeholders included).
    pub prompt_ids: Vec<Vec<u32>>,
    pub settings: Settings,
    pub hooks: Hooks,
    /// Report this many most likely tokens with each chosen one (OpenAI's `top_logprobs`).
    pub top_logprobs: usize,
}

/// What a step reports about one row.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        id: SeqId,
        token: u32,
        /// log p(token) under the model's own (unprocessed) distribution.
        logprob: f32,
        /// The most likely tokens and their log-probabilities, best first.
        top: Vec<(u32, f32)>,
        /// Text that became safe to show with this token (see [`TextStream`]).
        text: String,
    },
    Finished {
        id: SeqId,
        sequence: Sequence,
    },
}

/// KV-cache bytes of one group.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheBytes {
    pub in_use: usize,
    pub uncompressed: usize,
}

struct Row {
    id: SeqId,
    chain: ProcessorChain,
    /// Prompt then generated tokens, as the processors see them.
    input_ids: Vec<u32>,
    prompt_len: usize,
    stream: TextStream,
    sequence: Sequence,
    done: bool,
}

struct Group {
    cache: KvCache,
    hooks: Hooks,
    rows: Vec<Row>,
    rng: StdRng,
    settings: Settings,
    /// Read only the top-k candidates of each row (see [`crate::generate::candidate_count`]).
    candidates: Option<(usize, f32)>,
    top_logprobs: usize,
    /// The logits the next token is chosen from: (rows, vocab); None while the prompt is still
    /// being prefilled, and once chosen from until the chosen tokens are decoded.
    logits: Option<Tensor>,
    /// Each row's candidates in `logits`, when the step found them for several groups at once.
    found: Option<Vec<Option<Candidates>>>,
    /// The prompt tokens not prefilled yet (chunked prefill).
    pending: Vec<u32>,
    started: Instant,
}

impl Group {
    fn running(&self) -> bool {
        self.rows.iter().any(|r| !r.done)
    }

    /// Running, prefilled and its last choice not decoded yet: takes part in the next decode.
    fn decoding(&self) -> bool {
        self.running() && self.logits.is_none() && self.pending.is_empty()
    }
}

/// A group out of the batch without its cache (see [`Batch::suspend`]).
pub struct Suspended(Group);

impl Suspended {
    /// Tokens that resuming runs again: the prompt and what was generated so far.
    pub fn tokens(&self) -> usize {
        self.0.rows[0].input_ids.len()
    }
}

/// Sequences being generated, stepped together.
pub struct Batch<'m> {
    model: &'m Model,
    tokenizer: Option<&'m TokenizerBundle>,
    groups: Vec<Group>,
    next_id: SeqId,
    /// Rows that finished without generating (max_new_tokens 0), reported at the next step.
    finished_early: Vec<Event>,
    /// Prefill prompts in steps, this many tokens per step (see [`Batch::with_prefill_chunk`]).
    prefill_chunk: Option<usize>,
    /// At most this many prompt tokens per step (see [`Batch::with_step_tokens`]).
    step_tokens: usize,
    /// Prompt chunks the last step's forward ran.
    last_step_prefills: usize,
    /// How long the last step's forward took, until its logits were ready.
    last_forward: Duration,
    /// Groups a step ended on their own (see [`Batch::take_failures`]).
    failures: Vec<(Vec<SeqId>, GenerateError)>,
}

impl<'m> Batch<'m> {
    pub fn new(model: &'m Model, tokenizer: Option<&'m TokenizerBundle>) -> Self {
        Batch {
            model,
            tokenizer,
            groups: Vec::new(),
            next_id: 0,
            finished_early: Vec::new(),
            prefill_chunk: None,
            step_tokens: usize::MAX,
            last_step_prefills: 0,
            last_forward: Duration::ZERO,
            failures: Vec::new(),
        }
    }

    /// Prefill hook-free single prompts in the steps, not at admission: every prompt waiting
    /// runs in the step's one forward beside the decode rows (so waiting prompts share their
    /// products instead of running one by one), a long one `tokens` at a time so it does not
    /// stall the sequences already decoding. Prompts with a press or a pruner prefill whole at
    /// admission: their hooks act on the whole prompt at once.
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = Some(tokens.max(1));
        self
    }

    /// Run at most `tokens` prompt tokens in one step (at least one chunk): waiting prompts
    /// beyond it take their turn at the next steps, in admission order. A sequence's chunks are
    /// the same whatever this allows, so its tokens do not depend on it.
    pub fn with_step_tokens(mut self, tokens: usize) -> Self {
        self.step_tokens = tokens.max(1);
        self
    }

    /// Prefill a group and add its rows: `num_return_sequences` rows per prompt (prompt 0 × n,
    /// prompt 1 × n, ... as HF's repeat_interleave). Returns the rows' ids.
    pub fn admit(&mut self, spec: GroupSpec) -> Result<Vec<SeqId>> {
        let GroupSpec { input, prompt_ids, settings, hooks, top_logprobs } = spec;
        let n = settings.config.num_return_sequences();
        settings.check_fits(self.model.config().max_position_embeddings, &prompt_ids)?;
        if settings.config.max_new_tokens() == 0 {
            return Ok(self.finish_without_generating(prompt_ids.len(), n));
        }
        let input = match input {
            PrefillInput::Tokens(prompts) if n > 1 => {
                let rows: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), n)).collect();
                return self.admit_rows(
                    PrefillInput::Tokens(&rows),
                    &prompt_ids,
                    n,
                    settings,
                    hooks,
                    top_logprobs,
                    None,
                );
            }
            PrefillInput::Embeds { .. } if n > 1 => {
                return Err(GenerateError::Config("num_return_sequences > 1 needs token prompts".into()))
            }
            input => input,
        };
        self.admit_rows(input, &prompt_ids, n, settings, hooks, top_logprobs, None)
    }

    /// Admit a group whose cache starts as `cache`, a copy of the cache of its prompt's first
    /// tokens (a shared prefix, or a compressed context): only `spec.input`, the tokens after
    /// them, runs, as an extension of that cache (chunked like any long prompt). `spec.prompt_ids`
    /// is the whole prompt, as the processors see it. One prompt of tokens, one row.
    pub fn admit_after(&mut self, cache: KvCache, spec: GroupSpec) -> Result<Vec<SeqId>> {
        let GroupSpec { input, prompt_ids, settings, hooks, top_logprobs } = spec;
        let one_row = cache.batch() == 1 && settings.config.num_return_sequences() == 1 && prompt_ids.len() == 1;
        if !one_row || !matches!(input, PrefillInput::Tokens([_])) {
            return Err(GenerateError::Config(
                "a group admitted after a cache has one token prompt and one row".into(),
            ));
        }
        settings.check_fits(self.model.config().max_position_embeddings, &prompt_ids)?;
        if settings.config.max_new_tokens() == 0 {
            return Ok(self.finish_without_generating(1, 1));
        }
        self.admit_rows(input, &prompt_ids, 1, settings, hooks, top_logprobs, Some(cache))
    }

    /// Rows with nothing to generate (a log-likelihood request): no prefill, no cache; they are
    /// reported finished at the next step.
    fn finish_without_generating(&mut self, prompts: usize, n: usize) -> Vec<SeqId> {
        let mut ids = Vec::new();
        for p in 0..prompts {
            for _ in 0..n {
                let id = self.next_id;
                self.next_id += 1;
                self.finished_early.push(Event::Finished { id, sequence: Sequence::empty(p) });
                ids.push(id);
            }
        }
        ids
    }

    #[allow(clippy::too_many_arguments)]
    fn admit_rows(
        &mut self,
        input: PrefillInput,
        prompt_ids: &[Vec<u32>],
        n: usize,
        settings: Settings,
        mut hooks: Hooks,
        top_logprobs: usize,
        start: Option<KvCache>,
    ) -> Result<Vec<SeqId>> {
        let started = Instant::now();
        let chunked = match (&input, self.prefill_chunk) {
            (PrefillInput::Tokens([prompt]), Some(_)) if hooks.is_empty() => Some(prompt.clone()),
            _ => None,
        };
        let (logits, cache, pending) = match (start, chunked) {
            (None, Some(prompt)) => (None, self.model.new_cache(1), prompt),
            (Some(cache), Some(rest)) => (None, cache, rest),
            (None, None) => {
                let (logits, cache) = self.model.prefill(input, &mut hooks)?;
                (Some(logits), cache, Vec::new())
            }
            (Some(mut cache), None) => {
                let PrefillInput::Tokens([rest]) = input else {
                    return Err(GenerateError::Config("only token prompts extend a cache".into()));
                };
                let logits = extend(self.model, &mut cache, &mut hooks, rest.clone())?;
                (Some(logits), cache, Vec::new())
            }
        };
        if let Some(logits) = &logits {
            let inputs: Vec<&[u32]> = prompt_ids.iter().flat_map(|p| std::iter::repeat_n(p.as_slice(), n)).collect();
            check_finite(self.model, logits, &inputs)?;
        }
        let mut rows = Vec::new();
        for (p, ids) in prompt_ids.iter().enumerate() {
            for _ in 0..n {
                let id = self.next_id;
                self.next_id += 1;
                rows.push(Row {
                    id,
                    chain: settings.chain()?,
                    input_ids: ids.clone(),
                    prompt_len: ids.len(),
                    stream: TextStream::new(settings.config.stop.clone().unwrap_or_default()),
                    sequence: Sequence::empty(p),
                    done: false,
                });
            }
        }
        if rows.len() != cache.batch() {
            return Err(GenerateError::Config(format!(
                "{} prompts' ids for a prefill of {} rows",
                rows.len(),
                cache.batch()
            )));
        }
        let candidates = if top_logprobs > 0 { None } else { candidate_count(&settings.processors, &rows[0].chain) };
        let ids = rows.iter().map(|r| r.id).collect();
        self.groups.push(Group {
            cache,
            hooks,
            rows,
            rng: StdRng::seed_from_u64(settings.config.seed.unwrap_or(0)),
            settings,
            candidates,
            top_logprobs,
            logits,
            found: None,
            pending,
            started,
        });
        Ok(ids)
    }

    /// Take the one-row, hook-free group of row `id` out of the batch, dropping its cache
    /// (preemption); None for any other row (a press's or pruner's state cannot be rebuilt by
    /// running the tokens again). [`Batch::resume`] puts it back.
    pub fn suspend(&mut self, id: SeqId) -> Option<Suspended> {
        let i = self
            .groups
            .iter()
            .position(|g| g.rows.len() == 1 && g.rows[0].id == id && !g.rows[0].done && g.hooks.is_empty())?;
        let mut group = self.groups.remove(i);
        group.cache = self.model.new_cache(1);
        group.logits = None;
        group.found = None;
        group.pending.clear();
        Some(Suspended(group))
    }

    /// Put a suspended group back: its tokens so far (prompt and generated) are prefilled again,
    /// chunked like a prompt, and it goes on with its own processors, random stream and text
    /// state, so its tokens are those it would have chosen without the pause.
    pub fn resume(&mut self, suspended: Suspended) -> Result<()> {
        let mut group = suspended.0;
        let tokens = group.rows[0].input_ids.clone();
        if self.prefill_chunk.is_some() {
            group.pending = tokens;
        } else {
            let logits = extend(self.model, &mut group.cache, &mut group.hooks, tokens)?;
            let inputs = [group.rows[0].input_ids.as_slice()];
            check_finite(self.model, &logits, &inputs)?;
            group.logits = Some(logits);
        }
        self.groups.push(group);
        Ok(())
    }

    /// The cache of the group holding row `id` (to share a prompt's prefix), if it is held.
    pub fn cache(&self, id: SeqId) -> Option<&KvCache> {
        self.groups.iter().find(|g| g.rows.iter().any(|r| r.id == id)).map(|g| &g.cache)
    }

    /// Rows still generating (rows admitted with nothing to generate count until reported).
    pub fn running(&self) -> usize {
        self.groups.iter().map(|g| g.rows.iter().filter(|r| !r.done).count()).sum::<usize>() + self.finished_early.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.finished_early.is_empty()
    }

    /// Prompt tokens admitted but not prefilled yet (chunked prefill): cache they will take.
    pub fn pending_prefill_tokens(&self) -> usize {
        self.groups.iter().map(|g| g.pending.len()).sum()
    }

    /// Prompt chunks (of as many sequences) the last step's forward ran beside its decode rows.
    pub fn last_step_prefills(&self) -> usize {
        self.last_step_prefills
    }

    /// How long the last step's forward took, until its logits were on hand (the rest of
    /// [`Batch::step`] chooses the tokens).
    pub fn last_forward(&self) -> Duration {
        self.last_forward
    }

    /// The sequences a step ended because of their own failure (a prompt whose logits are not
    /// finite, say), with the reason; each failure once. The rest of the batch runs on: rows of
    /// one shared forward do not depend on each other.
    pub fn take_failures(&mut self) -> Vec<(Vec<SeqId>, GenerateError)> {
        std::mem::take(&mut self.failures)
    }

    /// KV-cache bytes over every group held.
    /// Tokens the groups' presses ran beyond their prompts (see [`Hooks::extra_tokens`]).
    pub fn press_tokens(&self) -> usize {
        self.groups.iter().map(|g| g.hooks.extra_tokens()).sum()
    }

    pub fn cache_bytes(&self) -> CacheBytes {
        self.groups.iter().fold(CacheBytes::default(), |acc, g| CacheBytes {
            in_use: acc.in_use + g.cache.bytes(),
            uncompressed: acc.uncompressed + g.cache.uncompressed_bytes(),
        })
    }

    /// Stop generating a row (its client went away): it reports nothing more, and its group's
    /// cache goes at [`Batch::retire_finished`] once no row of the group runs.
    pub fn cancel(&mut self, id: SeqId) {
        for row in self.groups.iter_mut().flat_map(|g| g.rows.iter_mut()) {
            if row.id == id && !row.done {
                row.done = true;
            }
        }
    }

    /// Remove groups whose rows have all finished, freeing their caches; returns each removed
    /// group's cache bytes at the end.
    pub fn retire_finished(&mut self) -> Vec<CacheBytes> {
        let mut retired = Vec::new();
        self.groups.retain(|g| {
            let keep = g.running();
            if !keep {
                retired.push(CacheBytes { in_use: g.cache.bytes(), uncompressed: g.cache.uncompressed_bytes() });
            }
            keep
        });
        retired
    }

    /// Run one forward (the decode rows of every running row, and the next chunk of the prompts
    /// waiting to be prefilled), then choose the next token of every row whose logits are ready.
    /// Returns what happened, row by row. A sequence that fails on its own ends alone (see
    /// [`Batch::take_failures`]); an error returned here leaves no row's state trustworthy.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = std::mem::take(&mut self.finished_early);
        self.forward_step()?;
        let ready = self.groups.iter_mut().filter(|g| g.running() && g.logits.is_some()).collect();
        events.extend(choose_all(ready, self.tokenizer)?);
        Ok(events)
    }

    /// One forward over every group that chose tokens at the last step (a decode row each) and
    /// the next chunk of every prompt still prefilling, within the step's token budget: decode
    /// rows first, so that they form one run of one-token rows.
    fn forward_step(&mut self) -> Result<()> {
        let chunk = self.prefill_chunk.unwrap_or(usize::MAX);
        let mut budget = self.step_tokens;
        let (decoding, prefilling): (Vec<&mut Group>, Vec<&mut Group>) =
            self.groups.iter_mut().filter(|g| g.running()).partition(|g| g.decoding());
        let mut live: Vec<&mut Group> = Vec::new();
        let mut tokens: Vec<Vec<Vec<u32>>> = Vec::new();
        for group in decoding {
            // Finished rows of a running group keep stepping with their last token; their
            // outputs are discarded.
            tokens.push(group.rows.iter().map(|r| vec![r.input_ids.last().copied().unwrap_or(0)]).collect());
            live.push(group);
        }
        let decode_groups = live.len();
        for group in prefilling.into_iter().filter(|g| !g.pending.is_empty()) {
            let take = chunk.min(group.pending.len());
            // Whole chunks only: a sequence's chunks stay what they are alone.
            if take > budget && live.len() > decode_groups {
                break;
            }
            budget = budget.saturating_sub(take);
            tokens.push(vec![group.pending.drain(..take).collect()]);
            live.push(group);
        }
        self.last_step_prefills = live.len() - decode_groups;
        if live.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut seqs: Vec<(&mut KvCache, &mut Hooks)> = live.iter_mut().map(|g| (&mut g.cache, &mut g.hooks)).collect();
        let logits = self.model.step(&mut seqs, &tokens)?;
        // One finiteness test for the whole step; only a failure looks at groups one by one.
        // It reads a flag back, so on a GPU the forward is done when it returns.
        let all_finite = pare_model::finite::all_finite(&logits)?;
        self.last_forward = started.elapsed();
        // Groups that choose from whole rows read them from one host copy of the step's logits:
        // reading a view of a GPU tensor copies its whole buffer (candle), so a group's own
        // read-back would move every group's rows (64 × 32 MB a step at 64 sequences of 128k
        // vocabulary).
        let whole_rows = live.iter().any(|g| g.pending.is_empty() && g.candidates.is_none());
        let host = if whole_rows && !logits.device().is_cpu() {
            Some(logits.to_device(&candle_core::Device::Cpu)?)
        } else {
            None
        };
        let mut start = 0;
        // The rows of groups that read candidates, by (k, temperature): one top-k call each, not
        // one per group, which would wait on the device once per sequence.
        let mut searches: Vec<CandidateSearch> = Vec::new();
        for (g, group) in live.iter_mut().enumerate() {
            let rows = start..start + group.rows.len();
            start = rows.end;
            let source = match (&host, group.candidates) {
                (Some(host), None) => host,
                _ => &logits,
            };
            let group_logits = source.narrow(0, rows.start, rows.len())?;
            // A prompt's chunk before its last only fills the cache.
            if !group.pending.is_empty() {
                continue;
            }
            if !all_finite {
                let inputs: Vec<&[u32]> = group.rows.iter().map(|r| r.input_ids.as_slice()).collect();
                if let Err(e) = check_finite(self.model, &group_logits, &inputs) {
                    let ids = group.rows.iter_mut().filter(|r| !r.done).map(|r| {
                        r.done = true;
                        r.id
                    });
                    self.failures.push((ids.collect(), e));
                    continue;
                }
            }
            if let Some(spec) = group.candidates {
                let at = match searches.iter().position(|s| s.spec == spec) {
                    Some(at) => at,
                    None => {
                        searches.push(CandidateSearch { spec, rows: Vec::new(), groups: Vec::new() });
                        searches.len() - 1
                    }
                };
                searches[at].groups.push((g, rows.len()));
                searches[at].rows.extend(rows.map(|r| r as u32));
            }
            group.logits = Some(group_logits);
        }
        for search in searches {
            let (k, temperature) = search.spec;
            let source = if search.rows.len() == logits.dim(0)? {
                logits.clone()
            } else {
                logits.index_select(&Tensor::new(search.rows.as_slice(), logits.device())?, 0)?
            };
            let mut found = pare_kernels::top_candidates(&source, k, temperature)?.into_iter();
            for (g, rows) in search.groups {
                live[g].found = Some(found.by_ref().take(rows).collect());
            }
        }
        Ok(())
    }
}

/// Groups that read the same number of candidates at the same temperature: their rows of the
/// step's logits, in order, and (group, rows) for each.
struct CandidateSearch {
    spec: (usize, f32),
    rows: Vec<u32>,
    groups: Vec<(usize, usize)>,
}

/// Run one row's `tokens` into `cache` at the positions after what it holds: a prefill into an
/// empty cache, an extension of one that holds tokens (a chunk, a shared prefix, a context).
fn extend(model: &Model, cache: &mut KvCache, hooks: &mut Hooks, tokens: Vec<u32>) -> Result<Tensor> {
    let start = cache.next_positions()[0];
    let positions = vec![(start..start + tokens.len() as i64).collect::<Vec<_>>()];
    let phase = if start == 0 { Phase::Prefill } else { Phase::Extend };
    let x = model.embed(&[tokens])?;
    Ok(model.forward(x, &positions, cache, hooks, phase, Logits::Last)?)
}

/// Ok if every row of `logits` is finite; otherwise the error naming where the first failing
/// row's non-finite values start, found by running that row's tokens (`inputs[row]`) again.
fn check_finite(model: &Model, logits: &Tensor, inputs: &[&[u32]]) -> Result<()> {
    if pare_model::finite::all_finite(logits)? {
        return Ok(());
    }
    for (row, input) in inputs.iter().enumerate() {
        pare_model::finite::check_logits(model, &logits.get(row)?, input)?;
    }
    Ok(())
}

/// Choose the next token of every group in `groups`; their events in group order. Groups that
/// choose from whole rows in host memory are shared out over the host's cores: a row of a 128k
/// vocabulary costs about a millisecond (processors, sampling and its log-probability in f64), so
/// 64 sequences chosen one after another would stall every step for ~100 ms. Groups that choose
/// among their candidates (found for all of them at once by the step) choose here in turn: a
/// few scores a row.
fn choose_all(groups: Vec<&mut Group>, tokenizer: Option<&TokenizerBundle>) -> Result<Vec<Event>> {
    let one = |(index, group): (usize, &mut Group)| -> Result<(usize, Vec<Event>)> {
        let mut events = Vec::new();
        choose(group, tokenizer, &mut events)?;
        Ok((index, events))
    };
    let (mut host, device): (Vec<_>, Vec<_>) =
        groups.into_iter().enumerate().partition(|(_, g)| g.logits.as_ref().is_some_and(|l| l.device().is_cpu()));
    let mut chosen = device.into_iter().map(one).collect::<Result<Vec<_>>>()?;
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(host.len());
    if workers <= 1 {
        chosen.extend(host.into_iter().map(one).collect::<Result<Vec<_>>>()?);
    } else {
        let per_worker = host.len().div_ceil(workers);
        let parts: Vec<Result<Vec<_>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = host
                .chunks_mut(per_worker)
                .map(|part| scope.spawn(move || part.iter_mut().map(|(i, g)| one((*i, &mut **g))).collect()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        for part in parts {
            chosen.extend(part?);
        }
    }
    chosen.sort_by_key(|&(index, _)| index);
    Ok(chosen.into_iter().flat_map(|(_, events)| events).collect())
}

/// One step of choice for a group's running rows.
fn choose(group: &mut Group, tokenizer: Option<&TokenizerBundle>, events: &mut Vec<Event>) -> Result<()> {
    let config = &group.settings.config;
    let eos = config.eos_token_id.clone().unwrap_or_default();
    let max_new = config.max_new_tokens();
    let Some(logits) = group.logits.take() else { return Ok(()) };
    let scores = match group.found.take() {
        Some(found) => candidate_scores(&logits, found)?,
        None => step_scores(&logits, group.candidates)?,
    };
    let decode = |tokens: &[u32]| tokenizer.and_then(|t| t.decode(tokens, true).ok()).unwrap_or_default();
    for (row, scores) in group.rows.iter_mut().zip(scores) {
        if row.done {
            continue;
        }
        let mut processed = scores.logits.clone();
        let mut pctx = ProcessContext {
            input_ids: &row.input_ids,
            prompt_len: row.prompt_len,
            rng: &mut group.rng,
            candidates: scores.candidate_ids(),
        };
        row.chain.process(&mut pctx, &mut processed);
        let chosen = if config.do_sample() { sample(&processed, &mut group.rng) } else { argmax(&processed) };
        let token = scores.token(chosen);
        row.chain.accept(token, &processed);
        row.input_ids.push(token);
        let seq = &mut row.sequence;
        seq.tokens.push(token);
        let logprob = scores.logprob(chosen) as f32;
        seq.logprobs.push(logprob);
        seq.score += logprob;
        let text = if tokenizer.is_some() { decode(&seq.tokens) } else { String::new() };
        let (delta, stopped) = row.stream.update(&text);
        let top = if group.top_logprobs > 0 { top_logprobs(&scores.logits, group.top_logprobs) } else { vec![] };
        events.push(Event::Token { id: row.id, token, logprob, top, text: delta });
        if eos.contains(&token) {
            (seq.finish_reason, row.done) = (FinishReason::Eos, true);
        } else if stopped {
            (seq.finish_reason, row.done) = (FinishReason::Stop, true);
        } else if seq.tokens.len() >= max_new {
            row.done = true;
        } else if config.max_time.is_some_and(|t| group.started.elapsed().as_secs_f64() >= t) {
            (seq.finish_reason, row.done) = (FinishReason::Time, true);
        }
        if row.done {
            seq.text = row.stream.cut(&text);
            events.push(Event::Finished { id: row.id, sequence: seq.clone() });
        }
    }
    Ok(())
}

/// The `n` most likely tokens of a raw logits row with their log-probabilities, best first (ties
/// by lower id).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln();
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(ids.len());
    let by_score = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n < ids.len() {
        ids.select_nth_unstable_by(n, by_score);
        ids.truncate(n);
    }
    ids.sort_by(by_score);
    ids.into_iter().map(|i| (i, (logits[i as usize] as f64 - lse) as f32)).collect()
}
