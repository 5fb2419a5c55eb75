// pare's fused kernels. Every kernel here has a CPU reference in src/cpu.rs and a test comparing
// the two (tests/gpu.rs). Arithmetic is in f32; values are rounded to the storage type where HF
// transformers rounds them, so bf16 results track HF's bf16 path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<bf16>(bf16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<f16>(f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half(x); }

// Round through T and back: the value HF would hold after an op whose output is T.
template <typename T> __device__ __forceinline__ float round_t(float x) { return to_f<T>(from_f<T>(x)); }

// Eight consecutive elements as floats, in one 16-byte load (two for f32).
template <typename T> __device__ __forceinline__ void load8(const T* p, float out[8]);
template <> __device__ __forceinline__ void load8<float>(const float* p, float out[8]) {
    float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w; out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
template <> __device__ __forceinline__ void load8<bf16>(const bf16* p, float out[8]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) { float2 f = __bfloat1622float2(h[i]); out[2 * i] = f.x; out[2 * i + 1] = f.y; }
}
template <> __device__ __forceinline__ void load8<f16>(const f16* p, float out[8]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) { float2 f = __half22float2(h[i]); out[2 * i] = f.x; out[2 * i + 1] = f.y; }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum over the block; every thread gets the result. blockDim.x is a multiple of 32, at most 1024.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < (blockDim.x >> 5) ? partial[lane] : 0.f;
        w = warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, HF's LlamaRMSNorm: y = w * T(x * rsqrt(mean(x²) + eps)), statistics in f32.
// With `res`, the residual add comes first: h = T(x + res) is written to `sum` and normalized,
// so a decoder layer's "add, then norm" is one pass. One block per row.
template <typename T>
__device__ void rms_norm_impl(const T* x, const T* res, const T* w, T* sum, T* out, int dim, float eps) {
    size_t row = blockIdx.x;
    x += row * dim;
    out += row * dim;
    if (res) { res += row * dim; sum += row * dim; }
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_f(x[i]);
        if (res) {
            v = round_t<T>(v + to_f(res[i]));
            sum[i] = from_f<T>(v);
        }
        ss += v * v;
    }
    float r = rsqrtf(block_sum(ss) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        // Re-read rather than keep per-thread copies: rows are up to 16k wide and sit in L1/L2.
        float v = res ? to_f(sum[i]) : to_f(x[i]);
        out[i] = from_f<T>(to_f(w[i]) * round_t<T>(v * r));
    }
}

#define RMS_NORM(T, NAME)                                                                                   \
    extern "C" __global__ void rms_norm_##NAME(const T* x, const T* w, T* out, int dim, float eps) {        \
        rms_norm_impl<T>(x, nullptr, w, nullptr, out, dim, eps);                                          \
    }                                                                                                     \
    extern "C" __global__ void add_rms_norm_##NAME(const T* x, const T* res, const T* w, T* sum, T* out,    \
                                                   int dim, float eps) {                                  \
        rms_norm_impl<T>(x, res, w, sum, out, dim, eps);                                                  \
    }
RMS_NORM(float, f32)
RMS_NORM(bf16, bf16)
RMS_NORM(f16, f16)

// ---------------------------------------------------------------------------------------------
// SwiGLU: out = T(T(silu(gate)) * up), as HF's act_fn(gate_proj(x)) * up_proj(x) in T.
template <typename T> __device__ void swiglu_impl(const T* gate, const T* up, T* out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = to_f(gate[i]);
        float act = round_t<T>(g / (1.f + __expf(-g)));
        out[i] = from_f<T>(act * to_f(up[i]));
    }
}
#define SWIGLU(T, NAME)                                                                                   \
    extern "C" __global__ void swiglu_##NAME(const T* gate, const T* up, T* out, size_t n) {              \
        swiglu_impl<T>(gate, up, out, n);                                                                 \
    }
SWIGLU(float, f32)
SWIGLU(bf16, bf16)
SWIGLU(f16, f16)

// ---------------------------------------------------------------------------------------------
// RoPE fused with the head split: x is (tokens, heads·d) rows `in_stride` apart (a projection's
// output, or a slice of a fused one), cos/sin are (tokens, rot/2); out is (batch, heads, seq, d)
// with tokens = batch·seq. HF's rotate_half on the first `rot` channels, the rest passed through.
// One block per (token, head), d/2 threads: thread t owns a rotated pair or two passed channels.
template <typename T>
__device__ void rope_impl(const T* x, const T* cos, const T* sin, T* out, int seq, int heads, int d, int rot,
                          long long in_stride) {
    int token = blockIdx.x, head = blockIdx.y, t = threadIdx.x;
    int half = rot / 2;
    const T* src = x + token * in_stride + (long long)head * d;
    int b = token / seq, s = token % seq;
    T* dst = out + (((long long)b * heads + head) * seq + s) * d;
    if (t < half) {
        float c = to_f(cos[(long long)token * half + t]), sn = to_f(sin[(long long)token * half + t]);
        float x1 = to_f(src[t]), x2 = to_f(src[t + half]);
        dst[t] = from_f<T>(x1 * c - x2 * sn);
        dst[t + half] = from_f<T>(x2 * c + x1 * sn);
    } else if (t < d / 2) {
        int i = rot + 2 * (t - half);
        dst[i] = src[i];
        dst[i + 1] = src[i + 1];
    }
}
#define ROPE(T, NAME)                                                                                      \
    extern "C" __global__ void rope_##NAME(const T* x, const T* cos, const T* sin, T* out, int seq, int heads, \
                                           int d, int rot, long long in_stride) {                             \
        rope_impl<T>(x, cos, sin, out, seq, heads, d, rot, in_stride);                                        \
    }
