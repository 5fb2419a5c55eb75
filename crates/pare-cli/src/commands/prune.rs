//! `pare prune`: structured pruning (LLM-Pruner style) of heads and MLP channels, exported as an
//! HF directory (+ GGUF) with the pruning plan, parameters and perplexity before and after.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use pare_formats::{GgmlType, GgufValue};
use pare_model::{Model, WeightDType};
use pare_prune::importance::TaylorVariant;
use pare_prune::report::{layer_shapes, LayerReport, ParamCounts};
use pare_prune::{GqaMode, Importance, PerLayerRatios, PruneSettings, PruningPlan, RatioMode, Reduction};
use serde::Serialize;
use serde_json::json;

use crate::common::{print_json, progress_bar, ModelArgs};
use crate::export_args::{print_export, write_model, GgufArgs, ModelExport};
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Fraction of each pruned layer's units to remove (KV heads, query heads per KV group, MLP channels).
    #[arg(long, default_value_t = 0.25)]
    pub ratio: f64,
    #[arg(long, value_enum, default_value_t = ImportanceArg::Taylor)]
    pub importance: ImportanceArg,
    /// Taylor variant: param_first (Σ|w·g|), vectorize (|Σw·g|), param_second (diagonal Fisher), param_mix.
    #[arg(long, value_enum, default_value_t = TaylorArg::ParamFirst)]
    pub taylor: TaylorArg,
    /// How a group's tensors combine.
    #[arg(long, value_enum, default_value_t = ReductionArg::Sum)]
    pub reduction: ReductionArg,
    /// Attention units: kv-groups (a KV head with its query heads) or query-heads (KV heads kept).
    #[arg(long, value_enum, default_value_t = GqaArg::KvGroups)]
    pub gqa: GqaArg,
    /// Layers whose attention is pruned, start..end (end exclusive) [default: 3..30, clipped to the model].
    #[arg(long)]
    pub attn_layers: Option<String>,
    /// Layers whose MLP is pruned, start..end (end exclusive) [default: 3..30, clipped to the model].
    #[arg(long)]
    pub mlp_layers: Option<String>,
    /// local, global, per-layer:FILE.json ({"attn": {"3": 0.25}, "mlp": {...}}) or block-influence.
    #[arg(long, default_value = "local", value_parser = parse_mode)]
    pub mode: ModeArg,
    /// block-influence: how far per-layer ratios move from --ratio (0 = uniform).
    #[arg(long, default_value_t = 1.0)]
    pub bi_strength: f64,
    /// Keep pruned widths (q_proj rows, MLP channels) multiples of N.
    #[arg(long)]
    pub round_to: Option<usize>,
    /// Seed of --importance random.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Calibration text for taylor, wanda-sp and block-influence [default: assets/texts/c4.utf8].
    #[arg(long)]
    pub calib_text: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub calib_samples: usize,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 64)]
    pub calib_len: usize,
    /// Re-apply a pruning_plan.json instead of choosing.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Write the pruned model here: an HF directory with pruning_plan.json (an existing non-empty
    /// one needs --force).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub gguf: GgufArgs,
    /// Perplexity before and after (ctx --ppl-ctx, non-overlapping windows, first --ppl-tokens tokens of --ppl-text).
    #[arg(long)]
    pub eval_ppl: bool,
    /// [default: assets/texts/wiki.utf8]
    #[arg(long)]
    pub ppl_text: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub ppl_ctx: usize,
    #[arg(long, default_value_t = 8192)]
    pub ppl_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

/// `--importance`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportanceArg {
    Random,
    L1,
    L2,
    Taylor,
    #[value(alias = "wanda_sp")]
    WandaSp,
}

/// `--taylor` (LLM-Pruner's names).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum TaylorArg {
    ParamFirst,
    Vectorize,
    ParamSecond,
    ParamMix,
}

/// `--reduction`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReductionArg {
    Sum,
    Mean,
    Max,
}

/// `--gqa`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GqaArg {
    KvGroups,
    QueryHeads,
}

/// `--mode`: a closed set plus `per-layer:FILE`, parsed once (the file is read later).
#[derive(Debug, Clone, PartialEq)]
pub enum ModeArg {
    Local,
    Global,
    BlockInfluence,
    PerLayer(PathBuf),
}

