//! kvpress's DecodingPress: while decoding, every `interval` steps each layer's cache is
//! compressed back to `target` entries per head, scored with the queries of the last `buffer`
//! steps. Optionally the prompt is compressed too at the end of prefill (prefill and decoding
//! both).

use candle_core::Tensor;
use pare_model::cache::LayerKv;
use pare_model::hooks::{CachePress, LayerContext};

use crate::budget::Budget;
use crate::compress::{call_queries, LayerInfo};
use crate::compress::{compress_layer, PositionPolicy, RowQueries};
use crate::error::{PressError, Result};
use crate::observation::index_tensor;
use crate::select::Selector;

#[derive(Debug)]
pub struct DecodingPress {
    selector: Box<dyn Selector>,
    target: usize,
    interval: usize,
    buffer: usize,
    prefill: Option<Budget>,
    positions: PositionPolicy,
    layers: Vec<LayerState>,
}

/// Per layer: decoding steps since the last compression and the recent queries (batch, heads,
/// n, head_dim) with their positions.
#[derive(Debug, Clone, Default)]
struct LayerState {
    steps: usize,
    queries: Option<Tensor>,
    positions: Vec<Vec<i64>>,
}

impl DecodingPress {
    pub fn new(
        selector: Box<dyn Selector>,
        target: usize,
        interval: usize,
        buffer: usize,
        prefill: Option<Budget>,
        positions: PositionPolicy,
    ) -> Result<Self> {
        if target == 0 {
            return Err(PressError::config("decoding: `budget` (entries kept per head) must be at least 1"));
        }
        if interval == 0 {
            return Err(PressError::config("decoding: `interval` must be at least 1"));
        }
        Ok(DecodingPress { selector, target, interval, buffer, prefill, positions, layers: Vec::new() })
    }
}

impl CachePress for DecodingPress {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        let info = LayerInfo::of(ctx);
        if ctx.is_prefill() {
            if let Some(budget) = self.prefill {
                compress_layer(kv, &info, &call_queries(ctx)?, self.selector.as_ref(), budget, self.positions)?;
            }
            return Ok(());
        }
        if self.layers.len() <= ctx.layer {
            self.layers.resize_with(ctx.layer + 1, LayerState::default);
        }
        let state = &mut self.layers[ctx.layer];
        let q = ctx.queries.to_dtype(candle_core::DType::F32)?;
        state.queries = Some(match state.queries.take() {
            Some(old) => Tensor::cat(&[&old, &q], 2)?,
            None => q,
        });
        if state.positions.is_empty() {
            state.positions = vec![Vec::new(); ctx.positions.len()];
        }
        for (row, new) in state.positions.iter_mut().zip(ctx.positions) {
            row.extend_from_slice(new);
        }
        let held = state.positions[0].len();
        if held > self.buffer.max(1) {
            let drop = held - self.buffer.max(1);
            state.queries = Some(state.queries.as_ref().expect("just set").narrow(2, drop, held - drop)?);
            state.positions.iter_mut().for_each(|p| {
                p.drain(..drop);
            });
        }
        state.steps += 1;
        if state.steps >= self.interval {
            let queries = state.queries.as_ref().expect("just set");
            let rows = (0..ctx.positions.len())
                .map(|b| Ok(RowQueries::from_call(&queries.contiguous()?, &state.positions, b)?))
                .collect::<pare_model::Result<Vec<_>>>()?;
            compress_layer(kv, &info, &rows, self.selector.as_ref(), Budget::Entries(self.target), self.positions)?;
            *state = LayerState::default();
        }
        Ok(())
    }

    fn next_positions(&self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        self.positions.next_positions(layers, next)
    }

    fn select_rows(&mut self, rows: &[usize]) -> pare_model::Result<()> {
        for state in &mut self.layers {
            if let Some(q) = &state.queries {
                let idx = index_tensor(rows, q.device())?;
                state.queries = Some(q.contiguous()?.index_select(&idx, 0)?);
                state.positions = rows.iter().map(|&r| state.positions[r].clone()).collect();
            }
        }
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(DecodingPress {
            selector: self.selector.box_clone(),
            target: self.target,
            interval: self.interval,
            buffer: self.buffer,
            prefill: self.prefill,
            positions: self.positions,
            layers: self.layers.clone(),
        })
    }
}
