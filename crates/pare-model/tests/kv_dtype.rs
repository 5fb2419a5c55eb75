//! A KV cache held in f16, bf16 or q8_0 computes what the f32 one does up to the narrower values'
//! rounding, in prefill and decode, in fewer bytes; what a cache cannot hold is refused.

use std::path::Path;

use candle_core::{DType, Device};
use pare_model::{KvDtype, WeightDType};
use pare_test_support as ts;

fn load(dir: &str) -> pare_model::Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(dir);
    pare_model::load(&path.display().to_string(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap().model
}

fn top(logits: &candle_core::Tensor) -> u32 {
    logits.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

#[test]
fn a_narrower_cache_follows_the_f32_one_in_fewer_bytes() {
    // SmolLM2's shape family with head_dim 64 (q8_0 needs multiples of 32).
    let loaded = ts::smollm2();
    let f32_model = loaded.model.clone();
    let text = "The Eiffel Tower is in Paris, the capital of France. The Colosseum is in Rome, the capital of";
    let prompt = loaded.tokenizer().unwrap().encode(text, false).unwrap();
    let (reference, mut reference_cache) = ts::prefill(&f32_model, std::slice::from_ref(&prompt)).unwrap();
    let decoded: Vec<_> =
        [12366u32, 30, 378].iter().map(|&t| ts::decode(&f32_model, &mut reference_cache, &[t]).unwrap()).collect();
    let entry_bytes = reference_cache.bytes() / (64 * 4);
    for (kv, tolerance, bytes_per_64) in
        [(KvDtype::Float(DType::F16), 0.05, 128), (KvDtype::Float(DType::BF16), 0.5, 128), (KvDtype::Q8_0, 0.5, 68)]
    {
        let mut model = f32_model.clone();
        model.set_kv_dtype(kv).unwrap();
        assert_eq!(model.kv_dtype(), kv);
        let (logits, mut cache) = ts::prefill(&model, std::slice::from_ref(&prompt)).unwrap();
        let diff = ts::max_abs_diff(&logits, &reference);
        assert!(diff > 0.0 && diff < tolerance, "{} prefill: {diff}", kv.name());
        assert_eq!(top(&logits), top(&reference), "{}: the greedy token after the prompt", kv.name());
        for (&token, reference) in [12366u32, 30, 378].iter().zip(&decoded) {
            let logits = ts::decode(&model, &mut cache, &[token]).unwrap();
            let diff = ts::max_abs_diff(&logits, reference);
            assert!(diff < tolerance, "{} decode: {diff}", kv.name());
            assert_eq!(top(&logits), top(reference), "{}: the greedy token", kv.name());
        }
        assert_eq!(cache.bytes(), entry_bytes * bytes_per_64, "{}", kv.name());
    }
}

#[test]
fn what_a_cache_cannot_hold_is_refused() {
    let mut model = load("llama-tiny/model");
    let err = model.set_kv_dtype(KvDtype::Float(DType::U8)).unwrap_err().to_string();
    assert!(err.contains("a KV cache in U8") && !err.contains('\n'), "{err}");
    // The tiny Llama's heads are 16 wide: no whole Q8_0 block.
    let err = model.set_kv_dtype(KvDtype::Q8_0).unwrap_err().to_string();
    assert!(err.contains("multiples of 32, not 16"), "{err}");
}
