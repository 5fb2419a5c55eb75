//! Top-k, as HF transformers' `TopKLogitsWarper`.
//!
//! Rule: `k = min(max(top_k, min_tokens_to_keep), vocab)`; with `v` the k-th largest score, every
//! score `< v` becomes `-inf`. Tokens tied with `v` are all kept, so more than `k` may survive.
//! `top_k == 0` is off (the chain leaves it out, as HF does); negative values cannot be expressed
//! (`u32`).

use super::util::kth_largest;
use super::{LogitsProcessor, ProcessContext};

pub struct TopK {
    k: usize,
}

impl TopK {
    pub fn new(top_k: usize, min_tokens_to_keep: usize) -> Self {
        assert!(top_k > 0, "top_k must be > 0");
        Self { k: top_k.max(min_tokens_to_keep) }
    }
}

impl LogitsProcessor for TopK {
    fn name(&self) -> &'static str {
        "top_k"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        if scores.is_empty() {
            return;
        }
        let v = kth_largest(scores, self.k);
        for s in scores.iter_mut() {
            if *s < v {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}
