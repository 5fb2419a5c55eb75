//! Compress each layer once, right after it attended over the prompt (kvpress semantics: the
//! prompt's own forward sees everything; what follows sees the compressed cache).

use pare_model::cache::LayerKv;
use pare_model::press::{CachePress, LayerContext};

use crate::budget::Budget;
use crate::compress::{compress_layer, next_after_cache, LayerInfo, PositionPolicy, RowQueries};
use crate::select::Selector;

#[derive(Debug)]
pub struct PrefillPress {
    pub selector: Box<dyn Selector>,
    pub budget: Budget,
    pub positions: PositionPolicy,
}

/// The layer facts of a hook call.
pub fn layer_info<'a>(ctx: &LayerContext<'a>) -> LayerInfo<'a> {
    LayerInfo {
        layer: ctx.layer,
        num_layers: ctx.num_layers,
        group: ctx.attention.num_heads / ctx.attention.num_kv_heads,
        head_dim: ctx.attention.head_dim,
        rope: ctx.rope,
    }
}

/// Every row's queries of a hook call, padding dropped.
pub fn call_queries(ctx: &LayerContext) -> pare_model::Result<Vec<RowQueries>> {
    (0..ctx.positions.len()).map(|b| Ok(RowQueries::from_call(ctx.queries, ctx.positions, b)?)).collect()
}

impl CachePress for PrefillPress {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        if ctx.prefill {
            compress_layer(
                kv,
                &layer_info(ctx),
                &call_queries(ctx)?,
                self.selector.as_ref(),
                self.budget,
                self.positions,
            )?;
        }
        Ok(())
    }

    fn next_positions(&self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        match self.positions {
            PositionPolicy::Original => next.to_vec(),
            PositionPolicy::Rerotate => next_after_cache(layers, next),
        }
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(PrefillPress { selector: self.selector.box_clone(), budget: self.budget, positions: self.positions })
    }
}
