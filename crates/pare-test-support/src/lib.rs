//! What pare's tests share (a dev-dependency only): where the repository, its assets and its
//! fixtures are, the default model loaded once per test binary, and whole-sequence logits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use pare_model::{
    CachePress, Hooks, KvCache, LoadedModel, Logits, Model, Phase, PrefillInput, TokenPruner, WeightDType,
};
use serde_json::Value;

/// The workspace root: asset and fixture paths are relative to it.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file under `assets/` (fetched by `make assets`).
pub fn asset(name: &str) -> PathBuf {
    repo().join("assets").join(name)
}

/// A path under `tests/fixtures/`.
pub fn fixture_path(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// A JSON fixture under `tests/fixtures/`; panics with the path when missing or invalid.
pub fn fixture(rel: &str) -> Value {
    let path = fixture_path(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text a llama-perplexity fixture (tests/fixtures/llama-cpp-ppl/) was run on: the first
/// `text_lines` lines of its `text`.
pub fn llama_cpp_fixture_text(fixture: &Value) -> String {
    let path = repo().join(fixture["text"].as_str().expect("fixture names its text"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines = fixture["text_lines"].as_u64().expect("fixture gives text_lines") as usize;
    text.split_inclusive('\n').take(lines).collect()
}

/// The SmolLM2-135M GGUF asset's path.
pub fn smollm2_path() -> PathBuf {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A model in f32 on the CPU: the HF-exact mode every parity fixture is compared in.
pub fn load_f32(path: &Path) -> LoadedModel {
    pare_model::load(path.to_str().expect("UTF-8 path"), WeightDType::Float(DType::F32), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// SmolLM2-135M in f32 on the CPU, loaded once per test binary.
pub fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_f32(&smollm2_path()))
}

/// Logits (seq, vocab) at every position of one sequence, from an empty cache (perplexity).
pub fn logits_all(model: &Model, ids: &[u32]) -> pare_model::Result<Tensor> {
    let positions = vec![(0..ids.len() as i64).collect::<Vec<_>>()];
    let x = model.embed(&[ids.to_vec()])?;
    let mut cache = model.new_cache(1);
    Ok(model.forward(x, &positions, &mut cache, &mut Hooks::default(), Phase::Prefill, Logits::All)?.squeeze(0)?)
}

/// Prefill token prompts without hooks: (last logits, cache).
pub fn prefill(model: &Model, prompts: &[Vec<u32>]) -> pare_model::Result<(Tensor, KvCache)> {
    model.prefill(PrefillInput::Tokens(prompts), &mut Hooks::default())
}

/// Prefill token prompts with hooks: (last logits, cache, the hooks with their state), ready for
/// [`decode_hooked`].
pub fn prefill_hooked(
    model: &Model,
    prompts: &[Vec<u32>],
    mut hooks: Hooks,
) -> pare_model::Result<(Tensor, KvCache, Hooks)> {
    let (logits, cache) = model.prefill(PrefillInput::Tokens(prompts), &mut hooks)?;
    Ok((logits, cache, hooks))
}

/// One decode step of one cache without hooks.
pub fn decode(model: &Model, cache: &mut KvCache, tokens: &[u32]) -> pare_model::Result<Tensor> {
    model.decode(&mut [(cache, &mut Hooks::default())], tokens)
}

/// One decode step of one cache with its hooks.
pub fn decode_hooked(
    model: &Model,
    cache: &mut KvCache,
    hooks: &mut Hooks,
    tokens: &[u32],
) -> pare_model::Result<Tensor> {
    model.decode(&mut [(cache, hooks)], tokens)
}

/// Hooks holding (a copy of) a press.
pub fn press_hooks(press: Option<&dyn CachePress>) -> Hooks {
    Hooks::new(press.map(|p| p.box_clone()), None)
}

/// Hooks holding a token pruner.
pub fn pruner_hooks(pruner: &Arc<dyn TokenPruner>) -> Hooks {
    Hooks::new(None, Some(pruner.clone()))
}

/// The largest |a − b| over two tensors of one shape, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_dtype(DType::F32));
    diff.and_then(|d| d.to_scalar::<f32>()).expect("two tensors of one shape")
}

/// A tiny random Llama for unit tests: `layers` layers, `heads` query heads of dim 8 over
/// `kv_heads` KV heads, MLP width `width`, vocabulary 256, untied head.
#[derive(Debug, Clone, Copy)]
pub struct TinyLlama {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub width: usize,
    /// Spread of the LM head's weights (the others' are fixed).
    pub lm_head_scale: f32,
    pub dtype: DType,
}

impl TinyLlama {
    /// Its weights, each drawn by `draw(shape, base, scale)` (base + scale · a uniform in [-1, 1)
    /// from the caller's generator) and then `edit`ed, written as an HF directory and loaded by
    /// pare's own loader, so tests exercise the path real models take.
    pub fn build(
        &self,
        device: &Device,
        mut draw: impl FnMut(&[usize], f32, f32) -> Tensor,
        edit: impl FnOnce(&mut Vec<(String, Tensor)>),
    ) -> Model {
        let TinyLlama { layers, heads, kv_heads, width, lm_head_scale, dtype } = *self;
        let (d, vocab) = (8, 256);
        let hidden = heads * d;
        let mut tensors = vec![
            ("model.embed_tokens.weight".to_string(), draw(&[vocab, hidden], 0.0, 1.0)),
            ("model.norm.weight".to_string(), draw(&[hidden], 1.0, 0.2)),
            ("lm_head.weight".to_string(), draw(&[vocab, hidden], 0.0, lm_head_scale)),
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
                tensors.push((format!("{p}.{name}.weight"), draw(&shape, 0.0, 0.35)));
            }
            tensors.push((format!("{p}.input_layernorm.weight"), draw(&[hidden], 1.0, 0.2)));
            tensors.push((format!("{p}.post_attention_layernorm.weight"), draw(&[hidden], 1.0, 0.2)));
        }
        edit(&mut tensors);
        let dir = tempfile::tempdir().expect("a temporary directory");
        pare_formats::save_safetensors(&dir.path().join("model.safetensors"), &tensors, None).expect("weights");
        let config = serde_json::json!({
            "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": width,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": d, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": false,
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config.json");
        let path = dir.path().to_str().expect("a UTF-8 path");
        pare_model::load(path, WeightDType::Float(dtype), device).expect("the tiny model loads").model
    }
}
