//! `pare flops`: prefill and decode FLOPs by component and KV-cache bytes of a run, exact for the
//! model's shapes, against the same run unpruned; `--formula` sets a closed-form estimate beside
//! it, `--measure` runs both and times them, since FLOPs alone mislead.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use pare_flops::{
    FlopsReport, Formula, KvPolicy, Measured, MeasuredRun, ModelSummary, Scenario, ScenarioSummary, SpanKind,
    TextShapes, VisionShapes,
};
use pare_model::{Hooks, KvCache, Model, ModelConfig, PrefillInput, TokenPruner};
use pare_token_prune::{PruneSchedule, Pruner, Span};
use pare_vision::{LlavaConfig, LoadedLlava};
use rand::{Rng, SeedableRng};

use crate::common::{peak_rss_bytes, print_json, progress_bar, ModelArgs};
use crate::press_args::PressArgs;
use crate::token_prune_args::{PruneSpan, TokenPruneArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text tokens in the prompt.
    #[arg(long)]
    pub prompt_len: usize,
    /// Tokens generated (the first comes from the prefill, each later one from a decode step).
    #[arg(long)]
    pub gen_len: usize,
    /// Image tokens in the prompt besides the text (LLaVA-1.5: 576 per image; a LLaVA model
    /// defaults to one image and counts its vision tower).
    #[arg(long)]
    pub image_tokens: Option<usize>,
    #[command(flatten)]
    pub token_prune: TokenPruneArgs,
    #[command(flatten)]
    pub press: PressArgs,
    /// exact (pare's count), or a closed-form estimate beside it: attention (4·s²·h per layer,
    /// attention scores only), lecture (24·s·h² + 4·s²·h), fastv (4nd² + 2n²d + 2ndm).
    #[arg(long, default_value = "exact")]
    pub formula: String,
    /// Also run the model unpruned and as configured, and report measured prefill time, time to
    /// first token, decode speed and peak memory next to the theory.
    #[arg(long)]
    pub measure: bool,
    /// --measure: runs of each, the fastest reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The model's shapes from its config alone (no weights read), with LLaVA's vision tower if any.
struct Shapes {
    name: String,
    config: ModelConfig,
    llava: Option<LlavaConfig>,
}

fn read_shapes(spec: &str) -> Result<Shapes> {
    let path = pare_model::loader::resolve_model(spec)?;
    let name = spec.to_string();
    if path.is_dir() {
        let file = path.join("config.json");
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", file.display()))?;
        let shown = file.display().to_string();
        if pare_vision::is_llava_config(&json) {
            let llava = LlavaConfig::from_json(&json, &shown)?;
            return Ok(Shapes { name, config: llava.text.clone(), llava: Some(llava) });
        }
        return Ok(Shapes { name, config: ModelConfig::from_hf_json(&json, &shown)?, llava: None });
    }
    let gguf = pare_formats::GgufFile::open(&path)?;
    Ok(Shapes { name, config: ModelConfig::from_gguf(&gguf).map_err(anyhow::Error::from)?, llava: None })
}

fn vision_shapes(l: &LlavaConfig) -> VisionShapes {
    VisionShapes {
        hidden: l.vision.hidden_size,
        intermediate: l.vision.intermediate_size,
        layers_run: l.vision_layers_needed(),
        patches: l.vision.num_patches(),
        channels: l.vision.num_channels,
        patch_size: l.vision.patch_size,
        projector_in: l.projector_in(),
        projector_out: l.text.hidden_size,
        image_tokens: l.image_tokens(),
    }
}

fn span_kind(token_prune: &TokenPruneArgs) -> SpanKind {
    match token_prune.prune_span {
        PruneSpan::Prompt => SpanKind::Prompt { protect_last: token_prune.protect_last },
        PruneSpan::Image => SpanKind::Image,
        PruneSpan::Range { start, end } => SpanKind::Range { start, end },
    }
}

pub fn run(args: Args) -> Result<()> {
    let formula: Formula = args.formula.parse()?;
    args.press.build()?; // an unknown press or a stray option fails before anything else
    let schedule = args.token_prune.prune_tokens.as_deref().map(PruneSchedule::parse).transpose()?;
    args.token_prune.check()?;
    let span = span_kind(&args.token_prune);
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let kv_bytes_per_value = match args.model.weight_dtype() {
        pare_model::WeightDType::Float(d) => d.size_in_bytes(),
        pare_model::WeightDType::Quantized => 4, // activations, and so the cache, stay f32
    };
    let shapes = read_shapes(&args.model.model)?;
    let vision = shapes.llava.as_ref().map(vision_shapes);
    let image_tokens = args.image_tokens.unwrap_or_else(|| vision.as_ref().map_or(0, |v| v.image_tokens));
    let text = TextShapes::from_config(&shapes.config);
    let prefill_len = args.prompt_len.saturating_add(image_tokens);
    let pruned_lengths = match &schedule {
        Some(s) => Some(s.tokens_per_layer(text.layers.len(), prefill_len, span.tokens(prefill_len, image_tokens)?)?),
        None => None,
    };
    let scenario = Scenario {
        prompt_len: args.prompt_len,
        image_tokens,
        gen_len: args.gen_len,
        pruned_lengths,
        kv: KvPolicy {
            ratio: args.press.options.ratio,
            budget: args.press.options.budget,
            capacity: args.press.options.capacity,
        },
        kv_bytes_per_value,
        vision,
    };
    let summary = ScenarioSummary {
        prompt_len: args.prompt_len,
        image_tokens,
        gen_len: args.gen_len,
        prune_tokens: args.token_prune.prune_tokens.clone(),
        span,
        kv: scenario.kv,
        press: args.press.press.clone(),
        kv_bytes_per_value,
    };
    let model_summary = ModelSummary::new(
        &shapes.name,
        if shapes.llava.is_some() { "llava" } else { shapes.config.arch.model_type() },
        &text,
    );
    let mut report = FlopsReport::build(model_summary, &text, &scenario, summary, formula)?;
    if args.measure {
        let pruning = schedule.map(|s| (s, span));
        report.measured = Some(measure(&args, &scenario, pruning, shapes.llava.is_some())?);
    }
    if args.json {
        print_json(&report)
    } else {
        print!("{}", report.render());
        Ok(())
    }
}

/// What `--measure` runs: a text model, or LLaVA with a synthetic image.
enum Runner {
    Text(Box<Model>),
    Llava(Box<LoadedLlava>, Tensor),
}

impl Runner {
    fn language(&self) -> &Model {
        match self {
            Runner::Text(m) => m,
            Runner::Llava(l, _) => &l.model.language,
        }
    }

    fn prefill(&self, ids: &[u32], hooks: &mut Hooks) -> Result<(Tensor, KvCache)> {
        Ok(match self {
            Runner::Text(m) => m.prefill(PrefillInput::Tokens(&[ids.to_vec()]), hooks)?,
            Runner::Llava(l, pixels) => l.model.prefill(ids, pixels, hooks)?,
        })
    }
}

/// A reproducible prompt: `prompt_len` random text ids with the image tokens after the first.
fn synthetic_prompt(vocab: usize, prompt_len: usize, image_tokens: usize, image_id: Option<u32>) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut text: Vec<u32> = (0..prompt_len)
        .map(|_| loop {
            let t = rng.random_range(3..vocab.max(4) as u32);
            if Some(t) != image_id {
                break t;
            }
        })
        .collect();
    let image = std::iter::repeat_n(image_id.unwrap_or(3), image_tokens);
    let cut = 1.min(text.len());
    let tail = text.split_off(cut);
    text.into_iter().chain(image).chain(tail).collect()
}

