//! pare's fused kernels, for the GPU path where candle's op-by-op execution is slow.
//!
//! Each function runs a CUDA kernel (kernels/pare.cu, built under the `cuda` feature) when its
//! inputs are on a CUDA device, and its CPU reference ([`cpu`]) otherwise. The references define
//! what the kernels compute, in f32 with values rounded to the tensor dtype where HF transformers
//! rounds them; tests/gpu.rs checks every kernel against its reference on the GPU machine.
//! pare-model keeps its own exact CPU paths and calls these only on CUDA.

use candle_core::{Result, Tensor};

pub mod cpu;
mod cpu_attention;
#[cfg(feature = "cuda")]
mod cuda;
pub mod quant;
pub mod threads;
#[cfg(feature = "cuda")]
pub use cuda::memory_bandwidth;

/// GPU memory in bytes: in use on the device (all processes), its size, and the most this process
/// held in tensors since the last [`reset_gpu_memory_peak`] (the stream-ordered pool's high mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    pub used: u64,
    pub total: u64,
    pub peak: u64,
}

/// Memory figures of a CUDA device; None on other devices, in builds without CUDA, or if the
/// driver will not say.
pub fn gpu_memory(device: &candle_core::Device) -> Option<GpuMemory> {
    #[cfg(feature = "cuda")]
    return cuda::gpu_memory(device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Start a new GPU peak-memory measurement (the high mark drops to what is in use now); nothing
/// to do off CUDA.
pub fn reset_gpu_memory_peak(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    cuda::reset_gpu_memory_peak(device);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// RMSNorm over the last dim, as HF's LlamaRMSNorm: `w * T(x * rsqrt(mean(x²) + eps))`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return Ok(cuda::rms_norm(x, None, weight, eps)?.1);
    }
    Ok(cpu::rms_norm(x, None, weight, eps)?.1)
}

/// A residual add then RMSNorm in one pass: returns `(h, rms_norm(h))` with `h = T(x + residual)`.
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::rms_norm(x, Some(residual), weight, eps);
    }
    cpu::rms_norm(x, Some(residual), weight, eps)
}

/// SwiGLU gate: `T(T(silu(gate)) * up)`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return cuda::swiglu(gate, up);
    }
    cpu::swiglu(gate, up)
}

/// RoPE fused with the head split. `x` is a projection's output (batch, seq, ≥ heads·head_dim)
/// whose first heads·head_dim channels are the heads (rows may be a strided slice of a wider,
/// fused projection); `cos`/`sin` are (batch, seq, rot/2) in x's dtype. Returns (batch, heads,
/// seq, head_dim) with HF's rotate_half applied to the first `rot = 2·cos.dim(2)` channels.
pub fn rope_split_heads(x: &Tensor, heads: usize, head_dim: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::rope_split_heads(x, heads, head_dim, cos, sin);
    }
    cpu::rope_split_heads(x, heads, head_dim, cos, sin)
}

/// `x · wᵀ` for a few rows: x (rows, K), w (N, K) → (rows, N), f32 accumulation. On CUDA (bf16 or
/// f16, rows ≤ [`GEMV_MAX_ROWS`], K a multiple of 8) kernels that stream w once —
/// a decode step's matrix products, one row per sequence of the batch; see [`gemv_fused`] for
/// when they beat cuBLAS.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((rows, k), (_, wk)) = (x.dims2()?, w.dims2()?);
    if k != wk || rows == 0 {
        candle_core::bail!("gemv: x {:?} and w {:?}", x.dims(), w.dims());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::gemv(x, w, None);
    }
    cpu::gemv(x, w)
}

/// Most rows [`gemv`] has weight-streaming kernels for (the tensor-core one from 2 rows on).
pub const GEMV_MAX_ROWS: usize = 32;

/// Most rows for which callers should prefer [`gemv`] to a cuBLAS GEMM. Measured on an H100
/// (docs/gpu-notes.md, 2026-12-06): cuBLAS streams the 8B decode weights at 97–99 % of the b1
/// GEMV's rate for 8 to 32 rows, faster than both of pare's kernels from 5 rows on; the
/// one-warp-per-row GEMV wins for 1 to 4.
pub const GEMV_PREFERRED_ROWS: usize = 4;

