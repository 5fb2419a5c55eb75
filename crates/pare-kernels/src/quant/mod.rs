//! Matrix products over GGUF's quantized blocks as stored, on the CPU.
//!
//! A weight matrix stays in its file's blocks (Q4_0 … Q8_0, Q2_K … Q6_K); activations are
//! quantized once per row and product, and each dot product runs on integers over unsigned
//! weight codes and signed activation codes. The activation format follows the weight type
//! ([`QuantType::wants_q8k`]):
//! - [`BlockQ8`] (blocks of 32, llama.cpp's Q8_0/Q8_1 with the block sum kept) for the 32-element
//!   types and for Q2_K, Q3_K, Q5_K, whose 16- and 32-wide sub-blocks line up with it: one float
//!   multiply-add per 32 elements.
//! - [`BlockQ8K`] (llama.cpp's Q8_K: one scale per 256, code sums per 16) for Q4_K and Q6_K, the
//!   k-quants Q4_K_M files are made of: a super-block's sub-block products are scaled by their
//!   sub-block scales in integers and converted to float once per 256 elements.
//!
//! pare owns these kernels rather than patching candle's: candle's CPU `QMatMul` has SIMD paths
//! for Q4_0, Q8_0 and the k-quants only (Q4_1/Q5_x are scalar), runs one row at a time (so a
//! prefill re-decodes every weight block once per token), and spreads work over its own rayon
//! calls per op; changing that would mean carrying a fork of candle-core. Here a kernel decodes a
//! weight block once for up to [`ROWS`] activation rows, the thread split is by output rows on
//! one persistent pool ([`crate::threads`]), and the block layouts are checked against candle's
//! own dequantization in the tests.
//!
//! [`scalar`] holds the plain references (dequantize a block, dot in f32); they are also the
//! fallback on CPUs without AVX2/FMA/F16C. [`avx2`] holds the vectorized kernels, compiled twice —
//! for AVX2 and for AVX-512 with VNNI (`dpbusd`, as llama.cpp's `-march=native` build uses) — and
//! picked at run time ([`Kernel::detect`]).

use std::sync::Arc;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod gemm;
pub mod scalar;

/// Elements per activation block.
pub const QK8: usize = 32;
/// Elements per k-quant super-block.
pub const QK_K: usize = 256;
/// Activation rows one kernel call serves, decoding each weight block once for all of them.
pub const ROWS: usize = 4;

/// A GGUF block type with a CPU kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantType {
    pub const ALL: [QuantType; 10] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2K,
        QuantType::Q3K,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
    ];

    /// Elements one block holds.
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q8_0 => 32,
            _ => QK_K,
        }
    }

    /// Bytes one block takes (ggml's `type_size`).
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q2K => 84,
            QuantType::Q3K => 110,
            QuantType::Q4K => 144,
            QuantType::Q5K => 176,
            QuantType::Q6K => 210,
        }
    }

    /// Whether products with this type take [`BlockQ8K`] activations (else [`BlockQ8`]).
    pub fn wants_q8k(self) -> bool {
        matches!(self, QuantType::Q4K | QuantType::Q6K)
    }

    /// GGUF's name for the type, e.g. `Q4_K`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q2K => "Q2_K",
            QuantType::Q3K => "Q3_K",
            QuantType::Q4K => "Q4_K",
            QuantType::Q5K => "Q5_K",
            QuantType::Q6K => "Q6_K",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{ty}: {cols} columns are not a whole number of {block}-element blocks")]
    Columns { ty: &'static str, cols: usize, block: usize },
    #[error("{ty}: {rows}×{cols} needs {expected} bytes of blocks, got {actual}")]
    Bytes { ty: &'static str, rows: usize, cols: usize, expected: usize, actual: usize },
    #[error("quantized matmul: x has {x} values, not a multiple of the {cols} columns")]
    Input { x: usize, cols: usize },
}

/// A row of activations quantized to 8 bits: `x ≈ d · qs`, with `s = d · Σ qs` kept so the
/// offsets and minimums of Q4_1, Q5_x and the k-quants cost one multiply per block.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK8],
}

/// Quantize `x` (a multiple of 32 long) into `out`, llama.cpp's rounding: scale by 127/max|x|,
/// round half to even ([`scalar::quantize_q8`], vectorized where the CPU has AVX2).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK8);
    match Kernel::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: detect() saw AVX2, FMA and F16C; the lengths match (checked in debug builds,
        // and zip stops at the shorter).
        Kernel::Avx2 | Kernel::Avx512 => unsafe { avx2::quantize_q8(x, out) },
        _ => scalar::quantize_q8(x, out),
    }
}

