//! Presence and frequency penalties, OpenAI's rule as vLLM applies it
//! (`vllm/model_executor/layers/utils.py::apply_penalties`).
//!
//! Rule: with `count[t]` = how many times token `t` occurs among the GENERATED tokens (the prompt
//! does not count), `score[t] -= frequency_penalty * count[t]`, then
//! `score[t] -= presence_penalty * [count[t] > 0]` (two subtractions, in vLLM's order). Tokens never
//! generated are untouched. Positive values discourage repetition, negative ones encourage it.

use super::{LogitsProcessor, ProcessContext};

pub struct PresenceFrequencyPenalty {
    presence: f32,
    frequency: f32,
    counts: Vec<u32>,
}

impl PresenceFrequencyPenalty {
    pub fn new(presence: f32, frequency: f32) -> Self {
        Self { presence, frequency, counts: Vec::new() }
    }
}

impl LogitsProcessor for PresenceFrequencyPenalty {
    fn name(&self) -> &'static str {
        "presence_frequency"
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        self.counts.clear();
        self.counts.resize(scores.len(), 0);
        let generated = ctx.generated();
        for &t in generated {
            if let Some(c) = self.counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        for &t in generated {
            let t = t as usize;
            let Some(&count) = self.counts.get(t) else { continue };
            if count == 0 {
                continue; // already applied
            }
            scores[t] -= self.frequency * count as f32;
            scores[t] -= self.presence;
            self.counts[t] = 0;
        }
    }
}
