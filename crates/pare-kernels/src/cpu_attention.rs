//! Attention on the CPU, multi-threaded on the one pool ([`crate::threads`]).
//!
//! Decode reads each kept entry once for all the query heads that share its KV head, and splits
//! the work over (row, KV head, block of entries) so that three KV heads at batch 1 still keep
//! every thread busy; its cost follows the entries a press kept, whether the cache is uniform or
//! ragged per head. Prefill is flash-style: queries in tiles against key tiles with an online
//! softmax, tiles wholly in a query tile's future (or out of its window) skipped, nothing larger
//! than one tile of scores ever held. Keys and values are read in their stored dtype (f32, f16,
//! bf16) and widened a tile at a time. [`crate::cpu`] holds the plain references these are tested
//! against.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Entries per decode work item at least (a smaller block costs more in merging than it saves).
const DECODE_BLOCK: usize = 128;
/// Multiply-adds below which a decode runs on the calling thread.
const SERIAL_WORK: usize = 1 << 16;
/// Queries per prefill tile (times the query heads sharing a KV head: the tile's score rows).
const QUERY_TILE: usize = 32;
/// Entries per key tile (prefill), and per widening of a narrower cache (both).
const KEY_TILE: usize = 128;

/// One (row, KV head)'s keys or values as stored: `len` entries of `d`, rows contiguous.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// GGUF Q8_0 blocks, `d / 32` of them per entry (a q8_0 cache).
    Q8(&'a [u8]),
}

impl<'a> Rows<'a> {
    /// Entries `start..start + n`: the stored slice itself for f32, else widened into `buf`.
    fn tile<'b>(self, start: usize, n: usize, d: usize, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Rows::F32(s) => &s[start * d..(start + n) * d],
            _ => {
                self.widen(start, d, &mut buf[..n * d]);
                &buf[..n * d]
            }
        }
    }

    /// Entries `start..start + out.len() / d` widened to f32 into `out`.
    fn widen(self, start: usize, d: usize, out: &mut [f32]) {
        let range = start * d..start * d + out.len();
        match self {
            Rows::F32(s) => out.copy_from_slice(&s[range]),
            Rows::F16(s) => widen_f16(&s[range], out),
            Rows::BF16(s) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&s[range], out),
            Rows::Q8(s) => {
                let width = crate::kv_row_width(d, DType::U8);
                crate::quant::decode_q8_0(&s[start * width..start * width + out.len() / d * width], out)
            }
        }
    }
}

/// f16 → f32, eight at a time with F16C where the CPU has it (the `half` crate's slice conversion
/// took as long as the decode's dot products it fed).
fn widen_f16(src: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: has_fma() saw AVX2, FMA and F16C.
        return unsafe { widen_f16_f16c(src, out) };
    }
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16_f16c(src: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let whole = src.len() / 8 * 8;
    let (out, out_tail) = out.split_at_mut(whole);
    for (s, o) in src.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast())));
    }
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(&src[whole..], out_tail)
}

/// A tensor's CPU storage held for reading, and its layout.
struct Held<'a> {
    storage: Box<dyn std::ops::Deref<Target = Storage> + Sync + 'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        if !matches!(&*storage, Storage::Cpu(_)) {
            candle_core::bail!("CPU attention: a tensor on {:?}", t.device());
        }
        Ok(Held { storage: Box::new(storage), layout })
    }

    /// `len` entries of `width` stored elements each, starting at element `offset` (relative to
    /// the layout's start).
    fn rows(&self, offset: usize, len: usize, width: usize) -> Result<Rows<'_>> {
        let start = self.layout.start_offset() + offset;
        let range = start..start + len * width;
        let Storage::Cpu(cpu) = &**self.storage else { unreachable!("checked in Held::new") };
        Ok(match cpu {
            CpuStorage::F32(s) => Rows::F32(&s[range]),
            CpuStorage::F16(s) => Rows::F16(&s[range]),
            CpuStorage::BF16(s) => Rows::BF16(&s[range]),
            CpuStorage::U8(s) => Rows::Q8(&s[range]),
            _ => candle_core::bail!("CPU attention: keys and values must be f32, f16, bf16 or q8_0"),
        })
    }
}

/// A 2-D (entries, width) tensor whose rows are contiguous, as a cache head view is.
fn check_rows(t: &Tensor, width: usize) -> Result<()> {
    let stride = t.layout().stride();
    if t.rank() != 2 || t.dim(1)? != width || (t.dim(0)? > 1 && stride[0] != width) || stride[1] != 1 {
        candle_core::bail!("CPU attention: keys {:?} (strides {stride:?}) are not rows of {width}", t.dims());
    }
    Ok(())
}

