//! Top-p (nucleus), as HF transformers' `TopPLogitsWarper`.
//!
//! Rule: sort the scores ASCENDING, take the softmax in that order and its running sum `c_i`
//! (accumulated in f64 and stored as f32, as torch's CPU `cumsum`); token `i` is removed when
//! `c_i <= 1 - top_p` (the threshold computed in f64 from the f32 `top_p`, then rounded to f32, as
//! torch compares a float32 tensor with a Python float). The last `min_tokens_to_keep` positions
//! of the ascending order (the most probable tokens) are always kept. Removed tokens get `-inf`.
//! `top_p == 1` is off (the chain leaves it out). Ties straddling the cut: pare's sort is stable
//! (lower id first, so removed first); torch's is unspecified.

use super::util::{asc, softmax};
use super::{LogitsProcessor, ProcessContext};

pub struct TopP {
    top_p: f32,
    min_tokens_to_keep: usize,
}

impl TopP {
    pub fn new(top_p: f32, min_tokens_to_keep: usize) -> Self {
        Self { top_p, min_tokens_to_keep }
    }
}

impl LogitsProcessor for TopP {
    fn name(&self) -> &'static str {
        "top_p"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        // Tokens already at -inf sort first with probability 0: they add nothing to the running sum
        // and stay removed, so only the others are sorted (the usual top-k -> top-p chain sorts k).
        let probs = softmax(scores);
        let mut order: Vec<usize> = (0..scores.len()).filter(|&i| scores[i] != f32::NEG_INFINITY).collect();
        order.sort_by(|&i, &j| asc(scores[i], scores[j]));
        let threshold = (1.0 - self.top_p as f64) as f32;
        let keep_from = order.len().saturating_sub(self.min_tokens_to_keep);
        let mut cum = 0.0f64;
        let mut remove = Vec::new();
        for (pos, &i) in order.iter().enumerate() {
            cum += probs[i] as f64;
            if pos < keep_from && (cum as f32) <= threshold {
                remove.push(i);
            }
        }
        for i in remove {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}
