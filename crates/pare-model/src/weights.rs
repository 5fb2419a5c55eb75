//! Where weights come from: a GGUF file or an HF safetensors checkpoint, addressed by HF names.
//!
//! GGUF names (`blk.0.attn_q.weight`) are mapped to HF names (`model.layers.0.self_attn.q_proj.weight`),
//! and llama.cpp's reordering of Llama q/k rows (for its interleaved RoPE) is undone, as HF's GGUF
//! loader does, so the rest of pare sees one layout.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use pare_formats::{GgmlType, GgufFile, SafetensorsStore};
use pare_kernels::quant::{QuantMatrix, QuantType};

use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::layers::{Linear, QuantWeight};

pub enum WeightSource {
    Gguf(GgufFile),
    Safetensors(SafetensorsStore),
}

/// How weights are materialized: a float dtype, or (GGUF only) kept in the file's quantized blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    Float(DType),
    Quantized,
}

impl WeightDType {
    /// The dtype activations run in.
    pub fn activation_dtype(self) -> DType {
        match self {
            WeightDType::Float(d) => d,
            WeightDType::Quantized => DType::F32,
        }
    }
}

pub struct Weights<'a> {
    pub source: &'a WeightSource,
    pub config: &'a ModelConfig,
    pub dtype: WeightDType,
    pub device: &'a Device,
}

impl Weights<'_> {
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let arch = self.config.arch;
        let global = match (arch, hf) {
            (Arch::GptNeoX, "gpt_neox.embed_in.weight") | (_, "model.embed_tokens.weight") => Some("token_embd.weight"),
            (Arch::GptNeoX, "gpt_neox.final_layer_norm.weight") | (_, "model.norm.weight") => {
                Some("output_norm.weight")
            }
            (Arch::GptNeoX, "gpt_neox.final_layer_norm.bias") => Some("output_norm.bias"),
            (Arch::GptNeoX, "embed_out.weight") | (_, "lm_head.weight") => Some("output.weight"),
            _ => None,
        };
        if let Some(g) = global {
            return Some(g.to_string());
        }
        let rest = hf.strip_prefix("model.layers.").or_else(|| hf.strip_prefix("gpt_neox.layers."))?;
        let (layer, name) = rest.split_once('.')?;
        let (module, kind) = name.rsplit_once('.')?;
        let g = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" | "attention.dense" => "attn_output",
            "attention.query_key_value" => "attn_qkv",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" | "mlp.dense_h_to_4h" => "ffn_up",
            "mlp.down_proj" | "mlp.dense_4h_to_h" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{g}.{kind}"))
    }

    /// llama.cpp permutes Llama's q/k rows; returns the head count to undo it with, if needed.
    /// Heads are counted from the tensor's own rows, as pruned layers hold fewer.
    fn permuted_heads(&self, hf: &str, rows: usize) -> Option<usize> {
        if !matches!(self.source, WeightSource::Gguf(_)) || self.config.arch != Arch::Llama {
            return None;
        }
        if hf.contains("self_attn.q_proj.") || hf.contains("self_attn.k_proj.") {
            Some(rows / self.config.head_dim.max(1))
        } else {
            None
        }
    }

    pub fn contains(&self, hf: &str) -> bool {
        match self.source {
            WeightSource::Gguf(g) => self.gguf_name(hf).is_some_and(|n| g.tensor_info(&n).is_some()),
            WeightSource::Safetensors(s) => s.contains(hf),
        }
    }

    /// A dense tensor in the activation dtype.
    pub fn tensor(&self, hf: &str) -> Result<Tensor> {
        let dtype = self.dtype.activation_dtype();
        let t = match self.source {
            WeightSource::Gguf(g) => {
                let name = self.gguf_name(hf).ok_or_else(|| ModelError::MissingWeight(hf.to_string()))?;
                if g.tensor_info(&name).is_none() {
                    return Err(ModelError::MissingWeight(format!("{hf} (GGUF {name})")));
                }
                g.dequantize(&name, dtype, self.device)?
            }
            WeightSource::Safetensors(s) => {
                if !s.contains(hf) {
                    return Err(ModelError::MissingWeight(hf.to_string()));
                }
                s.load(hf, dtype, self.device)?
            }
        };
        match self.permuted_heads(hf, t.dims().first().copied().unwrap_or(0)) {
            Some(heads) => {
                let order = unpermute_rows(t.dim(0)?, heads)?;
                let idx =
                    Tensor::from_vec(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), order.len(), self.device)?;
                Ok(t.index_select(&idx, 0)?)
            }
            None => Ok(t),
        }
    }

    /// Check a tensor's shape.
    pub fn expect_shape(&self, name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
        if t.dims() != expected {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                actual: t.dims().to_vec(),
                expected: format!("{expected:?}"),
            });
        }
        Ok(())
    }

    /// A linear layer `{prefix}.weight` (+ `{prefix}.bias` when the checkpoint has one).
    pub fn linear(&self, prefix: &str) -> Result<Linear> {
        let weight_name = format!("{prefix}.weight");
        let bias_name = format!("{prefix}.bias");
        let bias = if self.contains(&bias_name) { Some(self.tensor(&bias_name)?) } else { None };
        match (self.dtype, self.source) {
            (WeightDType::Quantized, WeightSource::Gguf(g)) => {
                let name =
                    self.gguf_name(&weight_name).ok_or_else(|| ModelError::MissingWeight(weight_name.clone()))?;
                let Some(info) = g.tensor_info(&name) else {
                    return Err(ModelError::MissingWeight(format!("{weight_name} (GGUF {name})")));
                };
                if let (Some(ty), true, &[rows, cols]) =
                    (native_type(info.ggml_type), self.device.is_cpu(), info.shape.as_slice())
                {
                    let bytes = g.tensor_bytes(&name)?;
                    let data = match self.permuted_heads(&weight_name, rows) {
                        Some(heads) => permute_rows(bytes, rows, &unpermute_rows(rows, heads)?),
                        None => bytes.to_vec(),
                    };
                    let m = QuantMatrix::new(ty, rows, cols, data)
                        .map_err(|e| ModelError::input(format!("{weight_name} (GGUF {name}): {e}")))?;
                    return Ok(Linear::Quantized {
                        weight: QuantWeight::Native(m),
                        out_features: rows,
                        in_features: cols,
                        bias,
                    });
                }
                let q = g.qtensor(&name, self.device)?;
                let q = match self.permuted_heads(&weight_name, q.shape().dims().first().copied().unwrap_or(0)) {
                    Some(heads) => permute_quantized_rows(&q, &unpermute_rows(q.shape().dims()[0], heads)?)?,
                    None => q,
                };
                let q = with_fast_kernel(q, self.device)?;
                let (out_features, in_features) = q.shape().dims2()?;
                Ok(Linear::Quantized {
                    weight: QuantWeight::Candle(QMatMul::from_qtensor(q)?),
                    out_features,
                    in_features,
                    bias,
                })
            }
            (WeightDType::Quantized, WeightSource::Safetensors(_)) => {
                Err(ModelError::input("`dtype` q keeps GGUF quantization; this checkpoint is not GGUF"))
            }
            (WeightDType::Float(_), _) => {
                let weight = self.tensor(&weight_name)?;
                if weight.rank() != 2 {
                    return Err(ModelError::WeightShape {
                        name: weight_name,
                        actual: weight.dims().to_vec(),
                        expected: "(out, in)".into(),
                    });
                }
                Ok(Linear::Dense { weight, bias })
            }
        }
    }

    /// A linear layer built from a slice of rows of a dense weight (GPT-NeoX's fused QKV).
    pub fn linear_rows(weight: &Tensor, bias: Option<&Tensor>, rows: &Tensor) -> Result<Linear> {
        Ok(Linear::Dense {
            weight: weight.index_select(rows, 0)?.contiguous()?,
            bias: bias.map(|b| b.index_select(rows, 0)).transpose()?,
        })
    }
}

