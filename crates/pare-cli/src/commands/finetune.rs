//! `pare finetune`: LoRA recovery (LLM-Pruner's second stage) on dense or pruned models. Writes
//! the adapter in HF peft's format, its training log and loss curve, and with `--merge` the
//! model with the adapter folded in (HF directory, `--gguf` too).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use pare_finetune::data::{self, Dataset};
use pare_finetune::optim::{AdamWConfig, Decay, Schedule};
use pare_finetune::train::{StepLog, TrainConfig, Trainer};
use pare_finetune::{peft, Adapter, LoraConfig};
use pare_model::WeightDType;
use serde::Serialize;
use serde_json::json;

use crate::common::{print_json, progress_bar, ModelArgs};
use crate::export_args::{print_export, write_model, GgufArgs, ModelExport};
use crate::output::{plot_format, Output};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: plain text, or JSON Lines / a JSON list of records ({"text"}, {"prompt",
    /// "response"}, Alpaca's {"instruction", "input", "output"}, {"messages"}, ShareGPT's
    /// {"conversations"}, tokenized {"input_ids", "labels"}); conversations go through the chat
    /// template and train on the assistant's turns only.
    #[arg(long)]
    pub data: PathBuf,
    /// Read only the first N records (or pieces of plain text).
    #[arg(long)]
    pub max_records: Option<usize>,
    /// Write the adapter here (adapter_config.json, adapter_model.safetensors, training_log.json,
    /// and the loss curve).
    #[arg(long)]
    pub out: PathBuf,
    /// File name of the loss curve inside --out: NAME.svg or NAME.png.
    #[arg(long, default_value = "loss.svg")]
    pub loss_plot: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Projections to adapt, from q,k,v,o,gate,up,down [default: every one the architecture keeps
    /// as a module of its own: all seven for the Llama family].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Scale the adapter by alpha/√r instead of alpha/r (peft's use_rslora).
    #[arg(long)]
    pub rslora: bool,
    /// Peak learning rate (LLM-Pruner's post-training: 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Updates over which the rate rises linearly from 0 to --lr.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: u64,
    #[arg(long, value_enum, default_value_t = DecayArg::Linear)]
    pub schedule: DecayArg,
    /// Sequences per update (gradients accumulate over micro-batches).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Sequences per forward pass (memory only: the update is the same).
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Tokens per sequence: longer records are cut, plain text is cut into pieces this long.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Passes over the training examples (ignored with --steps).
    #[arg(long, default_value_t = 2.0)]
    pub epochs: f64,
    /// Updates to run, instead of --epochs.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Clip the gradients' joint L2 norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Examples held out for the evaluation loss.
    #[arg(long, default_value_t = 64)]
    pub eval_examples: usize,
    /// Evaluate every N updates (0: at the end only).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Write a checkpoint (OUT.checkpoint) every N updates (0: only on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Continue from a checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write OUT/merged: the model with the adapter folded into its weights.
    #[arg(long)]
    pub merge: bool,
    #[command(flatten)]
    pub gguf: GgufArgs,
    #[arg(long)]
    pub json: bool,
}

/// `--schedule`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayArg {
    Linear,
    Cosine,
    Constant,
}

#[derive(Serialize)]
struct Report {
    model: String,
    data: DataReport,
    adapter: AdapterReport,
    steps: u64,
    seconds: f64,
    tokens_per_second: f64,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    eval_loss: Option<f64>,
    out: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    merged: Option<ModelExport>,
}

#[derive(Serialize)]
struct DataReport {
    path: String,
    format: &'static str,
    records: usize,
    truncated: usize,
    skipped: usize,
    train_examples: usize,
    eval_examples: usize,
}

#[derive(Serialize)]
struct AdapterReport {
    rank: usize,
    alpha: f64,
    dropout: f64,
    targets: Vec<&'static str>,
    parameters: usize,
}

pub fn run(args: Args) -> Result<()> {
    let gguf = args.gguf.ggml_type();
    if gguf.is_some() && !args.merge {
        bail!("--gguf writes the merged model: add --merge");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be positive, got {}", args.lr);
    }
    if !(args.epochs.is_finite() && args.epochs > 0.0) && args.steps.is_none() {
        bail!("--epochs must be positive, got {}", args.epochs);
    }
    if args.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    let loss_format = plot_format(&args.loss_plot, "--loss-plot")?;
    // A bare name: the curve is written with the adapter, in --out's staging directory.
    if args.loss_plot.file_name() != Some(args.loss_plot.as_os_str()) {
        bail!("--loss-plot {}: a file name inside --out, not a path", args.loss_plot.display());
    }
    let targets = args.lora_targets.as_deref().map(LoraConfig::parse_targets).transpose()?;
    let mut lora = LoraConfig::new(
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        targets.as_deref().unwrap_or(&pare_model::diff::Role::ALL),
    )?;
    lora.rslora = args.rslora;
    if args.model.adapter.is_some() {
        bail!("--adapter: pare finetune trains a new adapter; continue one with --resume");
    }
    // The frozen weights compute in float: a quantized GGUF is dequantized for training.
    let train_dtype = match args.model.weight_dtype() {
        WeightDType::Float(d) => d,
        WeightDType::Quantized => DType::F32,
    };
    let device = args.model.device()?;
    let loaded = pare_model::load(&args.model.model, args.model.weight_dtype(), &device)?;
    let model = &loaded.model;
    if targets.is_none() {
        lora.targets = LoraConfig::default_targets(model.config().arch);
    }
    pare_finetune::lora::check_targets(model, &lora.targets)?;
    let gguf_keys = match gguf {
        Some(_) => crate::export_args::gguf_tokenizer_keys(&loaded).context("--gguf")?,
        None => Vec::new(),
    };
    let out = Output::dir(&args.out, "--out", args.force, &[loaded.path.as_path(), args.data.as_path()])?;

    let dataset = data::load(&args.data, loaded.tokenizer.as_ref(), args.max_len, args.max_records)?;
    let Dataset { examples, format, records, truncated, skipped } = dataset;
    let (train, eval) = data::split(examples, args.eval_examples, args.seed)?;
    let total_steps = match args.steps {
        Some(s) => s,
        None => ((args.epochs * train.len() as f64) / args.batch_size as f64).ceil().max(1.0) as u64,
    };
    let config = TrainConfig {
        optim: AdamWConfig { lr: args.lr, weight_decay: args.weight_decay, ..AdamWConfig::default() },
        schedule: Schedule {
            peak: args.lr,
            warmup_steps: args.warmup_steps,
            total_steps,
            decay: match args.schedule {
                DecayArg::Linear => Decay::Linear,
                DecayArg::Cosine => Decay::Cosine,
                DecayArg::Constant => Decay::Constant,
            },
        },
        batch_size: args.batch_size,
        micro_batch: args.micro_batch,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        dtype: train_dtype,
    };
    let adapter = Adapter::init(model, lora.clone(), args.seed)?;
    let mut trainer = Trainer::new(model, &adapter, config, &train, &eval)?;
    if let Some(dir) = &args.resume {
        trainer.resume(model, dir)?;
        if trainer.step >= total_steps {
            bail!(
                "--resume: {} is at step {}, which already ends this run of {total_steps}",
                dir.display(),
                trainer.step
            );
        }
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("cannot catch Ctrl-C")?;
    }
    let checkpoint_dir = checkpoint_path(&args.out);
    let base_name = args.model.model.clone();
    let bar = progress_bar(total_steps, "finetune");
    bar.set_position(trainer.step);
    let start = Instant::now();
    let (mut tokens, first_step) = (0usize, trainer.step);
    while trainer.step < total_steps {
        let log = trainer.step()?;
        tokens += log.tokens;
        let mut eval_loss = None;
        if args.eval_every > 0 && trainer.step.is_multiple_of(args.eval_every) {
            eval_loss = trainer.evaluate()?;
        }
        bar.set_position(trainer.step);
        bar.set_message(progress_message(&log, eval_loss, tokens, start));
        let interrupt = interrupted.load(Ordering::SeqCst);
        if interrupt || (args.checkpoint_every > 0 && trainer.step.is_multiple_of(args.checkpoint_every)) {
            save_checkpoint(&trainer, model, &base_name, &checkpoint_dir)?;
        }
        if interrupt {
            bar.finish_and_clear();
            bail!(
                "interrupted at step {} of {total_steps}; checkpoint in {} (continue with --resume {})",
                trainer.step,
                checkpoint_dir.display(),
                checkpoint_dir.display()
            );
        }
    }
    // Training speed counts the updates only, not the final evaluation.
    let seconds = start.elapsed().as_secs_f64();
    let eval_loss = match trainer.log.last().and_then(|l| l.eval_loss) {
        Some(l) => Some(l),
        None => trainer.evaluate()?,
    };
    bar.finish_and_clear();

    let trained = trainer.adapter()?;
    let staging = out.path().to_path_buf();
    peft::save(&trained, model, &base_name, &staging)?;
    let log_text = serde_json::to_string_pretty(&trainer.log)? + "\n";
    std::fs::write(staging.join("training_log.json"), log_text).context("cannot write training_log.json")?;
    pare_eval::plot::write(&[loss_panel(&trainer.log, &args.data)], loss_format, &staging.join(&args.loss_plot))
        .with_context(|| format!("cannot write {}", args.loss_plot.display()))?;
    let merged = if args.merge {
        let mut merged_model = loaded.model.clone();
        trained.attach(&mut merged_model)?;
        merged_model.merge_lora()?;
        if let Some(why) = gguf.and_then(|_| pare_model::export::gguf_unsupported(&merged_model)) {
            bail!("--gguf: cannot write the merged model as GGUF: {why}");
        }
        let dir = out.target().join("merged");
        let gguf = gguf.map(|ty| (ty, gguf_keys.as_slice()));
        Some(write_model(&loaded, &merged_model, &dir, &staging.join("merged"), gguf)?)
    } else {
        None
    };
    out.commit()?;

    let report = Report {
        model: loaded.path.display().to_string(),
        data: DataReport {
            path: args.data.display().to_string(),
            format,
            records,
            truncated,
            skipped,
            train_examples: train.len(),
            eval_examples: eval.len(),
        },
        adapter: AdapterReport {
            rank: lora.rank,
            alpha: lora.alpha,
            dropout: lora.dropout,
            targets: lora.targets.iter().map(|r| r.name()).collect(),
            parameters: trained.param_count(),
        },
        steps: trainer.step,
        seconds,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        first_loss: trainer.log.iter().find(|l| l.step > first_step).map(|l| l.loss),
        last_loss: trainer.log.last().map(|l| l.loss),
        eval_loss,
        out: args.out.display().to_string(),
        merged,
    };
    if args.json {
        return print_json(&json!(report));
    }
    print_report(&report);
    Ok(())
}

/// Where checkpoints go: beside --out (which is only written at the end), so that they survive an
/// interrupted run.
fn checkpoint_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "finetune".into());
    name.push(".checkpoint");
    out.with_file_name(name)
}

