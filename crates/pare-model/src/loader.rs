//! Loading a model by path or alias: detect the format, read the config, build the layers, and
//! bring the tokenizer and generation defaults along.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use pare_formats::{GgufFile, SafetensorsStore, TokenizerBundle};
use serde_json::Value;

use crate::attention::Attention;
use crate::cache::KvDtype;
use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::layers::{Linear, Mlp, Norm};
use crate::model::{Block, Model};
use crate::rope::Rope;
use crate::weights::{WeightDType, WeightSource, Weights};

/// Model aliases that resolve to files `make assets` / `make assets-extra` / `make assets-large`
/// fetch, weakest first.
pub const ALIASES: &[(&str, &str)] = &[
    ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"),
    ("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"),
];

/// The alias of the most capable model whose file is present (the last of [`ALIASES`] found),
/// else the first alias.
pub fn strongest_present() -> &'static str {
    ALIASES.iter().rev().find(|(_, file)| assets_dir().join(file).exists()).unwrap_or(&ALIASES[0]).0
}

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Option<TokenizerBundle>,
    /// generation_config.json, when the checkpoint has one.
    pub generation_config: Option<Value>,
    pub path: PathBuf,
    pub format: &'static str,
}

impl LoadedModel {
    pub fn tokenizer(&self) -> Result<&TokenizerBundle> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::input(format!("{}: the checkpoint has no tokenizer", self.path.display())))
    }

    /// EOS ids: generation_config.json's, else the tokenizer's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from_gen = self.generation_config.as_ref().and_then(|g| g.get("eos_token_id")).map(|v| match v {
            Value::Array(a) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            v => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        });
        match from_gen {
            Some(ids) if !ids.is_empty() => ids,
            _ => self.tokenizer.as_ref().map(|t| t.eos_token_ids.clone()).unwrap_or_default(),
        }
    }
}

/// The directory holding fetched assets: $PARE_ASSETS, ./assets, or `assets/` next to the
/// repository the binary was built from.
pub fn assets_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PARE_ASSETS") {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("assets");
    if local.is_dir() {
        return local;
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let candidate = dir.join("assets");
            if candidate.is_dir() {
                return candidate;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// Resolve an alias or a path to an existing file or directory.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    if let Some((_, file)) = ALIASES.iter().find(|(alias, _)| *alias == spec) {
        let path = assets_dir().join(file);
        return if path.exists() {
            Ok(path)
        } else {
            Err(ModelError::NotFound(format!("{spec} → {}", path.display())))
        };
    }
    let path = PathBuf::from(spec);
    // Only a path that is not there is "not found"; a symlink loop or a permission problem is
    // reported as what it is.
    match std::fs::metadata(&path) {
        Ok(_) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ModelError::NotFound(spec.to_string())),
        Err(source) => Err(ModelError::Io { path: spec.to_string(), source }),
    }
}

pub fn load(spec: &str, dtype: WeightDType, device: &Device) -> Result<LoadedModel> {
    let path = resolve_model(spec)?;
    if path.is_dir() {
        load_hf_dir(&path, dtype, device)
    } else {
        load_gguf(&path, dtype, device)
    }
}

pub fn load_gguf(path: &Path, dtype: WeightDType, device: &Device) -> Result<LoadedModel> {
    let gguf = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&gguf)?;
    // A GGUF without tokenizer keys (e.g. exported from an id-only checkpoint) still runs on ids.
    let tokenizer =
        if gguf.get("tokenizer.ggml.model").is_some() { Some(TokenizerBundle::from_gguf(&gguf)?) } else { None };
    let source = WeightSource::Gguf(gguf);
    let model =
        build(&config, &Weights { source: &source, config: &config, dtype, device }, &DecoderNames::of(config.arch))?;
    Ok(LoadedModel { model, tokenizer, generation_config: None, path: path.to_path_buf(), format: "gguf" })
}

