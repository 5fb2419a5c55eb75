//! KVzipPress (arXiv 2505.23416), as kvpress 0.5.5 runs it: after the prefill, the model is
//! asked to repeat its context ("Repeat the previous context exactly.", chunk by chunk) over the
//! filled cache, and each context entry is scored by the most attention any replay query of its
//! KV head's group gives it — softmax over the sinks, the chunk being repeated and the replay
//! tokens (causal among them). The replay entries then leave the cache, the sinks score above
//! everything, and the lowest scores are evicted globally over every layer and KV head (or the
//! same count per layer with `layerwise`), so heads and layers keep different numbers of
//! entries. kvpress only masks the evicted keys; here each head keeps exactly its entries.
//!
//! The replay runs through [`Model::step`] with an observing press ([`ReplayObserver`]), so the
//! model knows nothing of KVzip. It costs a forward over every context token again, plus the
//! prompt and the template per chunk (kvpress: "2–3 times the initial prefilling cost").

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, D};
use pare_formats::{render_chat, ChatMessage, TokenizerBundle};
use pare_model::cache::{KvCache, LayerKv};
use pare_model::hooks::{CachePress, LayerContext};
use pare_model::{Hooks, Model};

use crate::budget::Budget;
use crate::compress::{make_contiguous, top_k, PositionPolicy};
use crate::error::{PressError, Result};
use crate::observation::softmax_last_dim;
use crate::PressOptions;

/// The replay prompt of the first chunk and of the later ones (which then name the previous
/// chunk's last tokens), kvpress's words.
const FIRST_PROMPT: &str = "\n\nRepeat the previous context exactly.";
const LATER_PROMPT: &str = "\n\nRepeat the part of the previous context exactly, starting with";
/// Tokens of the previous chunk a later replay prompt quotes.
const QUOTED: usize = 8;
/// Replay queries scored at once (a chunk of 2048 would otherwise hold group × 2k × 4k weights).
const QUERY_BLOCK: usize = 256;

#[derive(Debug, Clone)]
pub struct KvZip {
    pub budget: Budget,
    /// The same number of evictions in every layer (else global over layers and heads).
    pub layerwise: bool,
    /// First entries always kept.
    pub sinks: usize,
    /// Context tokens each replay pass repeats.
    pub chunk_size: usize,
    /// KVzip+: weights divided by ‖h‖ of the replay token and multiplied by ‖v·W_o‖ of the entry.
    pub plus_normalization: bool,
    pub positions: PositionPolicy,
    /// Set by [`CachePress::bind`]: the replay's token ids.
    pub replay: Option<ReplayPrompt>,
    /// Replay tokens run so far.
    pub replayed: usize,
}

/// KVzip's replay prompt as token ids for one tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPrompt {
    /// What the chat template writes before a user message's content: a context that starts
    /// with it is not repeated (kvpress's `prefix_length`).
    pub prefix: Vec<u32>,
    /// What the template writes after the content, up to the assistant's turn ("\n" without a
    /// template).
    pub suffix: Vec<u32>,
    pub first: Vec<u32>,
    pub later: Vec<u32>,
}

impl ReplayPrompt {
    /// kvpress's `__call__`: the template rendered around a dummy user message, split there.
    pub fn new(tokenizer: &TokenizerBundle) -> Result<Self> {
        let (prefix, suffix) = match &tokenizer.chat_template {
            None => (String::new(), "\n".to_string()),
            Some(template) => {
                let dummy = "dummy context";
                let separator = format!("\n{}", "#".repeat(dummy.len()));
                let message = ChatMessage::new("user", format!("{dummy}{separator}"));
                let bos = tokenizer.bos_token.as_deref();
                let rendered = render_chat(template, &[message], true, bos, tokenizer.eos_token.as_deref())
                    .map_err(|e| PressError::config(format!("kvzip: the chat template: {e}")))?;
                let (context, suffix) = rendered
                    .split_once(&separator)
                    .ok_or_else(|| PressError::config("kvzip: the chat template does not keep a message's text"))?;
                (context.split(dummy).next().unwrap_or_default().to_string(), suffix.to_string())
            }
        };
        let encode = |text: &str| {
            tokenizer.encode(text, false).map_err(|e| PressError::config(format!("kvzip: tokenizing its prompt: {e}")))
        };
        Ok(ReplayPrompt {
            prefix: encode(&prefix)?,
            suffix: encode(&suffix)?,
            first: encode(FIRST_PROMPT)?,
            later: encode(LATER_PROMPT)?,
        })
    }

