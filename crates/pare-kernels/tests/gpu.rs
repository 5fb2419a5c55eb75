//! Every CUDA kernel against its CPU reference, on fresh random inputs. Built only with the `cuda`
//! feature; CI has no GPU, so scripts/gpu-check.sh runs this test binary on the GPU machine.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use pare_kernels::{cpu, DecodeKv};

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

fn randn(shape: &[usize], std: f32, dtype: DType, dev: &Device) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(dev).unwrap()
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64; NaN anywhere makes it NaN (and every check fail).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let host = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (host(a), host(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Storage rounding allows a flipped last bit here and there; f32 allows reordered sums.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 4e-3,
    }
}

#[test]
fn rms_norm_and_add_rms_norm() {
    let dev = gpu();
    for (dtype, rows, dim) in
        [(DType::BF16, 5, 4096), (DType::F32, 3, 576), (DType::F16, 1, 896), (DType::BF16, 7, 100)]
    {
        let x = randn(&[rows, dim], 3.0, dtype, &dev);
        let r = randn(&[rows, dim], 1.0, dtype, &dev);
        let w = (randn(&[dim], 0.1, dtype, &dev) + 1.0).unwrap();
        let y = pare_kernels::rms_norm(&x, &w, 1e-5).unwrap();
        let (_, y_ref) = cpu::rms_norm(&x, None, &w, 1e-5).unwrap();
        let e = rel_err(&y, &y_ref);
        assert!(e <= tol(dtype), "rms_norm {dtype:?} {rows}×{dim}: {e}");
        let (h, y) = pare_kernels::add_rms_norm(&x, &r, &w, 1e-6).unwrap();
        let (h_ref, y_ref) = cpu::rms_norm(&x, Some(&r), &w, 1e-6).unwrap();
        assert_eq!(rel_err(&h, &h_ref), 0.0, "the residual sum is one rounding, exactly");
        let e = rel_err(&y, &y_ref);
        assert!(e <= tol(dtype), "add_rms_norm {dtype:?}: {e}");
    }
}

#[test]
fn swiglu() {
    let dev = gpu();
    for (dtype, n) in [(DType::BF16, 8 * 14336), (DType::F32, 1001), (DType::F16, 4864)] {
        let g = randn(&[n], 3.0, dtype, &dev);
        let u = randn(&[n], 1.0, dtype, &dev);
        let e = rel_err(&pare_kernels::swiglu(&g, &u).unwrap(), &cpu::swiglu(&g, &u).unwrap());
        assert!(e <= tol(dtype), "swiglu {dtype:?} {n}: {e}");
    }
}

#[test]
fn rope_split_heads() {
    let dev = gpu();
    // (dtype, batch, seq, heads, head_dim, rot, row width): full rotary from a fused projection's
    // slice, partial rotary (GPT-NeoX), a decode step.
    for (dtype, b, s, h, d, rot, width) in [
        (DType::BF16, 2, 7, 4, 128, 128, 1024),
        (DType::F32, 1, 5, 3, 64, 16, 192),
        (DType::BF16, 8, 1, 32, 128, 128, 4096),
    ] {
        let wide = randn(&[b, s, width + 64], 1.0, dtype, &dev);
        let x = wide.narrow(2, 32, width).unwrap();
        let angles = Tensor::rand(0f32, 100.0, (b, s, rot / 2), &Device::Cpu).unwrap();
        let cos = angles.cos().unwrap().to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let sin = angles.sin().unwrap().to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let out = pare_kernels::rope_split_heads(&x, h, d, &cos, &sin).unwrap();
        let e = rel_err(&out, &cpu::rope_split_heads(&x, h, d, &cos, &sin).unwrap());
        assert!(e <= tol(dtype), "rope {dtype:?} b{b} s{s} h{h} d{d} rot{rot}: {e}");
    }
}

/// Per-(row, KV head) caches as views into one (batch, kv_heads, capacity, d) buffer, the shape
/// of an uncompressed cache with spare room.
fn uniform_views(buf: &Tensor, len: usize) -> Vec<Tensor> {
    let (b, kvh, _, _) = buf.dims4().unwrap();
    (0..b * kvh).map(|i| buf.get(i / kvh).unwrap().get(i % kvh).unwrap().narrow(0, 0, len).unwrap()).collect()
}

