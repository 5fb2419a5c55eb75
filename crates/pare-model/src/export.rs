//! Writing a model as an HF checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads,
//! or as a GGUF file for llama.cpp-style runtimes.

use std::path::Path;

use candle_core::{DType, Tensor};
use pare_formats::{save_safetensors, write_gguf, GgmlType, GgufTensorData, GgufValue, TokenizerBundle};
use serde_json::{json, Value};

use crate::config::{Arch, RopeScaling};
use crate::diff::Role;
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
                    l.bias()
                        .ok_or_else(|| ModelError::input("fused qkv: q has a bias but k or v has none"))?
                        .to_dtype(dtype)
                        .map_err(Into::into)
                };
                out.push((format!("{p}.attention.query_key_value.bias"), fuse(&bias)?));
            }
        }
        // Every projection HF keeps as a module of its own (GPT-NeoX's fused q/k/v went above).
        for role in Role::ALL {
            if let (Some(name), Some(linear)) = (hf_module_name(model.config.arch, i, role), model.linear(i, role)) {
                push_linear(&mut out, name, linear)?;
            }
        }
    }
    push_norm(&mut out, final_norm.to_string(), &model.final_norm)?;
    if !model.config.tie_word_embeddings {
        push_linear(&mut out, head.to_string(), &model.lm_head)?;
    }
    Ok(out)
}

/// The HF module name of layer `layer`'s projection in `role` (`model.layers.3.self_attn.q_proj`),
/// as HF checkpoints and peft adapters name it; None where HF has no module of its own for it
/// (GPT-NeoX fuses q, k and v into `query_key_value` and has no gate).
pub fn hf_module_name(arch: Arch, layer: usize, role: Role) -> Option<String> {
    let suffix = match (arch, role) {
        (Arch::GptNeoX, Role::O) => "attention.dense",
        (Arch::GptNeoX, Role::Up) => "mlp.dense_h_to_4h",
        (Arch::GptNeoX, Role::Down) => "mlp.dense_4h_to_h",
        (Arch::GptNeoX, _) => return None,
        (_, Role::Q) => "self_attn.q_proj",
        (_, Role::K) => "self_attn.k_proj",
        (_, Role::V) => "self_attn.v_proj",
        (_, Role::O) => "self_attn.o_proj",
        (_, Role::Gate) => "mlp.gate_proj",
        (_, Role::Up) => "mlp.up_proj",
        (_, Role::Down) => "mlp.down_proj",
    };
    let layers = if arch == Arch::GptNeoX { "gpt_neox.layers" } else { "model.layers" };
    Some(format!("{layers}.{layer}.{suffix}"))
}

/// transformers classes for exports whose shapes its own classes cannot hold, named in
/// config.json's `auto_map` (as per-layer architectures such as DeciLM ship theirs).
const MODELING_PARE: &str = include_str!("modeling_pare.py");

/// Whether transformers' own class cannot hold the model's shapes, so that the export carries
/// `modeling_pare.py` and loads with `trust_remote_code=True`: layers that differ in head count
/// or MLP width, or pruned heads where transformers derives or checks them from hidden_size.
pub fn needs_remote_code(model: &Model) -> bool {
    let c = &model.config;
    let pruned_heads = match c.arch {
        Arch::GptNeoX => c.num_heads * c.head_dim != c.hidden_size,
        _ => !c.hidden_size.is_multiple_of(c.num_heads),
    };
    c.layer_shapes.is_some() || pruned_heads
}

/// Write config.json, model.safetensors, generation_config.json and the tokenizer files, plus
/// `modeling_pare.py` when transformers needs it ([`needs_remote_code`]).
pub fn export_hf_dir(
    model: &Model,
    tokenizer: Option<&TokenizerBundle>,
    eos_token_ids: &[u32],
    out: &Path,
) -> Result<()> {
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
    if needs_remote_code(model) {
        let class = model.config.arch.hf_class();
        let family = class.trim_end_matches("ForCausalLM");
        let o = config.as_object_mut().expect("config is an object");
        o.insert("model_type".into(), format!("pare_{}", model.config.arch.model_type()).into());
        o.insert("architectures".into(), json!([format!("Pare{class}")]));
        o.insert(
            "auto_map".into(),
            json!({
                "AutoConfig": format!("modeling_pare.Pare{family}Config"),
                "AutoModelForCausalLM": format!("modeling_pare.Pare{class}"),
            }),
        );
        std::fs::write(out.join("modeling_pare.py"), MODELING_PARE).map_err(io)?;
    }
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

/// Why a model cannot be written as GGUF for llama.cpp, if it cannot.
pub fn gguf_unsupported(model: &Model) -> Option<String> {
    let cfg = &model.config;
    if cfg.arch == Arch::GptNeoX {
        if cfg.layer_shapes.is_some() {
            return Some(
                "llama.cpp's gptneox architecture reads one head count and MLP width for all layers, and no \
                 llama.cpp architecture has GPT-NeoX layers of different shapes; use the HF directory"
                    .into(),
            );
        }
        if model.blocks.iter().any(|b| b.attn.num_heads * b.attn.head_dim != cfg.hidden_size) {
            return Some(
                "llama.cpp's gptneox architecture sizes attention by the hidden size, so it cannot hold pruned \
                 heads; use the HF directory"
                    .into(),
            );
        }
    }
    if matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }) {
        return Some(
            "llama3 RoPE scaling is stored by llama.cpp as a rope_freqs tensor, which pare does not write".into(),
        );
    }
    if cfg.sliding_window.is_some() {
        return Some("llama.cpp's llama architecture has no sliding-window attention (Mistral)".into());
    }
    None
}

