//! The KV cache: per layer and per (batch row, KV head), post-RoPE keys and values plus each
//! entry's original position.
//!
//! Keys are cached after RoPE, so an entry's position is baked into its key; the cache keeps the
//! position explicitly too, because masking is decided by positions (causal, sliding window,
//! padding) rather than by slot index. That is what lets presses evict entries and token pruning
//! drop them without breaking attention.
//!
//! Storage has two shapes. While every (row, head) holds the same number of entries, one
//! (batch, kv_heads, capacity, head_dim) buffer pair serves the whole layer and attention runs
//! batched. Once budgets differ between rows or heads (per-head presses, per-sequence budgets),
//! each (row, head) gets its own region of one buffer pair, sized to what it keeps: the memory
//! really is freed. New entries are written in place into spare capacity in both shapes, with one
//! copy per layer whatever the number of rows and heads (a GPU launch per head would cost more
//! than the attention it feeds).

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::rope::Rope;

/// How the cache holds keys and values: in a float dtype, or as GGUF Q8_0 blocks (34 bytes per
/// 32 values, `U8` tensors whose last dimension is the blocks' bytes; CPU only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    Float(DType),
    Q8_0,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::Float(DType::F32) => "f32",
            KvDtype::Float(DType::F16) => "f16",
            KvDtype::Float(DType::BF16) => "bf16",
            KvDtype::Float(_) => "other",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// Bytes one cached entry (a key or a value) of `head_dim` values takes.
    pub fn entry_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDtype::Float(d) => head_dim * d.size_in_bytes(),
            KvDtype::Q8_0 => pare_kernels::kv_row_width(head_dim, DType::U8),
        }
    }

    /// New keys or values (..., head_dim) as this cache stores them.
    pub fn store(self, t: &Tensor) -> Result<Tensor> {
        Ok(match self {
            KvDtype::Float(d) => t.to_dtype(d)?,
            KvDtype::Q8_0 => pare_kernels::encode_kv_q8_0(t)?,
        })
    }
}

/// Stored keys or values as floats: q8_0 blocks decoded to f32, float tensors as they are.
fn readable(t: Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::U8 { pare_kernels::decode_kv_q8_0(&t)? } else { t })
}

/// Position of a padding slot: never attended to.
pub const PAD_POSITION: i64 = -1;

#[derive(Debug)]
enum Storage {
    Empty,
    /// Every (row, head) holds `len` entries: (batch, kv_heads, capacity, head_dim) buffers.
    Uniform {
        keys: Tensor,
        values: Tensor,
        len: usize,
    },
    /// (row, head) `i = row * kv_heads + head` owns rows `starts[i] .. starts[i] + caps[i]` of one
    /// (rows, head_dim) buffer pair and uses the first `lens[i]` of them.
    Ragged {
        keys: Tensor,
        values: Tensor,
        starts: Vec<usize>,
        caps: Vec<usize>,
        lens: Vec<usize>,
    },
}

#[derive(Debug)]
pub struct LayerKv {
    batch: usize,
    kv_heads: usize,
    storage: Storage,
    /// positions[row * kv_heads + head]: original position of each entry, or PAD_POSITION.
    positions: Vec<Vec<i64>>,
    /// Every head of a row holds the same entries (nothing was selected per head), so one mask
    /// per row serves all its heads.
    heads_aligned: bool,
    /// Every (row, head)'s positions ascend (padding, at -1, first), as appends and presses leave
    /// them: what a decode query sees is then found by bisection instead of a scan per step.
    ascending: bool,
    /// Bytes every entry ever appended would take uncompressed (the baseline for savings).
    appended_bytes: usize,
}

/// A deep copy: new entries are written in place, so a clone must never share buffers.
impl Clone for LayerKv {
    fn clone(&self) -> Self {
        let copy = |t: &Tensor| t.copy().expect("copying a cache buffer");
        let storage = match &self.storage {
            Storage::Empty => Storage::Empty,
            Storage::Uniform { keys, values, len } => {
                Storage::Uniform { keys: copy(keys), values: copy(values), len: *len }
            }
            Storage::Ragged { keys, values, starts, caps, lens } => Storage::Ragged {
                keys: copy(keys),
                values: copy(values),
                starts: starts.clone(),
                caps: caps.clone(),
                lens: lens.clone(),
            },
        };
        LayerKv { storage, positions: self.positions.clone(), ..*self }
    }
}

/// cos and sin (1, n, rotary_dim / 2) of rotations by `deltas` positions (negative moves back).
fn rotation_by(rope: &Rope, deltas: &[i64], dtype: candle_core::DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq = rope.inv_freq();
    let angles: Vec<f32> = deltas.iter().flat_map(|&d| inv_freq.iter().map(move |&f| d as f32 * f)).collect();
    let shape = (1, deltas.len(), inv_freq.len());
    let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), shape, device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), shape, device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Per-(row, head) (n, head_dim) tensors, row-major → one (batch, kv_heads, n, head_dim) tensor.
