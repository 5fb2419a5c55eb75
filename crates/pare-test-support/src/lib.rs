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
