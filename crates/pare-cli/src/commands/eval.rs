//! `pare eval`: quality measurements.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::common::{print_json, progress_bar, ModelArgs};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of a text file by the sliding-window method.
    Ppl(PplArgs),
}

#[derive(clap::Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text file, tokenized whole.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Distance between window starts (≤ ctx).
    #[arg(long, default_value_t = 512)]
    pub stride: usize,
    /// Keep only the first T tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Ppl(args) => ppl(args),
    }
}

fn ppl(args: PplArgs) -> Result<()> {
    // Validate cheap arguments before loading anything.
    pare_eval::perplexity::windows(2, args.ctx, args.stride)?;
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 2");
    }
    let bytes = std::fs::read(&args.text).with_context(|| format!("cannot read {}", args.text.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", args.text.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the text is empty", args.text.display());
    }
    let loaded = args.model.load()?;
    let mut tokens = loaded.tokenizer()?.encode(&text, true)?;
    if let Some(max) = args.max_tokens {
        tokens.truncate(max);
    }
    let bar = progress_bar(0, "perplexity");
    let result = pare_eval::perplexity(&loaded.model, &tokens, args.ctx, args.stride, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if args.json {
        print_json(&result)?;
    } else {
        println!(
            "ppl {:.4} over {} scored tokens ({} tokens, ctx {}, stride {})",
            result.ppl, result.scored_tokens, result.tokens, args.ctx, args.stride
        );
    }
    Ok(())
}