fn stack_heads(per_head: &[Tensor], kv_heads: usize) -> Result<Tensor> {
    let rows =
        per_head.chunks(kv_heads).map(|heads| Tensor::stack(heads, 0)).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Where each region starts when regions of `caps` rows are laid out one after another.
fn region_starts(caps: &[usize]) -> Vec<usize> {
    caps.iter().scan(0, |next, &c| Some(std::mem::replace(next, *next + c))).collect()
}

/// Rows `rows` of a (rows, width) buffer, in that order, as a new buffer.
fn gather_rows(buf: &Tensor, rows: &[u32]) -> Result<Tensor> {
    if rows.is_empty() || buf.dim(0)? == 0 {
        return Ok(Tensor::zeros((rows.len(), buf.dim(1)?), buf.dtype(), buf.device())?);
    }
    let ids = Tensor::from_vec(rows.to_vec(), rows.len(), buf.device())?;
    Ok(buf.index_select(&ids, 0)?)
}

/// A ragged layer whose (row, head) regions hold exactly `lens` entries each, one after another.
fn ragged_of(keys: Tensor, values: Tensor, lens: Vec<usize>) -> Storage {
    Storage::Ragged { keys, values, starts: region_starts(&lens), caps: lens.clone(), lens }
}

fn all_ascending(positions: &[Vec<i64>]) -> bool {
    positions.iter().all(|p| p.windows(2).all(|w| w[0] <= w[1]))
}

/// Capacity after growth: a quarter of headroom keeps appends amortized without holding twice
/// the memory a compressed cache needs.
fn grown_capacity(needed: usize, capacity: usize) -> usize {
    needed.max(capacity + capacity / 4).max(16)
}

/// Append one step's new entries to the same layer of several caches at once: `k` and `v`
/// (rows, kv_heads, n, head_dim) hold `kvs[0]`'s rows, then `kvs[1]`'s, and so on, at
/// `positions[i]` for cache i. One write for all of them (on a GPU one launch,
/// [`pare_kernels::write_rows`]): a server's decode step appends to a cache per sequence.
pub fn append_all(kvs: &mut [&mut LayerKv], k: &Tensor, v: &Tensor, positions: &[&[Vec<i64>]]) -> Result<()> {
    let (rows, heads, n, dim) = k.dims4()?;
    if v.dims() != k.dims() || kvs.len() != positions.len() || kvs.iter().map(|kv| kv.batch).sum::<usize>() != rows {
        return Err(ModelError::input(format!(
            "cache append: keys {:?} and values {:?} for caches of {} rows",
            k.dims(),
            v.dims(),
            kvs.iter().map(|kv| kv.batch).sum::<usize>()
        )));
    }
    for (kv, p) in kvs.iter().zip(positions) {
        kv.check_append(heads, n, p)?;
    }
    let buffers = kvs.iter_mut().map(|kv| kv.reserve(n, dim, k.dtype(), k.device())).collect::<Result<Vec<_>>>()?;
    let writes: Vec<pare_kernels::RowWrites> =
        buffers.iter().map(|(keys, values, rows)| pare_kernels::RowWrites { keys, values, rows }).collect();
    let entries = (rows * heads, n, dim);
    pare_kernels::write_rows(&k.contiguous()?.reshape(entries)?, &v.contiguous()?.reshape(entries)?, &writes)?;
    let entry_bytes = 2 * dim * k.dtype().size_in_bytes();
    for (kv, p) in kvs.iter_mut().zip(positions) {
        kv.commit(n, p, entry_bytes);
    }
    Ok(())
}

impl LayerKv {
    pub fn new(batch: usize, kv_heads: usize) -> Self {
        LayerKv {
            batch,
            kv_heads,
            storage: Storage::Empty,
            positions: vec![Vec::new(); batch * kv_heads],
            heads_aligned: true,
            ascending: true,
            appended_bytes: 0,
        }
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Entries of (row, head).
    pub fn entries(&self, row: usize, head: usize) -> usize {
        self.positions[row * self.kv_heads + head].len()
    }

    /// The largest number of entries any (row, head) holds.
    pub fn max_entries(&self) -> usize {
        self.positions.iter().map(Vec::len).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.max_entries() == 0
    }

    /// Entries per (row, head), row-major.
    pub fn entry_counts(&self) -> Vec<usize> {
        self.positions.iter().map(Vec::len).collect()
    }

    /// Original positions of the entries of (row, head).
    pub fn positions(&self, row: usize, head: usize) -> &[i64] {
        &self.positions[row * self.kv_heads + head]
    }

    /// Positions per (row, head), row-major.
    pub fn all_positions(&self) -> &[Vec<i64>] {
        &self.positions
    }

    /// When every head of every row holds the same entries in the same slots: the positions per
    /// row, which then describe the whole layer. None once a press chose entries per head.
    pub fn row_positions(&self) -> Option<Vec<&[i64]>> {
        if !self.heads_aligned || !matches!(self.storage, Storage::Uniform { .. } | Storage::Empty) {
            return None;
        }
        Some((0..self.batch).map(|b| self.positions(b, 0)).collect())
    }

    /// The used part of a uniform cache: keys and values of shape (batch, kv_heads, len, head_dim),
    /// as floats. None when empty or ragged (then read it head by head with [`LayerKv::head_kv`]).
    pub fn kv(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.kv_stored()?.map(|(k, v)| Ok((readable(k)?, readable(v)?))).transpose()
    }

    /// [`LayerKv::kv`] as stored (views, no copy; q8_0 blocks as `U8`), for the kernels.
    pub fn kv_stored(&self) -> Result<Option<(Tensor, Tensor)>> {
        match &self.storage {
            Storage::Uniform { keys, values, len } => Ok(Some((keys.narrow(2, 0, *len)?, values.narrow(2, 0, *len)?))),
            _ => Ok(None),
        }
    }

    /// Keys and values of (row, head): (entries, head_dim) each, as floats.
    pub fn head_kv(&self, row: usize, head: usize) -> Result<Option<(Tensor, Tensor)>> {
        self.head_kv_stored(row, head)?.map(|(k, v)| Ok((readable(k)?, readable(v)?))).transpose()
    }

    /// [`LayerKv::head_kv`] as stored (views; q8_0 blocks as `U8`), for the kernels.
    pub fn head_kv_stored(&self, row: usize, head: usize) -> Result<Option<(Tensor, Tensor)>> {
        let i = row * self.kv_heads + head;
        match &self.storage {
            Storage::Empty => Ok(None),
            Storage::Uniform { keys, values, len } => Ok(Some((
                keys.get(row)?.get(head)?.narrow(0, 0, *len)?,
                values.get(row)?.get(head)?.narrow(0, 0, *len)?,
            ))),
            Storage::Ragged { keys, values, starts, lens, .. } => {
                Ok(Some((keys.narrow(0, starts[i], lens[i])?, values.narrow(0, starts[i], lens[i])?)))
            }
        }
    }

    /// Keys and values as (rows, width) buffers, with the buffer row where each (row, head)'s
    /// entries begin. None when empty.
    fn flat(&self) -> Result<Option<(Tensor, Tensor, Vec<usize>)>> {
        Ok(match &self.storage {
            Storage::Empty => None,
            Storage::Uniform { keys, values, .. } => {
                let (batch, heads, capacity, width) = keys.dims4()?;
                let flat = |t: &Tensor| t.contiguous()?.reshape((batch * heads * capacity, width));
                Some((flat(keys)?, flat(values)?, (0..batch * heads).map(|i| i * capacity).collect()))
            }
            Storage::Ragged { keys, values, starts, .. } => Some((keys.clone(), values.clone(), starts.clone())),
        })
    }

    /// Append new entries (batch, kv_heads, n, head_dim) with their positions (batch × n); every
    /// head of a row gets the new entries.
    pub fn append(&mut self, k: &Tensor, v: &Tensor, positions: &[Vec<i64>]) -> Result<()> {
        append_all(&mut [self], k, v, &[positions])
    }

    fn check_append(&self, heads: usize, n: usize, positions: &[Vec<i64>]) -> Result<()> {
        if heads != self.kv_heads || positions.len() != self.batch {
            return Err(ModelError::input(format!(
                "cache append: {} rows × {heads} KV heads for a cache of {} × {}",
                positions.len(),
                self.batch,
                self.kv_heads
            )));
        }
        if positions.iter().any(|p| p.len() != n) {
            return Err(ModelError::input("cache append: positions do not match the new entries"));
        }
        Ok(())
    }

    /// Room for `n` more entries in every (row, head), growing the buffers where needed: the flat
    /// (rows, width) key and value buffers (sharing the layer's storage) and the buffer row each
    /// (row, head)'s next entry goes to.
    fn reserve(&mut self, n: usize, dim: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let (batch, heads) = (self.batch, self.kv_heads);
        match &mut self.storage {
            Storage::Empty | Storage::Uniform { .. } => {
                let (old_len, capacity) = match &self.storage {
                    Storage::Uniform { keys, len, .. } => (*len, keys.dim(2)?),
                    _ => (0, 0),
                };
                let needed = old_len + n;
                if needed > capacity {
                    let new_capacity = grown_capacity(needed, capacity);
                    let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                        let buf = Tensor::zeros((batch, heads, new_capacity, dim), dtype, device)?;
                        if let Some(old) = old {
                            buf.slice_set(&old.narrow(2, 0, old_len)?.contiguous()?, 2, 0)?;
                        }
                        Ok(buf)
                    };
                    self.storage = match &self.storage {
                        Storage::Uniform { keys, values, .. } => {
                            Storage::Uniform { keys: grow(Some(keys))?, values: grow(Some(values))?, len: old_len }
                        }
                        _ => Storage::Uniform { keys: grow(None)?, values: grow(None)?, len: 0 },
                    };
                }
                let Storage::Uniform { keys, values, len } = &mut self.storage else {
                    unreachable!("just made uniform")
                };
                // Writes go through flat views of the buffers, so the buffers must be dense.
                if !keys.is_contiguous() || !values.is_contiguous() {
                    (*keys, *values) = (keys.contiguous()?, values.contiguous()?);
                }
                let capacity = keys.dim(2)?;
                let flat = |t: &Tensor| t.reshape((batch * heads * capacity, dim));
                Ok((flat(keys)?, flat(values)?, (0..batch * heads).map(|i| i * capacity + *len).collect()))
            }
            Storage::Ragged { keys, values, starts, caps, lens } => {
                if lens.iter().zip(caps.iter()).any(|(&l, &c)| l + n > c) {
                    // Regions that would overflow grow; the buffer is rebuilt in one gather, the
                    // spare rows filled from row 0 (never read).
                    let new_caps: Vec<usize> = lens
                        .iter()
                        .zip(caps.iter())
                        .map(|(&l, &c)| if l + n > c { grown_capacity(l + n, c) } else { c })
                        .collect();
                    let new_starts = region_starts(&new_caps);
                    let mut rows = vec![0u32; new_caps.iter().sum()];
                    for i in 0..lens.len() {
                        for j in 0..lens[i] {
                            rows[new_starts[i] + j] = (starts[i] + j) as u32;
                        }
                    }
                    *keys = gather_rows(keys, &rows)?;
                    *values = gather_rows(values, &rows)?;
                    *starts = new_starts;
                    *caps = new_caps;
                }
                if !keys.is_contiguous() || !values.is_contiguous() {
                    (*keys, *values) = (keys.contiguous()?, values.contiguous()?);
                }
                Ok((keys.clone(), values.clone(), starts.iter().zip(lens.iter()).map(|(s, l)| s + l).collect()))
            }
        }
    }

    /// Count `n` entries per (row, head) appended at `positions`, their rows already written;
    /// `entry_bytes` is one entry's key and value.
    fn commit(&mut self, n: usize, positions: &[Vec<i64>], entry_bytes: usize) {
        let heads = self.kv_heads;
        match &mut self.storage {
            Storage::Uniform { len, .. } => *len += n,
            Storage::Ragged { lens, .. } => lens.iter_mut().for_each(|l| *l += n),
            Storage::Empty => unreachable!("reserve made room"),
        }
        self.appended_bytes += self.batch * heads * n * entry_bytes;
        for (b, new) in positions.iter().enumerate() {
            self.ascending &= new.windows(2).all(|w| w[0] <= w[1])
                && new.first().is_none_or(|&first| {
                    (0..heads).all(|h| self.positions[b * heads + h].last().is_none_or(|&last| first >= last))
                });
            for h in 0..heads {
                self.positions[b * heads + h].extend_from_slice(new);
            }
        }
    }

    /// Keep, for every (row, head) `i = row * kv_heads + head`, the entries at `keep[i]`, in that
    /// order. Counts may differ between rows and heads; the storage then becomes ragged and only
    /// what is kept stays allocated.
    pub fn keep(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        self.keep_with(keep, None)
    }

    /// Where (row, head) `i`'s entries begin in the (rows, head_dim) buffers that a gather of
    /// [`LayerKv::keep_gathered`] reads: entry `j` is buffer row `starts[i] + j`. None when empty.
    pub fn buffer_starts(&self) -> Option<Vec<usize>> {
        match &self.storage {
            Storage::Empty => None,
            Storage::Uniform { keys, .. } => {
                let capacity = keys.dim(2).ok()?;
                Some((0..self.batch * self.kv_heads).map(|i| i * capacity).collect())
            }
            Storage::Ragged { starts, .. } => Some(starts.clone()),
        }
    }

    /// [`LayerKv::keep`] with the buffer rows to gather already on the keys' device: `rows`
    /// (u32, any shape) lists, in `keep`'s order, `starts[i] + j` for each kept entry `j` of each
    /// (row, head) `i` ([`LayerKv::buffer_starts`]). Nothing is uploaded: a press that selected on
    /// the GPU reads back only `keep` (for the positions, which live on the host).
    pub fn keep_gathered(&mut self, keep: &[Vec<usize>], rows: &Tensor) -> Result<()> {
        if rows.elem_count() != keep.iter().map(Vec::len).sum::<usize>() {
            return Err(ModelError::input("cache keep: buffer rows do not match the kept entries"));
        }
        self.keep_with(keep, Some(rows))
    }

    fn keep_with(&mut self, keep: &[Vec<usize>], gathered: Option<&Tensor>) -> Result<()> {
        if keep.len() != self.positions.len()
            || keep.iter().zip(&self.positions).any(|(idx, pos)| idx.iter().any(|&i| i >= pos.len()))
        {
            return Err(ModelError::input("cache keep: bad entry indices"));
        }
        let Some((keys, values, base)) = self.flat()? else {
            return Ok(());
        };
        let aligned = self.heads_aligned
            && (0..self.batch)
                .all(|b| (1..self.kv_heads).all(|h| keep[b * self.kv_heads + h] == keep[b * self.kv_heads]));
        let uniform = keep.iter().all(|idx| idx.len() == keep[0].len());
        // One gather for the whole layer, whatever the number of rows and heads.
        let (keys, values) = match gathered {
            Some(rows) if !rows.dims().contains(&0) && keys.dim(0)? > 0 => {
                let rows = rows.flatten_all()?;
                (keys.index_select(&rows, 0)?, values.index_select(&rows, 0)?)
            }
            _ => {
                let rows: Vec<u32> = keep
                    .iter()
                    .zip(&base)
                    .flat_map(|(idx, &start)| idx.iter().map(move |&j| (start + j) as u32))
                    .collect();
                (gather_rows(&keys, &rows)?, gather_rows(&values, &rows)?)
            }
        };
        self.storage = if uniform {
            let shape = (self.batch, self.kv_heads, keep[0].len(), keys.dim(1)?);
            Storage::Uniform { keys: keys.reshape(shape)?, values: values.reshape(shape)?, len: keep[0].len() }
        } else {
            ragged_of(keys, values, keep.iter().map(Vec::len).collect())
        };
        for (pos, idx) in self.positions.iter_mut().zip(keep) {
            *pos = idx.iter().map(|&j| pos[j]).collect();
        }
        self.heads_aligned = aligned;
        self.ascending = all_ascending(&self.positions);
        Ok(())
    }

    /// How many of (row, head)'s entries, from the oldest, a query at `query_pos` cannot see
    /// (padding, or what left the sliding `window`), when it sees all the others. None when what
    /// it cannot see is not such a prefix (then the attention needs a mask).
    pub fn hidden_prefix(&self, row: usize, head: usize, query_pos: i64, window: Option<usize>) -> Option<usize> {
        let positions = self.positions(row, head);
        let first_visible = window.map_or(0, |w| (query_pos - w as i64 + 1).max(0));
        if self.ascending {
            let hidden = positions.partition_point(|&p| p < first_visible);
            return positions.last().is_none_or(|&last| last <= query_pos).then_some(hidden);
        }
        let visible = |p: i64| p >= first_visible && p <= query_pos;
        let hidden = positions.iter().take_while(|&&p| !visible(p)).count();
        positions[hidden..].iter().all(|&p| visible(p)).then_some(hidden)
    }

    /// Forget every entry at position `end` or later, as if it had never been appended.
    pub fn truncate(&mut self, end: i64) -> Result<()> {
        let keep: Vec<Vec<usize>> =
            self.positions.iter().map(|pos| (0..pos.len()).filter(|&i| pos[i] < end).collect()).collect();
        let before = self.bytes();
        self.keep(&keep)?;
        self.appended_bytes -= before - self.bytes();
        Ok(())
    }

    /// Keep, for every row, the entries at `keep[row]` in every head (same slots in all heads).
    pub fn keep_rows(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        if keep.len() != self.batch {
            return Err(ModelError::input("cache keep_rows: one index list per row expected"));
        }
        if !self.heads_aligned {
            return Err(ModelError::input("cache keep_rows: heads hold different entries; select per head"));
        }
        let per_head: Vec<Vec<usize>> =
            keep.iter().flat_map(|idx| std::iter::repeat_n(idx.clone(), self.kv_heads)).collect();
        self.keep(&per_head)
    }

    /// Move every kept entry of (row, head) to a new position, re-rotating its key by the change
    /// (RoPE rotations compose: R(new) = R(new − old)·R(old)). The StreamingLLM paper's policy:
    /// positions inside the cache become contiguous.
    pub fn reposition(&mut self, new_positions: &[Vec<i64>], rope: &Rope) -> Result<()> {
        if new_positions.len() != self.positions.len()
            || new_positions.iter().zip(&self.positions).any(|(n, o)| n.len() != o.len())
        {
            return Err(ModelError::input("cache reposition: one new position per entry expected"));
        }
        let mut rotated_keys = Vec::with_capacity(self.positions.len());
        let mut values = Vec::with_capacity(self.positions.len());
        for (i, (new, old)) in new_positions.iter().zip(&self.positions).enumerate() {
            let (row, head) = (i / self.kv_heads, i % self.kv_heads);
            let (stored_k, stored_v) = self.head_kv_stored(row, head)?.expect("positions imply entries");
            let k = readable(stored_k.clone())?;
            let delta: Vec<i64> =
                new.iter().zip(old).map(|(&n, &o)| if o == PAD_POSITION { 0 } else { n - o }).collect();
            let (cos, sin) = rotation_by(rope, &delta, k.dtype(), k.device())?;
            let k4 = k.unsqueeze(0)?.unsqueeze(0)?;
            let rotated = rope.apply(&k4, &cos, &sin)?.squeeze(0)?.squeeze(0)?;
            // A q8_0 cache re-encodes the rotated keys; its values stay as they were.
            let rotated = if stored_k.dtype() == DType::U8 { KvDtype::Q8_0.store(&rotated)? } else { rotated };
            rotated_keys.push(rotated);
            values.push(stored_v.contiguous()?);
        }
        let lens: Vec<usize> = self.positions.iter().map(Vec::len).collect();
        self.storage = if lens.iter().all(|&l| l == lens[0]) {
            Storage::Uniform {
                keys: stack_heads(&rotated_keys, self.kv_heads)?,
                values: stack_heads(&values, self.kv_heads)?,
                len: lens[0],
            }
        } else {
            let concat = |t: &[Tensor]| -> Result<Tensor> {
                let used: Vec<&Tensor> = t.iter().filter(|t| t.dim(0).is_ok_and(|n| n > 0)).collect();
                Ok(Tensor::cat(&used, 0)?)
            };
            ragged_of(concat(&rotated_keys)?, concat(&values)?, lens)
        };
        for (pos, new) in self.positions.iter_mut().zip(new_positions) {
            for (p, &n) in pos.iter_mut().zip(new) {
                if *p != PAD_POSITION {
                    *p = n;
                }
            }
        }
        self.ascending = all_ascending(&self.positions);
        Ok(())
    }

    /// Zero, in every entry (row, head) `i = row * kv_heads + head` holds, the key channels
    /// `channels[i]` (ThinK's key-channel pruning). The buffers keep their shape: attention reads
    /// every channel, so nothing is freed. A q8_0 cache re-encodes the masked keys.
    pub fn zero_key_channels(&mut self, channels: &[Vec<usize>]) -> Result<()> {
        if channels.len() != self.positions.len() {
            return Err(ModelError::input("cache zero_key_channels: one channel list per (row, head) expected"));
        }
        let (keys, regions) = match &self.storage {
            Storage::Empty => return Ok(()),
            Storage::Uniform { keys, .. } => (keys, None),
            Storage::Ragged { keys, caps, .. } => (keys, Some(caps)),
        };
        let stored_q8 = keys.dtype() == DType::U8;
        let floats = readable(keys.clone())?;
        let dim = floats.dims().last().copied().unwrap_or(0);
        if channels.iter().flatten().any(|&c| c >= dim) {
            return Err(ModelError::input(format!("cache zero_key_channels: a channel beyond head_dim {dim}")));
        }
        let mut mask = vec![1f32; channels.len() * dim];
        for (i, list) in channels.iter().enumerate() {
            list.iter().for_each(|&c| mask[i * dim + c] = 0.0);
        }
        let mask = match regions {
            // (batch, kv_heads, 1, dim): every slot of a (row, head) alike.
            None => Tensor::from_vec(mask, (self.batch, self.kv_heads, 1, dim), floats.device())?,
            // One mask row per buffer row: region i owns caps[i] rows, one after another.
            Some(caps) => {
                let region_of_row: Vec<u32> =
                    caps.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat_n(i as u32, c)).collect();
                let rows = region_of_row.len();
                let ids = Tensor::from_vec(region_of_row, rows, floats.device())?;
                Tensor::from_vec(mask, (channels.len(), dim), floats.device())?.index_select(&ids, 0)?
            }
        };
        let masked = floats.broadcast_mul(&mask.to_dtype(floats.dtype())?)?;
        let masked = if stored_q8 { KvDtype::Q8_0.store(&masked)? } else { masked };
        match &mut self.storage {
            Storage::Uniform { keys, .. } | Storage::Ragged { keys, .. } => *keys = masked,
            Storage::Empty => unreachable!("returned above"),
        }
        Ok(())
    }

    /// Bytes held by the used entries (keys and values).
    pub fn bytes(&self) -> usize {
        let per_entry = |t: &Tensor| 2 * t.dims().last().copied().unwrap_or(0) * t.dtype().size_in_bytes();
        match &self.storage {
            Storage::Empty => 0,
            Storage::Uniform { keys, len, .. } => self.batch * self.kv_heads * len * per_entry(keys),
            Storage::Ragged { keys, lens, .. } => lens.iter().sum::<usize>() * per_entry(keys),
        }
    }

    /// Bytes the layer would hold had nothing been evicted (every appended entry).
    pub fn uncompressed_bytes(&self) -> usize {
        self.appended_bytes
    }

    /// Bytes allocated, including the spare capacity kept for growth.
    pub fn allocated_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.storage {
            Storage::Empty => 0,
            Storage::Uniform { keys, values, .. } => bytes(keys) + bytes(values),
            Storage::Ragged { keys, values, .. } => bytes(keys) + bytes(values),
        }
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let heads = self.kv_heads;
        self.storage = match &self.storage {
            Storage::Empty => Storage::Empty,
            Storage::Uniform { keys, values, len } => {
                let idx =
                    Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), keys.device())?;
                // The used slots are a strided view of the growth buffer; gather from a compact copy.
                let pick =
                    |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, 0, *len)?.contiguous()?.index_select(&idx, 0)?) };
                Storage::Uniform { keys: pick(keys)?, values: pick(values)?, len: *len }
            }
            Storage::Ragged { keys, values, starts, lens, .. } => {
                // A gather copies, so duplicated rows get regions of their own: appends write in
                // place and rows must not share entries.
                let regions: Vec<usize> = rows.iter().flat_map(|&r| (0..heads).map(move |h| r * heads + h)).collect();
                let ids: Vec<u32> =
                    regions.iter().flat_map(|&i| (starts[i]..starts[i] + lens[i]).map(|j| j as u32)).collect();
                let new_lens = regions.iter().map(|&i| lens[i]).collect();
                ragged_of(gather_rows(keys, &ids)?, gather_rows(values, &ids)?, new_lens)
            }
        };
        self.positions = rows
            .iter()
            .flat_map(|&r| (0..heads).map(move |h| r * heads + h))
            .map(|i| self.positions[i].clone())
            .collect();
        self.appended_bytes = self.appended_bytes / self.batch.max(1) * rows.len();
        self.batch = rows.len();
        Ok(())
    }
}

