//! The building blocks a decoder layer is made of: linear maps, norms, the MLP.

use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, DType, Module, Storage, Tensor, D};
use pare_kernels::quant::{self, QuantMatrix};

use crate::config::Activation;
use crate::error::Result;

/// From this many rows on, a quantized layer runs as a dense GEMM (see `forward`).
const DENSE_ROWS: usize = 32;
/// From this many rows on, pare's quantized layers run as a dense GEMM (see `native_matmul`).
/// Alone the break-even is near 50 rows; in a shared forward (`Linear::forward_segments`) one
/// dequantization serves every sequence on the GEMM path, so prompts of 32 tokens and more take
/// it: waiting prompts (63 tokens on average in the ShareGPT load) then share the faster GEMM.
const NATIVE_DENSE_ROWS: usize = 32;

/// y = x Wᵀ + b, with W dense (out, in) or kept quantized (`--dtype q`), or such a map with a
/// LoRA adapter beside it.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense { weight: Tensor, bias: Option<Tensor> },
    Quantized { weight: QuantWeight, out_features: usize, in_features: usize, bias: Option<Tensor> },
    Lora(Box<LoraLinear>),
}

/// y = base(x) + scale · (x Aᵀ) Bᵀ: a LoRA adapter kept apart from its base map (HF peft's
/// unmerged `LoraLayer`), so a quantized base stays quantized.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: Linear,
    /// (rank, in)
    pub a: Tensor,
    /// (out, rank)
    pub b: Tensor,
    /// lora_alpha / rank
    pub scale: f64,
}

impl LoraLinear {
    /// Checks A and B against the base map's shape and puts them on its device, in f32 (the
    /// adapter is small; its product is added to the base output in that output's dtype).
    pub fn new(base: Linear, a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        let (rank, input) = a.dims2()?;
        let (output, rank_b) = b.dims2()?;
        if input != base.in_features() || output != base.out_features() || rank != rank_b || rank == 0 {
            return Err(crate::ModelError::input(format!(
                "LoRA adapter of shapes A {:?}, B {:?} does not fit a {}×{} map",
                a.dims(),
                b.dims(),
                base.out_features(),
                base.in_features()
            )));
        }
        let device = base.device();
        Ok(LoraLinear {
            a: a.to_dtype(DType::F32)?.to_device(&device)?,
            b: b.to_dtype(DType::F32)?.to_device(&device)?,
            base,
            scale,
        })
    }

    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / dims[dims.len() - 1];
        let x2 = x.reshape((rows, dims[dims.len() - 1]))?.to_dtype(DType::F32)?;
        let y = (x2.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.b.dim(0)?;
        Ok(y.reshape(out_dims)?.to_dtype(x.dtype())?)
    }
}

/// A quantized weight: GGUF blocks under pare's CPU kernels, or candle's QMatMul (on CUDA, and
/// for block types pare has no CPU kernel for).
#[derive(Debug, Clone)]
pub enum QuantWeight {
    Native(QuantMatrix),
    Candle(QMatMul),
}

/// `x · mᵀ`: x (…, in) → (…, out), f32. A few rows (decode) run pare's quantized row kernels,
/// which read the compact blocks once; from [`NATIVE_DENSE_ROWS`] rows on (prefill) a GEMM: pare's
/// 8-bit one where the CPU has AVX-512 VNNI (2.4× the f32 GEMM's multiply-adds per CPU-second at
/// 512×896×4864, decoding included), else the blocks dequantized for an f32 GEMM, which on AVX2
/// alone does twice the multiply-adds per cycle of the 8-bit kernels (36 against 17 GMAC per
/// CPU-second at 512×576×1536; `cargo run --release -p pare-kernels --example quant_matmul`).
fn native_matmul(m: &QuantMatrix, x: &Tensor) -> Result<Tensor> {
    if x.elem_count() / m.cols().max(1) < NATIVE_DENSE_ROWS {
        return native_kernel(m, x);
    }
    if quant::gemm_is_fast() {
        return native_with(m, x, QuantMatrix::gemm);
    }
    native_dense(m, x.device())?.forward(&x.to_dtype(DType::F32)?)
}

