//! Logits processors: each one rewrites one row's scores before a token is chosen.
//!
//! One processor per file. [`ProcessorChain`] runs them in HF transformers' order (see
//! `chain.rs`). Scores are f32 logits over the vocabulary; a removed token gets `f32::NEG_INFINITY`,
//! as HF's warpers use `-inf` as their filter value.

use rand::rngs::StdRng;

pub mod bad_words;
pub mod chain;
pub mod dry;
pub mod epsilon_cutoff;
pub mod eta_cutoff;
pub mod logit_bias;
pub mod min_new_tokens;
pub mod min_p;
pub mod mirostat_v2;
pub mod no_repeat_ngram;
pub mod presence_frequency;
pub mod repetition_penalty;
pub mod suppress_tokens;
pub mod temperature;
pub mod top_k;
pub mod top_p;
pub mod typical_p;
mod util;
pub mod xtc;

pub use chain::{DryConfig, MirostatConfig, ProcessorChain, ProcessorConfig, XtcConfig};

/// What a processor may look at when it rewrites one row's scores.
pub struct ProcessContext<'a> {
    /// The whole sequence so far: prompt then generated tokens (no padding).
    pub input_ids: &'a [u32],
    /// How many of `input_ids` are the prompt.
    pub prompt_len: usize,
    /// Randomness for processors that draw (XTC), seeded by the generation's `--seed`.
    pub rng: &'a mut StdRng,
    /// When the scores are only the device's top candidates: the token of each score, in
    /// increasing order. None for a whole vocabulary row.
    pub candidates: Option<&'a [u32]>,
}

impl ProcessContext<'_> {
    /// The tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.input_ids[self.prompt_len..]
    }

    /// Where `token`'s score is in the row: its id in a whole row, its place among the
    /// candidates (None when it is not one of them).
    pub fn score_index(&self, token: u32) -> Option<usize> {
        match self.candidates {
            Some(ids) => ids.binary_search(&token).ok(),
            None => Some(token as usize),
        }
    }
}

pub trait LogitsProcessor: Send {
    /// A short name for error messages and `pare score` output.
    fn name(&self) -> &'static str;
    /// Rewrite `scores` (one row, vocabulary-sized) in place.
    fn process(&mut self, ctx: &mut ProcessContext, scores: &mut [f32]);
    /// Told which token was chosen after this step (stateful processors such as mirostat).
    fn accept(&mut self, _token: u32, _scores: &[f32]) {}
}
