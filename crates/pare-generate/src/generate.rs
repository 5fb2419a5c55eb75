//! The generation loop: prefill the prompts once, then one decode step per token over the KV
//! cache, each row processed, chosen and stopped on its own.

use std::time::Instant;

use candle_core::Tensor;
use pare_formats::TokenizerBundle;
use pare_model::{Hooks, Model, PrefillInput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::batch::{Batch, Event, GroupSpec, Settings};
use crate::beam::{beam_search_with, BeamConfig};
use crate::config::GenerationConfig;
use crate::processors::chain::{ProcessorChain, ProcessorConfig};
use crate::processors::ProcessContext;
use crate::sampling::logprob;
use crate::{GenerateError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_new_tokens reached.
    Length,
    /// An EOS token was produced (it is the last of `tokens`).
    Eos,
    /// A stop string appeared; `text` ends before it.
    Stop,
    /// max_time ran out.
    Time,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sequence {
    /// Which prompt this continues.
    pub prompt_index: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    /// log p(token) under the model's own (unprocessed) distribution, per generated token.
    pub logprobs: Vec<f32>,
    /// Sum of `logprobs`, or HF's length-normalized beam score for beam search.
    pub score: f32,
    pub finish_reason: FinishReason,
}

impl Sequence {
    /// Nothing generated yet.
    pub fn empty(prompt_index: usize) -> Self {
        Sequence {
            prompt_index,
            tokens: vec![],
            text: String::new(),
            logprobs: vec![],
            score: 0.0,
            finish_reason: FinishReason::Length,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    /// Tokens per second of decode, counting every row's token of each step.
    pub decode_tok_s: f64,
    /// Tokens the press ran through the model beyond the prompts, inside `prefill_s` (KVzip's
    /// replay of the context: about as many as the prompt, plus its instruction per chunk).
    pub press_tokens: usize,
}

/// KV-cache bytes in use: what a press saved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CacheStats {
    /// Right after prefill.
    pub kv_bytes_prefill: usize,
    /// At the end of generation.
    pub kv_bytes_final: usize,
    /// At the end, had nothing been evicted.
    pub kv_bytes_uncompressed: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    pub sequences: Vec<Sequence>,
    pub timings: Timings,
    /// None for beam search (each prompt runs its own cache).
    pub cache: Option<CacheStats>,
}

/// What a generation starts from: token prompts (a left-padded batch), or one prompt as input
/// embeddings at their positions (a VLM's merged image and text sequence) with the ids the
/// processors see.
pub enum Prompts<'a> {
    Tokens(&'a [Vec<u32>]),
    Embeds { x: Tensor, positions: Vec<i64>, ids: Vec<u32> },
}

impl Prompts<'_> {
    fn ids(&self) -> Vec<Vec<u32>> {
        match self {
            Prompts::Tokens(p) => p.to_vec(),
            Prompts::Embeds { ids, .. } => vec![ids.clone()],
        }
    }
}

/// A whole generation for the CLI and the evaluations: one group of rows through [`Batch`], or
/// beam search.
pub struct Generator<'a> {
    pub settings: Settings,
    pub tokenizer: Option<&'a TokenizerBundle>,
    /// Every generation starts from a fresh copy of these.
    hooks: Hooks,
}

impl<'a> Generator<'a> {
    pub fn new(config: GenerationConfig, tokenizer: Option<&'a TokenizerBundle>) -> Result<Self> {
        Ok(Generator { settings: Settings::new(config, tokenizer)?, tokenizer, hooks: Hooks::default() })
    }

    /// Compress every generation's KV cache and prune its prompt tokens with these hooks.
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    pub fn config(&self) -> &GenerationConfig {
        &self.settings.config
    }

    /// Generate for every prompt: `num_return_sequences` sequences each, best first for beams.
    /// `on_token(row, token, text)` sees each sampled/greedy token as it is chosen, with the text
    /// that became safe to show.
    pub fn generate(
        &self,
        model: &Model,
        prompts: Prompts,
        mut on_token: impl FnMut(usize, u32, &str),
    ) -> Result<GenerationOutput> {
        let config = &self.settings.config;
        let ids = prompts.ids();
        if config.num_beams() > 1 {
            let Prompts::Tokens(tokens) = prompts else {
                return Err(GenerateError::Config("beam search needs token prompts".into()));
            };
            self.settings.check_fits(model.config().max_position_embeddings, &ids)?;
            return self.beam(model, tokens);
        }
        let n = config.num_return_sequences();
        let mut timings = Timings { prompt_tokens: ids.iter().map(Vec::len).sum::<usize>() * n, ..Timings::default() };
        let input = match prompts {
            Prompts::Tokens(tokens) => PrefillInput::Tokens(tokens),
            Prompts::Embeds { x, positions, .. } => PrefillInput::Embeds { x, positions: vec![positions] },
        };
        let mut batch = Batch::new(model, self.tokenizer);
        let start = Instant::now();
        let spec = GroupSpec {
            input,
            prompt_ids: ids,
            settings: self.settings.clone(),
            hooks: self.hooks.clone(),
            top_logprobs: 0,
        };
        let rows = batch.admit(spec)?;
        timings.prefill_s = start.elapsed().as_secs_f64();
        timings.press_tokens = batch.press_tokens();
        let mut stats = CacheStats { kv_bytes_prefill: batch.cache_bytes().in_use, ..CacheStats::default() };
        let decode_start = Instant::now();
        let mut steps = 0usize;
        let mut sequences: Vec<Option<Sequence>> = vec![None; rows.len()];
        loop {
            let events = batch.step()?;
            if let Some((_, e)) = batch.take_failures().into_iter().next() {
                return Err(e);
            }
            for event in events {
                match event {
                    Event::Token { id, token, text, .. } => {
                        timings.generated_tokens += 1;
                        on_token(id as usize - rows[0] as usize, token, &text);
                    }
                    Event::Finished { id, sequence } => sequences[id as usize - rows[0] as usize] = Some(sequence),
                }
            }
            if batch.running() == 0 {
                break;
            }
            steps += 1;
        }
        timings.decode_s = decode_start.elapsed().as_secs_f64();
        timings.prefill_tok_s = rate(timings.prompt_tokens, timings.prefill_s);
        timings.decode_tok_s = rate(steps * rows.len(), timings.decode_s);
        let bytes = batch.cache_bytes();
        (stats.kv_bytes_final, stats.kv_bytes_uncompressed) = (bytes.in_use, bytes.uncompressed);
        let sequences = sequences.into_iter().map(|s| s.expect("every row finishes")).collect();
        Ok(GenerationOutput { sequences, timings, cache: Some(stats) })
    }

    fn beam(&self, model: &Model, prompts: &[Vec<u32>]) -> Result<GenerationOutput> {
        let config = &self.settings.config;
        let cfg = BeamConfig {
            num_beams: config.num_beams(),
            length_penalty: config.length_penalty.unwrap_or(1.0),
            early_stopping: config.early_stopping.unwrap_or_default(),
            num_return_sequences: config.num_return_sequences(),
            max_new_tokens: config.max_new_tokens(),
            eos_token_ids: config.eos_token_id.clone().unwrap_or_default(),
        };
        let mut timings = Timings { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Timings::default() };
        let start = Instant::now();
        let mut sequences = Vec::new();
        let mut rng = StdRng::seed_from_u64(config.seed.unwrap_or(0));
        let decode = |tokens: &[u32]| self.tokenizer.and_then(|t| t.decode(tokens, true).ok()).unwrap_or_default();
        for (p, prompt) in prompts.iter().enumerate() {
            let mut chains = (0..cfg.num_beams).map(|_| self.settings.chain()).collect::<Result<Vec<_>>>()?;
            let mut process = |beam: usize, ids: &[u32], prompt_len: usize, scores: &mut [f32]| {
                let mut pctx = ProcessContext { input_ids: ids, prompt_len, rng: &mut rng, candidates: None };
                chains[beam].process(&mut pctx, scores);
            };
            for hyp in beam_search_with(model, prompt, &cfg, self.hooks.clone(), &mut process)? {
                timings.generated_tokens += hyp.tokens.len();
                let finish_reason = if hyp.finished_by_eos { FinishReason::Eos } else { FinishReason::Length };
                sequences.push(Sequence {
                    prompt_index: p,
                    text: decode(&hyp.tokens),
                    logprobs: hyp.token_logprobs.clone(),
                    score: hyp.score,
                    tokens: hyp.tokens,
                    finish_reason,
                });
            }
        }
        timings.decode_s = start.elapsed().as_secs_f64();
        timings.decode_tok_s = rate(timings.generated_tokens, timings.decode_s);
        Ok(GenerationOutput { sequences, timings, cache: None })
    }
}

fn rate(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// When every token the chain can keep is among the top `k` scores at temperature `t`, `(k, t)`:
/// greedy decoding, or sampling whose processors are temperature, top-k, top-p and min-p with
/// top-k on (top-p and min-p only remove what top-k kept), either with a minimum of new tokens,
/// which only removes the EOS tokens: `k` then counts them too, so that the best `k` others are
/// among the candidates whatever EOS scores (`ignore_eos` requests, which every load generator
/// sends, would otherwise read whole rows). Steps then read only those candidates (see
/// [`step_scores`]).
pub(crate) fn candidate_count(cfg: &ProcessorConfig, chain: &ProcessorChain) -> Option<(usize, f32)> {
    let names = chain.names();
    let eos = if names.contains(&"min_new_tokens") {
        let mut ids = cfg.eos_token_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    } else {
        0
    };
    if !cfg.do_sample {
        return names.iter().all(|n| *n == "min_new_tokens").then_some((1 + eos, 1.0));
    }
    if !names.iter().all(|n| matches!(*n, "temperature" | "top_k" | "top_p" | "min_p" | "min_new_tokens")) {
        return None;
    }
    let t = cfg.temperature.unwrap_or(1.0);
    if t == 0.0 {
        return Some((1 + eos, 1.0));
    }
    let k = cfg.top_k.filter(|&k| k > 0)?.max(cfg.min_tokens_to_keep) + eos;
    (k <= MAX_CANDIDATES).then_some((k, t))
}

/// Above this top-k, a step reads whole rows: selection stops paying for itself.
const MAX_CANDIDATES: usize = 1024;

/// One row's scores as the processors see them: the whole vocabulary, or only the candidates
/// that can survive the chain (token ids increasing, so ties break as over the whole row).
pub(crate) struct RowScores {
    pub(crate) logits: Vec<f32>,
    ids: Option<Vec<u32>>,
    lse: f64,
}

impl RowScores {
    fn whole(logits: Vec<f32>) -> Self {
        RowScores { logits, ids: None, lse: 0.0 }
    }

    /// The candidates' tokens, when the row holds only them.
    pub(crate) fn candidate_ids(&self) -> Option<&[u32]> {
        self.ids.as_deref()
    }

    pub(crate) fn token(&self, chosen: u32) -> u32 {
        self.ids.as_ref().map_or(chosen, |ids| ids[chosen as usize])
    }

    /// log p(token) under the unprocessed distribution.
    pub(crate) fn logprob(&self, chosen: u32) -> f64 {
        match self.ids {
            Some(_) => self.logits[chosen as usize] as f64 - self.lse,
            None => logprob(&self.logits, chosen),
        }
    }
}

/// The step's rows. With `candidates = (k, t)` only the top-k at temperature t (ties kept) leave
/// the device — on CUDA a few kilobytes instead of the vocabulary's logits — and a row with more
/// ties than fit is read whole. Processors see candidates in token order and with the rest of
/// the row at -inf they would have left no other token, so the choice is the whole row's.
pub(crate) fn step_scores(logits: &candle_core::Tensor, candidates: Option<(usize, f32)>) -> Result<Vec<RowScores>> {
    let Some((k, t)) = candidates else {
        return Ok(logits.to_vec2::<f32>()?.into_iter().map(RowScores::whole).collect());
    };
    candidate_scores(logits, pare_kernels::top_candidates(logits, k, t)?)
}

/// The rows of `logits` as their candidates `found` (one per row), each row whose candidates did
/// not fit read whole.
pub(crate) fn candidate_scores(
    logits: &candle_core::Tensor,
    candidates: Vec<Option<pare_kernels::Candidates>>,
) -> Result<Vec<RowScores>> {
    let whole = RowScores::whole;
    let chosen = |c: pare_kernels::Candidates| RowScores { logits: c.logits, ids: Some(c.ids), lse: c.lse };
    if candidates.iter().all(Option::is_some) {
        return Ok(candidates.into_iter().flatten().map(chosen).collect());
    }
    // Rows with more ties than fit are read whole, all from one host copy: on a GPU, reading one
    // row of the tensor would copy all of it.
    let all = logits.to_vec2::<f32>()?;
    Ok(candidates.into_iter().zip(all).map(|(c, row)| c.map_or_else(|| whole(row), chosen)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{argmax, sample};
    use candle_core::{DType, Device, Tensor};
    use rand::Rng;

    /// Choose a token from every row both ways — whole rows, and the candidates — with one seed.
    fn choose(cfg: &ProcessorConfig, logits: &Tensor, candidates: Option<(usize, f32)>, seed: u64) -> Vec<(u32, f64)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut chain = ProcessorChain::new(cfg, None).unwrap();
        let ids = [1u32, 2, 3];
        step_scores(logits, candidates)
            .unwrap()
            .into_iter()
            .map(|scores| {
                let mut processed = scores.logits.clone();
                let mut ctx = ProcessContext {
                    input_ids: &ids,
                    prompt_len: 3,
                    rng: &mut rng,
                    candidates: scores.candidate_ids(),
                };
                chain.process(&mut ctx, &mut processed);
                let chosen = if cfg.do_sample { sample(&processed, &mut rng) } else { argmax(&processed) };
                (scores.token(chosen), scores.logprob(chosen))
            })
            .collect()
    }

    #[test]
    fn candidates_choose_what_whole_rows_choose() {
        let configs = [
            ProcessorConfig::default(),
            ProcessorConfig { do_sample: true, top_k: Some(50), ..Default::default() },
            ProcessorConfig {
                do_sample: true,
                temperature: Some(0.7),
                top_k: Some(40),
                top_p: Some(0.9),
                ..Default::default()
            },
            ProcessorConfig {
                do_sample: true,
                temperature: Some(1.6),
                top_k: Some(20),
                min_p: Some(0.1),
                ..Default::default()
            },
            ProcessorConfig { do_sample: true, temperature: Some(0.0), top_k: Some(50), ..Default::default() },
            ProcessorConfig {
                do_sample: true,
                top_k: Some(3),
                top_p: Some(0.5),
                min_tokens_to_keep: 5,
                ..Default::default()
            },
            // `ignore_eos`: the EOS tokens (one listed twice) removed until the minimum is reached.
            ProcessorConfig { min_new_tokens: Some(8), eos_token_ids: vec![17, 2999, 17], ..Default::default() },
            ProcessorConfig {
                do_sample: true,
                top_k: Some(4),
                top_p: Some(0.9),
                min_new_tokens: Some(8),
                eos_token_ids: vec![17, 2999],
                ..Default::default()
            },
        ];
        let mut rng = StdRng::seed_from_u64(3);
        for (c, cfg) in configs.iter().enumerate() {
            let k = candidate_count(cfg, &ProcessorChain::new(cfg, None).unwrap());
            assert!(k.is_some(), "config {c} reads candidates");
            for trial in 0..40 {
                // bf16-rounded logits: many exact ties, some at the k-th score.
                let scale = [0.5f32, 2.0, 6.0][trial % 3];
                let mut data: Vec<f32> = (0..4 * 3000).map(|_| rng.random::<f32>() * scale * 4.0 - scale).collect();
                // The EOS tokens at the top of some rows, where removing them changes the choice.
                for (row, eos) in [(0, 17), (1, 2999), (3, 17), (3, 2999)] {
                    data[row * 3000 + eos] = 4.0 * scale;
                }
                let logits = Tensor::from_vec(data, (4, 3000), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let whole = choose(cfg, &logits, None, trial as u64);
                let fast = choose(cfg, &logits, k, trial as u64);
                for ((tw, lw), (tf, lf)) in whole.iter().zip(&fast) {
                    assert_eq!(tw, tf, "config {c} trial {trial}");
                    assert!((lw - lf).abs() < 1e-12, "config {c}: log-prob {lw} vs {lf}");
                }
            }
        }
    }

    #[test]
    fn other_processors_read_whole_rows() {
        let on = |cfg: ProcessorConfig| candidate_count(&cfg, &ProcessorChain::new(&cfg, None).unwrap());
        assert_eq!(on(ProcessorConfig { repetition_penalty: Some(1.2), ..Default::default() }), None);
        assert_eq!(on(ProcessorConfig { do_sample: true, top_p: Some(0.9), ..Default::default() }), None, "no top-k");
        assert_eq!(
            on(ProcessorConfig { do_sample: true, top_k: Some(50), typical_p: Some(0.9), ..Default::default() }),
            None
        );
        assert_eq!(on(ProcessorConfig { do_sample: true, top_k: Some(5000), ..Default::default() }), None);
        assert_eq!(
            on(ProcessorConfig { do_sample: true, temperature: Some(0.5), top_k: Some(8), ..Default::default() }),
            Some((8, 0.5))
        );
    }
}
