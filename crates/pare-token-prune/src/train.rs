//! Training a learned token scorer on the model's own next-token loss.
//!
//! A sample is `seq_len` tokens: the span is all but its last `protect_last` tokens, the tail
//! carries the loss. The frozen model runs to layer K−1's attention input (what the pruner shows
//! the scorer at a cut `--prune-tokens K:...`); the scorer's logits s become a soft mask
//! m = σ(s / T) (or σ((s + logistic noise) / T) with `MaskKind::Gumbel`), and log(m + 1e-6) is
//! added to every query's score for each span key in layers K.. of a differentiable forward
//! (pare-prune's), from the residual stream entering layer K: exactly the layers hard pruning
//! shortens. Loss = mean NLL of the tail's next tokens + λ·(mean(m) − R)². Held-out samples, if
//! asked for, score the hard top-KEEP choice as training goes. AdamW (learning rate
//! warmed up linearly over the first tenth of the steps) updates the scorer only; the model is
//! frozen.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use pare_model::diff::DiffModel;
use pare_model::Model;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::error::{Result, TokenPruneError};
use crate::learned::{ScorerNet, ScorerShape};

/// How scorer logits become a soft mask during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// m = σ(s / T).
    Sigmoid,
    /// m = σ((s + log u − log(1 − u)) / T), u ~ U(0, 1): a relaxed Bernoulli (binary concrete)
    /// whose noise pushes the logits apart, closer to the hard mask used at inference.
    Gumbel,
    /// Straight-through top-KEEP: the forward pass uses the hard mask inference uses (the top
    /// KEEP of s plus logistic noise, for exploration), the backward pass σ(s / T)'s gradient.
    /// Through log(m + 1e-6) a dropped key's gradient is finite: how much adding it back helps.
    StraightThrough,
}

impl MaskKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "sigmoid" => Ok(MaskKind::Sigmoid),
            "gumbel" => Ok(MaskKind::Gumbel),
            "st" | "straight-through" => Ok(MaskKind::StraightThrough),
            other => Err(TokenPruneError::config(format!("unknown `mask` {other:?} (sigmoid, gumbel or st)"))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            MaskKind::Sigmoid => "sigmoid",
            MaskKind::Gumbel => "gumbel",
            MaskKind::StraightThrough => "st",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// The cut: layers K.. see only kept tokens; the scorer reads layer K−1's attention input.
    pub cut_layer: usize,
    /// Kept share R of the span.
    pub keep: f64,
    pub seq_len: usize,
    pub protect_last: usize,
    pub steps: usize,
    /// Samples per step.
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Weight λ of the kept-share term.
    pub lambda: f64,
    pub temperature: f64,
    pub mask: MaskKind,
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    /// Samples held out of training (the text's last ones) on which the hard top-KEEP choice is
    /// scored every `eval_every` steps; 0: none.
    pub eval_samples: usize,
    /// 0: every steps / 5.
    pub eval_every: usize,
}

impl TrainSettings {
    pub fn new(cut_layer: usize, keep: f64) -> Self {
        TrainSettings {
            cut_layer,
            keep,
            seq_len: 256,
            protect_last: 64,
            steps: 200,
            batch: 1,
            lr: 1e-3,
            seed: 0,
            lambda: 10.0,
            temperature: 1.0,
            mask: MaskKind::Gumbel,
            d: 64,
            layers: 2,
            heads: 2,
            eval_samples: 0,
            eval_every: 0,
        }
    }

    /// Check the settings against a model of `num_layers` layers and context `max_positions`.
    pub fn check(&self, num_layers: usize, max_positions: usize) -> Result<()> {
        if self.cut_layer == 0 || self.cut_layer >= num_layers {
            return Err(TokenPruneError::config(format!(
                "`layer` must be between 1 and {} (the model has {num_layers} layers; the scorer reads layer LAYER-1)",
                num_layers.saturating_sub(1)
            )));
        }
        self.check_basic()?;
        if self.seq_len > max_positions {
            return Err(TokenPruneError::config(format!(
                "`seq_len` {} exceeds the model's context of {max_positions} tokens",
                self.seq_len
            )));
        }
        Ok(())
    }

