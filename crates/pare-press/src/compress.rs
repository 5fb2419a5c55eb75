//! The machinery every press shares: observe a row, score it, keep what the selector chose, and
//! apply the position policy.

use candle_core::Tensor;
use pare_model::cache::{LayerKv, PAD_POSITION};
use pare_model::hooks::LayerContext;
use pare_model::layers::Linear;
use pare_model::parallel::Shard;
use pare_model::rope::Rope;

use crate::budget::Budget;
use crate::error::Result;
use crate::observation::{index_tensor, Observation, Stored};
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

impl PositionPolicy {
    /// Where the next token of each row goes after a press compressed `layers` (the model's
    /// `next` otherwise): the row's next position, or right after its cache when re-rotating.
    pub fn next_positions(self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        match self {
            PositionPolicy::Original => next.to_vec(),
            PositionPolicy::Rerotate => next_after_cache(layers, next),
        }
    }
}

/// The observed queries of one row: (heads, n, head_dim) before RoPE in the model's dtype (a
/// scorer converts them only if it reads them), and their positions.
pub struct RowQueries {
    pub queries: Tensor,
    pub positions: Vec<i64>,
}

impl RowQueries {
    /// Row `b` of this call's queries (batch, heads, seq, head_dim), padding dropped.
    pub fn from_call(queries: &Tensor, positions: &[Vec<i64>], b: usize) -> Result<Self> {
        let row = &positions[b];
        let first_real = row.iter().position(|&p| p != PAD_POSITION).unwrap_or(row.len());
        let q = queries.get(b)?.narrow(1, first_real, row.len() - first_real)?;
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
    pub shard: Option<&'a Shard>,
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
            shard: ctx.shard,
        }
    }
}

/// Every row's queries of a hook call, padding dropped.
pub fn call_queries(ctx: &LayerContext) -> pare_model::Result<Vec<RowQueries>> {
    (0..ctx.positions.len()).map(|b| Ok(RowQueries::from_call(ctx.queries, ctx.positions, b)?)).collect()
}

/// Where a compression ranks the entries it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Scores read back and ranked on the host.
    Host,
    /// Scored and ranked on the tensors' device where the scorer and the selector allow it
    /// ([`Scorer::score_tensor`](crate::scorer::Scorer::score_tensor), [`Selector::select_tensor`]):
    /// a row reads back only its kept indices, and the cache gathers by buffer rows computed
    /// there. Rows that do not allow it are ranked on the host.
    Device,
}

impl Selection {
    /// On a GPU the device, where a host round trip per layer costs most; on the CPU the host.
    pub fn for_layer(kv: &LayerKv) -> Result<Self> {
        let on_gpu = kv.kv_stored()?.is_some_and(|(k, _)| !k.device().is_cpu());
        Ok(if on_gpu { Selection::Device } else { Selection::Host })
    }
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
    let selection = Selection::for_layer(kv)?;
    compress_layer_with(kv, info, rows, selector, budget, policy, selection)
}

/// [`compress_layer`] with the ranking done where `selection` says; both give the same entries.
pub fn compress_layer_with(
    kv: &mut LayerKv,
    info: &LayerInfo,
    rows: &[RowQueries],
    selector: &dyn Selector,
    budget: Budget,
    policy: PositionPolicy,
    selection: Selection,
) -> Result<bool> {
    if budget.is_noop() || kv.is_empty() {
        return Ok(false);
    }
    let heads = kv.kv_heads();
    let mut keep: Vec<Vec<usize>> = Vec::with_capacity(kv.batch() * heads);
    let mut removed = false;
    // Buffer rows to gather, on the device, while every row so far was ranked there.
    let mut gathered = (selection == Selection::Device).then(Vec::new);
    let starts = kv.buffer_starts().unwrap_or_default();
    for (b, row) in rows.iter().enumerate() {
        let Some((obs, slots)) = observe(kv, b, info, row)? else {
            keep.extend((0..heads).map(|h| real_slots(kv, b, h)));
            gathered = None;
            continue;
        };
        if gathered.is_some() {
            if let Some((kept, buffer_rows)) =
                select_on_device(&obs, &slots, selector, budget, &starts[b * heads..(b + 1) * heads])?
            {
                for (h, kept) in kept.into_iter().enumerate() {
                    removed |= kept.len() < kv.entries(b, h);
                    keep.push(kept);
                }
                gathered.iter_mut().for_each(|g| g.push(buffer_rows.clone()));
                continue;
            }
            gathered = None;
        }
        let scores = if selector.scores_whole_row() { selector.scorer().score(&obs)? } else { Vec::new() };
        let chosen = selector.select(&obs, &scores, budget)?;
        for (h, chosen) in chosen.into_iter().enumerate() {
            let mut kept: Vec<usize> = chosen.into_iter().map(|i| slots[h][i]).collect();
            kept.sort_unstable();
            removed |= kept.len() < kv.entries(b, h);
            keep.push(kept);
        }
    }
    if removed {
        match gathered {
            Some(rows) if !rows.is_empty() => kv.keep_gathered(&keep, &Tensor::cat(&rows, 0)?)?,
            _ => kv.keep(&keep)?,
        }
        if policy == PositionPolicy::Rerotate {
            make_contiguous(kv, info.rope)?;
        }
    }
    Ok(removed)
}