ROPE(float, f32)
ROPE(bf16, bf16)
ROPE(f16, f16)

// ---------------------------------------------------------------------------------------------
// Decode attention (one query per row) over per-(row, KV head) caches of any lengths: the ragged
// caches presses leave behind, or the used part of a uniform buffer. Flash-decoding: the entries
// of a (row, KV head) are split across blocks so a long cache fills the GPU; each block keeps an
// online softmax and writes a partial result that attn_decode_combine merges (or, with one split,
// the output itself). The query heads sharing a KV head are handled together, so each key and
// value is read from memory once.
//
// Where the caches are comes as a table passed by value (no upload per call): for each (row, KV
// head) of this launch, key and value pointers, the entry count, and how many leading entries to
// skip (left padding, entries outside a sliding window). 256 entries (6 KiB of parameters, within
// the 32 KiB CUDA 12.1+ allows) cover 32 rows × 8 KV heads in one launch: split over 64-entry
// launches, a batch of 32 ran 4 launches of 1.5 blocks per SM each, 29 µs apiece (H100, ncu).
#define MAX_TABLE 256
struct HeadTable {
    unsigned long long k[MAX_TABLE];
    unsigned long long v[MAX_TABLE];
    int len[MAX_TABLE];
    int skip[MAX_TABLE];
};

#define NWARPS 4

// GMAX: query heads per KV head, a compile-time constant so the per-head arrays stay in registers.
template <typename T, int D, int GMAX>
__device__ void attn_decode_impl(const HeadTable& table, int first, const T* q, T* out, float* part_acc,
                                 float* part_ml, int heads, int kv_heads, int splits, int chunk, float scale) {
    constexpr int LPE = D / 8;          // lanes per entry, 8 channels each
    constexpr int EPW = 32 / LPE;       // entries a warp reads at once
    const int slot = blockIdx.y, split = blockIdx.x;
    const int gi = first + slot;        // (row, KV head) index over the whole batch
    const int row = gi / kv_heads, kvh = gi % kv_heads;
    constexpr int group = GMAX;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / LPE, c0 = (lane % LPE) * 8;

    const T* K = reinterpret_cast<const T*>(table.k[slot]);
    const T* V = reinterpret_cast<const T*>(table.v[slot]);
    const int len = table.len[slot];
    const int begin = table.skip[slot] + split * chunk;
    const int end = min(len, begin + chunk);

    float qv[GMAX][8], acc[GMAX][8], m[GMAX], l[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
        load8<T>(q + ((size_t)row * heads + kvh * group + g) * D + c0, qv[g]);
#pragma unroll
        for (int i = 0; i < 8; i++) qv[g][i] *= scale;
    }

    // Warp-uniform loop bounds: the shuffles below need every lane.
    for (int base = begin + warp * EPW; base < end; base += NWARPS * EPW) {
        const int e = base + sub;
        const bool valid = e < end;
        float kf[8], vf[8];
        if (valid) {
            load8<T>(K + (size_t)e * D + c0, kf);
            load8<T>(V + (size_t)e * D + c0, vf);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) kf[i] = vf[i] = 0.f;
        }
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < 8; i++) s += qv[g][i] * kf[i];
#pragma unroll
            for (int o = LPE / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            if (valid) {
                float m_new = fmaxf(m[g], s);
                float a = __expf(m[g] - m_new), p = __expf(s - m_new);
                l[g] = l[g] * a + p;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * a + p * vf[i];
                m[g] = m_new;
            }
        }
    }

    // Merge the lanes of a warp that hold the same channels (different entries), then the warps.
    __shared__ float sm_m[NWARPS][GMAX], sm_l[NWARPS][GMAX];
    __shared__ float sm_acc[NWARPS][GMAX][D];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
