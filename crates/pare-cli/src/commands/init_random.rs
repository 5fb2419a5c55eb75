//! `pare init-random`: an HF checkpoint directory with a real model's shapes and random weights,
//! for benchmarks at sizes whose weights cannot be shipped (Llama-3-8B: 16 GB). Speed does not
//! depend on the values; HF transformers loads the same directory for the baseline.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::common::print_json;
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The architecture to copy: llama3-8b (Llama-3.1-8B), qwen2.5-0.5b, smollm2-135m.
    #[arg(long)]
    pub like: String,
    /// Output directory (created; an existing non-empty one needs --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// Keep only this many layers (smaller test models of the same width).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Weight dtype.
    #[arg(long, value_enum, default_value_t = InitDtype::Bf16)]
    pub dtype: InitDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

/// `--dtype` of the written weights.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitDtype {
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "float32")]
    F32,
}

/// HF config.json of each architecture (the published models' own values).
fn preset(name: &str) -> Option<Value> {
    Some(match name {
        "llama3-8b" => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192},
            "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
            "bos_token_id": 128000, "eos_token_id": 128001,
        }),
        "qwen2.5-0.5b" => json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true, "use_sliding_window": false,
            "bos_token_id": 151643, "eos_token_id": 151645,
        }),
        "smollm2-135m" => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
            "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "attention_bias": false, "mlp_bias": false,
            "bos_token_id": 1, "eos_token_id": 2,
        }),
        _ => return None,
    })
}

/// Uniform values with standard deviation `std` (HF's initializer_range, 0.02), never all zero:
/// zeros would make kernels look faster than on real weights.
fn random_tensor(shape: &[usize], std: f32, stream: u64, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let half_width = std * 3f32.sqrt();
    let key = pare_model::rng::mix(stream);
    let data: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| {
            let u = (pare_model::rng::mix(key ^ i as u64) >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * half_width
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

pub fn run(args: Args) -> Result<()> {
    let Some(mut config) = preset(&args.like) else {
        bail!("unknown --like {:?} (expected llama3-8b, qwen2.5-0.5b or smollm2-135m)", args.like);
    };
    let (dtype, torch_dtype) = match args.dtype {
        InitDtype::Bf16 => (DType::BF16, "bfloat16"),
        InitDtype::F16 => (DType::F16, "float16"),
        InitDtype::F32 => (DType::F32, "float32"),
    };
    config["torch_dtype"] = torch_dtype.into();
    if let Some(layers) = args.layers {
        if layers == 0 {
            bail!("--layers must be at least 1");
        }
        config["num_hidden_layers"] = layers.into();
    }
    let get = |k: &str| config[k].as_u64().expect("preset field") as usize;
    let (hidden, inter, layers, heads, kv_heads, vocab) = (
        get("hidden_size"),
        get("intermediate_size"),
        get("num_hidden_layers"),
        get("num_attention_heads"),
        get("num_key_value_heads"),
        get("vocab_size"),
    );
    let head_dim = config.get("head_dim").and_then(Value::as_u64).map_or(hidden / heads, |d| d as usize);
    let qkv_bias = config["model_type"] == "qwen2";
    let tied = config["tie_word_embeddings"] == true;

    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        for (name, rows) in
            [("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)]
        {
            shapes.push((format!("{p}.self_attn.{name}.weight"), vec![rows, hidden]));
            if qkv_bias {
                shapes.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
            }
        }
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, heads * head_dim]));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    if !tied {
        shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }

    // All tensors are held until written, each made through an f32 copy: refuse before filling.
    let sizes: Option<Vec<u64>> = shapes.iter().map(|(_, shape)| pare_model::memory::product(shape)).collect();
    let params = sizes.as_ref().and_then(|s| s.iter().try_fold(0u64, |acc, &n| acc.checked_add(n)));
    let largest = sizes.as_ref().and_then(|s| s.iter().max().copied()).unwrap_or(0);
    let needed = params
        .and_then(|p| p.checked_mul(dtype.size_in_bytes() as u64))
        .and_then(|b| b.checked_add(largest.checked_mul(2 * 4)?));
    pare_model::memory::ensure_fits(&format!("a {layers}-layer {} checkpoint", args.like), needed)?;
    let params = params.expect("checked with the memory estimate") as usize;
    let out = Output::dir(&args.out, "--out", args.force, &[])?;
    let mut tensors = Vec::with_capacity(shapes.len());
    for (i, (name, shape)) in shapes.into_iter().enumerate() {
        let t = if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
            // Norm weights near 1, as trained models have them.
            (random_tensor(&shape, 0.02, args.seed.wrapping_mul(1_000_003) ^ i as u64, DType::F32)? + 1.0)?
                .to_dtype(dtype)?
        } else {
            random_tensor(&shape, 0.02, args.seed.wrapping_mul(1_000_003) ^ i as u64, dtype)?
        };
        tensors.push((name, t));
    }

    let write = |name: &str, v: &Value| -> Result<()> {
        std::fs::write(out.path().join(name), serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("writing {}", args.out.join(name).display()))
    };
    write("config.json", &config)?;
    write(
        "generation_config.json",
        &json!({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}),
    )?;
    pare_formats::save_safetensors(&out.path().join("model.safetensors"), &tensors, None)?;
    out.commit()?;
    let bytes = params * dtype.size_in_bytes();
    if args.json {
        print_json(&json!({"out": args.out.display().to_string(), "like": args.like, "layers": layers,
                           "parameters": params, "dtype": torch_dtype, "bytes": bytes}))
    } else {
        println!(
            "wrote {} ({} layers, {params} parameters, {:.2} GB {torch_dtype})",
            args.out.display(),
            layers,
            bytes as f64 / 1e9
        );
        Ok(())
    }
}
