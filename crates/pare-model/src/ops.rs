//! Fused kernels where candle's op-by-op path is slow: multi-threaded CPU passes here, and on
//! CUDA the kernels of pare-kernels.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// silu(gate) ⊙ up, the SwiGLU gate. One fused, multi-threaded pass on CPU for contiguous f32,
/// one kernel on CUDA; candle's separate ops elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cuda() && gate.dtype() == up.dtype() && gate.shape() == up.shape() {
        return Ok(pare_kernels::swiglu(gate, up)?);
    }
    let fused = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.is_contiguous()
        && up.is_contiguous()
        && gate.shape() == up.shape();
    if fused {
        Ok(gate.apply_op2_no_bwd(up, &SwiGlu)?)
    } else {
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "pare-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (s1, s2) else {
            candle_core::bail!("pare-swiglu: f32 inputs expected")
        };
        let (Some((g0, g1)), Some((u0, u1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("pare-swiglu: contiguous inputs expected")
        };
        let (gate, up) = (&gate[g0..g1], &up[u0..u1]);
        let mut out = vec![0f32; gate.len()];
        const CHUNK: usize = 4096;
        out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// softmax(scores + mask) over the last dim. `scores` is (batch, heads, rows, entries) f32, the
/// additive `mask` (batch, 1, rows, entries) with 0 or f32::MIN. On CPU one fused, multi-threaded
/// pass that skips masked entries (half of a causal prefill); candle's ops elsewhere.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let Some(mask) = mask else { return Ok(candle_nn::ops::softmax_last_dim(scores)?) };
    let fused = scores.device().is_cpu()
        && scores.dtype() == DType::F32
        && mask.dtype() == DType::F32
        && scores.is_contiguous()
        && mask.is_contiguous()
        && scores.rank() == 4
        && mask.dims() == [scores.dim(0)?, 1, scores.dim(2)?, scores.dim(3)?];
    if fused {
        Ok(scores.apply_op2_no_bwd(mask, &MaskedSoftmax)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)?)
    }
}

struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "pare-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(scores), CpuStorage::F32(mask)) = (s1, s2) else {
            candle_core::bail!("pare-masked-softmax: f32 inputs expected")
        };
        let (Some((s0, s1e)), Some((m0, m1e))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("pare-masked-softmax: contiguous inputs expected")
        };
        let (scores, mask) = (&scores[s0..s1e], &mask[m0..m1e]);
        let dims = l1.shape().dims();
        let (heads, rows, entries) = (dims[1], dims[2], dims[3]);
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(entries).zip(scores.par_chunks(entries)).enumerate().for_each(|(i, (o, s))| {
            let (b, r) = (i / (heads * rows), i % rows);
            let m = &mask[(b * rows + r) * entries..][..entries];
            let mut max = f32::NEG_INFINITY;
            for (&s, &m) in s.iter().zip(m) {
                if m == 0.0 && s > max {
                    max = s;
                }
            }
            if max == f32::NEG_INFINITY {
                // Everything masked (a padding query): uniform, as softmax of equal scores.
                o.fill(1.0 / entries as f32);
                return;
            }
            let mut sum = 0f32;
            for ((o, &s), &m) in o.iter_mut().zip(s).zip(m) {
                if m == 0.0 {
                    *o = (s - max).exp();
                    sum += *o;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn fused_swiglu_matches_candle_ops() {
        let gate = Tensor::randn(0f32, 3.0, (7, 1000), &Device::Cpu).unwrap();
        let up = Tensor::randn(0f32, 1.0, (7, 1000), &Device::Cpu).unwrap();
        let fused = swiglu(&gate, &up).unwrap();
        let reference = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let diff = (fused - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "max |Δ| = {diff}");
    }

    #[test]
    fn fused_masked_softmax_matches_candle_ops() {
        let scores = Tensor::randn(0f32, 4.0, (2, 3, 5, 7), &Device::Cpu).unwrap();
        // Causal-style mask with one fully masked row (a padding query).
        let mut m = vec![0f32; 2 * 5 * 7];
        for (i, v) in m.iter_mut().enumerate() {
            let (b, r, e) = (i / 35, (i / 7) % 5, i % 7);
            if e > r + 2 || (b == 1 && r == 0) {
                *v = f32::MIN;
            }
        }
        let mask = Tensor::from_vec(m, (2, 1, 5, 7), &Device::Cpu).unwrap();
        let fused = masked_softmax(&scores, Some(&mask)).unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let diff = (fused - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "max |Δ| = {diff}");
    }
}