    /// The replay of the context `ids`: per chunk of `chunk_size` tokens, its range in `ids` and
    /// the tokens that repeat it. kvpress assumes the context sits in the chat template and does
    /// not repeat the template's prefix; pare skips it when the context starts with it and
    /// repeats the whole context otherwise.
    pub fn chunks(&self, ids: &[u32], chunk_size: usize) -> Vec<(Range<usize>, Vec<u32>)> {
        let start = if ids.starts_with(&self.prefix) { self.prefix.len() } else { 0 };
        let n = ids.len();
        let ranges: Vec<Range<usize>> =
            (start..n).step_by(chunk_size.max(1)).map(|s| s..(s + chunk_size).min(n)).collect();
        ranges
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let mut tokens = match i.checked_sub(1).map(|p| &ranges[p]) {
                    None => self.first.clone(),
                    Some(prev) => {
                        [&self.later[..], &ids[prev.end.saturating_sub(QUOTED).max(prev.start)..prev.end]].concat()
                    }
                };
                tokens.extend_from_slice(&self.suffix);
                tokens.extend_from_slice(&ids[chunk.clone()]);
                (chunk.clone(), tokens)
            })
            .collect()
    }
}

impl KvZip {
    /// The press `opts` describe (kvpress's defaults: chunks of 2048, 4 sinks, global).
    pub fn new(opts: &PressOptions) -> Result<Self> {
        let chunk_size = opts.chunk_size.unwrap_or(2048);
        if chunk_size == 0 {
            return Err(PressError::config("`chunk_size` must be at least 1"));
        }
        Ok(KvZip {
            budget: crate::budget(opts, "kvzip")?,
            layerwise: opts.layerwise.unwrap_or(false),
            sinks: opts.sinks.unwrap_or(4),
            chunk_size,
            plus_normalization: opts.kvzip_plus.unwrap_or(false),
            positions: opts.positions,
            replay: None,
            replayed: 0,
        })
    }

    /// Per layer, per KV head, one score per entry of the context `ids` that `cache` holds (one
    /// row, uncompressed), from the replay over it; the sinks are not raised yet. The cache is left
    /// as it was.
    pub fn replay_scores(&mut self, model: &Model, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<Vec<Vec<f32>>>> {
        let replay = self
            .replay
            .as_ref()
            .ok_or_else(|| PressError::config("kvzip needs the model's tokenizer to write its replay prompt"))?;
        let n = ids.len();
        let heads: Vec<usize> = cache.layers().iter().map(LayerKv::kv_heads).collect();
        let scores = Arc::new(Mutex::new(heads.iter().map(|&h| vec![vec![0f32; n]; h]).collect::<Vec<_>>()));
        for (chunk, tokens) in replay.chunks(ids, self.chunk_size) {
            let observer = ReplayObserver {
                context: n,
                sinks: self.sinks.min(chunk.start),
                chunk,
                plus_normalization: self.plus_normalization,
                scores: scores.clone(),
            };
            self.replayed += tokens.len();
            let mut hooks = Hooks::new(Some(Box::new(observer)), None);
            model.step(&mut [(&mut *cache, &mut hooks)], &[vec![tokens]])?;
            // The replay's own entries leave: the next chunk and the answer see the context only.
            cache.truncate(n)?;
        }
        let scores = std::mem::take(&mut *scores.lock().expect("not poisoned"));
        Ok(scores)
    }

    /// kvpress's `compress_post`: per layer, per KV head, the entries kept.
    fn select(&self, mut scores: Vec<Vec<Vec<f32>>>) -> Vec<Vec<Vec<usize>>> {
        let n = scores.first().and_then(|l| l.first()).map_or(0, Vec::len);
        // Sinks rank above every score (kvpress: the max over every layer and head, + 1).
        let top = scores.iter().flatten().flatten().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) + 1.0;
        scores.iter_mut().flatten().for_each(|s| s[..self.sinks.min(n)].fill(top));
        let pruned = |entries: usize, heads: usize| match self.budget {
            Budget::Ratio(r) => (entries as f64 * r) as usize,
            Budget::Entries(k) => entries - heads * k.min(n),
        };
        // Kept = the largest scores (ties: the earlier entry, in (layer, head, entry) order).
        let kept_of = |flat: &[f32], keep: usize| top_k(flat, keep);
        let mut chosen: Vec<Vec<Vec<usize>>> = scores.iter().map(|l| vec![Vec::new(); l.len()]).collect();
        if self.layerwise {
            for (layer, heads) in scores.iter().enumerate() {
                let flat: Vec<f32> = heads.concat();
                for i in kept_of(&flat, flat.len() - pruned(flat.len(), heads.len())) {
                    chosen[layer][i / n].push(i % n);
                }
            }
        } else {
            let flat: Vec<f32> = scores.iter().flatten().flatten().copied().collect();
            let heads: Vec<usize> = scores.iter().map(Vec::len).collect();
            // (layer, head) of each block of n entries in `flat`.
            let owner: Vec<(usize, usize)> =
                heads.iter().enumerate().flat_map(|(l, &h)| (0..h).map(move |h| (l, h))).collect();
            for i in kept_of(&flat, flat.len() - pruned(flat.len(), heads.iter().sum())) {
                let (layer, head) = owner[i / n];
                chosen[layer][head].push(i % n);
            }
        }
        chosen.iter_mut().flatten().for_each(|kept| kept.sort_unstable());
        chosen
    }
}