/// Written whole under a temporary name, then renamed over the previous one.
fn save_checkpoint(trainer: &Trainer, model: &pare_model::Model, base: &str, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("checkpoint.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    trainer.save_checkpoint(model, base, &tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))
}

fn progress_message(log: &StepLog, eval: Option<f64>, tokens: usize, start: Instant) -> String {
    let eval = eval.map(|e| format!(" eval {e:.3}")).unwrap_or_default();
    let rate = tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
    format!("loss {:.3}{eval} lr {:.1e} {rate:.0} tok/s", log.loss, log.lr)
}

fn loss_panel(log: &[StepLog], data: &Path) -> pare_eval::plot::Panel {
    use pare_eval::plot::{Panel, Series};
    let mut series =
        vec![Series { name: "train loss".into(), points: log.iter().map(|l| (l.step as f64, l.loss)).collect() }];
    let eval: Vec<(f64, f64)> = log.iter().filter_map(|l| l.eval_loss.map(|e| (l.step as f64, e))).collect();
    if !eval.is_empty() {
        series.push(Series { name: "held-out loss".into(), points: eval });
    }
    Panel {
        title: format!("LoRA on {}", data.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()),
        x_label: "step".into(),
        y_label: "cross-entropy".into(),
        series,
    }
}

fn print_report(r: &Report) {
    println!("{}", r.model);
    let d = &r.data;
    println!(
        "data {} ({}): {} records, {} cut at --max-len, {} without labels; {} train, {} held out",
        d.path, d.format, d.records, d.truncated, d.skipped, d.train_examples, d.eval_examples
    );
    let a = &r.adapter;
    println!(
        "LoRA r {} alpha {} dropout {} on {} ({} parameters)",
        a.rank,
        a.alpha,
        a.dropout,
        a.targets.join(","),
        a.parameters
    );
    let loss = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    println!(
        "{} steps in {:.1} s ({:.0} tok/s): loss {} → {}, held-out {}",
        r.steps,
        r.seconds,
        r.tokens_per_second,
        loss(r.first_loss),
        loss(r.last_loss),
        loss(r.eval_loss)
    );
    println!("wrote {}", r.out);
    if let Some(m) = &r.merged {
        println!("wrote {} (merged)", m.dir);
        print_export(m);
    }
}
