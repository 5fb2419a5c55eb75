//! Mirostat 2.0 (Basu et al. 2021, arXiv:2007.14966), with llama.cpp's semantics
//! (`llama_sampler_mirostat_v2_apply` in `src/llama-sampling.cpp`; defaults tau 5.0, eta 0.1).
//!
//! State: `mu`, starting at `2 * tau`.
//! `process`: `p = softmax(scores)`; every token whose surprise `-log2(p)` exceeds `mu` gets `-inf`
//! (the tokens are taken in descending probability and cut at the first one over `mu`); if that
//! would remove everything, the most probable token is kept (the lowest id on ties). The kept
//! tokens' scores are unchanged, so sampling from them samples the renormalized distribution.
//! `accept(token)`: with `q` the chosen token's probability in that renormalized distribution
//! (`exp(s - max) / sum` over the kept tokens, in f32 as llama.cpp), `mu -= eta * (-log2(q) - tau)`.
//! A token that mirostat had removed (`q == 0`) leaves `mu` unchanged.
//!
//! Unlike llama.cpp, mirostat does not draw the token itself: the caller's sampler draws it from the
//! processed scores and reports it through `accept`.

use serde::{Deserialize, Serialize};

use super::util::{softmax, top_indices};
use super::{LogitsProcessor, ProcessContext};

/// Mirostat 2.0 settings (llama.cpp's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MirostatConfig {
    /// Target surprise (bits); > 0. Default 5.0.
    pub tau: f32,
    /// Learning rate of `mu`; >= 0. Default 0.1.
    pub eta: f32,
}

impl Default for MirostatConfig {
    fn default() -> Self {
        Self { tau: MirostatV2::DEFAULT_TAU, eta: MirostatV2::DEFAULT_ETA }
    }
}

pub struct MirostatV2 {
    tau: f32,
    eta: f32,
    mu: f32,
    /// The kept tokens and their renormalized probabilities from the last `process`.
    kept: Vec<(u32, f32)>,
}

impl MirostatV2 {
    pub const DEFAULT_TAU: f32 = 5.0;
    pub const DEFAULT_ETA: f32 = 0.1;

    pub fn new(tau: f32, eta: f32) -> Self {
        Self { tau, eta, mu: 2.0 * tau, kept: Vec::new() }
    }

    /// The current maximum surprise.
    pub fn mu(&self) -> f32 {
        self.mu
    }
}

impl LogitsProcessor for MirostatV2 {
    fn name(&self) -> &'static str {
        "mirostat_v2"
    }

    fn process(&mut self, _ctx: &mut ProcessContext, scores: &mut [f32]) {
        self.kept.clear();
        if scores.is_empty() {
            return;
        }
        let probs = softmax(scores);
        // Surprise falls as p rises, so cutting the descending order at the first token over `mu`
        // keeps exactly the tokens with surprise <= mu.
        let mut kept: Vec<usize> = (0..scores.len()).filter(|&i| -probs[i].log2() <= self.mu).collect();
        if kept.is_empty() {
            kept = top_indices(&probs, 1);
        }
        let mut keep = vec![false; scores.len()];
        kept.iter().for_each(|&i| keep[i] = true);
        for (s, k) in scores.iter_mut().zip(&keep) {
            if !k {
                *s = f32::NEG_INFINITY;
            }
        }
        let max = kept.iter().map(|&i| scores[i]).fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = kept.iter().map(|&i| (scores[i] - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        self.kept = kept.iter().zip(&exps).map(|(&i, &e)| (i as u32, e / sum)).collect();
    }

    fn accept(&mut self, token: u32, _scores: &[f32]) {
        let Some(&(_, q)) = self.kept.iter().find(|(t, _)| *t == token) else { return };
        if q.is_nan() || q <= 0.0 {
            return;
        }
        let surprise = -q.log2();
        self.mu -= self.eta * (surprise - self.tau);
    }
}
