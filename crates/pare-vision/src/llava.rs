//! LLaVA-1.5 (HF `LlavaForConditionalGeneration`): the CLIP tower's hidden state of layer −2
//! without its class token, projected into the decoder's embedding space, replaces the `<image>`
//! placeholder embeddings (one per patch); the decoder then runs as for text, so decoding
//! continues with pare's own `Model::decode` over the returned cache.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use pare_formats::{SafetensorsStore, TokenizerBundle};
use pare_model::config::{Arch, ModelConfig};
use pare_model::loader::DecoderNames;
use pare_model::weights::{WeightDType, WeightSource, Weights};
use pare_model::{Hooks, KvCache, LoadedModel, Logits, Model, ModelError, Phase, PrefillInput};
use serde::Serialize;
use serde_json::Value;

use crate::clip::{ClipVision, ClipVisionConfig, VisionActivation};
use crate::error::{Result, VisionError};
use crate::preprocess::ImageProcessor;
use crate::projector::Projector;

/// Which vision tokens LLaVA keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureStrategy {
    /// Patch tokens only (the class token dropped): LLaVA-1.5.
    Default,
    /// Class token and patches.
    Full,
}

#[derive(Debug, Clone, Serialize)]
pub struct LlavaConfig {
    pub image_token_id: u32,
    /// Indices into the tower's hidden states (0 = embeddings, negative from the end), concatenated.
    pub feature_layers: Vec<i64>,
    pub strategy: FeatureStrategy,
    pub projector_act: VisionActivation,
    pub vision: ClipVisionConfig,
    pub text: ModelConfig,
}

/// `LlamaConfig`'s defaults: hub LLaVA configs state only what differs from them.
const LLAMA_DEFAULTS: &[(&str, u64)] = &[
    ("vocab_size", 32000),
    ("hidden_size", 4096),
    ("intermediate_size", 11008),
    ("num_hidden_layers", 32),
    ("num_attention_heads", 32),
    ("max_position_embeddings", 2048),
];

/// Whether a `config.json` describes a LLaVA model.
pub fn is_llava_config(json: &Value) -> bool {
    json.get("model_type").and_then(Value::as_str) == Some("llava")
}

/// Whether `dir` holds a LLaVA checkpoint (reads its config.json only).
pub fn is_llava_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|j| is_llava_config(&j))
}

impl LlavaConfig {
    pub fn from_json(json: &Value, path: &str) -> Result<Self> {
        let err = |m: String| VisionError::config(path, m);
        if !is_llava_config(json) {
            return Err(err("not a LLaVA config (model_type is not \"llava\")".into()));
        }
        let image_token_id = json
            .get("image_token_index")
            .or_else(|| json.get("image_token_id"))
            .and_then(Value::as_u64)
            .unwrap_or(32000) as u32;
        let feature_layers = match json.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![-2],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| v.as_i64().ok_or_else(|| err("vision_feature_layer must hold integers".into())))
                .collect::<Result<_>>()?,
            Some(v) => vec![v.as_i64().ok_or_else(|| err(format!("vision_feature_layer {v} is not an integer")))?],
        };
        let strategy = match json.get("vision_feature_select_strategy").and_then(Value::as_str).unwrap_or("default") {
            "default" => FeatureStrategy::Default,
            "full" => FeatureStrategy::Full,
            other => return Err(err(format!("vision_feature_select_strategy {other:?} (expected default or full)"))),
        };
        let act = json.get("projector_hidden_act").and_then(Value::as_str).unwrap_or("gelu");
        let projector_act =
            VisionActivation::from_hf(act).ok_or_else(|| err(format!("unsupported projector_hidden_act {act:?}")))?;
        let vision = ClipVisionConfig::from_json(json.get("vision_config").unwrap_or(&Value::Null), path)?;
        let text = ModelConfig::from_hf_json(&text_config_json(json), &format!("{path} (text_config)"))?;
        if text.arch == Arch::GptNeoX {
            return Err(err("a GPT-NeoX language model in LLaVA is not supported".into()));
        }
        let cfg = LlavaConfig { image_token_id, feature_layers, strategy, projector_act, vision, text };
        let layers = cfg.vision.num_hidden_layers as i64;
        if let Some(bad) = cfg.feature_layers.iter().find(|&&l| l > layers || l < -(layers + 1)) {
            return Err(err(format!("vision_feature_layer {bad} is outside the tower's {} hidden states", layers + 1)));
        }
        if image_token_id as usize >= cfg.text.vocab_size {
            return Err(err(format!(
                "image_token_index {image_token_id} is outside the vocabulary ({})",
                cfg.text.vocab_size
            )));
        }
        Ok(cfg)
    }

    /// Embedding slots one image fills: its patches, plus the class token under `full`.
    pub fn image_tokens(&self) -> usize {
        self.vision.num_patches() + usize::from(self.strategy == FeatureStrategy::Full)
    }

    /// Index into the hidden states (0..=layers) of a configured feature layer.
    fn resolve(&self, layer: i64) -> usize {
        let n = self.vision.num_hidden_layers as i64 + 1;
        (if layer < 0 { n + layer } else { layer }) as usize
    }

    /// Tower layers that must run: up to the deepest selected hidden state.
    pub fn vision_layers_needed(&self) -> usize {
        self.feature_layers.iter().map(|&l| self.resolve(l)).max().unwrap_or(0)
    }

    /// Input width of the projector: the tower's width times the number of selected layers.
    pub fn projector_in(&self) -> usize {
        self.vision.hidden_size * self.feature_layers.len()
    }
}

