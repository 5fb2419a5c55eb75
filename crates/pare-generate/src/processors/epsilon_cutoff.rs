//! Epsilon sampling (Hewitt et al. 2022), as HF transformers' `EpsilonLogitsWarper`.
//!
//! Rule: `p = softmax(scores)`; a token gets `-inf` when `p < epsilon` AND its score is below the
//! `min_tokens_to_keep`-th largest score (so the `min_tokens_to_keep` best, with ties, always stay).
//! `epsilon == 0` is off (the chain leaves it out, as HF does for values outside `(0, 1)`).

use super::util::{kth_largest, softmax};
use super::{LogitsProcessor, ProcessContext};

pub struct EpsilonCutoff {
    epsilon: f32,
    min_tokens_to_keep: usize,
}

impl EpsilonCutoff {
    pub fn new(epsilon: f32, min_tokens_to_keep: usize) -> Self {
        Self { epsilon, min_tokens_to_keep }
    }
}

impl LogitsProcessor for EpsilonCutoff {
    fn name(&self) -> &'static str {
        "epsilon_cutoff"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        if scores.is_empty() {
            return;
        }
        let probs = softmax(scores);
        let kth = kth_largest(scores, self.min_tokens_to_keep);
        for (s, &p) in scores.iter_mut().zip(&probs) {
            if p < self.epsilon && *s < kth {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}
