//! The forward pass's extension points, and the one value that carries them per sequence.
//!
//! Two kinds of hook act inside pare's own forward pass. A [`CachePress`] (KV-cache compression)
//! is called by every attention layer before it appends this call's keys (where StreamingLLM's
//! rule cuts the cache) and after it attended (kvpress's compression point); it sees the layer's
//! pre-RoPE queries, so attention-based scores are computed for the queries they need and nothing
//! else. A [`TokenPruner`] (FastV and relatives) names, during a prefill, the tokens later layers
//! keep. Implementations live in `pare-press` and `pare-token-prune`; this crate knows the traits.

use std::sync::Arc;

use candle_core::Tensor;
use pare_formats::TokenizerBundle;

use crate::attention::Attention;
use crate::cache::{KvCache, LayerKv};
use crate::error::Result;
use crate::loader::LoadedModel;
use crate::model::Model;
use crate::parallel::Shard;
use crate::rope::Rope;

/// What a forward call is. A prefill fills an empty cache from a prompt: token pruning acts, and
/// prefill presses compress at its end. An extension appends to what the cache holds: decode
/// steps, and continuations scored over a compressed cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Extend,
}

/// What an attention layer shows a hook during one forward call.
pub struct LayerContext<'a> {
    pub layer: usize,
    pub num_layers: usize,
    pub attention: &'a Attention,
    pub rope: &'a Rope,
    /// (batch, heads, seq, head_dim): this call's queries before RoPE.
    pub queries: &'a Tensor,
    /// (batch × seq): positions of this call's tokens (PAD_POSITION for padding).
    pub positions: &'a [Vec<i64>],
    /// (batch, seq, hidden): the layer's attention input (the residual stream after its norm),
    /// for scorers that read the tokens themselves rather than their attention.
    pub hidden: &'a Tensor,
    pub phase: Phase,
    /// Set when the model is split for tensor parallelism: the layer's heads here are this rank's
    /// (the first at [`Shard::head_offset`]); a hook that decides over all heads at once (a
    /// budget shared by a layer's heads) exchanges what it needs through its `comm`.
    pub shard: Option<&'a Shard>,
}

impl LayerContext<'_> {
    pub fn is_prefill(&self) -> bool {
        self.phase == Phase::Prefill
    }
}

pub trait CachePress: std::fmt::Debug + Send + Sync {
    /// Called before the layer appends this call's entries.
    fn before_attention(&mut self, _ctx: &LayerContext, _kv: &mut LayerKv) -> Result<()> {
        Ok(())
    }

    /// Called after the layer attended over its cache (this call's entries included).
    fn after_attention(&mut self, _ctx: &LayerContext, _kv: &mut LayerKv) -> Result<()> {
        Ok(())
    }

    /// After a forward call: the position the next token of each row takes. The default keeps
    /// original positions; a press that moves entries to contiguous positions returns the
    /// rows' new continuation points.
    fn next_positions(&self, _cache_layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        next.to_vec()
    }

    /// Called by [`Model::prefill`] once the prefill ran every layer and its logits are taken,
    /// with the model and the prompts (None for input embeddings): a press that decides with
    /// further forward passes over the filled cache (KVzip's context replay) runs them here
    /// through the model's public API. It must leave the cache holding prompt entries only and
    /// its next positions as they were; [`CachePress::next_positions`] is asked again after it.
    fn after_prefill(&mut self, _model: &Model, _cache: &mut KvCache, _prompts: Option<&[Vec<u32>]>) -> Result<()> {
        Ok(())
    }

    /// Called once the model is loaded, before the press runs: a press that runs text of its
    /// own through the model (KVzip's replay prompt) tokenizes it here.
    fn bind(&mut self, _tokenizer: &TokenizerBundle) -> Result<()> {
        Ok(())
    }

    /// Tokens the press ran through the model beyond the prompts so far (KVzip's replay): work
    /// that the prefill's time includes.
    fn extra_tokens(&self) -> usize {
        0
    }

    /// Batch rows were reordered or duplicated (beam search): row i is old row `rows[i]`.
    fn select_rows(&mut self, _rows: &[usize]) -> Result<()> {
        Ok(())
    }

    /// A fresh copy carrying the same settings and state.
    fn box_clone(&self) -> Box<dyn CachePress>;
}

/// Prefill token pruning: at chosen layers the pruner scores this call's tokens from the layer's
/// attention and names the tokens later layers keep. Layers up to the cut run on every token; the
/// ones after it, and their KV caches, only on the kept tokens, which keep their original
/// positions.
pub trait TokenPruner: std::fmt::Debug + Send + Sync {
    /// Called after layer `ctx.layer` attended during a prefill. Some(kept) — per row, indices
    /// into this call's tokens, ascending — drops the others from every later layer.
    fn after_attention(&self, ctx: &LayerContext, kv: &LayerKv) -> Result<Option<Vec<Vec<usize>>>>;
}

/// The hooks of one sequence (or one batch that shares them): its press, which keeps state
/// between calls, and its token pruner, which does not. On a model split over threads
/// ([`Model::split`]) the hooks act on rank 0's heads and carry a fresh copy for each other rank
/// from their first forward call on.
#[derive(Debug, Default)]
pub struct Hooks {
    pub press: Option<Box<dyn CachePress>>,
    pub pruner: Option<Arc<dyn TokenPruner>>,
    /// Ranks 1.. of a split model.
    pub(crate) peers: Vec<Hooks>,
}

impl Clone for Hooks {
    fn clone(&self) -> Self {
        Hooks { peers: self.peers.clone(), ..self.one_rank() }
    }
}

impl Hooks {
    pub fn new(press: Option<Box<dyn CachePress>>, pruner: Option<Arc<dyn TokenPruner>>) -> Self {
        Hooks { press, pruner, peers: Vec::new() }
    }

    /// The other ranks' hooks of a model split `n + 1` ways, taken out so that each rank's thread
    /// runs with its own: copies of these as they are before their first call.
    pub(crate) fn take_peers(&mut self, n: usize) -> Vec<Hooks> {
        if self.peers.len() != n {
            self.peers = (0..n).map(|_| self.one_rank()).collect();
        }
        std::mem::take(&mut self.peers)
    }

    /// A copy of this rank's press (in its state now) and pruner, without the other ranks'.
    fn one_rank(&self) -> Hooks {
        Hooks::new(self.press.as_ref().map(|p| p.box_clone()), self.pruner.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.press.is_none() && self.pruner.is_none()
    }

    /// Bind the press to the loaded model's tokenizer (see [`CachePress::bind`]); every front end
    /// calls this once it built the hooks for a model.
    pub fn bind(&mut self, loaded: &LoadedModel) -> Result<()> {
        match (&mut self.press, &loaded.tokenizer) {
            (Some(press), Some(tokenizer)) => press.bind(tokenizer),
            _ => Ok(()),
        }
    }

    /// Reorder or duplicate the press's per-row state as the cache's rows are (beam search,
    /// continuations forked from one prompt): row i becomes row `rows[i]`; every rank's press.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(press) = self.press.as_mut() {
            press.select_rows(rows)?;
        }
        self.peers.iter_mut().try_for_each(|peer| peer.select_rows(rows))
    }

    /// Tokens the press ran beyond the prompts (see [`CachePress::extra_tokens`]).
    pub fn extra_tokens(&self) -> usize {
        self.press.as_ref().map_or(0, |p| p.extra_tokens())
    }
}