/// Which weight-streaming kernel runs a [`gemv`] on CUDA, and how it is split; [`gemv_plan`] picks
/// one per shape. Public so the kernel benchmark can time every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// One warp per weight row (`warps_per_row` share a row when rows are too few to fill the
    /// GPU), `loads` 16-byte loads in flight per lane (4 or 8); 1 to 8 rows of x.
    Warp { loads: usize, warps_per_row: usize },
    /// Tensor-core tiles of 16·`m_tiles` weight rows (1 or 2) by up to 32 rows of x, `loads`
    /// 16-byte loads per weight row and lane in flight (2, 4 or 8), K split over `split` warps (1..=8).
    Mma { m_tiles: usize, loads: usize, split: usize },
}

/// Whether callers should run this product through [`gemv`] on CUDA (else a cuBLAS GEMM): bf16 or
/// f16, K a multiple of 8, at most [`GEMV_PREFERRED_ROWS`] rows. `PARE_GEMV` in the environment
/// picks other designs to compare in one benchmark run: `legacy` (the warp kernel up to 8 rows,
/// the policy before 2026-12-06), `mma` (the tensor-core kernel for 2 to 32 rows).
pub fn gemv_fused(dtype: candle_core::DType, rows: usize, k: usize) -> bool {
    let max = match gemv_mode() {
        GemvMode::Preferred => GEMV_PREFERRED_ROWS,
        GemvMode::Legacy => 8,
        GemvMode::Mma => GEMV_MAX_ROWS,
    };
    gemv_supported(dtype, rows, k) && rows <= max
}

/// Whether [`gemv`] has a CUDA kernel for these sizes at all.
pub fn gemv_supported(dtype: candle_core::DType, rows: usize, k: usize) -> bool {
    matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16)
        && (1..=GEMV_MAX_ROWS).contains(&rows)
        && k.is_multiple_of(8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GemvMode {
    Preferred,
    Legacy,
    Mma,
}

fn gemv_mode() -> GemvMode {
    static MODE: std::sync::OnceLock<GemvMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("PARE_GEMV").as_deref() {
        Ok("legacy") => GemvMode::Legacy,
        Ok("mma") => GemvMode::Mma,
        _ => GemvMode::Preferred,
    })
}

/// The kernel [`gemv`] runs for `rows` rows of x against an (n, k) weight on a GPU of
/// `multiprocessors` SMs whose memory moves `bandwidth` bytes/s (its datasheet rate, read off the
/// device at load). Up to 8 rows (4 preferred, see [`GEMV_PREFERRED_ROWS`]): the warp-per-row
/// kernel, with twice the loads in flight on cards past 4 TB/s (the H200), whose latency ×
/// bandwidth product is larger. More rows (or `PARE_GEMV=mma`): tensor-core tiles, two per warp
/// from 17 rows on (halves the re-reads of x per weight byte), K split so that about 16 warps per
/// SM stream the weight.
pub fn gemv_plan(rows: usize, n: usize, k: usize, multiprocessors: usize, bandwidth: f64) -> GemvKernel {
    let target = multiprocessors.max(1) * 16;
    let legacy = gemv_mode() == GemvMode::Legacy;
    if rows == 1 || (rows <= 8 && gemv_mode() != GemvMode::Mma) {
        let loads = if bandwidth > 4.0e12 && !legacy { 8 } else { 4 };
        let warps_per_row = if n >= target { 1 } else { target.div_ceil(n).next_power_of_two().min(8) };
        return GemvKernel::Warp { loads, warps_per_row };
    }
    let m_tiles = if rows > 16 { 2 } else { 1 };
    let tiles = n.div_ceil(16 * m_tiles);
    // At least 4 k-blocks of 32 per warp, so the loads in flight are not all prologue.
    let split = target.div_ceil(tiles).clamp(1, 8).min(k.div_ceil(32 * 4).max(1));
    // 8 loads in flight per row and lane: the best variant at 8 to 24 rows in the H100 sweep.
    GemvKernel::Mma { m_tiles, loads: 8, split }
}

