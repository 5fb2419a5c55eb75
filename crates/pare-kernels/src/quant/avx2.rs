//! AVX2 + FMA + F16C kernels, and the same kernels built for CPUs with AVX-512 (BW, VL, VNNI),
//! picked by the `WIDE` flag: each weight block is unpacked once into 32 unsigned codes per 32
//! elements and multiplied with up to [`ROWS`](super::ROWS) activation rows by `maddubs` (u8 × i8
//! pairs summed to i16, no saturation since codes are ≤ 63 or, for Q8_0, the sign is moved onto
//! the activations) — or, with VNNI, by `dpbusd`, which sums four products straight into i32 in
//! one instruction. Offsets (Q4_0's −8, Q6_K's −32 …) and minimums are applied through the
//! activation block sums, so no weight is ever widened past 8 bits.
//!
//! The helpers are `#[inline(always)]` without target features of their own: they are inlined
//! into [`dot_rows`] or [`dot_rows_wide`], whose features then cover every intrinsic in them.

use std::arch::x86_64::*;

use super::scalar::{q3k_scales, scale_min_k4};
use super::{BlockQ8, BlockQ8K, QuantType};

/// `$body` for each block `$b` of 0..nb with its chain `$k`, alternating between two accumulator
/// chains so one block's multiply-adds do not wait on the previous block's. A macro, not a
/// function taking a closure: a closure has no target features of its own, and one left out of
/// line (as the four-row instantiations were) called every intrinsic as a function.
macro_rules! two_chains {
    ($nb:expr, |$b:ident, $k:ident| $body:block) => {{
        let nb: usize = $nb;
        for pair in (0..nb & !1).step_by(2) {
            {
                let ($b, $k) = (pair, 0);
                $body
            }
            {
                let ($b, $k) = (pair + 1, 1);
                $body
            }
        }
        if nb % 2 == 1 {
            let ($b, $k) = (nb - 1, 0);
            $body
        }
    }};
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;

/// `out[i · n + j] = w_j · xs[i]` for the `n` weight rows `w_j` of `row_bytes` each that `w`
/// holds back to back. One call covers many weight rows, so the type dispatch and the call cost
/// are paid once per row range, not once per 18-block row of a small model.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `ty` takes [`BlockQ8`] activations (not
/// [`QuantType::wants_q8k`]) and every `xs[i]` holds one per 32 of a row's elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8]], out: &mut [f32]) {
    by_rows::<false>(ty, w, row_bytes, xs, out)
}

/// [`dot_rows`] with AVX-512's VNNI dot products and mask registers.
///
/// # Safety
/// As [`dot_rows`], and the CPU also has AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dot_rows_wide(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8]], out: &mut [f32]) {
    by_rows::<true>(ty, w, row_bytes, xs, out)
}

#[inline(always)]
unsafe fn by_rows<const WIDE: bool>(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8]], out: &mut [f32]) {
    match xs.len() {
        1 => each_row::<1, WIDE>(ty, w, row_bytes, xs, out),
        2 => each_row::<2, WIDE>(ty, w, row_bytes, xs, out),
        3 => each_row::<3, WIDE>(ty, w, row_bytes, xs, out),
        _ => each_row::<4, WIDE>(ty, w, row_bytes, xs, out),
    }
}

/// [`dot_rows`] for Q4_K and Q6_K weights and [`BlockQ8K`] activations.
///
/// # Safety
/// As [`dot_rows`], with `ty` Q4_K or Q6_K and one [`BlockQ8K`] per 256 elements in every `xs[i]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_q8k(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows_q8k(ty, w, row_bytes, xs, out)
}

/// [`dot_rows_q8k`] compiled for AVX-512 (the same instructions, VEX-encoded or EVEX as the
/// compiler likes; the k-quant products need 16-bit scale multiplies, which VNNI lacks).
///
/// # Safety
/// As [`dot_rows_q8k`], and the CPU also has AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn dot_rows_q8k_wide(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows_q8k(ty, w, row_bytes, xs, out)
}

