//! Log-likelihoods of continuations given contexts, as lm-eval-harness's `hf` model computes
//! them: the pair is tokenized as a whole and the context alone, the continuation's tokens are
//! the whole's beyond the context's, and a continuation scores the sum of its tokens'
//! log-probabilities (greedy when each token is the arg-max).
//!
//! Continuations that share a context share one prefill of it: the cache is copied into one row
//! per continuation and all of them run in one forward over it. Several contexts (items) run in
//! one forward each way, each over a cache of its own, so batching changes no score beyond
//! float rounding. Without hooks, a context also reuses the cache of the previous call's last
//! context as far as their tokens agree (MMLU's shots, a task's fixed preamble), running only
//! the tokens after that.

use candle_core::{DType, IndexOp, Tensor, D};
use pare_formats::TokenizerBundle;
use pare_model::{Hooks, KvCache, Model, ModelError, PrefillInput, Result};
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
    /// Most contexts run in one forward (with their continuations in a second).
    batch: usize,
    /// The last context prefilled without hooks, and its cache.
    last: Option<(Vec<u32>, KvCache)>,
}

/// A context's continuations, as their requests' indices and tokens.
struct Group {
    context: Vec<u32>,
    members: Vec<usize>,
    continuations: Vec<Vec<u32>>,
}

/// Continuation logits one forward may produce (f32 values): 1 GiB, so a batch of a 150k
/// vocabulary still fits a small GPU or the host.
const MAX_LOGITS: usize = 1 << 28;

impl<'a> Scorer<'a> {
    /// A scorer that runs up to `batch` contexts at once (at least 1). Batching does not change
    /// a request's score beyond float rounding: every context runs over a cache of its own.
    pub fn new(model: &'a Model, tokenizer: &'a TokenizerBundle, hooks: &'a Hooks, batch: usize) -> Self {
        // A token pruner cuts one cache's tokens at a time.
        let batch = if hooks.pruner.is_some() { 1 } else { batch.max(1) };
        Scorer { model, tokenizer, hooks, batch, last: None }
    }

    /// Score every request, in order. Requests whose contexts tokenize alike share one prefill,
    /// run with a fresh copy of the hooks (a press compresses the context; the continuations
    /// are then scored over the compressed cache).
    pub fn score(&mut self, requests: &[Request]) -> Result<Vec<Scored>> {
        let encoded = requests.iter().map(|r| encode_pair(self.tokenizer, r)).collect::<Result<Vec<_>>>()?;
        let mut groups: Vec<Group> = Vec::new();
        let mut grouped = vec![false; requests.len()];
        for (i, (context, _)) in encoded.iter().enumerate() {
            if grouped[i] {
                continue;
            }
            let members: Vec<usize> = (i..encoded.len()).filter(|&j| &encoded[j].0 == context).collect();
            members.iter().for_each(|&j| grouped[j] = true);
            let continuations = members.iter().map(|&j| encoded[j].1.clone()).collect();
            groups.push(self.fit(Group { context: context.clone(), members, continuations })?);
        }
        let vocab = self.model.config().vocab_size;
        let mut scored = vec![None; requests.len()];
        let mut rest = groups.as_slice();
        while !rest.is_empty() {
            // Up to `batch` groups, and no more continuation logits than fit one forward.
            let mut take = 1;
            let mut logits = continuation_tokens(&rest[0]) * vocab;
            while take < rest.len().min(self.batch) {
                logits += continuation_tokens(&rest[take]) * vocab;
                if logits > MAX_LOGITS {
                    break;
                }
                take += 1;
            }
            let (chunk, next) = rest.split_at(take);
            for (group, scores) in chunk.iter().zip(self.score_groups(chunk)?) {
                for (&j, s) in group.members.iter().zip(scores) {
                    scored[j] = Some(s);
                }
            }
            rest = next;
        }
        Ok(scored.into_iter().map(|s| s.expect("every request is in a group")).collect())
    }

    /// As lm-eval does, a pair longer than the model's context loses context tokens from the left.
    fn fit(&self, mut group: Group) -> Result<Group> {
        let longest = group.continuations.iter().map(Vec::len).max().unwrap_or(0);
        let room = self.model.config().max_position_embeddings + 1;
        if longest >= room {
            return Err(ModelError::input(format!(
                "a continuation of {longest} tokens does not fit the model's context of {} tokens",
                room - 1
            )));
        }
        group.context.drain(..(group.context.len() + longest).saturating_sub(room));
        Ok(group)
    }