/// [`gemv`] with a chosen kernel (benchmarks; the kernel must suit the rows, see [`GemvKernel`]).
#[cfg(feature = "cuda")]
pub fn gemv_with(x: &Tensor, w: &Tensor, kernel: GemvKernel) -> Result<Tensor> {
    cuda::gemv(x, w, Some(kernel))
}

/// Attention of one query per row over per-(row, KV head) caches of any lengths.
///
/// `q` is (batch, heads, head_dim). `keys[i]` and `values[i]` are (entries_i, head_dim) for
/// (row, KV head) `i = row · kv_heads + head`, with kv_heads = keys.len() / batch; each may be a
/// view into a larger buffer as long as its rows are contiguous. Query head `h` reads KV head
/// `h / (heads / kv_heads)`. The first `skip[i]` entries are not attended to (padding, or outside
/// a sliding window). Returns (batch, heads, head_dim): softmax(q·kᵀ·scale)·v.
pub fn attention_decode(q: &Tensor, keys: &[Tensor], values: &[Tensor], skip: &[usize], scale: f32) -> Result<Tensor> {
    attention_decode_caches(q, &[DecodeKv::Heads { keys, values, skip }], scale)
}

/// [`attention_decode`] over a uniform cache given whole: `keys`/`values` (batch, kv_heads,
/// entries, head_dim), views allowed (rows contiguous), and `skip` per row (every head of a row
/// skips the same prefix). The same kernel and result as passing the per-(row, head) views, without
/// building batch × kv_heads tensors on the host every layer of every step: at 32 rows that host
/// work, not the GPU, bounded the step.
pub fn attention_decode_uniform(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    skip: &[usize],
    scale: f32,
) -> Result<Tensor> {
    attention_decode_caches(q, &[DecodeKv::Uniform { keys, values, skip }], scale)
}

/// The keys and values some rows of an [`attention_decode_caches`] call read.
#[derive(Clone, Copy)]
pub enum DecodeKv<'a> {
    /// A uniform cache given whole, as [`attention_decode_uniform`] takes it.
    Uniform { keys: &'a Tensor, values: &'a Tensor, skip: &'a [usize] },
    /// Per-(row, KV head) caches, as [`attention_decode`] takes them.
    Heads { keys: &'a [Tensor], values: &'a [Tensor], skip: &'a [usize] },
}

impl DecodeKv<'_> {
    /// (row, KV head) caches it holds.
    fn caches(&self) -> Result<usize> {
        Ok(match self {
            DecodeKv::Uniform { keys, .. } => keys.dim(0)? * keys.dim(1)?,
            DecodeKv::Heads { keys, .. } => keys.len(),
        })
    }
}

/// [`attention_decode`] over the rows of several caches in one call: `q` (batch, heads,
/// head_dim) holds `caches[0]`'s rows, then `caches[1]`'s, and so on. The result equals one call
/// per cache, concatenated, from one kernel launch (one pass over the thread pool on the CPU): a
/// server's step, where every sequence has a cache of its own, would otherwise issue one per
/// sequence and layer.
pub fn attention_decode_caches(q: &Tensor, caches: &[DecodeKv], scale: f32) -> Result<Tensor> {
    let (batch, _, d) = q.dims3()?;
    let total = caches.iter().map(DecodeKv::caches).sum::<Result<usize>>()?;
    if batch == 0 || total == 0 || !total.is_multiple_of(batch) {
        candle_core::bail!("attention_decode: {total} (row, KV head) caches for {batch} rows");
    }
    let kv_heads = total / batch;
    let mut row = 0;
    for cache in caches {
        let rows = cache.caches()? / kv_heads;
        if row + rows > batch {
            candle_core::bail!("attention_decode: caches for more than the {batch} query rows");
        }
        let q = q.narrow(0, row, rows)?;
        match *cache {
            DecodeKv::Heads { keys, values, skip } => check_decode_args(&q, keys, values, skip)?,
            DecodeKv::Uniform { keys, values, skip } => {
                let (cache_rows, heads, len, width) = keys.dims4()?;
                if values.dims() != keys.dims()
                    || skip.len() != rows
                    || cache_rows != rows
                    || heads != kv_heads
                    || kv_row_width(d, keys.dtype()) != width
                {
                    candle_core::bail!(
                        "attention_decode_uniform: q {:?}, keys {:?}, values {:?}, {} skips",
                        q.dims(),
                        keys.dims(),
                        values.dims(),
                        skip.len()
                    );
                }
                if skip.iter().any(|&s| s > len) {
                    candle_core::bail!("attention_decode_uniform: a skip past the {len} entries");
                }
            }
        }
        row += rows;
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::attention_decode_caches(q, caches, scale);
    }
    cpu_attention::attention_decode_caches(q, caches, scale)
}

