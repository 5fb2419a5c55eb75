//! Locally typical sampling (Meister et al. 2022), as HF transformers' `TypicalLogitsWarper`.
//!
//! Rule: `l = log_softmax(scores)`, `p = exp(l)`, entropy `H = -sum(p * l)` (NaN terms from `-inf`
//! scores skipped, as `nansum`). Each token's distance is `d = |-l - H|`. Sort tokens by `d`
//! ascending, take the softmax of the scores in that order and its running sum `c` (f64
//! accumulation, f32 values); `last = min(#{c < typical_p}, vocab - 1)`. Every token with
//! `d > d_sorted[last]` gets `-inf`, except the first `min_tokens_to_keep` tokens of the sorted order.
//! `typical_p == 1` is off (the chain leaves it out).

use super::util::{argsort, asc, log_softmax, softmax};
use super::{LogitsProcessor, ProcessContext};

pub struct TypicalP {
    mass: f32,
    min_tokens_to_keep: usize,
}

impl TypicalP {
    pub fn new(mass: f32, min_tokens_to_keep: usize) -> Self {
        Self { mass, min_tokens_to_keep }
    }
}

impl LogitsProcessor for TypicalP {
    fn name(&self) -> &'static str {
        "typical_p"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        let n = scores.len();
        if n == 0 {
            return;
        }
        let logp = log_softmax(scores);
        let mut ent = 0.0f32;
        for &l in &logp {
            let term = l * l.exp();
            if !term.is_nan() {
                ent += term;
            }
        }
        let ent = -ent;
        let dist: Vec<f32> = logp.iter().map(|&l| (-l - ent).abs()).collect();
        let order = argsort(&dist, asc);
        let probs = softmax(scores);
        let mut cum = 0.0f64;
        let mut below = 0usize;
        for &i in &order {
            cum += probs[i] as f64;
            if (cum as f32) < self.mass {
                below += 1;
            }
        }
        let last = below.min(n - 1);
        let cutoff = dist[order[last]];
        for (pos, &i) in order.iter().enumerate() {
            if pos >= self.min_tokens_to_keep && dist[i] > cutoff {
                scores[i] = f32::NEG_INFINITY;
            }
        }
    }
}
