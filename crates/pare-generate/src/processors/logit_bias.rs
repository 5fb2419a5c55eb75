//! Additive biases on tokens and token sequences, as HF transformers' `SequenceBiasLogitsProcessor`
//! (which `generation_config.sequence_bias` builds). pare's `logit_bias` (OpenAI-style
//! `token -> bias`) is the single-token case; [`super::bad_words`] is the `-inf` case.
//!
//! Rule: sequences are deduplicated as HF's dict does (a repeated sequence keeps its LAST bias).
//! Each step a bias row starts at 0; every single-token sequence `[t]` adds its bias at `t`, always.
//! A sequence `[p_1, .., p_m, t]` (m >= 1) adds its bias at `t` only when `input_ids` ends with
//! `p_1 .. p_m` (i.e. emitting `t` next would complete it); several matches on one `t` add up. Then
//! `score += bias` (so `-inf` bans, and `-inf` scores stay `-inf`). Ids outside the vocabulary are
//! ignored (HF raises).

use super::{LogitsProcessor, ProcessContext};

pub struct SequenceBias {
    name: &'static str,
    /// `(token, bias)` for the single-token sequences, in first-insertion order.
    single: Vec<(u32, f32)>,
    /// `(prefix, last token, bias)` for the longer ones, in first-insertion order.
    multi: Vec<(Vec<u32>, u32, f32)>,
    /// Scratch: the bias of each touched token this step.
    bias: Vec<(u32, f32)>,
}

impl SequenceBias {
    /// `sequences`: `(token ids, bias)`; empty sequences are skipped.
    pub fn new(name: &'static str, sequences: impl IntoIterator<Item = (Vec<u32>, f32)>) -> Self {
        let mut single: Vec<(u32, f32)> = Vec::new();
        let mut multi: Vec<(Vec<u32>, u32, f32)> = Vec::new();
        for (seq, bias) in sequences {
            match seq.as_slice() {
                [] => {}
                [t] => match single.iter_mut().find(|(u, _)| u == t) {
                    Some(e) => e.1 = bias,
                    None => single.push((*t, bias)),
                },
                [prefix @ .., last] => match multi.iter_mut().find(|(p, l, _)| p == prefix && l == last) {
                    Some(e) => e.2 = bias,
                    None => multi.push((prefix.to_vec(), *last, bias)),
                },
            }
        }
        Self { name, single, multi, bias: Vec::new() }
    }

    /// OpenAI-style `logit_bias`: single tokens only.
    pub fn logit_bias(biases: &[(u32, f32)]) -> Self {
        Self::new("logit_bias", biases.iter().map(|&(t, b)| (vec![t], b)))
    }

    pub fn is_empty(&self) -> bool {
        self.single.is_empty() && self.multi.is_empty()
    }
}

impl LogitsProcessor for SequenceBias {
    fn name(&self) -> &'static str {
        self.name
    }

    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]) {
        self.bias.clear();
        self.bias.extend(self.single.iter().copied());
        let ids = ctx.input_ids;
        for (prefix, last, b) in &self.multi {
            if prefix.len() <= ids.len() && ids.ends_with(prefix) {
                match self.bias.iter_mut().find(|(t, _)| t == last) {
                    Some(e) => e.1 += b,
                    None => self.bias.push((*last, *b)),
                }
            }
        }
        for &(t, b) in &self.bias {
            if let Some(s) = scores.get_mut(t as usize) {
                *s += b;
            }
        }
    }
}
