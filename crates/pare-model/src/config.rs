//! The decoder's configuration, read from an HF `config.json` or from GGUF metadata.
//!
//! One config drives every supported architecture: the Llama family (Llama 2/3, Mistral, Qwen2) and
//! GPT-NeoX differ only in the switches below. Per-layer head counts and MLP widths are not part of
//! it: they are read off the weights, so structurally pruned checkpoints load unchanged.

use pare_formats::GgufFile;
use serde::Serialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    GptNeoX,
}

impl Arch {
    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::GptNeoX => "gpt_neox",
        }
    }

    /// The HF `architectures[0]` class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::GptNeoX => "GPTNeoXForCausalLM",
        }
    }

    fn from_model_type(name: &str) -> Result<Self> {
        // pare_*: pare's exports whose layers differ, loaded by transformers through modeling_pare.py.
        match name.strip_prefix("pare_").unwrap_or(name) {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            "gpt_neox" | "gptneox" => Ok(Arch::GptNeoX),
            other => Err(ModelError::UnknownArchitecture(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU, HF's "gelu".
    Gelu,
    /// Tanh approximation, HF's "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast".
    GeluTanh,
    Relu,
}

impl Activation {
    fn from_hf(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(ModelError::input(format!("unsupported activation {other:?}"))),
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
        }
    }
}

/// RoPE frequency scaling, as HF's `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    Default,
    Linear { factor: f32 },
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The unpruned MLP width; a layer's actual width comes from its weights.
    pub intermediate_size: usize,
    pub num_layers: usize,
    /// The unpruned head counts; a layer's actual counts come from its weights.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (GPT-NeoX's `rotary_pct` < 1 leaves the rest).
    pub rotary_dim: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub activation: Activation,
    /// Mistral's sliding window: a query attends keys less than this many positions back.
    pub sliding_window: Option<usize>,
    /// GPT-NeoX: attention and MLP both read the block input and are added to it together.
    pub parallel_residual: bool,
    /// Per-layer shapes of a non-uniformly pruned checkpoint, when its config states them
    /// (config.json `*_per_layer` keys, GGUF per-layer arrays); the loader checks the weights
    /// against them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_shapes: Option<LayerShapes>,
}

/// Head counts and MLP widths per layer (structured pruning makes them differ).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerShapes {
    pub num_heads: Vec<usize>,
    pub num_kv_heads: Vec<usize>,
    pub intermediate_size: Vec<usize>,
}

impl LayerShapes {
    /// config.json keys pare writes for non-uniform models (transformers ignores them).
    pub const HF_KEYS: [&'static str; 3] =
        ["num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"];

    /// Per-layer values from `per_layer` lists where given, the uniform value elsewhere.
    fn build(
        num_layers: usize,
        uniform: [usize; 3],
        per_layer: [Option<Vec<usize>>; 3],
    ) -> std::result::Result<Option<Self>, String> {
        if per_layer.iter().all(Option::is_none) {
            return Ok(None);
        }
        // Lengths first: a uniform value is repeated num_layers times only once a given list,
        // bounded by the file's size, has shown that many layers.
        for (list, key) in per_layer.iter().zip(Self::HF_KEYS) {
            if let Some(list) = list.as_ref().filter(|l| l.len() != num_layers) {
                return Err(format!("{key} has {} entries for {num_layers} layers", list.len()));
            }
        }
        let mut lists = Vec::with_capacity(3);
        for (list, value) in per_layer.into_iter().zip(uniform) {
            lists.push(list.unwrap_or_else(|| vec![value; num_layers]));
        }
        let shapes = LayerShapes {
            intermediate_size: lists.pop().unwrap(),
            num_kv_heads: lists.pop().unwrap(),
            num_heads: lists.pop().unwrap(),
        };
        for (i, ((&h, &kv), &w)) in
            shapes.num_heads.iter().zip(&shapes.num_kv_heads).zip(&shapes.intermediate_size).enumerate()
        {
            if kv == 0 || h == 0 || h % kv != 0 || w == 0 {
                return Err(format!("layer {i}: {h} heads, {kv} KV heads, MLP width {w} (heads must be a positive multiple of KV heads)"));
            }
        }
        Ok(Some(shapes))
    }
}

impl ModelConfig {
    /// LayerNorm with bias (GPT-NeoX) instead of RMSNorm.
    pub fn uses_layer_norm(&self) -> bool {
        self.arch == Arch::GptNeoX
    }

