//! AVX2 + FMA + F16C kernels: each weight block is unpacked once into 32 unsigned codes per
//! 32 elements and multiplied with up to [`ROWS`](super::ROWS) activation rows by `maddubs`
//! (u8 × i8 pairs summed to i16, no saturation since codes are ≤ 63 or, for Q8_0, the sign is
//! moved onto the activations). Offsets (Q4_0's −8, Q6_K's −32 …) and minimums are applied
//! through the activation block sums, so no weight is ever widened past 8 bits.

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
    match xs.len() {
        1 => each_row::<1>(ty, w, row_bytes, xs, out),
        2 => each_row::<2>(ty, w, row_bytes, xs, out),
        3 => each_row::<3>(ty, w, row_bytes, xs, out),
        _ => each_row::<4>(ty, w, row_bytes, xs, out),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn each_row<const R: usize>(ty: QuantType, w: &[u8], row_bytes: usize, xs: &[&[BlockQ8]], out: &mut [f32]) {
    let x: [*const BlockQ8; R] = std::array::from_fn(|i| xs[i].as_ptr());
    let n = w.len() / row_bytes;
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let dots = rows::<R>(ty, row, x);
        for (i, d) in dots.into_iter().enumerate() {
            *out.get_unchecked_mut(i * n + j) = d;
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const R: usize>(ty: QuantType, w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    match ty {
        QuantType::Q4_0 => legacy::<R, Q4_0>(w, x),
        QuantType::Q4_1 => legacy::<R, Q4_1>(w, x),
        QuantType::Q5_0 => legacy::<R, Q5_0>(w, x),
        QuantType::Q5_1 => legacy::<R, Q5_1>(w, x),
        QuantType::Q8_0 => q8_0::<R>(w, x),
        QuantType::Q2K => q2_k::<R>(w, x),
        QuantType::Q3K => q3_k::<R>(w, x),
        QuantType::Q4K => q45_k::<R, false>(w, x),
        QuantType::Q5K => q45_k::<R, true>(w, x),
        QuantType::Q6K => q6_k::<R>(w, x),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp16(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish<const R: usize>(acc: [__m256; R], off: [f32; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]) + off[r];
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_x(b: *const BlockQ8) -> __m256i {
    load((*b).qs.as_ptr().cast())
}

/// 16 bytes of nibble pairs → 32 codes: low nibbles (elements 0–15), then high (16–31).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p.cast());
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F))
}

/// Bit i of `bits` → byte i = 0x10 (Q5's fifth bit).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Σ u·x over 32 bytes, as 8 i32 partial sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn idot(u: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
}

/// Two i16 scales, one per 16-element half (the k-quants' sub-blocks of 16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn halves(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// `(v >> n) & 3` per byte, n < 8 (16-bit shifts: bits pulled in from the next byte are masked).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn two_bits(v: __m256i, n: i32) -> __m256i {
    _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(n)), _mm256_set1_epi8(3))
}

/// Q4_0, Q4_1, Q5_0, Q5_1: 32 codes, one scale, an offset (−8d, −16d) or a stored minimum.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy<const R: usize, const T: u8>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let size = match T {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 24,
    };
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [0f32; R];
    for b in 0..w.len() / size {
        let p = w.as_ptr().add(b * size);
        let d = fp16(p);
        let (u, min) = match T {
            Q4_0 => (nibbles(p.add(2)), -8.0 * d),
            Q4_1 => (nibbles(p.add(4)), fp16(p.add(2))),
            Q5_0 => {
                (_mm256_or_si256(nibbles(p.add(6)), fifth_bits(p.add(2).cast::<u32>().read_unaligned())), -16.0 * d)
            }
            _ => (
                _mm256_or_si256(nibbles(p.add(8)), fifth_bits(p.add(4).cast::<u32>().read_unaligned())),
                fp16(p.add(2)),
            ),
        };
        for r in 0..R {
            let xb = x[r].add(b);
            let dot = _mm256_cvtepi32_ps(idot(u, load_x(xb)));
            acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * (*xb).d), acc[r]);
            off[r] += min * (*xb).s;
        }
    }
    finish(acc, off)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const R: usize>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..w.len() / 34 {
        let p = w.as_ptr().add(b * 34);
        let d = fp16(p);
        let q = load(p.add(2));
        // |w| as unsigned codes, w's sign moved onto x (activations never hold −128).
        let u = _mm256_sign_epi8(q, q);
        for r in 0..R {
            let xb = x[r].add(b);
            let dot = _mm256_cvtepi32_ps(idot(u, _mm256_sign_epi8(load_x(xb), q)));
            acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * (*xb).d), acc[r]);
        }
    }
    finish(acc, [0.0; R])
}

/// Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales and minimums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q45_k<const R: usize, const FIVE: bool>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
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
                    let dot = _mm256_cvtepi32_ps(idot(u, load_x(xb)));
                    acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dc * (*xb).d), acc[r]);
                    off[r] -= mc * (*xb).s;
                }
            }
        }
    }
    finish(acc, off)
}

/// Q6_K: 6-bit codes (low nibbles + 2 high bits) − 32, an i8 scale per 16.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k<const R: usize>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_k<const R: usize>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k<const R: usize>(w: &[u8], x: [*const BlockQ8; R]) -> [f32; R] {
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
