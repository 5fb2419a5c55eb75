use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use half::f16;

use super::*;

/// xorshift64*: deterministic random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.uniform()).sum::<f32>() - 6.0
    }
}

/// Where each type keeps its f16 scales (byte offsets in a block).
fn f16_fields(ty: QuantType) -> &'static [usize] {
    match ty {
        QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => &[0],
        QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4K | QuantType::Q5K => &[0, 2],
        QuantType::Q2K => &[80, 82],
        QuantType::Q3K => &[108],
        QuantType::Q6K => &[208],
    }
}

/// Random blocks: every code and packed scale random, the f16 scales finite, ±, small.
fn random_blocks(ty: QuantType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let n = rows * cols / ty.block_elems();
    let mut data: Vec<u8> = (0..n * ty.block_bytes()).map(|_| rng.next() as u8).collect();
    for b in data.chunks_exact_mut(ty.block_bytes()) {
        for &at in f16_fields(ty) {
            let v = f16::from_f32((rng.uniform() * 0.02 + 0.001) * if rng.next() & 1 == 0 { 1.0 } else { -1.0 });
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    data
}

fn candle_type(ty: QuantType) -> GgmlDType {
    match ty {
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4_1 => GgmlDType::Q4_1,
        QuantType::Q5_0 => GgmlDType::Q5_0,
        QuantType::Q5_1 => GgmlDType::Q5_1,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q2K => GgmlDType::Q2K,
        QuantType::Q3K => GgmlDType::Q3K,
        QuantType::Q4K => GgmlDType::Q4K,
        QuantType::Q5K => GgmlDType::Q5K,
        QuantType::Q6K => GgmlDType::Q6K,
    }
}

/// candle reads blocks in place, which needs them 8-byte aligned.
fn candle_dequantize(ty: QuantType, rows: usize, cols: usize, data: &[u8]) -> Vec<f32> {
    let mut aligned = vec![0u64; data.len().div_ceil(8)];
    // SAFETY: the u64 buffer spans at least data.len() bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), data.len()) };
    bytes.copy_from_slice(data);
    let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, candle_type(ty)).unwrap();
    let q = QTensor::new(storage, (rows, cols)).unwrap();
    q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn random_matrix(ty: QuantType, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
    QuantMatrix::new(ty, rows, cols, random_blocks(ty, rows, cols, &mut Rng(seed))).unwrap()
}

#[test]
fn dequantization_matches_candle_for_every_type() {
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        let m = random_matrix(ty, 3, 512, 11 + i as u64);
        let ours = m.dequantize();
        let theirs = candle_dequantize(ty, 3, 512, m.data());
        for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{}: element {k}: {a} vs candle {b}", ty.name());
        }
    }
}

#[test]
fn simd_kernels_match_the_scalar_reference() {
    for kernel in Kernel::available() {
        simd_kernel_matches_the_scalar_reference(kernel);
    }
}

