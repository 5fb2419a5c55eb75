//! Stacked projections (q·k·v and gate·up, as the loader builds them on CUDA) compute what the
//! separate ones do, biases included (Qwen2), in prefill and decode.

use std::path::Path;

use candle_core::{DType, Device};
use pare_model::WeightDType;
use pare_test_support as ts;

fn check(dir: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir);
    let loaded = pare_model::load(&path.display().to_string(), WeightDType::Float(DType::F32), &Device::Cpu).unwrap();
    let plain = loaded.model;
    let mut fused = plain.clone();
    fused.fuse_projections().unwrap();
    assert!(fused.blocks().iter().all(|b| b.attn.is_fused() && b.mlp.is_fused()), "{dir}: every layer fuses");
    let prompt: Vec<u32> = vec![3, 17, 42, 99, 7, 123, 64, 5];
    let max_diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    };
    let (a, mut cache_a) = ts::prefill(&plain, std::slice::from_ref(&prompt)).unwrap();
    let (b, mut cache_b) = ts::prefill(&fused, std::slice::from_ref(&prompt)).unwrap();
    assert!(max_diff(&a, &b) < 1e-5, "{dir} prefill: {}", max_diff(&a, &b));
    for token in [11u32, 29, 2] {
        let a = ts::decode(&plain, &mut cache_a, &[token]).unwrap();
        let b = ts::decode(&fused, &mut cache_b, &[token]).unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{dir} decode: {}", max_diff(&a, &b));
    }
    // The parts are views of the stacked weights: the parameter count does not change.
    assert_eq!(fused.param_count(), plain.param_count());
}

#[test]
fn stacked_projections_match_separate_ones() {
    check("tests/fixtures/llama-tiny/model");
    check("tests/fixtures/qwen2-tiny/model");
}