    /// Checks that need no model.
    pub fn check_basic(&self) -> Result<()> {
        if !(self.keep > 0.0 && self.keep < 1.0) {
            return Err(TokenPruneError::config(format!("`keep` must be in (0, 1), got {}", self.keep)));
        }
        if self.protect_last < 2 {
            return Err(TokenPruneError::config("`protect_last` must be at least 2 (the tail carries the loss)"));
        }
        if self.seq_len < self.protect_last + 2 {
            return Err(TokenPruneError::config(format!(
                "`seq_len` {} leaves no span before the {} protected tokens",
                self.seq_len, self.protect_last
            )));
        }
        if self.steps == 0 || self.batch == 0 {
            return Err(TokenPruneError::config("`steps` and `batch` must be at least 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(TokenPruneError::config("`lr` and `temperature` must be positive"));
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(TokenPruneError::config("`lambda` must be non-negative"));
        }
        if self.eval_samples > 0 && self.eval_every > self.steps {
            return Err(TokenPruneError::config(format!(
                "`eval_every` {} is beyond `steps` {}",
                self.eval_every, self.steps
            )));
        }
        if self.d == 0 || self.heads == 0 || !self.d.is_multiple_of(self.heads) {
            return Err(TokenPruneError::config(format!(
                "`d` {} must be a positive multiple of `heads` {}",
                self.d, self.heads
            )));
        }
        Ok(())
    }
}

/// One step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub nll: f64,
    /// Mean soft mask over the span.
    pub kept: f64,
    /// At evaluation steps: the held-out tail NLL with the hard top-KEEP choice.
    pub held_out: Option<f64>,
}

/// The held-out samples' tail NLL with the hard top-KEEP choice, against keeping every token
/// and against a random choice of as many tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOut {
    pub samples: usize,
    /// (step, NLL); step 0 is the untrained scorer.
    pub learned: Vec<(usize, f64)>,
    pub unpruned: f64,
    pub random: f64,
}

pub struct TrainOutcome {
    pub net: ScorerNet,
    pub curve: Vec<StepStats>,
    /// Training samples (held-out ones excluded).
    pub samples: usize,
    pub held_out: Option<HeldOut>,
    pub seconds: f64,
}

/// The frozen model, ready to train scorers over: a differentiable copy of its weights.
pub struct Frozen {
    pub diff: DiffModel,
    pub hidden_size: usize,
    pub device: Device,
}

impl Frozen {
    pub fn new(model: &Model, dtype: DType) -> Result<Self> {
        Ok(Frozen {
            diff: DiffModel::new(model, dtype, |_, _| false)?,
            hidden_size: model.config().hidden_size,
            device: model.device().clone(),
        })
    }

    /// Layer `cut − 1`'s attention input and the residual stream entering layer `cut`, both
    /// (seq, hidden) constants.
    pub fn prefix(&self, ids: &[u32], cut: usize) -> Result<(Tensor, Tensor)> {
        let hidden = self.diff.hidden_until(ids, cut)?;
        let x = self.diff.attention_input(cut - 1, &hidden[cut - 1])?;
        Ok((x, hidden[cut].clone()))
    }

    /// Mean NLL of the tail's next tokens of `ids` under an additive per-key bias (seq,) in
    /// layers `cut..`: rows seq−protect .. seq−2 predict tokens seq−protect+1 .. seq−1.
    pub fn tail_nll(
        &self,
        ids: &[u32],
        entering_cut: &Tensor,
        cut: usize,
        protect: usize,
        key_bias: &Tensor,
    ) -> Result<Tensor> {
        let seq = ids.len();
        let logits = self.diff.forward_from(cut, entering_cut, key_bias, seq - protect)?;
        let n = protect - 1;
        let logits = logits.narrow(0, 0, n)?.to_dtype(DType::F64)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let targets = Tensor::from_vec(ids[seq - protect + 1..].to_vec(), (n, 1), logits.device())?;
        let picked = shifted.gather(&targets, 1)?;
        Ok((log_z - picked)?.mean_all()?)
    }

    /// The key bias (seq,) of a hard choice: 0 for kept span tokens and the tail, log(1e-6) for
    /// dropped ones (what the soft mask becomes at m ∈ {0, 1}).
    pub fn hard_bias(&self, seq: usize, span: usize, kept: &[usize]) -> Result<Tensor> {
        let mut bias = vec![(1e-6f64).ln(); span];
        bias.extend(std::iter::repeat_n(0.0, seq - span));
        for &k in kept {
            bias[k] = 0.0;
        }
        Ok(Tensor::from_vec(bias, seq, &self.device)?.to_dtype(self.diff.dtype)?)
    }
}