/// llama.cpp's q/k row order for its interleaved RoPE (`permute` in convert_hf_to_gguf.py): row
/// `h·d + 2i + j` holds HF row `h·d + j·d/2 + i`. The inverse of `weights::unpermute_rows`.
fn permute_for_llama_cpp(t: &Tensor, head_dim: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if !head_dim.is_multiple_of(2) || rows % head_dim != 0 {
        return Err(ModelError::input(format!("cannot permute {rows} rows into heads of {head_dim}")));
    }
    let half = head_dim / 2;
    let order: Vec<u32> = (0..rows)
        .map(|r| {
            let (h, within) = (r / head_dim, r % head_dim);
            (h * head_dim + (within % 2) * half + within / 2) as u32
        })
        .collect();
    let idx = Tensor::from_vec(order, rows, t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

/// Query heads, KV heads and MLP width of each layer.
fn layer_shapes(model: &Model) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let heads = model.blocks.iter().map(|b| b.attn.num_heads).collect();
    let kv_heads = model.blocks.iter().map(|b| b.attn.num_kv_heads).collect();
    let widths = model.blocks.iter().map(|b| b.mlp.width()).collect();
    (heads, kv_heads, widths)
}

fn all_equal(values: &[usize]) -> bool {
    values.windows(2).all(|w| w[0] == w[1])
}

/// The llama.cpp architecture [`export_gguf`] declares. llama.cpp's llama and qwen2 size every
/// layer alike; its deci architecture (Llama-3 derivatives of varying shape) reads per-layer head
/// counts and FFN widths. Qwen2's q/k/v biases are optional deci tensors, and its RoPE equals
/// Llama's once q/k rows are permuted as for llama.
pub fn gguf_architecture(model: &Model) -> &'static str {
    let (heads, kv_heads, widths) = layer_shapes(model);
    let layers_agree = all_equal(&heads) && all_equal(&kv_heads) && all_equal(&widths);
    match model.config.arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 if !layers_agree => "deci",
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::GptNeoX => "gptneox",
    }
}