#pragma unroll
        for (int o = LPE; o < 32; o <<= 1) {
            float m2 = __shfl_xor_sync(0xffffffff, m[g], o), l2 = __shfl_xor_sync(0xffffffff, l[g], o);
            float mn = fmaxf(m[g], m2);
            float a1 = mn == -INFINITY ? 0.f : __expf(m[g] - mn), a2 = mn == -INFINITY ? 0.f : __expf(m2 - mn);
            l[g] = l[g] * a1 + l2 * a2;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float x2 = __shfl_xor_sync(0xffffffff, acc[g][i], o);
                acc[g][i] = acc[g][i] * a1 + x2 * a2;
            }
            m[g] = mn;
        }
        if (sub == 0) {
#pragma unroll
            for (int i = 0; i < 8; i++) sm_acc[warp][g][c0 + i] = acc[g][i];
            if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
        }
    }
    __syncthreads();

    // Thread t of the block finishes channel t % D of heads t / D, t / D + (block / D), ...
    for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
        int g = idx / D, c = idx % D;
        float mx = -INFINITY;
        for (int w = 0; w < NWARPS; w++) mx = fmaxf(mx, sm_m[w][g]);
        float L = 0.f, A = 0.f;
        for (int w = 0; w < NWARPS; w++) {
            float a = mx == -INFINITY ? 0.f : __expf(sm_m[w][g] - mx);
            L += sm_l[w][g] * a;
            A += sm_acc[w][g][c] * a;
        }
        size_t qh = (size_t)row * heads + kvh * group + g;
        if (splits == 1) {
            out[qh * D + c] = from_f<T>(L > 0.f ? A / L : 0.f);
        } else {
            part_acc[(qh * splits + split) * D + c] = A;
            if (c == 0) { part_ml[(qh * splits + split) * 2] = mx; part_ml[(qh * splits + split) * 2 + 1] = L; }
        }
    }
}

// Merge the splits: one block per query head, D threads.
template <typename T>
__device__ void attn_decode_combine_impl(const float* part_acc, const float* part_ml, T* out, int splits, int d) {
    size_t qh = blockIdx.x;
    int c = threadIdx.x;
    const float* ml = part_ml + qh * splits * 2;
    float mx = -INFINITY;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, ml[2 * s]);
    float L = 0.f, A = 0.f;
    for (int s = 0; s < splits; s++) {
        float a = mx == -INFINITY ? 0.f : __expf(ml[2 * s] - mx);
        L += ml[2 * s + 1] * a;
        A += part_acc[(qh * splits + s) * d + c] * a;
    }
    out[qh * d + c] = from_f<T>(L > 0.f ? A / L : 0.f);
}

#define ATTN_DECODE(T, NAME, D, G)                                                                        \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) attn_decode_##NAME##_d##D##_g##G(          \
        const __grid_constant__ HeadTable table, int first, const T* q, T* out, float* part_acc,         \
        float* part_ml, int heads, int kv_heads, int splits, int chunk, float scale) {                   \
        attn_decode_impl<T, D, G>(table, first, q, out, part_acc, part_ml, heads, kv_heads, splits, chunk, scale); \
    }
#define ATTN_DECODE_G(T, NAME, D)                                                                          \
    ATTN_DECODE(T, NAME, D, 1) ATTN_DECODE(T, NAME, D, 2) ATTN_DECODE(T, NAME, D, 3) ATTN_DECODE(T, NAME, D, 4) \
    ATTN_DECODE(T, NAME, D, 5) ATTN_DECODE(T, NAME, D, 6) ATTN_DECODE(T, NAME, D, 7) ATTN_DECODE(T, NAME, D, 8)
ATTN_DECODE_G(float, f32, 64)
ATTN_DECODE_G(float, f32, 128)
ATTN_DECODE_G(bf16, bf16, 64)
ATTN_DECODE_G(bf16, bf16, 128)
ATTN_DECODE_G(f16, f16, 64)
ATTN_DECODE_G(f16, f16, 128)

#define ATTN_COMBINE(T, NAME)                                                                             \
    extern "C" __global__ void attn_decode_combine_##NAME(const float* part_acc, const float* part_ml, T* out, \
                                                          int splits, int d) {                           \
        attn_decode_combine_impl<T>(part_acc, part_ml, out, splits, d);                                   \
    }
ATTN_COMBINE(float, f32)
ATTN_COMBINE(bf16, bf16)
ATTN_COMBINE(f16, f16)

// ---------------------------------------------------------------------------------------------
// Flash-style prefill attention: softmax(q·kᵀ·scale + mask)·v without materializing the scores,
// on the tensor cores (mma.sync m16n8k16, f32 accumulation). Masking is by position, as pare's
// cache keeps it: entry e is visible to query q when pos(e) ≥ 0 (not padding), pos(e) ≤ pos(q),
// and, with a sliding window w > 0, pos(q) − pos(e) < w. Key tiles no query of the block can see
// are skipped (the upper half of a causal prefill). A query that sees nothing gets zeros.
//
// q, out: (batch, heads, sq, D) contiguous. Keys and values: entry e of (row, KV head) at
// base + row·row_stride + head·head_stride + e·D (a view of the cache's buffers). qpos: (batch, sq),
// epos: (batch, n) int32. One block of 4 warps per 64 queries of one head; each warp owns 16 rows.
#define FA_BM 64
#define FA_BN 64

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<bf16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<f16>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T> __device__ __forceinline__ uint32_t pack2_raw(T lo, T hi) {
    return (uint32_t)(*reinterpret_cast<uint16_t*>(&lo)) | ((uint32_t)(*reinterpret_cast<uint16_t*>(&hi)) << 16);
}

template <typename T> __device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<bf16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ bool fa_visible(int e, int q, int window) {
    return e >= 0 && e <= q && (window <= 0 || q - e < window);
}

