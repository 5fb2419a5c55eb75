//! No-repeat n-gram blocking, as HF transformers' `NoRepeatNGramLogitsProcessor`.
//!
//! Rule: with `n = ngram_size` and `L = input_ids.len()` (prompt INCLUDED, as HF for decoder-only
//! models): if `L < n` nothing is banned. Otherwise the current prefix is the last `n - 1` tokens;
//! for every window `input_ids[i..i + n]` (`0 <= i <= L - n`) whose first `n - 1` tokens equal that
//! prefix, the window's last token gets `-inf` (emitting it would repeat an n-gram). With `n = 1`
//! every token already in `input_ids` is banned. `n = 0` is off (the chain leaves it out).

use super::{LogitsProcessor, ProcessContext};

pub struct NoRepeatNGram {
    n: usize,
}

impl NoRepeatNGram {
    pub fn new(n: usize) -> Self {
        assert!(n > 0, "no_repeat_ngram_size must be > 0");
        Self { n }
    }
}

impl LogitsProcessor for NoRepeatNGram {
    fn name(&self) -> &'static str {
        "no_repeat_ngram"
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        let ids = ctx.input_ids;
        let (n, len) = (self.n, ids.len());
        if len < n {
            return;
        }
        let prefix = &ids[len + 1 - n..];
        for window in ids.windows(n) {
            if &window[..n - 1] == prefix {
                if let Some(s) = scores.get_mut(window[n - 1] as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }
}
