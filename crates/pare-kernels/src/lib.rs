//! pare's fused kernels, for the GPU path where candle's op-by-op execution is slow.
//!
//! Each function runs a CUDA kernel (kernels/pare.cu, built under the `cuda` feature) when its
//! inputs are on a CUDA device, and its CPU reference ([`cpu`]) otherwise. The references define
//! what the kernels compute, in f32 with values rounded to the tensor dtype where HF transformers
//! rounds them; tests/gpu.rs checks every kernel against its reference on the GPU machine.
//! pare-model keeps its own exact CPU paths and calls these only on CUDA.

use candle_core::{Result, Tensor};

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod quant;
pub mod threads;
#[cfg(feature = "cuda")]
pub use cuda::{gpu_memory, reset_gpu_memory_peak};

/// GPU memory in bytes: in use on the device (all processes), its size, and the most this process
/// held in tensors since the last [`reset_gpu_memory_peak`] (the stream-ordered pool's high mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    pub used: u64,
    pub total: u64,
    pub peak: u64,
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
/// f16, rows ≤ 8, K a multiple of 8) a kernel that streams w once at memory speed — a decode
/// step's matrix products; see [`gemv_fused`].
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((rows, k), (_, wk)) = (x.dims2()?, w.dims2()?);
    if k != wk || rows == 0 {
        candle_core::bail!("gemv: x {:?} and w {:?}", x.dims(), w.dims());
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::gemv(x, w);
    }
    cpu::gemv(x, w)
}

/// Whether [`gemv`] has a CUDA kernel for these sizes.
pub fn gemv_fused(dtype: candle_core::DType, rows: usize, k: usize) -> bool {
    matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16)
        && (1..=8).contains(&rows)
        && k.is_multiple_of(8)
}

/// Attention of one query per row over per-(row, KV head) caches of any lengths.
///
/// `q` is (batch, heads, head_dim). `keys[i]` and `values[i]` are (entries_i, head_dim) for
/// (row, KV head) `i = row · kv_heads + head`, with kv_heads = keys.len() / batch; each may be a
/// view into a larger buffer as long as its rows are contiguous. Query head `h` reads KV head
/// `h / (heads / kv_heads)`. The first `skip[i]` entries are not attended to (padding, or outside
/// a sliding window). Returns (batch, heads, head_dim): softmax(q·kᵀ·scale)·v.
pub fn attention_decode(q: &Tensor, keys: &[Tensor], values: &[Tensor], skip: &[usize], scale: f32) -> Result<Tensor> {
    check_decode_args(q, keys, values, skip)?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::attention_decode(q, keys, values, skip, scale);
    }
    cpu::attention_decode(q, keys, values, skip, scale)
}

/// Whether [`attention_decode`] runs as a fused kernel for these sizes on a CUDA device (else it
/// fails there, and callers keep their own path): head_dim 64 or 128, up to 8 query heads per KV head.
pub fn attention_decode_fused(head_dim: usize, heads: usize, kv_heads: usize) -> bool {
    matches!(head_dim, 64 | 128)
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && (1..=8).contains(&(heads / kv_heads))
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
    if kb != batch || kd != d || values.dims() != keys.dims() || kv_heads == 0 || heads % kv_heads != 0 {
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
    cpu::attention_prefill(q, keys, values, query_positions, entry_positions, window, scale)
}

/// Whether [`attention_prefill`] has a CUDA kernel for this dtype and head_dim (bf16 or f16
/// tensor cores, head_dim 64 or 128).
pub fn attention_prefill_fused(dtype: candle_core::DType, head_dim: usize) -> bool {
    matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) && matches!(head_dim, 64 | 128)
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
        if v.dims2()? != (len, kd) || kd != d || s > len {
            candle_core::bail!(
                "attention_decode: keys {:?}, values {:?}, skip {s} for head_dim {d}",
                k.dims(),
                v.dims()
            );
        }
    }
    Ok(())
}
