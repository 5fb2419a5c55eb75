//! Log-likelihoods of continuations given contexts, as lm-eval-harness's `hf` model computes
//! them: the pair is tokenized as a whole and the context alone, the continuation's tokens are
//! the whole's beyond the context's, and a continuation scores the sum of its tokens'
//! log-probabilities (greedy when each token is the arg-max).
//!
//! Continuations that share a context share one prefill of it: the cache is copied into one row
//! per continuation and all of them run in one forward over it. Without hooks, a context also
//! reuses the cache of the previous one as far as their tokens agree (MMLU's shots, a task's
//! fixed preamble), running only the tokens after that.

use candle_core::{DType, IndexOp, Tensor, D};
use pare_formats::TokenizerBundle;
use pare_model::{Hooks, KvCache, Logits, Model, ModelError, Phase, PrefillInput, Result};
use serde::Serialize;

/// One (context, continuation) pair of strings, as a task builds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    pub context: String,
    pub continuation: String,
}

/// A continuation's summed log-probability and whether greedy decoding would produce it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scored {
    pub loglikelihood: f64,
    pub greedy: bool,
}

/// lm-eval's `_encode_pair`: whitespace ending the context moves to the continuation, then the
/// continuation's tokens are those of `context + continuation` past the context's own tokens.
pub fn encode_pair(tokenizer: &TokenizerBundle, request: &Request) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = request.context.trim_end();
    let (context, continuation) = (trimmed, format!("{}{}", &request.context[trimmed.len()..], request.continuation));
    if context.is_empty() {
        return Err(ModelError::input("a request has an empty context"));
    }
    let whole = tokenizer.encode(&format!("{context}{continuation}"), false)?;
    let context = tokenizer.encode(context, false)?;
    let continuation = whole.get(context.len()..).unwrap_or_default().to_vec();
    if continuation.is_empty() {
        return Err(ModelError::input(format!("the continuation {:?} has no tokens of its own", request.continuation)));
    }
    Ok((context, continuation))
}

/// Scores requests for one model, tokenizer and set of hooks, remembering the last context's
/// cache.
pub struct Scorer<'a> {
    model: &'a Model,
    tokenizer: &'a TokenizerBundle,
    hooks: &'a Hooks,
    /// The last context prefilled without hooks, and its cache.
    last: Option<(Vec<u32>, KvCache)>,
}

impl<'a> Scorer<'a> {
    pub fn new(model: &'a Model, tokenizer: &'a TokenizerBundle, hooks: &'a Hooks) -> Self {
        Scorer { model, tokenizer, hooks, last: None }
    }

    /// Score every request, in order. Requests whose contexts tokenize alike share one prefill,
    /// run with a fresh copy of the hooks (a press compresses the context; the continuations
    /// are then scored over the compressed cache).
    pub fn score(&mut self, requests: &[Request]) -> Result<Vec<Scored>> {
        let encoded = requests.iter().map(|r| encode_pair(self.tokenizer, r)).collect::<Result<Vec<_>>>()?;
        let mut scored = vec![None; requests.len()];
        for (i, (context, _)) in encoded.iter().enumerate() {
            if scored[i].is_some() {
                continue;
            }
            let members: Vec<usize> = (i..encoded.len()).filter(|&j| &encoded[j].0 == context).collect();
            let continuations: Vec<&[u32]> = members.iter().map(|&j| encoded[j].1.as_slice()).collect();
            for (j, s) in members.iter().zip(self.score_shared_context(context, &continuations)?) {
                scored[*j] = Some(s);
            }
        }
        Ok(scored.into_iter().map(|s| s.expect("every request is in a group")).collect())
    }