/// The dense map the f32 GEMM path multiplies by: the blocks dequantized to f32.
fn native_dense(m: &QuantMatrix, device: &candle_core::Device) -> Result<Linear> {
    let weight = Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), device)?;
    Ok(Linear::Dense { weight, bias: None })
}

/// `x · mᵀ` through the 8-bit row kernels, whatever the row count. Each row is quantized and
/// multiplied on its own, so a row's result does not depend on the other rows of the call.
fn native_kernel(m: &QuantMatrix, x: &Tensor) -> Result<Tensor> {
    native_with(m, x, QuantMatrix::matmul)
}

/// `x · mᵀ` by one of [`QuantMatrix`]'s products on `x`'s rows as f32.
fn native_with(
    m: &QuantMatrix,
    x: &Tensor,
    product: impl Fn(&QuantMatrix, &[f32]) -> std::result::Result<Vec<f32>, quant::QuantError>,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            return Err(candle_core::Error::Msg("native quantized matmul: input not on the CPU".into()).into());
        };
        let start = layout.start_offset();
        product(m, &data[start..start + x.elem_count()]).map_err(|e| candle_core::Error::Msg(e.to_string()))?
    };
    *dims.last_mut().expect("rank ≥ 1") = m.rows();
    Ok(Tensor::from_vec(y, dims, x.device())?)
}

/// A quantized weight's product through its kernels, whatever the row count (no bias).
fn kernel_forward(weight: &QuantWeight, x: &Tensor) -> Result<Tensor> {
    match weight {
        QuantWeight::Native(m) => native_kernel(m, x),
        QuantWeight::Candle(w) => Ok(w.forward(x)?),
    }
}