/// Loss of one sample: (loss, tail NLL, mean soft mask). `noise` (span,): logistic noise for
/// [`MaskKind::Gumbel`] and [`MaskKind::StraightThrough`] (None: none).
pub fn sample_loss(
    frozen: &Frozen,
    net: &ScorerNet,
    ids: &[u32],
    s: &TrainSettings,
    noise: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let seq = ids.len();
    let span = seq - s.protect_last;
    let (x, entering) = frozen.prefix(ids, s.cut_layer)?;
    let span_idx: Vec<usize> = (0..span).collect();
    let others: Vec<usize> = (span..seq).collect();
    let logits = net.row_logits(&x, &span_idx, &others)?;
    let noisy = match noise {
        Some(n) => logits.add(&n.to_dtype(logits.dtype())?)?,
        None => logits.clone(),
    };
    // σ(z) = 1 / (1 + e^(−z)), composed so that it records a gradient.
    let sigmoid = |z: &Tensor| -> Result<Tensor> { Ok(((z / s.temperature)?.neg()?.exp()? + 1.0)?.recip()?) };
    let (m, soft) = match s.mask {
        MaskKind::Sigmoid | MaskKind::Gumbel => {
            let m = sigmoid(&noisy)?;
            (m.clone(), m)
        }
        MaskKind::StraightThrough => {
            let soft = sigmoid(&logits)?;
            let scores: Vec<f32> = noisy.to_dtype(DType::F32)?.to_vec1()?;
            let keep = crate::schedule::Keep::Fraction(s.keep).of(span);
            let mut hard = vec![0f64; span];
            for i in crate::learned::top_keep(&scores, keep) {
                hard[i] = 1.0;
            }
            let hard = Tensor::from_vec(hard, span, soft.device())?.to_dtype(soft.dtype())?;
            // Forward: exactly the hard mask; backward: the soft mask's gradient.
            ((hard + (&soft - soft.detach())?)?, soft)
        }
    };
    let bias = Tensor::cat(&[&(&m + 1e-6)?.log()?, &Tensor::zeros(seq - span, m.dtype(), m.device())?], 0)?;
    let nll = frozen.tail_nll(ids, &entering, s.cut_layer, s.protect_last, &bias.to_dtype(frozen.diff.dtype)?)?;
    let kept = soft.mean_all()?.to_dtype(DType::F64)?;
    let budget = ((&kept - s.keep)?.sqr()? * s.lambda)?;
    let loss = (&nll + budget)?;
    Ok((loss, nll, kept))
}

/// Non-overlapping samples of `seq_len` tokens.
pub fn samples(tokens: &[u32], seq_len: usize) -> Vec<&[u32]> {
    tokens.chunks_exact(seq_len).collect()
}

/// The scorer training starts from: random weights (seeded by `s.seed`), the head's bias at the
/// kept share's logit so that σ(b / T) = R.
pub fn initial_net(frozen: &Frozen, s: &TrainSettings) -> Result<ScorerNet> {
    let shape = ScorerShape::new(frozen.hidden_size, s.d, s.layers, s.heads)?;
    let net = ScorerNet::new(shape, s.seed, frozen.diff.dtype, &frozen.device)?;
    let b0 = s.temperature * (s.keep / (1.0 - s.keep)).ln();
    net.set("head.bias", &Tensor::new(&[b0], &frozen.device)?)?;
    Ok(net)
}