/// One row ranked on the device: per head the kept cache slots (ascending, as the host path
/// leaves them) and the flat buffer rows to gather. `starts` are the row's heads' buffer starts.
/// None when the selector, the scorer or the layout does not allow it.
fn select_on_device(
    obs: &Observation,
    slots: &[Vec<usize>],
    selector: &dyn Selector,
    budget: Budget,
    starts: &[usize],
) -> Result<Option<(Vec<Vec<usize>>, Tensor)>> {
    if !selector.selects_on_device(obs) {
        return Ok(None);
    }
    // Entry i of every head is slot first + i, and head h's region starts h · stride after head 0's.
    let shared = &slots[0];
    let Some(&first) = shared.first() else {
        return Ok(None);
    };
    let stride = starts.get(1).map_or(0, |&s1| s1.wrapping_sub(starts[0]));
    let laid_out = shared.iter().enumerate().all(|(i, &s)| s == first + i)
        && slots.iter().all(|s| s == shared)
        && starts.iter().enumerate().all(|(h, &s)| s == starts[0] + h * stride);
    if !laid_out {
        return Ok(None);
    }
    let Some(scores) = selector.scorer().score_tensor(obs)? else {
        return Ok(None);
    };
    let Some((kept, buffer_rows)) = selector.select_tensor(obs, &scores, budget, starts[0] + first, stride)? else {
        return Ok(None);
    };
    let kept = kept.into_iter().map(|h| h.into_iter().map(|i| first + i).collect()).collect();
    Ok(Some((kept, buffer_rows)))
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
    let stored = match kv.kv()?.filter(|_| slots.windows(2).all(|w| w[0] == w[1])) {
        // A uniform layer whose heads observe the same slots is read in one piece: one copy per
        // layer, and scorers may work on all heads at once.
        Some((k, v)) => {
            let (mut k, mut v) = (k.get(b)?, v.get(b)?);
            if slots[0].len() != kv.entries(b, 0) {
                let idx = index_tensor(&slots[0], k.device())?;
                (k, v) = (k.index_select(&idx, 1)?, v.index_select(&idx, 1)?);
            }
            Stored::Stacked(k, v)
        }
        None => {
            let mut keys = Vec::with_capacity(heads);
            let mut values = Vec::with_capacity(heads);
            for (h, s) in slots.iter().enumerate() {
                let Some((k, v)) = kv.head_kv(b, h)? else { return Ok(None) };
                let (k, v) = if s.len() == kv.entries(b, h) {
                    (k, v)
                } else {
                    let idx = index_tensor(s, k.device())?;
                    (k.contiguous()?.index_select(&idx, 0)?, v.contiguous()?.index_select(&idx, 0)?)
                };
                keys.push(k);
                values.push(v);
            }
            Stored::PerHead(keys, values)
        }
    };
    let positions = slots.iter().enumerate().map(|(h, s)| s.iter().map(|&i| kv.positions(b, h)[i]).collect()).collect();
    let obs = Observation::new(info, stored, positions, row.queries.clone(), row.positions.clone());
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
