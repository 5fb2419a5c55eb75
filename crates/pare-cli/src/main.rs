//! `pare`: lean LLM inference from the command line.

mod commands;
mod common;
mod press_args;
mod prune_args;
mod sampling_args;
mod session;

use clap::{Parser, Subcommand};

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
    /// Measure prefill and decode speed and memory.
    Bench(commands::bench::Args),
    /// Show a model's architecture, shapes, parameters and memory.
    Inspect(commands::inspect::Args),
    /// Convert a GGUF model into a dequantized HF directory.
    Convert(commands::convert::Args),
    /// Write an HF checkpoint with a real model's shapes and random weights (benchmarks).
    InitRandom(commands::init_random::Args),
    /// Structured pruning (LLM-Pruner style): remove heads and MLP channels, export HF / GGUF.
    Prune(commands::prune::Args),
    /// Prefill and decode FLOPs by component and KV-cache bytes, against the unpruned run.
    Flops(commands::flops::Args),
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

fn main() {
    let cli = Cli::parse();
    if let Err(e) = start_threads(cli.threads) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Score(a) => commands::score::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::InitRandom(a) => commands::init_random::run(a),
        Command::Prune(a) => commands::prune::run(a),
        Command::Flops(a) => commands::flops::run(a),
        Command::TrainScorer(a) => commands::train_scorer::run(a),
        Command::Serve(a) => commands::serve::run(a),
    };
    if let Err(e) = result {
        // One line, whatever the chain of causes.
        let message = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