/// Reset the kernel's peak-RSS mark (Linux `clear_refs` 5), so each run reports its own peak.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn measure(args: &Args, sc: &Scenario, pruning: Option<(PruneSchedule, SpanKind)>, is_llava: bool) -> Result<Measured> {
    let device = args.model.device()?;
    let mut tokenizer = None;
    let runner = if is_llava {
        let llava = super::generate_image::load_llava(&args.model)?;
        let size = llava.model.config.vision.image_size;
        // Pixel values of a synthetic image: the cost does not depend on what it shows.
        let pixels = Tensor::randn(0f32, 1.0, (1, 3, size, size), &device)?.to_dtype(llava.model.language.dtype())?;
        Runner::Llava(Box::new(llava), pixels)
    } else {
        let loaded = args.model.load()?;
        tokenizer = loaded.tokenizer;
        Runner::Text(Box::new(loaded.model))
    };
    let language = runner.language();
    let (image_id, per_image) = match &runner {
        Runner::Llava(l, _) => (Some(l.model.config.image_token_id), l.model.config.image_tokens()),
        Runner::Text(_) => (None, 0),
    };
    if is_llava && sc.image_tokens != per_image {
        bail!("--measure runs one image: --image-tokens must be {per_image} for this model");
    }
    let ids = synthetic_prompt(language.config().vocab_size, sc.prompt_len, sc.image_tokens, image_id);
    if ids.len() + sc.gen_len > language.config().max_position_embeddings {
        bail!(
            "--measure: {} prompt tokens plus {} generated exceed the model's context of {}",
            ids.len(),
            sc.gen_len,
            language.config().max_position_embeddings
        );
    }
    let mut press = args.press.build()?;
    if let (Some(press), Some(tokenizer)) = (press.as_mut(), &tokenizer) {
        press.bind(tokenizer)?;
    }
    let pruner: Option<Arc<dyn TokenPruner>> = match pruning {
        None => None,
        Some((schedule, span)) => {
            let span = match span {
                SpanKind::Image if is_llava => Span::Positions(vec![(1..1 + sc.image_tokens as i64).collect()]),
                // A text model's image tokens are positions 1.. of the synthetic prompt.
                SpanKind::Image => Span::Range(1, 1 + sc.image_tokens as i64),
                SpanKind::Prompt { protect_last } => Span::Prompt { protect_last },
                SpanKind::Range { start, end } => Span::Range(start as i64, end as i64),
            };
            let scorer = pare_token_prune::scorer(&args.token_prune.prune_score, 0)?;
            Some(Arc::new(Pruner { schedule, span, scorer }))
        }
    };
    let bar = progress_bar(2 * args.repeats as u64, "measuring");
    let mut best: [Option<MeasuredRun>; 2] = [None, None];
    for _ in 0..args.repeats {
        for (slot, hooks) in
            [Hooks::default(), Hooks::new(press.as_ref().map(|p| p.box_clone()), pruner.clone())].iter().enumerate()
        {
            let run = measure_once(&runner, &ids, sc.gen_len, hooks, &device)?;
            let keep = best[slot].as_ref().is_none_or(|b| run.ttft_s < b.ttft_s);
            if keep {
                best[slot] = Some(run);
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let [Some(baseline), Some(pruned)] = best else { bail!("--repeats must be at least 1") };
    Ok(Measured::new(&args.model.device.to_string(), args.model.dtype_name(), args.repeats, baseline, pruned))
}

fn sync(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

fn measure_once(runner: &Runner, ids: &[u32], gen_len: usize, hooks: &Hooks, device: &Device) -> Result<MeasuredRun> {
    let mut hooks = hooks.clone();
    let language = runner.language();
    let peak_known = reset_peak_rss() && matches!(device, Device::Cpu);
    sync(device)?;
    let start = Instant::now();
    let (logits, mut cache) = runner.prefill(ids, &mut hooks)?;
    sync(device)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let mut next = argmax_row(&logits)?;
    let ttft_s = start.elapsed().as_secs_f64();
    let kv_bytes_after_prefill = cache.bytes() as u64;
    let decode_start = Instant::now();
    let steps = gen_len.saturating_sub(1);
    for _ in 0..steps {
        let logits = language.decode(&mut [(&mut cache, &mut hooks)], &[next])?;
        next = argmax_row(&logits)?;
    }
    let decode_s = decode_start.elapsed().as_secs_f64();
    Ok(MeasuredRun {
        prefill_s,
        ttft_s,
        decode_s,
        decode_tok_s: if decode_s > 0.0 { steps as f64 / decode_s } else { 0.0 },
        // Host RSS says nothing about GPU memory; it is reported on CPU only.
        peak_memory_bytes: if peak_known { peak_rss_bytes() } else { None },
        kv_bytes_after_prefill,
        kv_bytes_final: cache.bytes() as u64,
    })
}

fn argmax_row(logits: &Tensor) -> Result<u32> {
    let row = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(pare_generate::sampling::argmax(&row))
}
