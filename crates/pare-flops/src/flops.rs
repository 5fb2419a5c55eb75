//! Exact matmul FLOPs of pare's prefill and decode, by component, from a model's shapes.
//!
//! Counted: every matrix product, at 2·m·n·k (a multiply and an add per term), as torch's
//! FlopCounterMode counts them. Left out: norms, activations, RoPE, softmax, bias adds and the
//! residual sums, which are elementwise and small beside the products. Attention is counted as
//! computed: a causal prefill computes the whole s×s score matrix and masks half of it, and
//! decode attends to every entry the cache holds. The prefill's LM head runs on the last
//! position only, as `generate` does.

use pare_model::{Model, ModelConfig};
use pare_press::Budget;
use serde::Serialize;

use crate::error::{FlopsError, Result};

/// One decoder layer's widths (they differ between layers after structured pruning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub mlp_width: usize,
}

/// What the decoder's FLOPs depend on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextShapes {
    pub hidden: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// SwiGLU (gate, up, down) or a two-matrix MLP (GPT-NeoX's GELU).
    pub gated_mlp: bool,
    pub layers: Vec<LayerShape>,
}

impl TextShapes {
    /// From a config: per-layer shapes where it states them, the uniform ones elsewhere.
    pub fn from_config(cfg: &ModelConfig) -> Self {
        let layers = (0..cfg.num_layers)
            .map(|i| match &cfg.layer_shapes {
                Some(s) => {
                    LayerShape { heads: s.num_heads[i], kv_heads: s.num_kv_heads[i], mlp_width: s.intermediate_size[i] }
                }
                None => {
                    LayerShape { heads: cfg.num_heads, kv_heads: cfg.num_kv_heads, mlp_width: cfg.intermediate_size }
                }
            })
            .collect();
        TextShapes {
            hidden: cfg.hidden_size,
            head_dim: cfg.head_dim,
            vocab: cfg.vocab_size,
            gated_mlp: cfg.gated_mlp(),
            layers,
        }
    }

    /// From loaded weights, which are the truth for a pruned checkpoint.
    pub fn from_model(model: &Model) -> Self {
        let mut shapes = Self::from_config(model.config());
        shapes.layers = model
            .blocks()
            .iter()
            .map(|b| LayerShape {
                heads: b.attn.num_heads(),
                kv_heads: b.attn.num_kv_heads(),
                mlp_width: b.mlp.width(),
            })
            .collect();
        shapes.gated_mlp = model.blocks().first().is_none_or(|b| b.mlp.gate().is_some());
        shapes
    }

    /// Parameters of the decoder's matrices (embedding lookup excluded, LM head included).
    pub fn matrix_params(&self) -> u64 {
        let (h, d) = (self.hidden as u64, self.head_dim as u64);
        let per_layer: u64 = self
            .layers
            .iter()
            .map(|l| {
                h * d * (2 * l.heads as u64 + 2 * l.kv_heads as u64)
                    + (if self.gated_mlp { 3 } else { 2 }) * h * l.mlp_width as u64
            })
            .sum();
        per_layer + h * self.vocab as u64
    }
}

/// A CLIP vision tower and LLaVA projector, for the image's share of the prefill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionShapes {
    pub hidden: usize,
    pub intermediate: usize,
    /// Encoder layers that run (LLaVA stops at the selected hidden state).
    pub layers_run: usize,
    pub patches: usize,
    pub channels: usize,
    pub patch_size: usize,
    pub projector_in: usize,
    pub projector_out: usize,
    /// Decoder positions one image fills.
    pub image_tokens: usize,
}

impl VisionShapes {
    /// Tower (patch embedding, layers with the class token) and projector FLOPs of one image.
    pub fn flops(&self) -> u64 {
        let (h, m) = (self.hidden as u64, self.intermediate as u64);
        let n = self.patches as u64 + 1;
        let embed = 2 * self.patches as u64 * h * (self.channels * self.patch_size * self.patch_size) as u64;
        let layer = 2 * n * h * h * 4 + 4 * n * n * h + 2 * 2 * n * h * m;
        let (pi, po) = (self.projector_in as u64, self.projector_out as u64);
        embed + self.layers_run as u64 * layer + 2 * self.image_tokens as u64 * (pi * po + po * po)
    }
}

/// FLOPs by component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Components {
    /// q, k, v and output projections.
    pub projections: u64,
    /// Scores q·kᵀ and the weighted sum of values.
    pub attention: u64,
    pub mlp: u64,
    pub lm_head: u64,
    /// Vision tower and projector (LLaVA).
    pub vision: u64,
}

impl Components {
    pub fn total(&self) -> u64 {
        self.projections + self.attention + self.mlp + self.lm_head + self.vision
    }

