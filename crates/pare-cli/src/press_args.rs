//! `--press NAME` and its options, shared by every command that runs the model.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use pare_press::{CachePress, PositionPolicy, PressOptions};

#[derive(Args, Debug, Clone, Default)]
pub struct PressArgs {
    /// KV-cache press: knorm, snapkv, tova, observed-attention, expected-attention, random,
    /// streaming, pyramidkv; wrappers compose with `+`: adakv+snapkv, chunkkv+knorm,
    /// decoding+snapkv.
    #[arg(long, help_heading = "KV-cache compression")]
    pub press: Option<String>,
    /// Fraction of the cache entries removed, in [0, 1) (with decoding: of the prompt, at prefill).
    #[arg(long, allow_negative_numbers = true, help_heading = "KV-cache compression")]
    pub ratio: Option<f64>,
    /// Entries kept per layer and KV head (with decoding: the target while decoding).
    #[arg(long, help_heading = "KV-cache compression")]
    pub budget: Option<usize>,
    /// streaming, expected-attention: first entries always kept (default 4).
    #[arg(long, help_heading = "KV-cache compression")]
    pub sinks: Option<usize>,
    /// streaming: cut every layer to this many entries before each forward (StreamingLLM).
    #[arg(long, help_heading = "KV-cache compression")]
    pub capacity: Option<usize>,
    /// snapkv, pyramidkv: observation window of recent queries (default 64).
    #[arg(long, help_heading = "KV-cache compression")]
    pub window: Option<usize>,
    /// snapkv, pyramidkv: average-pooling kernel (default 5).
    #[arg(long, help_heading = "KV-cache compression")]
    pub kernel: Option<usize>,
    /// pyramidkv: steepness of the per-layer budgets (default 20).
    #[arg(long, help_heading = "KV-cache compression")]
    pub beta: Option<usize>,
    /// adakv: share of each head's budget it is guaranteed (default 0.2).
    #[arg(long, help_heading = "KV-cache compression")]
    pub alpha_safeguard: Option<f64>,
    /// chunkkv: entries per chunk (default 20).
    #[arg(long, help_heading = "KV-cache compression")]
    pub chunk_length: Option<usize>,
    /// decoding: compress every this many decoding steps (default 512).
    #[arg(long, help_heading = "KV-cache compression")]
    pub interval: Option<usize>,
    /// decoding: recent queries kept for scoring (default 256).
    #[arg(long, help_heading = "KV-cache compression")]
    pub buffer: Option<usize>,
    /// expected-attention: future positions averaged over (default 512).
    #[arg(long, help_heading = "KV-cache compression")]
    pub n_future: Option<usize>,
    /// random: seed of the scores.
    #[arg(long, help_heading = "KV-cache compression")]
    pub press_seed: Option<u64>,
    /// Kept entries keep their original positions, or move to contiguous ones (keys re-rotated).
    #[arg(long, value_enum, default_value_t = Positions::Original, help_heading = "KV-cache compression")]
    pub positions: Positions,
}

#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Positions {
    #[default]
    Original,
    Rerotate,
}

impl PressArgs {
    pub fn options(&self) -> PressOptions {
        PressOptions {
            ratio: self.ratio,
            budget: self.budget,
            sinks: self.sinks,
            capacity: self.capacity,
            window: self.window,
            kernel: self.kernel,
            beta: self.beta,
            alpha_safeguard: self.alpha_safeguard,
            chunk_length: self.chunk_length,
            interval: self.interval,
            buffer: self.buffer,
            n_future: self.n_future,
            seed: self.press_seed,
            positions: match self.positions {
                Positions::Original => PositionPolicy::Original,
                Positions::Rerotate => PositionPolicy::Rerotate,
            },
        }
    }

    /// The press the flags describe, None without --press; checked before any model loads.
    pub fn build(&self) -> Result<Option<Box<dyn CachePress>>> {
        let Some(name) = &self.press else {
            let o = self.options();
            let stray = [
                (o.ratio.is_some(), "--ratio"),
                (o.budget.is_some(), "--budget"),
                (o.sinks.is_some(), "--sinks"),
                (o.capacity.is_some(), "--capacity"),
                (o.window.is_some(), "--window"),
                (o.kernel.is_some(), "--kernel"),
                (o.beta.is_some(), "--beta"),
                (o.alpha_safeguard.is_some(), "--alpha-safeguard"),
                (o.chunk_length.is_some(), "--chunk-length"),
                (o.interval.is_some(), "--interval"),
                (o.buffer.is_some(), "--buffer"),
                (o.n_future.is_some(), "--n-future"),
                (o.seed.is_some(), "--press-seed"),
                (self.positions != Positions::Original, "--positions"),
            ];
            if let Some((_, flag)) = stray.iter().find(|(given, _)| *given) {
                bail!("{flag} needs --press NAME");
            }
            return Ok(None);
        };
        Ok(Some(pare_press::build(name, &self.options())?))
    }
}

/// 1536 → "1.5 KiB": cache sizes for people.
pub fn human_bytes(bytes: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}
