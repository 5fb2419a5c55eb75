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
use super::{BlockQ8, QuantType};

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;

/// `out[i · n + j] = w_j · xs[i]` for the `n` weight rows `w_j` of `row_bytes` each that `w`
/// holds back to back. One call covers many weight rows, so the type dispatch and the call cost
/// are paid once per row range, not once per 18-block row of a small model.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every `xs[i]` holds one [`BlockQ8`] per 32 of a row's elements.
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
        QuantType::Q4K => q45_k::<R, false, WIDE>(w, x),
        QuantType::Q5K => q45_k::<R, true, WIDE>(w, x),
        QuantType::Q6K => q6_k::<R, WIDE>(w, x),
    }
}

#[inline(always)]
unsafe fn fp16(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
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
    let d = fp16(p);
    match T {
        Q4_0 => (nibbles::<WIDE>(p.add(2)), d, -8.0 * d),
        Q4_1 => (nibbles::<WIDE>(p.add(4)), d, fp16(p.add(2))),
        Q5_0 => (fifth_bits::<WIDE>(nibbles::<WIDE>(p.add(6)), p.add(2).cast::<u32>().read_unaligned()), d, -16.0 * d),
        _ => {
            (fifth_bits::<WIDE>(nibbles::<WIDE>(p.add(8)), p.add(4).cast::<u32>().read_unaligned()), d, fp16(p.add(2)))
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
    let mut step = |b: usize, k: usize| {
        let (u, d, min) = legacy_block::<T, WIDE>(w.as_ptr().add(b * size));
        for (r, xr) in x.iter().enumerate() {
            let xb = xr.add(b);
            acc.add(r, k, idot::<WIDE>(u, load_x(xb)), d * (*xb).d);
            acc.off[r][k] += min * (*xb).s;
        }
    };
    for b in (0..nb & !1).step_by(2) {
        step(b, 0);
        step(b + 1, 1);
    }
    if nb % 2 == 1 {
        step(nb - 1, 0);
    }
    acc.finish()
}

#[inline(always)]
unsafe fn q8_0<const R: usize, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let mut acc = Acc::<R>::new();
    let nb = w.len() / 34;
    let mut step = |b: usize, k: usize| {
        let p = w.as_ptr().add(b * 34);
        let d = fp16(p);
        let q = load(p.add(2));
        // |w| as unsigned codes, w's sign moved onto x (activations never hold −128).
        let u = _mm256_sign_epi8(q, q);
        for (r, xr) in x.iter().enumerate() {
            let xb = xr.add(b);
            acc.add(r, k, idot::<WIDE>(u, _mm256_sign_epi8(load_x(xb), q)), d * (*xb).d);
        }
    };
    for b in (0..nb & !1).step_by(2) {
        step(b, 0);
        step(b + 1, 1);
    }
    if nb % 2 == 1 {
        step(nb - 1, 0);
    }
    acc.finish()
}

/// Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales and minimums.
#[inline(always)]
unsafe fn q45_k<const R: usize, const FIVE: bool, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let size = if FIVE { 176 } else { 144 };
    let qs_at = if FIVE { 48 } else { 16 };
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [0f32; R];
    for sb in 0..w.len() / size {
        let p = w.as_ptr().add(sb * size);
        let (d, dmin) = (fp16(p), fp16(p.add(2)));
        let scales = std::slice::from_raw_parts(p.add(4), 12);
        let mut qh = if FIVE { load(p.add(16)) } else { _mm256_setzero_si256() };
        for pair in 0..4 {
            let q = load(p.add(qs_at + 32 * pair));
            let mut codes = [_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_srli_epi16(q, 4), low4)];
            if FIVE {
                codes[0] = _mm256_or_si256(codes[0], _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4));
                codes[1] = _mm256_or_si256(codes[1], _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4));
                qh = _mm256_srli_epi16(qh, 2);
            }
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

/// Q6_K: 6-bit codes (low nibbles + 2 high bits) − 32, an i8 scale per 16.
#[inline(always)]
unsafe fn q6_k<const R: usize, const WIDE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let low4 = _mm256_set1_epi8(0x0F);
    let m32 = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); R];
    for sb in 0..w.len() / 210 {
        let p = w.as_ptr().add(sb * 210);
        let d = fp16(p.add(208));
        let sc = p.add(192).cast::<i8>();
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
                let s = halves(*sc.add(8 * n + 2 * c) as i16, *sc.add(8 * n + 2 * c + 1) as i16);
                for r in 0..R {
                    let xb = x[r].add(sb * 8 + 4 * n + c);
                    let xv = load_x(xb);
                    let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(u, xv), _mm256_maddubs_epi16(m32, xv));
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, s));
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * (*xb).d), acc[r]);
                }
            }
        }
    }
    finish(acc, [0.0; R])
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