/// Queries as f32 on the host, multiplied by `scale` (so scores need no second multiply).
fn scaled_queries(q: &Tensor, scale: f32) -> Result<Vec<f32>> {
    let q: Vec<f32> = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(q.into_iter().map(|x| x * scale).collect())
}

/// `e^x` in f32 within 2 ulp, exactly 0 below -87 (masked scores), written with arithmetic and
/// bit operations only so loops over it vectorize (libm's expf does not, and a prefill takes
/// one per score).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits
    // (no floor or round call, which would not vectorize without SSE4.1).
    const SHIFT: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let t = clamped * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // Cephes' expf polynomial on |r| ≤ ln2/2.
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let exponent = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32 + 127;
    let scaled = y * f32::from_bits((exponent as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        scaled
    }
}

/// Multiply-add: fused where the CPU has FMA (the kernels are compiled twice: with FMA, called after [`has_fma`], and without).
trait Madd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}
struct Fused;
struct Plain;
impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
impl Madd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[inline(always)]
fn dot<M: Madd>(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums: a vector register's worth, so the loop vectorizes.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] = M::madd(x[i], y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy<M: Madd>(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = M::madd(a, *x, *y);
    }
}

/// A softmax over part of a row's entries, not yet normalized: max score, Σ e^(s - max), and
/// Σ e^(s - max)·v per query head.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// One decode work item: `group` query heads (`queries`, group × d, scaled) over entries
/// `start..end` of one (row, KV head).
#[inline(always)]
fn decode_block<M: Madd>(queries: &[f32], keys: Rows, values: Rows, start: usize, end: usize, d: usize) -> Partial {
    let group = queries.len() / d;
    let n = end - start;
    let mut buf = vec![0f32; KEY_TILE * d];
    let mut scores = vec![0f32; group * n];
    for tile in (start..end).step_by(KEY_TILE) {
        let rows = KEY_TILE.min(end - tile);
        for (e, k) in keys.tile(tile, rows, d, &mut buf).chunks_exact(d).enumerate() {
            for (g, q) in queries.chunks_exact(d).enumerate() {
                scores[g * n + tile - start + e] = dot::<M>(q, k);
            }
        }
    }
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut sum = vec![0f32; group];
    for g in 0..group {
        let row = &mut scores[g * n..(g + 1) * n];
        max[g] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in row.iter_mut() {
            *s = exp(*s - max[g]);
        }
        sum[g] = row.iter().sum();
    }
    let mut acc = vec![0f32; group * d];
    for tile in (start..end).step_by(KEY_TILE) {
        let rows = KEY_TILE.min(end - tile);
        for (e, v) in values.tile(tile, rows, d, &mut buf).chunks_exact(d).enumerate() {
            for (g, out) in acc.chunks_exact_mut(d).enumerate() {
                axpy::<M>(scores[g * n + tile - start + e], v, out);
            }
        }
    }
    Partial { max, sum, acc }
}

/// softmax(q·kᵀ)·v for one (row, KV head) from its blocks' partial softmaxes.
fn merge(parts: &[Partial], out: &mut [f32], d: usize) {
    for (g, out) in out.chunks_exact_mut(d).enumerate() {
        let max = parts.iter().map(|p| p.max[g]).fold(f32::NEG_INFINITY, f32::max);
        out.fill(0.0);
        if max == f32::NEG_INFINITY {
            continue; // nothing visible: zeros
        }
        let mut total = 0f32;
        for p in parts {
            let w = (p.max[g] - max).exp();
            total += w * p.sum[g];
            axpy::<Plain>(w, &p.acc[g * d..(g + 1) * d], out);
        }
        out.iter_mut().for_each(|o| *o /= total);
    }
}

/// One (row, KV head) of the decode: its cache and the entries it skips.
struct DecodeHead<'a> {
    keys: Rows<'a>,
    values: Rows<'a>,
    skip: usize,
    len: usize,
    /// Blocks its entries are split into: chosen per cache of the call, so a cache's result
    /// does not depend on the other caches it is decoded with.
    splits: usize,
}

/// Blocks per (row, KV head) of a cache of `heads` (row, KV head) parts: enough work items for
/// every thread when it is decoded alone.
fn splits_for(heads: usize) -> usize {
    (4 * crate::threads::current()).div_ceil(heads.max(1)).max(1)
}