/// Write `model` as a GGUF file: `{arch}.*` hyper-parameters (per-layer arrays for head counts
/// and MLP widths when layers differ, under llama.cpp's `deci` architecture), `tokenizer_metadata`
/// (the `tokenizer.*` keys: a source GGUF's, or `TokenizerBundle::gguf_metadata`'s), matrices in
/// `dtype` (F16 or F32) and 1-D tensors (norms, biases) in F32, as llama.cpp's converter stores them.
pub fn export_gguf(
    model: &Model,
    tokenizer_metadata: &[(String, GgufValue)],
    dtype: GgmlType,
    path: &Path,
) -> Result<()> {
    if let Some(why) = gguf_unsupported(model) {
        return Err(ModelError::input(format!("cannot write GGUF: {why}")));
    }
    if !matches!(dtype, GgmlType::F16 | GgmlType::F32) {
        return Err(ModelError::input(format!("GGUF export writes F16 or F32, not {dtype}")));
    }
    let cfg = &model.config;
    let (heads, kv_heads, widths) = layer_shapes(model);
    let arch = gguf_architecture(model);
    let permute_qk = arch != "qwen2";
    let k = |name: &str| format!("{arch}.{name}");
    // One value when every layer agrees, a per-layer array otherwise.
    let per_layer = |values: &[usize]| -> GgufValue {
        if all_equal(values) {
            GgufValue::U32(values[0] as u32)
        } else {
            GgufValue::Array(values.iter().map(|&v| GgufValue::I32(v as i32)).collect())
        }
    };
    let mut meta: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::Str(arch.into())),
        ("general.name".into(), GgufValue::Str("pare export".into())),
        // llama.cpp's LLAMA_FTYPE: 0 all F32, 1 mostly F16.
        ("general.file_type".into(), GgufValue::U32(if dtype == GgmlType::F16 { 1 } else { 0 })),
        (k("context_length"), GgufValue::U32(cfg.max_position_embeddings as u32)),
        (k("embedding_length"), GgufValue::U32(cfg.hidden_size as u32)),
        (k("block_count"), GgufValue::U32(model.blocks.len() as u32)),
        (k("feed_forward_length"), per_layer(&widths)),
        (k("attention.head_count"), per_layer(&heads)),
        (k("attention.head_count_kv"), per_layer(&kv_heads)),
        (k("attention.key_length"), GgufValue::U32(cfg.head_dim as u32)),
        (k("attention.value_length"), GgufValue::U32(cfg.head_dim as u32)),
        (k("rope.dimension_count"), GgufValue::U32(cfg.rotary_dim as u32)),
        (k("rope.freq_base"), GgufValue::F32(cfg.rope_theta)),
        (k("vocab_size"), GgufValue::U32(cfg.vocab_size as u32)),
    ];
    if cfg.arch == Arch::GptNeoX {
        meta.push((k("attention.layer_norm_epsilon"), GgufValue::F32(cfg.norm_eps as f32)));
        meta.push((k("use_parallel_residual"), GgufValue::Bool(cfg.parallel_residual)));
    } else {
        meta.push((k("attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg.norm_eps as f32)));
    }
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        meta.push((k("rope.scaling.type"), GgufValue::Str("linear".into())));
        meta.push((k("rope.scaling.factor"), GgufValue::F32(factor)));
    }
    meta.extend(tokenizer_metadata.iter().filter(|(key, _)| key.starts_with("tokenizer.")).cloned());

    let mut tensors = Vec::new();
    let mut push = |name: String, t: &Tensor| -> Result<()> {
        let ty = if t.rank() == 1 { GgmlType::F32 } else { dtype };
        tensors.push(GgufTensorData::from_tensor(name, t, ty)?);
        Ok(())
    };
    let push_norm = |push: &mut dyn FnMut(String, &Tensor) -> Result<()>, name: &str, n: &Norm| -> Result<()> {
        push(format!("{name}.weight"), n.weight())?;
        if let Norm::Layer { bias, .. } = n {
            push(format!("{name}.bias"), bias)?;
        }
        Ok(())
    };
    let f32w = |l: &Linear| l.dense_weight(DType::F32);
    push("token_embd.weight".into(), &model.embed_tokens.to_dtype(DType::F32)?)?;
    for (i, b) in model.blocks.iter().enumerate() {
        let p = format!("blk.{i}");
        let a = &b.attn;
        push_norm(&mut push, &format!("{p}.attn_norm"), &b.attn_norm)?;
        push_norm(&mut push, &format!("{p}.ffn_norm"), &b.mlp_norm)?;
        if cfg.arch == Arch::GptNeoX {
            // llama.cpp's GPT-NeoX keeps q, k, v fused as [all q; all k; all v].
            let w = Tensor::cat(&[&f32w(&a.q)?, &f32w(&a.k)?, &f32w(&a.v)?], 0)?;
            push(format!("{p}.attn_qkv.weight"), &w)?;
            if let (Some(q), Some(kb), Some(v)) = (a.q.bias(), a.k.bias(), a.v.bias()) {
                push(format!("{p}.attn_qkv.bias"), &Tensor::cat(&[q, kb, v], 0)?)?;
            }
        } else {
            for (name, l) in [("attn_q", &a.q), ("attn_k", &a.k), ("attn_v", &a.v)] {
                let permute = permute_qk && name != "attn_v";
                let w = f32w(l)?;
                let w = if permute { permute_for_llama_cpp(&w, a.head_dim)? } else { w };
                push(format!("{p}.{name}.weight"), &w)?;
                if let Some(bias) = l.bias() {
                    let bias = if permute { permute_for_llama_cpp(bias, a.head_dim)? } else { bias.clone() };
                    push(format!("{p}.{name}.bias"), &bias)?;
                }
            }
        }
        let mut linear = |name: String, l: &Linear| -> Result<()> {
            push(format!("{name}.weight"), &f32w(l)?)?;
            if let Some(bias) = l.bias() {
                push(format!("{name}.bias"), bias)?;
            }
            Ok(())
        };
        linear(format!("{p}.attn_output"), &a.o)?;
        if let Some(gate) = &b.mlp.gate {
            linear(format!("{p}.ffn_gate"), gate)?;
        }
        linear(format!("{p}.ffn_up"), &b.mlp.up)?;
        linear(format!("{p}.ffn_down"), &b.mlp.down)?;
    }
    push_norm(&mut push, "output_norm", &model.final_norm)?;
    // llama.cpp's gptneox requires output.weight even when it is the embedding.
    if !cfg.tie_word_embeddings || cfg.arch == Arch::GptNeoX {
        push("output.weight".into(), &f32w(&model.lm_head)?)?;
    }
    write_gguf(path, &meta, &tensors)?;
    Ok(())
}
