//! Sliding-window perplexity.
//!
//! Windows start every `stride` tokens and hold at most `ctx` tokens. A window scores only the
//! tokens no earlier window scored, and never its own first token (it has no context), so each
//! token is scored once, with as much context as its window gives. PPL = exp(ΣNLL / scored).

use candle_core::{DType, Tensor, D};
use pare_model::{Hooks, Logits, Model, ModelError, Phase, PrefillInput, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PerplexityResult {
    pub ppl: f64,
    pub nll_sum: f64,
    pub scored_tokens: usize,
    pub tokens: usize,
    /// The most KV-cache bytes in use in any window.
    pub kv_bytes_peak: usize,
    /// The most bytes a window's context held once prefilled (compressed, with a press): the
    /// cache the continuation is scored over, before it grows by the continuation itself.
    pub kv_bytes_context: usize,
    /// Tokens the press ran beyond the windows' contexts (KVzip's replay, ~1× each context).
    #[serde(skip_serializing_if = "is_zero")]
    pub press_tokens: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
        return Err(ModelError::input("`ctx` must be at least 1"));
    }
    if stride == 0 || stride > ctx {
        return Err(ModelError::input(format!("`stride` must be between 1 and `ctx` ({ctx}), got {stride}")));
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

/// llama-perplexity's windows: whole chunks of `ctx` tokens (a shorter tail is dropped), only the
/// second half of each scored, so that every scored token has at least ctx/2 tokens of context.
pub fn llama_cpp_windows(n: usize, ctx: usize) -> Result<Vec<Window>> {
    if ctx < 4 {
        return Err(ModelError::input(format!("llama-perplexity's protocol needs `ctx` of at least 4, got {ctx}")));
    }
    if n < ctx {
        return Err(ModelError::input(format!("the text has {n} tokens, fewer than one chunk of {ctx}")));
    }
    Ok((0..n / ctx).map(|c| Window { begin: c * ctx, end: (c + 1) * ctx, score_from: c * ctx + ctx / 2 + 1 }).collect())
}

/// Perplexity of `tokens`; `progress(done, total)` is called after each window.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    progress: impl FnMut(usize, usize),
) -> Result<PerplexityResult> {
    perplexity_with(model, tokens, ctx, stride, &Hooks::default(), progress)
}

/// [`perplexity`] where each window's context (the tokens before its first scored token) is
/// prefilled with (a fresh copy of) `hooks` — a cache compressed by its press, the context's
/// tokens pruned by its pruner — and the scored tokens then run over that cache: the quality of a
/// continuation after a compressed context.
pub fn perplexity_with(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    hooks: &Hooks,
    progress: impl FnMut(usize, usize),
) -> Result<PerplexityResult> {
    if tokens.len() < 2 {
        return Err(ModelError::input(format!("perplexity needs at least 2 tokens, the text has {}", tokens.len())));
    }
    check_ctx(model, ctx)?;
    perplexity_over(model, tokens, &windows(tokens.len(), ctx, stride)?, None, hooks, progress)
}

/// Perplexity as llama-perplexity computes it ([`llama_cpp_windows`]), each chunk's first token
/// replaced by `bos` when the vocabulary adds one, so that pare's numbers and llama.cpp's compare.
pub fn perplexity_llama_cpp(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    hooks: &Hooks,
    progress: impl FnMut(usize, usize),
) -> Result<PerplexityResult> {
    check_ctx(model, ctx)?;
    perplexity_over(model, tokens, &llama_cpp_windows(tokens.len(), ctx)?, bos, hooks, progress)
}

fn check_ctx(model: &Model, ctx: usize) -> Result<()> {
    if ctx > model.config().max_position_embeddings {
        return Err(ModelError::input(format!(
            "`ctx` {ctx} exceeds the model's context of {} tokens",
            model.config().max_position_embeddings
        )));
    }
    Ok(())
}

/// The scored tokens of every window; `first` replaces each window's first token.
fn perplexity_over(
    model: &Model,
    tokens: &[u32],
    windows: &[Window],
    first: Option<u32>,
    hooks: &Hooks,
    mut progress: impl FnMut(usize, usize),
) -> Result<PerplexityResult> {
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    let (mut kv_bytes_peak, mut kv_bytes_context) = (0usize, 0usize);
    let mut press_tokens = 0;
    for (i, w) in windows.iter().enumerate() {
        if w.score_from < w.end {
            let mut window = tokens[w.begin..w.end].to_vec();
            if let Some(t) = first {
                window[0] = t;
            }
            let split = w.score_from - w.begin;
            // Logits predicting tokens score_from..end, one row each.
            let mut hooks = hooks.clone();
            let logits = if hooks.is_empty() {
                let mut cache = model.new_cache(1);
                let positions = vec![(0..window.len() as i64).collect::<Vec<_>>()];
                let x = model.embed(std::slice::from_ref(&window))?;
                let all =
                    model.forward(x, &positions, &mut cache, &mut hooks, Phase::Prefill, Logits::All)?.squeeze(0)?;
                kv_bytes_peak = kv_bytes_peak.max(cache.bytes());
                // Uncompressed, every entry weighs the same: the context's share of the window's.
                kv_bytes_context = kv_bytes_context.max(cache.bytes() / window.len() * split);
                all.narrow(0, split - 1, window.len() - split)?
            } else {
                let context = [window[..split].to_vec()];
                let (first, mut cache) = model.prefill(PrefillInput::Tokens(&context), &mut hooks)?;
                press_tokens += hooks.extra_tokens();
                kv_bytes_context = kv_bytes_context.max(cache.bytes());
                let rest = &window[split..window.len() - 1];
                if rest.is_empty() {
                    first
                } else {
                    let start = cache.next_positions()[0];
                    let positions = vec![(start..start + rest.len() as i64).collect::<Vec<_>>()];
                    let x = model.embed(&[rest.to_vec()])?;
                    let more =
                        model.forward(x, &positions, &mut cache, &mut hooks, Phase::Extend, Logits::All)?.squeeze(0)?;
                    kv_bytes_peak = kv_bytes_peak.max(cache.bytes());
                    Tensor::cat(&[&first, &more], 0)?
                }
            };
            nll_sum += nll(&logits, &tokens[w.score_from..w.end])?;
            scored += w.end - w.score_from;
        }
        progress(i + 1, windows.len());
    }
    Ok(PerplexityResult {
        ppl: (nll_sum / scored as f64).exp(),
        nll_sum,
        scored_tokens: scored,
        tokens: tokens.len(),
        kv_bytes_peak: kv_bytes_peak.max(kv_bytes_context),
        kv_bytes_context,
        press_tokens,
    })
}

/// Summed negative log-likelihood of `targets` under logits (targets, vocab).
fn nll(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let logprobs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let rows: Vec<Vec<f32>> = logprobs.to_vec2()?;
    Ok(-rows.iter().zip(targets).map(|(row, &t)| row[t as usize] as f64).sum::<f64>())
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    pub ppl: f64,
    pub scored_tokens: usize,
    /// The most bytes the KV cache held (keys and values in use) at any step.
    pub kv_bytes_peak: usize,
}

/// StreamingLLM's evaluation: the text runs token by token from its first token, one forward
/// per token over one cache (compressed by the hooks' press as it defines), each token scored
/// from the previous step's logits.
pub fn perplexity_stream(
    model: &Model,
    tokens: &[u32],
    hooks: &Hooks,
    mut progress: impl FnMut(usize, usize),
) -> Result<StreamResult> {
    if tokens.len() < 2 {
        return Err(ModelError::input(format!("perplexity needs at least 2 tokens, the text has {}", tokens.len())));
    }
    let mut hooks = hooks.clone();
    let (mut logits, mut cache) = model.prefill(PrefillInput::Tokens(&[vec![tokens[0]]]), &mut hooks)?;
    let mut nll_sum = 0.0;
    let mut peak = cache.bytes();
    let steps = tokens.len() - 1;
    for (i, &target) in tokens[1..].iter().enumerate() {
        nll_sum += nll(&logits, &[target])?;
        if i + 1 < steps {
            logits = model.decode(&mut [(&mut cache, &mut hooks)], &[target])?;
            peak = peak.max(cache.bytes());
        }
        progress(i + 1, steps);
    }
    Ok(StreamResult { ppl: (nll_sum / steps as f64).exp(), scored_tokens: steps, kv_bytes_peak: peak })
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