#[test]
fn attention_decode_uniform_caches() {
    let dev = gpu();
    // (dtype, batch, heads, kv_heads, d, entries): Llama-3-8B (4 per group) short and long enough to
    // split, SmolLM2 (3), Qwen2.5-0.5B (7), and more (row, head) pairs than one launch's table holds.
    for (dtype, b, h, kvh, d, len) in [
        (DType::BF16, 1, 32, 8, 128, 512),
        (DType::BF16, 2, 32, 8, 128, 9000),
        (DType::F32, 3, 9, 3, 64, 700),
        (DType::BF16, 1, 14, 2, 64, 4097),
        (DType::F16, 9, 16, 8, 128, 130),
        (DType::BF16, 40, 32, 8, 128, 300),
    ] {
        let cap = len + 37;
        let kb = randn(&[b, kvh, cap, d], 1.0, dtype, &dev);
        let vb = randn(&[b, kvh, cap, d], 1.0, dtype, &dev);
        let q = randn(&[b, h, d], 1.0, dtype, &dev);
        let (keys, values) = (uniform_views(&kb, len), uniform_views(&vb, len));
        // Left padding: row r skips r leading entries.
        let skip: Vec<usize> = (0..b * kvh).map(|i| i / kvh).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let out = pare_kernels::attention_decode(&q, &keys, &values, &skip, scale).unwrap();
        let reference = cpu::attention_decode(&q, &keys, &values, &skip, scale).unwrap();
        let e = rel_err(&out, &reference);
        assert!(e <= tol(dtype), "attention {dtype:?} b{b} h{h} kvh{kvh} d{d} len{len}: {e}");
        // The same cache passed whole: the same kernel on the same addresses, so the same bits.
        let row_skip: Vec<usize> = (0..b).collect();
        let (kw, vw) = (kb.narrow(2, 0, len).unwrap(), vb.narrow(2, 0, len).unwrap());
        let whole = pare_kernels::attention_decode_uniform(&q, &kw, &vw, &row_skip, scale).unwrap();
        assert_eq!(rel_err(&whole, &out), 0.0, "uniform cache passed whole, b{b} kvh{kvh} len{len}");
    }
}

#[test]
fn attention_decode_ragged_caches() {
    let dev = gpu();
    // What per-head presses leave: every (row, KV head) its own buffer and length, one empty after
    // its skip, one with a single entry, one long enough to be split.
    let (dtype, b, h, kvh, d) = (DType::BF16, 2, 32, 8, 128);
    let lens: Vec<usize> = (0..b * kvh).map(|i| [1, 3000, 64, 17, 5, 700, 2, 129][i % 8] + i).collect();
    // (row 0, head 5) skips everything: its query heads get zeros.
    let skip: Vec<usize> = lens.iter().enumerate().map(|(i, &l)| if i == 5 { l } else { (i % 3).min(l - 1) }).collect();
    let keys: Vec<Tensor> =
        lens.iter().map(|&n| randn(&[n + 8, d], 1.0, dtype, &dev).narrow(0, 0, n).unwrap()).collect();
    let values: Vec<Tensor> = lens.iter().map(|&n| randn(&[n, d], 1.0, dtype, &dev)).collect();
    let q = randn(&[b, h, d], 1.0, dtype, &dev);
    let out = pare_kernels::attention_decode(&q, &keys, &values, &skip, 0.088).unwrap();
    let reference = cpu::attention_decode(&q, &keys, &values, &skip, 0.088).unwrap();
    let e = rel_err(&out, &reference);
    assert!(e <= tol(dtype), "ragged attention: {e}");
}