/// The decode over per-(row, KV head) caches; `queries` (batch, heads, d) scaled.
fn decode(queries: &[f32], heads_of: &[DecodeHead], batch: usize, heads: usize, d: usize) -> Vec<f32> {
    let kv_heads = heads_of.len() / batch;
    let group = heads / kv_heads;
    let mut items = Vec::new();
    for (i, head) in heads_of.iter().enumerate() {
        let n = head.len - head.skip;
        let block = n.div_ceil(head.splits).max(DECODE_BLOCK);
        let mut start = head.skip;
        while start < head.len {
            items.push((i, start, (start + block).min(head.len)));
            start += block;
        }
    }
    let fused = has_fma();
    let work = |&(i, start, end): &(usize, usize, usize)| {
        let (row, kvh) = (i / kv_heads, i % kv_heads);
        let q = &queries[(row * heads + kvh * group) * d..][..group * d];
        let head = &heads_of[i];
        (i, decode_block_any(fused, q, head.keys, head.values, start, end, d))
    };
    // A short cache is read faster than the pool's threads wake up for it.
    let entries: usize = heads_of.iter().map(|h| h.len - h.skip).sum();
    let parts: Vec<(usize, Partial)> = if entries * group * d < SERIAL_WORK {
        items.iter().map(work).collect()
    } else {
        crate::threads::map(items.len(), |i| work(&items[i]))
    };
    let mut out = vec![0f32; batch * heads * d];
    let mut parts = parts.into_iter().peekable();
    for (i, out) in out.chunks_exact_mut(group * d).enumerate() {
        let mut mine = Vec::new();
        while let Some((_, p)) = parts.next_if(|(j, _)| *j == i) {
            mine.push(p);
        }
        merge(&mine, out, d);
    }
    out
}

/// Whether this CPU runs the FMA build of the kernels: the same check the quantized kernels make
/// (AVX2, FMA and F16C; an AVX-512 CPU has them too).
fn has_fma() -> bool {
    crate::quant::Kernel::detect() >= crate::quant::Kernel::Avx2
}

fn decode_block_any(fused: bool, q: &[f32], keys: Rows, values: Rows, start: usize, end: usize, d: usize) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if fused {
        // SAFETY: `fused` is true only when the CPU reports AVX2, FMA and F16C.
        return unsafe { decode_block_avx2(q, keys, values, start, end, d) };
    }
    let _ = fused;
    decode_block::<Plain>(q, keys, values, start, end, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_block_avx2(q: &[f32], keys: Rows, values: Rows, start: usize, end: usize, d: usize) -> Partial {
    decode_block::<Fused>(q, keys, values, start, end, d)
}

/// Per-(row, KV head) element offsets of a (batch, kv_heads, entries, d) tensor with contiguous rows.
fn head_offsets(t: &Tensor) -> Result<Vec<usize>> {
    let (batch, kv_heads, len, d) = t.dims4()?;
    let stride = t.layout().stride();
    if stride[3] != 1 || (len > 1 && stride[2] != d) {
        candle_core::bail!("CPU attention: keys {:?} (strides {stride:?}) are not rows of {d}", t.dims());
    }
    Ok((0..batch * kv_heads).map(|i| (i / kv_heads) * stride[0] + (i % kv_heads) * stride[1]).collect())
}

fn hold<'a>(tensors: Vec<&'a Tensor>) -> Result<Vec<Held<'a>>> {
    tensors.into_iter().map(Held::new).collect()
}

/// [`crate::attention_decode_caches`] on the CPU: every cache's (row, KV head) parts in one pass.
pub fn attention_decode_caches(q: &Tensor, caches: &[crate::DecodeKv], scale: f32) -> Result<Tensor> {
    use crate::DecodeKv;
    let (batch, heads, d) = q.dims3()?;
    let queries = scaled_queries(q, scale)?;
    // Every tensor's storage is held for the whole call; the heads below borrow from it.
    let mut held: Vec<(Vec<Held>, Vec<Held>)> = Vec::with_capacity(caches.len());
    for cache in caches {
        let (keys, values): (Vec<&Tensor>, Vec<&Tensor>) = match cache {
            DecodeKv::Uniform { keys, values, .. } => (vec![*keys], vec![*values]),
            DecodeKv::Heads { keys, values, .. } => {
                for t in keys.iter().chain(values.iter()) {
                    check_rows(t, crate::kv_row_width(d, t.dtype()))?;
                }
                (keys.iter().collect(), values.iter().collect())
            }
        };
        held.push((hold(keys)?, hold(values)?));
    }
    let mut heads_of = Vec::with_capacity(batch * 8);
    for (cache, (hk, hv)) in caches.iter().zip(&held) {
        match cache {
            DecodeKv::Uniform { keys, values, skip } => {
                let (rows, kv_heads, len, width) = keys.dims4()?;
                let (key_offsets, value_offsets) = (head_offsets(keys)?, head_offsets(values)?);
                let splits = splits_for(rows * kv_heads);
                for i in 0..rows * kv_heads {
                    heads_of.push(DecodeHead {
                        keys: hk[0].rows(key_offsets[i], len, width)?,
                        values: hv[0].rows(value_offsets[i], len, width)?,
                        skip: skip[i / kv_heads],
                        len,
                        splits,
                    });
                }
            }
            DecodeKv::Heads { keys, skip, .. } => {
                let splits = splits_for(keys.len());
                for (i, t) in keys.iter().enumerate() {
                    let len = t.dim(0)?;
                    let width = crate::kv_row_width(d, t.dtype());
                    heads_of.push(DecodeHead {
                        keys: hk[i].rows(0, len, width)?,
                        values: hv[i].rows(0, len, width)?,
                        skip: skip[i],
                        len,
                        splits,
                    });
                }
            }
        }
    }
    let out = decode(&queries, &heads_of, batch, heads, d);
    Tensor::from_vec(out, (batch, heads, d), &Device::Cpu)?.to_dtype(q.dtype())
}

