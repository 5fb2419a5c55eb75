//! `pare`: lean LLM inference from the command line.

mod commands;
mod common;
mod export_args;
mod output;
mod press_args;
mod sampling_args;
mod session;
mod token_prune_args;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pare",
    version,
    about = "Lean LLM inference: one engine for KV-cache compression, token pruning and structured pruning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for every parallel op (one pool, started once). Default: the physical cores.
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (streams to stdout).
    Generate(commands::generate::Args),
    /// Show the next-token distribution after a prompt.
    Score(commands::score::Args),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Measure prefill and decode speed and memory (`bench serve`: a server under load).
    Bench(commands::bench::BenchCommand),
    /// Show a model's architecture, shapes, parameters and memory.
    Inspect(commands::inspect::Args),
    /// Convert a GGUF model into a dequantized HF directory.
    Convert(commands::convert::Args),
    /// Write an HF checkpoint with a real model's shapes and random weights (benchmarks).
    InitRandom(commands::init_random::Args),
    /// Structured pruning (LLM-Pruner style): remove heads and MLP channels, export HF / GGUF.
    Prune(commands::prune::Args),
    /// LoRA fine-tuning (LLM-Pruner's recovery after pruning): adapters in HF peft's format.
    Finetune(commands::finetune::Args),
    /// Prefill and decode FLOPs by component and KV-cache bytes, against the unpruned run.
    Flops(commands::flops::Args),
    /// Learn a model's DuoAttention head pattern from calibration text (`--press duo-attention`).
    DuoPattern(commands::duo_pattern::Args),
    /// Train a learned token scorer for prefill token pruning (`--prune-score learned:FILE`).
    TrainScorer(commands::train_scorer::Args),
    /// Serve the model over an OpenAI-compatible HTTP API (docs/serving.md).
    Serve(commands::serve::Args),
}

/// One pool for pare's kernels and candle's CPU ops alike: candle sizes its GEMM by
/// RAYON_NUM_THREADS (else the logical CPUs), so that is set to the pool's size too.
fn start_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let n = pare_kernels::threads::init(threads)?;
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    Ok(())
}

/// Keep freed memory in the process instead of handing it back to the kernel. A forward pass
/// allocates and frees tensors of megabytes by the hundred; with glibc's defaults each came back
/// as fresh pages the kernel had to fault in and zero (a fifth of LoRA training's CPU time), and
/// with these settings training on the CPU runs ~30 % faster. Blocks over 32 MiB (glibc's
/// ceiling) still come from mmap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() {
    keep_freed_memory();
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: clap's own text on stdout.
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => fail(&clap_one_line(&e), 2),
    };
    // A server keeps running when whoever reads its stdout goes away.
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_stdout();
    }
    if let Err(e) = start_threads(cli.threads) {
        fail(&format!("{e:#}"), 1);
    }
    let result = match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Score(a) => commands::score::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Bench(a) => commands::bench::dispatch(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::InitRandom(a) => commands::init_random::run(a),
        Command::Prune(a) => commands::prune::run(a),
        Command::Finetune(a) => commands::finetune::run(a),
        Command::Flops(a) => commands::flops::run(a),
        Command::TrainScorer(a) => commands::train_scorer::run(a),
        Command::DuoPattern(a) => commands::duo_pattern::run(a),
        Command::Serve(a) => commands::serve::run(a),
    };
    if let Err(e) = result {
        fail(&error_one_line(&e), 1);
    }
}

/// Print the error on one line, settings the libraries name (`` `prune_tokens` ``) spelled as
/// this command line's flags (`--prune-tokens`), and exit.
fn fail(message: &str, code: i32) -> ! {
    let message = pare_model::spell_settings(message, |name| format!("--{}", name.replace('_', "-")));
    eprintln!("error: {message}");
    std::process::exit(code);
}

/// The command line with every value-taking flag accepting a leading `-`, so that
/// `--max-new-tokens -1` is reported as an invalid value of that flag rather than as an
/// unexpected argument `-1`.
fn parse_args() -> Result<Cli, clap::Error> {
    fn allow_negatives(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.mut_args(|a| if a.get_action().takes_values() { a.allow_negative_numbers(true) } else { a });
        let names: Vec<String> = cmd.get_subcommands().map(|c| c.get_name().to_string()).collect();
        names.into_iter().fold(cmd, |cmd, name| cmd.mut_subcommand(name, allow_negatives))
    }
    let matches = allow_negatives(Cli::command()).try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

/// clap's message without its usage block and hints, on one line.
fn clap_one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    kept.join(" ").trim_start_matches("error: ").to_string()
}

/// The error and its causes on one line, leaving out a cause whose text is already there
/// (library errors often print their source in their own message).
fn error_one_line(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// Rust ignores SIGPIPE, so a write to a closed pipe (`pare … | head -3`) fails and `println!`
/// panics. Restore the default action: the process ends quietly with 141, as Unix tools do.
/// (Sockets are not affected: Rust writes to them with MSG_NOSIGNAL.)
fn quiet_on_closed_stdout() {
    // SAFETY: called in main before any other thread exists; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
