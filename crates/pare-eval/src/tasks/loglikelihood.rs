//! Log-likelihoods of continuations given contexts, as lm-eval-harness's `hf` model computes
//! them: the pair is tokenized as a whole and the context alone, the continuation's tokens are
//! the whole's beyond the context's, and a continuation scores the sum of its tokens'
//! log-probabilities (greedy when each token is the arg-max).
//!
//! Continuations that share a context share one prefill of it: the cache is copied into one row
//! per continuation and all of them run in one forward over it. Several contexts (items) run
//! together, so a batch costs two forwards: without hooks their contexts are the left-padded
//! rows of one cache (after a prefix they share, run once); with hooks each context is
//! prefilled alone under its own hooks and the continuations of all of them run in one forward
//! over their own caches. With dense weights batching changes no score beyond float rounding
//! (quantized weights take another product path for many rows, as in llama.cpp, which rounds
//! otherwise). Without hooks, a context also reuses the cache of the last call's context (or
//! shared prefix) as far as their tokens agree (MMLU's shots, a task's fixed preamble), running
//! only the tokens after that.

use candle_core::{DType, IndexOp, Tensor, D};
use pare_formats::TokenizerBundle;
use pare_model::{left_pad, Hooks, KvCache, Logits, Model, ModelError, Phase, PrefillInput, Result, PAD_POSITION};
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

/// Context tokens, padding included, one forward may run: BoolQ's passages reach 1 000 tokens,
/// and 64 of them padded to the longest (with attention scores per row where no fused kernel
/// applies) ran a GPU shared by five such runs out of memory.
const MAX_PADDED_TOKENS: usize = 16 * 1024;

