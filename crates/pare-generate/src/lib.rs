//! The generation loop: prefill the prompts once, then decode one token per step over the KV cache
//! until every row stops.

pub mod processors;

use std::time::Instant;

use candle_core::Tensor;
use pare_model::{Model, Result};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Generation stops for a row when it produces one of these.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_new_tokens reached.
    Length,
    /// An EOS token was produced (it is part of `tokens`).
    Eos,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Prompt tokens per second of prefill (all rows).
    pub prefill_tok_s: f64,
    /// Generated tokens per second of decode, counting every row's token of each step.
    pub decode_tok_s: f64,
}

/// Greedy generation for a batch of prompts. `on_token(row, token)` sees each new token as it is
/// chosen (for streaming).
pub fn generate_greedy(
    model: &Model,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32),
) -> Result<(Vec<Generation>, Timings)> {
    let mut timings = Timings { prompt_tokens: prompts.iter().map(Vec::len).sum(), ..Timings::default() };
    let mut out: Vec<Generation> =
        prompts.iter().map(|_| Generation { tokens: Vec::new(), finish_reason: FinishReason::Length }).collect();
    if options.max_new_tokens == 0 {
        return Ok((out, timings));
    }
    let start = Instant::now();
    let (mut logits, mut cache) = model.prefill(prompts)?;
    timings.prefill_s = start.elapsed().as_secs_f64();

    let decode_start = Instant::now();
    let mut done = vec![false; prompts.len()];
    let mut decode_steps = 0usize;
    loop {
        let next = argmax_rows(&logits)?;
        for (row, &token) in next.iter().enumerate() {
            if done[row] {
                continue;
            }
            out[row].tokens.push(token);
            timings.generated_tokens += 1;
            on_token(row, token);
            if options.eos_token_ids.contains(&token) {
                out[row].finish_reason = FinishReason::Eos;
                done[row] = true;
            } else if out[row].tokens.len() >= options.max_new_tokens {
                done[row] = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // Finished rows keep stepping with their last token; their outputs are discarded.
        logits = model.decode(&mut cache, &next)?;
        decode_steps += 1;
    }
    timings.decode_s = decode_start.elapsed().as_secs_f64();
    timings.prefill_tok_s = rate(timings.prompt_tokens, timings.prefill_s);
    timings.decode_tok_s = rate(decode_steps * prompts.len(), timings.decode_s);
    Ok((out, timings))
}

/// The index of each row's largest logit (the first one on ties, as torch.argmax).
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

fn rate(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}