/// The whole model's cache: one [`LayerKv`] per layer and the next position of every row. What
/// it keeps is decided by the press in the sequence's [`Hooks`](crate::Hooks).
///
/// A model split over threads ([`Model::split`](crate::Model::split)) makes caches of every
/// rank's heads: the layers here hold rank 0's, and the other ranks' parts travel inside
/// ([`KvCache::parts`]); sizes count every part.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    /// The position the next token of each row will take.
    pub(crate) next_position: Vec<i64>,
    /// Ranks 1.. of a split model's cache.
    pub(crate) peers: Vec<KvCache>,
}

impl KvCache {
    /// An empty cache for `batch` rows over layers with the given KV head counts.
    pub fn new(kv_heads_per_layer: &[usize], batch: usize) -> Self {
        KvCache {
            layers: kv_heads_per_layer.iter().map(|&h| LayerKv::new(batch, h)).collect(),
            next_position: vec![0; batch],
            peers: Vec::new(),
        }
    }

    /// Every rank's part of a split model's cache in rank order (this cache alone when the
    /// model runs whole); part r holds rank r's KV heads.
    pub fn parts(&self) -> impl Iterator<Item = &KvCache> {
        std::iter::once(self).chain(&self.peers)
    }

    /// Ok if this cache has a part for each of `ranks` ranks (a model split so made it).
    pub(crate) fn check_parts(&self, ranks: usize) -> Result<()> {
        if self.peers.len() + 1 != ranks {
            return Err(ModelError::input(format!(
                "a cache made for {} rank(s) given to a model split over {ranks} (a model's caches come from its new_cache or prefill)",
                self.peers.len() + 1
            )));
        }
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.next_position.len()
    }

