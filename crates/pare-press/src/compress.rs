//! The machinery every press shares: observe a row, score it, keep what the selector chose, and
//! apply the position policy.

use candle_core::{DType, Tensor};
use pare_model::cache::{LayerKv, PAD_POSITION};
use pare_model::hooks::LayerContext;
use pare_model::layers::Linear;
use pare_model::rope::Rope;

use crate::budget::Budget;
use crate::error::Result;
use crate::observation::{index_tensor, Observation};
use crate::select::Selector;

/// Where kept entries sit after a compression (`--positions`, JSON `"positions"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionPolicy {
    /// Keys stay rotated at their original positions and new tokens continue at theirs
    /// (seed 001, kvpress).
    #[default]
    Original,
    /// Positions inside the cache become contiguous from 0, keys re-rotated; new tokens continue
    /// right after the cache (StreamingLLM paper).
    Rerotate,
}

/// The observed queries of one row: (heads, n, head_dim) f32 before RoPE, and their positions.
pub struct RowQueries {
    pub queries: Tensor,
    pub positions: Vec<i64>,
}

impl RowQueries {
    /// Row `b` of this call's queries (batch, heads, seq, head_dim), padding dropped.
    pub fn from_call(queries: &Tensor, positions: &[Vec<i64>], b: usize) -> Result<Self> {
        let row = &positions[b];
        let first_real = row.iter().position(|&p| p != PAD_POSITION).unwrap_or(row.len());
        let q = queries.get(b)?.narrow(1, first_real, row.len() - first_real)?.to_dtype(DType::F32)?;
        Ok(RowQueries { queries: q, positions: row[first_real..].to_vec() })
    }
}

/// Layer facts a compression needs.
pub struct LayerInfo<'a> {
    pub layer: usize,
    pub num_layers: usize,
    pub group: usize,
    pub head_dim: usize,
    pub rope: &'a Rope,
    pub output: &'a Linear,
}

impl<'a> LayerInfo<'a> {
    /// The layer facts of a hook call.
    pub fn of(ctx: &LayerContext<'a>) -> Self {
        LayerInfo {
            layer: ctx.layer,
            num_layers: ctx.num_layers,
            group: ctx.attention.num_heads() / ctx.attention.num_kv_heads(),
            head_dim: ctx.attention.head_dim(),
            rope: ctx.rope,
            output: ctx.attention.o(),
        }
    }
}

/// Every row's queries of a hook call, padding dropped.
pub fn call_queries(ctx: &LayerContext) -> pare_model::Result<Vec<RowQueries>> {
    (0..ctx.positions.len()).map(|b| Ok(RowQueries::from_call(ctx.queries, ctx.positions, b)?)).collect()
}

/// Score and compress one layer, row by row, down to `budget` (each row its own budget).
/// Padding entries are always dropped. Returns whether anything was removed.
pub fn compress_layer(
    kv: &mut LayerKv,
    info: &LayerInfo,
    rows: &[RowQueries],
    selector: &dyn Selector,
    budget: Budget,
    policy: PositionPolicy,
) -> Result<bool> {
    if budget.is_noop() || kv.is_empty() {
        return Ok(false);
    }
    let heads = kv.kv_heads();
    let mut keep: Vec<Vec<usize>> = Vec::with_capacity(kv.batch() * heads);
    let mut removed = false;
    for (b, row) in rows.iter().enumerate() {
        let Some((obs, slots)) = observe(kv, b, info, row)? else {
            keep.extend((0..heads).map(|h| real_slots(kv, b, h)));
            continue;
        };
        let scores = selector.scorer().score(&obs)?;
        let chosen = selector.select(&obs, &scores, budget)?;
        for (h, chosen) in chosen.into_iter().enumerate() {
            let mut kept: Vec<usize> = chosen.into_iter().map(|i| slots[h][i]).collect();
            kept.sort_unstable();
            removed |= kept.len() < kv.entries(b, h);
            keep.push(kept);
        }
    }
    if removed {
        kv.keep(&keep)?;
        if policy == PositionPolicy::Rerotate {
            make_contiguous(kv, info.rope)?;
        }
    }
    Ok(removed)
}

/// Slots of the non-padding entries of (row, head).
fn real_slots(kv: &LayerKv, b: usize, h: usize) -> Vec<usize> {
    kv.positions(b, h).iter().enumerate().filter(|(_, &p)| p != PAD_POSITION).map(|(i, _)| i).collect()
}