/// The dense map a quantized weight's GEMM path multiplies by (no bias).
fn dequantized(weight: &QuantWeight, device: &candle_core::Device) -> Result<Linear> {
    let weight = match weight {
        QuantWeight::Native(m) => return native_dense(m, device),
        QuantWeight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
        QuantWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.clone(),
    };
    Ok(Linear::Dense { weight, bias: None })
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self {
            Linear::Dense { weight, .. } => {
                let dims = x.dims().to_vec();
                let in_features = dims[dims.len() - 1];
                let rows = x.elem_count() / in_features;
                let x2 = x.reshape((rows, in_features))?;
                // Decode on a GPU: a few rows, so the product is a pass over the weight; a kernel
                // made for that streams it faster than cuBLAS's GEMM for skinny shapes.
                let y = if x.device().is_cuda()
                    && weight.dtype() == x.dtype()
                    && pare_kernels::gemv_fused(x.dtype(), rows, in_features)
                {
                    pare_kernels::gemv(&x2, weight)?
                } else {
                    x2.matmul(&weight.t()?)?
                };
                let mut out_dims = dims;
                *out_dims.last_mut().expect("rank ≥ 1") = weight.dim(0)?;
                y.reshape(out_dims)?
            }
            Linear::Quantized { weight: QuantWeight::Native(m), .. } => native_matmul(m, x)?,
            // Many rows (prefill): a dense GEMM on the dequantized weight beats candle's
            // row-by-row quantized dot products; one row (decode) reads the compact blocks.
            Linear::Quantized { weight: w @ QuantWeight::Candle(QMatMul::QTensor(_)), .. }
                if x.elem_count() / x.dim(D::Minus1)? >= DENSE_ROWS =>
            {
                dequantized(w, x.device())?.forward(x)?
            }
            Linear::Quantized { weight: QuantWeight::Candle(w), .. } => w.forward(x)?,
            // The base adds its own bias.
            Linear::Lora(l) => return Ok((l.base.forward(x)? + l.delta(x)?)?),
        };
        match self.bias() {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// [`Self::forward`] over the rows of several sequences at once, `segments[i]` rows each, in
    /// order. A quantized map's path depends on its row count (8-bit row kernels for a few rows,
    /// a GEMM for many; they round differently), so each sequence's rows take the path they would
    /// take alone: what a sequence gets does not depend on what shares the call. Consecutive
    /// sequences on a row-independent path (the row kernels, pare's 8-bit GEMM) share one call;
    /// on the f32 GEMM path they share one dequantization, each its own GEMM of the shape it has
    /// alone.
    pub fn forward_segments(&self, x: &Tensor, segments: &[usize]) -> Result<Tensor> {
        let (weight, threshold) = match self {
            Linear::Quantized { weight: w @ QuantWeight::Native(_), .. } => (w, NATIVE_DENSE_ROWS),
            Linear::Quantized { weight: w @ QuantWeight::Candle(QMatMul::QTensor(_)), .. } => (w, DENSE_ROWS),
            // The adapter's product is row by row; the base map keeps each sequence's path.
            Linear::Lora(l) => return Ok((l.base.forward_segments(x, segments)? + l.delta(x)?)?),
            // One product over all rows: a dense map has one path.
            _ => return self.forward(x),
        };
        if segments.len() <= 1 {
            return self.forward(x);
        }
        let in_features = x.dim(D::Minus1)?;
        let rows = x.elem_count() / in_features.max(1);
        if segments.iter().sum::<usize>() != rows {
            return Err(crate::ModelError::input(format!(
                "segments of {} rows for an input of {rows}",
                segments.iter().sum::<usize>()
            )));
        }
        let gemm = match weight {
            QuantWeight::Native(m) if quant::gemm_is_fast() => Some(m),
            _ => None,
        };
        // Runs of consecutive segments that one call may serve: (many rows?, first row, rows).
        let mut runs: Vec<(bool, usize, usize)> = Vec::new();
        let mut start = 0;
        for &n in segments {
            let many = n >= threshold;
            match runs.last_mut() {
                Some((last_many, _, rows)) if *last_many == many && (!many || gemm.is_some()) => *rows += n,
                _ => runs.push((many, start, n)),
            }
            start += n;
        }
        let x2 = x.reshape((rows, in_features))?;
        let mut dense: Option<Linear> = None;
        let mut outs = Vec::with_capacity(runs.len());
        for (many, start, n) in runs {
            let part = x2.narrow(0, start, n)?;
            outs.push(match (many, gemm) {
                (false, _) => kernel_forward(weight, &part)?,
                (true, Some(m)) => native_with(m, &part, QuantMatrix::gemm)?,
                (true, None) => {
                    let dense = match &mut dense {
                        Some(d) => d,
                        None => dense.insert(dequantized(weight, x.device())?),
                    };
                    dense.forward(&part.to_dtype(DType::F32)?)?
                }
            });
        }
        let y = Tensor::cat(&outs, 0)?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = self.out_features();
        let y = y.reshape(dims)?;
        match self.bias() {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => bias.as_ref(),
            Linear::Lora(l) => l.base.bias(),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.dims()[0],
            Linear::Quantized { out_features, .. } => *out_features,
            Linear::Lora(l) => l.base.out_features(),
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.dims()[1],
            Linear::Quantized { in_features, .. } => *in_features,
            Linear::Lora(l) => l.base.in_features(),
        }
    }

    fn device(&self) -> candle_core::Device {
        match self {
            Linear::Dense { weight, .. } => weight.device().clone(),
            Linear::Quantized { weight: QuantWeight::Candle(QMatMul::QTensor(q)), .. } => q.device(),
            Linear::Quantized { weight: QuantWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)), .. } => {
                t.device().clone()
            }
            Linear::Quantized { weight: QuantWeight::Native(_), .. } => candle_core::Device::Cpu,
            Linear::Lora(l) => l.base.device(),
        }
    }

    /// The weight as a dense (out, in) tensor in `dtype` (dequantizing if needed; with a LoRA
    /// adapter, merged: W + scale · B A, as peft's `merge_and_unload`).
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Linear::Lora(l) => {
                let base = l.base.dense_weight(DType::F32)?;
                let delta = (l.b.matmul(&l.a)? * l.scale)?;
                Ok((base + delta)?.to_dtype(dtype)?)
            }
            Linear::Dense { weight, .. } => Ok(weight.to_dtype(dtype)?),
            Linear::Quantized { weight, .. } => match weight {
                QuantWeight::Native(m) => {
                    Ok(Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), &candle_core::Device::Cpu)?
                        .to_dtype(dtype)?)
                }
                QuantWeight::Candle(QMatMul::QTensor(q)) => Ok(q.dequantize(&q.device())?.to_dtype(dtype)?),
                QuantWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Ok(t.to_dtype(dtype)?),
            },
        }
    }

    pub fn param_count(&self) -> usize {
        self.out_features() * self.in_features() + self.bias().map_or(0, |b| b.elem_count())
    }

    /// A dense map in `dtype` with only these output channels (rows of the weight, and the bias).
    pub fn keep_outputs(&self, ids: &[usize], dtype: DType) -> Result<Linear> {
        let weight = self.dense_weight(dtype)?;
        let idx = index_tensor(ids, weight.device())?;
        Ok(Linear::Dense {
            weight: weight.index_select(&idx, 0)?.contiguous()?,
            bias: self.bias().map(|b| b.index_select(&idx.to_device(b.device())?, 0)).transpose()?,
        })
    }

    /// A dense map in `dtype` with only these input channels (columns of the weight; the bias,
    /// one per output, stays).
    pub fn keep_inputs(&self, ids: &[usize], dtype: DType) -> Result<Linear> {
        let weight = self.dense_weight(dtype)?;
        let idx = index_tensor(ids, weight.device())?;
        Ok(Linear::Dense { weight: weight.index_select(&idx, 1)?.contiguous()?, bias: self.bias().cloned() })
    }

    /// The same map with its tensors on `device` (a rank's GPU). Dense and LoRA maps only:
    /// quantized blocks stay where they were loaded.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Linear> {
        let bias = self.bias().map(|b| b.to_device(device)).transpose()?;
        Ok(match self {
            Linear::Dense { weight, .. } => Linear::Dense { weight: weight.to_device(device)?, bias },
            Linear::Lora(l) => Linear::Lora(Box::new(LoraLinear {
                base: l.base.to_device(device)?,
                a: l.a.to_device(device)?,
                b: l.b.to_device(device)?,
                scale: l.scale,
            })),
            Linear::Quantized { .. } => {
                return Err(crate::ModelError::input("a quantized map is used where it was loaded"));
            }
        })
    }

    /// Remove the bias (a row-parallel map's bias is added by one rank only).
    pub fn drop_bias(&mut self) {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => *bias = None,
            Linear::Lora(l) => l.base.drop_bias(),
        }
    }

    /// Bytes the weights occupy as stored (quantized blocks count as their packed size).
    pub fn storage_bytes(&self) -> usize {
        let bias = self.bias().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
        match self {
            Linear::Dense { weight, .. } => bias + weight.elem_count() * weight.dtype().size_in_bytes(),
            Linear::Quantized { weight, .. } => {
                bias + match weight {
                    QuantWeight::Native(m) => m.data().len(),
                    QuantWeight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
                    QuantWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                        t.elem_count() * t.dtype().size_in_bytes()
                    }
                }
            }
            Linear::Lora(l) => l.base.storage_bytes() + (l.a.elem_count() + l.b.elem_count()) * 4,
        }
    }
}

