//! What every command shares: choosing and loading the model, device and dtype, printing JSON.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use pare_model::parallel::LocalComm;
use pare_model::{KvDtype, LoadedModel, Model, WeightDType};
use serde::Serialize;

/// `--tp`: one model split over ranks by heads.
#[derive(Args, Debug, Clone)]
pub struct ParallelArgs {
    /// Tensor parallelism: split the model over N ranks, each holding whole query and KV heads,
    /// a block of every MLP's channels and a slice of the vocabulary (Megatron's split); presses
    /// compress each rank's heads. On cpu the ranks are threads of this process exchanging
    /// through memory: every result equals the whole model's (within float rounding), which is
    /// what it is for, not speed. The ranks hold dense weights in the activations' dtype (a
    /// quantized model's blocks are dequantized, f32 on cpu).
    #[arg(long, default_value = "1", value_name = "N")]
    pub tp: std::num::NonZeroUsize,
}

impl ParallelArgs {
    /// Load the model and split it `--tp` ways. On cpu the ranks are threads over host memory;
    /// on cuda the whole model loads into host memory and rank r's part goes to GPU r, the ranks
    /// exchanging through NCCL.
    pub fn load(&self, args: &ModelArgs) -> Result<LoadedModel> {
        let world = self.tp.get();
        if world == 1 {
            return args.load();
        }
        if args.device == DeviceArg::Cpu {
            let mut loaded = args.load()?;
            loaded.model = loaded.model.split(LocalComm::group(world)?)?;
            return Ok(loaded);
        }
        if args.device != DeviceArg::Cuda(0) {
            bail!("--tp {world} runs on GPUs 0..{world}: give --device cuda");
        }
        let mut loaded = args.load_on(&candle_core::Device::Cpu)?;
        loaded.model = split_over_gpus(world, &loaded.model)?;
        Ok(loaded)
    }
}

#[cfg(feature = "nccl")]
fn split_over_gpus(world: usize, model: &Model) -> Result<Model> {
    Ok(model.split_on(pare_model::parallel::nccl::NcclComm::group(world)?)?)
}

#[cfg(not(feature = "nccl"))]
fn split_over_gpus(world: usize, _: &Model) -> Result<Model> {
    bail!("--tp {world} on cuda needs NCCL, which this build does not include (NCCL=1 scripts/build-cuda.sh)")
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file, an HF checkpoint directory, or an alias (smollm2-135m, qwen2.5-coder-0.5b,
    /// qwen2.5-coder-1.5b).
    #[arg(long, short = 'm', default_value = "smollm2-135m")]
    pub model: String,
    /// Weight and activation dtype: f32, bf16, f16, or q (GGUF weights stay in the file's quantized
    /// blocks). Default: q for a quantized GGUF on cpu, else f32 on cpu and bf16 on cuda. f32 is
    /// the mode that matches HF transformers.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Device: cpu, cuda (GPU 0) or cuda:N (CUDA builds, scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu", value_parser = parse_device_arg)]
    pub device: DeviceArg,
    /// The KV cache's dtype: f32, f16, bf16 or q8_0 (GGUF's 8-bit blocks, cpu). Default: f16 for a
    /// quantized model on cpu (half the bytes, as llama.cpp), else the activations' dtype (so
    /// --dtype f32 stays HF-exact).
    #[arg(long, value_enum)]
    pub kv_dtype: Option<KvDtypeArg>,
    /// A LoRA adapter directory in HF peft's format (`pare finetune --out`, or peft's
    /// `save_pretrained`), applied beside the weights, unmerged.
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
}

/// `--kv-dtype`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtypeArg {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

/// `--dtype`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeArg {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "quantized")]
    Q,
}

impl DtypeArg {
    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
            DtypeArg::F16 => "f16",
            DtypeArg::Q => "q",
        }
    }
}

/// `--device`: cpu or a CUDA ordinal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

fn parse_device_arg(spec: &str) -> std::result::Result<DeviceArg, String> {
    match spec {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
            _ => Err("expected cpu, cuda or cuda:N".into()),
        },
    }
}