#[inline(always)]
unsafe fn by_rows_q8k(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8K]], out: &mut [f32]) {
    match xs.len() {
        1 => each_row_q8k::<1>(ty, w, row_bytes, xs, out),
        2 => each_row_q8k::<2>(ty, w, row_bytes, xs, out),
        3 => each_row_q8k::<3>(ty, w, row_bytes, xs, out),
        _ => each_row_q8k::<4>(ty, w, row_bytes, xs, out),
    }
}

#[inline(always)]
unsafe fn each_row_q8k<const R: usize>(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8K]], out: &mut [f32]) {
    let x: [*const BlockQ8K; R] = std::array::from_fn(|i| xs[i].as_ptr());
    let n = w.len() / row_bytes;
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let dots = match ty {
            QuantType::Q4K => q4_k_q8k::<R>(row, x),
            QuantType::Q6K => q6_k_q8k::<R>(row, x),
            _ => unreachable!("{} takes 32-element activation blocks", ty.name()),
        };
        for (i, d) in dots.into_iter().enumerate() {
            *out.get_unchecked_mut(i * n + j) = d;
        }
    }
}

#[inline(always)]
unsafe fn each_row<const R: usize, const WIDE: bool>(
    ty: QuantType,
    w: &[u8],
    row_bytes: usize,
    xs: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let x: [*const BlockQ8; R] = std::array::from_fn(|i| xs[i].as_ptr());
    let n = w.len() / row_bytes;
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let dots = rows::<R, WIDE>(ty, row, x);
        for (i, d) in dots.into_iter().enumerate() {
            *out.get_unchecked_mut(i * n + j) = d;
        }
    }
}

#[inline(always)]
unsafe fn rows<const R: usize, const WIDE: bool>(ty: QuantType, w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    match ty {
        QuantType::Q4_0 => legacy::<R, Q4_0, WIDE>(w, x),
        QuantType::Q4_1 => legacy::<R, Q4_1, WIDE>(w, x),
        QuantType::Q5_0 => legacy::<R, Q5_0, WIDE>(w, x),
        QuantType::Q5_1 => legacy::<R, Q5_1, WIDE>(w, x),
        QuantType::Q8_0 => q8_0::<R, WIDE>(w, x),
        QuantType::Q2K => q2_k::<R, WIDE>(w, x),
        QuantType::Q3K => q3_k::<R, WIDE>(w, x),
        QuantType::Q5K => q5_k::<R, WIDE>(w, x),
        QuantType::Q4K | QuantType::Q6K => unreachable!("{} takes Q8_K activations", ty.name()),
    }
}

