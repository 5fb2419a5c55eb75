//! Compress each layer once, right after it attended over the prompt (kvpress semantics: the
//! prompt's own forward sees everything; what follows sees the compressed cache).

use pare_model::cache::LayerKv;
use pare_model::hooks::{CachePress, LayerContext};

use crate::budget::Budget;
use crate::compress::{call_queries, compress_layer, LayerInfo, PositionPolicy};
use crate::select::Selector;

#[derive(Debug)]
pub struct PrefillPress {
    pub selector: Box<dyn Selector>,
    pub budget: Budget,
    pub positions: PositionPolicy,
}

impl CachePress for PrefillPress {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        if ctx.is_prefill() {
            compress_layer(
                kv,
                &LayerInfo::of(ctx),
                &call_queries(ctx)?,
                self.selector.as_ref(),
                self.budget,
                self.positions,
            )?;
        }
        Ok(())
    }

    fn next_positions(&self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        self.positions.next_positions(layers, next)
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(PrefillPress { selector: self.selector.box_clone(), budget: self.budget, positions: self.positions })
    }
}
