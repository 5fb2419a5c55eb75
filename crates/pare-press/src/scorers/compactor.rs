//! CompactorPress (Chari & Van Durme, arXiv 2507.08143; kvpress 0.5.5): a blend of
//! `blending` × approximate leverage scores of the pre-RoPE keys (LeverageScorePress) and
//! non-causal chunked attention times ‖v‖ (NonCausalAttnPress), each z-scored. The first
//! `sinks_start` and last `sinks_end` entries are left out of both and score the row's maximum.
//! Prefill only, as in kvpress: every entry is paired with the query of its own token.
//!
//! kvpress draws its Gaussian sketch with `torch.randn` on every call. pare draws it from
//! SplitMix64 (`pare_model::rng::mix`, counter-based) keyed by `seed`, layer and KV head, so a
//! run is reproducible; tools/reference/make_press_fixtures.py hands kvpress the same matrix
//! (see [`sketch`]), which makes the parity test compare the scores themselves.

use candle_core::{DType, Tensor, D};
use pare_model::rng::mix;

use crate::error::{PressError, Result};
use crate::observation::{per_head, softmax_last_dim, Observation};
use crate::scorer::Scorer;
use crate::scorers::snapkv::avg_pool;

#[derive(Debug, Clone)]
pub struct Compactor {
    pub sinks_start: usize,
    pub sinks_end: usize,
    pub chunk_size: usize,
    pub sketch_dimension: usize,
    /// Weight of the leverage scores; kvpress's default is the compression ratio.
    pub blending: f32,
    pub seed: u64,
}

impl Default for Compactor {
    fn default() -> Self {
        // kvpress's defaults; blending 0.35 is its choice when there is no compression ratio.
        Compactor { sinks_start: 8, sinks_end: 4, chunk_size: 256, sketch_dimension: 48, blending: 0.35, seed: 0 }
    }
}

/// The Gaussian sketch of one layer's KV head: head_dim × k, N(0, 1) entries (row-major) times
/// 1/√k. With key = mix(mix(seed) ^ (layer << 16 | head)) and uniform(n) = (mix(key ^ n) >> 11)
/// / 2⁵³, element e is √(−2 ln(1 − u)) cos(2π v) for u = uniform(2e), v = uniform(2e + 1)
/// (Box–Muller in f64, then f32). The fixture script restates exactly this in Python.
pub fn sketch(seed: u64, layer: usize, head: usize, head_dim: usize, k: usize) -> Vec<f32> {
    let key = mix(mix(seed) ^ ((layer as u64) << 16 | head as u64));
    let uniform = |n: u64| (mix(key ^ n) >> 11) as f64 / (1u64 << 53) as f64;
    let scale = 1.0 / (k as f32).sqrt();
    (0..(head_dim * k) as u64)
        .map(|e| {
            let (u, v) = (uniform(2 * e), uniform(2 * e + 1));
            ((-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * scale
        })
        .collect()
}

/// (x − mean) / max(std, 1e-6) over every element, std unbiased (torch's `std()`). A single
/// element scores 0 (torch gives NaN there).
fn z_score(x: &Tensor) -> Result<Tensor> {
    let n = x.elem_count();
    if n < 2 {
        return Ok(x.zeros_like()?);
    }
    let centered = x.broadcast_sub(&x.mean_all()?)?;
    let std = (centered.sqr()?.sum_all()? / (n - 1) as f64)?.sqrt()?.clamp(1e-6, f64::INFINITY)?;
    Ok(centered.broadcast_div(&std)?)
}

/// Cholesky factor L (lower, row-major k × k) of `g` + jitter·I, kvpress's chol_with_jitter:
/// jitter 1e-2, then ×10 for up to five tries in all.
fn cholesky_with_jitter(g: &[f64], k: usize) -> Result<Vec<f64>> {
    let mut jitter = 1e-2;
    for _ in 0..5 {
        if let Some(l) = cholesky(g, k, jitter) {
            return Ok(l);
        }
        jitter *= 10.0;
    }
    Err(PressError::config("compactor: the sketched key Gram matrix is not positive definite (Cholesky failed)"))
}

fn cholesky(g: &[f64], k: usize, jitter: f64) -> Option<Vec<f64>> {
    let mut l = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|c| l[i * k + c] * l[j * k + c]).sum();
            // kvpress factors 0.5 (G + Gᵀ) + jitter·I.
            let gij = 0.5 * (g[i * k + j] + g[j * k + i]) + if i == j { jitter } else { 0.0 };
            if i == j {
                let d = gij - dot;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i * k + i] = d.sqrt();
            } else {
                l[i * k + j] = (gij - dot) / l[j * k + j];
            }
        }
    }
    Some(l)
}

