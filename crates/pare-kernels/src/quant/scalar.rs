//! Plain references: each block dequantized to f32 as ggml defines it, then an f32 dot product
//! with the dequantized activations. The vectorized kernels are tested against these, and they
//! run where AVX2 is missing.

use half::f16;

use super::{BlockQ8, BlockQ8K, QuantType, QK8, QK_K};

fn fp16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The k-quants' 6-bit (scale, min) pair `j` of 8, packed in 12 bytes (ggml's get_scale_min_k4).
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q3_K's sixteen 6-bit scales, unpacked from 12 bytes and re-centred (−32 … 31).
pub(crate) fn q3k_scales(b: &[u8]) -> [i8; 16] {
    std::array::from_fn(|k| {
        let (j, group) = (k % 4, k / 4);
        let low = match group {
            0 => b[j] & 0xF,
            1 => b[4 + j] & 0xF,
            2 => b[j] >> 4,
            _ => b[4 + j] >> 4,
        };
        let high = (b[8 + j] >> (2 * group)) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// Quantize `x` (a multiple of 32 long) into `out`, llama.cpp's rounding: scale by 127/max|x|,
/// round half to even.
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (chunk, b) in x.chunks_exact(QK8).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// One block of `ty` (its bytes) as `ty.block_elems()` floats.
pub fn dequantize_block(ty: QuantType, b: &[u8], y: &mut [f32]) {
    match ty {
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 => {
            // d · code + (−8d, −16d or the minimum): ggml's formula, through the GEMM's decoder.
            let (mut codes, mut d, mut min) = ([0u8; QK8], [0f32], [0f32]);
            block_codes(ty, b, &mut codes, &mut d, &mut min);
            for (v, &code) in y.iter_mut().zip(&codes) {
                *v = d[0] * code as f32 + min[0];
            }
        }
        QuantType::Q8_0 => {
            let d = fp16(b, 0);
            for (v, &q) in y.iter_mut().zip(&b[2..34]) {
                *v = d * (q as i8) as f32;
            }
        }
        QuantType::Q2K => {
            let (d, dmin) = (fp16(b, 80), fp16(b, 82));
            for (c, y) in y.chunks_exact_mut(32).enumerate() {
                let (n, j) = (c / 4, c % 4);
                for (l, v) in y.iter_mut().enumerate() {
                    let sc = b[8 * n + 2 * j + l / 16];
                    let q = (b[16 + 32 * n + l] >> (2 * j)) & 3;
                    *v = d * (sc & 0xF) as f32 * q as f32 - dmin * (sc >> 4) as f32;
                }
            }
        }
        QuantType::Q3K => {
            let d = fp16(b, 108);
            let scales = q3k_scales(&b[96..108]);
            for (c, y) in y.chunks_exact_mut(32).enumerate() {
                let (n, j) = (c / 4, c % 4);
                for (l, v) in y.iter_mut().enumerate() {
                    let low = ((b[32 + 32 * n + l] >> (2 * j)) & 3) as i32;
                    let high = (b[l] >> (4 * n + j)) & 1;
                    let q = low - if high == 1 { 0 } else { 4 };
                    *v = d * scales[8 * n + 2 * j + l / 16] as f32 * q as f32;
                }
            }
        }
        QuantType::Q4K | QuantType::Q5K => {
            let (d, dmin) = (fp16(b, 0), fp16(b, 2));
            let (qh, qs) = if ty == QuantType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for (c, y) in y.chunks_exact_mut(32).enumerate() {
                let (sc, m) = scale_min_k4(c, &b[4..16]);
                for (l, v) in y.iter_mut().enumerate() {
                    let byte = qs[32 * (c / 2) + l];
                    let mut q = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> c) & 1) << 4;
                    }
                    *v = d * sc as f32 * q as f32 - dmin * m as f32;
                }
            }
        }
        QuantType::Q6K => {
            let d = fp16(b, 208);
            for (c, y) in y.chunks_exact_mut(32).enumerate() {
                let (n, c) = (c / 4, c % 4);
                for (l, v) in y.iter_mut().enumerate() {
                    let byte = b[64 * n + 32 * (c % 2) + l];
                    let low = if c < 2 { byte & 0xF } else { byte >> 4 };
                    let high = (b[128 + 32 * n + l] >> (2 * c)) & 3;
                    let q = (low | (high << 4)) as i32 - 32;
                    *v = d * (b[192 + 8 * n + 2 * c + l / 16] as i8) as f32 * q as f32;
                }
            }
        }
    }
}

/// A row of blocks as floats (`y.len()` elements).
pub fn dequantize_row(ty: QuantType, row: &[u8], y: &mut [f32]) {
    for (b, y) in row.chunks_exact(ty.block_bytes()).zip(y.chunks_exact_mut(ty.block_elems())) {
        dequantize_block(ty, b, y);
    }
}