fn parse_mode(s: &str) -> std::result::Result<ModeArg, String> {
    match s {
        "local" => Ok(ModeArg::Local),
        "global" => Ok(ModeArg::Global),
        "block-influence" => Ok(ModeArg::BlockInfluence),
        m => match m.strip_prefix("per-layer:") {
            Some(path) if !path.is_empty() => Ok(ModeArg::PerLayer(PathBuf::from(path))),
            _ => Err("expected local, global, per-layer:FILE.json or block-influence".into()),
        },
    }
}

impl ImportanceArg {
    fn importance(self, taylor: TaylorArg) -> Importance {
        match self {
            ImportanceArg::Random => Importance::Random,
            ImportanceArg::L1 => Importance::L1,
            ImportanceArg::L2 => Importance::L2,
            ImportanceArg::Taylor => Importance::Taylor(match taylor {
                TaylorArg::ParamFirst => TaylorVariant::ParamFirst,
                TaylorArg::Vectorize => TaylorVariant::Vectorize,
                TaylorArg::ParamSecond => TaylorVariant::ParamSecond,
                TaylorArg::ParamMix => TaylorVariant::ParamMix,
            }),
            ImportanceArg::WandaSp => Importance::WandaSp,
        }
    }
}

/// `a..b` (end exclusive).
fn parse_range(flag: &str, s: &str) -> Result<std::ops::Range<usize>> {
    let (a, b) = s.split_once("..").with_context(|| format!("{flag} {s:?}: expected start..end, e.g. 3..30"))?;
    let (a, b): (usize, usize) = (
        a.trim().parse().with_context(|| format!("{flag} {s:?}: start is not a number"))?,
        b.trim().parse().with_context(|| format!("{flag} {s:?}: end is not a number"))?,
    );
    if a > b {
        bail!("{flag} {s:?}: start is after end");
    }
    Ok(a..b)
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))
}

#[derive(Serialize)]
struct PplReport {
    text: String,
    ctx: usize,
    tokens: usize,
    before: f64,
    after: f64,
}

#[derive(Serialize)]
struct ExportReport {
    #[serde(flatten)]
    model: ModelExport,
    plan: String,
}

pub fn run(args: Args) -> Result<()> {
    args.model.require_f32("pare prune works on float32 weights (gradients and exports)")?;
    let gguf_type = args.gguf.ggml_type();
    if gguf_type.is_some() && args.out.is_none() {
        bail!("--gguf writes OUT/model.gguf: give --out DIR");
    }
    if args.eval_ppl && (args.ppl_ctx == 0 || args.ppl_tokens < 2) {
        bail!("--ppl-ctx must be positive and --ppl-tokens at least 2");
    }
    let plan_file = match &args.plan {
        Some(p) => Some(PruningPlan::from_json(&read_text(p, "plan")?, &p.display().to_string())?),
        None => None,
    };
    let settings = if plan_file.is_none() { Some(settings(&args)?) } else { None };

    let device = args.model.device()?;
    let mut loaded = pare_model::load(&args.model.model, WeightDType::Float(DType::F32), &device)?;
    // Pruning scores and cuts the adapted model: its weights with the adapter folded in.
    args.model.apply_adapter(&mut loaded.model)?;
    loaded.model.merge_lora()?;
    if let Some(why) = gguf_type.and_then(|_| pare_model::export::gguf_unsupported(&loaded.model)) {
        bail!("--gguf: cannot write GGUF: {why}");
    }
    let gguf_keys = match gguf_type {
        Some(_) => crate::export_args::gguf_tokenizer_keys(&loaded).context("--gguf")?,
        None => Vec::new(),
    };
    // Checked before any work; written in full (HF directory, plan, GGUF) before it appears.
    let out = match &args.out {
        Some(dir) => {
            let per_layer = match &args.mode {
                ModeArg::PerLayer(path) => Some(path.as_path()),
                _ => None,
            };
            let inputs = [
                Some(loaded.path.as_path()),
                args.plan.as_deref(),
                args.calib_text.as_deref(),
                args.ppl_text.as_deref(),
                per_layer,
            ];
            Some(Output::dir(dir, "--out", args.force, &inputs.into_iter().flatten().collect::<Vec<_>>())?)
        }
        None => None,
    };
    let model = &loaded.model;
    let n = model.num_layers();

    let mut stage = String::new();
    let mut bar = progress_bar(0, "");
    let mut progress = |label: &str, done: usize, total: usize| {
        if label != stage {
            bar.finish_and_clear();
            bar = progress_bar(total as u64, label);
            stage = label.to_string();
        }
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };

    let (plan, calibration_loss) = match (plan_file, settings) {
        (Some(plan), _) => (plan, None),
        (None, Some(settings)) => {
            let settings = settings.resolve(n)?;
            let calibration = if settings.needs_calibration() {
                let path =
                    args.calib_text.clone().unwrap_or_else(|| pare_model::loader::assets_dir().join("texts/c4.utf8"));
                let text = read_text(&path, "calibration text")?;
                let tok = loaded.tokenizer().context("calibration text needs the model's tokenizer")?;
                Some(pare_prune::calibration::from_text(
                    tok,
                    &text,
                    args.calib_samples,
                    args.calib_len,
                    &path.display().to_string(),
                )?)
            } else {
                None
            };
            let outcome = pare_prune::make_plan(model, &settings, calibration.as_ref(), &mut progress)?;
            (outcome.plan, outcome.scores.calibration_loss)
        }
        (None, None) => bail!("no pruning settings and no --plan"),
    };
    let pruned = pare_prune::apply(model, &plan)?;
    bar.finish_and_clear();
    if let Some(why) = gguf_type.and_then(|_| pare_model::export::gguf_unsupported(&pruned)) {
        bail!("--gguf: cannot write the pruned model as GGUF: {why}");
    }

    let ppl = if args.eval_ppl { Some(perplexity(&args, &loaded, model, &pruned)?) } else { None };

    let export = match out {
        Some(out) => {
            let report = export(&loaded, &pruned, &plan, &out, gguf_type.map(|ty| (ty, gguf_keys.as_slice())))?;
            out.commit()?;
            Some(report)
        }
        None => None,
    };

    let before = ParamCounts::of(model);
    let after = ParamCounts::of(&pruned);
    let shapes_before = layer_shapes(model);
    let shapes_after = layer_shapes(&pruned);
    if args.json {
        return print_json(&json!({
            "model": loaded.path.display().to_string(),
            "method": plan.method,
            "data": plan.data,
            "calibration_loss": calibration_loss,
            "parameters": {"before": before, "after": after, "kept_fraction": after.total as f64 / before.total as f64},
            "layers": shapes_before.iter().zip(&shapes_after).map(|(b, a)| json!({"layer": b.layer, "before": b, "after": a})).collect::<Vec<_>>(),
            "perplexity": ppl,
            "export": export,
        }));
    }
    print_report(&loaded.path, &plan, &before, &after, &shapes_before, &shapes_after, ppl.as_ref(), export.as_ref());
    Ok(())
}

