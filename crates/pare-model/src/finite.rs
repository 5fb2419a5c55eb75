//! Non-finite numbers (NaN weights, a config that overflows, fp16 past its range) are reported
//! as an error naming where they start, not sampled as token 0. The check on the logits is one
//! elementwise pass and a sum; the layer is located only once it has failed, by one more
//! forward over the prompt that watches every layer's input.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use crate::cache::LayerKv;
use crate::error::{ModelError, Result};
use crate::hooks::{CachePress, Hooks, LayerContext};
use crate::model::{Model, PrefillInput};

/// Whether every value of `t` is finite: x − x is 0 for those, NaN for NaN and ±inf.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.sub(t)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? == 0.0)
}

/// Ok if `logits` are finite; otherwise an error naming the first layer whose output is not,
/// found by running `prompt` (the failing sequence's prompt tokens) again.
pub fn check_logits(model: &Model, logits: &Tensor, prompt: &[u32]) -> Result<()> {
    if all_finite(logits)? {
        return Ok(());
    }
    let where_ = if prompt.is_empty() {
        "in the model".to_string()
    } else {
        let probe = Probe::default();
        let mut hooks = Hooks::new(Some(Box::new(probe.clone())), None);
        model.prefill(PrefillInput::Tokens(&[prompt.to_vec()]), &mut hooks)?;
        let first_bad = *probe.first_bad_input.lock().expect("probe lock");
        match first_bad {
            Some(0) => "in the token embeddings".to_string(),
            Some(layer) => format!("in the output of layer {}", layer - 1),
            None => format!("after the last layer ({}: final norm or LM head)", model.num_layers() - 1),
        }
    };
    Err(ModelError::NonFinite(format!(
        "the model computed NaN or infinite logits: they first appear {where_} (check the weights and config.json)"
    )))
}

/// Records the first layer whose input (after its norm) holds a non-finite value. Its state is
/// shared, so that what the forward pass does to its copy is seen here.
#[derive(Debug, Default, Clone)]
struct Probe {
    first_bad_input: Arc<Mutex<Option<usize>>>,
}

impl CachePress for Probe {
    fn before_attention(&mut self, ctx: &LayerContext, _kv: &mut LayerKv) -> Result<()> {
        let mut first = self.first_bad_input.lock().expect("probe lock");
        if first.is_none() && !all_finite(ctx.hidden)? {
            *first = Some(ctx.layer);
        }
        Ok(())
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}