fn index_tensor(ids: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), ids.len(), device)?)
}

/// Whether x holds few enough rows for a decode-style pass over the weights (the GEMV regime).
pub fn few_rows(x: &Tensor) -> Result<bool> {
    let width = x.dim(D::Minus1)?;
    Ok(x.elem_count() / width.max(1) <= 8)
}

/// Stack maps that read the same input into one (q, k, v; gate, up): one pass over the
/// weights and one launch (or one activation quantization and pool dispatch) per decode step
/// instead of several. Returns the fused map and the parts as row views of its weight, so no
/// weight is held twice. None unless all parts are dense in one dtype, or all in pare's
/// quantized blocks of one type.
pub fn fuse(parts: &[&Linear]) -> Result<Option<(Linear, Vec<Linear>)>> {
    let native: Vec<&QuantMatrix> = parts
        .iter()
        .filter_map(|p| match p {
            Linear::Quantized { weight: QuantWeight::Native(m), .. } => Some(m),
            _ => None,
        })
        .collect();
    if native.len() == parts.len() {
        return fuse_native(parts, &native);
    }
    let mut weights = Vec::with_capacity(parts.len());
    for p in parts {
        match p {
            Linear::Dense { weight, .. } => weights.push(weight.clone()),
            Linear::Quantized { .. } | Linear::Lora(_) => return Ok(None),
        }
    }
    if weights.windows(2).any(|w| w[0].dtype() != w[1].dtype() || w[0].dim(1).ok() != w[1].dim(1).ok()) {
        return Ok(None);
    }
    let weight = Tensor::cat(&weights, 0)?;
    let bias = stacked_bias(parts, weight.dtype(), weight.device())?;
    let mut views = Vec::with_capacity(parts.len());
    let mut start = 0;
    for (p, w) in parts.iter().zip(&weights) {
        let n = w.dim(0)?;
        let view_bias = match (&bias, p.bias()) {
            (Some(b), Some(_)) => Some(b.narrow(0, start, n)?),
            _ => None,
        };
        views.push(Linear::Dense { weight: weight.narrow(0, start, n)?, bias: view_bias });
        start += n;
    }
    Ok(Some((Linear::Dense { weight, bias }, views)))
}