/// (L⁻¹)ᵀ of a lower-triangular L (row-major k × k): for a row x, ‖x (L⁻¹)ᵀ‖² = x (LLᵀ)⁻¹ xᵀ.
fn inverse_transposed(l: &[f64], k: usize) -> Vec<f64> {
    let mut inv = vec![0f64; k * k];
    for col in 0..k {
        // Forward substitution for column `col` of L⁻¹.
        for i in col..k {
            let rhs = if i == col { 1.0 } else { 0.0 };
            let dot: f64 = (col..i).map(|c| l[i * k + c] * inv[c * k + col]).sum();
            inv[i * k + col] = (rhs - dot) / l[i * k + i];
        }
    }
    (0..k * k).map(|e| inv[(e % k) * k + e / k]).collect()
}

impl Compactor {
    /// LeverageScorePress on entries `range` of the row: pre-RoPE keys (the cached keys rotated
    /// back), centred over the entries, sketched, then diag(X (XᵀX + jitter·I)⁻¹ Xᵀ) (z-scored
    /// by the caller).
    fn leverage(&self, obs: &Observation, keys: &Tensor, positions: &[i64]) -> Result<Tensor> {
        let (kv_heads, n, d) = keys.dims3()?;
        let k = self.sketch_dimension;
        let (cos, sin) = obs.rope.cos_sin(positions, 1, n, DType::F32, keys.device())?;
        let keys = obs.rope.apply(&keys.unsqueeze(0)?, &cos, &sin.neg()?)?.squeeze(0)?;
        let phi: Vec<f32> = obs.head_range().flat_map(|h| sketch(self.seed, obs.layer, h, d, k)).collect();
        let phi = Tensor::from_vec(phi, (kv_heads, d, k), keys.device())?;
        let x = keys.broadcast_sub(&keys.mean_keepdim(1)?)?.matmul(&phi)?; // (kv_heads, n, k)
        let gram = x.t()?.matmul(&x)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        // The k × k factorization runs on the host in f64; the n × k products stay on the device.
        let mut factors = Vec::with_capacity(kv_heads * k * k);
        for g in gram.chunks(k * k) {
            factors.extend(inverse_transposed(&cholesky_with_jitter(g, k)?, k).into_iter().map(|v| v as f32));
        }
        let factors = Tensor::from_vec(factors, (kv_heads, k, k), keys.device())?;
        // A sum of squares: kvpress's clamp_min(0) has nothing left to clamp.
        Ok(x.matmul(&factors)?.sqr()?.sum(D::Minus1)?)
    }

    /// NonCausalAttnPress: queries and keys (RoPE applied) cut into chunks of `chunk_size`, each
    /// query attending to every key of its own chunk (no 1/√d, as kvpress), the weights summed
    /// over queries and averaged over each KV head's query heads, times ‖v‖, avg-pooled (kernel
    /// 3) (z-scored by the caller). kvpress pads the sequence with zero queries and keys to whole chunks; the
    /// zero queries' uniform rows add (padding / chunk_size) to every real key of the last chunk,
    /// and so they do here. (kvpress sets padded keys' logits to −1e-9 rather than 0: the same
    /// weights in f32.)
    fn non_causal_attention(&self, obs: &Observation, q: &Tensor, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let (kv_heads, n, d) = keys.dims3()?;
        let (group, cs) = (obs.group, self.chunk_size);
        let chunks = n.div_ceil(cs);
        let pad = chunks * cs - n;
        let q = q.pad_with_zeros(1, 0, pad)?;
        let keys = keys.pad_with_zeros(1, 0, pad)?;
        let mut sums = Vec::with_capacity(chunks);
        for c in 0..chunks {
            let qc = q.narrow(1, c * cs, cs)?.contiguous()?.reshape((kv_heads, group * cs, d))?;
            let kc = keys.narrow(1, c * cs, cs)?;
            let weights = softmax_last_dim(&qc.matmul(&kc.t()?)?)?.reshape((kv_heads, group, cs, cs))?;
            sums.push(weights.sum(2)?.mean(1)?); // (kv_heads, cs)
        }
        let attention = Tensor::cat(&sums, 1)?.narrow(1, 0, n)?;
        let scores = (attention * values.sqr()?.sum(D::Minus1)?.sqrt()?)?;
        avg_pool(&scores, 3)
    }

