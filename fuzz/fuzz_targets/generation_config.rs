//! A generation config (`--config FILE`, generation_config.json): parsed, checked, merged as
//! the CLI merges layers, and turned into a logits-processor chain when valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pare_generate::processors::chain::ProcessorChain;
use pare_generate::GenerationConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(text) {
        let defaults = GenerationConfig::from_model_defaults(&json);
        let _ = defaults.check_values();
    }
    let Ok(file) = GenerationConfig::from_json_str(text) else { return };
    let checked = file.check_values();
    let mut merged = GenerationConfig::default();
    merged.merge(&file);
    // Merging keeps every value exactly (NaN included: compare the checks' verdicts).
    assert_eq!(merged.check_values().is_ok(), checked.is_ok());
    if merged.validate().is_ok() {
        let config = merged.processor_config(&[]).expect("valid config");
        let _ = ProcessorChain::new(&config, None);
    }
});
