//! Dequantization of the real GGUFs' tensors checked against ggml's reference formulas
//! (`dequantize_row_*` in ggml-quants.c), implemented here independently from the raw bytes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use half::f16;
use pare_formats::{GgmlType, GgufFile};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q4_0(b: &[u8]) -> Vec<f32> {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    let mut y = vec![0.0; 32];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
    y
}

fn q4_1(b: &[u8]) -> Vec<f32> {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    let mut y = vec![0.0; 32];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
    y
}

fn q5_0(b: &[u8]) -> Vec<f32> {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    let mut y = vec![0.0; 32];
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) & 0x10;
        let xh1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((((qs[j] & 0xF) as u32) | xh0) as i32 - 16) as f32 * d;
        y[j + 16] = ((((qs[j] >> 4) as u32) | xh1) as i32 - 16) as f32 * d;
    }
    y
}

fn q8_0(b: &[u8]) -> Vec<f32> {
    let d = f16_at(b, 0);
    b[2..34].iter().map(|&q| q as i8 as f32 * d).collect()
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn q4_k(b: &[u8]) -> Vec<f32> {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let mut q = &b[16..144];
    let mut y = Vec::with_capacity(256);
    let mut is = 0;
    for _ in 0..4 {
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        y.extend(q[..32].iter().map(|&v| d1 * (v & 0xF) as f32 - m1));
        y.extend(q[..32].iter().map(|&v| d2 * (v >> 4) as f32 - m2));
        q = &q[32..];
        is += 2;
    }
    y
}

fn q6_k(b: &[u8]) -> Vec<f32> {
    let d = f16_at(b, 208);
    let mut y = vec![0.0; 256];
    for n in 0..2 {
        let ql = &b[64 * n..];
        let qh = &b[128 + 32 * n..];
        let sc = &b[192 + 8 * n..];
        let out = &mut y[128 * n..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
    y
}

/// The reference block decoder for a type.
fn reference(ty: GgmlType) -> fn(&[u8]) -> Vec<f32> {
    match ty {
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4K => q4_k,
        GgmlType::Q6K => q6_k,
        other => panic!("no reference decoder for {other}"),
    }
}

/// Checks the first and last `n_blocks` blocks of `name` against the reference decoder, and
/// that the quantized tensor dequantizes to the same values.
fn check(f: &GgufFile, name: &str, expected: GgmlType, n_blocks: usize) {
    let info = f.tensor_info(name).unwrap().clone();
    assert_eq!(info.ggml_type, expected, "{name}");
    let (bs, ts) = (expected.block_size(), expected.type_size());
    let raw = f.tensor_bytes(name).unwrap();
    assert_eq!(raw.len(), info.element_count() / bs * ts);
    let t = f.dequantize(name, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), info.shape.as_slice());
    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = raw.len() / ts;
    let blocks = (0..n_blocks).chain(n - n_blocks..n);
    for blk in blocks {
        let want = reference(expected)(&raw[blk * ts..(blk + 1) * ts]);
        let got = &values[blk * bs..(blk + 1) * bs];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{name} block {blk} elem {i}: {g} vs {w}");
        }
    }
    let q = f.qtensor(name, &Device::Cpu).unwrap();
    assert_eq!(q.shape().dims(), info.shape.as_slice());
    let again = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(again == values, "{name}: qtensor and dequantize disagree");
}

#[test]
fn smollm2_q4_1_and_q8_0() {
    let f = GgufFile::open(&smollm2_path()).unwrap();
    check(&f, "blk.0.attn_q.weight", GgmlType::Q4_1, 64);
    check(&f, "blk.29.ffn_down.weight", GgmlType::Q4_1, 64);
    check(&f, "token_embd.weight", GgmlType::Q8_0, 64);
}

#[test]
fn qwen2_k_quants_q5_0_q8_0() {
    let f = GgufFile::open(&qwen2_path()).unwrap();
    for ty in [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q5_0, GgmlType::Q8_0] {
        // The smallest tensor of each type keeps the test light.
        let name = f.tensors.iter().filter(|t| t.ggml_type == ty).min_by_key(|t| t.n_bytes).unwrap().name.clone();
        check(&f, &name, ty, 16);
    }
}

#[test]
fn f32_tensors_are_bit_exact() {
    let f = GgufFile::open(&qwen2_path()).unwrap();
    for name in ["blk.0.attn_norm.weight", "blk.0.attn_q.bias", "output_norm.weight"] {
        let raw = f.tensor_bytes(name).unwrap();
        let want: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let got = f.dequantize(name, DType::F32, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want, "{name}");
        let bf = f.dequantize(name, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
    }
}

/// A quantized matmul through candle's QMatMul agrees with the dequantized weights, up to the
/// error of quantizing the activations too (candle's Q4_1 kernel works on Q8_1 inputs).
#[test]
fn qmatmul_matches_dequantized() {
    let f = GgufFile::open(&smollm2_path()).unwrap();
    let name = "blk.0.attn_k.weight";
    let w = f.dequantize(name, DType::F32, &Device::Cpu).unwrap();
    let q = candle_core::quantized::QMatMul::from_qtensor(f.qtensor(name, &Device::Cpu).unwrap()).unwrap();
    let x = Tensor::arange(0f32, 576.0, &Device::Cpu)
        .unwrap()
        .affine(1.0 / 576.0, -0.5)
        .unwrap()
        .reshape((1, 576))
        .unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
    let got = candle_core::Module::forward(&q, &x).unwrap().to_vec2::<f32>().unwrap();
    let err: f32 = got[0].iter().zip(&want[0]).map(|(g, w)| (g - w).powi(2)).sum::<f32>().sqrt();
    let norm: f32 = want[0].iter().map(|w| w * w).sum::<f32>().sqrt();
    assert!(err / norm < 0.02, "relative error {}", err / norm);
}