fn simd_kernel_matches_the_scalar_reference(kernel: Kernel) {
    for (i, ty) in QuantType::ALL.into_iter().enumerate().filter(|(_, t)| !t.wants_q8k()) {
        // An odd number of blocks, so the kernels' tails (after blocks taken in pairs) run too.
        let cols = ty.block_elems() * if ty.block_elems() == QK_K { 5 } else { 41 };
        let m = random_matrix(ty, 2, cols, 100 + i as u64);
        let mut rng = Rng(7 + i as u64);
        let x: Vec<f32> = (0..ROWS * cols).map(|_| rng.normal()).collect();
        let xq = quantize_rows(&x, cols);
        let rows: Vec<&[BlockQ8]> = xq.chunks(cols / QK8).collect();
        let mut w = vec![0f32; cols];
        for r in 0..2 {
            scalar::dequantize_row(ty, m.row(r), &mut w);
            // Every row count the kernels are compiled for, so each instantiation is checked.
            for take in 1..=ROWS {
                let mut out = [0f32; ROWS];
                kernel.dot(ty, m.row(r), &rows[..take], &mut out[..take]);
                for (j, &got) in out[..take].iter().enumerate() {
                    let want = scalar::vec_dot(ty, m.row(r), rows[j]);
                    // Both sum the same exact integer products; only float summation order differs.
                    let scale: f32 = w.iter().zip(&x[j * cols..]).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (got - want).abs() <= 1e-5 * scale,
                        "{} ({kernel:?}), rows {take}, row {j}: {got} vs reference {want}",
                        ty.name()
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_is_the_dense_product_within_activation_rounding() {
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        let (n, k, m) = (37, 512, 7);
        let w = random_matrix(ty, n, k, 300 + i as u64);
        let dense = w.dequantize();
        let mut rng = Rng(50 + i as u64);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let y = w.matmul(&x).unwrap();
        for row in 0..m {
            let xr = &x[row * k..(row + 1) * k];
            for col in 0..n {
                let wr = &dense[col * k..(col + 1) * k];
                let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                // Rounding x to 8 bits moves each element by at most half a step (max|x|/254 per
                // block of 32); the product moves by at most that times Σ|w| over the block.
                let bound: f64 = wr
                    .chunks(QK8)
                    .zip(xr.chunks(QK8))
                    .map(|(wb, xb)| {
                        let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 254.0;
                        step * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
                    })
                    .sum();
                let got = y[row * n + col] as f64;
                assert!(
                    (got - exact).abs() <= bound * 1.01 + 1e-4,
                    "{} ({row}, {col}): {got} vs {exact}, bound {bound}",
                    ty.name()
                );
            }
        }
    }
}

#[test]
fn stacked_matrices_give_the_parts_outputs() {
    let a = random_matrix(QuantType::Q4K, 5, 256, 1);
    let b = random_matrix(QuantType::Q4K, 3, 256, 2);
    let s = QuantMatrix::stack(&[&a, &b]).unwrap();
    let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
    let (ya, yb, ys) = (a.matmul(&x).unwrap(), b.matmul(&x).unwrap(), s.matmul(&x).unwrap());
    assert_eq!(ys, [ya, yb.clone()].concat());
    let view = s.narrow_rows(5, 3).unwrap();
    assert_eq!((view.data(), view.matmul(&x).unwrap()), (b.data(), yb));
    assert!(s.narrow_rows(6, 3).is_none());
    assert!(QuantMatrix::stack(&[&a, &random_matrix(QuantType::Q6K, 3, 256, 3)]).is_none());
}

#[test]
fn shapes_are_checked() {
    assert!(matches!(QuantMatrix::new(QuantType::Q4K, 1, 100, vec![0; 144]), Err(QuantError::Columns { .. })));
    assert!(matches!(QuantMatrix::new(QuantType::Q4_0, 2, 64, vec![0; 70]), Err(QuantError::Bytes { .. })));
    let m = random_matrix(QuantType::Q8_0, 2, 64, 4);
    assert_eq!(m.matmul(&[0.0; 65]), Err(QuantError::Input { x: 65, cols: 64 }));
}

#[test]
fn activations_round_as_llama_cpp() {
    let x: Vec<f32> = (0..32).map(|i| i as f32 - 12.7).collect();
    let mut b = [BlockQ8 { d: 0.0, s: 0.0, qs: [0; 32] }];
    quantize_q8(&x, &mut b);
    // max |x| is x[31] = 18.3: it maps to 127, x[0] = −12.7 to round(−12.7 · 127 / 18.3) = −88.
    assert_eq!(b[0].d, x[31] / 127.0);
    assert_eq!((b[0].qs[31], b[0].qs[0]), (127, -88));
    let sum: i32 = b[0].qs.iter().map(|&q| q as i32).sum();
    assert_eq!(b[0].s, b[0].d * sum as f32);
    quantize_q8(&[0.0; 32], &mut b);
    assert_eq!((b[0].d, b[0].qs), (0.0, [0; 32]));
}

#[test]
fn q8k_kernels_match_the_scalar_reference() {
    for kernel in Kernel::available() {
        for (i, ty) in QuantType::ALL.into_iter().filter(|t| t.wants_q8k()).enumerate() {
            let cols = 5 * QK_K;
            let m = random_matrix(ty, 3, cols, 400 + i as u64);
            let mut rng = Rng(9 + i as u64);
            let x: Vec<f32> = (0..ROWS * cols).map(|_| rng.normal()).collect();
            let mut xq = vec![BlockQ8K::ZERO; ROWS * cols / QK_K];
            quantize_q8k(&x, &mut xq);
            let rows: Vec<&[BlockQ8K]> = xq.chunks(cols / QK_K).collect();
            let mut w = vec![0f32; cols];
            // Every row count the kernels are compiled for, over all three weight rows at once.
            for take in 1..=ROWS {
                let mut out = vec![0f32; take * 3];
                kernel.dot_rows_q8k(ty, m.data(), m.data().len() / 3, &rows[..take], &mut out);
                for r in 0..3 {
                    scalar::dequantize_row(ty, m.row(r), &mut w);
                    for (j, x) in rows[..take].iter().enumerate() {
                        let (got, want) = (out[j * 3 + r], scalar::vec_dot_q8k(ty, m.row(r), x));
                        let scale: f32 = w.iter().zip(&x_row(&xq, j, cols)).map(|(a, b)| (a * b).abs()).sum();
                        assert!(
                            (got - want).abs() <= 1e-5 * scale,
                            "{} ({kernel:?}), rows {take}, weight row {r}, x row {j}: {got} vs reference {want}",
                            ty.name()
                        );
                    }
                }
            }
        }
    }
}

/// Activation row `j` of `xq` (rows of `cols / 256` blocks) as floats.
fn x_row(xq: &[BlockQ8K], j: usize, cols: usize) -> Vec<f32> {
    let per = cols / QK_K;
    xq[j * per..(j + 1) * per].iter().flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32)).collect()
}

#[test]
fn q8k_activations_round_as_llama_cpp() {
    let x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 200.3) / 10.0).collect();
    let mut b = [BlockQ8K::ZERO];
    quantize_q8k(&x, &mut b);
    // The largest magnitude is x[0] = −20.03: iscale = −127 / −20.03, so x[0] → −127 and
    // x[255] = 5.57 → round(5.57 · 127 / 20.03) = 35.
    assert_eq!((b[0].qs[0], b[0].qs[255]), (-127, 35));
    assert_eq!(b[0].d, 1.0 / (-127.0 / x[0]));
    for (k, &sum) in b[0].bsums.iter().enumerate() {
        assert_eq!(sum as i32, b[0].qs[16 * k..16 * (k + 1)].iter().map(|&q| q as i32).sum::<i32>());
    }
    quantize_q8k(&[0.0; QK_K], &mut b);
    assert_eq!(b[0], BlockQ8K::ZERO);
}