#[inline(always)]
unsafe fn fp16(p: *const u8) -> f32 {
    // Zero-extended through a general register on purpose: left to itself the compiler inserts the
    // 16 bits into whatever vector register is free (`vpinsrw`), which ties each block's scale to
    // the last write of that register, often an accumulator, and serializes the loop.
    let bits: u32;
    std::arch::asm!(
        "movzx {bits:e}, word ptr [{p}]",
        p = in(reg) p,
        bits = out(reg) bits,
        options(pure, readonly, nostack, preserves_flags),
    );
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Two adjacent f16 values (a block's scale and minimum) in one conversion.
#[inline(always)]
unsafe fn fp16_pair(p: *const u8) -> (f32, f32) {
    let both = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
    (_mm_cvtss_f32(both), _mm_cvtss_f32(_mm_movehdup_ps(both)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)))
}

#[inline(always)]
unsafe fn hsum128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline(always)]
unsafe fn finish<const R: usize>(acc: [__m256; R], off: [f32; R]) -> [f32; R] {
    std::array::from_fn(|r| hsum(acc[r]) + off[r])
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

#[inline(always)]
unsafe fn load_x(b: *const BlockQ8) -> __m256i {
    load((*b).qs.as_ptr().cast())
}

/// 16 bytes of nibble pairs → 32 codes: low nibbles (elements 0–15), then high (16–31).
#[inline(always)]
unsafe fn nibbles<const WIDE: bool>(p: *const u8) -> __m256i {
    let both = if WIDE {
        // One 16-bit shift with a count per element: 0 in the low half, 4 in the high.
        let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
        _mm256_srlv_epi16(t, _mm256_setr_epi64x(0, 0, 0x0004_0004_0004_0004, 0x0004_0004_0004_0004))
    } else {
        let t = _mm_loadu_si128(p.cast());
        _mm256_set_m128i(_mm_srli_epi16(t, 4), t)
    };
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// `u` with 0x10 added to byte i where bit i of `bits` is set (Q5's fifth bit; `u` < 16).
#[inline(always)]
unsafe fn fifth_bits<const WIDE: bool>(u: __m256i, bits: u32) -> __m256i {
    if WIDE {
        return _mm256_mask_add_epi8(u, bits, u, _mm256_set1_epi8(0x10));
    }
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
    _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

/// Σ u·x over 32 bytes, as 8 i32 partial sums.
#[inline(always)]
unsafe fn idot<const WIDE: bool>(u: __m256i, x: __m256i) -> __m256i {
    if WIDE {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
    }
}

/// Two i16 scales, one per 16-element half (the k-quants' sub-blocks of 16).
#[inline(always)]
unsafe fn halves(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// `(v >> n) & 3` per byte, n < 8 (16-bit shifts: bits pulled in from the next byte are masked).
#[inline(always)]
unsafe fn two_bits(v: __m256i, n: i32) -> __m256i {
    _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(n)), _mm256_set1_epi8(3))
}

/// Two float accumulators per activation row, alternating by block: a chain of FMAs waits on
/// each one's latency (4 cycles), longer than the rest of a 32-element block's work.
struct Acc<const R: usize> {
    v: [[__m256; 2]; R],
    off: [[f32; 2]; R],
}

impl<const R: usize> Acc<R> {
    #[inline(always)]
    unsafe fn new() -> Self {
        Acc { v: [[_mm256_setzero_ps(); 2]; R], off: [[0.0; 2]; R] }
    }

    /// `acc += dot · scale` into chain `k`.
    #[inline(always)]
    unsafe fn add(&mut self, r: usize, k: usize, dot: __m256i, scale: f32) {
        self.v[r][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), self.v[r][k]);
    }

    #[inline(always)]
    unsafe fn finish(self) -> [f32; R] {
        std::array::from_fn(|r| hsum(_mm256_add_ps(self.v[r][0], self.v[r][1])) + self.off[r][0] + self.off[r][1])
    }
}

/// One legacy block's unsigned codes, scale and per-element offset (−8d, −16d or the minimum).
#[inline(always)]
unsafe fn legacy_block<const T: u8, const WIDE: bool>(p: *const u8) -> (__m256i, f32, f32) {
    match T {
        Q4_0 => {
            let d = fp16(p);
            (nibbles::<WIDE>(p.add(2)), d, -8.0 * d)
        }
        Q4_1 => {
            let (d, min) = fp16_pair(p);
            (nibbles::<WIDE>(p.add(4)), d, min)
        }
        Q5_0 => {
            let d = fp16(p);
            (fifth_bits::<WIDE>(nibbles::<WIDE>(p.add(6)), p.add(2).cast::<u32>().read_unaligned()), d, -16.0 * d)
        }
        _ => {
            let (d, min) = fp16_pair(p);
            (fifth_bits::<WIDE>(nibbles::<WIDE>(p.add(8)), p.add(4).cast::<u32>().read_unaligned()), d, min)
        }
    }
}

/// Q4_0, Q4_1, Q5_0, Q5_1: 32 codes, one scale, an offset (−8d, −16d) or a stored minimum.
#[inline(always)]
unsafe fn legacy<const R: usize, const T: u8, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let size = match T {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 24,
    };
    let mut acc = Acc::<R>::new();
    let nb = w.len() / size;
    two_chains!(nb, |b, k| {
        let (u, d, min) = legacy_block::<T, WIDE>(w.as_ptr().add(b * size));
        for (r, xr) in x.iter().enumerate() {
            let xb = xr.add(b);
            acc.add(r, k, idot::<WIDE>(u, load_x(xb)), d * (*xb).d);
            acc.off[r][k] += min * (*xb).s;
        }
    });
    acc.finish()
}

