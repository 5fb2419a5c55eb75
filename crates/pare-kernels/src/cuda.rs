//! Launching kernels/pare.cu on candle's CUDA stream.
//!
//! Kernels take raw device addresses: inputs may be views (a layout offset into a larger buffer)
//! and decode attention takes a variable number of caches, which candle's CustomOp traits cannot
//! express. Everything runs on the tensors' device stream, so launches are ordered after the ops
//! that produced their inputs and before any later free of them (stream-ordered allocation).

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::{Candidates, GpuMemory, CANDIDATE_CAP};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/pare.ptx"));
const MODULE: &str = "pare-kernels";

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("pare-kernels: no kernel for {other:?}"),
    })
}

fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => candle_core::bail!("pare-kernels: expected a CUDA tensor, got one on {other:?}"),
    }
}

fn slice_address<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    // Everything runs on one stream, so the read event the guard records orders nothing.
    let stream = dev.cuda_stream();
    let (ptr, _sync) = s.device_ptr(&stream);
    ptr
}

/// Device address of the first element of `t`'s layout (views included).
fn address(t: &Tensor) -> Result<u64> {
    let dev = device(t)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else { candle_core::bail!("pare-kernels: tensor storage is not CUDA") };
    let base = match t.dtype() {
        DType::F32 => slice_address(cs.as_cuda_slice::<f32>()?, &dev),
        DType::BF16 => slice_address(cs.as_cuda_slice::<bf16>()?, &dev),
        DType::F16 => slice_address(cs.as_cuda_slice::<f16>()?, &dev),
        other => candle_core::bail!("pare-kernels: no kernel for {other:?}"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// A fresh (uninitialized) output buffer; every kernel writes all of its output.
struct Out {
    storage: CudaStorage,
    address: u64,
}

impl Out {
    fn new(dev: &CudaDevice, dtype: DType, elems: usize) -> Result<Out> {
        let elems = elems.max(1);
        // SAFETY: the launch that follows writes every element before anything reads them.
        let storage = unsafe {
            match dtype {
                DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(elems)?, dev.clone()),
                DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<bf16>(elems)?, dev.clone()),
                DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<f16>(elems)?, dev.clone()),
                DType::F64 => CudaStorage::wrap_cuda_slice(dev.alloc::<f64>(elems)?, dev.clone()),
                DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(elems)?, dev.clone()),
                other => candle_core::bail!("pare-kernels: no kernel for {other:?}"),
            }
        };
        let address = match dtype {
            DType::F32 => slice_address(storage.as_cuda_slice::<f32>()?, dev),
            DType::BF16 => slice_address(storage.as_cuda_slice::<bf16>()?, dev),
            DType::F16 => slice_address(storage.as_cuda_slice::<f16>()?, dev),
            DType::F64 => slice_address(storage.as_cuda_slice::<f64>()?, dev),
            _ => slice_address(storage.as_cuda_slice::<u32>()?, dev),
        };
        Ok(Out { storage, address })
    }

    fn tensor<S: Into<Shape>>(self, shape: S) -> Tensor {
        Tensor::from_storage(Storage::Cuda(self.storage), shape, BackpropOp::none(), false)
    }
}

fn multiprocessors(dev: &CudaDevice) -> usize {
    static SMS: OnceLock<usize> = OnceLock::new();
    *SMS.get_or_init(|| {
        dev.cuda_stream()
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(132, |n| n.max(1) as usize)
    })
}

/// Launch kernel `$name` of kernels/pare.cu with the listed arguments (references to values).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func(&$name, MODULE, PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // SAFETY: each call passes the argument list its kernel declares, with addresses of live
        // buffers of the sizes the grid covers.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

fn contiguous_same_dtype(tensors: &[&Tensor]) -> Result<Vec<Tensor>> {
    let dtype = tensors[0].dtype();
    if tensors.iter().any(|t| t.dtype() != dtype) {
        candle_core::bail!("pare-kernels: inputs of different dtypes");
    }
    tensors.iter().map(|t| t.contiguous()).collect()
}

