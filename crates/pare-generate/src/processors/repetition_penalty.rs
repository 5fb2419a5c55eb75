//! Repetition penalty (CTRL, Keskar et al. 2019), as HF transformers'
//! `RepetitionPenaltyLogitsProcessor` (`generation/logits_process.py`).
//!
//! Rule: for every DISTINCT token id `t` that occurs anywhere in `input_ids` — the prompt included,
//! as HF does for decoder-only models without left padding — and is inside the vocabulary:
//! `score[t] = score[t] < 0 ? score[t] * penalty : score[t] / penalty`. The penalty is applied at
//! most once per token, however often it occurred. `penalty > 1` discourages repetition,
//! `0 < penalty < 1` encourages it, `1` is a no-op (the chain leaves it out, as HF does).

use super::{LogitsProcessor, ProcessContext};

pub struct RepetitionPenalty {
    penalty: f32,
    seen: Vec<bool>,
}

impl RepetitionPenalty {
    pub fn new(penalty: f32) -> Self {
        Self { penalty, seen: Vec::new() }
    }
}

impl LogitsProcessor for RepetitionPenalty {
    fn name(&self) -> &'static str {
        "repetition_penalty"
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        self.seen.clear();
        self.seen.resize(scores.len(), false);
        for &t in ctx.input_ids {
            let t = t as usize;
            if t >= scores.len() || self.seen[t] {
                continue;
            }
            self.seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * self.penalty } else { s / self.penalty };
        }
    }
}