    /// Every layer's keys and values, first layer first.
    pub fn layers(&self) -> &[LayerKv] {
        &self.layers
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    /// One layer to compress outside a forward call (a press that scores after the prefill, as
    /// KVzip does); its own methods keep it consistent.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerKv {
        &mut self.layers[layer]
    }

    /// The position the next token of each row will take.
    pub fn next_positions(&self) -> &[i64] {
        &self.next_position
    }

    /// Bytes of keys and values in use, over all layers (and ranks).
    pub fn bytes(&self) -> usize {
        self.parts().flat_map(|p| &p.layers).map(LayerKv::bytes).sum()
    }

    pub fn allocated_bytes(&self) -> usize {
        self.parts().flat_map(|p| &p.layers).map(LayerKv::allocated_bytes).sum()
    }

    /// Bytes the cache would hold had nothing been evicted.
    pub fn uncompressed_bytes(&self) -> usize {
        self.parts().flat_map(|p| &p.layers).map(LayerKv::uncompressed_bytes).sum()
    }

    /// Entries held, summed over layers, rows and heads (and ranks).
    pub fn total_entries(&self) -> usize {
        self.parts().flat_map(|p| &p.layers).map(|l| l.entry_counts().iter().sum::<usize>()).sum()
    }

    /// The cache of the first `len` positions (a prompt's prefix, to share it): entries at
    /// later positions are forgotten, and the next token takes position `len` (or the row's own
    /// next position, when that comes first).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let end = len as i64;
        for layer in &mut self.layers {
            layer.truncate(end)?;
        }
        for next in &mut self.next_position {
            *next = (*next).min(end);
        }
        for peer in &mut self.peers {
            peer.truncate(len)?;
        }
        Ok(())
    }

    /// Reorder or duplicate batch rows (beam search): row i of the result is row `rows[i]` now.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.iter().any(|&r| r >= self.batch()) {
            return Err(ModelError::input("cache select_rows: row out of range"));
        }
        for layer in &mut self.layers {
            layer.select_rows(rows)?;
        }
        self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
        for peer in &mut self.peers {
            peer.select_rows(rows)?;
        }
        Ok(())
    }
}

