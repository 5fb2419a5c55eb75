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
    /// Weight and activation dtype: f32, bf16, f16, or q (GGUF weights stay in the file's quantized
    /// blocks). Default: q for a quantized GGUF on cpu, else f32 on cpu and bf16 on cuda. f32 is
    /// the mode that matches HF transformers.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Device: cpu, cuda (GPU 0) or cuda:N (CUDA builds, scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    /// The dtype's name as given, or the default: bf16 on a GPU (half the bytes per token and the
    /// tensor cores' native type); on CPU a quantized GGUF runs in its own blocks, as llama.cpp
    /// runs it, and anything else in f32 (bf16 matmuls are slow there).
    pub fn dtype_name(&self) -> &str {
        match &self.dtype {
            Some(d) => d,
            None if self.device.starts_with("cuda") => "bf16",
            None if self.is_quantized_gguf() => "q",
            None => "f32",
        }
    }

    /// Whether the model is a GGUF holding quantized tensors. A path that does not resolve or
    /// open is not: loading it reports the error.
    fn is_quantized_gguf(&self) -> bool {
        let Ok(path) = pare_model::loader::resolve_model(&self.model) else { return false };
        if path.is_dir() {
            return false;
        }
        pare_formats::GgufFile::open(&path).is_ok_and(|g| g.tensors.iter().any(|t| t.ggml_type.plain_dtype().is_none()))
    }

    pub fn weight_dtype(&self) -> Result<WeightDType> {
        Ok(match self.dtype_name() {
            "f32" | "float32" => WeightDType::Float(DType::F32),
            "bf16" | "bfloat16" => WeightDType::Float(DType::BF16),
            "f16" | "float16" => WeightDType::Float(DType::F16),
            "q" | "quantized" => WeightDType::Quantized,
            other => bail!("unknown --dtype {other:?} (expected f32, bf16, f16 or q)"),
        })
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
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
        let text =
            pare_formats::render_chat(template, &messages, true, tok.bos_token.as_deref(), tok.eos_token.as_deref())?;
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

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown --device {other:?} (expected cpu, cuda or cuda:N)"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!("--device {spec}: this build of pare has no CUDA support (build it with scripts/build-cuda.sh)");
    }
    Device::new_cuda(ordinal).with_context(|| format!("--device {spec}: cannot open CUDA device {ordinal}"))
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

/// GPU memory figures on a CUDA device (None elsewhere, and in builds without CUDA).
pub fn gpu_memory(device: &Device) -> Option<pare_kernels::GpuMemory> {
    #[cfg(feature = "cuda")]
    return pare_kernels::gpu_memory(device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Start a new GPU peak-memory measurement (nothing to do off CUDA).
pub fn reset_gpu_memory_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    pare_kernels::reset_gpu_memory_peak(device);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Peak resident memory of this process in bytes (Linux VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
