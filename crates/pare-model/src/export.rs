//! Writing a model as an HF checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads.

use std::path::Path;

use candle_core::{DType, Tensor};
use pare_formats::{save_safetensors, TokenizerBundle};
use serde_json::{json, Value};

use crate::config::Arch;
use crate::error::{ModelError, Result};
use crate::layers::{Linear, Norm};
use crate::model::Model;

/// The model's tensors under their HF names, dense, in `dtype`.
pub fn hf_tensors(model: &Model, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let neox = model.config.arch == Arch::GptNeoX;
    let push_linear = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| -> Result<()> {
        out.push((format!("{name}.weight"), l.dense_weight(dtype)?));
        if let Some(b) = l.bias() {
            out.push((format!("{name}.bias"), b.to_dtype(dtype)?));
        }
        Ok(())
    };
    let push_norm = |out: &mut Vec<(String, Tensor)>, name: String, n: &Norm| -> Result<()> {
        out.push((format!("{name}.weight"), n.weight().to_dtype(dtype)?));
        if let Norm::Layer { bias, .. } = n {
            out.push((format!("{name}.bias"), bias.to_dtype(dtype)?));
        }
        Ok(())
    };
    let (embed, final_norm, head, layers) = if neox {
        ("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", "embed_out", "gpt_neox.layers")
    } else {
        ("model.embed_tokens.weight", "model.norm", "lm_head", "model.layers")
    };
    out.push((embed.to_string(), model.embed_tokens.to_dtype(dtype)?));
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("{layers}.{i}");
        push_norm(&mut out, format!("{p}.input_layernorm"), &block.attn_norm)?;
        push_norm(&mut out, format!("{p}.post_attention_layernorm"), &block.mlp_norm)?;
        let a = &block.attn;
        if neox {
            // Re-fuse q, k, v per head: rows [h0: q k v, h1: q k v, ...].
            let d = a.head_dim;
            let fuse = |get: &dyn Fn(&Linear) -> Result<Tensor>| -> Result<Tensor> {
                let (q, k, v) = (get(&a.q)?, get(&a.k)?, get(&a.v)?);
                let mut parts = Vec::new();
                for h in 0..a.num_heads {
                    for t in [&q, &k, &v] {
                        parts.push(t.narrow(0, h * d, d)?);
                    }
                }
                Ok(Tensor::cat(&parts, 0)?)
            };
            out.push((format!("{p}.attention.query_key_value.weight"), fuse(&|l| l.dense_weight(dtype))?));
            if a.q.bias().is_some() {
                let bias = |l: &Linear| -> Result<Tensor> {
                    l.bias().ok_or_else(|| ModelError::input("fused qkv: q has a bias but k or v has none"))?.to_dtype(dtype).map_err(Into::into)
                };
                out.push((format!("{p}.attention.query_key_value.bias"), fuse(&bias)?));
            }
            push_linear(&mut out, format!("{p}.attention.dense"), &a.o)?;
            push_linear(&mut out, format!("{p}.mlp.dense_h_to_4h"), &block.mlp.up)?;
            push_linear(&mut out, format!("{p}.mlp.dense_4h_to_h"), &block.mlp.down)?;
        } else {
            push_linear(&mut out, format!("{p}.self_attn.q_proj"), &a.q)?;
            push_linear(&mut out, format!("{p}.self_attn.k_proj"), &a.k)?;
            push_linear(&mut out, format!("{p}.self_attn.v_proj"), &a.v)?;
            push_linear(&mut out, format!("{p}.self_attn.o_proj"), &a.o)?;
            if let Some(gate) = &block.mlp.gate {
                push_linear(&mut out, format!("{p}.mlp.gate_proj"), gate)?;
            }
            push_linear(&mut out, format!("{p}.mlp.up_proj"), &block.mlp.up)?;
            push_linear(&mut out, format!("{p}.mlp.down_proj"), &block.mlp.down)?;
        }
    }
    push_norm(&mut out, final_norm.to_string(), &model.final_norm)?;
    if !model.config.tie_word_embeddings {
        push_linear(&mut out, head.to_string(), &model.lm_head)?;
    }
    Ok(out)
}

/// Write config.json, model.safetensors, generation_config.json and the tokenizer files.
pub fn export_hf_dir(model: &Model, tokenizer: Option<&TokenizerBundle>, eos_token_ids: &[u32], out: &Path) -> Result<()> {
    let io = |e: std::io::Error| ModelError::Io { path: out.display().to_string(), source: e };
    std::fs::create_dir_all(out).map_err(io)?;
    let mut config = model.config.to_hf_json();
    if let Some(t) = tokenizer {
        let o = config.as_object_mut().expect("config is an object");
        o.insert("bos_token_id".into(), t.bos_token_id.map_or(Value::Null, Value::from));
        o.insert("eos_token_id".into(), eos_json(eos_token_ids));
    }
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let text = serde_json::to_string_pretty(v).expect("serializable");
        std::fs::write(out.join(name), text + "\n").map_err(io)
    };
    write_json("config.json", &config)?;
    let mut generation = json!({ "eos_token_id": eos_json(eos_token_ids) });
    if let Some(bos) = tokenizer.and_then(|t| t.bos_token_id) {
        generation["bos_token_id"] = bos.into();
    }
    write_json("generation_config.json", &generation)?;
    let tensors = hf_tensors(model, DType::F32)?;
    save_safetensors(&out.join("model.safetensors"), &tensors, None)?;
    if let Some(t) = tokenizer {
        t.save_hf(out)?;
    }
    Ok(())
}

fn eos_json(ids: &[u32]) -> Value {
    match ids {
        [] => Value::Null,
        [one] => (*one).into(),
        many => many.iter().map(|&i| Value::from(i)).collect(),
    }
}