    /// Every KV head's scores, (kv_heads, entries), on the observation's device.
    fn scores(&self, obs: &Observation) -> Result<Tensor> {
        let positions = &obs.positions[0];
        let prefill = obs.heads_share_entries() && positions == &obs.query_positions;
        let (Some(keys), Some(values), true) = (obs.stacked_keys()?, obs.stacked_values()?, prefill) else {
            return Err(PressError::config(
                "compactor scores a prompt at prefill only, pairing every entry with its own token's query",
            ));
        };
        let (kv_heads, n) = (obs.kv_heads(), positions.len());
        let left = self.sinks_start.min(n);
        let right = self.sinks_end.min(n - left);
        let m = n - left - right;
        if m == 0 {
            // Every entry is a sink: all protected alike.
            return Ok(Tensor::ones((kv_heads, n), DType::F32, obs.device())?);
        }
        let keys = keys.narrow(1, left, m)?;
        let values = values.narrow(1, left, m)?;
        let q = obs.rotated_queries(n)?.narrow(1, left, m)?;
        // Both are z-scored over all of the layer's heads: a rank of a split model scores the
        // others' heads' too.
        let every_head = |t: Tensor| -> Result<Tensor> {
            if obs.shard.is_none() {
                return Ok(t);
            }
            let all = obs.every_head(&per_head(&t)?)?;
            let shape = (all.len(), t.dim(1)?);
            Ok(Tensor::from_vec(all.concat(), shape, obs.device())?)
        };
        let leverage = z_score(&every_head(self.leverage(obs, &keys, &positions[left..left + m])?)?)?;
        let attention = z_score(&every_head(self.non_causal_attention(obs, &q, &keys, &values)?)?)?;
        let middle = ((leverage * self.blending as f64)? + attention)?;
        // kvpress pads the sinks with the maximum over the row (not max + 1).
        let top = middle.max_keepdim(1)?.max_keepdim(0)?;
        let all_heads = middle.dim(0)?;
        let side = |len: usize| -> Result<Tensor> { Ok(top.broadcast_as((all_heads, len))?.contiguous()?) };
        let scores = Tensor::cat(&[side(left)?, middle, side(right)?], 1)?;
        Ok(scores.narrow(0, obs.head_range().start, kv_heads)?)
    }
}

impl Scorer for Compactor {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        per_head(&self.scores(obs)?)
    }

    fn score_tensor(&self, obs: &Observation) -> Result<Option<Tensor>> {
        Ok(Some(self.scores(obs)?))
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leverage_algebra_inverts_the_gram_matrix() {
        // G = [[4, 2], [2, 3]]: L = [[2, 0], [1, √2]]; x G⁻¹ xᵀ for x = (1, 1) is 3/8.
        let g = [4.0, 2.0, 2.0, 3.0];
        let l = cholesky(&g, 2, 0.0).unwrap();
        assert!((l[0] - 2.0).abs() < 1e-12 && (l[2] - 1.0).abs() < 1e-12 && (l[3] - 2f64.sqrt()).abs() < 1e-12);
        let w = inverse_transposed(&l, 2);
        let y = [w[0] + w[2], w[1] + w[3]]; // (1, 1) · (L⁻¹)ᵀ
        assert!((y[0] * y[0] + y[1] * y[1] - 3.0 / 8.0).abs() < 1e-12);
        // Not positive definite even after the largest jitter: an error, not NaN scores.
        assert!(cholesky_with_jitter(&[-1e6, 0.0, 0.0, -1e6], 2).is_err());
    }

    #[test]
    fn the_sketch_is_seeded_and_standard_normal() {
        let a = sketch(7, 3, 1, 64, 48);
        assert_eq!(a, sketch(7, 3, 1, 64, 48));
        assert_ne!(a, sketch(7, 3, 2, 64, 48));
        assert_ne!(a, sketch(8, 3, 1, 64, 48));
        // Entries are N(0, 1/k): mean ≈ 0, k · mean square ≈ 1.
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n * 48.0;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.05, "{mean} {var}");
    }
}