template <typename T, int D>
__device__ void flash_prefill_impl(const T* q, const T* k, const T* v, long long k_row_stride, long long k_head_stride,
                                   long long v_row_stride, long long v_head_stride, const int* qpos, const int* epos,
                                   T* out, int heads, int kv_heads, int sq, int n, int window, float scale_log2) {
    constexpr int SROW = D + 8;  // padded smem rows: the 8 lanes reading one column hit 8 banks
    __shared__ __align__(16) T sK[FA_BN * SROW];
    __shared__ __align__(16) T sV[FA_BN * SROW];
    __shared__ int sPos[FA_BN];
    __shared__ int sQmin[4], sQmax[4];

    const int row = blockIdx.z, head = blockIdx.y, q0 = blockIdx.x * FA_BM;
    const int kvh = head / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this lane's two query rows

    const T* Q = q + ((size_t)row * heads + head) * sq * D;
    const T* K = k + row * k_row_stride + kvh * k_head_stride;
    const T* V = v + row * v_row_stride + kvh * v_head_stride;
    const int* EP = epos + (size_t)row * n;
    // Key tiles start at the row's first real entry, past its left padding: its tiles then hold
    // the keys they hold when the prompt runs alone, so a batch row sums in the same order and
    // equals the prompt run alone, bit for bit.
    __shared__ int sStart;
    if (threadIdx.x == 0) sStart = n;
    __syncthreads();
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        if (EP[e] >= 0) {
            atomicMin(&sStart, e);
            break;
        }
    }
    __syncthreads();
    const int start = sStart;
    // Rows past the end see nothing (position -2 is below every entry's).
    const int qp0 = r0 < sq ? qpos[(size_t)row * sq + r0] : -2;
    const int qp1 = r1 < sq ? qpos[(size_t)row * sq + r1] : -2;

    // The block's query position range, to skip key tiles none of its queries can see.
    {
        int lo = min(qp0 < -1 ? INT_MAX : qp0, qp1 < -1 ? INT_MAX : qp1), hi = max(qp0, qp1);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lo = min(lo, __shfl_xor_sync(0xffffffff, lo, o));
            hi = max(hi, __shfl_xor_sync(0xffffffff, hi, o));
        }
        if (lane == 0) { sQmin[warp] = lo; sQmax[warp] = hi; }
        __syncthreads();
    }
    const int qmin = min(min(sQmin[0], sQmin[1]), min(sQmin[2], sQmin[3]));
    const int qmax = max(max(sQmax[0], sQmax[1]), max(sQmax[2], sQmax[3]));

    // This warp's 16 query rows as mma A fragments, for every 16-channel slice.
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kc = 0; kc < D / 16; kc++) {
        const int c = kc * 16 + 2 * t;
        qa[kc][0] = r0 < sq ? *reinterpret_cast<const uint32_t*>(Q + (size_t)r0 * D + c) : 0u;
        qa[kc][1] = r1 < sq ? *reinterpret_cast<const uint32_t*>(Q + (size_t)r1 * D + c) : 0u;
        qa[kc][2] = r0 < sq ? *reinterpret_cast<const uint32_t*>(Q + (size_t)r0 * D + c + 8) : 0u;
        qa[kc][3] = r1 < sq ? *reinterpret_cast<const uint32_t*>(Q + (size_t)r1 * D + c + 8) : 0u;
    }

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    for (int n0 = start; n0 < n; n0 += FA_BN) {
        bool useful = false;
        if (threadIdx.x < FA_BN) {
            int e = n0 + threadIdx.x;
            int p = e < n ? EP[e] : -1;
            sPos[threadIdx.x] = p;
            useful = p >= 0 && p <= qmax && (window <= 0 || p > qmin - window);
        }
        if (!__syncthreads_or(useful)) continue;

        // Key and value tiles into shared memory, 16 bytes per thread and step; rows past n are zero.
        for (int i = threadIdx.x; i < FA_BN * D / 8; i += blockDim.x) {
            int r = i / (D / 8), c = (i % (D / 8)) * 8;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (n0 + r < n) {
                kv4 = *reinterpret_cast<const uint4*>(K + (size_t)(n0 + r) * D + c);
                vv4 = *reinterpret_cast<const uint4*>(V + (size_t)(n0 + r) * D + c);
            }
            *reinterpret_cast<uint4*>(sK + r * SROW + c) = kv4;
            *reinterpret_cast<uint4*>(sV + r * SROW + c) = vv4;
        }
        __syncthreads();

        // S = Q·Kᵀ for 16 rows × 64 keys: 8 tiles of 8 keys.
        float s[FA_BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            const T* krow = sK + (nt * 8 + g) * SROW + 2 * t;
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) {
                uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kc * 16);
                uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kc * 16 + 8);
                mma16816<T>(s[nt], qa[kc], b0, b1);
            }
        }

        // Mask, then the online softmax (base 2, scale folded in). Each row's 64 scores sit in
        // the 4 lanes sharing g.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int ep = sPos[nt * 8 + 2 * t + j];
                s[nt][j] = fa_visible(ep, qp0, window) ? s[nt][j] * scale_log2 : -INFINITY;
                s[nt][2 + j] = fa_visible(ep, qp1, window) ? s[nt][2 + j] * scale_log2 : -INFINITY;
                mx0 = fmaxf(mx0, s[nt][j]);
                mx1 = fmaxf(mx1, s[nt][2 + j]);
            }
        }
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, o));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, o));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // Nothing visible yet in a row: keep its state (all its p are zero below).
        const float a0 = mn0 == -INFINITY ? 1.f : exp2f(m0 - mn0), a1 = mn1 == -INFINITY ? 1.f : exp2f(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                s[nt][j] = s[nt][j] == -INFINITY ? 0.f : exp2f(s[nt][j] - mn0);
                s[nt][2 + j] = s[nt][2 + j] == -INFINITY ? 0.f : exp2f(s[nt][2 + j] - mn1);
                ps0 += s[nt][j];
                ps1 += s[nt][2 + j];
            }
        }
        // Per-lane partial sums; the 4 lanes of a row are added at the end.
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            acc[dt][0] *= a0; acc[dt][1] *= a0;
            acc[dt][2] *= a1; acc[dt][3] *= a1;
        }

        // O += P·V: the score accumulators are, in place, the A fragments of P.
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; kk++) {
            uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const T* v0 = sV + (kk * 16 + 2 * t) * SROW + g;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                const T* vp = v0 + dt * 8;
                uint32_t b0 = pack2_raw<T>(vp[0], vp[SROW]);
                uint32_t b1 = pack2_raw<T>(vp[8 * SROW], vp[9 * SROW]);
                mma16816<T>(acc[dt], pa, b0, b1);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        l0 += __shfl_xor_sync(0xffffffff, l0, o);
        l1 += __shfl_xor_sync(0xffffffff, l1, o);
    }
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* O = out + ((size_t)row * heads + head) * sq * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        const int c = dt * 8 + 2 * t;
        if (r0 < sq) *reinterpret_cast<uint32_t*>(O + (size_t)r0 * D + c) = pack2<T>(acc[dt][0] * inv0, acc[dt][1] * inv0);
        if (r1 < sq) *reinterpret_cast<uint32_t*>(O + (size_t)r1 * D + c) = pack2<T>(acc[dt][2] * inv1, acc[dt][3] * inv1);
    }
}

