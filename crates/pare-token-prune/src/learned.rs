//! A learned token scorer: a small transformer encoder that reads the span tokens' hidden states
//! at the cut and gives each a logit. Training (`train`) turns the logits into a soft mask;
//! inference keeps the top-KEEP logits (`--prune-score learned:FILE.safetensors`).
//!
//! Input per span token: its hidden state (the cut layer's attention input, standardized per
//! token) projected to `d`, plus a projection of the pooled prompt (the mean hidden state of the
//! row's non-span tokens, or of all its tokens when there are none), plus a projection of four
//! position features within the span (relative position, its square, first-token flag, and
//! closeness to the span's end). Then `layers` pre-norm encoder layers with `heads` heads,
//! bidirectional over the span, and a linear head. Every op is composed from elementary candle
//! ops, so gradients flow to the weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};

use crate::error::{Result, TokenPruneError};

/// Shape of a scorer network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScorerShape {
    /// The model's hidden size (the input width).
    pub hidden: usize,
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    /// Width of each layer's MLP.
    pub ffn: usize,
}

impl ScorerShape {
    pub fn new(hidden: usize, d: usize, layers: usize, heads: usize) -> Result<Self> {
        if hidden == 0 || d == 0 || heads == 0 || !d.is_multiple_of(heads) {
            return Err(TokenPruneError::config(format!(
                "scorer: width {d} must be a positive multiple of the head count {heads}"
            )));
        }
        let ffn = d.checked_mul(2).ok_or_else(|| TokenPruneError::config(format!("scorer: width {d} is too large")))?;
        Ok(ScorerShape { hidden, d, layers, heads, ffn })
    }

    /// Weights of a network of this shape (the sizes in [`layout`]), None if it overflows.
    pub fn parameter_count(&self) -> Option<u64> {
        let (h, d, ffn) = (self.hidden as u64, self.d as u64, self.ffn as u64);
        let input = d.checked_mul(h)?.checked_mul(2)?.checked_add(d.checked_mul(POS_FEATURES as u64 + 3)?)?;
        let attention = d.checked_mul(d)?.checked_mul(4)?.checked_add(d.checked_mul(8)?)?;
        let mlp = ffn.checked_mul(d)?.checked_mul(2)?.checked_add(ffn)?.checked_add(d)?;
        let layer = attention.checked_add(mlp)?;
        let head = d.checked_mul(3)?.checked_add(1)?;
        input.checked_add(layer.checked_mul(self.layers as u64)?)?.checked_add(head)
    }
}

/// What a scorer file records about its training, besides its shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScorerInfo {
    pub model: String,
    /// The cut it was trained for: `--prune-tokens LAYER:...` (scores read layer LAYER−1).
    pub cut_layer: usize,
    pub keep: f64,
    pub text: String,
    pub steps: usize,
    /// Anything else (seq-len, protect-last, final loss...), stored as strings.
    pub extra: BTreeMap<String, String>,
}

const POS_FEATURES: usize = 4;
const KIND: &str = "token-scorer";

/// The network's weights, by name; trainable ones are also [`Var`]s.
pub struct ScorerNet {
    pub shape: ScorerShape,
    tensors: BTreeMap<String, Tensor>,
    vars: Vec<Var>,
}

impl std::fmt::Debug for ScorerNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScorerNet").field("shape", &self.shape).finish()
    }
}