/// A super-block of 256 activations quantized to 8 bits, llama.cpp's Q8_K: `x ≈ d · qs`, with
/// the code sums of each 16 kept for the k-quants' minimums and offsets.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    pub const ZERO: BlockQ8K = BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
}

/// Quantize `x` (a multiple of 256 long) into `out`, llama.cpp's `quantize_row_q8_K_ref`: the
/// element of largest magnitude maps to −127 (so its sign sets the scale's), round half to even.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (chunk, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let max = chunk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        if max == 0.0 {
            *b = BlockQ8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            *q = (iscale * v).round_ties_even().min(127.0) as i8;
        }
        for (sum, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// Bytes of one GGUF Q8_0 block: an f16 scale and 32 signed codes.
pub const Q8_0_BLOCK_BYTES: usize = 34;

/// Encode `x` (a multiple of 32 long) as GGUF Q8_0 blocks into `out` (34 bytes per 32 values),
/// llama.cpp's rounding: scale by 127/max|x| (stored as f16), round half to even. The KV cache's
/// `q8_0` format.
pub fn encode_q8_0(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len() / QK8 * Q8_0_BLOCK_BYTES, out.len());
    for (chunk, b) in x.chunks_exact(QK8).zip(out.chunks_exact_mut(Q8_0_BLOCK_BYTES)) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        for (q, &v) in b[2..].iter_mut().zip(chunk) {
            *q = (v * id).round_ties_even() as i8 as u8;
        }
    }
}

/// Decode GGUF Q8_0 blocks (34 bytes per 32 values) into `out`.
pub fn decode_q8_0(bytes: &[u8], out: &mut [f32]) {
    scalar::dequantize_row(QuantType::Q8_0, bytes, out)
}

/// A (rows, cols) weight matrix in GGUF blocks, rows contiguous as in the file. Clones and
/// [`QuantMatrix::narrow_rows`] views share the blocks.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    ty: QuantType,
    rows: usize,
    cols: usize,
    data: Arc<[u8]>,
    /// Byte offset of row 0 in `data`.
    start: usize,
}