impl<'a> Scorer<'a> {
    /// A scorer that runs up to `batch` contexts at once (at least 1).
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
            // Up to `batch` groups, and no more padded context tokens and continuation logits
            // than fit one forward.
            let mut take = 1;
            while take < rest.len().min(self.batch)
                && padded_context_tokens(&rest[..=take]) <= MAX_PADDED_TOKENS
                && continuation_logits(&rest[..=take]) * vocab <= MAX_LOGITS
            {
                take += 1;
            }
            let (chunk, next) = rest.split_at(take);
            let scores = if self.hooks.is_empty() { self.score_padded(chunk)? } else { self.score_caches(chunk)? };
            for (group, scores) in chunk.iter().zip(scores) {
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

    /// Without hooks: the groups' contexts as the rows of one cache, left-padded, in one forward
    /// (after the prefix they share, which runs once or comes from the last call's cache), then
    /// every group's continuations as rows of that cache in a second. Two forwards whatever the
    /// batch, which is what a GPU needs.
    fn score_padded(&mut self, groups: &[Group]) -> Result<Vec<Vec<Scored>>> {
        let model = self.model;
        let contexts: Vec<&[u32]> = groups.iter().map(|g| g.context.as_slice()).collect();
        // Every context runs at least its last token: its logits are the ones wanted.
        let shortest = contexts.iter().map(|c| c.len()).min().expect("at least one group") - 1;
        let common = contexts.iter().map(|c| common_prefix(contexts[0], c)).min().unwrap_or(0).min(shortest);
        let shared = self.last.as_ref().map_or(0, |(tokens, _)| common_prefix(tokens, &contexts[0][..common]));
        let (mut cache, mut done) = match &self.last {
            Some((_, cached)) if shared > 0 => {
                let mut cache = cached.clone();
                cache.truncate(shared)?;
                (cache, shared)
            }
            _ => (model.new_cache(1), 0),
        };
        // A prefix that several contexts share runs once, when long enough to be worth a forward.
        if groups.len() > 1 && common >= done + SHARED_PREFIX_RUN {
            let positions = vec![(done as i64..common as i64).collect::<Vec<_>>()];
            let x = model.embed(&[contexts[0][done..common].to_vec()])?;
            let phase = if done == 0 { Phase::Prefill } else { Phase::Extend };
            model.forward(x, &positions, &mut cache, &mut Hooks::default(), phase, Logits::Last)?;
            done = common;
        }
        if groups.len() > 1 {
            self.last = Some((contexts[0][..done].to_vec(), cache.clone()));
        }
        cache = if done == 0 {
            model.new_cache(groups.len())
        } else {
            cache.select_rows(&vec![0; groups.len()])?;
            cache
        };
        let rests: Vec<Vec<u32>> = contexts.iter().map(|c| c[done..].to_vec()).collect();
        let (tokens, mut positions) = left_pad(&rests)?;
        for p in positions.iter_mut().flatten().filter(|p| **p != PAD_POSITION) {
            *p += done as i64;
        }
        let phase = if done == 0 { Phase::Prefill } else { Phase::Extend };
        let lasts =
            model.forward(model.embed(&tokens)?, &positions, &mut cache, &mut Hooks::default(), phase, Logits::Last)?;
        if groups.len() == 1 {
            self.last = Some((contexts[0].to_vec(), cache.clone()));
        }
        let mut scored = first_scores(groups, &lasts)?;

        // One row per continuation of a group that has more than its first token to score.
        let extended: Vec<usize> = (0..groups.len()).filter(|&g| continuation_width(&groups[g]) > 0).collect();
        if extended.is_empty() {
            return Ok(scored);
        }
        let width = extended.iter().map(|&g| continuation_width(&groups[g])).max().unwrap_or(0);
        let rows: Vec<usize> = extended.iter().flat_map(|&g| vec![g; groups[g].continuations.len()]).collect();
        cache.select_rows(&rows)?;
        let continuations: Vec<&Vec<u32>> = extended.iter().flat_map(|&g| &groups[g].continuations).collect();
        let (inputs, targets) = padded_rows(&continuations, width);
        let positions: Vec<Vec<i64>> =
            cache.next_positions().iter().map(|&next| (next..next + width as i64).collect()).collect();
        let logits = model.forward(
            model.embed(&inputs)?,
            &positions,
            &mut cache,
            &mut Hooks::default(),
            Phase::Extend,
            Logits::All,
        )?;
        let rest = token_scores(&logits.flatten_to(1)?, &targets)?;
        add_rest_scores(&mut scored, groups, &extended, |_| width, &rest);
        Ok(scored)
    }

    /// With hooks: each context prefilled alone under its own copy of the hooks (a press
    /// compresses all of it, a pruner cuts across it; KVzip replays it), then every group's
    /// continuations in one forward over the groups' own caches, one row per continuation.
    fn score_caches(&mut self, groups: &[Group]) -> Result<Vec<Vec<Scored>>> {
        let model = self.model;
        let mut lasts = Vec::with_capacity(groups.len());
        let mut states = Vec::with_capacity(groups.len());
        for group in groups {
            let mut hooks = self.hooks.clone();
            let (logits, cache) =
                model.prefill(PrefillInput::Tokens(std::slice::from_ref(&group.context)), &mut hooks)?;
            lasts.push(logits);
            states.push((cache, hooks));
        }
        let mut scored = first_scores(groups, &Tensor::cat(&lasts, 0)?)?;

        let mut seqs: Vec<(&mut KvCache, &mut Hooks)> = Vec::new();
        let mut inputs: Vec<Vec<Vec<u32>>> = Vec::new();
        let mut targets: Vec<u32> = Vec::new();
        let mut extended: Vec<usize> = Vec::new();
        for (g, (group, (cache, hooks))) in groups.iter().zip(states.iter_mut()).enumerate() {
            let width = continuation_width(group);
            if width == 0 {
                continue;
            }
            let rows = vec![0; group.continuations.len()];
            cache.select_rows(&rows)?;
            hooks.select_rows(&rows)?;
            let (group_inputs, group_targets) = padded_rows(&group.continuations.iter().collect::<Vec<_>>(), width);
            inputs.push(group_inputs);
            targets.extend(group_targets);
            extended.push(g);
            seqs.push((cache, hooks));
        }
        if seqs.is_empty() {
            return Ok(scored);
        }
        let rest = token_scores(&model.step_all(&mut seqs, &inputs)?, &targets)?;
        add_rest_scores(&mut scored, groups, &extended, |g| continuation_width(&groups[g]), &rest);
        Ok(scored)
    }
}

/// A shared prefix of the contexts of one call runs once if at least this long; a shorter one
/// is not worth a forward of its own.
const SHARED_PREFIX_RUN: usize = 32;

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Each continuation's first token, predicted by its context's last position (`lasts`: a row
/// per group): one log-softmax over a row per continuation for the whole batch.
fn first_scores(groups: &[Group], lasts: &Tensor) -> Result<Vec<Vec<Scored>>> {
    let rows: Vec<u32> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| std::iter::repeat_n(g as u32, group.continuations.len()))
        .collect();
    let firsts: Vec<u32> = groups.iter().flat_map(|g| g.continuations.iter().map(|c| c[0])).collect();
    let rows = Tensor::new(rows.as_slice(), lasts.device())?;
    let mut scores = token_scores(&lasts.index_select(&rows, 0)?, &firsts)?.into_iter();
    Ok(groups
        .iter()
        .map(|group| {
            let first = scores.by_ref().take(group.continuations.len());
            first.map(|(logprob, greedy)| Scored { loglikelihood: logprob as f64, greedy }).collect()
        })
        .collect())
}

/// One row per continuation, each its tokens but the last (nothing predicts past it) and the
/// tokens they predict, `width` of each: shorter rows are padded at the end, where causal
/// attention keeps the padding from touching the real tokens.
fn padded_rows(continuations: &[&Vec<u32>], width: usize) -> (Vec<Vec<u32>>, Vec<u32>) {
    let at = |c: &[u32], t: usize| c[t.min(c.len() - 1)];
    let inputs = continuations.iter().map(|c| (0..width).map(|t| at(c, t)).collect()).collect();
    let targets = continuations.iter().flat_map(|c| (1..=width).map(move |t| at(c, t))).collect();
    (inputs, targets)
}

/// Add the scores of the continuations' later tokens: `rest` holds, for each group in
/// `extended`, a row of `width(g)` scores per continuation.
fn add_rest_scores(
    scored: &mut [Vec<Scored>],
    groups: &[Group],
    extended: &[usize],
    width: impl Fn(usize) -> usize,
    rest: &[(f32, bool)],
) {
    let mut row_start = 0;
    for &g in extended {
        for (row, c) in groups[g].continuations.iter().enumerate() {
            let s = &mut scored[g][row];
            let start = row_start + row * width(g);
            for &(logprob, greedy) in &rest[start..start + c.len() - 1] {
                s.loglikelihood += logprob as f64;
                s.greedy &= greedy;
            }
        }
        row_start += groups[g].continuations.len() * width(g);
    }
}

/// The tokens a group's continuations run after its context: one row per continuation of its
/// longest continuation's length less one.
fn continuation_width(group: &Group) -> usize {
    group.continuations.iter().map(Vec::len).max().unwrap_or(1) - 1
}

/// The groups' contexts as the rows of one cache, left-padded to the longest.
fn padded_context_tokens(groups: &[Group]) -> usize {
    groups.len() * groups.iter().map(|g| g.context.len()).max().unwrap_or(0)
}

/// Logits the groups' continuations need in one forward: a row per continuation, as wide as
/// the widest.
fn continuation_logits(groups: &[Group]) -> usize {
    let rows: usize = groups.iter().map(|g| g.continuations.len()).sum();
    rows * groups.iter().map(continuation_width).max().unwrap_or(0)
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