#[inline(always)]
unsafe fn q8_0<const R: usize, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let mut acc = Acc::<R>::new();
    let nb = w.len() / 34;
    two_chains!(nb, |b, k| {
        let p = w.as_ptr().add(b * 34);
        let d = fp16(p);
        let q = load(p.add(2));
        // |w| as unsigned codes, w's sign moved onto x (activations never hold −128).
        let u = _mm256_sign_epi8(q, q);
        for (r, xr) in x.iter().enumerate() {
            let xb = xr.add(b);
            acc.add(r, k, idot::<WIDE>(u, _mm256_sign_epi8(load_x(xb), q)), d * (*xb).d);
        }
    });
    acc.finish()
}

/// Q5_K: 8 sub-blocks of 32, 6-bit scales and minimums, a fifth bit per code.
#[inline(always)]
unsafe fn q5_k<const R: usize, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [0f32; R];
    for sb in 0..w.len() / 176 {
        let p = w.as_ptr().add(sb * 176);
        let (d, dmin) = (fp16(p), fp16(p.add(2)));
        let scales = std::slice::from_raw_parts(p.add(4), 12);
        let mut qh = load(p.add(16));
        for pair in 0..4 {
            let q = load(p.add(48 + 32 * pair));
            let codes = [
                _mm256_or_si256(_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), low4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4),
                ),
            ];
            qh = _mm256_srli_epi16(qh, 2);
            for (half, &u) in codes.iter().enumerate() {
                let c = 2 * pair + half;
                let (sc, m) = scale_min_k4(c, scales);
                let (dc, mc) = (d * sc as f32, dmin * m as f32);
                for r in 0..R {
                    let xb = x[r].add(sb * 8 + c);
                    let dot = _mm256_cvtepi32_ps(idot::<WIDE>(u, load_x(xb)));
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dc * (*xb).d), acc[r]);
                    off[r] -= mc * (*xb).s;
                }
            }
        }
    }
    finish(acc, off)
}

/// Q3_K: 2 low bits + a high bit from hmask, − 4; 6-bit scales per 16.
#[inline(always)]
unsafe fn q3_k<const R: usize, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let m4 = _mm256_set1_epi8(4);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for sb in 0..w.len() / 110 {
        let p = w.as_ptr().add(sb * 110);
        let d = fp16(p.add(108));
        let scales = q3k_scales(std::slice::from_raw_parts(p.add(96), 12));
        let hm = load(p);
        for n in 0..2 {
            let q = load(p.add(32 + 32 * n));
            for j in 0..4 {
                let high = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128((4 * n + j) as i32)), one);
                let u = _mm256_or_si256(two_bits(q, 2 * j as i32), _mm256_slli_epi16(high, 2));
                let s = halves(scales[8 * n + 2 * j] as i16, scales[8 * n + 2 * j + 1] as i16);
                for r in 0..R {
                    let xb = x[r].add(sb * 8 + 4 * n + j);
                    let xv = load_x(xb);
                    let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(u, xv), _mm256_maddubs_epi16(m4, xv));
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, s));
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * (*xb).d), acc[r]);
                }
            }
        }
    }
    finish(acc, [0.0; R])
}

