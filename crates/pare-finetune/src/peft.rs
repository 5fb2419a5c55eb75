//! Adapters on disk as HF peft writes them: `adapter_config.json` and
//! `adapter_model.safetensors`, tensors named `base_model.model.<module>.lora_A.weight` (rank,
//! in) and `….lora_B.weight` (out, rank), so `PeftModel.from_pretrained` loads pare's adapters
//! and pare loads peft's.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use pare_formats::{save_safetensors, SafetensorsStore};
use pare_model::diff::Role;
use pare_model::export::hf_module_name;
use pare_model::Model;
use serde_json::{json, Value};

use crate::error::{FinetuneError, Result};
use crate::lora::{Adapter, LoraConfig};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn tensor_name(module: &str, matrix: &str) -> String {
    format!("base_model.model.{module}.lora_{matrix}.weight")
}

/// peft's short module names (`q_proj`, `dense_h_to_4h`): what `target_modules` lists.
fn short_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Write the adapter into `dir` (which must exist). `base_model` is recorded as
/// `base_model_name_or_path`, as peft does.
pub fn save(adapter: &Adapter, model: &Model, base_model: &str, dir: &Path) -> Result<()> {
    let arch = model.config().arch;
    let mut tensors = Vec::with_capacity(adapter.weights.len() * 2);
    for (&(layer, role), (a, b)) in &adapter.weights {
        let module = hf_module_name(arch, layer, role)
            .ok_or_else(|| FinetuneError::input(format!("{} has no {} module", arch.model_type(), role.name())))?;
        tensors.push((tensor_name(&module, "A"), a.to_dtype(DType::F32)?));
        tensors.push((tensor_name(&module, "B"), b.to_dtype(DType::F32)?));
    }
    let c = &adapter.config;
    let targets: Vec<String> =
        c.targets.iter().filter_map(|&r| hf_module_name(arch, 0, r)).map(|m| short_name(&m).to_string()).collect();
    let config = json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": c.rank,
        "rank_pattern": {},
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": c.rslora,
    });
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes") + "\n";
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text).map_err(|e| FinetuneError::io(&path, e))?;
    save_safetensors(&dir.join(WEIGHTS_FILE), &tensors, None)?;
    Ok(())
}

/// Read a peft LoRA adapter for `model` (its architecture names the modules; its shapes are
/// checked). Variants pare does not implement (DoRA, trained biases, extra saved modules,
/// per-module alphas) are refused rather than silently ignored.
pub fn load(dir: &Path, model: &Model) -> Result<Adapter> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| FinetuneError::io(&path, e))?;
    let bad = |message: String| FinetuneError::Data { path: path.clone(), line: 1, message };
    let config: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let field = |name: &str| config.get(name).filter(|v| !v.is_null());
    if field("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad("not a LoRA adapter (peft_type is not \"LORA\")".into()));
    }
    let unsupported = [
        ("use_dora", field("use_dora").and_then(Value::as_bool) == Some(true)),
        ("fan_in_fan_out", field("fan_in_fan_out").and_then(Value::as_bool) == Some(true)),
        ("bias", field("bias").and_then(Value::as_str).is_some_and(|b| b != "none")),
        ("modules_to_save", field("modules_to_save").and_then(Value::as_array).is_some_and(|m| !m.is_empty())),
        ("alpha_pattern", field("alpha_pattern").and_then(Value::as_object).is_some_and(|m| !m.is_empty())),
        ("rank_pattern", field("rank_pattern").and_then(Value::as_object).is_some_and(|m| !m.is_empty())),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(bad(format!("\"{name}\" is set; pare applies plain LoRA adapters only")));
    }
    let rank = field("r").and_then(Value::as_u64).ok_or_else(|| bad("no rank \"r\"".into()))? as usize;
    let alpha = field("lora_alpha").and_then(Value::as_f64).ok_or_else(|| bad("no \"lora_alpha\"".into()))?;
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);

    let arch = model.config().arch;
    let mut expected = BTreeMap::new();
    for layer in 0..model.num_layers() {
        for role in Role::ALL {
            if let Some(module) = hf_module_name(arch, layer, role) {
                expected.insert(tensor_name(&module, "A"), (layer, role, true));
                expected.insert(tensor_name(&module, "B"), (layer, role, false));
            }
        }
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let store = SafetensorsStore::open_files(std::slice::from_ref(&weights_path))?;
    let mut halves: BTreeMap<(usize, Role), [Option<candle_core::Tensor>; 2]> = BTreeMap::new();
    for name in store.names() {
        let &(layer, role, is_a) = expected.get(&name).ok_or_else(|| {
            FinetuneError::input(format!(
                "{}: tensor \"{name}\" is not a LoRA matrix of a {} model with {} layers",
                weights_path.display(),
                arch.model_type(),
                model.num_layers()
            ))
        })?;
        let t = store.load(&name, DType::F32, &Device::Cpu)?;
        halves.entry((layer, role)).or_default()[usize::from(!is_a)] = Some(t);
    }
    let mut weights = BTreeMap::new();
    for ((layer, role), pair) in halves {
        let [Some(a), Some(b)] = pair else {
            return Err(FinetuneError::input(format!(
                "{}: layer {layer} {} has only one of lora_A and lora_B",
                weights_path.display(),
                role.name()
            )));
        };
        weights.insert((layer, role), (a, b));
    }
    if weights.is_empty() {
        return Err(FinetuneError::input(format!("{}: no LoRA matrices", weights_path.display())));
    }
    let targets: Vec<Role> = Role::ALL.into_iter().filter(|r| weights.keys().any(|(_, wr)| wr == r)).collect();
    let mut lora = LoraConfig::new(rank, alpha, dropout.clamp(0.0, 0.999), &targets)?;
    lora.rslora = field("use_rslora").and_then(Value::as_bool) == Some(true);
    let adapter = Adapter { config: lora, weights };
    adapter.check_fits(model)?;
    Ok(adapter)
}