    fn add(&mut self, o: &Components) {
        self.projections += o.projections;
        self.attention += o.attention;
        self.mlp += o.mlp;
        self.lm_head += o.lm_head;
        self.vision += o.vision;
    }
}

/// Which prompt tokens token pruning may drop (pare-token-prune's `Span`, by count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// The image tokens.
    Image,
    /// Every prompt token but the last `protect_last` (and the last one).
    Prompt { protect_last: usize },
    /// Positions in [start, end).
    Range { start: usize, end: usize },
}

/// What a KV-cache press does to the cache, as far as FLOPs and bytes go: the budget applies
/// once the prefill is done; a capacity caps the cache before every later forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KvPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
}

impl KvPolicy {
    fn after_prefill(&self, n: usize) -> usize {
        let mut kept = n;
        if let Some(r) = self.ratio {
            kept = Budget::Ratio(r).kept(kept);
        }
        if let Some(b) = self.budget {
            kept = Budget::Entries(b).kept(kept);
        }
        kept
    }

    pub fn is_none(&self) -> bool {
        self.ratio.is_none() && self.budget.is_none() && self.capacity.is_none()
    }
}

/// One run to count.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Text tokens of the prompt.
    pub prompt_len: usize,
    /// Image tokens in the prompt (LLaVA: 576 per image).
    pub image_tokens: usize,
    /// Tokens generated: the first comes from the prefill, each later one from a decode step.
    pub gen_len: usize,
    /// Tokens each layer runs on during the prefill when token pruning drops prompt tokens
    /// inside it (pare-token-prune's `PruneSchedule::tokens_per_layer`); None: the whole prompt.
    pub pruned_lengths: Option<Vec<usize>>,
    pub kv: KvPolicy,
    /// Bytes of one cached key or value element (4 for f32, 2 for bf16/f16).
    pub kv_bytes_per_value: usize,
    /// Counted when the image tokens come from an image the run encodes.
    pub vision: Option<VisionShapes>,
}

impl Scenario {
    /// The same run without token pruning or a press: what reductions are measured against.
    pub fn unpruned(&self) -> Scenario {
        Scenario { pruned_lengths: None, kv: KvPolicy::default(), ..self.clone() }
    }

    pub fn prefill_len(&self) -> usize {
        self.prompt_len.saturating_add(self.image_tokens)
    }
}

/// The counts for one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// Tokens each layer runs on during the prefill.
    pub seq_per_layer: Vec<usize>,
    /// Cache entries per layer (per KV head) once the prefill and the press are done.
    pub kv_entries_after_prefill: Vec<usize>,
    pub prefill: Components,
    pub decode: Components,
    pub decode_steps: usize,
    pub kv_bytes_after_prefill: u64,
    pub kv_bytes_final: u64,
}

impl Analysis {
    pub fn total(&self) -> u64 {
        self.prefill.total() + self.decode.total()
    }
}

impl SpanKind {
    /// Tokens of a prefill of `prefill_len` tokens, `image_tokens` of them an image's, that
    /// token pruning may cut.
    pub fn tokens(&self, prefill_len: usize, image_tokens: usize) -> Result<usize> {
        Ok(match *self {
            SpanKind::Image => {
                if image_tokens == 0 {
                    return Err(FlopsError::input(
                        "`prune_span` image: the run has no image tokens (give `image_tokens` or a LLaVA model)",
                    ));
                }
                image_tokens
            }
            // The last token always stays (its logits are the prefill's output).
            SpanKind::Prompt { protect_last } => prefill_len.saturating_sub(protect_last.max(1)),
            SpanKind::Range { start, end } => end.min(prefill_len.saturating_sub(1)).saturating_sub(start),
        })
    }
}

/// Prefill length at every layer: the pruned lengths, checked against the model and prompt.
pub fn seq_per_layer(num_layers: usize, sc: &Scenario) -> Result<Vec<usize>> {
    let total = sc.prefill_len();
    match &sc.pruned_lengths {
        None => Ok(vec![total; num_layers]),
        Some(lengths) if lengths.len() == num_layers && lengths.iter().all(|&l| (1..=total).contains(&l)) => {
            Ok(lengths.clone())
        }
        Some(lengths) => Err(FlopsError::input(format!(
            "pruned lengths for {} layers of at most {total} tokens do not fit a model of {num_layers} layers",
            lengths.len()
        ))),
    }
}

/// One layer's projection and MLP FLOPs for `tokens` rows.
fn dense(shapes: &TextShapes, l: &LayerShape, tokens: u64) -> (u64, u64) {
    let (h, d) = (shapes.hidden as u64, shapes.head_dim as u64);
    let (q, kv) = (l.heads as u64 * d, l.kv_heads as u64 * d);
    let projections = 2 * tokens * h * (q + 2 * kv) + 2 * tokens * q * h;
    let mats = if shapes.gated_mlp { 3 } else { 2 };
    (projections, mats * 2 * tokens * h * l.mlp_width as u64)
}

