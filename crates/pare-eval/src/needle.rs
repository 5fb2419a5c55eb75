//! Needle in a haystack: a fact hidden at a chosen depth of a long context (Paul Graham essays),
//! then a question about it. Greedy decoding must return the fact.

use std::path::Path;

use candle_core::{DType, D};
use pare_formats::{ChatMessage, TokenizerBundle};
use pare_model::{Hooks, Model, ModelError, PrefillInput, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;

const QUESTION: &str = "What is the special magic number mentioned in the text above? Answer with the number only.";
/// Tokens left for the answer.
const ANSWER_TOKENS: usize = 12;

/// The haystack: every `.txt` file of `dir`, in name order, joined.
pub fn load_haystack(dir: &Path) -> Result<String> {
    let read_err = |e: std::io::Error| ModelError::Io { path: dir.display().to_string(), source: e };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::input(format!("{}: no .txt essays in the haystack directory", dir.display())));
    }
    let mut text = String::new();
    for f in files {
        text.push_str(
            &std::fs::read_to_string(&f).map_err(|e| ModelError::Io { path: f.display().to_string(), source: e })?,
        );
        text.push('\n');
    }
    Ok(text)
}

#[derive(Debug, Clone, Serialize)]
pub struct NeedleTrial {
    pub ctx: usize,
    pub depth_percent: f64,
    pub prompt_tokens: usize,
    pub needle: String,
    pub answer: String,
    pub found: bool,
    /// KV-cache bytes right after the prompt's prefill (compressed if a press is set).
    pub kv_bytes: usize,
}

/// One trial: a context of about `ctx` tokens with the needle at `depth_percent` of it.
pub fn needle_trial(
    model: &Model,
    tokenizer: &TokenizerBundle,
    haystack: &str,
    ctx: usize,
    depth_percent: f64,
    seed: u64,
    hooks: &Hooks,
) -> Result<NeedleTrial> {
    if !(0.0..=100.0).contains(&depth_percent) {
        return Err(ModelError::input(format!("`depths` are percentages in [0, 100], got {depth_percent}")));
    }
    if ctx + ANSWER_TOKENS > model.config().max_position_embeddings {
        return Err(ModelError::input(format!(
            "`ctx` {ctx} exceeds the model's context of {}",
            model.config().max_position_embeddings
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let number = rng.random_range(1_000_000..10_000_000u32).to_string();
    let needle = format!("The special magic number is {number}.");
    let hay_tokens = tokenizer.encode(haystack, false)?;
    let overhead = tokenizer.encode(&build_prompt(tokenizer, "", &needle)?, false)?.len() + ANSWER_TOKENS;
    if ctx <= overhead + 16 {
        return Err(ModelError::input(format!(
            "`ctx` {ctx} is too short for a haystack (the needle and question take {overhead})"
        )));
    }
    // Trim the haystack until the whole prompt fits the context.
    let mut budget = (ctx - overhead).min(hay_tokens.len());
    let prompt = loop {
        let context = tokenizer.decode(&hay_tokens[..budget], false)?;
        let text = insert_needle(&context, &needle, depth_percent);
        let prompt = tokenizer.encode(&build_prompt(tokenizer, &text, &needle)?, false)?;
        if prompt.len() + ANSWER_TOKENS <= ctx || budget < 32 {
            break prompt;
        }
        budget -= (prompt.len() + ANSWER_TOKENS - ctx).max(8);
    };
    let mut hooks = hooks.clone();
    let (mut logits, mut cache) = model.prefill(PrefillInput::Tokens(std::slice::from_ref(&prompt)), &mut hooks)?;
    let kv_bytes = cache.bytes();
    let mut answer_ids = Vec::new();
    for _ in 0..ANSWER_TOKENS {
        let next = logits.squeeze(0)?.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if tokenizer.eos_token_ids.contains(&next) {
            break;
        }
        answer_ids.push(next);
        logits = model.decode(&mut [(&mut cache, &mut hooks)], &[next])?;
    }
    let answer = tokenizer.decode(&answer_ids, true)?;
    Ok(NeedleTrial {
        ctx,
        depth_percent,
        prompt_tokens: prompt.len(),
        found: answer.contains(&number),
        needle,
        answer,
        kv_bytes,
    })
}

/// The context with the needle at a sentence boundary near `depth_percent` of its length.
fn insert_needle(context: &str, needle: &str, depth_percent: f64) -> String {
    let target = ((context.len() as f64) * depth_percent / 100.0) as usize;
    let mut at = target.min(context.len());
    while at > 0 && !context.is_char_boundary(at) {
        at -= 1;
    }
    if at == context.len() {
        return format!("{context} {needle}");
    }
    // Back up to the end of the previous sentence so the needle does not split one.
    at = context[..at].rfind(". ").map_or(0, |dot| dot + 2);
    format!("{}{} {}", &context[..at], needle, &context[at..])
}

/// The user turn in the model's chat template (plain text when it has none).
fn build_prompt(tokenizer: &TokenizerBundle, context: &str, _needle: &str) -> Result<String> {
    let content = format!("{context}\n\n{QUESTION}");
    Ok(match &tokenizer.chat_template {
        Some(template) => pare_formats::render_chat(
            template,
            &[ChatMessage { role: "user".into(), content }],
            true,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?,
        None => format!("{}{content}\nAnswer:", tokenizer.bos_token.clone().unwrap_or_default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needle_lands_at_sentence_boundaries() {
        let ctx = "One. Two two. Three three three. Four.";
        assert!(insert_needle(ctx, "N.", 0.0).starts_with("N. One."));
        assert!(insert_needle(ctx, "N.", 100.0).ends_with("Four. N."));
        let mid = insert_needle(ctx, "N.", 50.0);
        assert!(mid.contains(". N. "), "{mid}");
    }
}
