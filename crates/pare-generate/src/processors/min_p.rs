//! Min-p, as HF transformers' `MinPLogitsWarper`.
//!
//! Rule: `p = softmax(scores)`; every token with `p < min_p * max(p)` (float32 product) gets `-inf`,
//! except the `min_tokens_to_keep` most probable tokens, which are always kept. `min_p == 0` keeps
//! everything. Ties at the `min_tokens_to_keep` boundary: pare keeps the lower ids (torch.topk's
//! choice among ties is unspecified).

use super::util::{softmax, top_indices};
use super::{LogitsProcessor, ProcessContext};

pub struct MinP {
    min_p: f32,
    min_tokens_to_keep: usize,
}

impl MinP {
    pub fn new(min_p: f32, min_tokens_to_keep: usize) -> Self {
        Self { min_p, min_tokens_to_keep }
    }
}

impl LogitsProcessor for MinP {
    fn name(&self) -> &'static str {
        "min_p"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        let probs = softmax(scores);
        let top = probs.iter().copied().fold(0.0f32, f32::max);
        let threshold = self.min_p * top;
        let mut keep = vec![false; scores.len()];
        for i in top_indices(&probs, self.min_tokens_to_keep) {
            keep[i] = true;
        }
        for (i, s) in scores.iter_mut().enumerate() {
            if probs[i] < threshold && !keep[i] {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}
