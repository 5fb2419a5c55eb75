//! Tiny random Llama checkpoints for unit tests, written as HF directories and loaded by pare's
//! own loader (so tests exercise the same path as real models).

use candle_core::{DType, Device, Tensor};
use pare_model::Model;
use pare_test_support::TinyLlama;

use pare_model::rng::SplitMix64;

/// A random Llama with `layers` layers, `heads` query heads of dim 8 over `kv_heads` KV heads,
/// MLP width 24, vocabulary 256, untied head.
pub fn tiny_model(device: &Device, layers: usize, heads: usize, kv_heads: usize, seed: u64) -> Model {
    tiny_model_with(device, layers, heads, kv_heads, seed, |_| {})
}

/// [`tiny_model`] with its named weights edited before loading.
pub fn tiny_model_with(
    device: &Device,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    seed: u64,
    edit: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> Model {
    let mut rng = SplitMix64::new(seed);
    let draw = |shape: &[usize], base: f32, scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| base + scale * (2.0 * rng.next_f64() as f32 - 1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let spec = TinyLlama { layers, heads, kv_heads, width: 24, lm_head_scale: 0.3, dtype: DType::F32 };
    spec.build(device, draw, edit)
}
