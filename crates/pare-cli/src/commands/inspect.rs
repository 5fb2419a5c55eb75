//! `pare inspect`: architecture, config, per-layer shapes, parameters and memory.

use anyhow::Result;
use serde_json::json;

use crate::common::{print_json, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = args.model.load()?;
    let m = &loaded.model;
    let cfg = &m.config();
    let embed = m.embed_tokens().elem_count();
    let attention: usize = m.blocks().iter().map(|b| b.attn.param_count()).sum();
    let mlp: usize = m.blocks().iter().map(|b| b.mlp.param_count()).sum();
    let norms: usize = m.blocks().iter().map(|b| b.attn_norm.param_count() + b.mlp_norm.param_count()).sum::<usize>()
        + m.final_norm().param_count();
    let lm_head = if cfg.tie_word_embeddings { 0 } else { m.lm_head().param_count() };
    let weight_bytes: usize = m.embed_tokens().elem_count() * m.embed_tokens().dtype().size_in_bytes()
        + m.blocks()
            .iter()
            .map(|b| {
                let a = &b.attn;
                let mlp = &b.mlp;
                a.q().storage_bytes()
                    + a.k().storage_bytes()
                    + a.v().storage_bytes()
                    + a.o().storage_bytes()
                    + mlp.gate().as_ref().map_or(0, |g| g.storage_bytes())
                    + mlp.up().storage_bytes()
                    + mlp.down().storage_bytes()
                    + (b.attn_norm.param_count() + b.mlp_norm.param_count()) * m.dtype().size_in_bytes()
            })
            .sum::<usize>()
        + if cfg.tie_word_embeddings && matches!(m.lm_head(), pare_model::layers::Linear::Dense { .. }) {
            0
        } else {
            m.lm_head().storage_bytes()
        };
    let layers: Vec<_> = m
        .blocks()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({"layer": i, "heads": b.attn.num_heads(), "kv_heads": b.attn.num_kv_heads(), "head_dim": b.attn.head_dim(),
                   "mlp_width": b.mlp.width(), "attention_params": b.attn.param_count(), "mlp_params": b.mlp.param_count()})
        })
        .collect();
    let kv_bytes_per_token: usize =
        m.blocks().iter().map(|b| 2 * b.attn.num_kv_heads() * m.kv_dtype().entry_bytes(b.attn.head_dim())).sum();
    let report = json!({
        "path": loaded.path.display().to_string(),
        "format": loaded.format,
        "architecture": cfg.arch,
        "config": cfg,
        "dtype": format!("{:?}", m.dtype()).to_lowercase(),
        "weights": args.model.dtype_name(),
        "parameters": {"total": m.param_count(), "embedding": embed, "attention": attention, "mlp": mlp, "norms": norms, "lm_head": lm_head},
        "weight_bytes": weight_bytes,
        "kv_cache_bytes_per_token": kv_bytes_per_token,
        "layers": layers,
        "eos_token_ids": loaded.eos_token_ids(),
        "vocab_size": cfg.vocab_size,
        "has_chat_template": loaded.tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some()),
    });
    if args.json {
        return print_json(&report);
    }
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!("{} ({}, {})", loaded.path.display(), loaded.format, cfg.arch.model_type());
    println!(
        "hidden {}  layers {}  heads {}/{} kv  head_dim {}  rotary {}  vocab {}  context {}",
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.rotary_dim,
        cfg.vocab_size,
        cfg.max_position_embeddings
    );
    println!(
        "rope theta {}  scaling {:?}  norm eps {}  tied embeddings {}",
        cfg.rope_theta, cfg.rope_scaling, cfg.norm_eps, cfg.tie_word_embeddings
    );
    println!("parameters {:.2} M", m.param_count() as f64 / 1e6);
    for (name, n) in
        [("embedding", embed), ("attention", attention), ("mlp", mlp), ("norms", norms), ("lm_head", lm_head)]
    {
        println!("  {name:<10} {:>12}  ({:.1} %)", n, 100.0 * n as f64 / m.param_count() as f64);
    }
    println!("weights in memory {:.1} MiB ({})", mib(weight_bytes), args.model.dtype_name());
    println!("kv cache {:.1} KiB per token", kv_bytes_per_token as f64 / 1024.0);
    let uniform = m
        .blocks()
        .windows(2)
        .all(|w| w[0].attn.num_heads() == w[1].attn.num_heads() && w[0].mlp.width() == w[1].mlp.width());
    if uniform {
        let b = &m.blocks()[0];
        println!(
            "every layer: {} heads, {} kv heads, mlp width {}",
            b.attn.num_heads(),
            b.attn.num_kv_heads(),
            b.mlp.width()
        );
    } else {
        println!("layer  heads  kv  mlp_width  params");
        for (i, b) in m.blocks().iter().enumerate() {
            println!(
                "{i:>5}  {:>5}  {:>2}  {:>9}  {}",
                b.attn.num_heads(),
                b.attn.num_kv_heads(),
                b.mlp.width(),
                b.param_count()
            );
        }
    }
    Ok(())
}
