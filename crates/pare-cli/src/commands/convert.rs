//! `pare convert`: a GGUF model as a dequantized HF checkpoint directory.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use pare_model::WeightDType;
use serde_json::json;

use crate::common::print_json;
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file (or alias) to convert.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Output directory (created; an existing non-empty one needs --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let source = pare_model::loader::resolve_model(&args.model)?;
    if source.is_dir() {
        bail!("{}: convert reads GGUF files; this is already an HF checkpoint", source.display());
    }
    // Checked before the (long) load; written in full before it appears.
    let out = Output::dir(&args.out, "--out", args.force, &[&source])?;
    let loaded = pare_model::loader::load_gguf(&source, WeightDType::Float(DType::F32), &Device::Cpu)?;
    pare_model::export::export_hf_dir(&loaded.model, loaded.tokenizer.as_ref(), &loaded.eos_token_ids(), out.path())?;
    out.commit()?;
    if args.json {
        print_json(&json!({"out": args.out.display().to_string(), "parameters": loaded.model.param_count()}))?;
    } else {
        println!("wrote {} ({} parameters, float32)", args.out.display(), loaded.model.param_count());
    }
    Ok(())
}