/// Which entries of a key tile a query tile sees.
#[derive(Clone, Copy, PartialEq)]
enum Seen {
    None,
    All,
    Some,
}

fn visible(query: i64, entry: i64, window: Option<usize>) -> bool {
    entry >= 0 && entry <= query && window.is_none_or(|w| query - entry < w as i64)
}

/// Classify a (query tile, key tile) pair from the extreme positions alone.
fn seen(queries: &[i64], entries: &[i64], window: Option<usize>) -> Seen {
    let (q_min, q_max) = (queries.iter().copied().min().unwrap_or(-1), queries.iter().copied().max().unwrap_or(-1));
    let real = entries.iter().copied().filter(|&p| p >= 0);
    let (e_min, e_max) = (real.clone().min(), real.max());
    let (Some(e_min), Some(e_max)) = (e_min, e_max) else { return Seen::None };
    if e_min > q_max || window.is_some_and(|w| q_min - e_max >= w as i64) {
        return Seen::None;
    }
    let padded = entries.iter().any(|&p| p < 0);
    if !padded && q_min >= 0 && e_max <= q_min && window.is_none_or(|w| q_max - e_min < w as i64) {
        return Seen::All;
    }
    Seen::Some
}

/// `dst (m × n) = keep·dst + a (m × k) · b (k × n)`, row-major except where strides say otherwise
/// (`b_row`, `b_col`: how far one step down a row or across a column of `b` moves), on the calling
/// thread: gemm's microkernels, the same candle's matmul runs on.
#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    keep: bool,
    a: &[f32],
    b: &[f32],
    b_row: isize,
    b_col: isize,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k, "product: shapes");
    let reach = (k.max(1) - 1) as isize * b_row + (n.max(1) - 1) as isize * b_col;
    assert!(b.len() as isize > reach, "product: b too short");
    // SAFETY: the asserts bound every element the strides reach; dst does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            keep,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_col,
            b_row,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// One (row, KV head)'s cache as a prefill tile reads it.
#[derive(Clone, Copy)]
struct HeadCache<'a> {
    keys: Rows<'a>,
    values: Rows<'a>,
    positions: &'a [i64],
    window: Option<usize>,
    d: usize,
}

