//! The generation loop: prefill the prompts once, then one decode step per token over the KV
//! cache, each row processed, chosen and stopped on its own.

use std::sync::Arc;
use std::time::Instant;

use pare_formats::TokenizerBundle;
use pare_model::{CachePress, Model, TokenPruner};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::beam::{beam_search_with, BeamConfig};
use crate::config::GenerationConfig;
use crate::processors::chain::{ProcessorChain, ProcessorConfig};
use crate::processors::ProcessContext;
use crate::sampling::{argmax, logprob, sample};
use crate::stopping::find_stop;
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

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    /// Tokens per second of decode, counting every row's token of each step.
    pub decode_tok_s: f64,
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

/// Everything the loop needs that is not the model: settings and the tokenizer for text-level
/// options (stop strings, bad words, DRY breakers).
pub struct Generator<'a> {
    pub config: GenerationConfig,
    pub tokenizer: Option<&'a TokenizerBundle>,
    vocab_texts: Option<Arc<Vec<String>>>,
    bad_words_ids: Vec<Vec<u32>>,
    /// KV-cache compression: every generation's cache gets a fresh copy.
    press: Option<Box<dyn CachePress>>,
    /// Prefill token pruning.
    pruner: Option<Box<dyn TokenPruner>>,
}

impl<'a> Generator<'a> {
    pub fn new(config: GenerationConfig, tokenizer: Option<&'a TokenizerBundle>) -> Result<Self> {
        config.validate().map_err(GenerateError::Config)?;
        let needs_tokenizer = config.stop.as_ref().is_some_and(|s| !s.is_empty())
            || config.bad_words.as_ref().is_some_and(|b| !b.is_empty())
            || config.dry_multiplier.is_some_and(|m| m > 0.0);
        if needs_tokenizer && tokenizer.is_none() {
            return Err(GenerateError::Config("stop strings, bad words and DRY need a tokenizer".into()));
        }
        let mut bad_words_ids = Vec::new();
        for word in config.bad_words.iter().flatten() {
            let ids =
                tokenizer.expect("checked").encode(word, false).map_err(|e| GenerateError::Config(e.to_string()))?;
            if ids.is_empty() {
                return Err(GenerateError::Config(format!("bad word {word:?} encodes to no tokens")));
            }
            bad_words_ids.push(ids);
        }
        let vocab_texts = match (tokenizer, config.dry_multiplier) {
            (Some(t), Some(m)) if m > 0.0 => Some(Arc::new(
                (0..t.vocab_size() as u32).map(|id| t.decode(&[id], false).unwrap_or_default()).collect(),
            )),
            _ => None,
        };
        Ok(Generator { config, tokenizer, vocab_texts, bad_words_ids, press: None, pruner: None })
    }

    /// Compress every generation's KV cache with `press`.
    pub fn with_press(mut self, press: Option<Box<dyn CachePress>>) -> Self {
        self.press = press;
        self
    }

    /// Prune prompt tokens inside the prefill with `pruner`.
    pub fn with_pruner(mut self, pruner: Option<Box<dyn TokenPruner>>) -> Self {
        self.pruner = pruner;
        self
    }

    /// A fresh processor chain (one per row: some processors keep state).
    pub fn chain(&self) -> Result<ProcessorChain> {
        let cfg = self.config.processor_config(&self.bad_words_ids).map_err(GenerateError::Config)?;
        ProcessorChain::new(&cfg, self.vocab_texts.clone()).map_err(GenerateError::Config)
    }

    fn decode(&self, tokens: &[u32]) -> String {
        self.tokenizer.and_then(|t| t.decode(tokens, true).ok()).unwrap_or_default()
    }

    /// Generate for every prompt: `num_return_sequences` sequences each, best first for beams.
    /// `on_token(row, token)` sees each sampled/greedy token as it is chosen.
    pub fn generate(
        &self,
        model: &Model,
        prompts: &[Vec<u32>],
        on_token: impl FnMut(usize, u32),
    ) -> Result<GenerationOutput> {
        let ctx = model.config.max_position_embeddings;
        let max_new = self.config.max_new_tokens();
        if let Some(p) = prompts.iter().find(|p| p.len() + max_new > ctx) {
            return Err(GenerateError::Config(format!(
                "the prompt ({} tokens) plus max_new_tokens {max_new} exceeds the model's context of {ctx}",
                p.len()
            )));
        }
        if self.config.num_beams() > 1 {
            self.beam(model, prompts)
        } else {
            self.sample(model, prompts, on_token)
        }
    }

