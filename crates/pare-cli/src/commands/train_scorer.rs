//! `pare train-scorer`: train a learned token scorer for prefill token pruning on the model's own
//! next-token loss, with a soft mask over the span's keys in the layers a cut would shorten.
//! Writes the scorer (safetensors, for `--prune-score learned:FILE`) and its loss curve (SVG).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use pare_eval::plot::{Panel, Series};
use pare_model::WeightDType;
use pare_token_prune::train::{train, Frozen, HeldOut, MaskKind, StepStats, TrainSettings};
use pare_token_prune::{ScorerInfo, ScorerShape};
use serde_json::json;

use crate::common::{print_json, progress_bar, ModelArgs};
use crate::output::{plot_format, Output};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The cut the scorer is for: layers LAYER.. see only the kept tokens (`--prune-tokens
    /// LAYER:KEEP`); the scorer reads layer LAYER−1's attention input.
    #[arg(long)]
    pub layer: usize,
    /// Share of the span the training keeps (the KEEP of `--prune-tokens LAYER:KEEP`).
    #[arg(long, default_value_t = 0.5)]
    pub keep: f64,
    /// Training text (UTF-8), tokenized whole and cut into samples of --seq-len tokens.
    #[arg(long)]
    pub text: PathBuf,
    /// Use only the first T tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Tokens per sample: the span, then the --protect-last tail that carries the loss.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Tail tokens per sample that are never dropped; their next-token loss trains the scorer.
    #[arg(long, default_value_t = 64)]
    pub protect_last: usize,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight λ of (mean mask − KEEP)² in the loss.
    #[arg(long, default_value_t = 10.0)]
    pub lambda: f64,
    /// Soft mask: gumbel (σ((s + logistic noise)/T), a relaxed Bernoulli), sigmoid (σ(s/T)) or
    /// st (straight-through: the hard top-KEEP mask forward, σ(s/T)'s gradient backward).
    #[arg(long, default_value = "gumbel")]
    pub mask: String,
    /// T of the soft mask.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Samples held out of training (the text's last ones): the hard top-KEEP choice is scored
    /// on them as training goes, against keeping everything and a random choice (0: off).
    #[arg(long, default_value_t = 8)]
    pub eval_samples: usize,
    /// Score the held-out samples every N steps [default: steps / 5].
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Scorer width.
    #[arg(long, default_value_t = 64)]
    pub d: usize,
    /// Scorer encoder layers.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Scorer attention heads.
    #[arg(long, default_value_t = 2)]
    pub heads: usize,
    /// Where the scorer goes.
    #[arg(long, default_value = "scorer.safetensors")]
    pub out: PathBuf,
    /// Where the loss curve goes, FILE.svg or FILE.png [default: OUT with .svg].
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replace an existing --out or --plot.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the text is empty", path.display());
    }
    Ok(text)
}