/// The `text_config` of a LLaVA config, with `LlamaConfig`'s defaults where keys are absent.
pub fn text_config_json(json: &Value) -> Value {
    let mut text = json.get("text_config").cloned().filter(Value::is_object).unwrap_or_else(|| serde_json::json!({}));
    let obj = text.as_object_mut().expect("object");
    obj.entry("model_type").or_insert_with(|| "llama".into());
    if obj.get("model_type").and_then(Value::as_str) == Some("llama") {
        for (key, value) in LLAMA_DEFAULTS {
            obj.entry(*key).or_insert_with(|| (*value).into());
        }
    }
    // Old configs also state the (resized) vocabulary at the top level.
    if let (None, Some(v)) = (obj.get("vocab_size"), json.get("vocab_size")) {
        obj.insert("vocab_size".into(), v.clone());
    }
    text
}

/// Tensor-name prefixes: transformers 5 (`model.vision_tower.`, `model.language_model.`, `lm_head`)
/// or the 4.x layout of hub checkpoints (`vision_tower.vision_model.`, `language_model.model.`).
struct Prefixes {
    vision: String,
    projector: String,
    language: String,
    lm_head: Option<String>,
}

fn find_prefixes(store: &SafetensorsStore, path: &str) -> Result<Prefixes> {
    let pick = |candidates: &[&str], probe: &str, what: &str| -> Result<String> {
        candidates.iter().find(|p| store.contains(&format!("{p}{probe}"))).map(|p| p.to_string()).ok_or_else(|| {
            VisionError::config(path, format!("no {what} weights (looked for {probe} under {candidates:?})"))
        })
    };
    Ok(Prefixes {
        vision: pick(
            &["model.vision_tower.", "model.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_tower."],
            "embeddings.patch_embedding.weight",
            "vision tower",
        )?,
        projector: pick(&["model.multi_modal_projector.", "multi_modal_projector."], "linear_1.weight", "projector")?,
        language: pick(&["model.language_model.", "language_model.model."], "embed_tokens.weight", "language model")?,
        lm_head: ["lm_head.weight", "language_model.lm_head.weight"]
            .iter()
            .find(|n| store.contains(n))
            .map(|n| n.to_string()),
    })
}

#[derive(Debug, Clone)]
pub struct LlavaModel {
    pub config: LlavaConfig,
    pub vision: ClipVision,
    pub projector: Projector,
    pub language: Model,
}

