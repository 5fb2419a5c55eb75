//! Products with many activation rows (prefill) on the blocks as stored: 8-bit integer GEMM.
//!
//! The row kernels ([`super::Kernel::dot_rows`]) decode a weight block for at most
//! [`super::ROWS`] activation rows and reduce each product horizontally; that suits decode, not a
//! 512-token prompt. Here every weight type is first decoded, per job, into one *panel* format:
//! [`PANEL`] weight rows side by side, for each group of `G` elements (32, or 16 for the k-quants
//! whose scales cover 16) their unsigned codes interleaved four at a time (`[G/4][PANEL][4]`
//! bytes), a scale `dw` and an offset `cw` per row, so that `w = dw · code + cw` for every type.
//! One 512-bit `dpbusd` then multiplies four codes of sixteen weight rows with four broadcast
//! activation codes of one row: the sixteen lanes are sixteen outputs, no horizontal sums, and
//! the float work (convert, scale, offset) is paid once per group for sixteen outputs. llama.cpp
//! gets the same effect from its load-time repacking (`repack.cpp`) for a few types; decoding per
//! product keeps the model in its file's blocks and serves every type.
//!
//! Activations are quantized per row as the row kernels do ([`super::quantize_q8`], blocks of
//! 32), so a row's result depends only on that row, whatever else shares the call.

use super::{scalar, BlockQ8, Kernel, QuantMatrix, QuantType, QK8};

/// Weight rows a panel holds: one 512-bit vector of 32-bit lanes.
pub const PANEL: usize = 16;
/// Activation rows the SIMD kernel multiplies with a panel at once.
const MR: usize = 4;

/// Elements that share one weight scale in the panel format.
pub fn group(ty: QuantType) -> usize {
    match ty {
        QuantType::Q2K | QuantType::Q3K | QuantType::Q6K => 16,
        _ => 32,
    }
}

/// Activations for the GEMM: row-major codes, the scale of each 32 and the (dequantized) sum of
/// each group of `g`.
pub struct Activations {
    codes: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<f32>,
    cols: usize,
    g: usize,
}

impl Activations {
    /// Quantize the `x.len() / cols` rows of `x` for weights of `ty`.
    pub fn new(x: &[f32], cols: usize, ty: QuantType) -> Activations {
        let g = group(ty);
        let rows = x.len() / cols;
        let blocks: Vec<BlockQ8> = super::quantize_rows(x, cols);
        let mut codes = Vec::with_capacity(rows * cols);
        let mut d = Vec::with_capacity(blocks.len());
        let mut sums = Vec::with_capacity(rows * cols / g);
        for b in &blocks {
            codes.extend_from_slice(&b.qs);
            d.push(b.d);
            for part in b.qs.chunks_exact(g) {
                sums.push(b.d * part.iter().map(|&q| q as i32).sum::<i32>() as f32);
            }
        }
        Activations { codes, d, sums, cols, g }
    }

    fn rows(&self) -> usize {
        self.codes.len() / self.cols
    }
}

/// Panel-format weights: see the module's notes.
pub struct Panel {
    codes: Vec<u8>,
    dw: Vec<f32>,
    cw: Vec<f32>,
}

impl Panel {
    fn new() -> Panel {
        Panel { codes: Vec::new(), dw: Vec::new(), cw: Vec::new() }
    }

    /// Decode rows `first .. first + PANEL` of `w` (rows past its end are zero), by `kernel`'s
    /// decoder where it has one for the type.
    fn fill(&mut self, kernel: Kernel, w: &QuantMatrix, first: usize) {
        let (ty, cols, g) = (w.ty, w.cols, group(w.ty));
        let groups = cols / g;
        self.codes.clear();
        self.codes.resize(groups * PANEL * g, 0);
        self.dw.clear();
        self.dw.resize(groups * PANEL, 0.0);
        self.cw.clear();
        self.cw.resize(groups * PANEL, 0.0);
        let lanes = PANEL.min(w.rows - first);
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512 && ty.block_elems() == QK8 {
            let rows: Vec<&[u8]> = (first..first + lanes).map(|r| w.row(r)).collect();
            // SAFETY: Avx512 is detected only where AVX-512 F, BW, VL and VNNI are; a 32-element
            // type; at most PANEL rows of `groups` blocks, the buffers sized for them above.
            unsafe { super::avx2::panel_codes(ty, &rows, &mut self.codes, &mut self.dw, &mut self.cw) };
            return;
        }
        let _ = kernel;
        let per_block = ty.block_elems() / g;
        let mut codes = [0u8; super::QK_K];
        let (mut dw, mut cw) = ([0f32; super::QK_K / 16], [0f32; super::QK_K / 16]);
        for lane in 0..lanes {
            for (b, block) in w.row(first + lane).chunks_exact(ty.block_bytes()).enumerate() {
                let n = ty.block_elems();
                scalar::block_codes(ty, block, &mut codes[..n], &mut dw[..per_block], &mut cw[..per_block]);
                for k in 0..per_block {
                    let t = b * per_block + k;
                    self.dw[t * PANEL + lane] = dw[k];
                    self.cw[t * PANEL + lane] = cw[k];
                    let dst = t * PANEL * g;
                    for q in 0..g / 4 {
                        let at = dst + (q * PANEL + lane) * 4;
                        self.codes[at..at + 4].copy_from_slice(&codes[k * g + 4 * q..k * g + 4 * q + 4]);
                    }
                }
            }
        }
    }
}