    /// SwiGLU (gate, up, down) instead of a plain two-matrix MLP.
    pub fn gated_mlp(&self) -> bool {
        self.arch != Arch::GptNeoX
    }

    /// Parse an HF `config.json` (transformers 4.x keys and 5.x `rope_parameters` both accepted).
    pub fn from_hf_json(json: &Value, path: &str) -> Result<Self> {
        let err = |message: String| ModelError::Config { path: path.to_string(), message };
        let model_type = json.get("model_type").and_then(Value::as_str).ok_or_else(|| err("no model_type".into()))?;
        let arch = Arch::from_model_type(model_type)?;
        let usize_key = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| err(format!("missing or non-integer {key:?}")))
        };
        let opt_f64 = |key: &str| json.get(key).and_then(Value::as_f64);
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        // Pruned heads leave hidden_size ≠ heads × head_dim; head_dim is then stated.
        let explicit_head_dim = json.get("head_dim").and_then(Value::as_u64).is_some();
        if num_heads == 0 || (!explicit_head_dim && hidden_size % num_heads != 0) {
            return Err(err(format!("hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")));
        }
        let num_kv_heads =
            json.get("num_key_value_heads").and_then(Value::as_u64).map(|v| v as usize).unwrap_or(num_heads);
        let head_dim =
            json.get("head_dim").and_then(Value::as_u64).map(|v| v as usize).unwrap_or(hidden_size / num_heads);
        let rope_params = json.get("rope_parameters").or_else(|| json.get("rope_scaling")).filter(|v| !v.is_null());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| opt_f64("rope_theta"))
            .or_else(|| opt_f64("rotary_emb_base"))
            .unwrap_or(10_000.0) as f32;
        let rope_scaling = match rope_params {
            None => RopeScaling::Default,
            Some(p) => parse_rope_scaling(p).map_err(err)?,
        };
        let rotary_pct = rope_params
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .or_else(|| opt_f64("rotary_pct"))
            .or_else(|| opt_f64("partial_rotary_factor"))
            .unwrap_or(1.0);
        let (norm_eps, default_act) = match arch {
            Arch::GptNeoX => (opt_f64("layer_norm_eps").unwrap_or(1e-5), "gelu"),
            _ => (opt_f64("rms_norm_eps").unwrap_or(1e-6), "silu"),
        };
        let activation = Activation::from_hf(json.get("hidden_act").and_then(Value::as_str).unwrap_or(default_act))?;
        let tie_default = arch == Arch::Qwen2; // HF's per-class defaults
        let sliding_window = match arch {
            Arch::Mistral => json.get("sliding_window").and_then(Value::as_u64).map(|v| v as usize),
            Arch::Qwen2 if json.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
                return Err(err("qwen2 use_sliding_window=true is not supported".into()))
            }
            _ => None,
        };
        let num_layers = usize_key("num_hidden_layers")?;
        let intermediate_size = usize_key("intermediate_size")?;
        let per_layer = |key: &str| -> Result<Option<Vec<usize>>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|x| x as usize)
                            .ok_or_else(|| err(format!("{key} must hold non-negative integers")))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
                Some(_) => Err(err(format!("{key} must be a list"))),
            }
        };
        let [h_key, kv_key, w_key] = LayerShapes::HF_KEYS;
        let layer_shapes = LayerShapes::build(
            num_layers,
            [num_heads, num_kv_heads, intermediate_size],
            [per_layer(h_key)?, per_layer(kv_key)?, per_layer(w_key)?],
        )
        .map_err(err)?;
        let cfg = ModelConfig {
            arch,
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim: ((head_dim as f64 * rotary_pct) as usize) & !1,
            rope_theta,
            rope_scaling,
            norm_eps,
            max_position_embeddings: usize_key("max_position_embeddings")?,
            tie_word_embeddings: json.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(tie_default),
            activation,
            sliding_window,
            parallel_residual: arch == Arch::GptNeoX
                && json.get("use_parallel_residual").and_then(Value::as_bool).unwrap_or(true),
            layer_shapes,
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Build the config from GGUF metadata (`{arch}.embedding_length` etc.).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path.display().to_string();
        let err = |message: String| ModelError::Config { path: path.clone(), message };
        let arch_name = gguf.architecture()?.to_string();
        let arch = match arch_name.as_str() {
            // deci: llama.cpp's Llama with per-layer shapes (pare's non-uniform exports).
            "llama" | "deci" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gptneox" => Arch::GptNeoX,
            other => return Err(ModelError::UnknownArchitecture(other.to_string())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let get = |k: &str| -> Result<usize> { Ok(gguf.get_u64(&key(k))? as usize) };
        let num_layers = get("block_count")?;
        // llama.cpp allows per-layer arrays for these three (structurally pruned models).
        let per_layer = |k: &str| -> Result<Option<Vec<usize>>> {
            match gguf.get(&key(k)).and_then(|v| v.as_array()) {
                None => Ok(None),
                Some(items) => items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|x| x as usize)
                            .ok_or_else(|| err(format!("{} must hold non-negative integers", key(k))))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
            }
        };
        let (heads_list, kv_list, ffn_list) = (
            per_layer("attention.head_count")?,
            per_layer("attention.head_count_kv")?,
            per_layer("feed_forward_length")?,
        );
        let uniform = |k: &str, list: &Option<Vec<usize>>| -> Result<usize> {
            match list {
                Some(l) => Ok(l.iter().copied().max().unwrap_or(0)),
                None => get(k),
            }
        };
        let hidden_size = get("embedding_length")?;
        let num_heads = uniform("attention.head_count", &heads_list)?;
        let explicit_head_dim = gguf.get(&key("attention.key_length")).is_some();
        if num_heads == 0 || (!explicit_head_dim && hidden_size % num_heads != 0) {
            return Err(err(format!("embedding_length {hidden_size} is not a multiple of head_count {num_heads}")));
        }
        let num_kv_heads = match &kv_list {
            Some(l) => l.iter().copied().max().unwrap_or(0),
            None => gguf.get_u64(&key("attention.head_count_kv")).map(|v| v as usize).unwrap_or(num_heads),
        };
        let intermediate_size = uniform("feed_forward_length", &ffn_list)?;
        let layer_shapes = LayerShapes::build(
            num_layers,
            [num_heads, num_kv_heads, intermediate_size],
            [
                heads_list.clone(),
                kv_list.clone().or_else(|| {
                    heads_list.as_ref().filter(|_| gguf.get(&key("attention.head_count_kv")).is_none()).cloned()
                }),
                ffn_list,
            ],
        )
        .map_err(err)?;
        let head_dim =
            gguf.get_u64(&key("attention.key_length")).map(|v| v as usize).unwrap_or(hidden_size / num_heads);
        let rotary_dim = gguf.get_u64(&key("rope.dimension_count")).map(|v| v as usize).unwrap_or(head_dim);
        let norm_eps = match arch {
            Arch::GptNeoX => gguf.get_f64(&key("attention.layer_norm_epsilon"))?,
            _ => gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        };
        let vocab_size = match gguf.get_u64(&key("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => gguf
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| err("no vocab_size and no tokenizer.ggml.tokens".into()))?,
        };
        let rope_scaling = match gguf.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear { factor: gguf.get_f64(&key("rope.scaling.factor"))? as f32 },
            Some(other) => return Err(err(format!("unsupported rope scaling {other:?}"))),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rope_theta: gguf.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32,
            rope_scaling,
            norm_eps,
            max_position_embeddings: get("context_length")?,
            tie_word_embeddings: gguf.tensor_info("output.weight").is_none(),
            activation: if arch == Arch::GptNeoX { Activation::Gelu } else { Activation::Silu },
            sliding_window: None,
            parallel_residual: arch == Arch::GptNeoX
                && gguf.get(&key("use_parallel_residual")).and_then(|v| v.as_bool()).unwrap_or(true),
            layer_shapes,
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        // Per-layer shapes were checked layer by layer; their maxima need not divide.
        if self.layer_shapes.is_none() && (self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads))
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.rotary_dim > self.head_dim || !self.head_dim.is_multiple_of(2) {
            return Err(format!("rotary dim {} does not fit head_dim {}", self.rotary_dim, self.head_dim));
        }
        if [self.vocab_size, self.hidden_size, self.num_layers, self.intermediate_size].contains(&0) {
            return Err("vocab_size, hidden_size, num_hidden_layers and intermediate_size must be positive".into());
        }
        if self.head_dim == 0 || self.max_position_embeddings == 0 {
            return Err("head_dim and max_position_embeddings must be positive".into());
        }
        // Non-finite or non-positive values here load, then turn every activation into NaN.
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta must be a finite number > 0, got {}", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!("the norm epsilon must be a finite number > 0, got {}", self.norm_eps));
        }
        let factors = match self.rope_scaling {
            RopeScaling::Default => vec![],
            RopeScaling::Linear { factor } => vec![factor],
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, .. } => {
                vec![factor, low_freq_factor, high_freq_factor]
            }
        };
        if let Some(f) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(format!("rope scaling factors must be finite numbers > 0, got {f}"));
        }
        Ok(())
    }

    /// An HF `config.json` for this model (used by `pare convert` and pruning export).
    pub fn to_hf_json(&self) -> Value {
        let mut j = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.activation.hf_name(),
            "torch_dtype": "float32",
        });
        let o = j.as_object_mut().expect("json object");
        if let Some(shapes) = &self.layer_shapes {
            for (key, list) in
                LayerShapes::HF_KEYS.iter().zip([&shapes.num_heads, &shapes.num_kv_heads, &shapes.intermediate_size])
            {
                o.insert(key.to_string(), list.iter().map(|&v| Value::from(v)).collect());
            }
        }
        if self.arch == Arch::GptNeoX && self.num_heads * self.head_dim != self.hidden_size {
            // Pruned heads: pare reads head_dim back (transformers cannot run this shape).
            o.insert("head_dim".into(), self.head_dim.into());
        }
        let rope = match self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
            }
        };
        match self.arch {
            Arch::GptNeoX => {
                o.insert("rotary_pct".into(), (self.rotary_dim as f64 / self.head_dim as f64).into());
                o.insert("rotary_emb_base".into(), (self.rope_theta as f64).into());
                o.insert("layer_norm_eps".into(), self.norm_eps.into());
                o.insert("use_parallel_residual".into(), self.parallel_residual.into());
                o.insert("attention_bias".into(), true.into());
            }
            _ => {
                o.insert("num_key_value_heads".into(), self.num_kv_heads.into());
                o.insert("head_dim".into(), self.head_dim.into());
                o.insert("rms_norm_eps".into(), self.norm_eps.into());
                o.insert("rope_theta".into(), (self.rope_theta as f64).into());
                o.insert("rope_scaling".into(), rope);
                if self.arch == Arch::Llama {
                    o.insert("attention_bias".into(), false.into());
                    o.insert("mlp_bias".into(), false.into());
                }
                if self.arch == Arch::Mistral {
                    o.insert("sliding_window".into(), self.sliding_window.into());
                }
            }
        }
        j
    }
}

fn parse_rope_scaling(p: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = |k: &str| p.get(k).and_then(Value::as_f64).map(|v| v as f32);
    let need = |k: &str| f(k).ok_or_else(|| format!("rope scaling {kind:?} needs {k:?}"));
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: need("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: p
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or("rope scaling llama3 needs original_max_position_embeddings")?
                as usize,
        }),
        other => Err(format!("unsupported rope scaling {other:?} (pare supports default, linear, llama3)")),
    }
}