/// Q2_K: 2-bit codes, a 4-bit scale and a 4-bit minimum per 16.
#[inline(always)]
unsafe fn q2_k<const R: usize, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for sb in 0..w.len() / 84 {
        let p = w.as_ptr().add(sb * 84);
        let (d, dmin) = (fp16(p.add(80)), fp16(p.add(82)));
        for n in 0..2 {
            let q = load(p.add(16 + 32 * n));
            for j in 0..4 {
                let u = two_bits(q, 2 * j as i32);
                let (a, b) = (*p.add(8 * n + 2 * j), *p.add(8 * n + 2 * j + 1));
                let s = halves((a & 0xF) as i16, (b & 0xF) as i16);
                let m = halves((a >> 4) as i16, (b >> 4) as i16);
                for r in 0..R {
                    let xb = x[r].add(sb * 8 + 4 * n + j);
                    let xv = load_x(xb);
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), s));
                    let mins = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(one, xv), m));
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * (*xb).d), acc[r]);
                    acc[r] = _mm256_fnmadd_ps(mins, _mm256_set1_ps(dmin * (*xb).d), acc[r]);
                }
            }
        }
    }
    finish(acc, [0.0; R])
}

/// Q4_K × Q8_K (llama.cpp's `ggml_vec_dot_q4_K_q8_K`): the eight 32-element products of a
/// super-block are multiplied by their 6-bit scales as 16-bit integers and summed in i32, the
/// minimums meet the activations' sums per 16; one float FMA per 256 elements.
#[inline(always)]
unsafe fn q4_k_q8k<const R: usize>(w: &[u8], x: [*const BlockQ8K; R]) -> [f32; R] {
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for sb in 0..w.len() / 144 {
        let p = w.as_ptr().add(sb * 144);
        let (d, dmin) = (fp16(p), fp16(p.add(2)));
        // The 12 packed bytes → 8 scales then 8 minimums, one byte each (ggml's utmp shuffle).
        let mut u = [0u32; 4];
        std::ptr::copy_nonoverlapping(p.add(4), u.as_mut_ptr().cast::<u8>(), 12);
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const LOW2: u32 = 0x0303_0303;
        u[3] = ((u[2] >> 4) & LOW4) | (((u[1] >> 6) & LOW2) << 4);
        let mins_low = u[1] & LOW6;
        u[1] = (u[2] & LOW4) | (((u[0] >> 6) & LOW2) << 4);
        u[2] = mins_low;
        u[0] &= LOW6;
        let scales_mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(u.as_ptr().cast()));
        let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(scales_mins));
        let mins = _mm256_extracti128_si256(scales_mins, 1);
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            // Scale 2j for the low nibbles (elements 64j..64j+32), 2j+1 for the high ones.
            let scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(((4 * j) | ((4 * j + 1) << 8)) as i16));
            let scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(((4 * j + 2) | ((4 * j + 3) << 8)) as i16));
            let q = load(p.add(16 + 32 * j));
            let ql = _mm256_and_si256(q, low4);
            let qh = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
            for r in 0..R {
                let xq = (*x[r].add(sb)).qs.as_ptr().cast::<u8>().add(64 * j);
                let lo = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(ql, load(xq)));
                let hi = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(qh, load(xq.add(32))));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(lo, hi));
            }
        }
        for r in 0..R {
            let xb = &*x[r].add(sb);
            let bsums = _mm256_loadu_si256(xb.bsums.as_ptr().cast());
            let sums32 = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256(bsums, 1));
            let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins, sums32));
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(-dmin * xb.d), m, acc_m[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    std::array::from_fn(|r| hsum(acc[r]) + hsum128(acc_m[r]))
}

