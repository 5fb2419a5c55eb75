//! A differentiable forward pass over a [`Model`]'s dense weights, for gradients (Taylor
//! importance) and for calibration statistics (activation norms, block influence).
//!
//! candle's fused kernels (softmax, rms_norm, rope, pare's own SwiGLU and masked softmax) record
//! no gradient, so this pass composes them from elementary ops that do. It runs one sequence at
//! a time from position 0, with a causal mask: the same mathematics as the engine's prefill
//! (`tests` check the logits agree), in the dtype asked for (f64 for finite-difference checks).
//! Only the tensors asked for become [`Var`]s; everything else is a constant.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::config::Activation;
use crate::error::{ModelError, Result};
use crate::layers::{Linear, Norm};
use crate::rng::SplitMix64;
use crate::Model;

/// Which projection of a decoder layer a weight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Role {
    pub const ALL: [Role; 7] = [Role::Q, Role::K, Role::V, Role::O, Role::Gate, Role::Up, Role::Down];

    pub fn name(self) -> &'static str {
        match self {
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::O => "o",
            Role::Gate => "gate",
            Role::Up => "up",
            Role::Down => "down",
        }
    }
}

/// y = x Wᵀ + b, W either a trainable [`Var`] or a constant, plus a LoRA adapter's
/// scale · (dropout(x) Aᵀ) Bᵀ when one is being trained.
pub struct DiffLinear {
    pub weight: Tensor,
    pub var: Option<Var>,
    pub bias: Option<Tensor>,
    pub lora: Option<DiffLora>,
}

/// A LoRA adapter under training: A (rank, in) and B (out, rank) are variables kept in f32 (f64
/// when the model runs in f64) whatever the model's dtype: the master weights.
pub struct DiffLora {
    pub a: Var,
    pub b: Var,
    /// lora_alpha / rank
    pub scale: f64,
}

/// peft's `lora_dropout` on an adapter's input while training, drawn from a seeded generator so
/// that a run repeats exactly and a resumed run draws what the uninterrupted one would have.
struct Dropout {
    p: f64,
    draws: Draws,
}

/// Where the keep/drop draws come from.
enum Draws {
    /// The host's generator (CPU tensors).
    Host(SplitMix64),
    /// The device's own generator, seeded when the dropout is set: drawn on the host, the masks
    /// (a number per adapter input element, ~150 k a token for SmolLM2) bounded GPU training at
    /// ~1.2 k tokens/s.
    Device,
}

impl Dropout {
    /// x with each element zeroed with probability p and the rest scaled by 1/(1 − p).
    fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        let keep = 1.0 / (1.0 - self.p);
        let mask = match &mut self.draws {
            Draws::Host(rng) => {
                let mask: Vec<f32> =
                    (0..x.elem_count()).map(|_| if rng.next_f64() < self.p { 0.0 } else { keep as f32 }).collect();
                Tensor::from_vec(mask, x.shape(), x.device())?
            }
            Draws::Device => {
                let uniform = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
                (uniform.ge(self.p)?.to_dtype(DType::F32)? * keep)?
            }
        };
        Ok((x * mask.to_dtype(x.dtype())?)?)
    }
}

impl DiffLinear {
    fn new(l: &Linear, dtype: DType, trainable: bool) -> Result<Self> {
        let w = l.dense_weight(dtype)?;
        let (weight, var) = if trainable {
            let var = Var::from_tensor(&w)?;
            (var.as_tensor().clone(), Some(var))
        } else {
            (w, None)
        };
        Ok(DiffLinear { weight, var, bias: l.bias().map(|b| b.to_dtype(dtype)).transpose()?, lora: None })
    }

