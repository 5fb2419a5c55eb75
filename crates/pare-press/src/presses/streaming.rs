//! Seed 001's StreamingLLM rule: before a layer processes new tokens, if its cache holds more
//! than `capacity` entries it is cut to the `sinks` oldest and the `capacity − sinks` newest.
//! Runs at every forward (prefill and decoding), on every architecture, each row on its own.

use pare_model::cache::{LayerKv, PAD_POSITION};
use pare_model::hooks::{CachePress, LayerContext};

use crate::compress::{keep_where, make_contiguous, next_after_cache, PositionPolicy};
use crate::error::{PressError, Result};

#[derive(Debug, Clone)]
pub struct StreamingPress {
    sinks: usize,
    capacity: usize,
    positions: PositionPolicy,
}

impl StreamingPress {
    pub fn new(sinks: usize, capacity: usize, positions: PositionPolicy) -> Result<Self> {
        if capacity == 0 {
            return Err(PressError::config("`capacity` must be at least 1"));
        }
        if capacity < sinks {
            return Err(PressError::config(format!("`capacity` ({capacity}) must be at least `sinks` ({sinks})")));
        }
        Ok(StreamingPress { sinks, capacity, positions })
    }
}

impl CachePress for StreamingPress {
    fn before_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        let over = kv.all_positions().iter().any(|p| p.iter().filter(|&&x| x != PAD_POSITION).count() > self.capacity);
        if !over {
            return Ok(());
        }
        let (sinks, capacity) = (self.sinks, self.capacity);
        keep_where(kv, |_, _, positions| {
            let real: Vec<usize> = (0..positions.len()).filter(|&i| positions[i] != PAD_POSITION).collect();
            if real.len() <= capacity {
                return real;
            }
            let recent = capacity - sinks;
            real[..sinks].iter().chain(&real[real.len() - recent..]).copied().collect()
        })?;
        if self.positions == PositionPolicy::Rerotate {
            make_contiguous(kv, ctx.rope)?;
        }
        Ok(())
    }

    fn next_positions(&self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        match self.positions {
            PositionPolicy::Original => next.to_vec(),
            // The next forward first cuts the cache to `capacity`, contiguous from 0.
            PositionPolicy::Rerotate => {
                next_after_cache(layers, next).into_iter().map(|p| p.min(self.capacity as i64)).collect()
            }
        }
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}