/// Q6_K × Q8_K (llama.cpp's `ggml_vec_dot_q6_K_q8_K`): 6-bit codes times activations, scaled per
/// 16 in integer; the −32 offset is the scales times the activations' sums per 16, subtracted once.
#[inline(always)]
unsafe fn q6_k_q8k<const R: usize>(w: &[u8], x: [*const BlockQ8K; R]) -> [f32; R] {
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    for sb in 0..w.len() / 210 {
        let p = w.as_ptr().add(sb * 210);
        let d = fp16(p.add(208));
        let scales = _mm_loadu_si128(p.add(192).cast());
        let scales16 = _mm256_cvtepi8_epi16(scales);
        let mut sumi: [__m256i; R] = std::array::from_fn(|r| {
            let bsums = _mm256_loadu_si256((*x[r].add(sb)).bsums.as_ptr().cast());
            // −32 · Σ scale · (activation sum per 16).
            _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales16), 5))
        });
        for n in 0..2 {
            let ql = [load(p.add(64 * n)), load(p.add(64 * n + 32))];
            let qh = load(p.add(128 + 32 * n));
            for c in 0..4 {
                let low = if c < 2 {
                    _mm256_and_si256(ql[c], low4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(ql[c - 2], 4), low4)
                };
                let u = _mm256_or_si256(low, _mm256_slli_epi16(two_bits(qh, 2 * c as i32), 4));
                // Scales 2k, 2k+1 (k = 4n + c) for the two 16-element halves.
                let k = (4 * n + c) as i8;
                let pick = _mm_setr_epi8(
                    2 * k,
                    2 * k,
                    2 * k,
                    2 * k,
                    2 * k,
                    2 * k,
                    2 * k,
                    2 * k,
                    2 * k + 1,
                    2 * k + 1,
                    2 * k + 1,
                    2 * k + 1,
                    2 * k + 1,
                    2 * k + 1,
                    2 * k + 1,
                    2 * k + 1,
                );
                let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                for r in 0..R {
                    let xq = (*x[r].add(sb)).qs.as_ptr().cast::<u8>().add(128 * n + 32 * c);
                    let prod = _mm256_madd_epi16(s, _mm256_maddubs_epi16(u, load(xq)));
                    sumi[r] = _mm256_add_epi32(sumi[r], prod);
                }
            }
        }
        for r in 0..R {
            let dx = (*x[r].add(sb)).d;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    std::array::from_fn(|r| hsum(acc[r]))
}

/// [`super::scalar::quantize_q8`] on 8 lanes, bit for bit: the same maximum, scale and product,
/// rounded half to even by `cvtps2dq` (the default rounding mode).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (chunk, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let p = chunk.as_ptr();
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
        let a = v.map(|v| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
        // The packs work per 128-bit lane; the permute puts the four groups of 8 back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), bytes);
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// The GEMM's panel format ([`super::gemm`]) for the 32-element types: for each block of each of
/// up to 16 rows, its 32 unsigned codes in groups of four at `codes[(b·8 + q)·64 + lane·4]`, its
/// scale at `dw[b·16 + lane]` and offset at `cw[b·16 + lane]` — the values
/// [`super::scalar::block_codes`] gives, bit for bit.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI; `ty` is Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0; `rows` holds at
/// most 16 rows of equally many blocks and the outputs are sized for them.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn panel_codes(ty: QuantType, rows: &[&[u8]], codes: &mut [u8], dw: &mut [f32], cw: &mut [f32]) {
    let size = ty.block_bytes();
    for (lane, row) in rows.iter().enumerate() {
        for b in 0..row.len() / size {
            let p = row.as_ptr().add(b * size);
            let (u, d, min) = match ty {
                QuantType::Q4_0 => legacy_block::<Q4_0, true>(p),
                QuantType::Q4_1 => legacy_block::<Q4_1, true>(p),
                QuantType::Q5_0 => legacy_block::<Q5_0, true>(p),
                QuantType::Q5_1 => legacy_block::<Q5_1, true>(p),
                _ => {
                    // Signed codes + 128: flipping the sign bit.
                    let d = fp16(p);
                    (_mm256_xor_si256(load(p.add(2)), _mm256_set1_epi8(-128)), d, -128.0 * d)
                }
            };
            let mut groups = [0u32; 8];
            _mm256_storeu_si256(groups.as_mut_ptr().cast(), u);
            for (q, &g) in groups.iter().enumerate() {
                codes.as_mut_ptr().add((b * 8 + q) * 64 + lane * 4).cast::<u32>().write_unaligned(g);
            }
            dw[b * 16 + lane] = d;
            cw[b * 16 + lane] = min;
        }
    }
}