/// Names and shapes of every weight, and whether each is a gain (initialized to 1), a bias
/// (0) or a matrix (uniform ±1/√fan_in).
fn layout(s: &ScorerShape) -> Vec<(String, Vec<usize>, Init)> {
    let mut out = vec![
        ("in.token.weight".to_string(), vec![s.d, s.hidden], Init::Matrix),
        ("in.token.bias".to_string(), vec![s.d], Init::Zero),
        ("in.pool.weight".to_string(), vec![s.d, s.hidden], Init::Matrix),
        ("in.pool.bias".to_string(), vec![s.d], Init::Zero),
        ("in.pos.weight".to_string(), vec![s.d, POS_FEATURES], Init::Matrix),
        ("in.pos.bias".to_string(), vec![s.d], Init::Zero),
    ];
    for l in 0..s.layers {
        let p = format!("layers.{l}");
        out.extend([
            (format!("{p}.norm1.weight"), vec![s.d], Init::One),
            (format!("{p}.norm1.bias"), vec![s.d], Init::Zero),
            (format!("{p}.attn.qkv.weight"), vec![3 * s.d, s.d], Init::Matrix),
            (format!("{p}.attn.qkv.bias"), vec![3 * s.d], Init::Zero),
            (format!("{p}.attn.out.weight"), vec![s.d, s.d], Init::Matrix),
            (format!("{p}.attn.out.bias"), vec![s.d], Init::Zero),
            (format!("{p}.norm2.weight"), vec![s.d], Init::One),
            (format!("{p}.norm2.bias"), vec![s.d], Init::Zero),
            (format!("{p}.mlp.up.weight"), vec![s.ffn, s.d], Init::Matrix),
            (format!("{p}.mlp.up.bias"), vec![s.ffn], Init::Zero),
            (format!("{p}.mlp.down.weight"), vec![s.d, s.ffn], Init::Matrix),
            (format!("{p}.mlp.down.bias"), vec![s.d], Init::Zero),
        ]);
    }
    out.extend([
        ("head.norm.weight".to_string(), vec![s.d], Init::One),
        ("head.norm.bias".to_string(), vec![s.d], Init::Zero),
        ("head.weight".to_string(), vec![1, s.d], Init::Matrix),
        ("head.bias".to_string(), vec![1], Init::Zero),
    ]);
    out
}

#[derive(Clone, Copy)]
enum Init {
    Matrix,
    Zero,
    One,
}

/// x (rows, features) standardized per row, without parameters.
fn standardize(x: &Tensor) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centered.broadcast_mul(&(var + 1e-5)?.sqrt()?.recip()?)?)
}

impl ScorerNet {
    /// Fresh random weights (trainable), in `dtype` on `device`.
    pub fn new(shape: ScorerShape, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        let mut vars = Vec::new();
        for (name, dims, init) in layout(&shape) {
            let n: usize = dims.iter().product();
            let values: Vec<f64> = match init {
                Init::Zero => vec![0.0; n],
                Init::One => vec![1.0; n],
                Init::Matrix => {
                    let bound = 1.0 / (dims[1] as f64).sqrt();
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                }
            };
            let var = Var::from_tensor(&Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?)?;
            tensors.insert(name, var.as_tensor().clone());
            vars.push(var);
        }
        Ok(ScorerNet { shape, tensors, vars })
    }

