//! Minimum number of new tokens, as HF transformers' `MinNewTokensLengthLogitsProcessor`.
//!
//! Rule: while `input_ids.len() - prompt_len < min_new_tokens` (fewer new tokens than required), every
//! EOS id gets `score = -inf`; afterwards nothing changes. The prompt never counts. HF leaves the
//! processor out when there is no EOS id or `min_new_tokens == 0`; so does the chain.

use super::{LogitsProcessor, ProcessContext};

pub struct MinNewTokens {
    min_new_tokens: usize,
    eos_token_ids: Vec<u32>,
}

impl MinNewTokens {
    pub fn new(min_new_tokens: usize, eos_token_ids: Vec<u32>) -> Self {
        Self { min_new_tokens, eos_token_ids }
    }
}

impl LogitsProcessor for MinNewTokens {
    fn name(&self) -> &'static str {
        "min_new_tokens"
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        if ctx.generated().len() >= self.min_new_tokens {
            return;
        }
        for &t in &self.eos_token_ids {
            if let Some(s) = ctx.score_index(t).and_then(|i| scores.get_mut(i)) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}
