//! Banned token sequences, as HF transformers' `NoBadWordsLogitsProcessor` (a
//! [`SequenceBias`](super::logit_bias::SequenceBias) whose every bias is `-inf`).
//!
//! Rule: first, every single-token entry `[e]` with `e` an EOS id is dropped (HF never bans EOS
//! this way; multi-token sequences containing EOS stay). Then each step: a single-token entry `[t]`
//! gets `score[t] = -inf` always; an entry `[p_1, .., p_m, t]` bans `t` only when `input_ids` (prompt
//! included) ends with `p_1 .. p_m`.

use super::logit_bias::SequenceBias;
use super::{LogitsProcessor, ProcessContext};

pub struct BadWords {
    inner: SequenceBias,
}

impl BadWords {
    pub fn new(bad_words_ids: &[Vec<u32>], eos_token_ids: &[u32]) -> Self {
        let kept = bad_words_ids
            .iter()
            .filter(|seq| !(seq.len() == 1 && eos_token_ids.contains(&seq[0])))
            .map(|seq| (seq.clone(), f32::NEG_INFINITY));
        Self { inner: SequenceBias::new("bad_words", kept) }
    }
}

impl LogitsProcessor for BadWords {
    fn name(&self) -> &'static str {
        "bad_words"
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        self.inner.process(ctx, scores);
    }
}