    /// Prefill `context` once, then score each continuation after it.
    fn score_shared_context(&mut self, context: &[u32], continuations: &[&[u32]]) -> Result<Vec<Scored>> {
        let model = self.model;
        // As lm-eval does, a pair longer than the model's context loses context tokens from the left.
        let longest = continuations.iter().map(|c| c.len()).max().unwrap_or(0);
        let room = model.config().max_position_embeddings + 1;
        if longest >= room {
            return Err(ModelError::input(format!(
                "a continuation of {longest} tokens does not fit the model's context of {} tokens",
                room - 1
            )));
        }
        let context = &context[(context.len() + longest).saturating_sub(room)..];

        let (last, mut cache, mut hooks) = self.prefill(context)?;
        // Each continuation's first token is predicted by the context's last position.
        let firsts: Vec<u32> = continuations.iter().map(|c| c[0]).collect();
        let first = token_scores(&last.broadcast_as((firsts.len(), last.dim(1)?))?, &firsts)?;

        let width = longest - 1;
        let rest = if width == 0 {
            None
        } else {
            // One row per continuation, each its tokens but the last (nothing predicts past it);
            // shorter rows are padded at the end, where causal attention keeps the padding from
            // touching the real tokens.
            let rows = vec![0; continuations.len()];
            cache.select_rows(&rows)?;
            hooks.select_rows(&rows)?;
            let inputs: Vec<Vec<u32>> =
                continuations.iter().map(|c| (0..width).map(|t| c[t.min(c.len() - 1)]).collect()).collect();
            let targets: Vec<u32> =
                continuations.iter().flat_map(|c| (1..=width).map(move |t| c[t.min(c.len() - 1)])).collect();
            let start = cache.next_positions()[0];
            let positions = vec![(start..start + width as i64).collect::<Vec<_>>(); continuations.len()];
            let logits =
                model.forward(model.embed(&inputs)?, &positions, &mut cache, &mut hooks, Phase::Extend, Logits::All)?;
            let vocab = logits.dim(D::Minus1)?;
            Some(token_scores(&logits.reshape((continuations.len() * width, vocab))?, &targets)?)
        };

        Ok(continuations
            .iter()
            .enumerate()
            .map(|(row, c)| {
                let mut scored = Scored { loglikelihood: first[row].0 as f64, greedy: first[row].1 };
                if let Some(rest) = &rest {
                    for &(logprob, greedy) in &rest[row * width..row * width + c.len() - 1] {
                        scored.loglikelihood += logprob as f64;
                        scored.greedy &= greedy;
                    }
                }
                scored
            })
            .collect())
    }

    /// The context's last logits (1, vocab), its cache and the hooks that filled it. With hooks
    /// the whole context runs (a press compresses all of it, a pruner cuts across it); without,
    /// the tokens it shares with the last context come from that context's cache.
    fn prefill(&mut self, context: &[u32]) -> Result<(Tensor, KvCache, Hooks)> {
        let model = self.model;
        let mut hooks = self.hooks.clone();
        if !hooks.is_empty() {
            let (logits, cache) = model.prefill(PrefillInput::Tokens(&[context.to_vec()]), &mut hooks)?;
            return Ok((logits, cache, hooks));
        }
        // At least the last token runs: its logits are the ones wanted.
        let shared = self.last.as_ref().map_or(0, |(tokens, _)| {
            tokens.iter().zip(context).take_while(|(a, b)| a == b).count().min(context.len() - 1)
        });
        let (logits, cache) = match &self.last {
            Some((_, cached)) if shared > 0 => {
                let mut cache = cached.clone();
                cache.truncate(shared)?;
                let rest = &context[shared..];
                let positions = vec![(shared as i64..context.len() as i64).collect::<Vec<_>>()];
                let x = model.embed(&[rest.to_vec()])?;
                let logits = model.forward(x, &positions, &mut cache, &mut hooks, Phase::Extend, Logits::Last)?;
                (logits, cache)
            }
            _ => model.prefill(PrefillInput::Tokens(&[context.to_vec()]), &mut hooks)?,
        };
        self.last = Some((context.to_vec(), cache.clone()));
        Ok((logits, cache, hooks))
    }
}

/// For each row of `logits` (rows, vocab): the log-probability of its target and whether the
/// target is the row's arg-max.
fn token_scores(logits: &Tensor, targets: &[u32]) -> Result<Vec<(f32, bool)>> {
    let logprobs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let ids = Tensor::new(targets, logprobs.device())?.unsqueeze(1)?;
    let picked: Vec<f32> = logprobs.gather(&ids, 1)?.i((.., 0))?.to_vec1()?;
    let best: Vec<u32> = logprobs.argmax(D::Minus1)?.to_vec1()?;
    Ok(picked.into_iter().zip(best.iter().zip(targets)).map(|(p, (b, t))| (p, b == t)).collect())
}