pub fn load_hf_dir(dir: &Path, dtype: WeightDType, device: &Device) -> Result<LoadedModel> {
    let read_json = |name: &str| -> Result<Option<Value>> {
        let p = dir.join(name);
        if !p.exists() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&p).map_err(|source| ModelError::Io { path: p.display().to_string(), source })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Config { path: p.display().to_string(), message: format!("invalid JSON: {e}") })
    };
    let config_json = read_json("config.json")?
        .ok_or_else(|| ModelError::Config { path: dir.display().to_string(), message: "no config.json".into() })?;
    let config = ModelConfig::from_hf_json(&config_json, &dir.join("config.json").display().to_string())?;
    let tokenizer = if dir.join("tokenizer.json").exists() { Some(TokenizerBundle::from_hf_dir(dir)?) } else { None };
    let source = WeightSource::Safetensors(SafetensorsStore::open_dir(dir)?);
    let model =
        build(&config, &Weights { source: &source, config: &config, dtype, device }, &DecoderNames::of(config.arch))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        generation_config: read_json("generation_config.json")?,
        path: dir.to_path_buf(),
        format: "safetensors",
    })
}

/// Where a decoder's weights sit in a checkpoint (HF names; GGUF names are mapped from them).
#[derive(Debug, Clone)]
pub struct DecoderNames {
    pub embed: String,
    pub final_norm: String,
    pub lm_head: String,
    /// Layer i's weights are under `{layers}.{i}`.
    pub layers: String,
}

impl DecoderNames {
    /// A causal LM checkpoint of this architecture.
    pub fn of(arch: Arch) -> Self {
        match arch {
            Arch::GptNeoX => Self::new(
                "gpt_neox.embed_in.weight",
                "gpt_neox.final_layer_norm",
                "embed_out.weight",
                "gpt_neox.layers",
            ),
            _ => Self::llama_under("model.", "lm_head.weight"),
        }
    }

    /// A Llama-family decoder under `prefix` (a VLM's language model), its head at `lm_head`.
    pub fn llama_under(prefix: &str, lm_head: &str) -> Self {
        Self::new(
            &format!("{prefix}embed_tokens.weight"),
            &format!("{prefix}norm"),
            lm_head,
            &format!("{prefix}layers"),
        )
    }

    fn new(embed: &str, final_norm: &str, lm_head: &str, layers: &str) -> Self {
        DecoderNames {
            embed: embed.into(),
            final_norm: final_norm.into(),
            lm_head: lm_head.into(),
            layers: layers.into(),
        }
    }
}

/// The decoder from pare's building blocks: shapes checked against the config, head counts and
/// MLP widths read from each layer's weights (structurally pruned layers load as they are).
pub fn build(config: &ModelConfig, w: &Weights, names: &DecoderNames) -> Result<Model> {
    // On CPU the weights are copies in anonymous memory (quantized ones stay near their file size).
    if let (WeightDType::Float(dtype), true) = (w.dtype, w.device.is_cpu()) {
        let bytes = config.parameter_count().and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64));
        crate::memory::ensure_fits("loading the model's weights", bytes)?;
    }
    let (embed_name, norm_prefix, head_name, layer_prefix) =
        (names.embed.as_str(), names.final_norm.as_str(), names.lm_head.as_str(), names.layers.as_str());
    let embed_tokens = w.tensor(embed_name)?;
    w.expect_shape(embed_name, &embed_tokens, &[config.vocab_size, config.hidden_size])?;
    let blocks = (0..config.num_layers)
        .map(|i| build_block(config, w, &format!("{layer_prefix}.{i}")))
        .collect::<Result<Vec<_>>>()?;
    if let Some(shapes) = &config.layer_shapes {
        check_layer_shapes(shapes, &blocks)?;
    }
    let final_norm = norm(config, w, norm_prefix)?;
    let lm_head = if w.contains(head_name) {
        w.linear(head_name.trim_end_matches(".weight"))?
    } else if config.tie_word_embeddings {
        tied_head(w, embed_name, &embed_tokens)?
    } else {
        // An untied checkpoint without its head is broken, not tied.
        return Err(ModelError::MissingWeight(head_name.to_string()));
    };
    if lm_head.in_features() != config.hidden_size || lm_head.out_features() != config.vocab_size {
        return Err(ModelError::WeightShape {
            name: head_name.into(),
            actual: vec![lm_head.out_features(), lm_head.in_features()],
            expected: format!("[{}, {}]", config.vocab_size, config.hidden_size),
        });
    }
    let mut model = Model {
        config: config.clone(),
        embed_tokens,
        blocks,
        final_norm,
        lm_head,
        rope: Rope::new(config),
        dtype: w.dtype.activation_dtype(),
        kv_dtype: KvDtype::Float(w.dtype.activation_dtype()),
        device: w.device.clone(),
        shard: None,
        ranks: Vec::new(),
    };
    // On a GPU a decode step is a pass over the weights: fewer, larger products run nearer the
    // memory bandwidth. On CPU the separate dense products are as fast and keep the weights
    // simple; quantized ones stack (one activation quantization and one pool dispatch per step).
    if model.device.is_cuda() || w.dtype == WeightDType::Quantized {
        model.fuse_projections()?;
    }
    Ok(model)
}