/// A LLaVA checkpoint with what comes with it.
pub struct LoadedLlava {
    pub model: LlavaModel,
    pub processor: ImageProcessor,
    pub tokenizer: Option<TokenizerBundle>,
    pub generation_config: Option<Value>,
    pub path: PathBuf,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| VisionError::Io { path: shown.clone(), source })?;
    serde_json::from_str(&text).map(Some).map_err(|e| VisionError::config(shown, format!("invalid JSON: {e}")))
}

impl LoadedLlava {
    /// Load an HF `LlavaForConditionalGeneration` directory (safetensors, float dtypes).
    pub fn load(dir: &Path, dtype: WeightDType, device: &Device) -> Result<Self> {
        if dtype == WeightDType::Quantized {
            return Err(VisionError::input(
                "`dtype` q keeps GGUF quantization; LLaVA checkpoints are safetensors (use f32, bf16 or f16)",
            ));
        }
        let config_path = dir.join("config.json");
        let shown = config_path.display().to_string();
        let json =
            read_json(&config_path)?.ok_or_else(|| VisionError::config(dir.display().to_string(), "no config.json"))?;
        let config = LlavaConfig::from_json(&json, &shown)?;
        let store = SafetensorsStore::open_dir(dir).map_err(ModelError::from)?;
        let prefixes = find_prefixes(&store, &dir.display().to_string())?;
        let source = WeightSource::Safetensors(store);
        let w = Weights { source: &source, config: &config.text, dtype, device };
        let vision = ClipVision::load(&config.vision, &w, &prefixes.vision, config.vision_layers_needed())?;
        let p = &prefixes.projector;
        let projector = Projector {
            linear_1: w.linear(&format!("{p}linear_1"))?,
            activation: config.projector_act,
            linear_2: w.linear(&format!("{p}linear_2"))?,
        };
        let text_h = config.text.hidden_size;
        if projector.linear_1.in_features() != config.projector_in()
            || projector.linear_1.out_features() != text_h
            || projector.linear_2.in_features() != text_h
            || projector.linear_2.out_features() != text_h
        {
            return Err(ModelError::WeightShape {
                name: format!("{p}linear_1/linear_2"),
                actual: vec![projector.linear_1.out_features(), projector.linear_1.in_features()],
                expected: format!("[{text_h}, {}] then [{text_h}, {text_h}]", config.projector_in()),
            }
            .into());
        }
        // Tied checkpoints have no head of their own; the loader then reuses the embeddings.
        let head = prefixes.lm_head.clone().unwrap_or_else(|| "lm_head.weight".into());
        let language =
            pare_model::loader::build(&config.text, &w, &DecoderNames::llama_under(&prefixes.language, &head))?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(TokenizerBundle::from_hf_dir(dir).map_err(ModelError::from)?)
        } else {
            None
        };
        Ok(LoadedLlava {
            model: LlavaModel { config, vision, projector, language },
            processor: ImageProcessor::from_dir(dir)?,
            tokenizer,
            generation_config: read_json(&dir.join("generation_config.json"))?,
            path: dir.to_path_buf(),
        })
    }

    /// The language model as a text checkpoint (shares the weights), for code written for one:
    /// generation defaults, EOS ids, the tokenizer.
    pub fn text_model(&self) -> LoadedModel {
        LoadedModel {
            model: self.model.language.clone(),
            tokenizer: self.tokenizer.clone(),
            generation_config: self.generation_config.clone(),
            path: self.path.clone(),
            format: "safetensors",
        }
    }

    /// Token ids of a prompt with one image: each `<image>` in the text becomes the image's
    /// placeholder run; a prompt without one gets `<image>\n` in front, as LLaVA's own code does.
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| VisionError::input(format!("{}: the checkpoint has no tokenizer", self.path.display())))?;
        let image_id = self.model.config.image_token_id;
        let marker = tok.token_str(image_id).unwrap_or_else(|| "<image>".into());
        let text = if text.contains(&marker) { text.to_string() } else { format!("{marker}\n{text}") };
        let ids = tok.encode(&text, true).map_err(ModelError::from)?;
        let images = ids.iter().filter(|&&t| t == image_id).count();
        if images != 1 {
            return Err(VisionError::input(format!(
                "the prompt holds {images} {marker} markers; pare runs one image per prompt"
            )));
        }
        Ok(self.model.expand_image_tokens(&ids))
    }
}