#[test]
fn attention_decode_over_several_caches() {
    let dev = gpu();
    // A server's step: sequences of different lengths, each its own cache (uniform, or ragged per
    // head after a press), one launch for all; each cache's rows equal the CPU reference.
    let (dtype, h, kvh, d) = (DType::BF16, 32, 8, 128);
    let uniform = |b: usize, len: usize| {
        let (k, v) = (randn(&[b, kvh, len + 5, d], 1.0, dtype, &dev), randn(&[b, kvh, len + 5, d], 1.0, dtype, &dev));
        (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap())
    };
    let (k0, v0) = uniform(2, 300);
    let (k2, v2) = uniform(1, 4100);
    let lens: Vec<usize> = (0..kvh).map(|i| 40 + 97 * i).collect();
    let k1: Vec<Tensor> = lens.iter().map(|&n| randn(&[n, d], 1.0, dtype, &dev)).collect();
    let v1: Vec<Tensor> = lens.iter().map(|&n| randn(&[n, d], 1.0, dtype, &dev)).collect();
    let (skip0, skip1, skip2) = (vec![0, 3], vec![1; kvh], vec![0]);
    let q = randn(&[4, h, d], 1.0, dtype, &dev);
    let caches = [
        DecodeKv::Uniform { keys: &k0, values: &v0, skip: &skip0 },
        DecodeKv::Heads { keys: &k1, values: &v1, skip: &skip1 },
        DecodeKv::Uniform { keys: &k2, values: &v2, skip: &skip2 },
    ];
    let out = pare_kernels::attention_decode_caches(&q, &caches, 0.088).unwrap();
    let views = |k: &Tensor, v: &Tensor| (uniform_views(k, k.dim(2).unwrap()), uniform_views(v, v.dim(2).unwrap()));
    let ((k0h, v0h), (k2h, v2h)) = (views(&k0, &v0), views(&k2, &v2));
    let per_row = |skip: &[usize]| -> Vec<usize> { skip.iter().flat_map(|&s| [s; 8]).collect() };
    let reference = Tensor::cat(
        &[
            cpu::attention_decode(&q.narrow(0, 0, 2).unwrap(), &k0h, &v0h, &per_row(&skip0), 0.088).unwrap(),
            cpu::attention_decode(&q.narrow(0, 2, 1).unwrap(), &k1, &v1, &skip1, 0.088).unwrap(),
            cpu::attention_decode(&q.narrow(0, 3, 1).unwrap(), &k2h, &v2h, &per_row(&skip2), 0.088).unwrap(),
        ],
        0,
    )
    .unwrap();
    let e = rel_err(&out, &reference);
    assert!(e <= tol(dtype), "attention over several caches: {e}");
}

#[test]
fn gpu_memory_is_reported() {
    let dev = gpu();
    pare_kernels::reset_gpu_memory_peak(&dev);
    let t = Tensor::zeros((64, 1 << 20), DType::F32, &dev).unwrap();
    dev.synchronize().unwrap();
    let m = pare_kernels::gpu_memory(&dev).expect("memory figures on a CUDA device");
    assert!(m.peak >= 256 << 20, "{m:?}");
    assert!(m.used >= m.peak && m.total > m.used, "{m:?}");
    drop(t);
}

#[test]
fn attention_prefill_flash() {
    let dev = gpu();
    // (dtype, batch, heads, kv_heads, d, queries, entries, window): a causal prefill with a
    // left-padded row; queries after a cached prefix (chunked prefill); a sliding window.
    for (dtype, b, h, kvh, d, sq, n, window) in [
        (DType::BF16, 2, 32, 8, 128, 300, 300, None),
        (DType::F16, 1, 9, 3, 64, 70, 200, None),
        (DType::BF16, 1, 14, 2, 64, 257, 257, Some(100)),
        (DType::BF16, 1, 8, 8, 128, 1000, 1000, None),
    ] {
        let cap = n + 19;
        let kb = randn(&[b, kvh, cap, d], 1.0, dtype, &dev);
        let vb = randn(&[b, kvh, cap, d], 1.0, dtype, &dev);
        let (keys, values) = (kb.narrow(2, 0, n).unwrap(), vb.narrow(2, 0, n).unwrap());
        let q = randn(&[b, h, sq, d], 1.0, dtype, &dev);
        // Row r is left-padded by 5·r entries; its queries are the last sq entries' positions.
        let entry_pos: Vec<Vec<i64>> = (0..b)
            .map(|r| (0..n as i64).map(|e| if e < 5 * r as i64 { -1 } else { e - 5 * r as i64 }).collect())
            .collect();
        let query_pos: Vec<Vec<i64>> = entry_pos.iter().map(|p| p[n - sq..].to_vec()).collect();
        let (qp, ep): (Vec<&[i64]>, Vec<&[i64]>) =
            (query_pos.iter().map(Vec::as_slice).collect(), entry_pos.iter().map(Vec::as_slice).collect());
        let scale = 1.0 / (d as f32).sqrt();
        let out = pare_kernels::attention_prefill(&q, &keys, &values, &qp, &ep, window, scale).unwrap();
        let reference = cpu::attention_prefill(&q, &keys, &values, &qp, &ep, window, scale).unwrap();
        let e = rel_err(&out, &reference);
        // P is rounded to 16 bits before P·V, as in every flash attention.
        assert!(e <= 8e-3, "flash prefill {dtype:?} b{b} h{h} kvh{kvh} d{d} sq{sq} n{n} window {window:?}: {e}");
    }
}

