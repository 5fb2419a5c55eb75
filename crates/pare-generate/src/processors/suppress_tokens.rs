//! Token suppression, as HF transformers' `SuppressTokensLogitsProcessor`.
//!
//! Rule: `score[t] = -inf` for every `t` in `suppress_tokens` (ids outside the vocabulary are
//! ignored), at every step.

use super::{LogitsProcessor, ProcessContext};

pub struct SuppressTokens {
    tokens: Vec<u32>,
}

impl SuppressTokens {
    pub fn new(tokens: Vec<u32>) -> Self {
        Self { tokens }
    }
}

impl LogitsProcessor for SuppressTokens {
    fn name(&self) -> &'static str {
        "suppress_tokens"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        for &t in &self.tokens {
            if let Some(s) = scores.get_mut(t as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}