/// Elements one cached entry of `head_dim` values takes in a tensor of `dtype`: the values
/// themselves for float caches, the bytes of their Q8_0 blocks for a `U8` (q8_0) cache.
pub fn kv_row_width(head_dim: usize, dtype: candle_core::DType) -> usize {
    if dtype == candle_core::DType::U8 {
        head_dim / quant::QK8 * quant::Q8_0_BLOCK_BYTES
    } else {
        head_dim
    }
}

/// Keys or values (..., head_dim) as a q8_0 cache holds them: `U8` (..., head_dim / 32 · 34), each
/// entry's values in GGUF Q8_0 blocks. CPU only; head_dim a multiple of 32.
pub fn encode_kv_q8_0(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    if !t.device().is_cpu() || d == 0 || !d.is_multiple_of(quant::QK8) {
        candle_core::bail!("a q8_0 KV cache needs head_dim a multiple of 32 on the CPU, got {d} on {:?}", t.device());
    }
    let x: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let mut bytes = vec![0u8; x.len() / quant::QK8 * quant::Q8_0_BLOCK_BYTES];
    quant::encode_q8_0(&x, &mut bytes);
    let mut shape = dims;
    *shape.last_mut().expect("rank ≥ 1") = kv_row_width(d, candle_core::DType::U8);
    Tensor::from_vec(bytes, shape, t.device())
}

/// A q8_0 cache's entries ([`encode_kv_q8_0`]) back as f32 (..., head_dim).
pub fn decode_kv_q8_0(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let width = *dims.last().unwrap_or(&0);
    if t.dtype() != candle_core::DType::U8 || width == 0 || !width.is_multiple_of(quant::Q8_0_BLOCK_BYTES) {
        candle_core::bail!("not a q8_0 cache tensor: {:?} of {:?}", dims, t.dtype());
    }
    let bytes: Vec<u8> = t.flatten_all()?.to_vec1()?;
    let mut x = vec![0f32; bytes.len() / quant::Q8_0_BLOCK_BYTES * quant::QK8];
    quant::decode_q8_0(&bytes, &mut x);
    let mut shape = dims;
    *shape.last_mut().expect("rank ≥ 1") = width / quant::Q8_0_BLOCK_BYTES * quant::QK8;
    Tensor::from_vec(x, shape, t.device())
}

/// Whether [`attention_decode`] runs for these sizes on this device (else it fails there, and
/// callers keep their own path): on CUDA head_dim 64 or 128 and up to 8 query heads per KV head;
/// on the CPU any sizes.
pub fn attention_decode_fused(device: &candle_core::Device, head_dim: usize, heads: usize, kv_heads: usize) -> bool {
    let grouped = kv_heads > 0 && heads.is_multiple_of(kv_heads);
    if device.is_cpu() {
        return grouped;
    }
    grouped && matches!(head_dim, 64 | 128) && (1..=8).contains(&(heads / kv_heads))
}