/// Settings from flags; ranges are resolved against the model once it is loaded.
struct Flags {
    importance: Importance,
    reduction: Reduction,
    gqa: GqaMode,
    attn: Option<std::ops::Range<usize>>,
    mlp: Option<std::ops::Range<usize>>,
    ratio: f64,
    mode: RatioMode,
    round_to: Option<usize>,
    seed: u64,
}

impl Flags {
    fn resolve(self, n: usize) -> Result<PruneSettings> {
        let default = || 3.min(n)..30.min(n);
        Ok(PruneSettings {
            importance: self.importance,
            reduction: self.reduction,
            gqa: self.gqa,
            attn_layers: self.attn.unwrap_or_else(default),
            mlp_layers: self.mlp.unwrap_or_else(default),
            ratio: self.ratio,
            mode: self.mode,
            round_to: self.round_to,
            seed: self.seed,
        })
    }
}

fn settings(args: &Args) -> Result<Flags> {
    if !(0.0..=1.0).contains(&args.ratio) {
        bail!("--ratio must be in [0, 1], got {}", args.ratio);
    }
    let mode = match &args.mode {
        ModeArg::Local => RatioMode::Local,
        ModeArg::Global => RatioMode::Global,
        ModeArg::BlockInfluence => RatioMode::BlockInfluence { strength: args.bi_strength },
        ModeArg::PerLayer(path) => {
            let text = read_text(path, "per-layer ratios")?;
            RatioMode::PerLayer(PerLayerRatios::from_json(&text, &path.display().to_string())?)
        }
    };
    if !args.bi_strength.is_finite() || args.bi_strength < 0.0 {
        bail!("--bi-strength must be a non-negative number");
    }
    Ok(Flags {
        importance: args.importance.importance(args.taylor),
        reduction: match args.reduction {
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::Mean => Reduction::Mean,
            ReductionArg::Max => Reduction::Max,
        },
        gqa: match args.gqa {
            GqaArg::KvGroups => GqaMode::KvGroups,
            GqaArg::QueryHeads => GqaMode::QueryHeads,
        },
        attn: args.attn_layers.as_deref().map(|s| parse_range("--attn-layers", s)).transpose()?,
        mlp: args.mlp_layers.as_deref().map(|s| parse_range("--mlp-layers", s)).transpose()?,
        ratio: args.ratio,
        mode,
        round_to: args.round_to,
        seed: args.seed,
    })
}