    /// x: (rows, in) → (rows, out).
    fn forward(&self, x: &Tensor, dropout: &RefCell<Option<Dropout>>) -> Result<Tensor> {
        let y = match self.var {
            Some(_) => x.matmul(&self.weight.t()?)?,
            None => {
                let product = x.detach().matmul(&self.weight.t()?)?;
                x.apply_op2(&product, FrozenProduct { weight: self.weight.clone() })?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let Some(lora) = &self.lora else { return Ok(y) };
        let x = match dropout.borrow_mut().as_mut() {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
        let delta = (x.to_dtype(a.dtype())?.matmul(&a.t()?)?.matmul(&b.t()?)? * lora.scale)?;
        let delta = delta.to_dtype(y.dtype())?;
        Ok((y + delta)?)
    }
}

/// y = x Wᵀ for a constant W, with only x's gradient (dy W) recorded. candle's matmul backward
/// also computes the right operand's gradient, constant or not: a second GEMM as large as the
/// forward and a weight-sized buffer per call, which made LoRA training (every weight frozen)
/// half again as slow. The product is computed outside the graph and passed in; the op returns it.
struct FrozenProduct {
    weight: Tensor,
}

impl FrozenProduct {
    fn check(layout: &candle_core::Layout) -> candle_core::Result<()> {
        if layout.is_contiguous() && layout.start_offset() == 0 {
            Ok(())
        } else {
            Err(candle_core::Error::Msg("frozen product: the product must be a fresh contiguous tensor".into()))
        }
    }
}

impl candle_core::CustomOp2 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(
        &self,
        _x: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        product: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Self::check(layout)?;
        Ok((product.try_clone(layout)?, layout.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _x: &candle_core::cuda::CudaStorage,
        _: &candle_core::Layout,
        product: &candle_core::cuda::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::cuda::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        Self::check(layout)?;
        Ok((product.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _product: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.weight)?), None))
    }
}

/// RMSNorm / LayerNorm from elementary ops, as HF computes them.
pub enum DiffNorm {
    Rms { weight: Tensor, eps: f64 },
    Layer { weight: Tensor, bias: Tensor, eps: f64 },
}

impl DiffNorm {
    fn new(n: &Norm, dtype: DType) -> Result<Self> {
        Ok(match n {
            Norm::Rms { weight, eps } => DiffNorm::Rms { weight: weight.to_dtype(dtype)?, eps: *eps as f64 },
            Norm::Layer { weight, bias, eps } => {
                DiffNorm::Layer { weight: weight.to_dtype(dtype)?, bias: bias.to_dtype(dtype)?, eps: *eps as f64 }
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            DiffNorm::Rms { weight, eps } => {
                let var = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_mul(&(var + *eps)?.sqrt()?.recip()?)?.broadcast_mul(weight)?
            }
            DiffNorm::Layer { weight, bias, eps } => {
                let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered.broadcast_mul(&(var + *eps)?.sqrt()?.recip()?)?.broadcast_mul(weight)?.broadcast_add(bias)?
            }
        })
    }
}

pub struct DiffLayer {
    pub attn_norm: DiffNorm,
    pub q: DiffLinear,
    pub k: DiffLinear,
    pub v: DiffLinear,
    pub o: DiffLinear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub mlp_norm: DiffNorm,
    pub gate: Option<DiffLinear>,
    pub up: DiffLinear,
    pub down: DiffLinear,
}

impl DiffLayer {
    pub fn linear(&self, role: Role) -> Option<&DiffLinear> {
        match role {
            Role::Q => Some(&self.q),
            Role::K => Some(&self.k),
            Role::V => Some(&self.v),
            Role::O => Some(&self.o),
            Role::Gate => self.gate.as_ref(),
            Role::Up => Some(&self.up),
            Role::Down => Some(&self.down),
        }
    }

    fn linear_mut(&mut self, role: Role) -> Option<&mut DiffLinear> {
        match role {
            Role::Q => Some(&mut self.q),
            Role::K => Some(&mut self.k),
            Role::V => Some(&mut self.v),
            Role::O => Some(&mut self.o),
            Role::Gate => self.gate.as_mut(),
            Role::Up => Some(&mut self.up),
            Role::Down => Some(&mut self.down),
        }
    }
}

/// RoPE's cos and sin for positions 0..seq and the additive attention mask over them, shared
/// by the `batch` sequences of a forward call (right-padded to one length).
struct Positions {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    batch: usize,
}

/// What a forward call records besides the logits.
#[derive(Default)]
pub struct Probe {
    /// Record the residual stream entering every layer and leaving the last: `hidden[l]`, (seq, hidden).
    pub record_hidden: bool,
    pub hidden: Vec<Tensor>,
    /// Accumulate Σ x² over tokens, per input feature, of each linear map's input: keyed by
    /// (layer, role) for Q (the input q, k, v share), O, Gate (gate and up share; Up without a
    /// gate) and Down.
    pub record_inputs: bool,
    pub input_sq_sums: HashMap<(usize, Role), Tensor>,
    pub input_tokens: usize,
}

impl Probe {
    fn add_input(&mut self, layer: usize, role: Role, x: &Tensor) -> Result<()> {
        if !self.record_inputs {
            return Ok(());
        }
        let sq = x.detach().to_dtype(DType::F64)?.sqr()?.sum(0)?;
        let entry = self.input_sq_sums.entry((layer, role));
        match entry {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let sum = (e.get() + sq)?;
                e.insert(sum);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(sq);
            }
        }
        Ok(())
    }
}

pub struct DiffModel {
    pub layers: Vec<DiffLayer>,
    embed: Tensor,
    final_norm: DiffNorm,
    lm_head: DiffLinear,
    inv_freq: Vec<f32>,
    activation: Activation,
    parallel_residual: bool,
    max_positions: usize,
    pub dtype: DType,
    device: Device,
    dropout: RefCell<Option<Dropout>>,
}

/// One training sequence: its tokens, and for each token whether it is a label (predicted from
/// the tokens before it; a prompt's tokens are not). `labels[0]` has nothing to be predicted from.
pub struct Sample<'a> {
    pub ids: &'a [u32],
    pub labels: &'a [bool],
}

impl DiffModel {
    /// The model's weights in `dtype`; the tensors for which `trainable(layer, role)` holds
    /// become variables whose gradients [`Tensor::backward`] returns.
    pub fn new(model: &Model, dtype: DType, trainable: impl Fn(usize, Role) -> bool) -> Result<Self> {
        let layers = model
            .blocks
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let a = &b.attn;
                Ok(DiffLayer {
                    attn_norm: DiffNorm::new(&b.attn_norm, dtype)?,
                    q: DiffLinear::new(&a.q, dtype, trainable(l, Role::Q))?,
                    k: DiffLinear::new(&a.k, dtype, trainable(l, Role::K))?,
                    v: DiffLinear::new(&a.v, dtype, trainable(l, Role::V))?,
                    o: DiffLinear::new(&a.o, dtype, trainable(l, Role::O))?,
                    num_heads: a.num_heads,
                    num_kv_heads: a.num_kv_heads,
                    head_dim: a.head_dim,
                    mlp_norm: DiffNorm::new(&b.mlp_norm, dtype)?,
                    gate: b
                        .mlp
                        .gate
                        .as_ref()
                        .map(|g| DiffLinear::new(g, dtype, trainable(l, Role::Gate)))
                        .transpose()?,
                    up: DiffLinear::new(&b.mlp.up, dtype, trainable(l, Role::Up))?,
                    down: DiffLinear::new(&b.mlp.down, dtype, trainable(l, Role::Down))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DiffModel {
            layers,
            embed: model.embed_tokens.to_dtype(dtype)?,
            final_norm: DiffNorm::new(&model.final_norm, dtype)?,
            lm_head: DiffLinear::new(&model.lm_head, dtype, false)?,
            inv_freq: model.rope.inv_freq().to_vec(),
            activation: model.config.activation,
            parallel_residual: model.config.parallel_residual,
            max_positions: model.config.max_position_embeddings,
            dtype,
            device: model.device.clone(),
            dropout: RefCell::new(None),
        })
    }

    /// Train a LoRA adapter beside layer `layer`'s map in `role`, starting from A (rank, in) and
    /// B (out, rank), scaled by `scale` (lora_alpha / rank).
    pub fn attach_lora(&mut self, layer: usize, role: Role, a: &Tensor, b: &Tensor, scale: f64) -> Result<()> {
        let lora_dtype = if self.dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let lin = self.layers.get_mut(layer).and_then(|l| l.linear_mut(role)).ok_or_else(|| {
            ModelError::input(format!("the model has no {} projection in layer {layer}", role.name()))
        })?;
        let (out, input) = lin.weight.dims2()?;
        let (rank, a_in) = a.dims2()?;
        if a_in != input || b.dims() != [out, rank] || rank == 0 {
            return Err(ModelError::input(format!(
                "layer {layer} {}: LoRA A {:?} and B {:?} do not fit a {out}×{input} map",
                role.name(),
                a.dims(),
                b.dims()
            )));
        }
        let var =
            |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(lora_dtype)?.to_device(&self.device)?)?) };
        lin.lora = Some(DiffLora { a: var(a)?, b: var(b)?, scale });
        Ok(())
    }

    /// Every LoRA adapter under training: (layer, role, adapter).
    pub fn loras(&self) -> Vec<(usize, Role, &DiffLora)> {
        self.each_linear(|lin| lin.lora.as_ref())
    }

    /// What `pick` finds in each layer's maps, in layer then [`Role::ALL`] order.
    fn each_linear<'a, T>(&'a self, pick: impl Fn(&'a DiffLinear) -> Option<&'a T>) -> Vec<(usize, Role, &'a T)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for role in Role::ALL {
                if let Some(found) = layer.linear(role).and_then(&pick) {
                    out.push((l, role, found));
                }
            }
        }
        out
    }

    /// Dropout with probability `p` on every LoRA adapter's input from now on, drawn from `seed`
    /// (p = 0: none, as in evaluation).
    pub fn set_lora_dropout(&self, p: f64, seed: u64) -> Result<()> {
        let draws = if p == 0.0 {
            None
        } else if self.device.is_cpu() {
            Some(Draws::Host(SplitMix64::new(seed)))
        } else {
            self.device.set_seed(seed)?;
            Some(Draws::Device)
        };
        *self.dropout.borrow_mut() = draws.map(|draws| Dropout { p, draws });
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every variable, with its layer and role.
    pub fn vars(&self) -> Vec<(usize, Role, &Var)> {
        self.each_linear(|lin| lin.var.as_ref())
    }

    /// cos and sin (seq, rotary_dim) for positions 0..seq, halves repeated (HF's rotate_half form).
    fn cos_sin(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        // f32 angles and cos/sin, as HF computes them whatever the model dtype.
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(seq * 2 * half);
        for p in 0..seq {
            for _ in 0..2 {
                angles.extend(self.inv_freq.iter().map(|&f| p as f32 * f));
            }
        }
        let angles = Tensor::from_vec(angles, (seq, 2 * half), &self.device)?;
        Ok((angles.cos()?.to_dtype(self.dtype)?, angles.sin()?.to_dtype(self.dtype)?))
    }

    /// x (…, seq, d): rotate the first rotary_dim channels.
    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let rot = cos.dim(1)?;
        let xr = x.narrow(D::Minus1, 0, rot)?;
        let (x1, x2) = (xr.narrow(D::Minus1, 0, rot / 2)?, xr.narrow(D::Minus1, rot / 2, rot / 2)?);
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let out = (xr.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
        if rot == d {
            Ok(out)
        } else {
            Ok(Tensor::cat(&[&out, &x.narrow(D::Minus1, rot, d - rot)?], D::Minus1)?)
        }
    }

    /// x: (batch·seq, hidden), the batch's sequences one after another.
    fn attention(&self, l: usize, layer: &DiffLayer, x: &Tensor, at: &Positions, probe: &mut Probe) -> Result<Tensor> {
        let Positions { cos, sin, mask, batch } = at;
        let b = *batch;
        let seq = x.dim(0)? / b;
        let (h, kvh, d) = (layer.num_heads, layer.num_kv_heads, layer.head_dim);
        let g = h / kvh;
        probe.add_input(l, Role::Q, x)?;
        let heads =
            |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, seq, n, d))?.transpose(1, 2)?.contiguous()?) };
        let dropout = &self.dropout;
        let q = Self::rope(&heads(layer.q.forward(x, dropout)?, h)?, cos, sin)?;
        let k = Self::rope(&heads(layer.k.forward(x, dropout)?, kvh)?, cos, sin)?;
        let v = heads(layer.v.forward(x, dropout)?, kvh)?;
        // Query heads h·g..(h+1)·g read KV head h: group them so K and V are used as they are.
        let q = q.reshape((b, kvh, g * seq, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let scores = scores.reshape((b, kvh, g, seq, seq))?.broadcast_add(mask)?;
        // Softmax from elementary ops; the max is a constant shift (no gradient needed through it).
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let out = probs.reshape((b, kvh, g * seq, seq))?.matmul(&v)?; // (b, kvh, g·seq, d)
        let out = out.reshape((b, h, seq, d))?.transpose(1, 2)?.reshape((b * seq, h * d))?;
        probe.add_input(l, Role::O, &out)?;
        layer.o.forward(&out, dropout)
    }

    fn mlp(&self, l: usize, layer: &DiffLayer, x: &Tensor, probe: &mut Probe) -> Result<Tensor> {
        probe.add_input(l, if layer.gate.is_some() { Role::Gate } else { Role::Up }, x)?;
        let dropout = &self.dropout;
        let up = layer.up.forward(x, dropout)?;
        let hidden = match &layer.gate {
            Some(gate) => (crate::layers::activate(&gate.forward(x, dropout)?, self.activation)? * up)?,
            None => crate::layers::activate(&up, self.activation)?,
        };
        probe.add_input(l, Role::Down, &hidden)?;
        layer.down.forward(&hidden, dropout)
    }

    /// Logits (seq, vocab) of one sequence at positions 0..seq.
    pub fn forward(&self, ids: &[u32], probe: &mut Probe) -> Result<Tensor> {
        let seq = ids.len();
        if seq == 0 || seq > self.max_positions {
            return Err(ModelError::input(format!(
                "a calibration sample must hold 1 to {} tokens, got {seq}",
                self.max_positions
            )));
        }
        self.check_ids(ids)?;
        let idx = Tensor::from_vec(ids.to_vec(), seq, &self.device)?;
        let x = self.embed.index_select(&idx, 0)?;
        let (cos, sin) = self.cos_sin(seq)?;
        let at = Positions { cos, sin, mask: self.causal_mask(seq)?, batch: 1 };
        probe.input_tokens += seq;
        let x = self.run_layers(0..self.layers.len(), x, &at, probe)?;
        if probe.record_hidden {
            probe.hidden.push(x.detach());
        }
        self.lm_head.forward(&self.final_norm.forward(&x)?, &self.dropout)
    }

    /// Layers `range` on the residual stream x (seq, hidden); records what `probe` asks for.
    fn run_layers(
        &self,
        range: std::ops::Range<usize>,
        mut x: Tensor,
        at: &Positions,
        probe: &mut Probe,
    ) -> Result<Tensor> {
        for l in range {
            let layer = &self.layers[l];
            if probe.record_hidden {
                probe.hidden.push(x.detach());
            }
            let attn = self.attention(l, layer, &layer.attn_norm.forward(&x)?, at, probe)?;
            x = if self.parallel_residual {
                let mlp = self.mlp(l, layer, &layer.mlp_norm.forward(&x)?, probe)?;
                ((x + attn)? + mlp)?
            } else {
                let h = (x + attn)?;
                let mlp = self.mlp(l, layer, &layer.mlp_norm.forward(&h)?, probe)?;
                (h + mlp)?
            };
        }
        Ok(x)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let seq = ids.len();
        if seq == 0 || seq > self.max_positions {
            return Err(ModelError::input(format!("a sample must hold 1 to {} tokens, got {seq}", self.max_positions)));
        }
        let vocab = self.embed.dim(0)?;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::input(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        Ok(())
    }

    fn causal_mask(&self, seq: usize) -> Result<Tensor> {
        let mask: Vec<f32> = (0..seq).flat_map(|i| (0..seq).map(move |j| if j <= i { 0.0 } else { -1e9 })).collect();
        Ok(Tensor::from_vec(mask, (seq, seq), &self.device)?.to_dtype(self.dtype)?)
    }

    /// The residual streams entering layers 0..=`upto` of one sequence at positions 0..seq
    /// (seq, hidden) each, as constants: the frozen prefix a learned token scorer trains over.
    pub fn hidden_until(&self, ids: &[u32], upto: usize) -> Result<Vec<Tensor>> {
        self.check_ids(ids)?;
        if upto > self.layers.len() {
            return Err(ModelError::input(format!("layer {upto} is beyond the model's {} layers", self.layers.len())));
        }
        let seq = ids.len();
        let idx = Tensor::from_vec(ids.to_vec(), seq, &self.device)?;
        let x = self.embed.index_select(&idx, 0)?;
        let (cos, sin) = self.cos_sin(seq)?;
        let at = Positions { cos, sin, mask: self.causal_mask(seq)?, batch: 1 };
        let mut probe = Probe { record_hidden: true, ..Probe::default() };
        let x = self.run_layers(0..upto, x, &at, &mut probe)?;
        probe.hidden.push(x.detach());
        Ok(probe.hidden)
    }

    /// Layer `layer`'s attention input (its norm applied to the residual stream x): what the
    /// engine shows a token pruner as `LayerContext::hidden`.
    pub fn attention_input(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let l = self.layers.get(layer).ok_or_else(|| ModelError::input(format!("no layer {layer}")))?;
        l.attn_norm.forward(x)
    }

    /// Run layers `layer..` on the residual stream x (seq, hidden) entering `layer`, at positions
    /// 0..seq, with `key_bias` (seq,) added to every query's attention score for each key in
    /// those layers (on top of the causal mask): a soft version of dropping keys from them.
    /// Returns the logits (seq − `from_row`, vocab) of rows `from_row..`. Gradients flow to
    /// x and key_bias.
    pub fn forward_from(&self, layer: usize, x: &Tensor, key_bias: &Tensor, from_row: usize) -> Result<Tensor> {
        let seq = x.dim(0)?;
        if layer > self.layers.len() || seq == 0 || seq > self.max_positions || from_row >= seq {
            return Err(ModelError::input(format!(
                "forward_from: layer {layer} of {}, {seq} tokens (at most {}), rows from {from_row}",
                self.layers.len(),
                self.max_positions
            )));
        }
        if key_bias.dims() != [seq] {
            return Err(ModelError::input(format!(
                "forward_from: key bias of shape {:?} for {seq} tokens",
                key_bias.dims()
            )));
        }
        let (cos, sin) = self.cos_sin(seq)?;
        let mask = self.causal_mask(seq)?.broadcast_add(&key_bias.to_dtype(self.dtype)?.unsqueeze(0)?)?;
        let x = self.run_layers(
            layer..self.layers.len(),
            x.to_dtype(self.dtype)?,
            &Positions { cos, sin, mask, batch: 1 },
            &mut Probe::default(),
        )?;
        let x = x.narrow(0, from_row, seq - from_row)?;
        self.lm_head.forward(&self.final_norm.forward(&x)?, &self.dropout)
    }

    /// Mean next-token cross-entropy of one sequence (HF's `model(ids, labels=ids).loss`).
    pub fn loss(&self, ids: &[u32], probe: &mut Probe) -> Result<Tensor> {
        if ids.len() < 2 {
            return Err(ModelError::input("a calibration sample needs at least 2 tokens"));
        }
        let labels: Vec<bool> = (0..ids.len()).map(|i| i > 0).collect();
        let (sum, n) = self.loss_sum(&[Sample { ids, labels: &labels }], probe)?;
        Ok((sum / n as f64)?)
    }

    /// The next-token cross-entropy summed over every label of a micro-batch, and the number of
    /// labels: the sequences run as one forward call, right-padded to the longest (the causal
    /// mask keeps padding out of every real token's view). Dividing by the labels of the whole
    /// accumulated batch gives HF Trainer's loss (`num_items_in_batch`).
    pub fn loss_sum(&self, batch: &[Sample], probe: &mut Probe) -> Result<(Tensor, usize)> {
        let seq = batch.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * seq);
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (b, sample) in batch.iter().enumerate() {
            self.check_ids(sample.ids)?;
            if sample.labels.len() != sample.ids.len() {
                return Err(ModelError::input(format!(
                    "{} labels for a sample of {} tokens",
                    sample.labels.len(),
                    sample.ids.len()
                )));
            }
            for (i, (&id, &label)) in sample.ids.iter().zip(sample.labels).enumerate() {
                if label && i > 0 {
                    rows.push((b * seq + i - 1) as u32);
                    targets.push(id);
                }
            }
            ids.extend_from_slice(sample.ids);
            // Padding: any valid id; it sits after every real token, so none attends to it.
            ids.resize((b + 1) * seq, 0);
        }
        let n = rows.len();
        if n == 0 {
            return Err(ModelError::input("a training batch holds no label tokens"));
        }
        let idx = Tensor::from_vec(ids, batch.len() * seq, &self.device)?;
        let x = self.embed.index_select(&idx, 0)?;
        let (cos, sin) = self.cos_sin(seq)?;
        let at = Positions { cos, sin, mask: self.causal_mask(seq)?, batch: batch.len() };
        probe.input_tokens += batch.iter().map(|s| s.ids.len()).sum::<usize>();
        let x = self.run_layers(0..self.layers.len(), x, &at, probe)?;
        // Only the rows that predict a label reach the LM head.
        let x = x.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?;
        let logits = self.lm_head.forward(&self.final_norm.forward(&x)?, &self.dropout)?;
        // The log-sum-exp runs over the whole vocabulary: in f64, so that a long f32 sum does not
        // put ~1e-5 relative noise into every gradient.
        let logits = logits.to_dtype(DType::F64)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let targets = Tensor::from_vec(targets, (n, 1), &self.device)?;
        let picked = shifted.gather(&targets, 1)?;
        Ok(((log_z - picked)?.sum_all()?, n))
    }
}
