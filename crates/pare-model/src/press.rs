//! The forward pass's extension point for KV-cache compression ("presses").
//!
//! A press is attached to a [`KvCache`](crate::KvCache) and called by every attention layer:
//! before the layer appends this call's keys (where seed 001's StreamingLLM rule cuts the cache)
//! and after the layer attended (where kvpress-style presses score the entries and keep the best).
//! The press sees the layer's queries for this call's tokens, so attention-based scores are
//! computed for the queries they need and nothing else. Implementations live in `pare-press`.

use candle_core::Tensor;

use crate::attention::Attention;
use crate::cache::LayerKv;
use crate::error::Result;
use crate::rope::Rope;

/// What an attention layer shows a press during one forward call.
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
    /// The cache held nothing before this call: the call is a prefill.
    pub prefill: bool,
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

    /// Batch rows were reordered or duplicated (beam search): row i is old row `rows[i]`.
    fn select_rows(&mut self, _rows: &[usize]) -> Result<()> {
        Ok(())
    }

    /// A fresh copy carrying the same settings and state (caches are cloned with their press).
    fn box_clone(&self) -> Box<dyn CachePress>;
}

/// The forward pass's extension point for prefill token pruning (FastV and relatives): at chosen
/// layers the pruner scores this call's tokens from the layer's attention and names the tokens
/// later layers keep. Layers up to the cut run on every token; the ones after it, and their KV
/// caches, only on the kept tokens, which keep their original positions.
pub trait TokenPruner: std::fmt::Debug + Send + Sync {
    /// Called after layer `ctx.layer` attended during a prefill. Some(kept) — per row, indices
    /// into this call's tokens, ascending — drops the others from every later layer.
    fn after_attention(&self, ctx: &LayerContext, kv: &LayerKv) -> Result<Option<Vec<Vec<usize>>>>;
}
