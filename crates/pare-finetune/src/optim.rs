//! AdamW and learning-rate schedules, computed as torch's `AdamW` and transformers'
//! `get_{linear,cosine}_schedule_with_warmup` compute them (fixture-checked). pare keeps its own
//! AdamW so that its moments can be checkpointed and resumed.

use candle_core::{Tensor, Var};

use crate::error::{FinetuneError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults, except the learning rate (LLM-Pruner's post-training uses 1e-4).
    fn default() -> Self {
        AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW over a fixed list of variables, with its first and second moments.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far (torch's `state["step"]`).
    pub step: u64,
    /// (m, v) per variable, in the variables' order.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(vars: &[&Var], config: AdamWConfig) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { config, step: 0, moments })
    }

    /// One update at learning rate `lr` with gradients `grads` (one per variable):
    /// p ← p·(1 − lr·λ); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    /// p ← p − lr/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε).
    pub fn update(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if vars.len() != self.moments.len() || grads.len() != vars.len() {
            return Err(FinetuneError::input(format!(
                "AdamW over {} variables given {} variables and {} gradients",
                self.moments.len(),
                vars.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for ((var, g), (m, v)) in vars.iter().zip(grads).zip(self.moments.iter_mut()) {
            let p = var.as_tensor();
            let decayed = (p * (1.0 - lr * c.weight_decay))?;
            *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            var.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

/// Scale every gradient so that their joint L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: factor max_norm / (norm + 1e-6), never above 1). Returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    // Summed on the device, read back once (not once per tensor: a sync each on a GPU).
    let squares = grads
        .iter()
        .map(|g| g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let norm = match squares.as_slice() {
        [] => 0.0,
        parts => Tensor::stack(parts, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt(),
    };
    if max_norm > 0.0 {
        let factor = (max_norm / (norm + 1e-6)).min(1.0);
        if factor < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * factor)?;
            }
        }
    }
    Ok(norm)
}

/// How the learning rate moves after its linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// Down to 0 at the last step (transformers' default, LLM-Pruner's).
    Linear,
    /// Half a cosine down to 0.
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The rate of the update that follows `step` completed updates (step 0 is the first; with
    /// warm-up it runs at rate 0, as in transformers).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        let factor = match self.decay {
            Decay::Linear => ((self.total_steps as f64 - step as f64) / span).max(0.0),
            Decay::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Decay::Constant => 1.0,
        };
        self.peak * factor
    }
}
