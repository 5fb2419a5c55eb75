//! Multi-head attention with grouped KV heads, reading and extending the layer's KV cache.

use candle_core::{DType, Tensor};

use std::ops::Range;

use crate::cache::{KvDtype, LayerKv, MaskCache};
use crate::error::Result;
use crate::hooks::{CachePress, LayerContext, Phase, TokenPruner};
use crate::layers::Linear;
use crate::parallel::Shard;
use crate::rope::Rope;

/// One slot's rows of a run: queries, layer input, and pre-RoPE queries when a hook reads them.
type SlotParts = (Tensor, Tensor, Option<Tensor>);

/// A cache as the fused decode kernel reads it (see [`Attention::decode_kv`]).
enum DecodeCache {
    Uniform { keys: Tensor, values: Tensor, skip: Vec<usize> },
    Heads { keys: Vec<Tensor>, values: Vec<Tensor>, skip: Vec<usize> },
}

impl DecodeCache {
    fn as_kernel_input(&self) -> pare_kernels::DecodeKv<'_> {
        match self {
            DecodeCache::Uniform { keys, values, skip } => pare_kernels::DecodeKv::Uniform { keys, values, skip },
            DecodeCache::Heads { keys, values, skip } => pare_kernels::DecodeKv::Heads { keys, values, skip },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    /// This layer's head counts (they differ between layers after structured pruning).
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    /// q, k and v stacked (see [`crate::layers::fuse`]); q, k and v are then views of its weight.
    pub(crate) qkv: Option<Linear>,
}

/// What every layer's attention shares during one forward call.
pub struct AttentionInputs<'a> {
    pub rope: &'a Rope,
    /// Positions of the new tokens, per cache row (rows of different caches may run different
    /// numbers of tokens).
    pub positions: &'a [Vec<i64>],
    /// The call's tokens in runs of caches whose rows run equally many tokens, in order.
    pub runs: &'a [RowRun],
    pub sliding_window: Option<usize>,
    pub num_layers: usize,
    /// How new keys and values are cached.
    pub kv_dtype: KvDtype,
    /// The rank's place when the model is split for tensor parallelism.
    pub shard: Option<&'a Shard>,
}

/// Consecutive caches whose rows each run `seq` tokens: their rows form one (rows, seq) grid, so
/// projections are split into heads and rotated once for all of them.
pub struct RowRun {
    /// The slots (caches) in the run.
    pub slots: Range<usize>,
    /// The cache rows they hold (indices into [`AttentionInputs::positions`]).
    pub rows: Range<usize>,
    pub seq: usize,
    /// Where the run's tokens start among the call's tokens.
    pub offset: usize,
    /// RoPE's cos and sin for the run's (rows × seq) positions.
    pub cos: Tensor,
    pub sin: Tensor,
}

/// One cache's share of a forward call's rows: the call may hold several sequences, each with
/// its own cache, press, masks and phase (continuous batching).
pub struct KvSlot<'a> {
    /// The call's cache rows that belong to this cache.
    pub rows: Range<usize>,
    pub kv: &'a mut LayerKv,
    pub press: Option<&'a mut (dyn CachePress + 'static)>,
    pub masks: &'a MaskCache,
    pub phase: Phase,
}

/// A layer's attention output, and the tokens a pruner keeps if it cut after this layer.
pub struct AttentionOutput {
    pub out: Tensor,
    pub kept: Option<Vec<Vec<usize>>>,
}

impl Attention {
    pub fn q(&self) -> &Linear {
        &self.q
    }

    pub fn k(&self) -> &Linear {
        &self.k
    }

    pub fn v(&self) -> &Linear {
        &self.v
    }