/// Per layer, every rank's heads' scores in the whole layer's head order: the selection spans
/// all heads of all layers, so a rank of a split model needs the others' (one exchange). The
/// scores themselves when the model is whole.
fn every_rank_heads(model: &Model, scores: Vec<Vec<Vec<f32>>>) -> Result<Vec<Vec<Vec<f32>>>> {
    let Some(shard) = model.shard() else { return Ok(scores) };
    let (layers, heads) = (scores.len(), scores.first().map_or(0, Vec::len));
    let n = scores.first().and_then(|l| l.first()).map_or(0, Vec::len);
    let flat: Vec<f32> = scores.into_iter().flatten().flatten().collect();
    let local = Tensor::from_vec(flat, (layers, heads, n), &candle_core::Device::Cpu)?;
    let all = shard.comm.all_gather(&local, 1)?.to_vec3::<f32>()?;
    Ok(all)
}

impl CachePress for KvZip {
    fn after_prefill(
        &mut self,
        model: &Model,
        cache: &mut KvCache,
        prompts: Option<&[Vec<u32>]>,
    ) -> pare_model::Result<()> {
        let Some(prompts) = prompts else {
            return Err(
                PressError::config("kvzip replays the prompt's tokens: it cannot compress input embeddings").into()
            );
        };
        if prompts.len() != 1 {
            return Err(PressError::config(format!(
                "kvzip compresses one prompt at a time (its replay is the prompt's own), got {}",
                prompts.len()
            ))
            .into());
        }
        if self.budget.is_noop() {
            return Ok(());
        }
        let scores = self.replay_scores(model, cache, &prompts[0])?;
        let chosen = self.select(every_rank_heads(model, scores)?);
        for (layer, kept) in chosen.iter().enumerate() {
            let kv = cache.layer_mut(layer);
            let mine = model.shard().map_or(0, |s| s.head_offset(kv.kv_heads()));
            kv.keep(&kept[mine..mine + kv.kv_heads()])?;
            if self.positions == PositionPolicy::Rerotate {
                make_contiguous(kv, model.rope())?;
            }
        }
        Ok(())
    }

    fn bind(&mut self, tokenizer: &TokenizerBundle) -> pare_model::Result<()> {
        self.replay = Some(ReplayPrompt::new(tokenizer)?);
        Ok(())
    }

    fn extra_tokens(&self) -> usize {
        self.replayed
    }