#[test]
fn panel_codes_rebuild_every_type_s_blocks() {
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        let m = random_matrix(ty, 2, 512, 900 + i as u64);
        let g = gemm::group(ty);
        let mut want = vec![0f32; ty.block_elems()];
        let mut codes = vec![0u8; ty.block_elems()];
        let (mut dw, mut cw) = (vec![0f32; ty.block_elems() / g], vec![0f32; ty.block_elems() / g]);
        for block in m.data().chunks_exact(ty.block_bytes()) {
            scalar::dequantize_block(ty, block, &mut want);
            scalar::block_codes(ty, block, &mut codes, &mut dw, &mut cw);
            for (e, &v) in want.iter().enumerate() {
                let got = dw[e / g] * codes[e] as f32 + cw[e / g];
                let tol = 1e-6 * (dw[e / g].abs() * 256.0 + cw[e / g].abs());
                assert!((got - v).abs() <= tol, "{}: element {e}: {got} vs {v}", ty.name());
            }
        }
    }
}

#[test]
fn gemm_matches_the_row_reference_and_its_plain_form() {
    for (i, ty) in QuantType::ALL.into_iter().enumerate() {
        // Rows not a multiple of the panel, activation rows not a multiple of the kernel's.
        let (n, k, m) = (gemm::PANEL + 5, 512, 7);
        let w = random_matrix(ty, n, k, 700 + i as u64);
        let mut rng = Rng(80 + i as u64);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let acts = gemm::Activations::new(&x, k, ty);
        let mut plain = vec![0f32; m * n];
        gemm::product(Kernel::Scalar, &w, &acts, &mut plain);
        let xq = quantize_rows(&x, k);
        let mut wrow = vec![0f32; k];
        for col in 0..n {
            scalar::dequantize_row(ty, w.row(col), &mut wrow);
            for row in 0..m {
                let xr = &xq[row * k / QK8..(row + 1) * k / QK8];
                let want = scalar::vec_dot(ty, w.row(col), xr);
                // The same 8-bit activations and exact integer products: only float order differs.
                let scale: f32 = wrow.iter().zip(&x[row * k..]).map(|(a, b)| (a * b).abs()).sum();
                let got = plain[row * n + col];
                assert!((got - want).abs() <= 1e-5 * scale, "{} ({row}, {col}): {got} vs {want}", ty.name());
            }
        }
        for kernel in Kernel::available() {
            let mut y = vec![0f32; m * n];
            gemm::product(kernel, &w, &acts, &mut y);
            // The SIMD kernel takes the same float steps in the same order, lane by lane.
            assert_eq!(y, plain, "{} on {kernel:?}", ty.name());
        }
        assert_eq!(w.gemm(&x).unwrap(), plain, "{}", ty.name());
    }
}

#[test]
fn gemm_rows_do_not_depend_on_each_other() {
    let w = random_matrix(QuantType::Q5_0, 40, 256, 5);
    let mut rng = Rng(9);
    let x: Vec<f32> = (0..9 * 256).map(|_| rng.normal()).collect();
    let all = w.gemm(&x).unwrap();
    for row in 0..9 {
        let alone = w.gemm(&x[row * 256..(row + 1) * 256]).unwrap();
        assert_eq!(alone, all[row * 40..(row + 1) * 40], "row {row}");
    }
}

#[test]
fn vectorized_activation_rounding_is_the_reference_s() {
    let mut rng = Rng(31);
    // Random rows, a zero block, a block with one value, and values landing on .5 steps.
    let mut x: Vec<f32> = (0..64 * 32).map(|_| rng.normal() * 3.0).collect();
    x[32..64].fill(0.0);
    x[64..96].fill(0.0);
    x[70] = -2.5;
    for (i, v) in x[96..128].iter_mut().enumerate() {
        *v = i as f32 * 0.5 - 7.0;
    }
    let blank = BlockQ8 { d: 0.0, s: 0.0, qs: [0; QK8] };
    let (mut want, mut got) = (vec![blank; 64], vec![blank; 64]);
    scalar::quantize_q8(&x, &mut want);
    quantize_q8(&x, &mut got);
    assert_eq!(got, want);
}