#[test]
fn gemv_decode_products() {
    let dev = gpu();
    // Llama-3-8B's k/v (few rows: warps share them), o, down and LM-head shapes; odd sizes; batched
    // decode up to 32 rows (tensor-core tiles, K not a multiple of 32, N not of 16).
    for (dtype, rows, n, k) in [
        (DType::BF16, 1, 1024, 4096),
        (DType::BF16, 8, 4096, 14336),
        (DType::BF16, 3, 32001, 576),
        (DType::F16, 5, 896, 4864),
        (DType::BF16, 1, 100, 8),
        (DType::BF16, 32, 6144, 4096),
        (DType::BF16, 17, 1000, 4104),
        (DType::F16, 12, 4864, 896),
        (DType::BF16, 9, 49, 40),
        (DType::BF16, 24, 4096, 14336),
    ] {
        let x = randn(&[rows, k], 1.0, dtype, &dev);
        let w = randn(&[n, k], 0.02, dtype, &dev);
        let e = rel_err(&pare_kernels::gemv(&x, &w).unwrap(), &cpu::gemv(&x, &w).unwrap());
        assert!(e <= tol(dtype), "gemv {dtype:?} {rows}×{k} · ({n}×{k})ᵀ: {e}");
    }
    // Rows of x a view into a wider tensor (a slice of the last position of each sequence).
    for rows in [4, 20] {
        let wide = randn(&[rows, 4096 + 64], 1.0, DType::BF16, &dev);
        let x = wide.narrow(1, 64, 4096).unwrap();
        let w = randn(&[512, 4096], 0.02, DType::BF16, &dev);
        let e = rel_err(&pare_kernels::gemv(&x, &w).unwrap(), &cpu::gemv(&x, &w).unwrap());
        assert!(e <= tol(DType::BF16), "gemv on a strided x of {rows} rows: {e}");
    }
}

/// Every kernel variant the benchmark may pick, not only the ones the plan picks today.
#[test]
fn gemv_every_variant() {
    use pare_kernels::GemvKernel;
    let dev = gpu();
    for (rows, n, k) in [(1, 300, 2056), (6, 333, 1000), (16, 1040, 2048), (29, 77, 4104)] {
        let x = randn(&[rows, k], 1.0, DType::BF16, &dev);
        let w = randn(&[n, k], 0.02, DType::BF16, &dev);
        let reference = cpu::gemv(&x, &w).unwrap();
        let mut kernels = Vec::new();
        if rows <= 8 {
            for loads in [4, 8] {
                for warps_per_row in [1, 2, 4, 8] {
                    kernels.push(GemvKernel::Warp { loads, warps_per_row });
                }
            }
        }
        for m_tiles in [1, 2] {
            for loads in [2, 4, 8] {
                for split in [1, 3, 8] {
                    kernels.push(GemvKernel::Mma { m_tiles, loads, split });
                }
            }
        }
        for kernel in kernels {
            let e = rel_err(&pare_kernels::gemv_with(&x, &w, kernel).unwrap(), &reference);
            assert!(e <= tol(DType::BF16), "{kernel:?} {rows}×{k} · ({n}×{k})ᵀ: {e}");
        }
    }
}

#[test]
fn top_candidates_select_the_same_tokens() {
    let dev = gpu();
    // Llama-3's and SmolLM2's vocabularies; bf16 logits carry many exact ties.
    for (dtype, rows, vocab, k, temperature) in [
        (DType::F32, 4, 128256, 50, 1.0),
        (DType::F32, 2, 49152, 1, 0.7),
        (DType::BF16, 8, 49152, 40, 1.3),
        (DType::F32, 1, 1000, 1000, 1.0),
        (DType::F32, 3, 151936, 1024, 0.9),
    ] {
        let logits = randn(&[rows, vocab], 3.0, dtype, &dev);
        let got = pare_kernels::top_candidates(&logits, k, temperature).unwrap();
        let want = cpu::top_candidates(&logits, k, temperature).unwrap();
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let (g, w) = (g.as_ref().expect("within the cap"), w.as_ref().expect("within the cap"));
            assert_eq!(g.ids, w.ids, "{dtype:?} row {r} k {k}: candidate ids");
            assert_eq!(g.logits, w.logits, "{dtype:?} row {r}: candidate logits");
            assert!(
                (g.lse - w.lse).abs() < 1e-9 * w.lse.abs().max(1.0),
                "{dtype:?} row {r}: lse {} vs {}",
                g.lse,
                w.lse
            );
        }
    }
    // All tied: more than the cap qualify, so the row falls back.
    let flat = Tensor::zeros((2, 5000), DType::F32, &dev).unwrap();
    assert!(pare_kernels::top_candidates(&flat, 10, 1.0).unwrap().iter().all(Option::is_none));
}