impl ModelArgs {
    /// The dtype given, or the default: bf16 on a GPU (half the bytes per token and the tensor
    /// cores' native type); on CPU a quantized GGUF runs in its own blocks, as llama.cpp runs it,
    /// and anything else in f32 (bf16 matmuls are slow there).
    pub fn dtype(&self) -> DtypeArg {
        match (self.dtype, self.device) {
            (Some(d), _) => d,
            (None, DeviceArg::Cuda(_)) => DtypeArg::Bf16,
            (None, DeviceArg::Cpu) if self.is_quantized_gguf() => DtypeArg::Q,
            (None, DeviceArg::Cpu) => DtypeArg::F32,
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        self.dtype().name()
    }

    /// The KV cache dtype given, or the default: f16 when weights run quantized on the CPU (f32
    /// activations, a cache half their size as llama.cpp keeps it), else the activations' dtype.
    pub fn kv_dtype(&self) -> KvDtype {
        match (self.kv_dtype, self.dtype()) {
            (Some(KvDtypeArg::F32), _) => KvDtype::Float(DType::F32),
            (Some(KvDtypeArg::F16), _) => KvDtype::Float(DType::F16),
            (Some(KvDtypeArg::Bf16), _) => KvDtype::Float(DType::BF16),
            (Some(KvDtypeArg::Q8_0), _) => KvDtype::Q8_0,
            (None, DtypeArg::Q) if self.device == DeviceArg::Cpu => KvDtype::Float(DType::F16),
            (None, _) => KvDtype::Float(self.weight_dtype().activation_dtype()),
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

    pub fn weight_dtype(&self) -> WeightDType {
        match self.dtype() {
            DtypeArg::F32 => WeightDType::Float(DType::F32),
            DtypeArg::Bf16 => WeightDType::Float(DType::BF16),
            DtypeArg::F16 => WeightDType::Float(DType::F16),
            DtypeArg::Q => WeightDType::Quantized,
        }
    }

    pub fn device(&self) -> Result<Device> {
        open_device(self.device)
    }

    pub fn load(&self) -> Result<LoadedModel> {
        self.load_on(&self.device()?)
    }

    /// [`ModelArgs::load`] onto `device` (a rank's GPU) instead of `--device`.
    pub fn load_on(&self, device: &Device) -> Result<LoadedModel> {
        let mut loaded = pare_model::load(&self.model, self.weight_dtype(), device)?;
        loaded.model.set_kv_dtype(self.kv_dtype()).context("--kv-dtype")?;
        self.apply_adapter(&mut loaded.model)?;
        Ok(loaded)
    }

    /// Attach `--adapter`, if given, to a model loaded from `--model`.
    pub fn apply_adapter(&self, model: &mut pare_model::Model) -> Result<()> {
        if let Some(dir) = &self.adapter {
            let adapter =
                pare_finetune::peft::load(dir, model).with_context(|| format!("--adapter {}", dir.display()))?;
            adapter.attach(model).with_context(|| format!("--adapter {}", dir.display()))?;
        }
        Ok(())
    }

    /// For commands that compute in float32 only: an error naming any other --dtype given.
    pub fn require_f32(&self, why: &str) -> Result<()> {
        match self.dtype {
            Some(d) if d != DtypeArg::F32 => bail!("{why}; drop --dtype {}", d.name()),
            _ => Ok(()),
        }
    }
}

/// Refuse a run of `sequences` sequences (prompts × beams) of `prompt` prompt tokens and
/// `tokens` tokens in all that cannot fit in memory, before it starts (checked on CPU, whose
/// memory /proc/meminfo tells).
pub fn ensure_run_fits(loaded: &LoadedModel, sequences: usize, prompt: usize, tokens: usize) -> Result<()> {
    if !loaded.model.device().is_cpu() {
        return Ok(());
    }
    // Whole bytes per cached value, rounded up (q8_0's 34/32 counts as 2): an estimate that refuses.
    let value_bytes = loaded.model.kv_dtype().entry_bytes(32).div_ceil(32);
    let bytes = loaded.model.config().run_bytes(value_bytes, sequences, prompt, tokens);
    Ok(pare_model::memory::ensure_fits(&format!("{sequences} sequences of {tokens} tokens"), bytes)?)
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
    let ctx = loaded.model.config().max_position_embeddings;
    if ids.len() > ctx {
        bail!("the prompt has {} tokens, longer than the model's context of {ctx}", ids.len());
    }
    Ok(ids)
}

fn open_device(spec: DeviceArg) -> Result<Device> {
    let DeviceArg::Cuda(ordinal) = spec else { return Ok(Device::Cpu) };
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

/// Peak resident memory of this process in bytes (Linux VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
