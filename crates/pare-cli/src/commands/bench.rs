//! `pare bench`: prefill and decode throughput, KV-cache bytes and peak memory (host, and GPU on
//! CUDA). Decode is greedy with the argmax taken on the device, so only token ids cross to the host.
//! `pare bench serve` (bench_serve.rs) measures a server under load instead.

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use candle_core::Tensor;
use pare_model::{Hooks, KvCache, Model, PrefillInput};

use pare_kernels::{gpu_memory, reset_gpu_memory_peak};

use crate::common::{ensure_run_fits, peak_rss_bytes, print_json, ModelArgs, ParallelArgs};
use crate::press_args::PressArgs;
use crate::session::Session;
use crate::token_prune_args::TokenPruneArgs;

/// `pare bench [FLAGS]` measures the model in this process; `pare bench serve` loads a server.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub sub: Option<BenchSub>,
    #[command(flatten)]
    pub args: Args,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchSub {
    /// Load an OpenAI-compatible server with ShareGPT prompts: tokens/s, TTFT, inter-token latency.
    Serve(super::bench_serve::Args),
}

pub fn dispatch(command: BenchCommand) -> Result<()> {
    match command.sub {
        Some(BenchSub::Serve(a)) => super::bench_serve::run(a),
        None => run(command.args),
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// New tokens decoded after the prompt.
    #[arg(long, alias = "new-tokens", default_value_t = 64)]
    pub gen_len: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// How the batch's rows hold their KV: one cache for all (`pare generate`'s batch), or a
    /// cache per row stepped together (what `pare serve` does with concurrent requests).
    #[arg(long, value_enum, default_value_t = Caches::Shared)]
    pub caches: Caches,
    /// Untimed warm-up steps before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Prefill is timed this many times; the median is reported (single runs vary by several %).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[command(flatten)]
    pub press: PressArgs,
    #[command(flatten)]
    pub token_prune: TokenPruneArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caches {
    /// One cache holds every row: one prefill of the left-padded batch.
    Shared,
    /// Each row its own cache, prefilled alone; a decode step runs them all.
    PerRow,
}

impl Caches {
    fn name(self) -> &'static str {
        match self {
            Caches::Shared => "shared",
            Caches::PerRow => "per-row",
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.prompt_len == 0 || args.batch == 0 {
        bail!("--prompt-len and --batch must be at least 1");
    }
    let session = Session::open(&args.model, &args.parallel, &args.press, &args.token_prune)?;
    let model = &session.loaded.model;
    let ctx = model.config().max_position_embeddings;
    let total = args.prompt_len.saturating_add(args.gen_len);
    if total > ctx {
        bail!("--prompt-len + --gen-len exceeds the model's context of {ctx}");
    }
    ensure_run_fits(&session.loaded, args.batch, args.prompt_len, total)?;
    // Deterministic, varied token ids: speed does not depend on which tokens they are.
    let vocab = model.config().vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..args.batch as u64)
        .map(|b| (0..args.prompt_len as u64).map(|i| ((i * 7919 + b * 104_729 + 13) % vocab) as u32).collect())
        .collect();

    let device = model.device().clone();
    for _ in 0..args.warmup {
        // A few steps: on a GPU the first launches load kernels and pick GEMM algorithms.
        let short = [prompts[0][..prompts[0].len().min(16)].to_vec()];
        let mut hooks = Hooks::default();
        let (mut logits, mut cache) = model.prefill(PrefillInput::Tokens(&short), &mut hooks)?;
        for _ in 0..3 {
            let next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
            logits = model.decode(&mut [(&mut cache, &mut hooks)], &next)?;
        }
    }
    device.synchronize()?;
    reset_gpu_memory_peak(&device);

    // The rows of each cache: all in one, or one each.
    let groups: Vec<&[Vec<u32>]> = match args.caches {
        Caches::Shared => vec![&prompts[..]],
        Caches::PerRow => prompts.chunks(1).collect(),
    };
    let mut prefill_times = Vec::new();
    let mut filled: Vec<(KvCache, Hooks)> = Vec::new();
    let mut logits = Vec::new();
    for _ in 0..args.repeat.max(1) {
        // Free the last run's caches first: two sets at once would inflate peak memory.
        filled.clear();
        logits.clear();
        let start = Instant::now();
        for rows in &groups {
            let mut hooks = session.hooks.clone();
            let (l, cache) = model.prefill(PrefillInput::Tokens(rows), &mut hooks)?;
            logits.push(l);
            filled.push((cache, hooks));
        }
        // GPU work is asynchronous: stop the clock when it is done, not when it is queued.
        device.synchronize()?;
        prefill_times.push(start.elapsed().as_secs_f64());
    }
    prefill_times.sort_by(f64::total_cmp);
    let prefill_s = prefill_times[prefill_times.len() / 2];
    let bytes = |f: &[(KvCache, Hooks)], of: fn(&KvCache) -> usize| f.iter().map(|(c, _)| of(c)).sum::<usize>();
    let kv_bytes_prefill = bytes(&filled, KvCache::bytes);
    let mut logits = Tensor::cat(&logits, 0)?;
    let start = Instant::now();
    for _ in 0..args.gen_len {
        let next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let mut seqs: Vec<(&mut KvCache, &mut Hooks)> = filled.iter_mut().map(|(c, h)| (c, h)).collect();
        logits = model.decode(&mut seqs, &next)?;
    }
    device.synchronize()?;
    let decode_s = start.elapsed().as_secs_f64();
    let prefill_tok_s = (args.batch * args.prompt_len) as f64 / prefill_s;
    let decode_tok_s = if args.gen_len > 0 { (args.batch * args.gen_len) as f64 / decode_s } else { 0.0 };
    let kv_bytes = bytes(&filled, KvCache::bytes);
    let (allocated, uncompressed) =
        (bytes(&filled, KvCache::allocated_bytes), bytes(&filled, KvCache::uncompressed_bytes));
    let peak = peak_rss_bytes();
    let gpu = gpu_memory(&device);
    // Under --tp every rank reads its own part.
    let weight_bytes: usize = model.ranks().iter().map(decode_weight_bytes).sum();
    if args.json {
        print_json(&json!({
            "model": args.model.model, "dtype": args.model.dtype_name(), "kv_dtype": args.model.kv_dtype().name(), "device": args.model.device.to_string(),
            "batch": args.batch, "caches": args.caches.name(), "prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s,
            "kv_cache_bytes": kv_bytes, "kv_cache_allocated_bytes": allocated,
            "kv_cache_bytes_prefill": kv_bytes_prefill, "kv_cache_uncompressed_bytes": uncompressed,
            "press": args.press.press,
            "peak_rss_bytes": peak, "decode_weight_bytes": weight_bytes,
            "gpu_mem_peak_bytes": gpu.map(|g| g.peak), "gpu_mem_used_bytes": gpu.map(|g| g.used),
            "gpu_mem_total_bytes": gpu.map(|g| g.total),
        }))?;
    } else {
        println!("model      {} ({}, {})", args.model.model, args.model.dtype_name(), args.model.device);
        let caches = if args.caches == Caches::PerRow { ", a cache per row" } else { "" };
        println!("shape      batch {} × prompt {} + {} new{caches}", args.batch, args.prompt_len, args.gen_len);
        println!("prefill    {prefill_tok_s:.1} tok/s ({prefill_s:.3} s)");
        println!("decode     {decode_tok_s:.1} tok/s ({decode_s:.3} s)");
        println!(
            "kv cache   {:.2} MiB ({:.2} MiB uncompressed)",
            kv_bytes as f64 / (1 << 20) as f64,
            uncompressed as f64 / (1 << 20) as f64
        );
        if let Some(p) = peak {
            println!("peak rss   {:.1} MiB", p as f64 / (1 << 20) as f64);
        }
        if let Some(g) = gpu {
            println!(
                "gpu memory {:.1} MiB peak in tensors, {:.1} MiB in use on the device",
                g.peak as f64 / (1 << 20) as f64,
                g.used as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}

/// Bytes of weights a decode step reads (the roofline's numerator with the KV cache): every
/// matrix once; an untied embedding table only a row per token.
fn decode_weight_bytes(model: &Model) -> usize {
    let block_bytes = |b: &pare_model::model::Block| {
        let (a, m) = (&b.attn, &b.mlp);
        [&a.q(), &a.k(), &a.v(), &a.o(), &m.up(), &m.down()].iter().map(|l| l.storage_bytes()).sum::<usize>()
            + m.gate().as_ref().map_or(0, |g| g.storage_bytes())
    };
    model.blocks().iter().map(block_bytes).sum::<usize>() + model.lm_head().storage_bytes()
}
