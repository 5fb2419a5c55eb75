//! A KV cache held in f16 (or bf16) computes what the f32 one does up to the narrower values'
//! rounding, in prefill and decode, with half the bytes; dtypes a cache cannot hold are refused.

use std::path::Path;

use candle_core::{DType, Device};
use pare_model::WeightDType;
use pare_test_support as ts;

#[test]
fn a_half_precision_cache_follows_the_f32_one_in_half_the_bytes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama-tiny/model");
    let loaded = pare_model::load(&path.display().to_string(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap();
    let f32_model = loaded.model;
    let prompt: Vec<u32> = vec![3, 17, 42, 99, 7, 123, 64, 5, 77, 31];
    let (reference, mut reference_cache) = ts::prefill(&f32_model, std::slice::from_ref(&prompt)).unwrap();
    let decoded: Vec<_> =
        [11u32, 29, 2].iter().map(|&t| ts::decode(&f32_model, &mut reference_cache, &[t]).unwrap()).collect();
    for (dtype, tolerance) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
        let mut model = f32_model.clone();
        model.set_kv_dtype(dtype).unwrap();
        assert_eq!(model.kv_dtype(), dtype);
        let (logits, mut cache) = ts::prefill(&model, std::slice::from_ref(&prompt)).unwrap();
        let diff = ts::max_abs_diff(&logits, &reference);
        assert!(diff > 0.0 && diff < tolerance, "{dtype:?} prefill: {diff}");
        for (&token, reference) in [11u32, 29, 2].iter().zip(&decoded) {
            let diff = ts::max_abs_diff(&ts::decode(&model, &mut cache, &[token]).unwrap(), reference);
            assert!(diff < tolerance, "{dtype:?} decode: {diff}");
        }
        assert_eq!(2 * cache.bytes(), reference_cache.bytes(), "{dtype:?}: half the bytes");
    }
    let mut model = f32_model.clone();
    let err = model.set_kv_dtype(DType::U8).unwrap_err().to_string();
    assert!(err.contains("a KV cache in U8") && !err.contains('\n'), "{err}");
}