impl QuantMatrix {
    pub fn new(ty: QuantType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, QuantError> {
        if cols == 0 || !cols.is_multiple_of(ty.block_elems()) {
            return Err(QuantError::Columns { ty: ty.name(), cols, block: ty.block_elems() });
        }
        let expected = rows * cols / ty.block_elems() * ty.block_bytes();
        if data.len() != expected {
            return Err(QuantError::Bytes { ty: ty.name(), rows, cols, expected, actual: data.len() });
        }
        Ok(QuantMatrix { ty, rows, cols, data: data.into(), start: 0 })
    }

    pub fn quant_type(&self) -> QuantType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks as stored.
    pub fn data(&self) -> &[u8] {
        &self.data[self.start..self.start + self.rows * self.row_bytes()]
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// One row's blocks.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[self.start + r * n..self.start + (r + 1) * n]
    }

    /// Rows `start..start + n` as a view sharing the blocks; None if out of range.
    pub fn narrow_rows(&self, start: usize, n: usize) -> Option<QuantMatrix> {
        (start + n <= self.rows).then(|| QuantMatrix {
            rows: n,
            start: self.start + start * self.row_bytes(),
            data: self.data.clone(),
            ..*self
        })
    }

    /// Stack matrices of one type and width (q, k, v; gate, up) so one pass serves them all.
    /// None when types or widths differ.
    pub fn stack(parts: &[&QuantMatrix]) -> Option<QuantMatrix> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.ty != first.ty || p.cols != first.cols) {
            return None;
        }
        let data: Vec<u8> = parts.iter().flat_map(|p| p.data().iter().copied()).collect();
        Some(QuantMatrix {
            ty: first.ty,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data: data.into(),
            start: 0,
        })
    }

    /// The matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols).enumerate().for_each(|(r, y)| scalar::dequantize_row(self.ty, self.row(r), y));
        out
    }

    /// `y = x · selfᵀ` for `x` of (m, cols) row-major, f32 out (m, rows). Activations are
    /// quantized per row to [`BlockQ8`] or, for the types that want it, [`BlockQ8K`]; the work is
    /// split over the pool by output rows.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>, QuantError> {
        if !x.len().is_multiple_of(self.cols) {
            return Err(QuantError::Input { x: x.len(), cols: self.cols });
        }
        let m = x.len() / self.cols;
        let mut y = vec![0f32; m * self.rows];
        if self.ty.wants_q8k() {
            let xq = quantize_rows_with(x, self.cols, QK_K, BlockQ8K::ZERO, quantize_q8k);
            self.matmul_q8k(&xq, m, &mut y);
        } else {
            self.matmul_q8(&quantize_rows(x, self.cols), m, &mut y);
        }
        Ok(y)
    }

    /// `y = x · selfᵀ` for many rows at once (a prefill): every weight type is decoded into one
    /// interleaved 8-bit format per job and multiplied by a GEMM kernel (see `gemm.rs`). A row's
    /// result depends only on that row. Fast where [`gemm_is_fast`]; elsewhere it runs the plain
    /// form of the same kernel.
    pub fn gemm(&self, x: &[f32]) -> Result<Vec<f32>, QuantError> {
        if !x.len().is_multiple_of(self.cols) {
            return Err(QuantError::Input { x: x.len(), cols: self.cols });
        }
        Ok(gemm::gemm(self, x, Kernel::detect()))
    }

    /// [`Self::matmul`] on activations already quantized by [`quantize_rows`] (`m` rows), into
    /// `y` (m, rows).
    pub fn matmul_q8(&self, xq: &[BlockQ8], m: usize, y: &mut [f32]) {
        let kernel = Kernel::detect();
        self.product(xq, self.cols / QK8, m, y, |w, row_bytes, xs, dots| {
            kernel.dot_rows(self.ty, w, row_bytes, xs, dots)
        });
    }

    /// [`Self::matmul`] on [`BlockQ8K`] activations (`m` rows of `cols / 256` blocks), for a type
    /// that [wants them](QuantType::wants_q8k).
    pub fn matmul_q8k(&self, xq: &[BlockQ8K], m: usize, y: &mut [f32]) {
        let kernel = Kernel::detect();
        self.product(xq, self.cols / QK_K, m, y, |w, row_bytes, xs, dots| {
            kernel.dot_rows_q8k(self.ty, w, row_bytes, xs, dots)
        });
    }

    /// The thread split and row grouping shared by both activation formats: `dot` fills
    /// `dots[i · n + j]` for the `n` weight rows in `w` and the activation rows `xs`.
    fn product<B: Sync>(
        &self,
        xq: &[B],
        nb: usize,
        m: usize,
        y: &mut [f32],
        dot: impl Fn(&[u8], usize, &[&[B]], &mut [f32]) + Sync,
    ) {
        assert!(xq.len() == m * nb && y.len() == m * self.rows, "quantized matmul: shapes");
        // Output rows in chunks: small enough that both threads stay busy on a decode step's
        // 576-row matrix, large enough that a chunk's weights stay in L1 while all m activation
        // rows pass over them.
        let threads = crate::threads::current().max(1);
        let chunk = (self.rows / (threads * 8)).clamp(4, 64);
        let out = SyncPtr(y.as_mut_ptr());
        let n_out = self.rows;
        let row_bytes = self.row_bytes();
        crate::threads::for_each(self.rows.div_ceil(chunk), |c| {
            let rows = c * chunk..((c + 1) * chunk).min(n_out);
            let out = &out;
            // The chunk's weight rows stay in L1/L2 while each group of ROWS activation rows
            // passes over them, in one kernel call.
            let w = &self.data[self.start + rows.start * row_bytes..self.start + rows.end * row_bytes];
            let mut dots = vec![0f32; ROWS * rows.len()];
            for m0 in (0..m).step_by(ROWS) {
                let take = (m - m0).min(ROWS);
                let xs: [&[B]; ROWS] = std::array::from_fn(|i| {
                    let row = m0 + i.min(take - 1);
                    &xq[row * nb..(row + 1) * nb]
                });
                let dots = &mut dots[..take * rows.len()];
                dot(w, row_bytes, &xs[..take], dots);
                for (i, part) in dots.chunks_exact(rows.len()).enumerate() {
                    // SAFETY: chunks own disjoint output rows; (m0+i, rows) lies inside y.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(out.0.add((m0 + i) * n_out + rows.start), rows.len()) };
                    dst.copy_from_slice(part);
                }
            }
        });
    }
}

/// Quantize `x` (rows of `cols` values, cols a multiple of 32) row by row, in parallel.
pub fn quantize_rows(x: &[f32], cols: usize) -> Vec<BlockQ8> {
    quantize_rows_with(x, cols, QK8, BlockQ8 { d: 0.0, s: 0.0, qs: [0; QK8] }, quantize_q8)
}

