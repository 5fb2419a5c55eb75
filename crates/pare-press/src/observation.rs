//! What a scorer sees: one batch row of one layer — its cached entries per KV head and the
//! queries observed so far.

use std::cell::OnceCell;
use std::ops::Range;

use candle_core::{DType, Device, Tensor, D};
use pare_model::layers::Linear;
use pare_model::parallel::Shard;
use pare_model::rope::Rope;

use crate::error::Result;

/// One row of one layer, ready to be scored. Padding entries and padding queries are left out.
///
/// Keys, values and queries are held as the cache and the model hold them (bf16 on a GPU) and
/// converted to f32 only when a scorer first asks for them: a key-only scorer never pays for
/// converting the queries of every head or the values.
pub struct Observation<'a> {
    pub layer: usize,
    pub num_layers: usize,
    /// Query heads per KV head.
    pub group: usize,
    pub head_dim: usize,
    /// Per KV head: original positions of those entries.
    pub positions: Vec<Vec<i64>>,
    pub query_positions: Vec<i64>,
    pub rope: &'a Rope,
    /// The layer's output projection (hidden × heads·head_dim), for selectors that weigh an
    /// entry by what its value adds to the residual stream (CriticalKV).
    pub output: &'a Linear,
    /// Set when the model is split for tensor parallelism: the observed heads are this rank's.
    pub shard: Option<&'a Shard>,
    stored: Stored,
    /// (heads, observed, head_dim) before RoPE, as the model computed them.
    stored_queries: Tensor,
    keys: OnceCell<Vec<Tensor>>,
    values: OnceCell<Vec<Tensor>>,
    stacked_keys: OnceCell<Tensor>,
    stacked_values: OnceCell<Tensor>,
    queries: OnceCell<Tensor>,
}

/// Keys and values as observed: (kv_heads, entries, head_dim) when every head observes the same
/// number of entries, else one (entries, head_dim) tensor per KV head.
pub(crate) enum Stored {
    Stacked(Tensor, Tensor),
    PerHead(Vec<Tensor>, Vec<Tensor>),
}

/// The value in `cell`, computed by `init` the first time.
fn cached<T>(cell: &OnceCell<T>, init: impl FnOnce() -> Result<T>) -> Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = init()?;
    Ok(cell.get_or_init(|| v))
}

fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

