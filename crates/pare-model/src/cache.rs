//! The KV cache: per layer, post-RoPE keys and values plus each entry's original position.
//!
//! Keys are cached after RoPE, so an entry's position is baked into its key; the cache keeps the
//! position explicitly too, because masking is decided by positions (causal, sliding window,
//! padding) rather than by slot index. That is what lets later stages evict or prune entries
//! without breaking attention. Storage grows by doubling and new entries are written in place.

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// Position of a padding slot: never attended to.
pub const PAD_POSITION: i64 = -1;

#[derive(Debug)]
pub struct LayerKv {
    /// (batch, kv_heads, capacity, head_dim) buffers; the first `len` slots are used.
    keys: Option<Tensor>,
    values: Option<Tensor>,
    len: usize,
    /// positions[b][i]: original position of entry i of row b, or PAD_POSITION.
    pub positions: Vec<Vec<i64>>,
}

/// A deep copy: new entries are written in place, so a clone must never share buffers.
impl Clone for LayerKv {
    fn clone(&self) -> Self {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy().expect("copying a cache buffer"));
        LayerKv { keys: copy(&self.keys), values: copy(&self.values), len: self.len, positions: self.positions.clone() }
    }
}

impl LayerKv {
    fn new(batch: usize) -> Self {
        LayerKv { keys: None, values: None, len: 0, positions: vec![Vec::new(); batch] }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The used part of the cache: keys and values of shape (batch, kv_heads, len, head_dim).
    pub fn kv(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) => Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))),
            _ => Ok(None),
        }
    }

    /// Append new entries (batch, kv_heads, n, head_dim) with their positions (batch × n).
    pub fn append(&mut self, k: &Tensor, v: &Tensor, positions: &[Vec<i64>]) -> Result<()> {
        let (batch, heads, n, dim) = k.dims4()?;
        if positions.len() != batch || positions.iter().any(|p| p.len() != n) {
            return Err(ModelError::input("cache append: positions do not match the new entries"));
        }
        let needed = self.len + n;
        let capacity = self.keys.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        if needed > capacity {
            let new_capacity = needed.max(capacity * 2).max(16);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((batch, heads, new_capacity, dim), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            self.keys = Some(grow(&self.keys)?);
            self.values = Some(grow(&self.values)?);
        }
        let (keys, values) = (self.keys.as_ref().expect("allocated"), self.values.as_ref().expect("allocated"));
        keys.slice_set(&k.contiguous()?, 2, self.len)?;
        values.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        for (row, new) in self.positions.iter_mut().zip(positions) {
            row.extend_from_slice(new);
        }
        Ok(())
    }

    /// Keep, for every row, the entries at `keep[b]` (same count for every row), in that order.
    pub fn retain(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        let Some((k, v)) = self.kv()? else { return Ok(()) };
        let n = keep.first().map_or(0, Vec::len);
        if keep.len() != self.positions.len() || keep.iter().any(|r| r.len() != n || r.iter().any(|&i| i >= self.len)) {
            return Err(ModelError::input("cache retain: bad entry indices"));
        }
        let device = k.device().clone();
        let gather = |t: &Tensor| -> Result<Tensor> {
            let rows = keep
                .iter()
                .enumerate()
                .map(|(b, idx)| {
                    let idx = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &device)?;
                    Ok(t.get(b)?.index_select(&idx, 1)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?.contiguous()?)
        };
        self.keys = Some(gather(&k)?);
        self.values = Some(gather(&v)?);
        self.len = n;
        for (row, idx) in self.positions.iter_mut().zip(keep) {
            *row = idx.iter().map(|&i| row[i]).collect();
        }
        Ok(())
    }

    /// Bytes held by the used entries (keys and values).
    pub fn bytes(&self) -> usize {
        match &self.keys {
            Some(k) => {
                let (b, h, _, d) = k.dims4().unwrap_or((0, 0, 0, 0));
                2 * b * h * self.len * d * k.dtype().size_in_bytes()
            }
            None => 0,
        }
    }

    /// Bytes allocated, including the spare capacity kept for growth.
    pub fn allocated_bytes(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| 2 * k.elem_count() * k.dtype().size_in_bytes())
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some((k, v)) = self.kv()? {
            let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), k.device())?;
            // The used slots are a strided view of the growth buffer; gather from a compact copy.
            self.keys = Some(k.contiguous()?.index_select(&idx, 0)?);
            self.values = Some(v.contiguous()?.index_select(&idx, 0)?);
        }
        self.positions = rows.iter().map(|&r| self.positions[r].clone()).collect();
        Ok(())
    }
}