/// Quantize `x` row by row into blocks of `per` elements with `quantize`, rows in parallel.
fn quantize_rows_with<B: Copy + Send + Sync>(
    x: &[f32],
    cols: usize,
    per: usize,
    zero: B,
    quantize: impl Fn(&[f32], &mut [B]) + Sync,
) -> Vec<B> {
    let nb = cols / per;
    let m = x.len() / cols;
    let mut xq = vec![zero; m * nb];
    if m == 1 {
        quantize(x, &mut xq);
    } else {
        xq.par_chunks_mut(nb).zip(x.par_chunks(cols)).for_each(|(out, row)| quantize(row, out));
    }
    xq
}

struct SyncPtr(*mut f32);
// SAFETY: used only to write disjoint elements from the pool's threads (see matmul_q8).
unsafe impl Sync for SyncPtr {}

/// Whether [`QuantMatrix::gemm`] has its SIMD form here (AVX-512 VNNI: 64 8-bit multiply-adds
/// per instruction). Without it, dequantizing to f32 for a float GEMM is the faster prefill.
pub fn gemm_is_fast() -> bool {
    Kernel::detect() == Kernel::Avx512
}

/// Which dot-product kernels this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    Scalar,
    Avx2,
    /// AVX2's kernels with AVX-512 VNNI dot products and mask registers (Zen 4, Ice Lake on).
    Avx512,
}

impl Kernel {
    /// The fastest kernels this CPU supports.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            let wide = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            return if wide { Kernel::Avx512 } else { Kernel::Avx2 };
        }
        Kernel::Scalar
    }

    /// Every kernel set this CPU runs, slowest first (the tests compare each with the reference).
    pub fn available() -> Vec<Kernel> {
        let best = Self::detect();
        [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512].into_iter().filter(|&k| k <= best).collect()
    }

    /// `out[i] = w · xs[i]` for one weight row (its blocks) and up to [`ROWS`] activation rows;
    /// `ty` takes [`BlockQ8`] activations.
    pub fn dot(self, ty: QuantType, w: &[u8], xs: &[&[BlockQ8]], out: &mut [f32]) {
        self.dot_rows(ty, w, w.len(), xs, out)
    }

    /// `out[i · n + j] = w_j · xs[i]` for the `n` weight rows of `row_bytes` each held back to back
    /// in `w`, and up to [`ROWS`] activation rows; `ty` takes [`BlockQ8`] activations.
    pub fn dot_rows(self, ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8]], out: &mut [f32]) {
        let n = w.len() / row_bytes;
        assert!(
            !ty.wants_q8k()
                && xs.len() <= ROWS
                && out.len() == xs.len() * n
                && w.len() == n * row_bytes
                && xs.iter().all(|x| x.len() * QK8 == row_bytes / ty.block_bytes() * ty.block_elems()),
            "dot_rows: type or shapes"
        );
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2, FMA and F16C; the type and shapes were checked above.
            Kernel::Avx2 => unsafe { avx2::dot_rows(ty, w, row_bytes, xs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, and detect() also saw AVX-512 F, BW, VL and VNNI.
            Kernel::Avx512 => unsafe { avx2::dot_rows_wide(ty, w, row_bytes, xs, out) },
            _ => {
                for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                    for (i, x) in xs.iter().enumerate() {
                        out[i * n + j] = scalar::vec_dot(ty, row, x);
                    }
                }
            }
        }
    }

    /// [`Self::dot_rows`] for a type that [wants](QuantType::wants_q8k) [`BlockQ8K`] activations.
    pub fn dot_rows_q8k(self, ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8K]], out: &mut [f32]) {
        let n = w.len() / row_bytes;
        assert!(
            ty.wants_q8k()
                && xs.len() <= ROWS
                && out.len() == xs.len() * n
                && w.len() == n * row_bytes
                && xs.iter().all(|x| x.len() * QK_K == row_bytes / ty.block_bytes() * ty.block_elems()),
            "dot_rows_q8k: type or shapes"
        );
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: detect() saw AVX2, FMA and F16C; the type and shapes were checked above.
            Kernel::Avx2 => unsafe { avx2::dot_rows_q8k(ty, w, row_bytes, xs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, and detect() also saw AVX-512 F, BW, VL and VNNI.
            Kernel::Avx512 => unsafe { avx2::dot_rows_q8k_wide(ty, w, row_bytes, xs, out) },
            _ => {
                for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                    for (i, x) in xs.iter().enumerate() {
                        out[i * n + j] = scalar::vec_dot_q8k(ty, row, x);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
