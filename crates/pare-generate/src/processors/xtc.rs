//! XTC, "Exclude Top Choices" (p-e-w, text-generation-webui #6335), with llama.cpp's semantics
//! (`llama_sample_xtc_apply` in `src/llama-sampling.cpp`; defaults there: probability 0 = off,
//! threshold 0.1).
//!
//! Rule: the candidates are the tokens whose score is not `-inf` (earlier truncation removed the
//! others, as llama.cpp shrinks its candidate array). If `probability <= 0`, `threshold > 0.5` (two
//! tokens can then never both reach it) or there are fewer than 2 candidates, nothing happens and
//! nothing is drawn. Otherwise one `f32` is drawn uniformly from `[0, 1)` with `ctx.rng`; if it is
//! `> probability` nothing happens. Otherwise the candidates are sorted by probability (softmax)
//! descending; `pos_last` is the last position of the leading run with `p >= threshold`. If
//! `pos_last > 0` (at least two tokens reach the threshold) and `candidates - pos_last >= min_keep`,
//! the `pos_last` most probable tokens get `-inf`: every token at or above the threshold except the
//! least probable of them. Ties sort by id (lower first).

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::util::{desc, softmax};
use super::{LogitsProcessor, ProcessContext};

/// XTC settings (llama.cpp's defaults: `probability` 0 is off).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct XtcConfig {
    /// Chance per step that XTC acts; in [0, 1]; 0 = off.
    pub probability: f32,
    /// In [0, 1]; above 0.5 XTC can never act. Default 0.1.
    pub threshold: f32,
    /// XTC does not act if fewer tokens than this would remain. Default 1.
    pub min_keep: usize,
}

impl Default for XtcConfig {
    fn default() -> Self {
        Self { probability: 0.0, threshold: 0.1, min_keep: 1 }
    }
}

pub struct Xtc {
    probability: f32,
    threshold: f32,
    min_keep: usize,
}

impl Xtc {
    pub fn new(probability: f32, threshold: f32, min_keep: usize) -> Self {
        Self { probability, threshold, min_keep }
    }
}

impl LogitsProcessor for Xtc {
    fn name(&self) -> &'static str {
        "xtc"
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        let candidates = scores.iter().filter(|&&s| s != f32::NEG_INFINITY).count();
        if self.probability <= 0.0 || self.threshold > 0.5 || candidates < 2 {
            return;
        }
        let chance: f32 = ctx.rng.random();
        if chance > self.probability {
            return;
        }
        let probs = softmax(scores);
        // The leading run of the descending order with p >= threshold is every such candidate.
        let mut order: Vec<usize> =
            (0..scores.len()).filter(|&i| scores[i] != f32::NEG_INFINITY && probs[i] >= self.threshold).collect();
        order.sort_by(|&i, &j| desc(probs[i], probs[j]));
        let pos_last = order.len().saturating_sub(1);
        if candidates - pos_last >= self.min_keep && pos_last > 0 {
            for &i in &order[..pos_last] {
                scores[i] = f32::NEG_INFINITY;
            }
        }
    }
}
