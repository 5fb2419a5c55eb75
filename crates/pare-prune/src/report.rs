//! Parameter counts per module type and per-layer shapes, before and after pruning.

use pare_model::Model;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    pub gate: usize,
    pub up: usize,
    pub down: usize,
    pub embed: usize,
    pub norm: usize,
    /// 0 when tied to the embedding.
    pub lm_head: usize,
    pub total: usize,
}

impl ParamCounts {
    pub fn of(model: &Model) -> Self {
        let mut c = ParamCounts {
            embed: model.embed_tokens().elem_count(),
            norm: model.final_norm().param_count(),
            ..Default::default()
        };
        for b in model.blocks() {
            c.q += b.attn.q().param_count();
            c.k += b.attn.k().param_count();
            c.v += b.attn.v().param_count();
            c.o += b.attn.o().param_count();
            c.gate += b.mlp.gate().map_or(0, |g| g.param_count());
            c.up += b.mlp.up().param_count();
            c.down += b.mlp.down().param_count();
            c.norm += b.attn_norm.param_count() + b.mlp_norm.param_count();
        }
        if !model.config().tie_word_embeddings {
            c.lm_head = model.lm_head().param_count();
        }
        c.total = c.q + c.k + c.v + c.o + c.gate + c.up + c.down + c.embed + c.norm + c.lm_head;
        c
    }

    /// (name, count) rows in a fixed order, for tables.
    pub fn rows(&self) -> [(&'static str, usize); 11] {
        [
            ("q", self.q),
            ("k", self.k),
            ("v", self.v),
            ("o", self.o),
            ("gate", self.gate),
            ("up", self.up),
            ("down", self.down),
            ("embed", self.embed),
            ("norm", self.norm),
            ("lm_head", self.lm_head),
            ("total", self.total),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerReport {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub mlp_width: usize,
    pub params: usize,
}

pub fn layer_shapes(model: &Model) -> Vec<LayerReport> {
    model
        .blocks()
        .iter()
        .enumerate()
        .map(|(layer, b)| LayerReport {
            layer,
            heads: b.attn.num_heads(),
            kv_heads: b.attn.num_kv_heads(),
            mlp_width: b.mlp.width(),
            params: b.param_count(),
        })
        .collect()
}
