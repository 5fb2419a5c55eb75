//! `--press NAME` and its options, shared by every command that runs the model.

use anyhow::{bail, Result};
use clap::Args;
use pare_press::{CachePress, PressOptions};

/// `--press NAME` and the options pare-press defines (the same ones the server's JSON takes).
#[derive(Args, Debug, Clone, Default)]
pub struct PressArgs {
    /// KV-cache press: knorm, snapkv, tova, observed-attention, expected-attention, compactor,
    /// random, streaming, pyramidkv, finch, kvzip, duo-attention (with --duo-pattern); wrappers compose
    /// with `+`: adakv+snapkv, chunkkv+knorm,
    /// decoding+snapkv, block+keydiff; think (key channels) first: think+snapkv.
    #[arg(long, help_heading = "KV-cache compression")]
    pub press: Option<String>,
    #[command(flatten)]
    pub options: PressOptions,
}

impl PressArgs {
    /// The press the flags describe, None without --press; checked before any model loads.
    pub fn build(&self) -> Result<Option<Box<dyn CachePress>>> {
        let Some(name) = &self.press else {
            if let Some(option) = self.options.given().first() {
                let flag = if *option == "seed" { "press-seed" } else { option };
                bail!("--{flag} needs --press NAME");
            }
            return Ok(None);
        };
        Ok(Some(pare_press::build(name, &self.options)?))
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