impl LlavaModel {
    /// Replace every image token in `ids` by the run of placeholders one image fills.
    pub fn expand_image_tokens(&self, ids: &[u32]) -> Vec<u32> {
        let n = self.config.image_tokens();
        ids.iter().flat_map(|&t| std::iter::repeat_n(t, if t == self.config.image_token_id { n } else { 1 })).collect()
    }

    /// Positions of the image placeholders in `ids` (the span an image token pruner cuts from).
    pub fn image_positions(&self, ids: &[u32]) -> Vec<i64> {
        ids.iter().enumerate().filter(|(_, &t)| t == self.config.image_token_id).map(|(i, _)| i as i64).collect()
    }

    /// Projected image features (images, image_tokens, text_hidden) of pixel values (images, 3, size, size).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let states = self.vision.hidden_states(pixel_values)?;
        let patches = self.config.vision.num_patches();
        let selected = self
            .config
            .feature_layers
            .iter()
            .map(|&l| {
                let s = &states[self.config.resolve(l)];
                Ok(match self.config.strategy {
                    FeatureStrategy::Default => s.narrow(1, 1, patches)?,
                    FeatureStrategy::Full => s.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let features = if selected.len() == 1 { selected[0].clone() } else { Tensor::cat(&selected, 2)? };
        self.projector.forward(&features)
    }

    /// Input embeddings (1, seq, hidden): token embeddings with the image features in the
    /// placeholder slots, in order.
    pub fn embed(&self, ids: &[u32], pixel_values: &Tensor) -> Result<Tensor> {
        let features = self.image_features(pixel_values)?;
        let (images, per_image, hidden) = features.dims3()?;
        let slots = self.image_positions(ids);
        if slots.len() != images * per_image {
            return Err(VisionError::input(format!(
                "the prompt has {} image placeholder tokens, {images} image(s) give {} features",
                slots.len(),
                images * per_image
            )));
        }
        let seq = ids.len();
        let text = self.language.embed(&[ids.to_vec()])?.squeeze(0)?;
        // One gather over [text rows; feature rows]: slot i takes text row i or the next feature.
        let mut next_feature = seq as u32;
        let index: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.config.image_token_id {
                    next_feature += 1;
                    next_feature - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let rows = Tensor::cat(&[&text, &features.reshape((images * per_image, hidden))?.to_dtype(text.dtype())?], 0)?;
        let index = Tensor::from_vec(index, seq, rows.device())?;
        Ok(rows.index_select(&index, 0)?.unsqueeze(0)?)
    }

    /// Prefill one prompt (`ids` with expanded placeholders) and its image into a fresh cache:
    /// the last position's logits (1, vocab) and the cache. Decoding then goes on through the
    /// language model with the same hooks.
    pub fn prefill(&self, ids: &[u32], pixel_values: &Tensor, hooks: &mut Hooks) -> Result<(Tensor, KvCache)> {
        let x = self.embed(ids, pixel_values)?;
        let positions = vec![(0..ids.len() as i64).collect()];
        Ok(self.language.prefill(PrefillInput::Embeds { x, positions }, hooks)?)
    }

    /// Logits (seq, vocab) at every position of one prompt and image.
    pub fn logits_all(&self, ids: &[u32], pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.embed(ids, pixel_values)?;
        let positions = vec![(0..ids.len() as i64).collect::<Vec<_>>()];
        let mut cache = self.language.new_cache(1);
        let logits =
            self.language.forward(x, &positions, &mut cache, &mut Hooks::default(), Phase::Prefill, Logits::All)?;
        Ok(logits.squeeze(0)?)
    }
}