/// `w · x` for one row of weight blocks and its quantized activations, in f32.
pub fn vec_dot(ty: QuantType, w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut buf = [0f32; QK_K];
    let per = ty.block_elems() / QK8;
    let mut sum = 0f32;
    for (b, xs) in w.chunks_exact(ty.block_bytes()).zip(x.chunks_exact(per)) {
        let y = &mut buf[..ty.block_elems()];
        dequantize_block(ty, b, y);
        for (y, xb) in y.chunks_exact(QK8).zip(xs) {
            let dot: f32 = y.iter().zip(&xb.qs).map(|(&w, &q)| w * q as f32).sum();
            sum += dot * xb.d;
        }
    }
    sum
}

/// `w · x` for one row of k-quant super-blocks and its [`BlockQ8K`] activations, in f32.
pub fn vec_dot_q8k(ty: QuantType, w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut y = [0f32; QK_K];
    let mut sum = 0f32;
    for (b, xb) in w.chunks_exact(ty.block_bytes()).zip(x) {
        dequantize_block(ty, b, &mut y);
        let dot: f32 = y.iter().zip(&xb.qs).map(|(&w, &q)| w * q as f32).sum();
        sum += dot * xb.d;
    }
    sum
}

/// One block of `ty` as the GEMM's panel format wants it ([`super::gemm`]): unsigned codes and,
/// per group of [`super::gemm::group`] elements, a scale `dw` and offset `cw` with
/// `w = dw · code + cw` (equal to [`dequantize_block`] up to float rounding).
pub(crate) fn block_codes(ty: QuantType, b: &[u8], codes: &mut [u8], dw: &mut [f32], cw: &mut [f32]) {
    match ty {
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 => {
            let d = fp16(b, 0);
            let (min, qh, qs) = match ty {
                QuantType::Q4_0 => (-8.0 * d, 0u32, &b[2..18]),
                QuantType::Q4_1 => (fp16(b, 2), 0, &b[4..20]),
                QuantType::Q5_0 => (-16.0 * d, u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22]),
                _ => (fp16(b, 2), u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24]),
            };
            for j in 0..16 {
                codes[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) << 4) as u8);
                codes[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) << 4) as u8);
            }
            (dw[0], cw[0]) = (d, min);
        }
        QuantType::Q8_0 => {
            let d = fp16(b, 0);
            for (c, &q) in codes.iter_mut().zip(&b[2..34]) {
                *c = (q as i8 as i16 + 128) as u8;
            }
            (dw[0], cw[0]) = (d, -128.0 * d);
        }
        QuantType::Q2K => {
            let (d, dmin) = (fp16(b, 80), fp16(b, 82));
            for (c, codes) in codes.chunks_exact_mut(32).enumerate() {
                let (n, j) = (c / 4, c % 4);
                for (l, code) in codes.iter_mut().enumerate() {
                    *code = (b[16 + 32 * n + l] >> (2 * j)) & 3;
                }
            }
            for (s, &sc) in b[..16].iter().enumerate() {
                (dw[s], cw[s]) = (d * (sc & 0xF) as f32, -dmin * (sc >> 4) as f32);
            }
        }
        QuantType::Q3K => {
            let d = fp16(b, 108);
            for (c, codes) in codes.chunks_exact_mut(32).enumerate() {
                let (n, j) = (c / 4, c % 4);
                for (l, code) in codes.iter_mut().enumerate() {
                    let low = (b[32 + 32 * n + l] >> (2 * j)) & 3;
                    let high = (b[l] >> (4 * n + j)) & 1;
                    // q = low − 4 unless the high bit is set: code = q + 4.
                    *code = low + 4 * high;
                }
            }
            for (s, &sc) in q3k_scales(&b[96..108]).iter().enumerate() {
                dw[s] = d * sc as f32;
                cw[s] = -4.0 * dw[s];
            }
        }
        QuantType::Q4K | QuantType::Q5K => {
            let (d, dmin) = (fp16(b, 0), fp16(b, 2));
            let (qh, qs) = if ty == QuantType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for (c, codes) in codes.chunks_exact_mut(32).enumerate() {
                for (l, code) in codes.iter_mut().enumerate() {
                    let byte = qs[32 * (c / 2) + l];
                    *code = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    if let Some(qh) = qh {
                        *code |= ((qh[l] >> c) & 1) << 4;
                    }
                }
                let (sc, m) = scale_min_k4(c, &b[4..16]);
                (dw[c], cw[c]) = (d * sc as f32, -dmin * m as f32);
            }
        }
        QuantType::Q6K => {
            let d = fp16(b, 208);
            for (c, codes) in codes.chunks_exact_mut(32).enumerate() {
                let (n, c) = (c / 4, c % 4);
                for (l, code) in codes.iter_mut().enumerate() {
                    let byte = b[64 * n + 32 * (c % 2) + l];
                    let low = if c < 2 { byte & 0xF } else { byte >> 4 };
                    *code = low | (((b[128 + 32 * n + l] >> (2 * c)) & 3) << 4);
                }
            }
            for s in 0..16 {
                dw[s] = d * (b[192 + s] as i8) as f32;
                cw[s] = -32.0 * dw[s];
            }
        }
    }
}
