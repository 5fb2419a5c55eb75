//! A GGUF file: header, metadata, tensor table; then everything pare reads from it (the model
//! config, the tokenizer, each tensor's bytes). Any input must end in Ok or a FormatError.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pare_formats::{GgufFile, TokenizerBundle};

fuzz_target!(|data: &[u8]| {
    // The parser maps files; the input goes to one file per fuzzing process.
    let path = std::env::temp_dir().join(format!("pare-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(gguf) = GgufFile::open(&path) {
        for t in &gguf.tensors {
            let _ = gguf.tensor_bytes(&t.name);
        }
        if let Ok(config) = pare_model::ModelConfig::from_gguf(&gguf) {
            let _ = config.parameter_count();
        }
        if gguf.get("tokenizer.ggml.model").is_some() {
            if let Ok(tok) = TokenizerBundle::from_gguf(&gguf) {
                let _ = tok.encode("Hello, world", true);
            }
        }
    }
});
