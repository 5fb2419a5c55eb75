//! CPU references: what each kernel computes, written plainly in f32. Values are rounded to the
//! inputs' dtype exactly where the kernels (and HF) round them. Inputs on any device are read
//! back to the host; results are CPU tensors of the inputs' dtype.

use candle_core::{DType, Device, Result, Tensor};

use crate::{Candidates, CANDIDATE_CAP};

/// The value a tensor of `dtype` would hold for `x`.
pub fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn tensor(data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// RMSNorm, optionally after a residual add; returns (x + residual, normed) — the first is x's
/// copy when there is no residual.
pub fn rms_norm(x: &Tensor, residual: Option<&Tensor>, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let dtype = x.dtype();
    let dim = x.dim(candle_core::D::Minus1)?;
    let mut h = host(x)?;
    if let Some(r) = residual {
        if r.dims() != x.dims() {
            candle_core::bail!("add_rms_norm: residual {:?} for x {:?}", r.dims(), x.dims());
        }
        for (h, r) in h.iter_mut().zip(host(r)?) {
            *h = round(*h + r, dtype);
        }
    }
    let w = host(weight)?;
    if w.len() != dim {
        candle_core::bail!("rms_norm: weight of {} for rows of {dim}", w.len());
    }
    let mut out = vec![0f32; h.len()];
    for (o, row) in out.chunks_mut(dim).zip(h.chunks(dim)) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let r = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(&w) {
            *o = round(w * round(v * r, dtype), dtype);
        }
    }
    Ok((tensor(h, x.dims(), dtype)?, tensor(out, x.dims(), dtype)?))
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gate.dims(), up.dims());
    }
    let dtype = gate.dtype();
    let out = host(gate)?
        .iter()
        .zip(host(up)?)
        .map(|(&g, u)| round(round(g / (1.0 + (-g).exp()), dtype) * u, dtype))
        .collect();
    tensor(out, gate.dims(), dtype)
}

pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((rows, k), (n, _)) = (x.dims2()?, w.dims2()?);
    let (xv, wv) = (host(x)?, host(w)?);
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            out[r * n + j] = xv[r * k..][..k].iter().zip(&wv[j * k..][..k]).map(|(a, b)| a * b).sum();
        }
    }
    tensor(out, &[rows, n], x.dtype())
}

pub fn rope_split_heads(x: &Tensor, heads: usize, head_dim: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (batch, seq, width) = x.dims3()?;
    let half = cos.dim(2)?;
    let rot = 2 * half;
    if width < heads * head_dim || rot > head_dim || cos.dims() != [batch, seq, half] || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope: x {:?}, {heads} heads of {head_dim}, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let (xv, c, s) = (host(x)?, host(cos)?, host(sin)?);
    let dtype = x.dtype();
    let mut out = vec![0f32; batch * heads * seq * head_dim];
    for b in 0..batch {
        for t in 0..seq {
            let token = b * seq + t;
            for h in 0..heads {
                let src = &xv[token * width + h * head_dim..][..head_dim];
                let dst = &mut out[((b * heads + h) * seq + t) * head_dim..][..head_dim];
                for i in 0..half {
                    let (cs, sn) = (c[token * half + i], s[token * half + i]);
                    dst[i] = round(src[i] * cs - src[i + half] * sn, dtype);
                    dst[i + half] = round(src[i + half] * cs + src[i] * sn, dtype);
                }
                dst[rot..].copy_from_slice(&src[rot..]);
            }
        }
    }
    tensor(out, &[batch, heads, seq, head_dim], dtype)
}

