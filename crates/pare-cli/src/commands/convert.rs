//! `pare convert`: a GGUF model as a dequantized HF checkpoint directory.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use pare_model::WeightDType;
use serde_json::json;

use crate::common::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file (or alias) to convert.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = pare_model::load(&args.model, WeightDType::Float(DType::F32), &Device::Cpu)?;
    if loaded.format != "gguf" {
        bail!("{}: convert reads GGUF files; this is already an HF checkpoint", loaded.path.display());
    }
    pare_model::export::export_hf_dir(&loaded.model, loaded.tokenizer.as_ref(), &loaded.eos_token_ids(), &args.out)?;
    if args.json {
        print_json(&json!({"out": args.out.display().to_string(), "parameters": loaded.model.param_count()}))?;
    } else {
        println!("wrote {} ({} parameters, float32)", args.out.display(), loaded.model.param_count());
    }
    Ok(())
}
