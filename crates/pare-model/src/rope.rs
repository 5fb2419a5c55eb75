//! Rotary position embeddings, computed from each token's own position.
//!
//! Positions come per batch row (left padding, and later evicted or pruned entries keep their
//! original positions), so cos/sin are built for a (batch, seq) grid of positions rather than a
//! contiguous range. The inverse frequencies follow HF's `_compute_*_parameters` in float32.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.rotary_dim;
        let base = cfg.rope_theta;
        let mut inv_freq: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect();
        match cfg.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old_ctx = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen { *f / factor } else { *f };
                    let is_medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                    *f = if is_medium {
                        let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Rope { inv_freq }
    }

    /// Inverse frequencies of the rotated channel pairs (re-rotating cached keys needs them).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn rotary_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// cos and sin of shape (batch, seq, rotary_dim / 2) for the given positions (row-major batch × seq).
    pub fn cos_sin(
        &self,
        positions: &[i64],
        batch: usize,
        seq: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            // Padding slots carry position -1; any finite angle will do, their outputs are masked.
            let p = p.max(0) as f32;
            for &f in &self.inv_freq {
                let angle = p * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (batch, seq, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (batch, seq, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// A projection's output (batch, seq, heads·head_dim) → rotated heads (batch, heads, seq,
    /// head_dim). On CUDA the split, the transpose and the rotation are one kernel (a step's q and
    /// k otherwise cost a copy and a rotation launch each); elsewhere it is [`Rope::apply`].
    pub fn apply_split_heads(
        &self,
        x: &Tensor,
        heads: usize,
        head_dim: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        if x.device().is_cuda() && cos.dtype() == x.dtype() {
            return Ok(pare_kernels::rope_split_heads(x, heads, head_dim, cos, sin)?);
        }
        let (batch, seq, _) = x.dims3()?;
        let split =
            x.narrow(2, 0, heads * head_dim)?.reshape((batch, seq, heads, head_dim))?.transpose(1, 2)?.contiguous()?;
        self.apply(&split, cos, sin)
    }

    /// Rotate the first `rotary_dim` channels of x (batch, heads, seq, head_dim), HF's rotate_half style.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(3)?;
        let rot = self.rotary_dim();
        if rot == head_dim {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
        }
        let rotated = candle_nn::rotary_emb::rope(&x.narrow(3, 0, rot)?.contiguous()?, cos, sin)?;
        let pass = x.narrow(3, rot, head_dim - rot)?;
        Ok(Tensor::cat(&[&rotated, &pass], 3)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CUDA kernel is tested against pare-kernels' CPU reference; this ties that reference to
    /// the model's own CPU path.
    #[test]
    fn kernel_reference_matches_the_cpu_path() {
        let cfg = ModelConfig::from_hf_json(
            &serde_json::json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
                "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 10, "rope_theta": 10000.0,
                "max_position_embeddings": 64}),
            "test",
        )
        .unwrap();
        let rope = Rope::new(&cfg);
        let positions: Vec<i64> = vec![0, 1, 2, 7, 8, 9];
        let (cos, sin) = rope.cos_sin(&positions, 2, 3, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).unwrap();
        let ours = rope.apply_split_heads(&x, 2, 32, &cos, &sin).unwrap();
        let reference = pare_kernels::cpu::rope_split_heads(&x, 2, 32, &cos, &sin).unwrap();
        let diff = (ours - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max |Δ| = {diff}");
    }
}