pub fn rms_norm(x: &Tensor, residual: Option<&Tensor>, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let dev = device(x)?;
    let dim = x.dim(candle_core::D::Minus1)?;
    if weight.elem_count() != dim || residual.is_some_and(|r| r.dims() != x.dims()) {
        candle_core::bail!(
            "rms_norm: x {:?}, weight {:?}, residual {:?}",
            x.dims(),
            weight.dims(),
            residual.map(|r| r.dims().to_vec())
        );
    }
    let mut inputs = vec![x, weight];
    inputs.extend(residual);
    let inputs = contiguous_same_dtype(&inputs)?;
    let rows = x.elem_count() / dim;
    let sfx = suffix(x.dtype())?;
    let out = Out::new(&dev, x.dtype(), x.elem_count())?;
    let threads = (dim / 8).next_power_of_two().clamp(32, 1024) as u32;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let (xa, wa) = (address(&inputs[0])?, address(&inputs[1])?);
    let dim_i = dim as i32;
    if residual.is_some() {
        let sum = Out::new(&dev, x.dtype(), x.elem_count())?;
        let ra = address(&inputs[2])?;
        launch!(&dev, &format!("add_rms_norm_{sfx}"), cfg, &xa, &ra, &wa, &sum.address, &out.address, &dim_i, &eps);
        Ok((sum.tensor(x.shape()), out.tensor(x.shape())))
    } else {
        launch!(&dev, &format!("rms_norm_{sfx}"), cfg, &xa, &wa, &out.address, &dim_i, &eps);
        Ok((x.clone(), out.tensor(x.shape())))
    }
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gate.dims(), up.dims());
    }
    let dev = device(gate)?;
    let inputs = contiguous_same_dtype(&[gate, up])?;
    let n = gate.elem_count();
    let out = Out::new(&dev, gate.dtype(), n)?;
    let blocks = n.div_ceil(256).clamp(1, multiprocessors(&dev) * 16) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (ga, ua, n64) = (address(&inputs[0])?, address(&inputs[1])?, n as u64);
    launch!(&dev, &format!("swiglu_{}", suffix(gate.dtype())?), cfg, &ga, &ua, &out.address, &n64);
    Ok(out.tensor(gate.shape()))
}

/// The device's memory bandwidth by its datasheet, bytes/s: memory clock × bus width × 2 (double
/// data rate), read once. Picks the GEMV's loads in flight; None off CUDA or if the driver won't say.
pub fn memory_bandwidth(device: &Device) -> Option<f64> {
    let Device::Cuda(dev) = device else { return None };
    Some(bandwidth(dev)).filter(|b| *b > 0.0)
}

fn bandwidth(dev: &CudaDevice) -> f64 {
    static BW: OnceLock<f64> = OnceLock::new();
    *BW.get_or_init(|| {
        let ctx = dev.cuda_stream().context().clone();
        let attr = |a| ctx.attribute(a).map_or(0.0, |v| v.max(0) as f64);
        let khz = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
        let bits = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
        2.0 * khz * 1e3 * bits / 8.0
    })
}

pub fn gemv(x: &Tensor, w: &Tensor, kernel: Option<crate::GemvKernel>) -> Result<Tensor> {
    let ((rows, k), (n, _)) = (x.dims2()?, w.dims2()?);
    let dtype = x.dtype();
    if !crate::gemv_supported(dtype, rows, k) || w.dtype() != dtype {
        candle_core::bail!("gemv: no kernel for {rows} rows of {k} in {dtype:?} (weights {:?})", w.dtype());
    }
    let dev = device(x)?;
    let x = if x.stride()[1] == 1 && x.stride()[0] % 8 == 0 { x.clone() } else { x.contiguous()? };
    let w = w.contiguous()?;
    let (xa, wa) = (address(&x)?, address(&w)?);
    if xa % 16 != 0 || wa % 16 != 0 {
        candle_core::bail!("gemv: operands must be 16-byte aligned");
    }
    let x_stride = if rows > 1 { x.stride()[0] as i64 } else { k as i64 };
    let kernel = kernel.unwrap_or_else(|| crate::gemv_plan(rows, n, k, multiprocessors(&dev), bandwidth(&dev)));
    let out = Out::new(&dev, dtype, rows * n)?;
    let sfx = suffix(dtype)?;
    let (n_i, k_i) = (n as i32, k as i32);
    match kernel {
        crate::GemvKernel::Warp { loads, warps_per_row } => {
            if rows > 8 || !matches!(loads, 4 | 8) || !matches!(warps_per_row, 1 | 2 | 4 | 8) {
                candle_core::bail!("gemv: {kernel:?} does not run {rows} rows");
            }
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(8 / warps_per_row) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let name = format!("gemv_{sfx}_b{rows}{}", if loads == 8 { "_u8" } else { "" });
            let wpr_i = warps_per_row as i32;
            launch!(&dev, &name, cfg, &xa, &x_stride, &wa, &out.address, &n_i, &k_i, &wpr_i);
        }
        crate::GemvKernel::Mma { m_tiles, loads, split } => {
            if !matches!(m_tiles, 1 | 2) || !matches!(loads, 2 | 4 | 8) || !(1..=8).contains(&split) {
                candle_core::bail!("gemv: no kernel {kernel:?}");
            }
            let n_tiles = rows.div_ceil(8);
            // The ordered sum of the warps' slices: split × (16·m_tiles) × (8·n_tiles) f32 (≤ 32 KiB).
            let smem = split * 16 * m_tiles * 8 * n_tiles * 4;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(16 * m_tiles) as u32, 1, 1),
                block_dim: (32 * split as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let name = format!("gemm_small_{sfx}_n{n_tiles}_m{m_tiles}_u{loads}");
            let m_i = rows as i32;
            launch!(&dev, &name, cfg, &xa, &x_stride, &wa, &out.address, &m_i, &n_i, &k_i);
        }
    }
    Ok(out.tensor((rows, n)))
}

