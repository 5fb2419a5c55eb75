//! Eta sampling (Hewitt et al. 2022), as HF transformers' `EtaLogitsWarper`.
//!
//! Rule: `p = softmax(scores)`, entropy `H = -sum(p * max(log p, f32::MIN))` (torch's
//! `Categorical(logits=scores).entropy()`), `eta = min(epsilon, sqrt(epsilon) * exp(-H))` in float32.
//! A token gets `-inf` when `p < eta` AND its score is below the `min_tokens_to_keep`-th largest
//! score. `eta_cutoff == 0` is off (the chain leaves it out).

use super::util::{kth_largest, log_softmax, softmax};
use super::{LogitsProcessor, ProcessContext};

pub struct EtaCutoff {
    epsilon: f32,
    min_tokens_to_keep: usize,
}

impl EtaCutoff {
    pub fn new(epsilon: f32, min_tokens_to_keep: usize) -> Self {
        Self { epsilon, min_tokens_to_keep }
    }
}

impl LogitsProcessor for EtaCutoff {
    fn name(&self) -> &'static str {
        "eta_cutoff"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        if scores.is_empty() {
            return;
        }
        let probs = softmax(scores);
        let logp = log_softmax(scores);
        let mut plogp = 0.0f64;
        for (&l, &p) in logp.iter().zip(&probs) {
            plogp += (l.max(f32::MIN) * p) as f64;
        }
        let entropy = -(plogp as f32);
        let eta = self.epsilon.min(self.epsilon.sqrt() * (-entropy).exp());
        let kth = kth_largest(scores, self.min_tokens_to_keep);
        for (s, &p) in scores.iter_mut().zip(&probs) {
            if p < eta && *s < kth {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}
