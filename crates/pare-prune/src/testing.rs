//! Tiny random Llama checkpoints for unit tests, written as HF directories and loaded by pare's
//! own loader (so tests exercise the same path as real models).

use candle_core::{Device, Tensor};
use pare_model::{Model, WeightDType};

use crate::rng::SplitMix64;

/// A random Llama with `layers` layers, `heads` query heads of dim 8 over `kv_heads` KV heads,
/// MLP width 24, vocabulary 256, untied head.
pub fn tiny_model(device: &Device, layers: usize, heads: usize, kv_heads: usize, seed: u64) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let (d, width, vocab) = (8, 24, 256);
    let hidden = heads * d;
    let mut rng = SplitMix64::new(seed);
    let mut tensor = |shape: &[usize], base: f32, scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| base + scale * (2.0 * rng.next_f64() as f32 - 1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut tensors = vec![
        ("model.embed_tokens.weight".to_string(), tensor(&[vocab, hidden], 0.0, 1.0)),
        ("model.norm.weight".to_string(), tensor(&[hidden], 1.0, 0.2)),
        ("lm_head.weight".to_string(), tensor(&[vocab, hidden], 0.0, 0.3)),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [heads * d, hidden]),
            ("self_attn.k_proj", [kv_heads * d, hidden]),
            ("self_attn.v_proj", [kv_heads * d, hidden]),
            ("self_attn.o_proj", [hidden, heads * d]),
            ("mlp.gate_proj", [width, hidden]),
            ("mlp.up_proj", [width, hidden]),
            ("mlp.down_proj", [hidden, width]),
        ] {
            tensors.push((format!("{p}.{name}.weight"), tensor(&shape, 0.0, 0.35)));
        }
        tensors.push((format!("{p}.input_layernorm.weight"), tensor(&[hidden], 1.0, 0.2)));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), tensor(&[hidden], 1.0, 0.2)));
    }
    pare_formats::save_safetensors(&dir.path().join("model.safetensors"), &tensors, None).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": width,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": d, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    pare_model::load(dir.path().to_str().unwrap(), WeightDType::Float(candle_core::DType::F32), device).unwrap().model
}