fn curve_panels(curve: &[StepStats], held_out: Option<&HeldOut>, title: &str) -> Vec<Panel> {
    let smooth = |values: Vec<f64>| -> Vec<(f64, f64)> {
        // Trailing mean over 10 steps: one sample per step is noisy.
        (0..values.len())
            .map(|i| {
                let from = i.saturating_sub(9);
                ((i + 1) as f64, values[from..=i].iter().sum::<f64>() / (i + 1 - from) as f64)
            })
            .collect()
    };
    let losses: Vec<f64> = curve.iter().map(|c| c.loss).collect();
    let nll: Vec<f64> = curve.iter().map(|c| c.nll).collect();
    let mut panels = vec![
        Panel {
            title: title.to_string(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![
                Series { name: "loss".into(), points: curve.iter().map(|c| (c.step as f64, c.loss)).collect() },
                Series { name: "loss (mean of 10 steps)".into(), points: smooth(losses) },
                Series { name: "tail NLL (mean of 10 steps)".into(), points: smooth(nll) },
            ],
        },
        Panel {
            title: "mean soft mask".into(),
            x_label: "step".into(),
            y_label: "kept share".into(),
            series: vec![Series {
                name: "kept share".into(),
                points: curve.iter().map(|c| (c.step as f64, c.kept)).collect(),
            }],
        },
    ];
    if let Some(h) = held_out {
        let last = curve.len() as f64;
        let flat = |v: f64| vec![(0.0, v), (last, v)];
        panels.push(Panel {
            title: format!("held out ({} samples): hard top-KEEP", h.samples),
            x_label: "step".into(),
            y_label: "tail NLL".into(),
            series: vec![
                Series { name: "learned".into(), points: h.learned.iter().map(|&(s, v)| (s as f64, v)).collect() },
                Series { name: "random".into(), points: flat(h.random) },
                Series { name: "unpruned".into(), points: flat(h.unpruned) },
            ],
        });
    }
    panels
}

pub fn run(args: Args) -> Result<()> {
    args.model.require_f32("pare train-scorer trains in float32 (gradients through the model)")?;
    let settings = TrainSettings {
        cut_layer: args.layer,
        keep: args.keep,
        seq_len: args.seq_len,
        protect_last: args.protect_last,
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        lambda: args.lambda,
        temperature: args.temperature,
        mask: MaskKind::parse(&args.mask)?,
        d: args.d,
        layers: args.layers,
        heads: args.heads,
        eval_samples: args.eval_samples,
        eval_every: args.eval_every,
    };
    settings.check_basic()?;
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be positive");
    }
    let plot = args.plot.clone().unwrap_or_else(|| args.out.with_extension("svg"));
    let plot_format = plot_format(&plot, "--plot")?;
    let text = read_text(&args.text)?;

    let device = args.model.device()?;
    let mut loaded = pare_model::load(&args.model.model, WeightDType::Float(DType::F32), &device)?;
    args.model.apply_adapter(&mut loaded.model)?;
    let model = &loaded.model;
    settings.check(model.num_layers(), model.config().max_position_embeddings)?;
    // Weights, gradients and AdamW's two moments, all f32.
    let scorer = ScorerShape::new(model.config().hidden_size, settings.d, settings.layers, settings.heads)?;
    let bytes = scorer.parameter_count().and_then(|p| p.checked_mul(16));
    pare_model::memory::ensure_fits("a scorer of this --d and --layers", bytes)?;
    // Both checked before training and written only once everything has succeeded.
    if plot == args.out {
        bail!("--plot {} is also --out", plot.display());
    }
    let inputs = [args.text.as_path(), loaded.path.as_path()];
    let out = Output::file(&args.out, "--out", args.force, &inputs)?;
    let plot_out = Output::file(&plot, "--plot", args.force, &inputs)?;
    let mut tokens =
        loaded.tokenizer().context("train-scorer tokenizes --text with the model's tokenizer")?.encode(&text, true)?;
    if let Some(max) = args.max_tokens {
        tokens.truncate(max);
    }
    let frozen = Frozen::new(model, DType::F32)?;

    let bar = progress_bar(settings.steps as u64, "training scorer");
    let mut last_held_out = None;
    let outcome = train(&frozen, &tokens, &settings, |s| {
        last_held_out = s.held_out.or(last_held_out);
        let held = last_held_out.map(|v| format!(", held-out NLL {v:.3}")).unwrap_or_default();
        bar.set_message(format!("training scorer: loss {:.3}, kept {:.2}{held}", s.loss, s.kept));
        bar.set_position(s.step as u64);
    })?;
    bar.finish_and_clear();

    let curve = &outcome.curve;
    let tail = &curve[curve.len().saturating_sub(10)..];
    let mean = |f: fn(&StepStats) -> f64| tail.iter().map(f).sum::<f64>() / tail.len() as f64;
    let (final_loss, final_nll, kept) = (mean(|c| c.loss), mean(|c| c.nll), mean(|c| c.kept));
    let model_name = loaded.path.display().to_string();
    let mut info = ScorerInfo {
        model: model_name.clone(),
        cut_layer: settings.cut_layer,
        keep: settings.keep,
        text: args.text.display().to_string(),
        steps: settings.steps,
        extra: Default::default(),
    };
    for (k, v) in [
        ("seq_len", settings.seq_len.to_string()),
        ("protect_last", settings.protect_last.to_string()),
        ("batch", settings.batch.to_string()),
        ("lr", settings.lr.to_string()),
        ("seed", settings.seed.to_string()),
        ("lambda", settings.lambda.to_string()),
        ("temperature", settings.temperature.to_string()),
        ("mask", settings.mask.name().to_string()),
        ("tokens", tokens.len().to_string()),
        ("final_loss", format!("{final_loss:.6}")),
        ("kept_fraction", format!("{kept:.6}")),
        ("eval_samples", settings.eval_samples.to_string()),
    ] {
        info.extra.insert(k.to_string(), v);
    }
    if let Some(h) = &outcome.held_out {
        let (_, learned) = h.learned.last().copied().unwrap_or((0, f64::NAN));
        info.extra.insert("held_out_nll".into(), format!("{learned:.6}"));
        info.extra.insert("held_out_nll_random".into(), format!("{:.6}", h.random));
        info.extra.insert("held_out_nll_unpruned".into(), format!("{:.6}", h.unpruned));
    }
    outcome.net.save(out.path(), &info)?;
    let title = format!("train-scorer: cut {} keep {} ({} steps)", settings.cut_layer, settings.keep, settings.steps);
    pare_eval::plot::write(&curve_panels(curve, outcome.held_out.as_ref(), &title), plot_format, plot_out.path())
        .with_context(|| format!("cannot write {}", plot.display()))?;
    out.commit()?;
    plot_out.commit()?;

    if args.json {
        return print_json(&json!({
            "out": args.out.display().to_string(),
            "plot": plot.display().to_string(),
            "model": model_name,
            "layer": settings.cut_layer,
            "keep": settings.keep,
            "mask": settings.mask.name(),
            "steps": settings.steps,
            "samples": outcome.samples,
            "tokens": tokens.len(),
            "final_loss": final_loss,
            "final_nll": final_nll,
            "kept_fraction": kept,
            "first_loss": curve[0].loss,
            "seconds": outcome.seconds,
            "held_out": outcome.held_out.as_ref().map(|h| json!({
                "samples": h.samples,
                "unpruned": h.unpruned,
                "random": h.random,
                "learned": h.learned.iter().map(|&(step, nll)| json!({"step": step, "nll": nll})).collect::<Vec<_>>(),
            })),
            "curve": curve.iter().map(|c| json!({"step": c.step, "loss": c.loss, "nll": c.nll, "kept": c.kept})).collect::<Vec<_>>(),
        }));
    }
    println!(
        "trained a token scorer for --prune-tokens {}:{} on {} ({} samples of {} tokens, {} steps, {:.1} s)",
        settings.cut_layer,
        settings.keep,
        args.text.display(),
        outcome.samples,
        settings.seq_len,
        settings.steps,
        outcome.seconds
    );
    println!(
        "loss {:.4} → {final_loss:.4} (mean of the last {} steps), tail NLL {final_nll:.4}, kept share {kept:.3}",
        curve[0].loss,
        tail.len()
    );
    if let Some(h) = &outcome.held_out {
        let (first, last) = (h.learned[0].1, h.learned.last().map(|l| l.1).unwrap_or(f64::NAN));
        println!(
            "held out ({} samples), tail NLL with the hard top-KEEP choice: learned {first:.4} → {last:.4}, random {:.4}, unpruned {:.4}",
            h.samples, h.random, h.unpruned
        );
    }
    println!("wrote {} and {}", args.out.display(), plot.display());
    println!(
        "use it: --prune-tokens {}:{} --prune-score learned:{}",
        settings.cut_layer,
        settings.keep,
        args.out.display()
    );
    Ok(())
}
