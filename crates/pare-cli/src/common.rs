//! What every command shares: choosing and loading the model, device and dtype, printing JSON.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use pare_model::{LoadedModel, WeightDType};
use serde::Serialize;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, an HF checkpoint directory, or an alias (smollm2-135m, qwen2.5-coder-0.5b).
    #[arg(long, short = 'm', default_value = "smollm2-135m")]
    pub model: String,
    /// Weight and activation dtype: f32, bf16, f16, or q (GGUF weights stay quantized; CPU matmuls through QMatMul).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    pub fn weight_dtype(&self) -> Result<WeightDType> {
        Ok(match self.dtype.as_str() {
            "f32" | "float32" => WeightDType::Float(DType::F32),
            "bf16" | "bfloat16" => WeightDType::Float(DType::BF16),
            "f16" | "float16" => WeightDType::Float(DType::F16),
            "q" | "quantized" => WeightDType::Quantized,
            other => bail!("unknown --dtype {other:?} (expected f32, bf16, f16 or q)"),
        })
    }

    pub fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            other => bail!("unknown --device {other:?} (this build supports cpu)"),
        }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let dtype = self.weight_dtype()?;
        let device = self.device()?;
        Ok(pare_model::load(&self.model, dtype, &device)?)
    }
}

/// Tokenize a prompt, optionally wrapped in the model's chat template as one user message.
pub fn encode_prompt(loaded: &LoadedModel, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let tok = loaded.tokenizer()?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let ids = if chat {
        let template = tok.chat_template.as_deref().context("--chat: the model has no chat template")?;
        let messages = [pare_formats::ChatMessage { role: "user".into(), content: prompt.into() }];
        let text = pare_formats::render_chat(template, &messages, true, tok.bos_token.as_deref(), tok.eos_token.as_deref())?;
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let ctx = loaded.model.config.max_position_embeddings;
    if ids.len() > ctx {
        bail!("the prompt has {} tokens, longer than the model's context of {ctx}", ids.len());
    }
    Ok(ids)
}

pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(total: u64, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// Peak resident memory of this process in bytes (Linux VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