pub fn rope_split_heads(x: &Tensor, heads: usize, head_dim: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (batch, seq, width) = x.dims3()?;
    let half = cos.dim(2)?;
    if width < heads * head_dim
        || 2 * half > head_dim
        || head_dim % 2 != 0
        || cos.dims() != [batch, seq, half]
        || sin.dims() != cos.dims()
    {
        candle_core::bail!(
            "rope: x {:?}, {heads} heads of {head_dim}, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let dev = device(x)?;
    // Rows may be a slice of a wider (fused) projection: equally spaced, channels contiguous.
    let stride = x.stride();
    let x = if stride[2] == 1 && stride[0] == seq * stride[1] { x.clone() } else { x.contiguous()? };
    let in_stride = x.stride()[1] as i64;
    let tables = contiguous_same_dtype(&[&x, cos, sin])?;
    let out = Out::new(&dev, x.dtype(), batch * heads * seq * head_dim)?;
    let cfg = LaunchConfig {
        grid_dim: ((batch * seq) as u32, heads as u32, 1),
        block_dim: ((head_dim / 2) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (xa, ca, sa) = (address(&x)?, address(&tables[1])?, address(&tables[2])?);
    let (seq_i, heads_i, d_i, rot_i) = (seq as i32, heads as i32, head_dim as i32, 2 * half as i32);
    launch!(
        &dev,
        &format!("rope_{}", suffix(x.dtype())?),
        cfg,
        &xa,
        &ca,
        &sa,
        &out.address,
        &seq_i,
        &heads_i,
        &d_i,
        &rot_i,
        &in_stride
    );
    Ok(out.tensor((batch, heads, seq, head_dim)))
}

/// kernels/pare.cu's HeadTable: where each (row, KV head) of one launch keeps its cache.
const MAX_TABLE: usize = 256;
#[repr(C)]
#[derive(Clone, Copy)]
struct HeadTable {
    k: [u64; MAX_TABLE],
    v: [u64; MAX_TABLE],
    len: [i32; MAX_TABLE],
    skip: [i32; MAX_TABLE],
}
// SAFETY: plain old data with the kernel's layout (repr(C), 8-byte aligned like the C struct).
unsafe impl DeviceRepr for HeadTable {}

/// kernels/pare.cu's RowTable: where each entry of one `write_rows` launch goes.
const MAX_ROWS_TABLE: usize = 256;
#[repr(C)]
#[derive(Clone, Copy)]
struct RowTable {
    k: [u64; MAX_ROWS_TABLE],
    v: [u64; MAX_ROWS_TABLE],
}
// SAFETY: plain old data with the kernel's layout (repr(C), 8-byte aligned like the C struct).
unsafe impl DeviceRepr for RowTable {}

/// [`crate::write_rows`] on the GPU: one launch per [`MAX_ROWS_TABLE`] entries.
pub fn write_rows(keys: &Tensor, values: &Tensor, writes: &[crate::RowWrites]) -> Result<()> {
    let (entries, n, width) = keys.dims3()?;
    let dev = device(keys)?;
    let elem = keys.dtype().size_in_bytes() as u64;
    let (keys, values) = (keys.contiguous()?, values.contiguous()?);
    let (src_k, src_v) = (address(&keys)?, address(&values)?);
    let row_bytes = width as u64 * elem;
    let mut dst = Vec::with_capacity(entries);
    for w in writes {
        let (ka, va) = (address(w.keys)?, address(w.values)?);
        dst.extend(w.rows.iter().map(|&r| (ka + r as u64 * row_bytes, va + r as u64 * row_bytes)));
    }
    let bytes = (n as u64 * row_bytes) as i64;
    for first in (0..entries).step_by(MAX_ROWS_TABLE) {
        let count = (entries - first).min(MAX_ROWS_TABLE);
        let mut table = RowTable { k: [0; MAX_ROWS_TABLE], v: [0; MAX_ROWS_TABLE] };
        for (j, &(k, v)) in dst[first..first + count].iter().enumerate() {
            table.k[j] = k;
            table.v[j] = v;
        }
        let first_i = first as i64;
        let cfg = LaunchConfig { grid_dim: (count as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        launch!(&dev, "write_rows", cfg, &table, &first_i, &src_k, &src_v, &bytes);
    }
    Ok(())
}

/// Blocks per multiprocessor the split targets: enough loads in flight to cover HBM latency.
const DECODE_BLOCKS_PER_SM: usize = 4;
/// Entries a block reads at least: fewer and merging the splits costs more than it saves.
const MIN_CHUNK: usize = 64;

/// [`crate::attention_decode_caches`] on the GPU: one table of every cache's (row, KV head) parts.
pub fn attention_decode_caches(q: &Tensor, caches: &[crate::DecodeKv], scale: f32) -> Result<Tensor> {
    let d = q.dims3()?.2;
    let dtype = q.dtype();
    let check = |t: &Tensor, rows_contiguous: bool| {
        if t.dtype() != dtype || !rows_contiguous {
            candle_core::bail!(
                "attention_decode: caches must be {dtype:?} with contiguous rows (got {:?}, strides {:?})",
                t.dtype(),
                t.stride()
            );
        }
        Ok(())
    };
    let mut heads = Vec::new();
    for cache in caches {
        match *cache {
            crate::DecodeKv::Heads { keys, values, skip } => {
                for ((k, v), &s) in keys.iter().zip(values).zip(skip) {
                    for t in [k, v] {
                        check(t, t.dim(0)? <= 1 || t.stride() == [d, 1])?;
                    }
                    heads.push(CacheHead { k: address(k)?, v: address(v)?, len: k.dim(0)?, skip: s });
                }
            }
            crate::DecodeKv::Uniform { keys, values, skip } => {
                let (batch, kv_heads, len, d) = keys.dims4()?;
                for t in [keys, values] {
                    check(t, len <= 1 || t.stride()[2..] == [d, 1])?;
                }
                let (ka, va) = (address(keys)?, address(values)?);
                let (ks, vs) = (keys.stride(), values.stride());
                let bytes = dtype.size_in_bytes() as u64;
                heads.extend((0..batch * kv_heads).map(|i| {
                    let (row, head) = ((i / kv_heads) as u64, (i % kv_heads) as u64);
                    CacheHead {
                        k: ka + (row * ks[0] as u64 + head * ks[1] as u64) * bytes,
                        v: va + (row * vs[0] as u64 + head * vs[1] as u64) * bytes,
                        len,
                        skip: skip[i / kv_heads],
                    }
                }));
            }
        }
    }
    decode_launch(q, &heads, scale)
}

/// Where one (row, KV head)'s cache is: key and value addresses, entries, leading entries skipped.
struct CacheHead {
    k: u64,
    v: u64,
    len: usize,
    skip: usize,
}

/// One decode-attention launch per [`MAX_TABLE`] caches, then the merge of the splits.
fn decode_launch(q: &Tensor, heads: &[CacheHead], scale: f32) -> Result<Tensor> {
    let (batch, qheads, d) = q.dims3()?;
    let n = heads.len();
    let kv_heads = n / batch;
    if !crate::attention_decode_fused(q.device(), d, qheads, kv_heads) {
        candle_core::bail!(
            "attention_decode: no kernel for head_dim {d} with {qheads} query heads over {kv_heads} KV heads"
        );
    }
    let group = qheads / kv_heads;
    let dev = device(q)?;
    let dtype = q.dtype();
    let sfx = suffix(dtype)?;
    let q = q.contiguous()?;
    let qa = address(&q)?;
    if qa % 16 != 0 || heads.iter().any(|h| h.k % 16 != 0 || h.v % 16 != 0) {
        candle_core::bail!("attention_decode: caches and queries must be 16-byte aligned");
    }
    let longest = heads.iter().map(|h| h.len - h.skip).max().unwrap_or(0);
    let wanted_splits = (multiprocessors(&dev) * DECODE_BLOCKS_PER_SM).div_ceil(n).max(1);
    let chunk = longest.div_ceil(wanted_splits).max(MIN_CHUNK).next_multiple_of(32);
    let splits = longest.div_ceil(chunk).max(1);

    let out = Out::new(&dev, dtype, batch * qheads * d)?;
    let partial = if splits > 1 {
        Some((
            Out::new(&dev, DType::F32, batch * qheads * splits * d)?,
            Out::new(&dev, DType::F32, batch * qheads * splits * 2)?,
        ))
    } else {
        None
    };
    let (acc_a, ml_a) = partial.as_ref().map_or((0, 0), |(a, m)| (a.address, m.address));
    let name = format!("attn_decode_{sfx}_d{d}_g{group}");
    let (heads_i, kvh_i, splits_i, chunk_i) = (qheads as i32, kv_heads as i32, splits as i32, chunk as i32);
    for first in (0..n).step_by(MAX_TABLE) {
        let count = (n - first).min(MAX_TABLE);
        let mut table = HeadTable { k: [0; MAX_TABLE], v: [0; MAX_TABLE], len: [0; MAX_TABLE], skip: [0; MAX_TABLE] };
        for (j, h) in heads[first..first + count].iter().enumerate() {
            table.k[j] = h.k;
            table.v[j] = h.v;
            table.len[j] = h.len as i32;
            table.skip[j] = h.skip as i32;
        }
        let first_i = first as i32;
        let cfg =
            LaunchConfig { grid_dim: (splits as u32, count as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        launch!(
            &dev,
            &name,
            cfg,
            &table,
            &first_i,
            &qa,
            &out.address,
            &acc_a,
            &ml_a,
            &heads_i,
            &kvh_i,
            &splits_i,
            &chunk_i,
            &scale
        );
    }
    if splits > 1 {
        let cfg = LaunchConfig {
            grid_dim: ((batch * qheads) as u32, 1, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let d_i = d as i32;
        launch!(&dev, &format!("attn_decode_combine_{sfx}"), cfg, &acc_a, &ml_a, &out.address, &splits_i, &d_i);
    }
    // The partial buffers are freed here, stream-ordered after the kernels that use them.
    drop(partial);
    Ok(out.tensor((batch, qheads, d)))
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
    let dtype = q.dtype();
    if !crate::attention_prefill_fused(q.device(), dtype, d) || keys.dtype() != dtype || values.dtype() != dtype {
        candle_core::bail!("attention_prefill: no kernel for {dtype:?} with head_dim {d}");
    }
    for t in [keys, values] {
        if t.stride()[2..] != [d, 1] && n > 1 {
            candle_core::bail!("attention_prefill: cache rows must be contiguous (strides {:?})", t.stride());
        }
    }
    let dev = device(q)?;
    let q = q.contiguous()?;
    // The kernel reads int32; the bits travel in a u32 tensor (padding's -1 as 0xffff_ffff).
    let to_i32 = |rows: &[&[i64]]| -> Result<Tensor> {
        let flat: Vec<u32> =
            rows.iter().flat_map(|r| r.iter().map(|&p| p.clamp(-1, i32::MAX as i64) as i32 as u32)).collect();
        Tensor::from_vec(flat, rows.len() * rows.first().map_or(0, |r| r.len()), q.device())
    };
    let (qpos, epos) = (to_i32(query_positions)?, to_i32(entry_positions)?);
    let (qa, ka, va) = (address(&q)?, address(keys)?, address(values)?);
    let (qpa, epa) = (address_u32(&qpos)?, address_u32(&epos)?);
    let out = Out::new(&dev, dtype, q.elem_count())?;
    let (ks, vs) = (keys.stride(), values.stride());
    let (krs, khs, vrs, vhs) = (ks[0] as i64, ks[1] as i64, vs[0] as i64, vs[1] as i64);
    let (heads_i, kvh_i, sq_i, n_i) = (heads as i32, kv_heads as i32, sq as i32, n as i32);
    let window_i = window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let cfg = LaunchConfig {
        grid_dim: (sq.div_ceil(64) as u32, heads as u32, batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(
        &dev,
        &format!("flash_prefill_{}_d{d}", suffix(dtype)?),
        cfg,
        &qa,
        &ka,
        &va,
        &krs,
        &khs,
        &vrs,
        &vhs,
        &qpa,
        &epa,
        &out.address,
        &heads_i,
        &kvh_i,
        &sq_i,
        &n_i,
        &window_i,
        &scale_log2
    );
    Ok(out.tensor((batch, heads, sq, d)))
}

pub fn top_candidates(logits: &Tensor, k: usize, temperature: f32) -> Result<Vec<Option<Candidates>>> {
    let (rows, vocab) = logits.dims2()?;
    let dev = device(logits)?;
    let logits = logits.contiguous()?;
    let cap = CANDIDATE_CAP;
    let values = Out::new(&dev, DType::F32, rows * cap)?;
    let ids = Out::new(&dev, DType::U32, rows * cap)?;
    let counts = Out::new(&dev, DType::U32, rows)?;
    let lse = Out::new(&dev, DType::F64, rows)?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let (la, vocab_i, k_i, cap_i) = (address(&logits)?, vocab as i32, k.min(vocab) as i32, cap as i32);
    let name = format!("top_candidates_{}", suffix(logits.dtype())?);
    launch!(
        &dev,
        &name,
        cfg,
        &la,
        &vocab_i,
        &k_i,
        &temperature,
        &cap_i,
        &values.address,
        &ids.address,
        &counts.address,
        &lse.address
    );
    let counts: Vec<u32> = counts.tensor(rows).to_vec1()?;
    let lse: Vec<f64> = lse.tensor(rows).to_vec1()?;
    let values: Vec<Vec<f32>> = values.tensor((rows, cap)).to_vec2()?;
    let ids: Vec<Vec<u32>> = ids.tensor((rows, cap)).to_vec2()?;
    Ok((0..rows)
        .map(|r| {
            let n = counts[r] as usize;
            (n <= cap).then(|| {
                // Written in arrival order; callers get them by token id.
                let mut pairs: Vec<(u32, f32)> =
                    ids[r][..n].iter().copied().zip(values[r][..n].iter().copied()).collect();
                pairs.sort_unstable_by_key(|p| p.0);
                let (ids, logits) = pairs.into_iter().unzip();
                Candidates { ids, logits, lse: lse[r] }
            })
        })
        .collect())
}

fn address_u32(t: &Tensor) -> Result<u64> {
    let dev = device(t)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else { candle_core::bail!("pare-kernels: tensor storage is not CUDA") };
    Ok(slice_address(cs.as_cuda_slice::<u32>()?, &dev) + (layout.start_offset() * 4) as u64)
}

fn default_pool(dev: &CudaDevice) -> Option<sys::CUmemoryPool> {
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().ok()?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: a plain query on a live context; `pool` is a valid out-pointer.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().ok()?;
    Some(pool)
}

/// Memory figures of a CUDA device; None on other devices or if the driver will not say.
pub fn gpu_memory(device: &Device) -> Option<GpuMemory> {
    let Device::Cuda(dev) = device else { return None };
    let pool = default_pool(dev)?;
    let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
    let mut peak = 0u64;
    // SAFETY: USED_MEM_HIGH is a u64 attribute; `peak` is a valid out-pointer.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut peak as *mut u64).cast(),
        )
    }
    .result()
    .ok()?;
    Some(GpuMemory { used: (total - free) as u64, total: total as u64, peak })
}

/// Start a new peak-memory measurement (the high mark drops to what is in use now).
pub fn reset_gpu_memory_peak(device: &Device) {
    let Device::Cuda(dev) = device else { return };
    if let Some(pool) = default_pool(dev) {
        let mut zero = 0u64;
        // SAFETY: setting USED_MEM_HIGH to zero is the documented way to reset it.
        let _ = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
    }
}

pub fn top_k_keep(scores: &Tensor, k: usize, buffer: crate::BufferRows) -> Result<(Tensor, Tensor)> {
    let (rows, n) = scores.dims2()?;
    let dev = device(scores)?;
    let scores = scores.to_dtype(DType::F32)?.contiguous()?;
    let idx = Out::new(&dev, DType::U32, rows * k)?;
    let buffer_rows = Out::new(&dev, DType::U32, rows * k)?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let (sa, n_i, k_i) = (address(&scores)?, n as i32, k as i32);
    let (first, stride, per_head) = (buffer.first as u32, buffer.stride as u32, buffer.per_head as u32);
    launch!(&dev, "top_k_keep", cfg, &sa, &n_i, &k_i, &first, &stride, &per_head, &idx.address, &buffer_rows.address);
    Ok((idx.tensor((rows, k)), buffer_rows.tensor((rows, k))))
}