#define FLASH_PREFILL(T, NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(128) flash_prefill_##NAME##_d##D(                        \
        const T* q, const T* k, const T* v, long long k_row_stride, long long k_head_stride,             \
        long long v_row_stride, long long v_head_stride, const int* qpos, const int* epos, T* out,       \
        int heads, int kv_heads, int sq, int n, int window, float scale_log2) {                          \
        flash_prefill_impl<T, D>(q, k, v, k_row_stride, k_head_stride, v_row_stride, v_head_stride, qpos, \
                                 epos, out, heads, kv_heads, sq, n, window, scale_log2);                  \
    }
FLASH_PREFILL(bf16, bf16, 64)
FLASH_PREFILL(bf16, bf16, 128)
FLASH_PREFILL(f16, f16, 64)
FLASH_PREFILL(f16, f16, 128)

// ---------------------------------------------------------------------------------------------
// Skinny matrix products for decode: y (B, N) = x (B, K) · Wᵀ with W (N, K) row-major and B ≤ 8.
// Decode reads every weight once per step, so this is a pass over W at memory speed: 16-byte
// streaming loads of W (kept out of L1, where the rows of x stay), U in flight per lane, f32
// accumulation. `wpr` warps share a row when there are too few rows to fill the GPU (k/v
// projections); each takes a slice of K and the block adds the slices up.
template <int B, typename T, int U>
__device__ void gemv_impl(const T* x, long long x_stride, const T* w, T* y, int N, int K, int wpr) {
    __shared__ float partial[8][B];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rows_per_block = 8 / wpr;
    const int n = blockIdx.x * rows_per_block + warp / wpr;
    const int part = warp % wpr;
    const int kv = K / 8;
    const int per = (kv + wpr - 1) / wpr;
    const int c_begin = part * per, c_end = min(kv, c_begin + per);
    float acc[B];
#pragma unroll
    for (int b = 0; b < B; b++) acc[b] = 0.f;
    if (n < N) {
        const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)n * K);
        for (int c = c_begin + lane; c < c_end; c += 32 * U) {
            uint4 wv[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int cc = c + u * 32;
                wv[u] = cc < c_end ? __ldcs(wr + cc) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int cc = c + u * 32;
                if (cc >= c_end) break;
                float wf[8];
                load8<T>(reinterpret_cast<const T*>(&wv[u]), wf);
#pragma unroll
                for (int b = 0; b < B; b++) {
                    float xf[8];
                    load8<T>(x + b * x_stride + (size_t)cc * 8, xf);
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[b] += wf[i] * xf[i];
                }
            }
        }
    }
#pragma unroll
    for (int b = 0; b < B; b++) acc[b] = warp_sum(acc[b]);
    if (wpr > 1) {
        if (lane == 0) {
#pragma unroll
            for (int b = 0; b < B; b++) partial[warp][b] = acc[b];
        }
        __syncthreads();
        if (part != 0) return;
#pragma unroll
        for (int b = 0; b < B; b++) {
            acc[b] = 0.f;
            for (int p = 0; p < wpr; p++) acc[b] += partial[warp + p][b];
        }
    }
    if (n < N && lane < B) {
        // Lane b writes row b (a compile-time index into acc via the unrolled select).
        float v = 0.f;
#pragma unroll
        for (int b = 0; b < B; b++) if (lane == b) v = acc[b];
        y[(size_t)lane * N + n] = from_f<T>(v);
    }
}