/// One prefill tile: `group` heads × the queries `q_positions` (rows of `queries`, head-major:
/// row g·tq + t) over all key tiles of one (row, KV head). Writes normalized outputs into `out`.
/// The products run in gemm; what is between them (masks, the online softmax) vectorizes, and
/// is compiled for AVX2 as well ([`prefill_tile_avx2`]).
#[inline(always)]
fn prefill_tile(queries: &[f32], q_positions: &[i64], cache: HeadCache, out: &mut [f32]) {
    let HeadCache { keys, values, positions: e_positions, window, d } = cache;
    let tq = q_positions.len();
    let rows = queries.len() / d;
    let (mut key_buf, mut value_buf) = (vec![0f32; KEY_TILE * d], vec![0f32; KEY_TILE * d]);
    let mut scores = vec![0f32; rows * KEY_TILE];
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    out.fill(0.0);
    for tile in (0..e_positions.len()).step_by(KEY_TILE) {
        let n = KEY_TILE.min(e_positions.len() - tile);
        let positions = &e_positions[tile..tile + n];
        let seen = seen(q_positions, positions, window);
        if seen == Seen::None {
            continue;
        }
        // f32 caches are read in place; narrower ones are widened a tile at a time.
        let k = keys.tile(tile, n, d, &mut key_buf);
        let scores = &mut scores[..rows * n];
        product(rows, n, d, scores, false, queries, k, 1, d as isize);
        for (r, s) in scores.chunks_exact_mut(n).enumerate() {
            if seen == Seen::Some {
                let query = q_positions[r % tq];
                for (s, &p) in s.iter_mut().zip(positions) {
                    if !visible(query, p, window) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
            let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[r].max(tile_max);
            if new_max == f32::NEG_INFINITY {
                s.fill(0.0); // nothing seen yet: this row's weights are all zero
                continue;
            }
            let rescale = exp(max[r] - new_max);
            if rescale != 1.0 {
                out[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= rescale);
            }
            s.iter_mut().for_each(|x| *x = exp(*x - new_max));
            sum[r] = sum[r] * rescale + s.iter().sum::<f32>();
            max[r] = new_max;
        }
        let v = values.tile(tile, n, d, &mut value_buf);
        product(rows, d, n, out, true, scores, v, d as isize, 1);
    }
    for (o, &total) in out.chunks_exact_mut(d).zip(&sum) {
        if total > 0.0 {
            o.iter_mut().for_each(|x| *x /= total);
        }
    }
}

fn prefill_tile_any(fused: bool, queries: &[f32], q_positions: &[i64], cache: HeadCache, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if fused {
        // SAFETY: `fused` is true only when the CPU reports AVX2, FMA and F16C.
        return unsafe { prefill_tile_avx2(queries, q_positions, cache, out) };
    }
    let _ = fused;
    prefill_tile(queries, q_positions, cache, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn prefill_tile_avx2(queries: &[f32], q_positions: &[i64], cache: HeadCache, out: &mut [f32]) {
    prefill_tile(queries, q_positions, cache, out)
}

/// [`crate::attention_prefill`] on the CPU.
pub fn attention_prefill(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    query_positions: &[&[i64]],
    entry_positions: &[&[i64]],
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let (batch, heads, sq, d) = q.dims4()?;
    let (_, kv_heads, n, width) = keys.dims4()?;
    let group = heads / kv_heads;
    let queries = scaled_queries(q, scale)?;
    let (key_offsets, value_offsets) = (head_offsets(keys)?, head_offsets(values)?);
    let (held_keys, held_values) = (Held::new(keys)?, Held::new(values)?);
    let tiles = sq.div_ceil(QUERY_TILE);
    let items: Vec<(usize, usize)> = (0..batch * kv_heads).flat_map(|i| (0..tiles).map(move |t| (i, t))).collect();
    let fused = has_fma();
    let results = items
        .par_iter()
        .map(|&(i, tile)| {
            let (row, kvh) = (i / kv_heads, i % kv_heads);
            let (t0, tq) = (tile * QUERY_TILE, QUERY_TILE.min(sq - tile * QUERY_TILE));
            // Rows head-major: the group's heads, each with the tile's queries.
            let mut tile_queries = Vec::with_capacity(group * tq * d);
            for g in 0..group {
                let h = kvh * group + g;
                tile_queries.extend_from_slice(&queries[((row * heads + h) * sq + t0) * d..][..tq * d]);
            }
            let cache = HeadCache {
                keys: held_keys.rows(key_offsets[i], n, width)?,
                values: held_values.rows(value_offsets[i], n, width)?,
                positions: entry_positions[row],
                window,
                d,
            };
            let mut out = vec![0f32; group * tq * d];
            prefill_tile_any(fused, &tile_queries, &query_positions[row][t0..t0 + tq], cache, &mut out);
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = vec![0f32; batch * heads * sq * d];
    for (&(i, tile), tile_out) in items.iter().zip(&results) {
        let (row, kvh) = (i / kv_heads, i % kv_heads);
        let (t0, tq) = (tile * QUERY_TILE, QUERY_TILE.min(sq - tile * QUERY_TILE));
        for g in 0..group {
            let h = kvh * group + g;
            out[((row * heads + h) * sq + t0) * d..][..tq * d].copy_from_slice(&tile_out[g * tq * d..][..tq * d]);
        }
    }
    Tensor::from_vec(out, (batch, heads, sq, d), &Device::Cpu)?.to_dtype(q.dtype())
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_within_two_ulp_and_exactly_zero_when_masked() {
        for i in -86_990..88_000 {
            let x = i as f32 * 1e-3;
            let (ours, libm) = (exp(x), x.exp());
            assert!((ours - libm).abs() <= 2.0 * f32::EPSILON * libm, "e^{x}: {ours} vs {libm}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }
}