/// Train a fresh scorer on `tokens`. `progress` is called after every step.
pub fn train(
    frozen: &Frozen,
    tokens: &[u32],
    s: &TrainSettings,
    mut progress: impl FnMut(&StepStats),
) -> Result<TrainOutcome> {
    s.check_basic()?;
    let mut all = samples(tokens, s.seq_len);
    if all.len() <= s.eval_samples {
        return Err(TokenPruneError::config(format!(
            "the training text has {} tokens, fewer than {} samples of `seq_len` {} ({} held out)",
            tokens.len(),
            s.eval_samples + 1,
            s.seq_len,
            s.eval_samples
        )));
    }
    let val = all.split_off(all.len() - s.eval_samples);
    let net = initial_net(frozen, s)?;
    let mut opt =
        AdamW::new(net.vars().to_vec(), ParamsAdamW { lr: s.lr, weight_decay: 0.0, ..ParamsAdamW::default() })?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed ^ 0x5eed);
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.shuffle(&mut rng);
    let span = s.seq_len - s.protect_last;
    let start = Instant::now();
    let mut held_out = if val.is_empty() {
        None
    } else {
        let mut pick = rand::rngs::StdRng::seed_from_u64(s.seed ^ 0x7a1);
        let random = hard_nll(frozen, None, &val, s, |_, logits, k| {
            let noise: Vec<f32> = logits.iter().map(|_| pick.random::<f32>()).collect();
            crate::learned::top_keep(&noise, k)
        })?;
        let unpruned = hard_nll(frozen, None, &val, s, |_, logits, _| (0..logits.len()).collect())?;
        let first = hard_nll(frozen, Some(&net), &val, s, |_, logits, k| crate::learned::top_keep(logits, k))?;
        Some(HeldOut { samples: val.len(), learned: vec![(0, first)], unpruned, random })
    };
    let every = if s.eval_every == 0 { (s.steps / 5).max(1) } else { s.eval_every };
    let mut curve = Vec::with_capacity(s.steps);
    let mut next = 0usize;
    // Linear warm-up over the first tenth of the steps: Adam's first steps move every weight by
    // about lr, which would swing a fresh scorer's mask far from the kept share.
    let warmup = (s.steps / 10).max(1);
    for step in 1..=s.steps {
        opt.set_learning_rate(s.lr * (step as f64 / warmup as f64).min(1.0));
        let (mut total, mut nll_sum, mut kept_sum) = (None::<Tensor>, 0.0, 0.0);
        for _ in 0..s.batch {
            if next == order.len() {
                order.shuffle(&mut rng);
                next = 0;
            }
            let ids = all[order[next]];
            next += 1;
            let noise = match s.mask {
                MaskKind::Sigmoid => None,
                MaskKind::Gumbel | MaskKind::StraightThrough => {
                    let n: Vec<f64> = (0..span)
                        .map(|_| {
                            let u: f64 = rng.random_range(1e-6..1.0 - 1e-6);
                            u.ln() - (1.0 - u).ln()
                        })
                        .collect();
                    Some(Tensor::from_vec(n, span, &frozen.device)?)
                }
            };
            let (loss, nll, kept) = sample_loss(frozen, &net, ids, s, noise.as_ref())?;
            nll_sum += nll.to_scalar::<f64>()?;
            kept_sum += kept.to_scalar::<f64>()?;
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
        }
        let loss = (total.expect("batch ≥ 1") / s.batch as f64)?;
        let value = loss.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(TokenPruneError::config(format!(
                "training diverged at step {step} (loss {value}); lower `lr`"
            )));
        }
        opt.backward_step(&loss)?;
        let mut stats = StepStats {
            step,
            loss: value,
            nll: nll_sum / s.batch as f64,
            kept: kept_sum / s.batch as f64,
            held_out: None,
        };
        if let Some(h) = held_out.as_mut().filter(|_| step % every == 0 || step == s.steps) {
            let nll = hard_nll(frozen, Some(&net), &val, s, |_, logits, k| crate::learned::top_keep(logits, k))?;
            h.learned.push((step, nll));
            stats.held_out = Some(nll);
        }
        curve.push(stats);
        progress(&stats);
    }
    Ok(TrainOutcome { net, curve, samples: all.len(), held_out, seconds: start.elapsed().as_secs_f64() })
}

/// Mean tail NLL of `samples` when each keeps the span tokens `choose(sample index, ids, span
/// logits)` returns, dropped ones biased by log(1e-6) in layers cut..: how a hard selection
/// does on the training objective. `net` gives the logits passed to `choose` (None: zeros).
pub fn hard_nll(
    frozen: &Frozen,
    net: Option<&ScorerNet>,
    samples: &[&[u32]],
    s: &TrainSettings,
    mut choose: impl FnMut(usize, &[f32], usize) -> Vec<usize>,
) -> Result<f64> {
    let mut sum = 0.0;
    for (i, ids) in samples.iter().enumerate() {
        let seq = ids.len();
        let span = seq - s.protect_last;
        let (x, entering) = frozen.prefix(ids, s.cut_layer)?;
        let logits: Vec<f32> = match net {
            Some(net) => {
                let idx: Vec<usize> = (0..span).collect();
                let others: Vec<usize> = (span..seq).collect();
                net.row_logits(&x, &idx, &others)?.to_dtype(DType::F32)?.to_vec1()?
            }
            None => vec![0.0; span],
        };
        let keep_n = crate::schedule::Keep::Fraction(s.keep).of(span);
        let kept = choose(i, &logits, keep_n);
        let bias = frozen.hard_bias(seq, span, &kept)?;
        sum += frozen.tail_nll(ids, &entering, s.cut_layer, s.protect_last, &bias)?.to_scalar::<f64>()?;
    }
    Ok(sum / samples.len().max(1) as f64)
}
