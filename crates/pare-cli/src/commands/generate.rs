//! `pare generate`: greedy generation, streamed to stdout.

use std::io::Write;

use anyhow::{bail, Result};
use pare_generate::{generate_greedy, GenerateOptions};
use serde_json::json;

use crate::common::{encode_prompt, print_json, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = args.model.load()?;
    let tok = loaded.tokenizer()?;
    let prompt = encode_prompt(&loaded, &args.prompt, args.chat)?;
    let ctx = loaded.model.config.max_position_embeddings;
    if prompt.len() + args.max_new_tokens > ctx {
        bail!(
            "the prompt ({} tokens) plus --max-new-tokens {} exceeds the model's context of {ctx}",
            prompt.len(),
            args.max_new_tokens
        );
    }
    let options = GenerateOptions { max_new_tokens: args.max_new_tokens, eos_token_ids: loaded.eos_token_ids() };

    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout();
    let (generations, timings) = generate_greedy(&loaded.model, std::slice::from_ref(&prompt), &options, |_, token| {
        if !args.json {
            if let Some(piece) = stream.push(tok, token) {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        }
    })?;
    let generation = &generations[0];
    let text = tok.decode(&generation.tokens, true)?;
    if args.json {
        print_json(&json!({
            "text": text,
            "tokens": generation.tokens,
            "prompt_tokens": prompt.len(),
            "finish_reason": generation.finish_reason,
            "timings": timings,
        }))?;
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} new: prefill {:.1} tok/s, decode {:.1} tok/s, {:?}]",
            prompt.len(),
            generation.tokens.len(),
            timings.prefill_tok_s,
            timings.decode_tok_s,
            generation.finish_reason
        );
    }
    Ok(())
}

/// Turns a growing token sequence into printable text pieces, holding back bytes of a character
/// that is not complete yet.
#[derive(Default)]
struct TextStream {
    tokens: Vec<u32>,
    printed: usize,
}

impl TextStream {
    fn push(&mut self, tok: &pare_formats::TokenizerBundle, token: u32) -> Option<String> {
        self.tokens.push(token);
        let text = tok.decode(&self.tokens, true).ok()?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return None;
        }
        let piece = text[self.printed..].to_string();
        self.printed = text.len();
        Some(piece)
    }
}