#[test]
fn top_k_keep_selects_the_same_entries() {
    let dev = gpu();
    // A press's shapes: 8 KV heads × 4k or 32k entries; scores rounded to bf16 tie often, and
    // constant rows tie everywhere (the earlier entries must win).
    // The last case is AdaKV's: all heads in one row.
    for (rows, n, k, first, stride, per_head) in [
        (8, 4096, 2048, 0, 4096, 4096),
        (8, 32768, 16384, 3, 40000, 32768),
        (3, 1000, 1, 5, 1000, 1000),
        (1, 8 * 4096, 16384, 7, 5000, 4096),
    ] {
        let at = pare_kernels::BufferRows { first, stride, per_head };
        let scores = randn(&[rows, n], 1.0, DType::BF16, &dev).to_dtype(DType::F32).unwrap();
        let flat = Tensor::ones((rows.max(2), n), DType::F32, &dev).unwrap();
        for s in [&scores, &flat] {
            let (gi, gr) = pare_kernels::top_k_keep(s, k, at).unwrap();
            let (wi, wr) = cpu::top_k_keep(&s.to_device(&Device::Cpu).unwrap(), k, at).unwrap();
            assert_eq!(gi.to_vec2::<u32>().unwrap(), wi.to_vec2::<u32>().unwrap(), "{rows}×{n} k {k}: indices");
            assert_eq!(gr.to_vec2::<u32>().unwrap(), wr.to_vec2::<u32>().unwrap(), "{rows}×{n} k {k}: buffer rows");
        }
    }
}

#[test]
fn write_rows_writes_what_the_reference_writes() {
    let dev = gpu();
    // Two caches as the model holds them: a uniform (batch 2, 4 heads, capacity 9, 64) buffer read
    // flat, and a ragged (rows, 64) one; new entries of 1 and of 3 rows; more entries than one
    // launch's table takes (300 > 256).
    for (dtype, n, many) in [(DType::BF16, 1, false), (DType::F32, 3, false), (DType::BF16, 1, true)] {
        let uniform = randn(&[2, 4, 9, 64], 1.0, dtype, &dev);
        let ragged = randn(&[if many { 600 } else { 40 }, 64], 1.0, dtype, &dev);
        let uniform_rows: Vec<usize> = (0..8).map(|i| i * 9 + 5).collect();
        let ragged_rows: Vec<usize> = if many { (0..292).map(|i| i * 2).collect() } else { vec![0, 7, 20, 33] };
        let entries = uniform_rows.len() + ragged_rows.len();
        let (k, v) = (randn(&[entries, n, 64], 1.0, dtype, &dev), randn(&[entries, n, 64], 1.0, dtype, &dev));
        let host = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        // Copies: a clone shares its storage, and the writes change storage in place.
        let (gu_k, gu_v) = (uniform.copy().unwrap(), uniform.affine(2.0, 0.0).unwrap());
        let (gr_k, gr_v) = (ragged.copy().unwrap(), ragged.affine(2.0, 0.0).unwrap());
        let (cu_k, cu_v, cr_k, cr_v) = (host(&gu_k), host(&gu_v), host(&gr_k), host(&gr_v));
        let flat = |t: &Tensor| t.reshape((t.elem_count() / 64, 64)).unwrap();
        let (gu_kf, gu_vf, cu_kf, cu_vf) = (flat(&gu_k), flat(&gu_v), flat(&cu_k), flat(&cu_v));
        let writes = |uk, uv, rk, rv| {
            [
                pare_kernels::RowWrites { keys: uk, values: uv, rows: &uniform_rows },
                pare_kernels::RowWrites { keys: rk, values: rv, rows: &ragged_rows },
            ]
        };
        pare_kernels::write_rows(&k, &v, &writes(&gu_kf, &gu_vf, &gr_k, &gr_v)).unwrap();
        cpu::write_rows(&host(&k), &host(&v), &writes(&cu_kf, &cu_vf, &cr_k, &cr_v)).unwrap();
        for (g, c) in [(&gu_k, &cu_k), (&gu_v, &cu_v), (&gr_k, &cr_k), (&gr_v, &cr_v)] {
            assert_eq!(rel_err(g, c), 0.0, "{dtype:?} n {n}");
        }
        // The buffers the caches hold changed in place, where the writes said.
        assert_ne!(rel_err(&gu_k, &uniform), 0.0);
    }
}