pub fn attention_decode(q: &Tensor, keys: &[Tensor], values: &[Tensor], skip: &[usize], scale: f32) -> Result<Tensor> {
    let (batch, heads, d) = q.dims3()?;
    let kv_heads = keys.len() / batch;
    let group = heads / kv_heads;
    let qv = host(q)?;
    let mut out = vec![0f32; batch * heads * d];
    for (i, ((k, v), &skip)) in keys.iter().zip(values).zip(skip).enumerate() {
        let (row, kvh) = (i / kv_heads, i % kv_heads);
        let (kv, vv) = (host(k)?, host(v)?);
        let len = kv.len() / d;
        for g in 0..group {
            let qh = row * heads + kvh * group + g;
            let qrow = &qv[qh * d..][..d];
            let scores: Vec<f32> = (skip..len)
                .map(|e| kv[e * d..][..d].iter().zip(qrow).map(|(k, q)| k * q).sum::<f32>() * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            let o = &mut out[qh * d..][..d];
            for (e, w) in (skip..len).zip(&weights) {
                for (o, v) in o.iter_mut().zip(&vv[e * d..][..d]) {
                    *o += w / total * v;
                }
            }
        }
    }
    tensor(out, &[batch, heads, d], q.dtype())
}

pub fn attention_prefill(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    query_positions: &[&[i64]],
    entry_positions: &[&[i64]],
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let (batch, heads, sq, d) = q.dims4()?;
    let (_, kv_heads, n, _) = keys.dims4()?;
    let group = heads / kv_heads;
    let (qv, kv, vv) = (host(q)?, host(&keys.contiguous()?)?, host(&values.contiguous()?)?);
    let visible = |qp: i64, ep: i64| ep >= 0 && ep <= qp && window.is_none_or(|w| qp - ep < w as i64);
    let mut out = vec![0f32; qv.len()];
    for b in 0..batch {
        for h in 0..heads {
            let base = ((b * kv_heads + h / group) * n) * d;
            for i in 0..sq {
                let qrow = &qv[((b * heads + h) * sq + i) * d..][..d];
                let seen: Vec<usize> =
                    (0..n).filter(|&e| visible(query_positions[b][i], entry_positions[b][e])).collect();
                let scores: Vec<f32> = seen
                    .iter()
                    .map(|&e| kv[base + e * d..][..d].iter().zip(qrow).map(|(k, q)| k * q).sum::<f32>() * scale)
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f32 = weights.iter().sum();
                let o = &mut out[((b * heads + h) * sq + i) * d..][..d];
                for (&e, w) in seen.iter().zip(&weights) {
                    for (o, v) in o.iter_mut().zip(&vv[base + e * d..][..d]) {
                        *o += w / total * v;
                    }
                }
            }
        }
    }
    tensor(out, q.dims(), q.dtype())
}

/// Reference for [`crate::top_candidates`]: the k-th largest score by selection, then every token
/// at or above it; the log-sum-exp in f64 over the row in index order.
pub fn top_candidates(logits: &Tensor, k: usize, temperature: f32) -> Result<Vec<Option<Candidates>>> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .iter()
        .map(|row| {
            // + 0.0 turns -0 into +0: equal scores, one key.
            let scores: Vec<f32> = row.iter().map(|&l| l / temperature + 0.0).collect();
            let mut sorted = scores.clone();
            let k = k.min(sorted.len());
            let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            let ids: Vec<u32> = (0..row.len() as u32).filter(|&i| scores[i as usize].total_cmp(&kth).is_ge()).collect();
            (ids.len() <= CANDIDATE_CAP).then(|| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = if max == f64::NEG_INFINITY {
                    max
                } else {
                    row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max
                };
                Candidates { logits: ids.iter().map(|&i| row[i as usize]).collect(), ids, lse }
            })
        })
        .collect())
}

/// Reference for [`crate::top_k_keep`]: per row, a selection of the k best by (score descending
/// under `total_cmp`, index ascending), then the kept indices in increasing order.
pub fn top_k_keep(scores: &Tensor, k: usize, buffer: crate::BufferRows) -> Result<(Tensor, Tensor)> {
    let rows: Vec<Vec<f32>> = scores.to_dtype(DType::F32)?.to_vec2()?;
    let n = rows.first().map_or(0, Vec::len);
    let mut idx = Vec::with_capacity(rows.len() * k);
    for s in &rows {
        let mut order: Vec<u32> = (0..s.len() as u32).collect();
        if k < order.len() {
            order.select_nth_unstable_by(k, |&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
            order.truncate(k);
        }
        order.sort_unstable();
        idx.extend(order);
    }
    let buffer_rows: Vec<u32> = idx
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            let e = j / k * n + i as usize;
            (buffer.first + e / buffer.per_head * buffer.stride + e % buffer.per_head) as u32
        })
        .collect();
    let shape = (rows.len(), k);
    Ok((Tensor::from_vec(idx, shape, scores.device())?, Tensor::from_vec(buffer_rows, shape, scores.device())?))
}