fn perplexity(args: &Args, loaded: &pare_model::LoadedModel, before: &Model, after: &Model) -> Result<PplReport> {
    let path = args.ppl_text.clone().unwrap_or_else(|| pare_model::loader::assets_dir().join("texts/wiki.utf8"));
    let text = read_text(&path, "perplexity text")?;
    let mut tokens = loaded.tokenizer().context("--eval-ppl needs the model's tokenizer")?.encode(&text, true)?;
    tokens.truncate(args.ppl_tokens);
    let ctx = args.ppl_ctx.min(before.config().max_position_embeddings);
    let run = |model: &Model, label: &str| -> Result<f64> {
        let bar = progress_bar(0, label);
        let r = pare_eval::perplexity(model, &tokens, ctx, ctx, |d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        })?;
        bar.finish_and_clear();
        Ok(r.ppl)
    };
    let b = run(before, "perplexity before")?;
    let a = run(after, "perplexity after")?;
    Ok(PplReport { text: path.display().to_string(), ctx, tokens: tokens.len(), before: b, after: a })
}

/// The HF directory, the plan and, with `gguf`, model.gguf with the given tokenizer keys.
fn export(
    loaded: &pare_model::LoadedModel,
    pruned: &Model,
    plan: &PruningPlan,
    out: &Output,
    gguf: Option<(GgmlType, &[(String, GgufValue)])>,
) -> Result<ExportReport> {
    let (dir, staging) = (out.target(), out.path());
    let model = write_model(loaded, pruned, dir, staging, gguf)?;
    let plan_path = dir.join("pruning_plan.json");
    std::fs::write(staging.join("pruning_plan.json"), plan.to_json())
        .with_context(|| format!("cannot write {}", plan_path.display()))?;
    Ok(ExportReport { model, plan: plan_path.display().to_string() })
}

#[allow(clippy::too_many_arguments)]
fn print_report(
    path: &Path,
    plan: &PruningPlan,
    before: &ParamCounts,
    after: &ParamCounts,
    shapes_before: &[LayerReport],
    shapes_after: &[LayerReport],
    ppl: Option<&PplReport>,
    export: Option<&ExportReport>,
) {
    println!("{}", path.display());
    if let Some(m) = &plan.method {
        let taylor = m.taylor.as_deref().map(|t| format!(" ({t})")).unwrap_or_default();
        println!(
            "{}{taylor}, reduction {}, {}, {} ratio {}, attention layers {}..{}, MLP layers {}..{}",
            m.importance,
            m.reduction,
            m.gqa.name(),
            m.mode,
            m.ratio,
            m.attn_layers[0],
            m.attn_layers[1],
            m.mlp_layers[0],
            m.mlp_layers[1]
        );
    }
    if let Some(d) = &plan.data {
        println!("calibration: {} × {} tokens from {}", d.samples, d.tokens_per_sample, d.source);
    }
    println!("{:<8} {:>12} {:>12} {:>8}", "params", "before", "after", "kept");
    for ((name, b), (_, a)) in before.rows().iter().zip(after.rows()) {
        let kept = if *b > 0 { format!("{:.1} %", 100.0 * a as f64 / *b as f64) } else { "-".into() };
        println!("{name:<8} {b:>12} {a:>12} {kept:>8}");
    }
    let changed: Vec<_> = shapes_before.iter().zip(shapes_after).filter(|(b, a)| b != a).collect();
    if !changed.is_empty() {
        println!("layer  heads  kv     mlp_width");
        for (b, a) in changed {
            println!(
                "{:>5}  {:>2}→{:<2}  {}→{}  {}→{}",
                b.layer, b.heads, a.heads, b.kv_heads, a.kv_heads, b.mlp_width, a.mlp_width
            );
        }
    }
    if let Some(p) = ppl {
        println!("perplexity {:.4} → {:.4} ({}, ctx {}, {} tokens)", p.before, p.after, p.text, p.ctx, p.tokens);
    }
    if let Some(e) = export {
        println!("wrote {} (plan {})", e.model.dir, e.plan);
        print_export(&e.model);
    }
}
