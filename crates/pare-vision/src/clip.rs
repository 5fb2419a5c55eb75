//! The CLIP ViT vision tower (HF `CLIPVisionModel`): patch embedding, class token, learned
//! positions, pre-LayerNorm, then pre-norm encoder layers with full (non-causal) attention and a
//! quick-GELU MLP.
//!
//! LLaVA reads a hidden state from inside the tower (layer −2), so the tower runs only as many
//! layers as the deepest state asked for; the post-LayerNorm is never needed.

use candle_core::{DType, Tensor};
use pare_model::layers::{Linear, Norm};
use pare_model::weights::Weights;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, VisionError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionActivation {
    /// x · sigmoid(1.702 x), CLIP's default.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh approximation.
    GeluTanh,
}

impl VisionActivation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(VisionActivation::QuickGelu),
            "gelu" => Some(VisionActivation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(VisionActivation::GeluTanh),
            _ => None,
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            VisionActivation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            VisionActivation::Gelu => x.gelu_erf()?,
            VisionActivation::GeluTanh => x.gelu()?,
        })
    }
}

/// `vision_config` of a LLaVA `config.json`; absent keys take `CLIPVisionConfig`'s defaults,
/// as hub checkpoints omit them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: VisionActivation,
}

impl ClipVisionConfig {
    pub fn from_json(json: &Value, path: &str) -> Result<Self> {
        let err = |m: String| VisionError::config(path, format!("vision_config: {m}"));
        if let Some(t) = json.get("model_type").and_then(Value::as_str) {
            if t != "clip_vision_model" {
                return Err(err(format!("vision tower {t:?} is not supported (LLaVA-1.5 uses clip_vision_model)")));
            }
        }
        let int = |key: &str, default: usize| -> Result<usize> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| x as usize)
                    .ok_or_else(|| err(format!("{key} must be a positive integer"))),
            }
        };
        let act_name = json.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu");
        let cfg = ClipVisionConfig {
            hidden_size: int("hidden_size", 768)?,
            intermediate_size: int("intermediate_size", 3072)?,
            num_hidden_layers: int("num_hidden_layers", 12)?,
            num_attention_heads: int("num_attention_heads", 12)?,
            num_channels: int("num_channels", 3)?,
            image_size: int("image_size", 224)?,
            patch_size: int("patch_size", 32)?,
            layer_norm_eps: json.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5),
            hidden_act: VisionActivation::from_hf(act_name)
                .ok_or_else(|| err(format!("unsupported hidden_act {act_name:?}")))?,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(err(format!(
                "image_size {} is not a multiple of patch_size {}",
                cfg.image_size, cfg.patch_size
            )));
        }
        if cfg.num_channels != 3 {
            return Err(err(format!("num_channels {} (pare feeds RGB images)", cfg.num_channels)));
        }
        Ok(cfg)
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens per image (the class token not counted).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug, Clone)]
pub struct ClipLayer {
    pub layer_norm1: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub layer_norm2: Norm,
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Debug, Clone)]
pub struct ClipVision {
    pub config: ClipVisionConfig,
    /// The patch convolution as a matrix (hidden, channels·patch·patch).
    pub patch_embedding: Tensor,
    /// (hidden,)
    pub class_embedding: Tensor,
    /// (patches + 1, hidden)
    pub position_embedding: Tensor,
    pub pre_layernorm: Norm,
    pub layers: Vec<ClipLayer>,
}

fn layer_norm(w: &Weights, prefix: &str, eps: f64, hidden: usize) -> Result<Norm> {
    let weight = w.tensor(&format!("{prefix}.weight"))?;
    let bias = w.tensor(&format!("{prefix}.bias"))?;
    w.expect_shape(prefix, &weight, &[hidden])?;
    w.expect_shape(prefix, &bias, &[hidden])?;
    Ok(Norm::Layer { weight, bias, eps: eps as f32 })
}

fn linear(w: &Weights, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
    let l = w.linear(prefix)?;
    if l.out_features() != out || l.in_features() != inp {
        return Err(pare_model::ModelError::WeightShape {
            name: format!("{prefix}.weight"),
            actual: vec![l.out_features(), l.in_features()],
            expected: format!("[{out}, {inp}]"),
        }
        .into());
    }
    Ok(l)
}

