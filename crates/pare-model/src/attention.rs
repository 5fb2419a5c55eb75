//! Multi-head attention with grouped KV heads, reading and extending the layer's KV cache.

use candle_core::{DType, Tensor};

use crate::cache::LayerKv;
use crate::error::Result;
use crate::layers::Linear;
use crate::press::{CachePress, LayerContext, TokenPruner};
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
    /// q, k and v stacked (see [`crate::layers::fuse`]); q, k and v are then views of its weight.
    pub qkv: Option<Linear>,
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
    pub num_layers: usize,
    /// Prefill token pruning: its decision for this layer, if it cuts here, lands in `pruned`.
    pub pruner: Option<&'a dyn TokenPruner>,
    pub pruned: &'a std::cell::RefCell<Option<Vec<Vec<usize>>>>,
}

impl Attention {
    /// x: (batch, seq, hidden) → (batch, seq, hidden). Appends this step's keys and values to
    /// `kv`; the press, if any, acts on `kv` before the append and after attending.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        inputs: &AttentionInputs,
        kv: &mut LayerKv,
        press: Option<&mut Box<dyn CachePress>>,
    ) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let (q_proj, k_proj, v_proj) = match &self.qkv {
            Some(qkv) if crate::layers::few_rows(x)? => {
                let y = qkv.forward(x)?;
                (y.narrow(2, 0, h * d)?, y.narrow(2, h * d, kvh * d)?, y.narrow(2, (h + kvh) * d, kvh * d)?)
            }
            _ => (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?),
        };
        let v = split_heads(v_proj, kvh)?;
        let q = inputs.rope.apply_split_heads(&q_proj, h, d, inputs.cos, inputs.sin)?;
        let k = inputs.rope.apply_split_heads(&k_proj, kvh, d, inputs.cos, inputs.sin)?;
        // Pre-RoPE queries are read only by a press or a pruner: split them out only for those.
        let q_prerope = if press.is_some() || inputs.pruner.is_some() { Some(split_heads(q_proj, h)?) } else { None };

        let ctx = LayerContext {
            layer,
            num_layers: inputs.num_layers,
            attention: self,
            rope: inputs.rope,
            queries: q_prerope.as_ref().unwrap_or(&q),
            positions: inputs.positions,
            hidden: x,
            prefill: kv.is_empty(),
        };
        let mut press = press;
        if let Some(p) = press.as_deref_mut() {
            p.before_attention(&ctx, kv)?;
        }
        kv.append(&k, &v, inputs.positions)?;
        let out = match self.attend_fused(&q, kv, inputs)? {
            Some(out) => out,
            None => match kv.row_positions() {
                Some(rows) => self.attend_batched(&q, kv, &rows, inputs)?,
                None => self.attend_per_head(&q, kv, inputs)?,
            },
        };
        // Token pruning scores the full layer, before a press shrinks its cache.
        if let (Some(pruner), true) = (inputs.pruner, ctx.prefill) {
            if let Some(keep) = pruner.after_attention(&ctx, kv)? {
                *inputs.pruned.borrow_mut() = Some(keep);
            }
        }
        if let Some(p) = press {
            p.after_attention(&ctx, kv)?;
        }
        let out = out.transpose(1, 2)?.reshape((batch, seq, h * d))?;
        self.o.forward(&out)
    }

    /// On CUDA, pare-kernels' fused attention where it applies: a decode step over the caches as
    /// they are (uniform or ragged per head, never gathered into one tensor), and a flash-style
    /// prefill that never materializes the scores. None where the kernels do not apply.
    fn attend_fused(&self, q: &Tensor, kv: &LayerKv, inputs: &AttentionInputs) -> Result<Option<Tensor>> {
        let (batch, h, seq, d) = q.dims4()?;
        let kvh = self.num_kv_heads;
        if !q.device().is_cuda() {
            return Ok(None);
        }
        let scale = 1.0 / (d as f32).sqrt();
        if seq == 1 && pare_kernels::attention_decode_fused(d, h, kvh) {
            let (mut keys, mut values, mut skip) = (Vec::new(), Vec::new(), Vec::new());
            for b in 0..batch {
                let query_pos = inputs.positions[b][0];
                for head in 0..kvh {
                    let positions = kv.positions(b, head);
                    let visible = |p: i64| {
                        p >= 0 && p <= query_pos && inputs.sliding_window.map_or(true, |w| query_pos - p < w as i64)
                    };
                    // The kernel skips a prefix (padding, or what left the window); anything else
                    // invisible needs the masked path.
                    let hidden = positions.iter().take_while(|&&p| !visible(p)).count();
                    if !positions[hidden..].iter().all(|&p| visible(p)) {
                        return Ok(None);
                    }
                    let (k, v) = kv.head_kv(b, head)?.expect("entries were just appended");
                    keys.push(k);
                    values.push(v);
                    skip.push(hidden);
                }
            }
            let out = pare_kernels::attention_decode(&q.squeeze(2)?, &keys, &values, &skip, scale)?;
            return Ok(Some(out.unsqueeze(2)?));
        }
        if let (Some(rows), true) = (kv.row_positions(), pare_kernels::attention_prefill_fused(q.dtype(), d)) {
            let (keys, values) = kv.kv()?.expect("entries were just appended");
            let query_positions: Vec<&[i64]> = inputs.positions.iter().map(Vec::as_slice).collect();
            let out = pare_kernels::attention_prefill(
                q,
                &keys,
                &values,
                &query_positions,
                &rows,
                inputs.sliding_window,
                scale,
            )?;
            return Ok(Some(out));
        }
        Ok(None)
    }

    /// Every head of a row holds the same entries: one batched product over all rows and heads.
    /// Query heads that share a KV head are grouped so K and V are read once, never repeated.
    fn attend_batched(
        &self,
        q: &Tensor,
        kv: &LayerKv,
        entry_positions: &[&[i64]],
        inputs: &AttentionInputs,
    ) -> Result<Tensor> {
        let (batch, h, seq, d) = q.dims4()?;
        let kvh = self.num_kv_heads;
        let group = h / kvh;
        let (keys, values) = kv.kv()?.expect("entries were just appended");
        let query_positions: Vec<&[i64]> = inputs.positions.iter().map(Vec::as_slice).collect();
        let mask = inputs.masks.get(&query_positions, entry_positions, inputs.sliding_window, group, q.device())?;
        let q = q.reshape((batch, kvh, group * seq, d))?;
        let out = self.attend(&q, &keys, &values, mask.as_ref())?; // (batch, kvh, group*seq, d)
        Ok(out.reshape((batch, h, seq, d))?)
    }

    /// Heads hold different entries (a press chose them per head, or budgets differ): attend
    /// (row, KV head) by (row, KV head), each over exactly what it keeps.
    fn attend_per_head(&self, q: &Tensor, kv: &LayerKv, inputs: &AttentionInputs) -> Result<Tensor> {
        let (batch, h, seq, d) = q.dims4()?;
        let kvh = self.num_kv_heads;
        let group = h / kvh;
        let mut outs = Vec::with_capacity(batch * kvh);
        for b in 0..batch {
            let qb = q.get(b)?;
            for head in 0..kvh {
                let (keys, values) = kv.head_kv(b, head)?.expect("entries were just appended");
                let mask = crate::cache::attention_mask(
                    &[inputs.positions[b].as_slice()],
                    &[kv.positions(b, head)],
                    inputs.sliding_window,
                    group,
                    q.device(),
                )?;
                let qh = qb.narrow(0, head * group, group)?.reshape((1, 1, group * seq, d))?;
                let out = self.attend(
                    &qh,
                    &keys.unsqueeze(0)?.unsqueeze(0)?,
                    &values.unsqueeze(0)?.unsqueeze(0)?,
                    mask.as_ref(),
                )?;
                outs.push(out.reshape((group, seq, d))?);
            }
        }
        Ok(Tensor::cat(&outs, 0)?.reshape((batch, h, seq, d))?)
    }

    /// softmax(q·kᵀ/√d + mask)·v for (b, kv_heads, rows, d) queries over (b, kv_heads, entries, d).
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?.to_dtype(DType::F32)?;
        let probs = crate::ops::masked_softmax(&scores, mask)?.to_dtype(values.dtype())?;
        Ok(probs.matmul(values)?)
    }

    /// Stack q, k and v into one map (dense weights; otherwise unchanged).
    pub fn fuse_qkv(&mut self) -> Result<()> {
        if let Some((fused, views)) = crate::layers::fuse(&[&self.q, &self.k, &self.v])? {
            let [q, k, v]: [Linear; 3] = views.try_into().expect("three parts");
            (self.q, self.k, self.v, self.qkv) = (q, k, v, Some(fused));
        }
        Ok(())
    }

    pub fn param_count(&self) -> usize {
        self.q.param_count() + self.k.param_count() + self.v.param_count() + self.o.param_count()
    }
}
