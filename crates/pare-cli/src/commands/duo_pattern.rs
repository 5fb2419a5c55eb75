//! `pare duo-pattern`: learn a model's DuoAttention head pattern once, from calibration text, with
//! kvpress's on-the-fly scoring; `--press duo-attention --duo-pattern FILE` then uses it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use pare_press::presses::DuoPattern;
use pare_press::scorers::duo_attention::{draw_samples, score_heads, Q_LEN};
use serde_json::json;

use crate::common::{print_json, ModelArgs};
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text (UTF-8), tokenized whole; repeat for several (their tokens are joined).
    #[arg(long, default_value = "assets/texts/c4.utf8")]
    pub text: Vec<PathBuf>,
    /// Samples drawn from the text (kvpress: 50 BookSum chapters).
    #[arg(long, default_value_t = 50)]
    pub samples: usize,
    /// Tokens per sample.
    #[arg(long, default_value_t = 1024)]
    pub sample_tokens: usize,
    /// Seed of the samples' start positions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Entries every streaming head keeps from the start of the prompt (kvpress: 128).
    #[arg(long, default_value_t = 128)]
    pub sink_size: usize,
    /// Entries every streaming head keeps from the end of the prompt (kvpress: 256).
    #[arg(long, default_value_t = 256)]
    pub recent_size: usize,
    /// Where the pattern goes (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.samples == 0 || args.sample_tokens == 0 {
        bail!("--samples and --sample-tokens must be at least 1");
    }
    let mut texts = Vec::with_capacity(args.text.len());
    for path in &args.text {
        texts.push(std::fs::read_to_string(path).with_context(|| format!("cannot read --text {}", path.display()))?);
    }
    let loaded = args.model.load()?;
    let mut inputs: Vec<&std::path::Path> = args.text.iter().map(PathBuf::as_path).collect();
    inputs.push(loaded.path.as_path());
    let out = Output::file(&args.out, "--out", args.force, &inputs)?;
    let tok = loaded.tokenizer().context("duo-pattern tokenizes --text with the model's tokenizer")?;
    let mut tokens = Vec::new();
    for text in &texts {
        tokens.extend(tok.encode(text, true)?);
    }
    let samples = draw_samples(&tokens, args.samples, args.sample_tokens, args.seed)?;
    let scores = score_heads(&loaded.model, &samples, Q_LEN)?;
    let texts: Vec<String> = args.text.iter().map(|p| p.display().to_string()).collect();
    let pattern = DuoPattern {
        sink_size: args.sink_size,
        recent_size: args.recent_size,
        scores,
        calibration: Some(json!({
            "model": args.model.model, "texts": texts, "samples": args.samples,
            "sample_tokens": args.sample_tokens, "seed": args.seed, "q_len": Q_LEN,
        })),
    };
    pattern.save(out.path())?;
    out.commit()?;
    let (layers, heads) = (pattern.scores.len(), pattern.scores[0].len());
    if args.json {
        return print_json(&json!({ "out": args.out, "layers": layers, "kv_heads": heads, "scores": pattern.scores }));
    }
    println!("head pattern of {layers} layers × {heads} KV heads → {}", args.out.display());
    Ok(())
}