impl<'a> Observation<'a> {
    /// An observation of `stored` keys and values at `positions` and of `queries` (heads,
    /// observed, head_dim) at `query_positions`; `info` gives the layer facts.
    pub(crate) fn new(
        info: &crate::compress::LayerInfo<'a>,
        stored: Stored,
        positions: Vec<Vec<i64>>,
        queries: Tensor,
        query_positions: Vec<i64>,
    ) -> Self {
        Observation {
            layer: info.layer,
            num_layers: info.num_layers,
            group: info.group,
            head_dim: info.head_dim,
            positions,
            query_positions,
            rope: info.rope,
            output: info.output,
            shard: info.shard,
            stored,
            stored_queries: queries,
            keys: OnceCell::new(),
            values: OnceCell::new(),
            stacked_keys: OnceCell::new(),
            stacked_values: OnceCell::new(),
            queries: OnceCell::new(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.positions.len()
    }

    /// Where this observation's KV heads sit among the whole layer's: all of them unless the
    /// model is split for tensor parallelism.
    pub fn head_range(&self) -> Range<usize> {
        let offset = self.shard.map_or(0, |s| s.head_offset(self.kv_heads()));
        offset..offset + self.kv_heads()
    }

    /// `local` (one list per observed head) with every rank's heads' lists, in the whole layer's
    /// head order: what a rule that decides over all of a layer's heads needs when the model is
    /// split (one exchange). `local` itself when it is not.
    pub fn every_head(&self, local: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let Some(shard) = self.shard else { return Ok(local.to_vec()) };
        // Each rank sends its heads' lengths, then their values; every rank holds as many heads.
        let packed: Vec<f32> = local.iter().map(|h| h.len() as f32).chain(local.iter().flatten().copied()).collect();
        let n = packed.len();
        let all = shard.comm.all_gather(&Tensor::from_vec(packed, n, &Device::Cpu)?, 0)?.to_vec1::<f32>()?;
        let mut heads = Vec::with_capacity(local.len() * shard.world_size());
        let mut at = 0;
        for _ in 0..shard.world_size() {
            let lens: Vec<usize> = all[at..at + local.len()].iter().map(|&l| l as usize).collect();
            at += local.len();
            for len in lens {
                heads.push(all[at..at + len].to_vec());
                at += len;
            }
        }
        Ok(heads)
    }

    pub fn observed(&self) -> usize {
        self.query_positions.len()
    }

    pub fn device(&self) -> &Device {
        self.stored_queries.device()
    }

    /// Per KV head: keys (after RoPE) of the entries, (entries, head_dim) in f32, in cache order
    /// (oldest first).
    pub fn keys(&self) -> Result<&[Tensor]> {
        Ok(cached(&self.keys, || match &self.stored {
            Stored::Stacked(k, _) => {
                let k = cached(&self.stacked_keys, || f32_contiguous(k))?;
                Ok((0..self.kv_heads()).map(|h| k.get(h)).collect::<candle_core::Result<_>>()?)
            }
            Stored::PerHead(k, _) => k.iter().map(|k| Ok(k.to_dtype(DType::F32)?)).collect(),
        })?)
    }

    /// Per KV head: values of the entries, as [`Observation::keys`].
    pub fn values(&self) -> Result<&[Tensor]> {
        Ok(cached(&self.values, || match &self.stored {
            Stored::Stacked(_, v) => {
                let v = cached(&self.stacked_values, || f32_contiguous(v))?;
                Ok((0..self.kv_heads()).map(|h| v.get(h)).collect::<candle_core::Result<_>>()?)
            }
            Stored::PerHead(_, v) => v.iter().map(|v| Ok(v.to_dtype(DType::F32)?)).collect(),
        })?)
    }

    /// The keys as one (kv_heads, entries, head_dim) f32 tensor when every head observes the
    /// same number of entries, so a scorer can treat all heads in one operation (on a GPU, one
    /// launch and one read-back per layer instead of one per head).
    pub fn stacked_keys(&self) -> Result<Option<&Tensor>> {
        match &self.stored {
            Stored::Stacked(k, _) => Ok(Some(cached(&self.stacked_keys, || f32_contiguous(k))?)),
            Stored::PerHead(..) => Ok(None),
        }
    }

    /// The values as [`Observation::stacked_keys`] gives the keys.
    pub fn stacked_values(&self) -> Result<Option<&Tensor>> {
        match &self.stored {
            Stored::Stacked(_, v) => Ok(Some(cached(&self.stacked_values, || f32_contiguous(v))?)),
            Stored::PerHead(..) => Ok(None),
        }
    }

    /// (heads, observed, head_dim) f32: queries before RoPE of the observed tokens — the prompt
    /// at the end of prefill, the buffered recent steps while decoding.
    pub fn queries(&self) -> Result<&Tensor> {
        cached(&self.queries, || Ok(self.stored_queries.to_dtype(DType::F32)?))
    }

    /// The same row restricted to `entries[h]` of each KV head (indices into its entries, in
    /// that order): BlockPress scores a head's kept entries followed by the next block.
    pub(crate) fn subset(&self, entries: &[Vec<usize>]) -> Result<Observation<'a>> {
        let shared = entries.windows(2).all(|w| w[0] == w[1]);
        let stored = match (self.stacked_keys()?, self.stacked_values()?) {
            (Some(k), Some(v)) if shared => {
                let idx = index_tensor(&entries[0], k.device())?;
                Stored::Stacked(k.index_select(&idx, 1)?, v.index_select(&idx, 1)?)
            }
            _ => {
                let pick = |t: &[Tensor]| -> Result<Vec<Tensor>> {
                    t.iter().zip(entries).map(|(t, e)| Ok(t.index_select(&index_tensor(e, t.device())?, 0)?)).collect()
                };
                Stored::PerHead(pick(self.keys()?)?, pick(self.values()?)?)
            }
        };
        let positions = self.positions.iter().zip(entries).map(|(p, e)| e.iter().map(|&i| p[i]).collect()).collect();
        Ok(Observation {
            layer: self.layer,
            num_layers: self.num_layers,
            group: self.group,
            head_dim: self.head_dim,
            positions,
            query_positions: self.query_positions.clone(),
            rope: self.rope,
            output: self.output,
            shard: self.shard,
            stored,
            stored_queries: self.stored_queries.clone(),
            keys: OnceCell::new(),
            values: OnceCell::new(),
            stacked_keys: OnceCell::new(),
            stacked_values: OnceCell::new(),
            queries: OnceCell::new(),
        })
    }

    /// Every KV head holds the same entries (nothing was chosen per head yet).
    pub fn heads_share_entries(&self) -> bool {
        self.positions.windows(2).all(|w| w[0] == w[1])
    }

    /// [`Observation::heads_share_entries`] over all of the layer's heads: on a split model, on
    /// every rank and with the same entries on each (one exchange).
    pub fn all_heads_share_entries(&self) -> Result<bool> {
        let local = self.heads_share_entries();
        if self.shard.is_none() {
            return Ok(local);
        }
        // The first head's positions as a fingerprint: shared everywhere iff every rank's heads
        // agree among themselves and with every other rank's first head.
        let first: Vec<f32> = self.positions[0].iter().map(|&p| p as f32).collect();
        let mine = vec![vec![f32::from(u8::from(local))], first];
        let all = self.every_head(&mine)?;
        Ok(all.chunks(2).all(|r| r[0] == [1.0] && r[1] == all[1]))
    }

    /// The first position after everything observed: where future queries start.
    pub fn next_position(&self) -> i64 {
        let last_query = self.query_positions.iter().copied().max();
        let last_entry = self.positions.iter().flatten().copied().max();
        last_query.max(last_entry).map_or(0, |p| p + 1)
    }

    /// Queries of the last `last` observed tokens, RoPE applied at their positions: (heads, last, head_dim).
    pub fn rotated_queries(&self, last: usize) -> Result<Tensor> {
        let n = self.observed();
        let last = last.min(n);
        // Only these queries are converted (a window of 64 out of a 4k prompt, say).
        let q = self.stored_queries.narrow(1, n - last, last)?.to_dtype(DType::F32)?;
        let positions = &self.query_positions[n - last..];
        let (cos, sin) = self.rope.cos_sin(positions, 1, last, DType::F32, q.device())?;
        Ok(self.rope.apply(&q.unsqueeze(0)?, &cos, &sin)?.squeeze(0)?)
    }

    /// Attention weights of the last `last` observed queries of the query heads of KV head
    /// `head` over that head's entries: (group, last, entries), softmax over the entries a query
    /// may see (causal by position), computed in f32 for these queries only.
    pub fn attention(&self, head: usize, last: usize) -> Result<Tensor> {
        let q = self.rotated_queries(last)?.narrow(0, head * self.group, self.group)?;
        self.attention_of(&q, head, &self.query_positions[self.observed() - q.dim(1)?..])
    }

    /// Attention weights of rotated queries q (group, n, head_dim) at `positions` over KV head `head`.
    pub fn attention_of(&self, q: &Tensor, head: usize, positions: &[i64]) -> Result<Tensor> {
        let keys = &self.keys()?[head];
        let scores = (q.broadcast_matmul(&keys.t()?)? / (self.head_dim as f64).sqrt())?;
        let entries = &self.positions[head];
        let mask = Tensor::from_vec(causal_mask(positions, entries), (1, positions.len(), entries.len()), q.device())?;
        Ok(softmax_last_dim(&scores.broadcast_add(&mask)?)?)
    }

    /// [`Observation::attention`] of every KV head at once: (kv_heads, group, last, entries).
    /// None unless the keys are [`Observation::stacked`].
    pub fn stacked_attention(&self, last: usize) -> Result<Option<Tensor>> {
        let Some(keys) = self.stacked_keys()? else {
            return Ok(None);
        };
        let q = self.rotated_queries(last)?.contiguous()?;
        let (_, last, dim) = q.dims3()?;
        let (kv_heads, n) = (self.kv_heads(), keys.dim(1)?);
        // Query heads h·group .. (h+1)·group read KV head h: fold them into one matrix per KV head.
        let q = q.reshape((kv_heads, self.group * last, dim))?;
        let scores =
            (q.matmul(&keys.t()?)? / (self.head_dim as f64).sqrt())?.reshape((kv_heads, self.group, last, n))?;
        let positions = &self.query_positions[self.observed() - last..];
        let heads: Vec<&[i64]> = if self.heads_share_entries() {
            vec![&self.positions[0]]
        } else {
            self.positions.iter().map(Vec::as_slice).collect()
        };
        let mask: Vec<f32> = heads.iter().flat_map(|entries| causal_mask(positions, entries)).collect();
        let mask = Tensor::from_vec(mask, (heads.len(), 1, last, n), q.device())?;
        Ok(Some(softmax_last_dim(&scores.broadcast_add(&mask)?)?))
    }

    /// Column sums of the attention weights of all observed queries (query heads of KV head
    /// `head`), with how many queries could see each entry: (group, entries) and a count per
    /// entry. Queries go in chunks so long prompts never hold a full attention matrix.
    pub fn attention_sums(&self, head: usize) -> Result<(Tensor, Vec<usize>)> {
        const CHUNK: usize = 256;
        let n = self.observed();
        let entries = &self.positions[head];
        let mut sums = Tensor::zeros((self.group, entries.len()), DType::F32, self.device())?;
        let rotated = self.rotated_queries(n)?.narrow(0, head * self.group, self.group)?;
        for start in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - start);
            let q = rotated.narrow(1, start, len)?;
            let weights = self.attention_of(&q, head, &self.query_positions[start..start + len])?;
            sums = (sums + weights.sum(1)?)?;
        }
        let seen_by = entries.iter().map(|&e| self.query_positions.iter().filter(|&&q| q >= e).count()).collect();
        Ok((sums, seen_by))
    }
}