#define GEMV(T, NAME, B, U, SFX)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gemv_##NAME##_b##B##SFX(const T* x, long long x_stride, \
                                                                              const T* w, T* y, int N, int K, \
                                                                              int wpr) {                      \
        gemv_impl<B, T, U>(x, x_stride, w, y, N, K, wpr);                                                      \
    }
// U = 4 loads in flight per lane (the H100's tuning) and U = 8 (`_u8`, for cards with more bandwidth).
#define GEMV_U(T, NAME, B) GEMV(T, NAME, B, 4, ) GEMV(T, NAME, B, 8, _u8)
#define GEMV_B(T, NAME) GEMV_U(T, NAME, 1) GEMV_U(T, NAME, 2) GEMV_U(T, NAME, 3) GEMV_U(T, NAME, 4) \
                        GEMV_U(T, NAME, 5) GEMV_U(T, NAME, 6) GEMV_U(T, NAME, 7) GEMV_U(T, NAME, 8)
GEMV_B(bf16, bf16)
GEMV_B(f16, f16)

// ---------------------------------------------------------------------------------------------
// Small-M matrix products for batched decode: y (M, N) = x (M, K) · Wᵀ, M ≤ 32, on the tensor
// cores (mma.sync m16n8k16, f32 accumulation). A step of M sequences still reads W once, so the
// kernel is a W stream like the GEMV; the products are nearly free. W rows are the mma's A side
// (16 rows per tile), the rows of x its B side (8 per tile, NT tiles), so no operand is transposed.
//
// The order of k inside one dot product is free as long as W and x use the same one. Each lane
// loads 16 bytes (8 consecutive k) of its W rows g and g+8 and the same 8 k of its x row g; the
// first 4 go to one mma k-step and the last 4 to the next, in the slots the fragment layout gives
// k = 2t, 2t+1, 2t+8, 2t+9. So the loads are whole 16-byte vectors straight from global memory
// (4 lanes read 64 contiguous bytes of a row) with no shared-memory staging or shuffles.
//
// Block: S warps over the same 16·MT rows, each a slice of K (S is what fills the GPU: N/16 tiles
// alone are too few), then an ordered sum of the slices through shared memory, so results do not
// depend on timing. U 16-byte W loads per row and lane are issued before the first use.
template <typename T, int NT, int MT, int U>
__device__ void gemm_small_impl(const T* x, long long x_stride, const T* w, T* y, int M, int N, int K) {
    extern __shared__ float red[];  // [S][MT*16][NT*8]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, S = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * (16 * MT);
    const int KB = (K + 31) / 32;                  // k blocks of 32: 4 lanes × 8
    const int per = (KB + S - 1) / S;
    const int kb_begin = warp * per, kb_end = min(KB, kb_begin + per);

    const T* wrow[MT][2];
    bool wok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = n0 + mt * 16 + h * 8 + g;
            wok[mt][h] = r < N;
            wrow[mt][h] = w + (size_t)(wok[mt][h] ? r : 0) * K;
        }
    const T* xrow[NT];
    bool xok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        int m = nt * 8 + g;
        xok[nt] = m < M;
        xrow[nt] = x + (xok[nt] ? m : 0) * x_stride;
    }

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;

    for (int kb = kb_begin; kb < kb_end; kb += U) {
        uint4 wv[U][MT][2];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = (kb + u) * 32 + 8 * t;
            const bool in = kb + u < kb_end && k < K;
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++)
                    wv[u][mt][h] = in && wok[mt][h] ? __ldcs(reinterpret_cast<const uint4*>(wrow[mt][h] + k))
                                                    : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = (kb + u) * 32 + 8 * t;
            const bool in = kb + u < kb_end && k < K;
            uint4 xv[NT];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                xv[nt] = in && xok[nt] ? *reinterpret_cast<const uint4*>(xrow[nt] + k) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const uint32_t a_lo[4] = {wv[u][mt][0].x, wv[u][mt][1].x, wv[u][mt][0].y, wv[u][mt][1].y};
                const uint32_t a_hi[4] = {wv[u][mt][0].z, wv[u][mt][1].z, wv[u][mt][0].w, wv[u][mt][1].w};
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    mma16816<T>(acc[mt][nt], a_lo, xv[nt].x, xv[nt].y);
                    mma16816<T>(acc[mt][nt], a_hi, xv[nt].z, xv[nt].w);
                }
            }
        }
    }

    // acc[mt][nt]: c0, c1 = (W row g, x rows 2t, 2t+1), c2, c3 = (W row g+8, same x rows).
    constexpr int R = MT * 16, C = NT * 8;
    float* mine = red + warp * R * C;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int r = mt * 16 + g, c = nt * 8 + 2 * t;
            mine[r * C + c] = acc[mt][nt][0];
            mine[r * C + c + 1] = acc[mt][nt][1];
            mine[(r + 8) * C + c] = acc[mt][nt][2];
            mine[(r + 8) * C + c + 1] = acc[mt][nt][3];
        }
    __syncthreads();
    // Thread i sums element i over the warps in order; consecutive threads take consecutive W rows
    // of one x row, so the stores to y are contiguous.
    for (int i = threadIdx.x; i < R * C; i += blockDim.x) {
        const int c = i / R, r = i % R;
        const int n = n0 + r;
        if (c >= M || n >= N) continue;
        float s = 0.f;
        for (int v = 0; v < S; v++) s += red[v * R * C + r * C + c];
        y[(size_t)c * N + n] = from_f<T>(s);
    }
}

