//! CPU kernels that candle runs single-threaded, where that dominates a forward pass.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// silu(gate) ⊙ up, the SwiGLU gate. One fused, multi-threaded pass on CPU for contiguous f32;
/// candle's separate ops elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
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

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_swiglu_matches_candle_ops() {
        let gate = Tensor::randn(0f32, 3.0, (7, 1000), &Device::Cpu).unwrap();
        let up = Tensor::randn(0f32, 1.0, (7, 1000), &Device::Cpu).unwrap();
        let fused = swiglu(&gate, &up).unwrap();
        let reference = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let diff = (fused - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "max |Δ| = {diff}");
    }
}