impl ClipVision {
    /// Load the tower under `prefix` (e.g. `model.vision_tower.`), with the first `layers` encoder
    /// layers only: those after the deepest selected hidden state never run.
    pub fn load(config: &ClipVisionConfig, w: &Weights, prefix: &str, layers: usize) -> Result<Self> {
        let (h, p) = (config.hidden_size, config.patch_size);
        let conv = w.tensor(&format!("{prefix}embeddings.patch_embedding.weight"))?;
        w.expect_shape("patch_embedding", &conv, &[h, config.num_channels, p, p])?;
        let class_embedding = w.tensor(&format!("{prefix}embeddings.class_embedding"))?;
        w.expect_shape("class_embedding", &class_embedding, &[h])?;
        let position_embedding = w.tensor(&format!("{prefix}embeddings.position_embedding.weight"))?;
        w.expect_shape("position_embedding", &position_embedding, &[config.num_patches() + 1, h])?;
        let eps = config.layer_norm_eps;
        let layers = (0..layers)
            .map(|i| {
                let l = format!("{prefix}encoder.layers.{i}");
                Ok(ClipLayer {
                    layer_norm1: layer_norm(w, &format!("{l}.layer_norm1"), eps, h)?,
                    q: linear(w, &format!("{l}.self_attn.q_proj"), h, h)?,
                    k: linear(w, &format!("{l}.self_attn.k_proj"), h, h)?,
                    v: linear(w, &format!("{l}.self_attn.v_proj"), h, h)?,
                    out: linear(w, &format!("{l}.self_attn.out_proj"), h, h)?,
                    layer_norm2: layer_norm(w, &format!("{l}.layer_norm2"), eps, h)?,
                    fc1: linear(w, &format!("{l}.mlp.fc1"), config.intermediate_size, h)?,
                    fc2: linear(w, &format!("{l}.mlp.fc2"), h, config.intermediate_size)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVision {
            config: config.clone(),
            patch_embedding: conv.reshape((h, config.num_channels * p * p))?,
            class_embedding,
            position_embedding,
            pre_layernorm: layer_norm(w, &format!("{prefix}pre_layrnorm"), eps, h)?,
            layers,
        })
    }

    /// Hidden states of `pixel_values` (batch, 3, size, size): entry 0 is the embeddings after
    /// the pre-LayerNorm, entry i the output of layer i (HF's `hidden_states` tuple, as far as
    /// the loaded layers go). Each is (batch, patches + 1, hidden), the class token first.
    pub fn hidden_states(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        let (batch, channels, height, width) = pixel_values.dims4()?;
        if channels != cfg.num_channels || height != cfg.image_size || width != cfg.image_size {
            return Err(VisionError::input(format!(
                "the vision tower takes {}×{}×{} pixel values, got {channels}×{height}×{width}",
                cfg.num_channels, cfg.image_size, cfg.image_size
            )));
        }
        let dtype = self.patch_embedding.dtype();
        let (g, p, h) = (cfg.grid(), cfg.patch_size, cfg.hidden_size);
        // Stride-p convolution = each patch (c, ky, kx) flattened, times the kernel matrix.
        let patches = pixel_values
            .to_dtype(dtype)?
            .reshape((batch, channels, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((batch * g * g, channels * p * p))?;
        let embeds = patches.matmul(&self.patch_embedding.t()?)?.reshape((batch, g * g, h))?;
        let class = self.class_embedding.reshape((1, 1, h))?.broadcast_as((batch, 1, h))?;
        let x = Tensor::cat(&[&class, &embeds], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layernorm.forward(&x)?;
        let mut states = vec![x.clone()];
        for layer in &self.layers {
            x = self.layer_forward(layer, &x)?;
            states.push(x.clone());
        }
        Ok(states)
    }

    fn layer_forward(&self, l: &ClipLayer, x: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, n, h) = x.dims3()?;
        let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
        let normed = l.layer_norm1.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?) };
        let q = split(l.q.forward(&normed)?)?;
        let k = split(l.k.forward(&normed)?)?;
        let v = split(l.v.forward(&normed)?)?;
        // HF's eager attention: softmax in float32 over every patch (no mask), back to the dtype.
        let scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, n, h))?;
        let x = (x + l.out.forward(&ctx)?)?;
        let mlp = l.fc2.forward(&cfg.hidden_act.apply(&l.fc1.forward(&l.layer_norm2.forward(&x)?)?)?)?;
        Ok((x + mlp)?)
    }
}
