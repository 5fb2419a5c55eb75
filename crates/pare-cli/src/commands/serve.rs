//! `pare serve`: the OpenAI-compatible server (crates/pare-serve) on one model.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::common::{ModelArgs, ParallelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name clients send (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences generating at once.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent: usize,
    /// Sequences waiting for admission; beyond it requests get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// KV-cache bytes admission may commit (default: half the memory free once the model is
    /// loaded: the GPU's on CUDA, else the host's).
    #[arg(long)]
    pub kv_memory: Option<usize>,
    /// Prompt tokens one engine step prefills at most, over every waiting prompt (vLLM's
    /// --max-num-batched-tokens, llama-server's --batch-size): lower keeps running sequences'
    /// inter-token latency down while prompts arrive, higher prefills bursts in fewer steps.
    #[arg(long, default_value_t = pare_serve::DEFAULT_MAX_BATCHED_TOKENS)]
    pub max_batched_tokens: usize,
    /// Longest a request may take, queueing included, in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

pub fn run(args: Args) -> Result<()> {
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds, got {}", args.timeout);
    }
    if args.max_batched_tokens == 0 {
        bail!("--max-batched-tokens must be at least 1");
    }
    // Checked before the server starts (clap has parsed --dtype): a device that cannot be
    // opened is the command's error.
    args.model.device()?;
    let (model, parallel) = (args.model.clone(), args.parallel.clone());
    let config = pare_serve::ServeConfig {
        load: Box::new(move || parallel.load(&model).map_err(|e| format!("{e:#}"))),
        served_name: args.served_model_name.unwrap_or_else(|| args.model.model.clone()),
        api_key: args.api_key,
        max_concurrent: args.max_concurrent,
        max_queue: args.max_queue,
        kv_memory: args.kv_memory,
        max_batched_tokens: args.max_batched_tokens,
        timeout: Duration::from_secs_f64(args.timeout),
    };
    pare_serve::run(&args.host, args.port, config)?;
    Ok(())
}