    fn sample(
        &self,
        model: &Model,
        prompts: &[Vec<u32>],
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<GenerationOutput> {
        let n = self.config.num_return_sequences();
        // Rows are prompt 0 × n, prompt 1 × n, ... as HF's repeat_interleave.
        let rows: Vec<usize> = (0..prompts.len()).flat_map(|p| std::iter::repeat_n(p, n)).collect();
        let inputs: Vec<Vec<u32>> = rows.iter().map(|&p| prompts[p].clone()).collect();
        let eos = self.config.eos_token_id.clone().unwrap_or_default();
        let stops = self.config.stop.clone().unwrap_or_default();
        let max_new = self.config.max_new_tokens();
        let mut rng = StdRng::seed_from_u64(self.config.seed.unwrap_or(0));
        let mut chains = rows.iter().map(|_| self.chain()).collect::<Result<Vec<_>>>()?;
        let mut seqs: Vec<Sequence> = rows
            .iter()
            .map(|&p| Sequence {
                prompt_index: p,
                tokens: vec![],
                text: String::new(),
                logprobs: vec![],
                score: 0.0,
                finish_reason: FinishReason::Length,
            })
            .collect();
        let mut timings = Timings { prompt_tokens: inputs.iter().map(Vec::len).sum(), ..Timings::default() };
        if max_new == 0 {
            return Ok(GenerationOutput { sequences: seqs, timings, cache: None });
        }
        // Each row's whole sequence (prompt, then generated), as the processors see it.
        let mut sequences = inputs.clone();
        let mut done = vec![false; rows.len()];
        let start = Instant::now();
        let (mut logits, mut cache) = model.prefill_pruned(&inputs, self.press.as_deref(), self.pruner.as_deref())?;
        timings.prefill_s = start.elapsed().as_secs_f64();
        let mut stats = CacheStats { kv_bytes_prefill: cache.bytes(), ..CacheStats::default() };
        let decode_start = Instant::now();
        let mut steps = 0usize;
        let cfg = self.config.processor_config(&self.bad_words_ids).map_err(GenerateError::Config)?;
        let candidates = chains.first().and_then(|c| candidate_count(&cfg, c));
        loop {
            let raw = step_scores(&logits, candidates)?;
            let mut next = vec![0u32; rows.len()];
            for (row, scores) in raw.into_iter().enumerate() {
                if done[row] {
                    next[row] = *seqs[row].tokens.last().unwrap_or(&0);
                    continue;
                }
                let mut processed = scores.logits.clone();
                let mut pctx =
                    ProcessContext { input_ids: &sequences[row], prompt_len: inputs[row].len(), rng: &mut rng };
                chains[row].process(&mut pctx, &mut processed);
                let chosen = if self.config.do_sample() { sample(&processed, &mut rng) } else { argmax(&processed) };
                let token = scores.token(chosen);
                chains[row].accept(token, &processed);
                next[row] = token;
                sequences[row].push(token);
                let seq = &mut seqs[row];
                seq.tokens.push(token);
                let lp = scores.logprob(chosen) as f32;
                seq.logprobs.push(lp);
                seq.score += lp;
                timings.generated_tokens += 1;
                on_token(row, token);
                if eos.contains(&token) {
                    (seq.finish_reason, done[row]) = (FinishReason::Eos, true);
                } else if !stops.is_empty() && find_stop(&self.decode(&seq.tokens), &stops).is_some() {
                    (seq.finish_reason, done[row]) = (FinishReason::Stop, true);
                } else if seq.tokens.len() >= max_new {
                    done[row] = true;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            if self.config.max_time.is_some_and(|t| start.elapsed().as_secs_f64() >= t) {
                for (row, d) in done.iter_mut().enumerate() {
                    if !*d {
                        seqs[row].finish_reason = FinishReason::Time;
                    }
                }
                break;
            }
            // Finished rows keep stepping with their last token; their outputs are discarded.
            logits = model.decode(&mut cache, &next)?;
            steps += 1;
        }
        timings.decode_s = decode_start.elapsed().as_secs_f64();
        timings.prefill_tok_s = rate(timings.prompt_tokens, timings.prefill_s);
        timings.decode_tok_s = rate(steps * rows.len(), timings.decode_s);
        stats.kv_bytes_final = cache.bytes();
        stats.kv_bytes_uncompressed = cache.uncompressed_bytes();
        for seq in &mut seqs {
            seq.text = self.decode(&seq.tokens);
            if seq.finish_reason == FinishReason::Stop {
                if let Some(cut) = find_stop(&seq.text, &stops) {
                    seq.text.truncate(cut);
                }
            }
        }
        Ok(GenerationOutput { sequences: seqs, timings, cache: Some(stats) })
    }

    fn beam(&self, model: &Model, prompts: &[Vec<u32>]) -> Result<GenerationOutput> {
        let cfg = BeamConfig {
            num_beams: self.config.num_beams(),
            length_penalty: self.config.length_penalty.unwrap_or(1.0),
            early_stopping: self.config.early_stopping.unwrap_or_default(),
            num_return_sequences: self.config.num_return_sequences(),
            max_new_tokens: self.config.max_new_tokens(),
            eos_token_ids: self.config.eos_token_id.clone().unwrap_or_default(),
        };
        let mut timings = Timings { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Timings::default() };
        let start = Instant::now();
        let mut sequences = Vec::new();
        let mut rng = StdRng::seed_from_u64(self.config.seed.unwrap_or(0));
        for (p, prompt) in prompts.iter().enumerate() {
            let mut chains = (0..cfg.num_beams).map(|_| self.chain()).collect::<Result<Vec<_>>>()?;
            let mut process = |beam: usize, ids: &[u32], prompt_len: usize, scores: &mut [f32]| {
                let mut pctx = ProcessContext { input_ids: ids, prompt_len, rng: &mut rng };
                chains[beam].process(&mut pctx, scores);
            };
            for hyp in
                beam_search_with(model, prompt, &cfg, self.press.as_deref(), self.pruner.as_deref(), &mut process)?
            {
                timings.generated_tokens += hyp.tokens.len();
                let finish_reason = if hyp.finished_by_eos { FinishReason::Eos } else { FinishReason::Length };
                sequences.push(Sequence {
                    prompt_index: p,
                    text: self.decode(&hyp.tokens),
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
/// greedy decoding without processors, or sampling whose processors are temperature, top-k,
/// top-p and min-p with top-k on (top-p and min-p only remove what top-k kept). Steps then read
/// only those candidates (see [`step_scores`]).
fn candidate_count(cfg: &ProcessorConfig, chain: &ProcessorChain) -> Option<(usize, f32)> {
    let names = chain.names();
    if !cfg.do_sample {
        return names.is_empty().then_some((1, 1.0));
    }
    if !names.iter().all(|n| matches!(*n, "temperature" | "top_k" | "top_p" | "min_p")) {
        return None;
    }
    let t = cfg.temperature.unwrap_or(1.0);
    if t == 0.0 {
        return Some((1, 1.0));
    }
    let k = cfg.top_k.filter(|&k| k > 0)?.max(cfg.min_tokens_to_keep);
    (k <= MAX_CANDIDATES).then_some((k, t))
}

/// Above this top-k, a step reads whole rows: selection stops paying for itself.
const MAX_CANDIDATES: usize = 1024;

/// One row's scores as the processors see them: the whole vocabulary, or only the candidates
/// that can survive the chain (token ids increasing, so ties break as over the whole row).
struct RowScores {
    logits: Vec<f32>,
    ids: Option<Vec<u32>>,
    lse: f64,
}

impl RowScores {
    fn token(&self, chosen: u32) -> u32 {
        self.ids.as_ref().map_or(chosen, |ids| ids[chosen as usize])
    }

    /// log p(token) under the unprocessed distribution.
    fn logprob(&self, chosen: u32) -> f64 {
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
fn step_scores(logits: &candle_core::Tensor, candidates: Option<(usize, f32)>) -> Result<Vec<RowScores>> {
    let whole = |row: Vec<f32>| RowScores { logits: row, ids: None, lse: 0.0 };
    let Some((k, t)) = candidates else {
        return Ok(logits.to_vec2::<f32>()?.into_iter().map(whole).collect());
    };
    pare_kernels::top_candidates(logits, k, t)?
        .into_iter()
        .enumerate()
        .map(|(r, c)| match c {
            Some(c) => Ok(RowScores { logits: c.logits, ids: Some(c.ids), lse: c.lse }),
            None => Ok(whole(logits.get(r)?.to_vec1::<f32>()?)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
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
                chain.process(&mut ProcessContext { input_ids: &ids, prompt_len: 3, rng: &mut rng }, &mut processed);
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
        ];
        let mut rng = StdRng::seed_from_u64(3);
        for (c, cfg) in configs.iter().enumerate() {
            let k = candidate_count(cfg, &ProcessorChain::new(cfg, None).unwrap());
            assert!(k.is_some(), "config {c} reads candidates");
            for trial in 0..40 {
                // bf16-rounded logits: many exact ties, some at the k-th score.
                let scale = [0.5f32, 2.0, 6.0][trial % 3];
                let data: Vec<f32> = (0..4 * 3000).map(|_| rng.random::<f32>() * scale * 4.0 - scale).collect();
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
