//! ThinKPress (arXiv 2407.21018): prunes key channels instead of entries. At the end of prefill,
//! after the press it wraps (if any) compressed the sequence, each (row, KV head) scores its key
//! channels by (mean over the last `window` queries, RoPE applied, of q², averaged over the
//! head's query group) × (mean over its entries of k²), and the `key_channel_ratio` lowest
//! channels are zeroed in every entry it holds. As in kvpress, the keys keep their width:
//! attention reads every channel, so no memory is freed. Keys appended later keep every channel.

use candle_core::{DType, Tensor};
use pare_model::cache::{LayerKv, PAD_POSITION};
use pare_model::hooks::{CachePress, LayerContext};
use pare_model::rope::Rope;

use crate::compress::{call_queries, RowQueries};
use crate::error::Result;
use crate::observation::{index_tensor, per_head, to_vec};

#[derive(Debug)]
pub struct ThinkPress {
    /// The sequence press that runs first (kvpress's `ComposedPress([inner, ThinKPress])`).
    pub inner: Option<Box<dyn CachePress>>,
    pub key_channel_ratio: f64,
    /// Recent queries the channels are judged by (kvpress's window_size, 32).
    pub window: usize,
}

/// Per KV head, the importance of each key channel: the last `window` queries of `row` (RoPE
/// applied at their positions) give mean q² per channel, averaged over the head's `group` query
/// heads; times the mean k² of `keys[h]` (entries, head_dim), the head's cached keys.
pub fn channel_scores(
    row: &RowQueries,
    keys: &[Tensor],
    rope: &Rope,
    group: usize,
    window: usize,
) -> Result<Vec<Vec<f32>>> {
    let (heads, n, dim) = row.queries.dims3()?;
    let window = window.min(n);
    let q = row.queries.narrow(1, n - window, window)?.to_dtype(DType::F32)?;
    let (cos, sin) = rope.cos_sin(&row.positions[n - window..], 1, window, DType::F32, q.device())?;
    let q = rope.apply(&q.unsqueeze(0)?, &cos, &sin)?.squeeze(0)?;
    let query_norms = per_head(&q.sqr()?.mean(1)?.reshape((heads / group, group, dim))?.mean(1)?)?;
    keys.iter()
        .zip(query_norms)
        .map(|(k, qn)| {
            let kn = to_vec(&k.to_dtype(DType::F32)?.sqr()?.mean(0)?)?;
            Ok(qn.iter().zip(kn).map(|(q, k)| q * k).collect())
        })
        .collect()
}

/// The `n` lowest-scored channels (ties: the lower channel first).
fn lowest(scores: &[f32], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(n);
    order
}

impl ThinkPress {
    fn prune_channels(&self, ctx: &LayerContext, kv: &mut LayerKv) -> Result<()> {
        let dim = ctx.attention.head_dim();
        let pruned = (dim as f64 * self.key_channel_ratio) as usize;
        if pruned == 0 || kv.is_empty() {
            return Ok(());
        }
        let group = ctx.attention.num_heads() / ctx.attention.num_kv_heads();
        let heads = kv.kv_heads();
        let mut channels = Vec::with_capacity(kv.batch() * heads);
        for (b, row) in call_queries(ctx)?.iter().enumerate() {
            let mut keys = Vec::with_capacity(heads);
            for h in 0..heads {
                let real: Vec<usize> =
                    kv.positions(b, h).iter().enumerate().filter(|(_, &p)| p != PAD_POSITION).map(|(i, _)| i).collect();
                match kv.head_kv(b, h)? {
                    Some((k, _)) if !real.is_empty() && !row.positions.is_empty() => {
                        keys.push(k.contiguous()?.index_select(&index_tensor(&real, k.device())?, 0)?)
                    }
                    _ => break,
                }
            }
            if keys.len() < heads {
                // Nothing to judge the channels by: the row keeps them all.
                channels.extend(std::iter::repeat_n(Vec::new(), heads));
                continue;
            }
            let scores = channel_scores(row, &keys, ctx.rope, group, self.window)?;
            channels.extend(scores.iter().map(|s| lowest(s, pruned)));
        }
        kv.zero_key_channels(&channels)?;
        Ok(())
    }
}

impl CachePress for ThinkPress {
    fn before_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        self.inner.as_mut().map_or(Ok(()), |p| p.before_attention(ctx, kv))
    }

    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        if let Some(inner) = &mut self.inner {
            inner.after_attention(ctx, kv)?;
        }
        if ctx.is_prefill() {
            self.prune_channels(ctx, kv)?;
        }
        Ok(())
    }

    fn next_positions(&self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        self.inner.as_ref().map_or_else(|| next.to_vec(), |p| p.next_positions(layers, next))
    }

    fn select_rows(&mut self, rows: &[usize]) -> pare_model::Result<()> {
        self.inner.as_mut().map_or(Ok(()), |p| p.select_rows(rows))
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(ThinkPress {
            inner: self.inner.as_ref().map(|p| p.box_clone()),
            key_channel_ratio: self.key_channel_ratio,
            window: self.window,
        })
    }
}