    pub fn o(&self) -> &Linear {
        &self.o
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Whether q, k and v run as one stacked map.
    pub fn is_fused(&self) -> bool {
        self.qkv.is_some()
    }

    /// Keep only these query heads and KV heads (ascending): rows of q, k, v and columns of o are
    /// removed, so the layer computes exactly what it did with the other heads' outputs zeroed.
    /// The stacked projection, if any, is dropped (it would hold the removed rows).
    pub fn keep_heads(&mut self, kept_heads: &[usize], kept_kv_heads: &[usize], dtype: DType) -> Result<()> {
        let q_rows = head_channels(kept_heads, self.head_dim);
        let kv_rows = head_channels(kept_kv_heads, self.head_dim);
        self.qkv = None;
        self.q = self.q.keep_outputs(&q_rows, dtype)?;
        self.k = self.k.keep_outputs(&kv_rows, dtype)?;
        self.v = self.v.keep_outputs(&kv_rows, dtype)?;
        self.o = self.o.keep_inputs(&q_rows, dtype)?;
        self.num_heads = kept_heads.len();
        self.num_kv_heads = kept_kv_heads.len();
        Ok(())
    }

    /// x: (1, tokens, hidden) → (1, tokens, hidden), the tokens of every slot in order (see
    /// [`AttentionInputs::runs`]). Projects every token at once; then each slot appends its rows'
    /// keys and values to its cache and attends over it, its press acting before the append and
    /// after attending. A pruner (prefill, one slot) may cut after it.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        inputs: &AttentionInputs,
        slots: &mut [KvSlot],
        pruner: Option<&dyn TokenPruner>,
    ) -> Result<AttentionOutput> {
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        if pruner.is_some() && slots.len() != 1 {
            return Err(crate::ModelError::input("token pruning runs on one cache at a time"));
        }
        // Each slot's rows take the product path they would take alone.
        let segments: Vec<usize> =
            inputs.runs.iter().flat_map(|r| slots[r.slots.clone()].iter().map(|s| s.rows.len() * r.seq)).collect();
        let (q_proj, k_proj, v_proj) = match &self.qkv {
            Some(qkv) if crate::layers::few_rows(x)? => {
                let y = qkv.forward_segments(x, &segments)?;
                (y.narrow(2, 0, h * d)?, y.narrow(2, h * d, kvh * d)?, y.narrow(2, (h + kvh) * d, kvh * d)?)
            }
            _ => (
                self.q.forward_segments(x, &segments)?,
                self.k.forward_segments(x, &segments)?,
                self.v.forward_segments(x, &segments)?,
            ),
        };
        let mut run_outs = Vec::with_capacity(inputs.runs.len());
        let mut kept = None;
        for run in inputs.runs {
            let (batch, seq) = (run.rows.len(), run.seq);
            let grid = |t: &Tensor| -> Result<Tensor> {
                let t = if inputs.runs.len() == 1 { t.clone() } else { t.narrow(1, run.offset, batch * seq)? };
                Ok(t.reshape((batch, seq, t.dim(2)?))?)
            };
            let split_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
                Ok(t.reshape((batch, seq, heads, d))?.transpose(1, 2)?.contiguous()?)
            };
            let (q_proj, k_proj) = (grid(&q_proj)?, grid(&k_proj)?);
            let v = inputs.kv_dtype.store(&split_heads(grid(&v_proj)?, kvh)?)?;
            let q = inputs.rope.apply_split_heads(&q_proj, h, d, &run.cos, &run.sin)?;
            let k = inputs.kv_dtype.store(&inputs.rope.apply_split_heads(&k_proj, kvh, d, &run.cos, &run.sin)?)?;
            let slots = &mut slots[run.slots.clone()];
            // Pre-RoPE queries are read only by a press or a pruner: split them out only for those.
            let hooked = pruner.is_some() || slots.iter().any(|s| s.press.is_some());
            let q_prerope = if hooked { Some(split_heads(q_proj, h)?) } else { None };
            let hidden = grid(x)?;

            // Each slot's rows of the run's tensors: queries, input, pre-RoPE queries.
            let mut parts = Vec::with_capacity(slots.len());
            for slot in slots.iter() {
                let rows = |t: &Tensor| t.narrow(0, slot.rows.start - run.rows.start, slot.rows.len());
                let prerope = q_prerope.as_ref().map(rows).transpose()?;
                parts.push((rows(&q)?, rows(&hidden)?, prerope));
            }
            // Every slot appends first, then all attend: a decode step over several caches (a
            // server's step, one cache per sequence) writes all their entries in one call and
            // attends in one kernel call.
            for (slot, part) in slots.iter_mut().zip(&parts) {
                let ctx = self.context(layer, inputs, slot, part);
                if let Some(p) = slot.press.as_deref_mut() {
                    p.before_attention(&ctx, slot.kv)?;
                }
            }
            let positions: Vec<&[Vec<i64>]> = slots.iter().map(|s| &inputs.positions[s.rows.clone()]).collect();
            let mut kvs: Vec<&mut LayerKv> = slots.iter_mut().map(|s| &mut *s.kv).collect();
            crate::cache::append_all(&mut kvs, &k, &v, &positions)?;
            let out = self.attend_slots(&q, slots, &parts, inputs.positions, inputs.sliding_window)?;
            for (slot, part) in slots.iter_mut().zip(&parts) {
                let ctx = self.context(layer, inputs, slot, part);
                // Token pruning scores the full layer, before a press shrinks its cache.
                if let (Some(pruner), Phase::Prefill) = (pruner, slot.phase) {
                    kept = pruner.after_attention(&ctx, slot.kv)?;
                }
                if let Some(p) = slot.press.as_deref_mut() {
                    p.after_attention(&ctx, slot.kv)?;
                }
            }
            run_outs.push(out.transpose(1, 2)?.reshape((1, batch * seq, h * d))?);
        }
        let out = if run_outs.len() == 1 { run_outs.pop().expect("one run") } else { Tensor::cat(&run_outs, 1)? };
        Ok(AttentionOutput { out: self.o.forward_segments(&out, &segments)?, kept })
    }

    /// What a hook sees of one slot's rows in this layer.
    fn context<'a>(
        &'a self,
        layer: usize,
        inputs: &'a AttentionInputs,
        slot: &KvSlot,
        (q, x, prerope): &'a SlotParts,
    ) -> LayerContext<'a> {
        LayerContext {
            layer,
            num_layers: inputs.num_layers,
            attention: self,
            rope: inputs.rope,
            queries: prerope.as_ref().unwrap_or(q),
            positions: &inputs.positions[slot.rows.clone()],
            hidden: x,
            phase: slot.phase,
            shard: inputs.shard,
        }
    }

    /// One slot's attention over its cache (its keys and values already appended): the fused
    /// kernels where they apply, else a masked product over the whole cache or head by head.
    fn attend_slot(
        &self,
        q: &Tensor,
        kv: &LayerKv,
        positions: &[Vec<i64>],
        window: Option<usize>,
        masks: &MaskCache,
    ) -> Result<Tensor> {
        if let Some(out) = self.attend_fused(q, kv, positions, window)? {
            return Ok(out);
        }
        match kv.row_positions() {
            Some(entry_rows) => self.attend_batched(q, kv, &entry_rows, positions, window, masks),
            None => self.attend_per_head(q, kv, positions, window),
        }
    }

    /// Every slot's attention (`q` the run's queries, the slots' rows in order; their keys and
    /// values already appended): a one-token decode in one fused kernel call over all their
    /// caches where it applies, else slot by slot. Returns the slots' outputs in their rows' order.
    fn attend_slots(
        &self,
        q: &Tensor,
        slots: &[KvSlot],
        parts: &[SlotParts],
        positions: &[Vec<i64>],
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (_, h, seq, d) = q.dims4()?;
        let mut caches = Vec::with_capacity(slots.len());
        if seq == 1 && pare_kernels::attention_decode_fused(q.device(), d, h, self.num_kv_heads) {
            for slot in slots {
                match self.decode_kv(slot.kv, &positions[slot.rows.clone()], window)? {
                    Some(cache) => caches.push(cache),
                    None => break,
                }
            }
        }
        if caches.len() < slots.len() {
            let attend = |(slot, part): (&KvSlot, &SlotParts)| {
                self.attend_slot(&part.0, slot.kv, &positions[slot.rows.clone()], window, slot.masks)
            };
            let mut outs = slots.iter().zip(parts).map(attend).collect::<Result<Vec<_>>>()?;
            return Ok(if outs.len() == 1 { outs.pop().expect("one slot") } else { Tensor::cat(&outs, 0)? });
        }
        let scale = 1.0 / (d as f32).sqrt();
        let caches: Vec<pare_kernels::DecodeKv> = caches.iter().map(DecodeCache::as_kernel_input).collect();
        // One tensor for every slot's rows: no per-slot pieces to concatenate again.
        Ok(pare_kernels::attention_decode_caches(&q.squeeze(2)?, &caches, scale)?.unsqueeze(2)?)
    }

    /// What the fused decode kernel reads of a cache for one query per row at `query_positions`:
    /// a uniform cache whole, a ragged one head by head. None where something other than a
    /// prefix of a head's entries is hidden from its query (then the masked path runs).
    fn decode_kv(
        &self,
        kv: &LayerKv,
        query_positions: &[Vec<i64>],
        window: Option<usize>,
    ) -> Result<Option<DecodeCache>> {
        let rows = query_positions.len();
        // A uniform cache: one visibility scan per row and the cache passed whole, instead of
        // rows × kv_heads scans and views (host work that bounded the step at 32 rows).
        if let (Some(_), Some((keys, values))) = (kv.row_positions(), kv.kv_stored()?) {
            let mut skip = Vec::with_capacity(rows);
            for (b, query) in query_positions.iter().enumerate() {
                let Some(hidden) = kv.hidden_prefix(b, 0, query[0], window) else { return Ok(None) };
                skip.push(hidden);
            }
            return Ok(Some(DecodeCache::Uniform { keys, values, skip }));
        }
        let (mut keys, mut values, mut skip) = (Vec::new(), Vec::new(), Vec::new());
        for (b, query) in query_positions.iter().enumerate() {
            for head in 0..self.num_kv_heads {
                // The kernel skips a prefix (padding, or what left the window); anything else
                // invisible needs the masked path.
                let Some(hidden) = kv.hidden_prefix(b, head, query[0], window) else { return Ok(None) };
                let (k, v) = kv.head_kv_stored(b, head)?.expect("entries were just appended");
                keys.push(k);
                values.push(v);
                skip.push(hidden);
            }
        }
        Ok(Some(DecodeCache::Heads { keys, values, skip }))
    }

    /// pare-kernels' fused attention where it applies (CUDA and CPU): a decode step over the
    /// caches as they are (uniform or ragged per head, never gathered into one tensor), and a
    /// flash-style prefill that never materializes the scores. None where the kernels do not apply.
    fn attend_fused(
        &self,
        q: &Tensor,
        kv: &LayerKv,
        query_positions: &[Vec<i64>],
        sliding_window: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let (batch, h, seq, d) = q.dims4()?;
        let kvh = self.num_kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        if seq == 1 && pare_kernels::attention_decode_fused(q.device(), d, h, kvh) {
            let Some(cache) = self.decode_kv(kv, &query_positions[..batch], sliding_window)? else {
                return Ok(None);
            };
            let out = pare_kernels::attention_decode_caches(&q.squeeze(2)?, &[cache.as_kernel_input()], scale)?;
            return Ok(Some(out.unsqueeze(2)?));
        }
        let fused_prefill = pare_kernels::attention_prefill_fused(q.device(), q.dtype(), d);
        if let (Some(rows), true) = (kv.row_positions(), fused_prefill) {
            let (keys, values) = kv.kv_stored()?.expect("entries were just appended");
            let query_positions: Vec<&[i64]> = query_positions.iter().map(Vec::as_slice).collect();
            let out =
                pare_kernels::attention_prefill(q, &keys, &values, &query_positions, &rows, sliding_window, scale)?;
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
        query_positions: &[Vec<i64>],
        sliding_window: Option<usize>,
        masks: &MaskCache,
    ) -> Result<Tensor> {
        let (batch, h, seq, d) = q.dims4()?;
        let kvh = self.num_kv_heads;
        let group = h / kvh;
        let (keys, values) = kv.kv()?.expect("entries were just appended");
        let query_positions: Vec<&[i64]> = query_positions.iter().map(Vec::as_slice).collect();
        let mask = masks.get(&query_positions, entry_positions, sliding_window, group, q.device())?;
        let q = q.reshape((batch, kvh, group * seq, d))?;
        let out = self.attend(&q, &keys, &values, mask.as_ref())?; // (batch, kvh, group*seq, d)
        Ok(out.reshape((batch, h, seq, d))?)
    }

    /// Heads hold different entries (a press chose them per head, or budgets differ): attend
    /// (row, KV head) by (row, KV head), each over exactly what it keeps.
    fn attend_per_head(
        &self,
        q: &Tensor,
        kv: &LayerKv,
        query_positions: &[Vec<i64>],
        sliding_window: Option<usize>,
    ) -> Result<Tensor> {
        let (batch, h, seq, d) = q.dims4()?;
        let kvh = self.num_kv_heads;
        let group = h / kvh;
        let mut outs = Vec::with_capacity(batch * kvh);
        for (b, query) in query_positions.iter().enumerate().take(batch) {
            let qb = q.get(b)?;
            for head in 0..kvh {
                let (keys, values) = kv.head_kv(b, head)?.expect("entries were just appended");
                let mask = crate::cache::attention_mask(
                    &[query.as_slice()],
                    &[kv.positions(b, head)],
                    sliding_window,
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

    /// softmax(q·kᵀ/√d + mask)·v for (b, kv_heads, rows, d) queries over (b, kv_heads, entries, d),
    /// the cache widened to the queries' dtype where it is held narrower.
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (keys, values) = (&keys.to_dtype(q.dtype())?, &values.to_dtype(q.dtype())?);
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

/// The channels (rows of q, k, v; columns of o) that hold these heads.
pub fn head_channels(heads: &[usize], head_dim: usize) -> Vec<usize> {
    heads.iter().flat_map(|&h| h * head_dim..(h + 1) * head_dim).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn head_channels_expand_heads() {
        assert_eq!(super::head_channels(&[2, 3], 4), (8..16).collect::<Vec<_>>());
        assert_eq!(super::head_channels(&[1], 4), vec![4, 5, 6, 7]);
    }
}