    fn next_positions(&self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        self.positions.next_positions(layers, next)
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}

/// Scores one replay chunk at every layer it passes: for each context entry of the chunk, the
/// largest attention weight any replay query of its KV head's group gives it.
#[derive(Debug, Clone)]
struct ReplayObserver {
    /// Context entries in the cache; the replay's follow them.
    context: usize,
    chunk: Range<usize>,
    sinks: usize,
    plus_normalization: bool,
    /// [layer][kv head][entry], shared with the press.
    scores: Arc<Mutex<Vec<Vec<Vec<f32>>>>>,
}

impl ReplayObserver {
    fn score_layer(&self, ctx: &LayerContext, kv: &LayerKv) -> Result<Vec<Vec<f32>>> {
        let (heads, kv_heads, d) = (ctx.attention.num_heads(), ctx.attention.num_kv_heads(), ctx.attention.head_dim());
        let group = heads / kv_heads;
        let positions = &ctx.positions[0];
        let q_len = positions.len();
        let device = ctx.queries.device();
        let (cos, sin) = ctx.rope.cos_sin(positions, 1, q_len, DType::F32, device)?;
        let queries = ctx.rope.apply(&ctx.queries.narrow(0, 0, 1)?.to_dtype(DType::F32)?, &cos, &sin)?.squeeze(0)?;
        let (sinks, chunk) = (self.sinks, self.chunk.clone());
        let seen = sinks + chunk.len();
        let width = seen + q_len;
        // Replay token t sees replay keys 0..=t (kvpress adds finfo.min above the diagonal).
        let mask: Vec<f32> =
            (0..q_len).flat_map(|t| (0..width).map(move |j| if j <= seen + t { 0.0 } else { f32::MIN })).collect();
        let mask = Tensor::from_vec(mask, (1, q_len, width), device)?;
        // KVzip+: 1/‖h‖ per replay token and ‖v·W_o‖ per entry and query head.
        let inverse_norms = if self.plus_normalization {
            let h = ctx.hidden.get(0)?.to_dtype(DType::F32)?;
            Some(h.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.recip()?.reshape((1, q_len, 1))?)
        } else {
            None
        };
        let w_o = if self.plus_normalization { Some(ctx.attention.o().dense_weight(DType::F32)?) } else { None };
        let mut out = Vec::with_capacity(kv_heads);
        for head in 0..kv_heads {
            let (k, v) = kv.head_kv(0, head)?.ok_or_else(|| PressError::config("kvzip: an empty cache layer"))?;
            let k = k.to_dtype(DType::F32)?;
            let keys = Tensor::cat(
                &[k.narrow(0, 0, sinks)?, k.narrow(0, chunk.start, chunk.len())?, k.narrow(0, self.context, q_len)?],
                0,
            )?;
            let q = queries.narrow(0, head * group, group)?;
            let logits = (q.broadcast_matmul(&keys.t()?)? / (d as f64).sqrt())?;
            let column_scale = match &w_o {
                Some(w) => {
                    let v = v.to_dtype(DType::F32)?.narrow(0, chunk.start, chunk.len())?;
                    let norms = (0..group)
                        .map(|g| {
                            let w = w.narrow(1, (head * group + g) * d, d)?;
                            v.matmul(&w.t()?)?.sqr()?.sum(1)?.sqrt()?.unsqueeze(0)
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Some(Tensor::cat(&norms, 0)?.unsqueeze(1)?)
                }
                None => None,
            };
            let mut best: Option<Tensor> = None;
            for block in (0..q_len).step_by(QUERY_BLOCK) {
                let len = QUERY_BLOCK.min(q_len - block);
                let weights =
                    softmax_last_dim(&logits.narrow(1, block, len)?.broadcast_add(&mask.narrow(1, block, len)?)?)?;
                let mut weights = weights.narrow(2, sinks, chunk.len())?;
                if let Some(inv) = &inverse_norms {
                    weights = weights.broadcast_mul(&inv.narrow(1, block, len)?)?;
                }
                if let Some(scale) = &column_scale {
                    weights = weights.broadcast_mul(scale)?;
                }
                let block_max = weights.max(1)?.max(0)?;
                best = Some(match best {
                    Some(b) => b.maximum(&block_max)?,
                    None => block_max,
                });
            }
            out.push(best.expect("a replay runs at least one token").to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

impl CachePress for ReplayObserver {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        let layer_scores = self.score_layer(ctx, kv)?;
        let mut scores = self.scores.lock().expect("not poisoned");
        for (all, chunk) in scores[ctx.layer].iter_mut().zip(layer_scores) {
            all[self.chunk.clone()].copy_from_slice(&chunk);
        }
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}