fn kv_bytes(shapes: &TextShapes, entries: &[usize], per_value: usize) -> u64 {
    shapes.layers.iter().zip(entries).map(|(l, &e)| 2 * (l.kv_heads * shapes.head_dim * e * per_value) as u64).sum()
}

/// An upper bound of every count `analyze` makes (all tokens through the largest layer's terms,
/// in every layer, twice over), None if it overflows: the counts themselves are then unchecked
/// u64 arithmetic that cannot wrap.
fn count_bound(shapes: &TextShapes, sc: &Scenario) -> Option<u64> {
    let tokens = (sc.prefill_len() as u64).checked_add(sc.gen_len as u64)?;
    let (h, d) = (shapes.hidden as u64, shapes.head_dim as u64);
    let heads = shapes.layers.iter().map(|l| l.heads.max(l.kv_heads) as u64).max().unwrap_or(0);
    let width = shapes.layers.iter().map(|l| l.mlp_width as u64).max().unwrap_or(0);
    let per_token = [
        tokens.checked_mul(heads)?.checked_mul(d)?.checked_mul(4)?,
        h.checked_mul(heads)?.checked_mul(d)?.checked_mul(8)?,
        h.checked_mul(width)?.checked_mul(6)?,
        h.checked_mul(shapes.vocab as u64)?.checked_mul(2)?,
    ];
    let largest = per_token.into_iter().max()?;
    let layers = shapes.layers.len() as u64 + 1;
    tokens.checked_mul(largest)?.checked_mul(layers)?.checked_mul(8)
}

/// Count the prefill and decode of `sc` on a model of `shapes`.
pub fn analyze(shapes: &TextShapes, sc: &Scenario) -> Result<Analysis> {
    if sc.prefill_len() == 0 {
        return Err(FlopsError::input("`prompt_len`: the prompt needs at least one token"));
    }
    if sc.prompt_len == 0 && sc.image_tokens > 0 {
        return Err(FlopsError::input("`prompt_len`: a prompt needs text tokens besides the image"));
    }
    if sc.kv_bytes_per_value == 0 {
        return Err(FlopsError::input("bytes per cached value must be positive"));
    }
    if count_bound(shapes, sc).is_none() {
        return Err(FlopsError::input(format!(
            "`prompt_len` {} with `gen_len` {}: the FLOP counts overflow 64 bits",
            sc.prompt_len, sc.gen_len
        )));
    }
    let seq = seq_per_layer(shapes.layers.len(), sc)?;
    let (h, d) = (shapes.hidden as u64, shapes.head_dim as u64);
    let mut prefill = Components::default();
    for (l, &s) in shapes.layers.iter().zip(&seq) {
        let s = s as u64;
        let (projections, mlp) = dense(shapes, l, s);
        prefill.add(&Components {
            projections,
            mlp,
            attention: 4 * s * s * l.heads as u64 * d,
            ..Components::default()
        });
    }
    prefill.lm_head = 2 * h * shapes.vocab as u64;
    if let (Some(v), true) = (&sc.vision, sc.image_tokens > 0) {
        if !sc.image_tokens.is_multiple_of(v.image_tokens) {
            return Err(FlopsError::input(format!(
                "`image_tokens` {} is not a whole number of images of {} tokens",
                sc.image_tokens, v.image_tokens
            )));
        }
        prefill.vision = (sc.image_tokens / v.image_tokens) as u64 * v.flops();
    }

    let mut entries: Vec<usize> = seq.iter().map(|&s| sc.kv.after_prefill(s)).collect();
    let kv_entries_after_prefill = entries.clone();
    let decode_steps = sc.gen_len.saturating_sub(1);
    let mut decode = Components::default();
    let step_dense = shapes.layers.iter().fold((0, 0), |acc, l| {
        let (p, m) = dense(shapes, l, 1);
        (acc.0 + p, acc.1 + m)
    });
    for _ in 0..decode_steps {
        decode.projections += step_dense.0;
        decode.mlp += step_dense.1;
        decode.lm_head += 2 * h * shapes.vocab as u64;
        for (l, e) in shapes.layers.iter().zip(entries.iter_mut()) {
            if let Some(cap) = sc.kv.capacity {
                *e = (*e).min(cap);
            }
            // The new token's key joins the cache before it attends.
            *e += 1;
            decode.attention += 4 * l.heads as u64 * d * *e as u64;
        }
    }
    Ok(Analysis {
        kv_bytes_after_prefill: kv_bytes(shapes, &kv_entries_after_prefill, sc.kv_bytes_per_value),
        kv_bytes_final: kv_bytes(shapes, &entries, sc.kv_bytes_per_value),
        seq_per_layer: seq,
        kv_entries_after_prefill,
        prefill,
        decode,
        decode_steps,
    })
}