#define GEMM_SMALL(T, NAME, NT, MT, U)                                                                    \
    extern "C" __global__ void __launch_bounds__(512) gemm_small_##NAME##_n##NT##_m##MT##_u##U(           \
        const T* x, long long x_stride, const T* w, T* y, int M, int N, int K) {                         \
        gemm_small_impl<T, NT, MT, U>(x, x_stride, w, y, M, N, K);                                        \
    }
#define GEMM_SMALL_U(T, NAME, NT, MT) GEMM_SMALL(T, NAME, NT, MT, 2) GEMM_SMALL(T, NAME, NT, MT, 4) \
                                      GEMM_SMALL(T, NAME, NT, MT, 8)
#define GEMM_SMALL_M(T, NAME, NT) GEMM_SMALL_U(T, NAME, NT, 1) GEMM_SMALL_U(T, NAME, NT, 2)
#define GEMM_SMALL_ALL(T, NAME) GEMM_SMALL_M(T, NAME, 1) GEMM_SMALL_M(T, NAME, 2) GEMM_SMALL_M(T, NAME, 3) \
                                GEMM_SMALL_M(T, NAME, 4)
GEMM_SMALL_ALL(bf16, bf16)
GEMM_SMALL_ALL(f16, f16)

// ---------------------------------------------------------------------------------------------
// Sampling candidates. Per row of logits (V values): every token whose score s = l / T is at least
// the k-th largest score (ties kept, as HF's top-k), written unordered (raw logit, token id), their
// count (which may exceed `cap`: the caller then falls back to the whole row), and the row's
// log-sum-exp of the raw logits for log-probs. The k-th largest is found by an MSB-first radix
// select over order-preserving 32-bit keys: four histogram passes, no sort. One block per row.
__device__ __forceinline__ unsigned order_key(float s) {
    s += 0.f;  // -0 → +0: the two compare equal, so they must share a key
    unsigned u = __float_as_uint(s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__device__ void top_candidates_impl(const T* logits, int vocab, int k, float temperature, int cap, float* out_logit,
                                    unsigned* out_id, unsigned* out_count, double* out_lse) {
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_remaining, s_count;
    __shared__ float s_max[32];
    __shared__ double s_sum[32];
    const size_t row = blockIdx.x;
    logits += row * vocab;
    out_logit += row * cap;
    out_id += row * cap;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;

    // log-sum-exp of the raw logits, accumulated in f64.
    float mx = -INFINITY;
    for (int i = tid; i < vocab; i += blockDim.x) mx = fmaxf(mx, to_f(logits[i]));
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    if (lane == 0) s_max[warp] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (int w = 0; w < warps; w++) mx = fmaxf(mx, s_max[w]);
    double se = 0.0;
    if (mx > -INFINITY)
        for (int i = tid; i < vocab; i += blockDim.x) se += exp((double)to_f(logits[i]) - (double)mx);
    for (int o = 16; o > 0; o >>= 1) se += __shfl_xor_sync(0xffffffff, se, o);
    if (lane == 0) s_sum[warp] = se;

    // Radix select of the k-th largest key.
    unsigned prefix = 0, mask = 0, remaining = (unsigned)min(k, vocab);
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += blockDim.x) hist[d] = 0;
        __syncthreads();
        for (int i = tid; i < vocab; i += blockDim.x) {
            unsigned key = order_key(__fdiv_rn(to_f(logits[i]), temperature));
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            unsigned above = 0;
            int d = 255;
            for (; d > 0 && above + hist[d] < remaining; d--) above += hist[d];
            s_prefix = prefix | ((unsigned)d << shift);
            s_remaining = remaining - above;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 255u << shift;
    }

    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int i = tid; i < vocab; i += blockDim.x) {
        float l = to_f(logits[i]);
        if (order_key(__fdiv_rn(l, temperature)) >= prefix) {
            unsigned pos = atomicAdd(&s_count, 1u);
            if (pos < (unsigned)cap) {
                out_logit[pos] = l;
                out_id[pos] = i;
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        double total = 0.0;
        for (int w = 0; w < warps; w++) total += s_sum[w];
        out_count[row] = s_count;
        out_lse[row] = mx > -INFINITY ? (double)mx + log(total) : -INFINITY;
    }
}

#define TOP_CANDIDATES(T, NAME)                                                                            \
    extern "C" __global__ void top_candidates_##NAME(const T* logits, int vocab, int k, float temperature,  \
                                                     int cap, float* out_logit, unsigned* out_id,          \
                                                     unsigned* out_count, double* out_lse) {               \
        top_candidates_impl<T>(logits, vocab, k, temperature, cap, out_logit, out_id, out_count, out_lse); \
    }
TOP_CANDIDATES(float, f32)
TOP_CANDIDATES(bf16, bf16)
TOP_CANDIDATES(f16, f16)

// ---------------------------------------------------------------------------------------------
// New cache entries written in place (crate::write_rows): block e copies `bytes` of keys and of
// values, entry first + e of the sources, to the addresses in the table (passed by value, like
// HeadTable: no upload). One launch appends a decode step's entries to every cache of the step.
#define MAX_ROWS_TABLE 256
struct RowTable {
    unsigned long long k[MAX_ROWS_TABLE];
    unsigned long long v[MAX_ROWS_TABLE];
};

extern "C" __global__ void write_rows(const __grid_constant__ RowTable table, long long first,
                                      const unsigned char* src_k, const unsigned char* src_v, long long bytes) {
    const int e = blockIdx.x;
    const unsigned char* sk = src_k + (first + e) * bytes;
    const unsigned char* sv = src_v + (first + e) * bytes;
    unsigned char* dk = reinterpret_cast<unsigned char*>(table.k[e]);
    unsigned char* dv = reinterpret_cast<unsigned char*>(table.v[e]);
    const unsigned long long align = (unsigned long long)sk | (unsigned long long)sv | (unsigned long long)dk |
                                     (unsigned long long)dv | (unsigned long long)bytes;
    if (align % 16 == 0) {
        for (long long i = threadIdx.x; i < bytes / 16; i += blockDim.x) {
            reinterpret_cast<uint4*>(dk)[i] = reinterpret_cast<const uint4*>(sk)[i];
            reinterpret_cast<uint4*>(dv)[i] = reinterpret_cast<const uint4*>(sv)[i];
        }
    } else {
        for (long long i = threadIdx.x; i < bytes; i += blockDim.x) {
            dk[i] = sk[i];
            dv[i] = sv[i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A press's selection. Per row of scores (n f32): the indices of the k highest scores in increasing
// order — ranked as Rust's f32::total_cmp ranks them, ties to the earlier entry — and the cache
// buffer row of each: entry e = row·n + index is entry e % per_head of head e / per_head, at buffer
// row first + head·stride + e % per_head (a row per KV head, or all heads in one row).
// The k-th largest key by the radix select above, then one ordered pass that keeps every entry
// above it and the first `remaining` entries equal to it. One block per row; no sort.
__device__ __forceinline__ unsigned total_key(float s) {
    unsigned u = __float_as_uint(s);  // no -0 → +0 here: total_cmp orders -0 below +0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void top_k_keep(const float* scores, int n, int k, unsigned first, unsigned stride,
                                      unsigned per_head, unsigned* out_idx, unsigned* out_rows) {
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_remaining;
    __shared__ unsigned s_gt[32], s_eq[32];
    const unsigned row = blockIdx.x;
    scores += (size_t)row * n;
    out_idx += (size_t)row * k;
    out_rows += (size_t)row * k;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;

    unsigned prefix = 0, mask = 0, remaining = (unsigned)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += blockDim.x) hist[d] = 0;
        __syncthreads();
        for (int i = tid; i < n; i += blockDim.x) {
            unsigned key = total_key(scores[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            unsigned above = 0;
            int d = 255;
            for (; d > 0 && above + hist[d] < remaining; d--) above += hist[d];
            s_prefix = prefix | ((unsigned)d << shift);
            s_remaining = remaining - above;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 255u << shift;
    }

    // Entries above the k-th key: k − remaining of them; equal to it: the first `remaining`.
    const unsigned before_lane = (1u << lane) - 1u;
    unsigned kept = 0, eq_seen = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + tid;
        const unsigned key = i < n ? total_key(scores[i]) : 0u;
        const bool gt = i < n && key > prefix, eq = i < n && key == prefix;
        const unsigned bgt = __ballot_sync(0xffffffffu, gt), beq = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) {
            s_gt[warp] = __popc(bgt);
            s_eq[warp] = __popc(beq);
        }
        __syncthreads();
        unsigned gt_before = __popc(bgt & before_lane), eq_before = __popc(beq & before_lane);
        unsigned gt_total = 0, eq_total = 0;
        for (int w = 0; w < warps; w++) {
            if (w < warp) {
                gt_before += s_gt[w];
                eq_before += s_eq[w];
            }
            gt_total += s_gt[w];
            eq_total += s_eq[w];
        }
        const unsigned eq_left = remaining > eq_seen ? remaining - eq_seen : 0u;
        if (gt || (eq && eq_before < eq_left)) {
            const unsigned pos = kept + gt_before + min(eq_before, eq_left);
            out_idx[pos] = (unsigned)i;
            const unsigned e = row * (unsigned)n + (unsigned)i;
            out_rows[pos] = first + e / per_head * stride + e % per_head;
        }
        kept += gt_total + min(eq_total, eq_left);
        eq_seen += eq_total;
        __syncthreads();  // s_gt / s_eq are rewritten by the next chunk
    }
}