/// Reference for [`crate::write_rows`]: each entry's rows copied into its buffers one by one.
pub fn write_rows(keys: &Tensor, values: &Tensor, writes: &[crate::RowWrites]) -> Result<()> {
    let keys = keys.contiguous()?;
    let values = values.contiguous()?;
    let mut entry = 0;
    for w in writes {
        for &row in w.rows {
            w.keys.slice_set(&keys.get(entry)?, 0, row)?;
            w.values.slice_set(&values.get(entry)?, 0, row)?;
            entry += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The references against candle's own ops (and plain softmax attention), so that what the
    //! GPU kernels are compared with is itself right.
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The kept set is a full sort's first k (ties to the earlier entry, -0 below +0), ascending.
    #[test]
    fn write_rows_lands_where_the_writes_say() {
        let buf = |rows| Tensor::zeros((rows, 2), DType::F32, &Device::Cpu).unwrap();
        let (ka, va, kb, vb) = (buf(4), buf(4), buf(6), buf(6));
        // Three entries of two rows each: one into the first buffers at row 1, two into the second.
        let k = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 2, 2)).unwrap();
        let v = (&k + 100.0).unwrap();
        let writes = [
            crate::RowWrites { keys: &ka, values: &va, rows: &[1] },
            crate::RowWrites { keys: &kb, values: &vb, rows: &[4, 0] },
        ];
        crate::write_rows(&k, &v, &writes).unwrap();
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        assert_eq!(rows(&ka), [[0., 0.], [0., 1.], [2., 3.], [0., 0.]]);
        assert_eq!(rows(&kb), [[8., 9.], [10., 11.], [0., 0.], [0., 0.], [4., 5.], [6., 7.]]);
        assert_eq!(rows(&va)[1], [100., 101.]);
        // Past the end of a buffer, or fewer destinations than entries: an error, nothing written.
        let past = [crate::RowWrites { keys: &ka, values: &va, rows: &[3] }, writes[1].clone()];
        assert!(crate::write_rows(&k, &v, &past).is_err());
        assert!(crate::write_rows(&k, &v, &writes[..1]).is_err());
    }

    #[test]
    fn top_k_keep_is_a_sorts_prefix() {
        let row = vec![1.0, -0.0, 3.0, 0.0, 3.0, f32::NEG_INFINITY, 1.0, 2.0, 0.0, 1.0];
        let rows = [row.clone(), row.iter().rev().copied().collect()];
        let t = Tensor::from_vec(rows.concat(), (2, row.len()), &Device::Cpu).unwrap();
        for k in 0..=row.len() {
            let rows_at = crate::BufferRows { first: 7, stride: 100, per_head: row.len() };
            let (idx, buf) = crate::top_k_keep(&t, k, rows_at).unwrap();
            let (idx, buf): (Vec<Vec<u32>>, Vec<Vec<u32>>) = (idx.to_vec2().unwrap(), buf.to_vec2().unwrap());
            for (r, s) in rows.iter().enumerate() {
                let mut order: Vec<u32> = (0..s.len() as u32).collect();
                order.sort_by(|&a, &b| s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b)));
                let mut want = order[..k].to_vec();
                want.sort_unstable();
                assert_eq!(idx[r], want, "row {r} k {k}");
                assert!(buf[r].iter().zip(&want).all(|(&b, &i)| b == 7 + 100 * r as u32 + i));
            }
        }
        // Both rows as one: heads of 4 entries each, 2 buffer rows apart.
        let one = t.reshape((1, 2 * row.len())).unwrap();
        let (idx, buf) = crate::top_k_keep(&one, 5, crate::BufferRows { first: 3, stride: 6, per_head: 4 }).unwrap();
        let (idx, buf): (Vec<u32>, Vec<u32>) =
            (idx.flatten_all().unwrap().to_vec1().unwrap(), buf.flatten_all().unwrap().to_vec1().unwrap());
        assert!(idx.iter().zip(&buf).all(|(&e, &b)| b == 3 + e / 4 * 6 + e % 4));
        let rows_at = crate::BufferRows { first: 0, stride: 10, per_head: 10 };
        assert!(crate::top_k_keep(&t, 11, rows_at).is_err(), "k above n");
    }

    #[test]
    fn rms_norm_matches_candle_in_f32_and_hf_rounding_in_bf16() {
        let x = Tensor::randn(0f32, 2.0, (3, 64), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.1, 64, &Device::Cpu).unwrap();
        let (_, y) = rms_norm(&x, None, &w, 1e-5).unwrap();
        assert!(max_diff(&y, &plain_rms(&x, &w, 1e-5)) < 1e-5);
        let (xb, wb) = (x.to_dtype(DType::BF16).unwrap(), w.to_dtype(DType::BF16).unwrap());
        let (_, yb) = rms_norm(&xb, None, &wb, 1e-5).unwrap();
        // HF: weight * normed.to(bf16), both roundings visible.
        let normed =
            plain_rms(&xb.to_dtype(DType::F32).unwrap(), &Tensor::ones(64, DType::F32, &Device::Cpu).unwrap(), 1e-5);
        let hf = normed.to_dtype(DType::BF16).unwrap().broadcast_mul(&wb).unwrap();
        // Sums in another order can flip a rounding now and then; skipping a rounding flips most.
        let (a, b) = (
            yb.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            hf.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(differ * 10 <= a.len(), "{differ} of {} differ from HF's bf16 rounding", a.len());
    }

    fn plain_rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(1).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
    }

    #[test]
    fn gemv_is_x_times_w_transposed() {
        let x = Tensor::randn(0f32, 1.0, (3, 40), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (7, 40), &Device::Cpu).unwrap();
        assert!(max_diff(&gemv(&x, &w).unwrap(), &x.matmul(&w.t().unwrap()).unwrap()) < 1e-4);
    }

    #[test]
    fn add_rms_norm_adds_first() {
        let x = Tensor::randn(0f32, 1.0, (2, 32), &Device::Cpu).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 32), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.1, 32, &Device::Cpu).unwrap();
        let (h, y) = rms_norm(&x, Some(&r), &w, 1e-6).unwrap();
        let sum = (&x + &r).unwrap();
        assert!(max_diff(&h, &sum) < 1e-6);
        assert!(max_diff(&y, &rms_norm(&sum, None, &w, 1e-6).unwrap().1) < 1e-6);
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        let g = Tensor::randn(0f32, 3.0, (4, 50), &Device::Cpu).unwrap();
        let u = Tensor::randn(0f32, 1.0, (4, 50), &Device::Cpu).unwrap();
        let sigmoid = (g.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
        let reference = ((&g * sigmoid).unwrap() * &u).unwrap();
        assert!(max_diff(&swiglu(&g, &u).unwrap(), &reference) < 1e-5);
    }

    #[test]
    fn rope_rotates_pairs_and_passes_the_rest() {
        // Partial rotary: 8 of 12 channels rotate; a strided input row (width 30 > 2·12).
        let x = Tensor::randn(0f32, 1.0, (2, 3, 30), &Device::Cpu).unwrap();
        let angles = Tensor::randn(0f32, 1.0, (2, 3, 4), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let out = rope_split_heads(&x, 2, 12, &cos, &sin).unwrap();
        assert_eq!(out.dims(), &[2, 2, 3, 12]);
        let heads =
            x.narrow(2, 0, 24).unwrap().reshape((2, 3, 2, 12)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (rot, pass) = (heads.narrow(3, 0, 8).unwrap(), heads.narrow(3, 8, 4).unwrap());
        let (x1, x2) = (rot.narrow(3, 0, 4).unwrap(), rot.narrow(3, 4, 4).unwrap());
        let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
        let r1 = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
        let r2 = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
        let reference = Tensor::cat(&[&r1, &r2, &pass], 3).unwrap();
        assert!(max_diff(&out, &reference) < 1e-6);
    }

    #[test]
    fn attention_decode_is_softmax_attention_over_what_each_head_keeps() {
        // 2 rows × 2 KV heads, 4 query heads (groups of 2), ragged lengths, skipped prefixes.
        let d = 8;
        let q = Tensor::randn(0f32, 1.0, (2, 4, d), &Device::Cpu).unwrap();
        let lens = [5usize, 3, 7, 1];
        let skip = [0usize, 1, 2, 0];
        let keys: Vec<Tensor> = lens.iter().map(|&n| Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap()).collect();
        let values: Vec<Tensor> =
            lens.iter().map(|&n| Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap()).collect();
        let out = attention_decode(&q, &keys, &values, &skip, 0.3).unwrap();
        for row in 0..2 {
            for h in 0..4 {
                let i = row * 2 + h / 2;
                let k = keys[i].narrow(0, skip[i], lens[i] - skip[i]).unwrap();
                let v = values[i].narrow(0, skip[i], lens[i] - skip[i]).unwrap();
                let qh = q.get(row).unwrap().get(h).unwrap().unsqueeze(0).unwrap();
                let p = softmax_rows(&(qh.matmul(&k.t().unwrap()).unwrap() * 0.3).unwrap());
                let expected = p.matmul(&v).unwrap().squeeze(0).unwrap();
                assert!(max_diff(&out.get(row).unwrap().get(h).unwrap(), &expected) < 1e-5);
            }
        }
    }

    #[test]
    fn attention_prefill_masks_by_position() {
        // One row left-padded by 2, causal, a window of 3 in the second case; 2 query heads per KV head.
        let d = 4;
        let q = Tensor::randn(0f32, 1.0, (2, 2, 5, d), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 1, 5, d), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 1, 5, d), &Device::Cpu).unwrap();
        let pos: [&[i64]; 2] = [&[0, 1, 2, 3, 4], &[-1, -1, 0, 1, 2]];
        for window in [None, Some(3)] {
            let out = attention_prefill(&q, &k, &v, &pos, &pos, window, 0.5).unwrap();
            for (b, row) in pos.iter().enumerate() {
                for h in 0..2 {
                    for (i, &qp) in row.iter().enumerate() {
                        let o = out.get(b).unwrap().get(h).unwrap().get(i).unwrap();
                        let seen: Vec<u32> = (0..5u32)
                            .filter(|&e| {
                                let ep = pos[b][e as usize];
                                ep >= 0 && ep <= qp && window.is_none_or(|w| qp - ep < w as i64)
                            })
                            .collect();
                        if seen.is_empty() {
                            assert_eq!(o.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
                            continue;
                        }
                        let idx = Tensor::new(seen.as_slice(), &Device::Cpu).unwrap();
                        let kk = k.get(b).unwrap().get(0).unwrap().index_select(&idx, 0).unwrap();
                        let vv = v.get(b).unwrap().get(0).unwrap().index_select(&idx, 0).unwrap();
                        let qh = q.get(b).unwrap().get(h).unwrap().get(i).unwrap().unsqueeze(0).unwrap();
                        let p = softmax_rows(&(qh.matmul(&kk.t().unwrap()).unwrap() * 0.5).unwrap());
                        assert!(max_diff(&o, &p.matmul(&vv).unwrap().squeeze(0).unwrap()) < 1e-5);
                    }
                }
            }
        }
    }

    fn softmax_rows(x: &Tensor) -> Tensor {
        let e = x.broadcast_sub(&x.max_keepdim(1).unwrap()).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap()
    }

    #[test]
    fn top_candidates_keep_every_tie_of_the_kth_score() {
        // Scores at temperature 2: 1.5, 1, 0.5, 1.5, 1, -0 (= 0), 0, -inf.
        let row = [3.0f32, 2.0, 1.0, 3.0, 2.0, -0.0, 0.0, f32::NEG_INFINITY];
        let logits = Tensor::new(&[row], &Device::Cpu).unwrap();
        let ids = |k| top_candidates(&logits, k, 2.0).unwrap()[0].clone().unwrap().ids;
        assert_eq!(ids(1), [0, 3], "both maxima");
        assert_eq!(ids(3), [0, 1, 3, 4], "the 3rd largest ties with the 4th");
        assert_eq!(ids(6), [0, 1, 2, 3, 4, 5, 6], "-0 and +0 are one score");
        assert_eq!(ids(100).len(), 8);
        let c = top_candidates(&logits, 2, 1.0).unwrap()[0].clone().unwrap();
        assert_eq!(c.logits, [3.0, 3.0]);
        let lse = row.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        assert!((c.lse - lse).abs() < 1e-12);
        let tied = Tensor::zeros((1, CANDIDATE_CAP + 1), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(top_candidates(&tied, 1, 1.0).unwrap()[0], None, "more ties than the cap");
    }
}
