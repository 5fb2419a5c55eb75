//! The CPU attention kernels against the plain references in `pare_kernels::cpu`: ragged and
//! uniform decode caches (long enough to be split across threads, one head seeing nothing), and
//! tiled prefill with padding, sliding windows and a head size that is no multiple of eight, over
//! keys and values stored in f32, f16 and bf16.

use candle_core::{DType, Device, Tensor};
use pare_kernels::cpu;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic values without a random-number crate: a scrambled sine.
    let n: usize = shape.iter().product();
    let data: Vec<f32> =
        (0..n).map(|i| ((i as f64 * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).fract() as f32 * 2.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

const TOLERANCE: f32 = 2e-5;

#[test]
fn decode_over_a_ragged_cache_matches_the_reference() {
    let (batch, heads, d) = (2, 9, 64);
    let lens = [1, 700, 33, 129, 0, 5];
    let skips = [0, 17, 33, 2, 0, 4];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let q = randn(&[batch, heads, d], 1);
        // Views into larger buffers, as the cache hands them out.
        let keys: Vec<Tensor> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| randn(&[n + 7, d], 10 + i as u64).to_dtype(dtype).unwrap().narrow(0, 0, n).unwrap())
            .collect();
        let values: Vec<Tensor> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| randn(&[n + 3, d], 20 + i as u64).to_dtype(dtype).unwrap().narrow(0, 0, n).unwrap())
            .collect();
        let fast = pare_kernels::attention_decode(&q, &keys, &values, &skips, 0.125).unwrap();
        let reference = cpu::attention_decode(&q, &keys, &values, &skips, 0.125).unwrap();
        assert!(max_diff(&fast, &reference) < TOLERANCE, "{dtype:?}: {}", max_diff(&fast, &reference));
        // A head that sees nothing (entries all skipped, or none) attends to zeros.
        for (row, first_head) in [(0, 6), (1, 3)] {
            let nothing = fast.get(row).unwrap().narrow(0, first_head, 3).unwrap();
            assert_eq!(nothing.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }
}

#[test]
fn decode_over_a_uniform_cache_matches_the_reference() {
    let (batch, heads, kv_heads, cap, len, d) = (3, 8, 2, 900, 811, 48);
    let k = randn(&[batch, kv_heads, cap, d], 3);
    let v = randn(&[batch, kv_heads, cap, d], 4);
    let q = randn(&[batch, heads, d], 5);
    let (k, v) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
    let skip = [0, 2, 500];
    let fast = pare_kernels::attention_decode_uniform(&q, &k, &v, &skip, 0.2).unwrap();
    let view = |t: &Tensor, i: usize| t.get(i / kv_heads).unwrap().get(i % kv_heads).unwrap();
    let keys: Vec<Tensor> = (0..batch * kv_heads).map(|i| view(&k, i)).collect();
    let values: Vec<Tensor> = (0..batch * kv_heads).map(|i| view(&v, i)).collect();
    let per_head: Vec<usize> = (0..batch * kv_heads).map(|i| skip[i / kv_heads]).collect();
    let reference = cpu::attention_decode(&q, &keys, &values, &per_head, 0.2).unwrap();
    assert!(max_diff(&fast, &reference) < TOLERANCE, "{}", max_diff(&fast, &reference));
}

#[test]
fn tiled_prefill_matches_the_reference() {
    // Row 0: 20 cached entries then 37 new ones; row 1: 9 padding entries, then its tokens.
    let (batch, heads, kv_heads, sq, past) = (2, 6, 2, 37, 20);
    let n = past + sq;
    let row0: Vec<i64> = (0..n as i64).collect();
    let row1: Vec<i64> = (0..n as i64).map(|i| if i < 9 { -1 } else { i - 9 }).collect();
    let entry_positions = [row0.as_slice(), row1.as_slice()];
    let query_positions = [&row0[past..], &row1[past..]];
    for (d, dtype, window) in [
        (64, DType::F32, None),
        (64, DType::F32, Some(10)),
        (36, DType::F32, None),
        (64, DType::F16, Some(50)),
        (64, DType::BF16, None),
    ] {
        let q = randn(&[batch, heads, sq, d], 6);
        let cap = n + 5;
        let k = randn(&[batch, kv_heads, cap, d], 7).to_dtype(dtype).unwrap().narrow(2, 0, n).unwrap();
        let v = randn(&[batch, kv_heads, cap, d], 8).to_dtype(dtype).unwrap().narrow(2, 0, n).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let fast =
            pare_kernels::attention_prefill(&q, &k, &v, &query_positions, &entry_positions, window, scale).unwrap();
        let reference = cpu::attention_prefill(&q, &k, &v, &query_positions, &entry_positions, window, scale).unwrap();
        let diff = max_diff(&fast, &reference);
        assert!(diff < TOLERANCE, "d {d} {dtype:?} window {window:?}: {diff}");
    }
}

#[test]
fn a_padding_query_sees_nothing() {
    let (heads, d, n) = (2, 16, 4);
    let q = randn(&[1, heads, 2, d], 9);
    let k = randn(&[1, 1, n, d], 10);
    let v = randn(&[1, 1, n, d], 11);
    let entries: [i64; 4] = [-1, 0, 1, 2];
    let queries: [i64; 2] = [-1, 2];
    let out = pare_kernels::attention_prefill(&q, &k, &v, &[&queries], &[&entries], None, 0.25).unwrap();
    let padding_rows = out.narrow(2, 0, 1).unwrap();
    assert_eq!(padding_rows.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let reference = cpu::attention_prefill(&q, &k, &v, &[&queries], &[&entries], None, 0.25).unwrap();
    assert!(max_diff(&out, &reference) < TOLERANCE);
}

/// A q8_0 cache (GGUF blocks as U8) attends exactly as its decoded values do.
#[test]
fn a_q8_0_cache_attends_as_its_decoded_values() {
    let (batch, heads, kv_heads, cap, len, d) = (2, 6, 2, 300, 257, 64);
    let k = pare_kernels::encode_kv_q8_0(&randn(&[batch, kv_heads, cap, d], 12)).unwrap().narrow(2, 0, len).unwrap();
    let v = pare_kernels::encode_kv_q8_0(&randn(&[batch, kv_heads, cap, d], 13)).unwrap().narrow(2, 0, len).unwrap();
    assert_eq!(k.dims(), &[batch, kv_heads, len, 68]);
    let (kf, vf) = (pare_kernels::decode_kv_q8_0(&k).unwrap(), pare_kernels::decode_kv_q8_0(&v).unwrap());
    let q = randn(&[batch, heads, d], 14);
    let fast = pare_kernels::attention_decode_uniform(&q, &k, &v, &[0, 9], 0.125).unwrap();
    let float = pare_kernels::attention_decode_uniform(&q, &kf, &vf, &[0, 9], 0.125).unwrap();
    assert!(max_diff(&fast, &float) < TOLERANCE, "decode {}", max_diff(&fast, &float));
    let sq = 40;
    let positions: Vec<i64> = (0..len as i64).collect();
    let qp = &positions[len - sq..];
    let q = randn(&[batch, heads, sq, d], 15);
    let fast = pare_kernels::attention_prefill(&q, &k, &v, &[qp, qp], &[&positions, &positions], None, 0.125).unwrap();
    let float =
        pare_kernels::attention_prefill(&q, &kf, &vf, &[qp, qp], &[&positions, &positions], None, 0.125).unwrap();
    assert!(max_diff(&fast, &float) < TOLERANCE, "prefill {}", max_diff(&fast, &float));
    // The values survive the round trip to within a Q8_0 step.
    let x = randn(&[4, 64], 16);
    let back = pare_kernels::decode_kv_q8_0(&pare_kernels::encode_kv_q8_0(&x).unwrap()).unwrap();
    assert!(max_diff(&x, &back) < 2.0 / 127.0 * 0.6, "{}", max_diff(&x, &back));
}