/// The parts' biases stacked in `dtype` on `device`, a part without one getting zeros, so the
/// fused map adds one bias vector; None when no part has a bias.
fn stacked_bias(parts: &[&Linear], dtype: DType, device: &candle_core::Device) -> Result<Option<Tensor>> {
    if parts.iter().all(|p| p.bias().is_none()) {
        return Ok(None);
    }
    let biases = parts
        .iter()
        .map(|p| match p.bias() {
            Some(b) => Ok(b.to_dtype(dtype)?.to_device(device)?),
            None => Ok(Tensor::zeros(p.out_features(), dtype, device)?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Tensor::cat(&biases, 0)?))
}

fn fuse_native(parts: &[&Linear], mats: &[&QuantMatrix]) -> Result<Option<(Linear, Vec<Linear>)>> {
    let Some(stacked) = QuantMatrix::stack(mats) else { return Ok(None) };
    let bias = stacked_bias(parts, DType::F32, &candle_core::Device::Cpu)?;
    let mut views = Vec::with_capacity(parts.len());
    let mut start = 0;
    for p in parts {
        let n = p.out_features();
        let view = stacked.narrow_rows(start, n).expect("parts fill the stack");
        let bias = match (&bias, p.bias()) {
            (Some(b), Some(_)) => Some(b.narrow(0, start, n)?),
            _ => None,
        };
        views.push(Linear::Quantized {
            weight: QuantWeight::Native(view),
            out_features: n,
            in_features: p.in_features(),
            bias,
        });
        start += n;
    }
    let fused = Linear::Quantized {
        out_features: stacked.rows(),
        in_features: stacked.cols(),
        weight: QuantWeight::Native(stacked),
        bias,
    };
    Ok(Some((fused, views)))
}

/// RMSNorm (Llama family) or LayerNorm with bias (GPT-NeoX).
#[derive(Debug, Clone)]
pub enum Norm {
    Rms { weight: Tensor, eps: f32 },
    Layer { weight: Tensor, bias: Tensor, eps: f32 },
}

impl Norm {
    /// The same norm with its tensors on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Norm> {
        Ok(match self {
            Norm::Rms { weight, eps } => Norm::Rms { weight: weight.to_device(device)?, eps: *eps },
            Norm::Layer { weight, bias, eps } => {
                Norm::Layer { weight: weight.to_device(device)?, bias: bias.to_device(device)?, eps: *eps }
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Norm::Rms { weight, eps } = self {
            if x.device().is_cuda() && x.dtype() == weight.dtype() {
                // One fused kernel instead of five launches (casts, norm, scale).
                return Ok(pare_kernels::rms_norm(x, weight, *eps)?);
            }
        }
        // HF normalizes in float32 whatever the activation dtype; so do we.
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let y = match self {
            Norm::Rms { weight, eps } if dtype == DType::F32 => candle_nn::ops::rms_norm(&xf, weight, *eps)?,
            Norm::Rms { weight, eps } => {
                let ones = Tensor::ones(weight.dims(), DType::F32, x.device())?;
                candle_nn::ops::rms_norm(&xf, &ones, *eps)?.to_dtype(dtype)?.broadcast_mul(weight)?
            }
            Norm::Layer { weight, bias, eps } => {
                let mean = xf.mean_keepdim(D::Minus1)?;
                let centered = xf.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centered.broadcast_div(&(var + *eps as f64)?.sqrt()?)?;
                normed
                    .broadcast_mul(&weight.to_dtype(DType::F32)?)?
                    .broadcast_add(&bias.to_dtype(DType::F32)?)?
                    .to_dtype(dtype)?
            }
        };
        Ok(y)
    }

    /// `h = x + residual`, then the norm of h: returns (h, norm(h)). On CUDA an RMSNorm does both
    /// in one kernel, reading h once (a decoder layer's residual add followed by its next norm).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        if let Norm::Rms { weight, eps } = self {
            if x.device().is_cuda() && x.dtype() == weight.dtype() && residual.dtype() == x.dtype() {
                return Ok(pare_kernels::add_rms_norm(x, residual, weight, *eps)?);
            }
        }
        let h = (x + residual)?;
        let normed = self.forward(&h)?;
        Ok((h, normed))
    }

    pub fn weight(&self) -> &Tensor {
        match self {
            Norm::Rms { weight, .. } | Norm::Layer { weight, .. } => weight,
        }
    }

    pub fn param_count(&self) -> usize {
        match self {
            Norm::Rms { weight, .. } => weight.elem_count(),
            Norm::Layer { weight, bias, .. } => weight.elem_count() + bias.elem_count(),
        }
    }
}

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Silu => candle_nn::ops::silu(x)?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
    })
}