    /// Prefill the groups' contexts, then score every continuation after its context: the
    /// continuations of all groups run in one forward, one cache row per continuation.
    fn score_groups(&mut self, groups: &[Group]) -> Result<Vec<Vec<Scored>>> {
        let model = self.model;
        let (lasts, mut states) = self.prefill(groups)?;
        // Each continuation's first token is predicted by its context's last position.
        let mut scored: Vec<Vec<Scored>> = Vec::with_capacity(groups.len());
        for (g, group) in groups.iter().enumerate() {
            let last = lasts.narrow(0, g, 1)?;
            let firsts: Vec<u32> = group.continuations.iter().map(|c| c[0]).collect();
            let first = token_scores(&last.broadcast_as((firsts.len(), last.dim(1)?))?, &firsts)?;
            scored.push(
                first.into_iter().map(|(logprob, greedy)| Scored { loglikelihood: logprob as f64, greedy }).collect(),
            );
        }

        // One row per continuation, each its tokens but the last (nothing predicts past it);
        // shorter rows are padded at the end, where causal attention keeps the padding from
        // touching the real tokens. A group whose continuations are one token each is done.
        let mut seqs: Vec<(&mut KvCache, &mut Hooks)> = Vec::new();
        let mut inputs: Vec<Vec<Vec<u32>>> = Vec::new();
        let mut targets: Vec<u32> = Vec::new();
        let mut extended: Vec<(usize, usize)> = Vec::new();
        for (g, (group, (cache, hooks))) in groups.iter().zip(states.iter_mut()).enumerate() {
            let width = continuation_width(group);
            if width == 0 {
                continue;
            }
            let rows = vec![0; group.continuations.len()];
            cache.select_rows(&rows)?;
            hooks.select_rows(&rows)?;
            inputs.push(
                group.continuations.iter().map(|c| (0..width).map(|t| c[t.min(c.len() - 1)]).collect()).collect(),
            );
            targets.extend(group.continuations.iter().flat_map(|c| (1..=width).map(move |t| c[t.min(c.len() - 1)])));
            extended.push((g, width));
            seqs.push((cache, hooks));
        }
        if seqs.is_empty() {
            return Ok(scored);
        }
        let logits = model.step_all(&mut seqs, &inputs)?;
        let rest = token_scores(&logits, &targets)?;
        let mut offset = 0;
        for (g, width) in extended {
            for (row, c) in groups[g].continuations.iter().enumerate() {
                let s = &mut scored[g][row];
                for &(logprob, greedy) in &rest[offset + row * width..offset + row * width + c.len() - 1] {
                    s.loglikelihood += logprob as f64;
                    s.greedy &= greedy;
                }
            }
            offset += groups[g].continuations.len() * width;
        }
        Ok(scored)
    }

    /// The contexts' last logits (groups, vocab), and each context's cache and the hooks that
    /// filled it. With hooks each context runs whole on its own (a press compresses all of it,
    /// a pruner cuts across it); without, the contexts run in one forward, each over a cache of
    /// its own, and the tokens a context shares with the last context of the previous call
    /// come from that context's cache (MMLU's shots, a task's fixed preamble).
    fn prefill(&mut self, groups: &[Group]) -> Result<(Tensor, Vec<(KvCache, Hooks)>)> {
        let model = self.model;
        if !self.hooks.is_empty() {
            let mut lasts = Vec::with_capacity(groups.len());
            let mut states = Vec::with_capacity(groups.len());
            for group in groups {
                let mut hooks = self.hooks.clone();
                let (logits, cache) = model.prefill(PrefillInput::Tokens(std::slice::from_ref(&group.context)), &mut hooks)?;
                lasts.push(logits);
                states.push((cache, hooks));
            }
            return Ok((Tensor::cat(&lasts, 0)?, states));
        }
        let mut states = Vec::with_capacity(groups.len());
        let mut tokens = Vec::with_capacity(groups.len());
        for group in groups {
            let context = &group.context;
            // At least the last token runs: its logits are the ones wanted.
            let shared = self.last.as_ref().map_or(0, |(tokens, _)| {
                tokens.iter().zip(context).take_while(|(a, b)| a == b).count().min(context.len() - 1)
            });
            let cache = match &self.last {
                Some((_, cached)) if shared > 0 => {
                    let mut cache = cached.clone();
                    cache.truncate(shared)?;
                    cache
                }
                _ => model.new_cache(1),
            };
            tokens.push(vec![context[shared..].to_vec()]);
            states.push((cache, self.hooks.clone()));
        }
        let mut seqs: Vec<(&mut KvCache, &mut Hooks)> = states.iter_mut().map(|(c, h)| (c, h)).collect();
        let lasts = model.step(&mut seqs, &tokens)?;
        let (last_cache, _) = states.last().expect("at least one group");
        self.last = Some((groups[groups.len() - 1].context.clone(), last_cache.clone()));
        Ok((lasts, states))
    }
}

/// The tokens a group's continuations run after its context: one row per continuation of its
/// longest continuation's length less one.
fn continuation_width(group: &Group) -> usize {
    group.continuations.iter().map(Vec::len).max().unwrap_or(1) - 1
}

fn continuation_tokens(group: &Group) -> usize {
    group.continuations.len() * continuation_width(group)
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
