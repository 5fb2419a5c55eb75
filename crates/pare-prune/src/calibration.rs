//! Calibration data: N samples of L tokens cut from a text file (LLM-Pruner takes 10 × 64).
//!
//! The text is tokenized whole, as the model's tokenizer does by default, and sample i is tokens
//! `i·L .. (i+1)·L`: consecutive, never overlapping, reproducible without a seed.

use serde::Serialize;

use crate::error::{PruneError, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Where the text came from (a path, for the plan's record).
    pub source: String,
    pub samples: usize,
    pub tokens_per_sample: usize,
    /// Tokens the whole text has.
    pub text_tokens: usize,
    #[serde(skip)]
    pub ids: Vec<Vec<u32>>,
}

/// Cut `samples` × `len` tokens from the token stream of a text.
pub fn from_tokens(tokens: &[u32], samples: usize, len: usize, source: &str) -> Result<Calibration> {
    if samples == 0 {
        return Err(PruneError::input("`calib_samples` must be at least 1"));
    }
    if len < 2 {
        return Err(PruneError::input("`calib_len` must be at least 2 (a sample predicts its own next tokens)"));
    }
    let need = samples.checked_mul(len).ok_or_else(|| PruneError::input("`calib_samples` × `calib_len` overflows"))?;
    if tokens.len() < need {
        return Err(PruneError::input(format!(
            "calibration text {source} has {} tokens, fewer than the {samples} × {len} = {need} requested",
            tokens.len()
        )));
    }
    let ids = tokens.chunks(len).take(samples).map(<[u32]>::to_vec).collect();
    Ok(Calibration { source: source.to_string(), samples, tokens_per_sample: len, text_tokens: tokens.len(), ids })
}

/// Tokenize `text` with the model's tokenizer and cut the samples.
pub fn from_text(
    tokenizer: &pare_formats::TokenizerBundle,
    text: &str,
    samples: usize,
    len: usize,
    source: &str,
) -> Result<Calibration> {
    let tokens = tokenizer.encode(text, true)?;
    from_tokens(&tokens, samples, len, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_samples() {
        let t: Vec<u32> = (0..10).collect();
        let c = from_tokens(&t, 3, 3, "x").unwrap();
        assert_eq!(c.ids, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]);
        assert_eq!(c.text_tokens, 10);
    }

    #[test]
    fn too_short_or_degenerate() {
        let t: Vec<u32> = (0..10).collect();
        let e = from_tokens(&t, 4, 3, "short.txt").unwrap_err().to_string();
        assert!(e.contains("short.txt has 10 tokens, fewer than the 4 × 3 = 12"), "{e}");
        assert!(from_tokens(&t, 0, 3, "x").is_err());
        assert!(from_tokens(&t, 2, 1, "x").is_err());
    }
}