/// Row `b` of a layer as a scorer sees it, with the cache slot of each observed entry per head.
/// None when the row holds no real entries or observed no queries.
pub fn observe<'a>(
    kv: &LayerKv,
    b: usize,
    info: &LayerInfo<'a>,
    row: &RowQueries,
) -> Result<Option<(Observation<'a>, Vec<Vec<usize>>)>> {
    let heads = kv.kv_heads();
    let slots: Vec<Vec<usize>> = (0..heads).map(|h| real_slots(kv, b, h)).collect();
    if slots.iter().all(Vec::is_empty) || row.positions.is_empty() {
        return Ok(None);
    }
    let (keys, values, stacked) = match kv.kv()?.filter(|_| slots.windows(2).all(|w| w[0] == w[1])) {
        // A uniform layer whose heads observe the same slots is read in one piece: one copy per
        // layer, and scorers may work on all heads at once.
        Some((k, v)) => {
            let (mut k, mut v) = (k.get(b)?, v.get(b)?);
            if slots[0].len() != kv.entries(b, 0) {
                let idx = index_tensor(&slots[0], k.device())?;
                (k, v) = (k.index_select(&idx, 1)?, v.index_select(&idx, 1)?);
            }
            let (k, v) = (k.to_dtype(DType::F32)?.contiguous()?, v.to_dtype(DType::F32)?.contiguous()?);
            let keys = (0..heads).map(|h| k.get(h)).collect::<candle_core::Result<_>>()?;
            let values = (0..heads).map(|h| v.get(h)).collect::<candle_core::Result<_>>()?;
            (keys, values, Some((k, v)))
        }
        None => {
            let mut keys = Vec::with_capacity(heads);
            let mut values = Vec::with_capacity(heads);
            for (h, s) in slots.iter().enumerate() {
                let (k, v) = kv.head_kv(b, h)?.expect("the layer holds entries");
                let (k, v) = if s.len() == kv.entries(b, h) {
                    (k, v)
                } else {
                    let idx = index_tensor(s, k.device())?;
                    (k.contiguous()?.index_select(&idx, 0)?, v.contiguous()?.index_select(&idx, 0)?)
                };
                keys.push(k.to_dtype(DType::F32)?);
                values.push(v.to_dtype(DType::F32)?);
            }
            (keys, values, None)
        }
    };
    let obs = Observation {
        layer: info.layer,
        num_layers: info.num_layers,
        group: info.group,
        head_dim: info.head_dim,
        keys,
        values,
        stacked,
        positions: slots.iter().enumerate().map(|(h, s)| s.iter().map(|&i| kv.positions(b, h)[i]).collect()).collect(),
        queries: row.queries.clone(),
        query_positions: row.positions.clone(),
        rope: info.rope,
        output: info.output,
    };
    Ok(Some((obs, slots)))
}

/// Keep, in every (row, head), the entries at `keep(row, head, positions)`.
pub fn keep_where(kv: &mut LayerKv, keep: impl Fn(usize, usize, &[i64]) -> Vec<usize>) -> Result<()> {
    let heads = kv.kv_heads();
    let lists: Vec<Vec<usize>> =
        (0..kv.batch() * heads).map(|i| keep(i / heads, i % heads, kv.positions(i / heads, i % heads))).collect();
    kv.keep(&lists)?;
    Ok(())
}

/// Re-rotate every (row, head)'s entries to positions 0, 1, ... in cache order.
pub fn make_contiguous(kv: &mut LayerKv, rope: &Rope) -> Result<()> {
    let new: Vec<Vec<i64>> = kv.all_positions().iter().map(|p| (0..p.len() as i64).collect()).collect();
    if new.as_slice() != kv.all_positions() {
        kv.reposition(&new, rope)?;
    }
    Ok(())
}

/// After a forward under the rerotate policy: each row continues right after the newest
/// position any layer holds for it.
pub fn next_after_cache(layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
    (0..next.len())
        .map(|b| {
            layers
                .iter()
                .flat_map(|l| (0..l.kv_heads()).flat_map(move |h| l.positions(b, h).iter().copied()))
                .max()
                .map_or(next[b], |p| p + 1)
        })
        .collect()
}

/// Indices of the `k` largest scores (ties: the earlier entry first).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    // Partition first (linear), then order only the kept: a prefill press ranks every entry of
    // every head of every layer.
    if k < idx.len() {
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, order);
        }
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}