/// `y (m, rows) = x · wᵀ` with `x` already quantized, on `kernel` (the scalar form is the
/// reference the SIMD one is tested against).
pub fn product(kernel: Kernel, w: &QuantMatrix, x: &Activations, y: &mut [f32]) {
    let (m, n) = (x.rows(), w.rows);
    assert!(x.cols == w.cols && x.g == group(w.ty) && y.len() == m * n, "quantized gemm: shapes");
    let out = super::SyncPtr(y.as_mut_ptr());
    crate::threads::for_each(n.div_ceil(PANEL), |p| {
        thread_local! {
            static PANEL_BUF: std::cell::RefCell<Panel> = std::cell::RefCell::new(Panel::new());
        }
        PANEL_BUF.with_borrow_mut(|panel| {
            panel.fill(kernel, w, p * PANEL);
            let lanes = PANEL.min(n - p * PANEL);
            let out = &out;
            let mut rows = [[0f32; PANEL]; MR];
            for m0 in (0..m).step_by(MR) {
                let take = MR.min(m - m0);
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: Avx512 is only detected on CPUs with AVX-512 F, BW, VL and VNNI; the
                    // panel and activation shapes were checked above.
                    Kernel::Avx512 => unsafe { avx512::panel_rows(panel, x, m0, take, &mut rows) },
                    _ => panel_rows_scalar(panel, x, m0, take, &mut rows),
                }
                for (i, row) in rows[..take].iter().enumerate() {
                    // SAFETY: panels own disjoint output columns; (m0 + i, p·PANEL + lanes) lies in y.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((m0 + i) * n + p * PANEL), lanes) };
                    dst.copy_from_slice(&row[..lanes]);
                }
            }
        })
    });
}

/// The plain form of the panel kernel: the same integer products and float steps, one lane at a
/// time.
fn panel_rows_scalar(panel: &Panel, x: &Activations, m0: usize, take: usize, out: &mut [[f32; PANEL]; MR]) {
    let g = x.g;
    let groups = x.cols / g;
    for (r, out) in out.iter_mut().enumerate().take(take) {
        let codes = &x.codes[(m0 + r) * x.cols..(m0 + r + 1) * x.cols];
        let d = &x.d[(m0 + r) * x.cols / QK8..];
        let sums = &x.sums[(m0 + r) * groups..];
        for (lane, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for t in 0..groups {
                let mut dot = 0i32;
                for q in 0..g / 4 {
                    for e in 0..4 {
                        let wq = panel.codes[t * PANEL * g + (q * PANEL + lane) * 4 + e] as i32;
                        dot += wq * codes[t * g + 4 * q + e] as i32;
                    }
                }
                let scale = panel.dw[t * PANEL + lane] * d[t * g / QK8];
                acc = (dot as f32).mul_add(scale, acc);
                acc = panel.cw[t * PANEL + lane].mul_add(sums[t], acc);
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Activations, Panel, MR, PANEL, QK8};

    /// [`super::panel_rows_scalar`] with 512-bit VNNI: lanes are the panel's sixteen weight rows.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and VNNI; `panel` was filled for `x`'s columns and group.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn panel_rows(
        panel: &Panel,
        x: &Activations,
        m0: usize,
        take: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        match (x.g, take) {
            (32, 4) => rows::<32, 4>(panel, x, m0, out),
            (32, 3) => rows::<32, 3>(panel, x, m0, out),
            (32, 2) => rows::<32, 2>(panel, x, m0, out),
            (32, _) => rows::<32, 1>(panel, x, m0, out),
            (_, 4) => rows::<16, 4>(panel, x, m0, out),
            (_, 3) => rows::<16, 3>(panel, x, m0, out),
            (_, 2) => rows::<16, 2>(panel, x, m0, out),
            (_, _) => rows::<16, 1>(panel, x, m0, out),
        }
    }

    #[inline(always)]
    unsafe fn rows<const G: usize, const R: usize>(
        panel: &Panel,
        x: &Activations,
        m0: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        let cols = x.cols;
        let groups = cols / G;
        let xc: [*const i8; R] = std::array::from_fn(|r| x.codes.as_ptr().add((m0 + r) * cols));
        let xd: [*const f32; R] = std::array::from_fn(|r| x.d.as_ptr().add((m0 + r) * cols / QK8));
        let xs: [*const f32; R] = std::array::from_fn(|r| x.sums.as_ptr().add((m0 + r) * groups));
        let (wc, dw, cw) = (panel.codes.as_ptr(), panel.dw.as_ptr(), panel.cw.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        for t in 0..groups {
            let mut dots = [_mm512_setzero_si512(); R];
            for q in 0..G / 4 {
                let w = _mm512_loadu_si512(wc.add((t * G / 4 + q) * PANEL * 4).cast());
                for r in 0..R {
                    let a = _mm512_set1_epi32(xc[r].add(t * G + 4 * q).cast::<i32>().read_unaligned());
                    dots[r] = _mm512_dpbusd_epi32(dots[r], w, a);
                }
            }
            let scale = _mm512_loadu_ps(dw.add(t * PANEL));
            let offset = _mm512_loadu_ps(cw.add(t * PANEL));
            for r in 0..R {
                let s = _mm512_mul_ps(scale, _mm512_set1_ps(*xd[r].add(t * G / QK8)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), s, acc[r]);
                acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(*xs[r].add(t)), acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}

/// Quantize `x`'s rows and multiply: the entry point [`QuantMatrix::gemm`] uses.
pub(super) fn gemm(w: &QuantMatrix, x: &[f32], kernel: Kernel) -> Vec<f32> {
    let acts = Activations::new(x, w.cols, w.ty);
    let mut y = vec![0f32; acts.rows() * w.rows];
    product(kernel, w, &acts, &mut y);
    y
}