/// The feed-forward block: SwiGLU `down(act(gate x) ⊙ up x)` or plain `down(act(up x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate: Option<Linear>,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) activation: Activation,
    /// gate and up stacked (see [`fuse`]); gate and up are then views of its weight.
    pub(crate) gate_up: Option<Linear>,
}

impl Mlp {
    /// x holds the rows of one or more sequences, `segments[i]` rows each (see
    /// [`Linear::forward_segments`]).
    pub fn forward(&self, x: &Tensor, segments: &[usize]) -> Result<Tensor> {
        // Stacked only for a few rows (decode): over many rows the halves of the stacked output
        // would need strided copies, and GEMMs of either shape run at the same rate.
        if let (Some(gate_up), true, true) = (&self.gate_up, self.activation == Activation::Silu, few_rows(x)?) {
            let width = self.width();
            let y = gate_up.forward_segments(x, segments)?;
            let hidden = crate::ops::swiglu(&y.narrow(D::Minus1, 0, width)?, &y.narrow(D::Minus1, width, width)?)?;
            return self.down.forward_segments(&hidden, segments);
        }
        let up = self.up.forward_segments(x, segments)?;
        let hidden = match &self.gate {
            Some(gate) if self.activation == Activation::Silu => {
                crate::ops::swiglu(&gate.forward_segments(x, segments)?, &up)?
            }
            Some(gate) => (activate(&gate.forward_segments(x, segments)?, self.activation)? * up)?,
            None => activate(&up, self.activation)?,
        };
        self.down.forward_segments(&hidden, segments)
    }