/// Row order that undoes llama.cpp's q/k permutation: new row `h·d + j·d/2 + i` is old row `h·d + 2i + j`.
pub fn unpermute_rows(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::input(format!("cannot undo the q/k permutation: {rows} rows, {heads} heads")));
    }
    let d = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                order.push(h * d + 2 * i + j);
            }
        }
    }
    Ok(order)
}

/// The block type pare's CPU kernels run for a GGUF type, if any.
fn native_type(t: GgmlType) -> Option<QuantType> {
    Some(match t {
        GgmlType::Q4_0 => QuantType::Q4_0,
        GgmlType::Q4_1 => QuantType::Q4_1,
        GgmlType::Q5_0 => QuantType::Q5_0,
        GgmlType::Q5_1 => QuantType::Q5_1,
        GgmlType::Q8_0 => QuantType::Q8_0,
        GgmlType::Q2K => QuantType::Q2K,
        GgmlType::Q3K => QuantType::Q3K,
        GgmlType::Q4K => QuantType::Q4K,
        GgmlType::Q5K => QuantType::Q5K,
        GgmlType::Q6K => QuantType::Q6K,
        _ => return None,
    })
}

/// Reorder the rows of a row-major matrix of `rows` equal byte runs. Quantized blocks run along a
/// row, so rows move whole and the quantized values stay bit-identical.
fn permute_rows(data: &[u8], rows: usize, order: &[usize]) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    out
}

/// [`permute_rows`] on a candle quantized tensor.
fn permute_quantized_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    let out = permute_rows(&q.data()?, rows, order);
    let storage = QStorage::from_data(Cow::Owned(out), &q.device(), q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

/// candle's CPU kernels for Q4_1, Q5_0 and Q5_1 are scalar; re-encode those as Q8_0, whose SIMD
/// kernel is many times faster (8-bit blocks hold the 4/5-bit values almost exactly).
fn with_fast_kernel(q: QTensor, device: &Device) -> Result<QTensor> {
    if !matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1) {
        return Ok(q);
    }
    let dense = q.dequantize(device)?;
    Ok(QTensor::quantize(&dense, GgmlDType::Q8_0)?)
}
