//! An HF config.json: parsed, validated, sized (parameters, KV bytes), written back and re-read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pare_model::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(config) = ModelConfig::from_hf_json(&json, "config.json") else { return };
    let _ = config.parameter_count();
    let _ = config.kv_bytes_per_token(2);
    let _ = config.run_bytes(2, 4, 64, 128);
    // What pare writes, it must read back.
    let again = ModelConfig::from_hf_json(&config.to_hf_json(), "written config.json");
    assert!(again.is_ok(), "pare cannot read its own config.json: {again:?}");
});