/// Prefill attention over a uniform cache, flash-style: the scores are never materialized, so a
/// 32k-token prompt needs no 32k×32k matrix.
///
/// `q` is (batch, heads, queries, head_dim); `keys`/`values` are (batch, kv_heads, entries,
/// head_dim), views allowed (rows contiguous). Masking is by position as in pare's cache: entry
/// e is visible to query q when `entry_positions[row][e] ≥ 0` (not padding), it is not after
/// `query_positions[row][q]`, and with a `window` fewer than `window` positions back. A query
/// that sees nothing (a padding query) gets zeros. Returns (batch, heads, queries, head_dim).
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
    let (kb, kv_heads, n, kd) = keys.dims4()?;
    if kb != batch
        || kd != kv_row_width(d, keys.dtype())
        || values.dims() != keys.dims()
        || kv_heads == 0
        || heads % kv_heads != 0
    {
        candle_core::bail!("attention_prefill: q {:?}, keys {:?}, values {:?}", q.dims(), keys.dims(), values.dims());
    }
    if query_positions.len() != batch
        || entry_positions.len() != batch
        || query_positions.iter().any(|p| p.len() != sq)
        || entry_positions.iter().any(|p| p.len() != n)
    {
        candle_core::bail!("attention_prefill: positions do not match {batch} rows of {sq} queries and {n} entries");
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::attention_prefill(q, keys, values, query_positions, entry_positions, window, scale);
    }
    cpu_attention::attention_prefill(q, keys, values, query_positions, entry_positions, window, scale)
}

/// Whether [`attention_prefill`] runs for this dtype and head_dim on this device: on CUDA bf16 or
/// f16 (tensor cores) with head_dim 64 or 128; on the CPU any.
pub fn attention_prefill_fused(device: &candle_core::Device, dtype: candle_core::DType, head_dim: usize) -> bool {
    device.is_cpu()
        || matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) && matches!(head_dim, 64 | 128)
}

/// Tokens kept by [`top_candidates`] beyond this many (ties at the k-th score) make a row fall back.
pub const CANDIDATE_CAP: usize = 2048;

/// One row's sampling candidates: token ids in increasing order, their raw logits, and the row's
/// log-sum-exp over the whole vocabulary (for log-probs).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub lse: f64,
}

/// For each row of `logits` (rows, vocab): the tokens whose score `logit / temperature` (f32
/// division) is at least the row's k-th largest score, ties all kept as HF's top-k keeps them.
/// A row gets `None` when more than [`CANDIDATE_CAP`] tokens qualify. Decoding with top-k (and
/// what follows it) or greedily needs only these, so on CUDA a step moves kilobytes instead of
/// the vocabulary's logits, and the host's processors run over a short row.
pub fn top_candidates(logits: &Tensor, k: usize, temperature: f32) -> Result<Vec<Option<Candidates>>> {
    let (_, vocab) = logits.dims2()?;
    if k == 0 || vocab == 0 || temperature.is_nan() || temperature <= 0.0 {
        candle_core::bail!("top_candidates: k {k} of {vocab} at temperature {temperature}");
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::top_candidates(logits, k, temperature);
    }
    cpu::top_candidates(logits, k, temperature)
}

/// Where scored cache entries sit in a flat (rows, width) cache buffer: entry `e` of the scores
/// read row after row is entry `e % per_head` of KV head `e / per_head`, at buffer row
/// `first + head · stride + e % per_head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferRows {
    pub first: usize,
    pub stride: usize,
    pub per_head: usize,
}

/// For each row of `scores` (rows, n): the indices of its `k` highest scores in increasing order,
/// ranked by `f32::total_cmp` with ties to the earlier entry (a press's top-k, per head with a row
/// per head, across heads with one row), and the cache buffer row of each ([`BufferRows`]) — what
/// a gather keeps. Two (rows, k) u32 tensors on the scores' device: a press selects without
/// reading scores back.
pub fn top_k_keep(scores: &Tensor, k: usize, buffer: BufferRows) -> Result<(Tensor, Tensor)> {
    let (rows, n) = scores.dims2()?;
    let heads = (rows * n).div_ceil(buffer.per_head.max(1));
    let last_row = buffer.first + heads.saturating_sub(1) * buffer.stride + buffer.per_head;
    if k > n || n > i32::MAX as usize || buffer.per_head == 0 || last_row > u32::MAX as usize {
        candle_core::bail!("top_k_keep: k {k} of {n} entries, buffer rows {buffer:?}");
    }
    if k == 0 || rows == 0 {
        let empty = Tensor::zeros((rows, k), candle_core::DType::U32, scores.device())?;
        return Ok((empty.clone(), empty));
    }
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() {
        return cuda::top_k_keep(scores, k, buffer);
    }
    cpu::top_k_keep(scores, k, buffer)
}

