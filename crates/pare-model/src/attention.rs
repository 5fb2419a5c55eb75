//! Multi-head attention with grouped KV heads, reading and extending the layer's KV cache.

use candle_core::{DType, Tensor};

use crate::cache::LayerKv;
use crate::error::Result;
use crate::layers::Linear;
use crate::rope::Rope;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// This layer's head counts (they differ between layers after structured pruning).
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// What every layer's attention shares during one forward call.
pub struct AttentionInputs<'a> {
    pub rope: &'a Rope,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Positions of the new tokens, per batch row.
    pub positions: &'a [Vec<i64>],
    pub sliding_window: Option<usize>,
    pub masks: &'a crate::cache::MaskCache,
}

impl Attention {
    /// x: (batch, seq, hidden) → (batch, seq, hidden). Appends this step's keys and values to `kv`.
    pub fn forward(&self, x: &Tensor, inputs: &AttentionInputs, kv: &mut LayerKv) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split_heads(self.q.forward(x)?, h)?;
        let k = split_heads(self.k.forward(x)?, kvh)?;
        let v = split_heads(self.v.forward(x)?, kvh)?;
        let q = inputs.rope.apply(&q, inputs.cos, inputs.sin)?;
        let k = inputs.rope.apply(&k, inputs.cos, inputs.sin)?;

        kv.append(&k, &v, inputs.positions)?;
        let (keys, values) = kv.kv()?.expect("entries were just appended");
        // Group the query heads that share a KV head so K and V are read once, never repeated.
        let group = h / kvh;
        let mask = inputs.masks.get(inputs.positions, &kv.positions, inputs.sliding_window, group, x.device())?;
        let q = q.reshape((batch, kvh, group * seq, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?.to_dtype(DType::F32)?;
        let probs = crate::ops::masked_softmax(&scores, mask.as_ref())?.to_dtype(values.dtype())?;
        let out = probs.matmul(&values)?; // (batch, kvh, group*seq, d)
        let out = out.reshape((batch, h, seq, d))?.transpose(1, 2)?.reshape((batch, seq, h * d))?;
        self.o.forward(&out)
    }

    pub fn param_count(&self) -> usize {
        self.q.param_count() + self.k.param_count() + self.v.param_count() + self.o.param_count()
    }
}