/// Additive attention mask in f32 of shape (batch, 1, group·queries, entries): the (queries,
/// entries) mask tiled `group` times, matching scores laid out as (batch, kv_heads, group·queries,
/// entries) so it broadcasts over KV heads. None when every query may see every entry.
///
/// An entry is visible to a query when it is not padding, not in the query's future, and (with a
/// sliding window) fewer than `window` positions back.
pub fn attention_mask(
    query_positions: &[&[i64]],
    entry_positions: &[&[i64]],
    window: Option<usize>,
    group: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let batch = query_positions.len();
    let queries = query_positions.first().map_or(0, |q| q.len());
    let entries = entry_positions.first().map_or(0, |e| e.len());
    let visible = |q: i64, e: i64| e != PAD_POSITION && e <= q && window.is_none_or(|w| q - e < w as i64);
    let all_visible = query_positions
        .iter()
        .zip(entry_positions)
        .all(|(qs, es)| qs.iter().all(|&q| es.iter().all(|&e| visible(q, e))));
    if all_visible {
        return Ok(None);
    }
    let mut mask = Vec::with_capacity(batch * group * queries * entries);
    for (qs, es) in query_positions.iter().zip(entry_positions) {
        let start = mask.len();
        for &q in qs.iter() {
            // f32::MIN rather than -inf: a fully masked (padding) query then gets a uniform
            // distribution instead of NaN, as in HF's eager attention.
            mask.extend(es.iter().map(|&e| if visible(q, e) { 0.0 } else { f32::MIN }));
        }
        let end = mask.len();
        for _ in 1..group {
            mask.extend_from_within(start..end);
        }
    }
    Ok(Some(Tensor::from_vec(mask, (batch, 1, group * queries, entries), device)?))
}