/// One cache's part of a [`write_rows`]: its flat (rows, width) key and value buffers (views of
/// the cache's storage, written in place) and, per entry, the buffer row its first new row goes to.
#[derive(Clone)]
pub struct RowWrites<'a> {
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
    pub rows: &'a [usize],
}

/// Write new cache entries in place: `keys`/`values` (entries, n, width) hold every entry of
/// `writes[0]`, then of `writes[1]`, and so on; entry j of a write fills rows `rows[j]..rows[j] +
/// n` of its buffers. On CUDA one launch writes them all, where a decode step over many caches (a
/// server's step, a cache per sequence) would otherwise issue two copies per cache and layer.
pub fn write_rows(keys: &Tensor, values: &Tensor, writes: &[RowWrites]) -> Result<()> {
    let (entries, n, width) = keys.dims3()?;
    let dtype = keys.dtype();
    if values.dims() != keys.dims()
        || values.dtype() != dtype
        || writes.iter().map(|w| w.rows.len()).sum::<usize>() != entries
    {
        candle_core::bail!(
            "write_rows: keys {:?}, values {:?} for {} entries",
            keys.dims(),
            values.dims(),
            writes.iter().map(|w| w.rows.len()).sum::<usize>()
        );
    }
    for w in writes {
        let (rows, w_width) = w.keys.dims2()?;
        let fits = w.rows.iter().all(|&r| r + n <= rows);
        if w.values.dims() != w.keys.dims()
            || w_width != width
            || w.keys.dtype() != dtype
            || w.values.dtype() != dtype
            || !w.keys.is_contiguous()
            || !w.values.is_contiguous()
            || !fits
        {
            candle_core::bail!(
                "write_rows: {n} rows of width {width} into buffers {:?} at rows {:?}",
                w.keys.dims(),
                w.rows
            );
        }
    }
    if entries == 0 || n == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if keys.device().is_cuda() {
        return cuda::write_rows(keys, values, writes);
    }
    cpu::write_rows(keys, values, writes)
}

