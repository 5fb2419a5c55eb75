//! A safetensors file: its header (JSON, offsets, shapes, dtypes), then every tensor loaded.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use pare_formats::SafetensorsStore;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("pare-fuzz-{}.safetensors", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(store) = SafetensorsStore::open_files(&[path]) {
        for name in store.names() {
            let _ = store.shape(&name);
            let _ = store.load(&name, DType::F32, &Device::Cpu);
        }
    }
});
