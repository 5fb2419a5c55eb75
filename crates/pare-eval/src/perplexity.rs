//! Sliding-window perplexity.
//!
//! Windows start every `stride` tokens and hold at most `ctx` tokens. A window scores only the
//! tokens no earlier window scored, and never its own first token (it has no context), so each
//! token is scored once, with as much context as its window gives. PPL = exp(ΣNLL / scored).

use candle_core::{DType, D};
use pare_model::{Model, ModelError, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PerplexityResult {
    pub ppl: f64,
    pub nll_sum: f64,
    pub scored_tokens: usize,
    pub tokens: usize,
}

/// One window: tokens `begin..end` run through the model, targets `score_from..end` scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub score_from: usize,
}

/// The windows HF's guide walks for `n` tokens.
pub fn windows(n: usize, ctx: usize, stride: usize) -> Result<Vec<Window>> {
    if ctx == 0 {
        return Err(ModelError::input("--ctx must be at least 1"));
    }
    if stride == 0 || stride > ctx {
        return Err(ModelError::input(format!("--stride must be between 1 and --ctx ({ctx}), got {stride}")));
    }
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + ctx).min(n);
        // The window's first token has no context inside the window, so it is never a target.
        let score_from = prev_end.max(begin + 1);
        out.push(Window { begin, end, score_from });
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    Ok(out)
}

/// Perplexity of `tokens`; `progress(done, total)` is called after each window.
pub fn perplexity(model: &Model, tokens: &[u32], ctx: usize, stride: usize, mut progress: impl FnMut(usize, usize)) -> Result<PerplexityResult> {
    if tokens.len() < 2 {
        return Err(ModelError::input(format!("perplexity needs at least 2 tokens, the text has {}", tokens.len())));
    }
    if ctx > model.config.max_position_embeddings {
        return Err(ModelError::input(format!(
            "--ctx {ctx} exceeds the model's context of {} tokens",
            model.config.max_position_embeddings
        )));
    }
    let windows = windows(tokens.len(), ctx, stride)?;
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    for (i, w) in windows.iter().enumerate() {
        if w.score_from < w.end {
            let logits = model.logits_all(&tokens[w.begin..w.end])?;
            // Logits at position p predict token p+1.
            let first = w.score_from - w.begin - 1;
            let count = w.end - w.score_from;
            let logprobs = candle_nn::ops::log_softmax(&logits.narrow(0, first, count)?.to_dtype(DType::F32)?, D::Minus1)?;
            let rows: Vec<Vec<f32>> = logprobs.to_vec2()?;
            for (j, row) in rows.iter().enumerate() {
                nll_sum -= row[tokens[w.score_from + j] as usize] as f64;
            }
            scored += count;
        }
        progress(i + 1, windows.len());
    }
    Ok(PerplexityResult { ppl: (nll_sum / scored as f64).exp(), nll_sum, scored_tokens: scored, tokens: tokens.len() })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_each_token_at_most_once() {
        for (n, ctx, stride) in [(10, 4, 4), (10, 4, 2), (11, 5, 3), (3, 8, 8), (9, 3, 1), (11, 5, 5)] {
            let ws = windows(n, ctx, stride).unwrap();
            let mut scored = vec![0; n];
            for w in &ws {
                assert!(w.end - w.begin <= ctx);
                for count in &mut scored[w.score_from..w.end] {
                    *count += 1;
                }
            }
            assert_eq!(scored[0], 0, "the first token has no context");
            assert!(scored.iter().all(|&c| c <= 1), "{n} {ctx} {stride}: {scored:?}");
            if stride < ctx {
                // Overlapping windows give every later token context: all are scored.
                assert!(scored[1..].iter().all(|&c| c == 1), "{n} {ctx} {stride}: {scored:?}");
            } else {
                // Disjoint windows leave each window's first token unscored.
                let unscored: Vec<usize> = (0..n).filter(|&t| scored[t] == 0).collect();
                assert_eq!(unscored, ws.iter().map(|w| w.begin).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn non_overlapping_windows_skip_each_first_token() {
        // HF's guide with stride = ctx: 4096 tokens, ctx 512 → 8 windows, 8 unscored tokens.
        let ws = windows(4096, 512, 512).unwrap();
        let scored: usize = ws.iter().map(|w| w.end - w.score_from).sum();
        assert_eq!((ws.len(), scored), (8, 4088));
    }

    #[test]
    fn window_starts_follow_the_stride() {
        let ws = windows(10, 4, 3).unwrap();
        let starts: Vec<_> = ws.iter().map(|w| (w.begin, w.end, w.score_from)).collect();
        assert_eq!(starts, vec![(0, 4, 1), (3, 7, 4), (6, 10, 7)]);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(windows(10, 0, 1).is_err());
        assert!(windows(10, 4, 5).is_err());
        assert!(windows(10, 4, 0).is_err());
    }
}