    /// Stack gate and up into one map (a SwiGLU MLP with dense weights; otherwise unchanged).
    pub fn fuse_gate_up(&mut self) -> Result<()> {
        let Some(gate) = &self.gate else { return Ok(()) };
        if let Some((fused, views)) = fuse(&[gate, &self.up])? {
            let [gate, up]: [Linear; 2] = views.try_into().expect("two parts");
            (self.gate, self.up, self.gate_up) = (Some(gate), up, Some(fused));
        }
        Ok(())
    }

    /// The intermediate width (differs per layer after structured pruning).
    pub fn gate(&self) -> Option<&Linear> {
        self.gate.as_ref()
    }

    pub fn up(&self) -> &Linear {
        &self.up
    }

    pub fn down(&self) -> &Linear {
        &self.down
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Whether gate and up run as one stacked map.
    pub fn is_fused(&self) -> bool {
        self.gate_up.is_some()
    }

    /// Keep only these intermediate channels (rows of gate and up, columns of down); the
    /// stacked gate/up map, if any, is dropped (it would hold the removed rows).
    pub fn keep_channels(&mut self, channels: &[usize], dtype: DType) -> Result<()> {
        self.gate_up = None;
        if let Some(gate) = &self.gate {
            self.gate = Some(gate.keep_outputs(channels, dtype)?);
        }
        self.up = self.up.keep_outputs(channels, dtype)?;
        self.down = self.down.keep_inputs(channels, dtype)?;
        Ok(())
    }

    pub fn width(&self) -> usize {
        self.up.out_features()
    }

    pub fn param_count(&self) -> usize {
        self.gate.as_ref().map_or(0, Linear::param_count) + self.up.param_count() + self.down.param_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The CUDA kernels are tested against pare-kernels' CPU references; these tie the references
    /// to the model's own CPU paths, in f32 and with bf16 rounding.
    #[test]
    fn kernel_references_match_the_cpu_paths() {
        let x = Tensor::randn(0f32, 2.0, (3, 96), &Device::Cpu).unwrap();
        let r = Tensor::randn(0f32, 2.0, (3, 96), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.2, 96, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (x, r, w) = (x.to_dtype(dtype).unwrap(), r.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
            let norm = Norm::Rms { weight: w.clone(), eps: 1e-5 };
            let (h, y) = norm.forward_residual(&x, &r).unwrap();
            let (h_ref, y_ref) = pare_kernels::cpu::rms_norm(&x, Some(&r), &w, 1e-5).unwrap();
            assert_eq!(max_diff(&h, &h_ref), 0.0);
            // Sums in another order may flip one bf16 rounding: one ulp at |y| ≲ 8.
            let tol = if dtype == DType::F32 { 1e-5 } else { 0.07 };
            assert!(max_diff(&y, &y_ref) <= tol, "{dtype:?}: {}", max_diff(&y, &y_ref));
        }
        let up = Tensor::randn(0f32, 1.0, (3, 96), &Device::Cpu).unwrap();
        let ours = crate::ops::swiglu(&x, &up).unwrap();
        assert!(max_diff(&ours, &pare_kernels::cpu::swiglu(&x, &up).unwrap()) < 1e-5);
    }
}