/// Additive mask (queries × entries, row-major): 0 where the query at that position may see the
/// entry (not in its future), f32::MIN elsewhere.
pub(crate) fn causal_mask(query_positions: &[i64], entries: &[i64]) -> Vec<f32> {
    query_positions.iter().flat_map(|&qp| entries.iter().map(move |&e| if e <= qp { 0.0 } else { f32::MIN })).collect()
}

/// The tensor of `indices` (u32), for index_select.
pub(crate) fn index_tensor(indices: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), indices.len(), device)?)
}

/// Softmax over the last dimension, in f32. Masked entries carry f32::MIN, so a query that sees
/// no entry at all gets a uniform row rather than NaN.
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// A tensor's values, flattened, as f32.
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Scores computed on the host from each KV head's keys and values, read back row-major
/// (entries × head_dim): `score(keys, values, head_dim)` per head.
pub fn per_head_on_host(obs: &Observation, score: impl Fn(&[f32], &[f32], usize) -> Vec<f32>) -> Result<Vec<Vec<f32>>> {
    obs.keys()?.iter().zip(obs.values()?).map(|(k, v)| Ok(score(&to_vec(k)?, &to_vec(v)?, obs.head_dim))).collect()
}

/// A (kv_heads, entries) tensor's values as one score list per KV head, in one read-back.
pub fn per_head(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let n = t.dim(1)?;
    Ok(to_vec(t)?.chunks(n.max(1)).map(<[f32]>::to_vec).collect())
}