/// A pruned checkpoint's config states per-layer shapes; the weights must have them.
fn check_layer_shapes(shapes: &crate::config::LayerShapes, blocks: &[Block]) -> Result<()> {
    for (i, b) in blocks.iter().enumerate() {
        let stated = (shapes.num_heads[i], shapes.num_kv_heads[i], shapes.intermediate_size[i]);
        let actual = (b.attn.num_heads, b.attn.num_kv_heads, b.mlp.width());
        if stated != actual {
            return Err(ModelError::WeightShape {
                name: format!("layer {i} (heads, kv heads, MLP width)"),
                actual: vec![actual.0, actual.1, actual.2],
                expected: format!("{stated:?} as the config states"),
            });
        }
    }
    Ok(())
}

/// Tied embeddings: the LM head reuses the embedding matrix (quantized too under `--dtype q`).
fn tied_head(w: &Weights, embed_name: &str, embed: &Tensor) -> Result<Linear> {
    match (w.dtype, w.source) {
        (WeightDType::Quantized, WeightSource::Gguf(_)) => w.linear(embed_name.trim_end_matches(".weight")),
        _ => Ok(Linear::Dense { weight: embed.clone(), bias: None }),
    }
}

fn norm(config: &ModelConfig, w: &Weights, prefix: &str) -> Result<Norm> {
    let weight = w.tensor(&format!("{prefix}.weight"))?;
    w.expect_shape(prefix, &weight, &[config.hidden_size])?;
    let eps = config.norm_eps as f32;
    if config.uses_layer_norm() {
        Ok(Norm::Layer { weight, bias: w.tensor(&format!("{prefix}.bias"))?, eps })
    } else {
        Ok(Norm::Rms { weight, eps })
    }
}