    /// The trainable variables (empty for a loaded scorer).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// A weight by name (see the layout in this module).
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| TokenPruneError::config(format!("scorer: no weight {name:?}")))
    }

    /// Set a weight (training starts the head's bias at the kept share's logit).
    pub fn set(&self, name: &str, value: &Tensor) -> Result<()> {
        let t = self.tensor(name)?;
        match self.vars.iter().find(|v| v.as_tensor().id() == t.id()) {
            Some(var) => Ok(var.set(&value.to_dtype(var.dtype())?)?),
            None => Err(TokenPruneError::config(format!("scorer: {name:?} is not trainable"))),
        }
    }

    pub fn dtype(&self) -> DType {
        self.tensors.values().next().map(|t| t.dtype()).unwrap_or(DType::F32)
    }

    pub fn device(&self) -> Device {
        self.tensors.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu)
    }

    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        let b = self.tensor(&format!("{prefix}.bias"))?;
        Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        let b = self.tensor(&format!("{prefix}.bias"))?;
        Ok(standardize(x)?.broadcast_mul(w)?.broadcast_add(b)?)
    }

    /// h (n, d) → self-attention over all n tokens (no mask).
    fn attention(&self, h: &Tensor, prefix: &str) -> Result<Tensor> {
        let (n, d) = h.dims2()?;
        let heads = self.shape.heads;
        let hd = d / heads;
        let qkv = self.linear(h, &format!("{prefix}.qkv"))?;
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv.narrow(1, i * d, d)?.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous()?)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let out = probs.matmul(&v)?.transpose(0, 1)?.reshape((n, d))?;
        self.linear(&out, &format!("{prefix}.out"))
    }

    /// Position features of n span tokens: (n, 4).
    fn position_features(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let span = (n.max(2) - 1) as f64;
        let mut f = Vec::with_capacity(n * POS_FEATURES);
        for i in 0..n {
            let rel = i as f64 / span;
            f.extend([rel, rel * rel, if i == 0 { 1.0 } else { 0.0 }, (-((n - 1 - i) as f64) / 8.0).exp()]);
        }
        Ok(Tensor::from_vec(f, (n, POS_FEATURES), device)?.to_dtype(dtype)?)
    }

    /// One logit per span token. `hidden` (seq, hidden): a row's hidden states at the cut;
    /// `span`: the indices that may be dropped; `others`: the row's other real tokens (pooled
    /// as the prompt's summary; the span itself when empty).
    pub fn row_logits(&self, hidden: &Tensor, span: &[usize], others: &[usize]) -> Result<Tensor> {
        let (seq, width) = hidden.dims2()?;
        if width != self.shape.hidden {
            return Err(TokenPruneError::config(format!(
                "the learned scorer was trained for hidden size {}, this model's is {width}",
                self.shape.hidden
            )));
        }
        if span.is_empty() || span.iter().chain(others).any(|&i| i >= seq) {
            return Err(TokenPruneError::config("learned scorer: span indices out of range"));
        }
        let (dtype, device) = (self.dtype(), self.device());
        let hidden = hidden.to_device(&device)?.to_dtype(dtype)?;
        let index = |idx: &[usize]| -> Result<Tensor> {
            let ids = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &device)?;
            Ok(hidden.index_select(&ids, 0)?)
        };
        let x = index(span)?;
        let pooled = if others.is_empty() { x.mean_keepdim(0)? } else { index(others)?.mean_keepdim(0)? };
        let n = span.len();
        let mut h = self
            .linear(&standardize(&x)?, "in.token")?
            .broadcast_add(&self.linear(&standardize(&pooled)?, "in.pool")?)?
            .add(&self.linear(&Self::position_features(n, dtype, &device)?, "in.pos")?)?;
        for l in 0..self.shape.layers {
            let p = format!("layers.{l}");
            let a = self.attention(&self.layer_norm(&h, &format!("{p}.norm1"))?, &format!("{p}.attn"))?;
            h = (h + a)?;
            let up = self.linear(&self.layer_norm(&h, &format!("{p}.norm2"))?, &format!("{p}.mlp.up"))?.gelu()?;
            h = (&h + self.linear(&up, &format!("{p}.mlp.down"))?)?;
        }
        let out = self.linear(&self.layer_norm(&h, "head.norm")?, "head")?;
        Ok(out.reshape(n)?)
    }

    /// Write the weights (f32) and `info` as safetensors metadata.
    pub fn save(&self, path: &Path, info: &ScorerInfo) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let s = &self.shape;
        let mut meta: HashMap<String, String> = info.extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        meta.extend([
            ("pare.kind".to_string(), KIND.to_string()),
            ("hidden_size".to_string(), s.hidden.to_string()),
            ("d".to_string(), s.d.to_string()),
            ("layers".to_string(), s.layers.to_string()),
            ("heads".to_string(), s.heads.to_string()),
            ("ffn".to_string(), s.ffn.to_string()),
            ("model".to_string(), info.model.clone()),
            ("cut_layer".to_string(), info.cut_layer.to_string()),
            ("keep".to_string(), info.keep.to_string()),
            ("text".to_string(), info.text.clone()),
            ("steps".to_string(), info.steps.to_string()),
        ]);
        pare_formats::save_safetensors(path, &tensors, Some(meta))
            .map_err(|e| TokenPruneError::config(format!("cannot write the scorer: {e}").replace('\n', " ")))
    }

    /// Read a scorer written by [`ScorerNet::save`] (f32, on the CPU, not trainable).
    pub fn load(path: &Path) -> Result<(Self, ScorerInfo)> {
        let shown = path.display();
        let bytes = std::fs::read(path)
            .map_err(|e| TokenPruneError::config(format!("cannot read learned scorer {shown}: {e}")))?;
        let bad = |why: String| TokenPruneError::config(format!("learned scorer {shown}: {why}"));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("pare.kind").map(String::as_str) != Some(KIND) {
            return Err(bad(
                "not a pare token scorer (no pare.kind=token-scorer metadata; write one with `pare train-scorer`)"
                    .into(),
            ));
        }
        let num = |key: &str| -> Result<usize> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata {key:?} is missing or not a number")))
        };
        let shape = ScorerShape {
            hidden: num("hidden_size")?,
            d: num("d")?,
            layers: num("layers")?,
            heads: num("heads")?,
            ffn: num("ffn")?,
        };
        if shape.heads == 0 || !shape.d.is_multiple_of(shape.heads) {
            return Err(bad(format!("width {} is not a multiple of {} heads", shape.d, shape.heads)));
        }
        // The shape comes from the file's metadata: it must describe weights the file can hold
        // (2 bytes per weight at the least) before a layout of that size is built.
        if shape.parameter_count().filter(|&p| p.saturating_mul(2) <= bytes.len() as u64).is_none() {
            return Err(bad(format!(
                "its metadata (width {}, {} layers, MLP width {}) describes more weights than its {} bytes hold",
                shape.d,
                shape.layers,
                shape.ffn,
                bytes.len()
            )));
        }
        let mut stored = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, dims, _) in layout(&shape) {
            let t = stored.remove(&name).ok_or_else(|| bad(format!("tensor {name:?} is missing")))?;
            if t.dims() != dims.as_slice() {
                return Err(bad(format!("tensor {name:?} has shape {:?}, expected {dims:?}", t.dims())));
            }
            tensors.insert(name, t.to_dtype(DType::F32)?);
        }
        let known = [
            "pare.kind",
            "hidden_size",
            "d",
            "layers",
            "heads",
            "ffn",
            "model",
            "cut_layer",
            "keep",
            "text",
            "steps",
            "format",
        ];
        let info = ScorerInfo {
            model: meta.get("model").cloned().unwrap_or_default(),
            cut_layer: meta.get("cut_layer").and_then(|v| v.parse().ok()).unwrap_or(0),
            keep: meta.get("keep").and_then(|v| v.parse().ok()).unwrap_or(0.0),
            text: meta.get("text").cloned().unwrap_or_default(),
            steps: meta.get("steps").and_then(|v| v.parse().ok()).unwrap_or(0),
            extra: meta
                .iter()
                .filter(|(k, _)| !known.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        Ok((ScorerNet { shape, tensors, vars: Vec::new() }, info))
    }
}