fn check_decode_args(q: &Tensor, keys: &[Tensor], values: &[Tensor], skip: &[usize]) -> Result<()> {
    let (batch, heads, d) = q.dims3()?;
    let n = keys.len();
    if n == 0 || !n.is_multiple_of(batch) || values.len() != n || skip.len() != n {
        candle_core::bail!(
            "attention_decode: {n} key tensors, {} value tensors, {} skips for {batch} rows",
            values.len(),
            skip.len()
        );
    }
    let kv_heads = n / batch;
    if heads % kv_heads != 0 {
        candle_core::bail!("attention_decode: {heads} query heads do not group over {kv_heads} KV heads");
    }
    for ((k, v), &s) in keys.iter().zip(values).zip(skip) {
        let (len, kd) = k.dims2()?;
        if v.dims2()? != (len, kd) || kd != kv_row_width(d, k.dtype()) || s > len {
            candle_core::bail!(
                "attention_decode: keys {:?}, values {:?}, skip {s} for head_dim {d}",
                k.dims(),
                v.dims()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A uniform cache passed whole gives what its per-(row, head) views give, skips per row.
    #[test]
    fn attention_decode_uniform_matches_views() {
        let dev = candle_core::Device::Cpu;
        let (b, h, kvh, cap, len, d) = (3, 8, 2, 20, 13, 64);
        let k = Tensor::randn(0f32, 1.0, (b, kvh, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, kvh, cap, d), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (b, h, d), &dev).unwrap();
        let (kw, vw) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
        let skip = [0, 2, 5];
        let whole = attention_decode_uniform(&q, &kw, &vw, &skip, 0.125).unwrap();
        let view = |t: &Tensor, i: usize| t.get(i / kvh).unwrap().get(i % kvh).unwrap();
        let keys: Vec<Tensor> = (0..b * kvh).map(|i| view(&kw, i)).collect();
        let values: Vec<Tensor> = (0..b * kvh).map(|i| view(&vw, i)).collect();
        let per_head: Vec<usize> = (0..b * kvh).map(|i| skip[i / kvh]).collect();
        let heads = attention_decode(&q, &keys, &values, &per_head, 0.125).unwrap();
        let diff = (whole - heads).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        assert!(attention_decode_uniform(&q, &kw, &vw, &[0, 2], 0.125).is_err(), "one skip per row");
    }

    /// Several caches in one call give what one call per cache gives, to the bit on the CPU:
    /// each cache's entries are split as they are when it is decoded alone.
    #[test]
    fn attention_over_several_caches_matches_one_call_each() {
        let dev = candle_core::Device::Cpu;
        let (h, kvh, d) = (8, 2, 64);
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (k0, v0) = (randn(&[2, kvh, 700, d]), randn(&[2, kvh, 700, d]));
        let k1: Vec<Tensor> = [90, 3000].iter().map(|&n| randn(&[n, d])).collect();
        let v1: Vec<Tensor> = [90, 3000].iter().map(|&n| randn(&[n, d])).collect();
        let (k2, v2) = (randn(&[1, kvh, 5, d]), randn(&[1, kvh, 5, d]));
        let (skip0, skip1, skip2) = ([0, 7], [2, 0], [1]);
        let q = randn(&[4, h, d]);
        let caches = [
            DecodeKv::Uniform { keys: &k0, values: &v0, skip: &skip0 },
            DecodeKv::Heads { keys: &k1, values: &v1, skip: &skip1 },
            DecodeKv::Uniform { keys: &k2, values: &v2, skip: &skip2 },
        ];
        let together = attention_decode_caches(&q, &caches, 0.125).unwrap();
        let one_each = Tensor::cat(
            &[
                attention_decode_uniform(&q.narrow(0, 0, 2).unwrap(), &k0, &v0, &skip0, 0.125).unwrap(),
                attention_decode(&q.narrow(0, 2, 1).unwrap(), &k1, &v1, &skip1, 0.125).unwrap(),
                attention_decode_uniform(&q.narrow(0, 3, 1).unwrap(), &k2, &v2, &skip2, 0.125).unwrap(),
            ],
            0,
        )
        .unwrap();
        let diff = (together - one_each).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        // Caches for more rows than the queries hold, or fewer: refused.
        assert!(attention_decode_caches(&q.narrow(0, 0, 3).unwrap(), &caches, 0.125).is_err());
        assert!(attention_decode_caches(&q, &caches[..2], 0.125).is_err());
    }

    /// The plan names only kernels that exist for its rows, and fills the GPU.
    #[test]
    fn gemv_plan_is_runnable() {
        for rows in 1..=GEMV_MAX_ROWS {
            for (n, k) in [(1024, 4096), (6144, 4096), (4096, 14336), (128256, 4096), (49, 40)] {
                for bw in [3.35e12, 4.8e12] {
                    match gemv_plan(rows, n, k, 132, bw) {
                        GemvKernel::Warp { loads, warps_per_row } => {
                            assert!(rows <= 8 && matches!(loads, 4 | 8) && matches!(warps_per_row, 1 | 2 | 4 | 8));
                            assert!(n * warps_per_row >= 132 * 16 || warps_per_row == 8, "{rows} {n}");
                        }
                        GemvKernel::Mma { m_tiles, loads, split } => {
                            assert!(rows >= 2 && matches!(m_tiles, 1 | 2) && matches!(loads, 2 | 4 | 8));
                            assert!((1..=8).contains(&split));
                            assert!(split * 16 * m_tiles * rows.div_ceil(8) * 8 * 4 <= 32 * 1024);
                        }
                    }
                }
            }
        }
        assert!(matches!(gemv_plan(1, 4096, 4096, 132, 4.8e12), GemvKernel::Warp { loads: 8, .. }));
        assert!(matches!(gemv_plan(1, 4096, 4096, 132, 3.35e12), GemvKernel::Warp { loads: 4, .. }));
    }
}
