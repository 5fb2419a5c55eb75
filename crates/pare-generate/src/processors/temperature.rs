//! Temperature, as HF transformers' `TemperatureLogitsWarper`, plus llama.cpp's meaning of 0.
//!
//! Rule: `temperature > 0`: `score = score / temperature` (float32 division, as torch). `1.0` is a
//! no-op (the chain leaves it out, as HF does).
//! `temperature == 0`: HF raises; pare follows llama.cpp (`llama_sampler_temp_impl`), vLLM and the
//! OpenAI API instead and makes the step greedy: the FIRST largest score is kept and every other
//! score becomes `-inf`, so any sampler afterwards picks the argmax. Negative values are rejected
//! by `ProcessorConfig::validate`.

use super::{LogitsProcessor, ProcessContext};

pub struct Temperature {
    temperature: f32,
}

impl Temperature {
    pub fn new(temperature: f32) -> Self {
        assert!(temperature >= 0.0, "temperature must be >= 0");
        Self { temperature }
    }
}

impl LogitsProcessor for Temperature {
    fn name(&self) -> &'static str {
        "temperature"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        if self.temperature > 0.0 {
            for s in scores.iter_mut() {
                *s /= self.temperature;
            }
            return;
        }
        let mut best = 0;
        for (i, &s) in scores.iter().enumerate() {
            if s > scores[best] {
                best = i;
            }
        }
        for (i, s) in scores.iter_mut().enumerate() {
            if i != best {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}