/// The whole model's cache: one [`LayerKv`] per layer and the next position of every row.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// The position the next token of each row will take.
    pub next_position: Vec<i64>,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| LayerKv::new(batch)).collect(), next_position: vec![0; batch] }
    }

    pub fn batch(&self) -> usize {
        self.next_position.len()
    }

    /// Bytes of keys and values in use, over all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::allocated_bytes).sum()
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
        Ok(())
    }
}

/// Additive attention mask in f32 of shape (batch, 1, group·queries, entries): the (queries,
/// entries) mask tiled `group` times, matching scores laid out as (batch, kv_heads, group·queries,
/// entries) so it broadcasts over KV heads only. None when every query may see every entry.
///
/// An entry is visible to a query when it is not padding, not in the query's future, and (with a
/// sliding window) fewer than `window` positions back.
pub fn attention_mask(
    query_positions: &[Vec<i64>],
    entry_positions: &[Vec<i64>],
    window: Option<usize>,
    group: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let batch = query_positions.len();
    let queries = query_positions.first().map_or(0, Vec::len);
    let entries = entry_positions.first().map_or(0, Vec::len);
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
        for &q in qs {
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
    last: std::cell::RefCell<Option<(Vec<Vec<i64>>, usize, Option<Tensor>)>>,
}

impl MaskCache {
    pub fn get(
        &self,
        query_positions: &[Vec<i64>],
        entry_positions: &[Vec<i64>],
        window: Option<usize>,
        group: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let mut last = self.last.borrow_mut();
        if let Some((positions, g, mask)) = last.as_ref() {
            if *g == group && positions.as_slice() == entry_positions {
                return Ok(mask.clone());
            }
        }
        let mask = attention_mask(query_positions, entry_positions, window, group, device)?;
        *last = Some((entry_positions.to_vec(), group, mask.clone()));
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

    #[test]
    fn append_grows_in_place_and_keeps_positions() {
        let mut kv = LayerKv::new(2);
        kv.append(&entries(2, 20, 0.0), &entries(2, 20, 0.5), &[(0..20).collect(), (0..20).collect()]).unwrap();
        kv.append(&entries(2, 1, 1000.0), &entries(2, 1, 1000.5), &[vec![20], vec![20]]).unwrap();
        assert_eq!(kv.len(), 21);
        let (k, _) = kv.kv().unwrap().unwrap();
        assert_eq!(k.dims(), &[2, 2, 21, 3]);
        assert_eq!(k.get(1).unwrap().get(1).unwrap().get(20).unwrap().to_vec1::<f32>().unwrap(), vec![1009.0, 1010.0, 1011.0]);
        assert_eq!(kv.positions[1].last(), Some(&20));
        assert_eq!(kv.bytes(), 2 * 2 * 2 * 21 * 3 * 4);
    }

    #[test]
    fn retain_and_select_rows_move_entries_with_their_positions() {
        let mut cache = KvCache::new(1, 2);
        let layer = &mut cache.layers[0];
        layer.append(&entries(2, 4, 0.0), &entries(2, 4, 0.5), &[vec![0, 1, 2, 3], vec![-1, 0, 1, 2]]).unwrap();
        let before = layer.kv().unwrap().unwrap().0;
        layer.retain(&[vec![0, 3], vec![1, 2]]).unwrap();
        let (k, _) = layer.kv().unwrap().unwrap();
        assert_eq!(layer.positions, vec![vec![0, 3], vec![0, 1]]);
        let row1_head0 = |t: &Tensor, i: usize| t.get(1).unwrap().get(0).unwrap().get(i).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row1_head0(&k, 1), row1_head0(&before, 2));
        assert!(layer.retain(&[vec![0], vec![7]]).is_err());

        cache.select_rows(&[1, 1, 0]).unwrap();
        assert_eq!(cache.batch(), 3);
        assert_eq!(cache.layers[0].positions, vec![vec![0, 1], vec![0, 1], vec![0, 3]]);
        let (k2, _) = cache.layers[0].kv().unwrap().unwrap();
        assert_eq!(k2.get(0).unwrap().to_vec3::<f32>().unwrap(), k.get(1).unwrap().to_vec3::<f32>().unwrap());
        assert!(cache.select_rows(&[3]).is_err());
    }
}