/// Masks are the same for every layer whose entries sit at the same positions: build each once
/// per forward call.
#[derive(Default)]
pub struct MaskCache {
    last: std::cell::RefCell<Option<MaskEntry>>,
}

/// The entry positions and query group a mask was built for, and the mask.
type MaskEntry = (Vec<Vec<i64>>, usize, Option<Tensor>);

impl MaskCache {
    /// Forget the last mask (the entries' positions changed).
    pub fn clear(&self) {
        *self.last.borrow_mut() = None;
    }

    pub fn get(
        &self,
        query_positions: &[&[i64]],
        entry_positions: &[&[i64]],
        window: Option<usize>,
        group: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let mut last = self.last.borrow_mut();
        if let Some((positions, g, mask)) = last.as_ref() {
            if *g == group
                && positions.len() == entry_positions.len()
                && positions.iter().zip(entry_positions).all(|(a, b)| a == b)
            {
                return Ok(mask.clone());
            }
        }
        let mask = attention_mask(query_positions, entry_positions, window, group, device)?;
        *last = Some((entry_positions.iter().map(|p| p.to_vec()).collect(), group, mask.clone()));
        Ok(mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(batch: usize, n: usize, offset: f32) -> Tensor {
        let data: Vec<f32> = (0..batch * 2 * n * 3).map(|i| i as f32 + offset).collect();
        Tensor::from_vec(data, (batch, 2, n, 3), &Device::Cpu).unwrap()
    }

    fn row_head(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn append_grows_in_place_and_keeps_positions() {
        let mut kv = LayerKv::new(2, 2);
        kv.append(&entries(2, 20, 0.0), &entries(2, 20, 0.5), &[(0..20).collect(), (0..20).collect()]).unwrap();
        kv.append(&entries(2, 1, 1000.0), &entries(2, 1, 1000.5), &[vec![20], vec![20]]).unwrap();
        assert_eq!(kv.max_entries(), 21);
        let (k, _) = kv.kv().unwrap().unwrap();
        assert_eq!(k.dims(), &[2, 2, 21, 3]);
        assert_eq!(
            k.get(1).unwrap().get(1).unwrap().get(20).unwrap().to_vec1::<f32>().unwrap(),
            vec![1009.0, 1010.0, 1011.0]
        );
        assert_eq!(kv.positions(1, 1).last(), Some(&20));
        assert_eq!(kv.bytes(), 2 * 2 * 2 * 21 * 3 * 4);
    }

    #[test]
    fn zeroed_key_channels_stay_zero_in_uniform_and_ragged_layers_and_values_are_untouched() {
        let mut kv = LayerKv::new(2, 2);
        kv.append(&entries(2, 4, 1.0), &entries(2, 4, 0.5), &[(0..4).collect(), (0..4).collect()]).unwrap();
        let channels = vec![vec![0], vec![], vec![1, 2], vec![2]];
        let zeroed = |kv: &LayerKv| {
            for (i, list) in channels.iter().enumerate() {
                let (k, v) = kv.head_kv(i / 2, i % 2).unwrap().unwrap();
                for row in row_head(&k) {
                    assert!((0..3).all(|c| (row[c] == 0.0) == list.contains(&c)), "(row, head) {i}: {row:?}");
                }
                assert!(row_head(&v).iter().flatten().all(|&x| x != 0.0));
            }
        };
        let before = kv.bytes();
        kv.zero_key_channels(&channels).unwrap();
        zeroed(&kv);
        assert_eq!(kv.bytes(), before, "nothing is freed");
        // Ragged: heads keep different entries; regions are masked each with its own channels.
        let mut ragged = LayerKv::new(2, 2);
        ragged.append(&entries(2, 4, 1.0), &entries(2, 4, 0.5), &[(0..4).collect(), (0..4).collect()]).unwrap();
        ragged.keep(&[vec![0, 1, 2], vec![1], vec![0, 3], vec![2, 3]]).unwrap();
        ragged.zero_key_channels(&channels).unwrap();
        zeroed(&ragged);
        assert!(ragged.zero_key_channels(&[vec![3], vec![], vec![], vec![]]).is_err());
        assert!(ragged.zero_key_channels(&[vec![0]]).is_err());
    }

    #[test]
    fn keep_per_head_goes_ragged_frees_memory_and_still_appends() {
        let mut kv = LayerKv::new(1, 2);
        kv.append(&entries(1, 8, 0.0), &entries(1, 8, 0.5), &[(0..8).collect()]).unwrap();
        let before = kv.kv().unwrap().unwrap().0;
        kv.keep(&[vec![0, 5, 7], vec![2]]).unwrap();
        assert_eq!(kv.entry_counts(), vec![3, 1]);
        assert!(kv.row_positions().is_none());
        assert_eq!(kv.positions(0, 0), &[0, 5, 7]);
        assert_eq!(kv.positions(0, 1), &[2]);
        assert_eq!(kv.bytes(), (3 + 1) * 2 * 3 * 4);
        assert_eq!(kv.allocated_bytes(), kv.bytes());
        let (k1, _) = kv.head_kv(0, 1).unwrap().unwrap();
        assert_eq!(row_head(&k1)[0], before.get(0).unwrap().get(1).unwrap().get(2).unwrap().to_vec1::<f32>().unwrap());

        kv.append(&entries(1, 1, 100.0), &entries(1, 1, 100.5), &[vec![8]]).unwrap();
        assert_eq!(kv.entry_counts(), vec![4, 2]);
        let (k0, _) = kv.head_kv(0, 0).unwrap().unwrap();
        assert_eq!(row_head(&k0)[3], vec![100.0, 101.0, 102.0]);
        let (k1, _) = kv.head_kv(0, 1).unwrap().unwrap();
        assert_eq!(row_head(&k1)[1], vec![103.0, 104.0, 105.0]);
        assert_eq!(kv.positions(0, 1), &[2, 8]);
        assert!(kv.keep(&[vec![9], vec![0]]).is_err());
    }

    #[test]
    fn keep_rows_and_select_rows_move_entries_with_their_positions() {
        let mut cache = KvCache::new(&[2], 2);
        let layer = &mut cache.layers[0];
        layer.append(&entries(2, 4, 0.0), &entries(2, 4, 0.5), &[vec![0, 1, 2, 3], vec![-1, 0, 1, 2]]).unwrap();
        let before = layer.kv().unwrap().unwrap().0;
        layer.keep_rows(&[vec![0, 3], vec![1, 2]]).unwrap();
        let (k, _) = layer.kv().unwrap().unwrap();
        assert_eq!(layer.row_positions().unwrap(), vec![&[0i64, 3][..], &[0, 1][..]]);
        let row1_head0 =
            |t: &Tensor, i: usize| t.get(1).unwrap().get(0).unwrap().get(i).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row1_head0(&k, 1), row1_head0(&before, 2));
        assert!(layer.keep_rows(&[vec![0], vec![7]]).is_err());

        cache.select_rows(&[1, 1, 0]).unwrap();
        assert_eq!(cache.batch(), 3);
        assert_eq!(cache.layers[0].positions(2, 1), &[0, 3]);
        assert_eq!(cache.layers[0].positions(0, 0), &[0, 1]);
        let (k2, _) = cache.layers[0].kv().unwrap().unwrap();
        assert_eq!(k2.get(0).unwrap().to_vec3::<f32>().unwrap(), k.get(1).unwrap().to_vec3::<f32>().unwrap());
        assert!(cache.select_rows(&[3]).is_err());
    }

    #[test]
    fn ragged_regions_grow_and_take_raw_blocks() {
        // q8_0 caches hold bytes (U8): regions must grow and take new rows whatever the dtype.
        let bytes = |batch: usize, n: usize, offset: u8| {
            let data: Vec<u8> = (0..batch * 2 * n * 3).map(|i| i as u8 + offset).collect();
            Tensor::from_vec(data, (batch, 2, n, 3), &Device::Cpu).unwrap()
        };
        let mut kv = LayerKv::new(1, 2);
        kv.append(&bytes(1, 4, 0), &bytes(1, 4, 100), &[(0..4).collect()]).unwrap();
        kv.keep(&[vec![1, 3], vec![0]]).unwrap();
        for step in 0..20u8 {
            kv.append(&bytes(1, 1, 200 + step), &bytes(1, 1, step), &[vec![4 + step as i64]]).unwrap();
        }
        assert_eq!(kv.entry_counts(), vec![22, 21]);
        let (k0, _) = kv.head_kv_stored(0, 0).unwrap().unwrap();
        let (k1, v1) = kv.head_kv_stored(0, 1).unwrap().unwrap();
        let rows = |t: &Tensor| t.to_vec2::<u8>().unwrap();
        assert_eq!(rows(&k0)[..2], [vec![3, 4, 5], vec![9, 10, 11]]);
        assert_eq!(rows(&k0)[21], vec![219, 220, 221]);
        assert_eq!(rows(&k1)[0], vec![12, 13, 14]);
        assert_eq!(rows(&k1)[20], vec![222, 223, 224]);
        assert_eq!(rows(&v1)[20], vec![22, 23, 24]);
        assert!(kv.allocated_bytes() >= kv.bytes());
    }

    #[test]
    fn what_a_query_cannot_see_is_a_prefix_found_with_or_without_order() {
        let mut kv = LayerKv::new(1, 2);
        kv.append(&entries(1, 6, 0.0), &entries(1, 6, 0.5), &[vec![-1, -1, 0, 1, 2, 3]]).unwrap();
        assert_eq!(kv.hidden_prefix(0, 0, 3, None), Some(2));
        assert_eq!(kv.hidden_prefix(0, 1, 3, Some(2)), Some(4));
        assert_eq!(kv.hidden_prefix(0, 0, 2, None), None, "position 3 is in the query's future");
        // Appending nothing keeps the order known.
        kv.append(&entries(1, 0, 0.0), &entries(1, 0, 0.5), &[vec![]]).unwrap();
        assert!(kv.ascending);
        // A keep that reorders entries: the same answers by a scan.
        kv.keep(&[vec![0, 3, 5, 2], vec![1, 3]]).unwrap();
        assert!(!kv.ascending);
        assert_eq!(kv.hidden_prefix(0, 0, 3, None), Some(1));
        assert_eq!(kv.hidden_prefix(0, 0, 3, Some(2)), None, "position 0 hides between visible ones");
        assert_eq!(kv.hidden_prefix(0, 1, 9, None), Some(1));
    }

    #[test]
    fn ragged_rows_are_copied_when_duplicated() {
        let mut cache = KvCache::new(&[2], 1);
        cache.layers[0].append(&entries(1, 4, 0.0), &entries(1, 4, 0.5), &[(0..4).collect()]).unwrap();
        cache.layers[0].keep(&[vec![0, 1, 2], vec![3]]).unwrap();
        cache.select_rows(&[0, 0]).unwrap();
        cache.layers[0].append(&entries(2, 1, 50.0), &entries(2, 1, 50.5), &[vec![4], vec![4]]).unwrap();
        let (a, _) = cache.layers[0].head_kv(0, 0).unwrap().unwrap();
        let (b, _) = cache.layers[0].head_kv(1, 0).unwrap().unwrap();
        // Row 1 got different new entries than row 0: the rows do not share a buffer.
        assert_ne!(row_head(&a)[3], row_head(&b)[3]);
        assert_eq!(row_head(&a)[..3], row_head(&b)[..3]);
    }
}