fn build_block(config: &ModelConfig, w: &Weights, prefix: &str) -> Result<Block> {
    let d = config.head_dim;
    let attn = match config.arch {
        Arch::GptNeoX => neox_attention(config, w, prefix)?,
        _ => {
            let q = w.linear(&format!("{prefix}.self_attn.q_proj"))?;
            let k = w.linear(&format!("{prefix}.self_attn.k_proj"))?;
            let v = w.linear(&format!("{prefix}.self_attn.v_proj"))?;
            let o = w.linear(&format!("{prefix}.self_attn.o_proj"))?;
            attention_from(config, prefix, q, k, v, o)?
        }
    };
    let mlp = match config.arch {
        Arch::GptNeoX => Mlp {
            gate: None,
            up: w.linear(&format!("{prefix}.mlp.dense_h_to_4h"))?,
            down: w.linear(&format!("{prefix}.mlp.dense_4h_to_h"))?,
            activation: config.activation,
            gate_up: None,
        },
        _ => Mlp {
            gate: Some(w.linear(&format!("{prefix}.mlp.gate_proj"))?),
            up: w.linear(&format!("{prefix}.mlp.up_proj"))?,
            down: w.linear(&format!("{prefix}.mlp.down_proj"))?,
            activation: config.activation,
            gate_up: None,
        },
    };
    if mlp.up.in_features() != config.hidden_size
        || mlp.down.out_features() != config.hidden_size
        || mlp.down.in_features() != mlp.width()
        || mlp.gate.as_ref().is_some_and(|g| g.out_features() != mlp.width() || g.in_features() != config.hidden_size)
    {
        return Err(ModelError::WeightShape {
            name: format!("{prefix}.mlp"),
            actual: vec![mlp.width()],
            expected: "consistent MLP widths".into(),
        });
    }
    debug_assert!(d > 0);
    Ok(Block {
        attn_norm: norm(config, w, &format!("{prefix}.input_layernorm"))?,
        attn,
        mlp_norm: norm(config, w, &format!("{prefix}.post_attention_layernorm"))?,
        mlp,
    })
}

/// Head counts come from the weights, so layers with pruned heads load as they are.
fn attention_from(config: &ModelConfig, prefix: &str, q: Linear, k: Linear, v: Linear, o: Linear) -> Result<Attention> {
    let d = config.head_dim;
    let hidden = config.hidden_size;
    let bad = |what: &str| ModelError::WeightShape {
        name: format!("{prefix} attention {what}"),
        actual: vec![q.out_features(), k.out_features(), v.out_features(), o.in_features()],
        expected: format!("multiples of head_dim {d}, q heads a multiple of kv heads"),
    };
    let (num_heads, num_kv_heads) = (q.out_features() / d, k.out_features() / d);
    if !q.out_features().is_multiple_of(d)
        || !k.out_features().is_multiple_of(d)
        || num_kv_heads == 0
        || num_heads % num_kv_heads != 0
    {
        return Err(bad("head counts"));
    }
    if v.out_features() != k.out_features()
        || o.in_features() != q.out_features()
        || [q.in_features(), k.in_features(), v.in_features(), o.out_features()].iter().any(|&x| x != hidden)
    {
        return Err(bad("shapes"));
    }
    Ok(Attention { q, k, v, o, num_heads, num_kv_heads, head_dim: d, qkv: None })
}

/// GPT-NeoX fuses q, k, v per head as rows [h0: q k v, h1: q k v, ...] (HF layout) or, in GGUF,
/// as [all q; all k; all v]. Split them into separate projections.
fn neox_attention(config: &ModelConfig, w: &Weights, prefix: &str) -> Result<Attention> {
    let name = format!("{prefix}.attention.query_key_value");
    let weight = w.tensor(&format!("{name}.weight"))?;
    let bias = if w.contains(&format!("{name}.bias")) { Some(w.tensor(&format!("{name}.bias"))?) } else { None };
    let (rows, _) = weight.dims2()?;
    let d = config.head_dim;
    if rows % (3 * d) != 0 {
        return Err(ModelError::WeightShape {
            name,
            actual: weight.dims().to_vec(),
            expected: format!("rows a multiple of 3×{d}"),
        });
    }
    let heads = rows / (3 * d);
    let gguf_layout = matches!(w.source, WeightSource::Gguf(_));
    let part = |which: usize| -> Result<Linear> {
        let idx: Vec<u32> = (0..heads)
            .flat_map(|h| {
                (0..d).map(move |i| if gguf_layout { which * heads * d + h * d + i } else { h * 3 * d + which * d + i })
            })
            .map(|r| r as u32)
            .collect();
        let idx = Tensor::from_vec(idx, heads * d, w.device)?;
        Weights::linear_rows(&weight, bias.as_ref(), &idx)
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let o = w.linear(&format!("{prefix}.attention.dense"))?;
    attention_from(config, prefix, q, k, v, o)
}