/// A scorer loaded for inference (`--prune-score learned:FILE`).
#[derive(Debug)]
pub struct LearnedScorer {
    pub net: ScorerNet,
    pub info: ScorerInfo,
    pub path: String,
}

impl LearnedScorer {
    pub fn load(path: &str) -> Result<Self> {
        let (net, info) = ScorerNet::load(Path::new(path))?;
        Ok(LearnedScorer { net, info, path: path.to_string() })
    }

    /// Check the scorer fits a model of this hidden size (one-line error otherwise).
    pub fn check_model(&self, hidden_size: usize) -> Result<()> {
        if self.net.shape.hidden != hidden_size {
            return Err(TokenPruneError::config(format!(
                "learned scorer {} was trained for hidden size {} ({}), this model's is {hidden_size}",
                self.path,
                self.net.shape.hidden,
                if self.info.model.is_empty() { "unknown model" } else { &self.info.model }
            )));
        }
        Ok(())
    }

    /// Per span token (in `span`'s order), its logit; `hidden` (seq, hidden) is the row.
    pub fn scores(&self, hidden: &Tensor, span: &[usize], others: &[usize]) -> Result<Vec<f32>> {
        self.check_model(hidden.dim(1)?)?;
        Ok(self.net.row_logits(hidden, span, others)?.to_dtype(DType::F32)?.to_vec1()?)
    }
}

/// The top-`keep` entries of `logits` (ties: earlier first), ascending: the hard mask.
pub fn top_keep(logits: &[f32], keep: usize) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..logits.len()).collect();
    ranked.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    ranked.truncate(keep);
    ranked.sort_unstable();
    ranked
}
