//! KV-cache compression for pare ("presses").
//!
//! A press decides which cache entries each layer — and each KV head — keeps. Scorers
//! (`scorers/`, one per file) only score entries; selectors turn scores into kept entries under
//! a budget; presses (`presses/`) decide when that runs: at the end of prefill (kvpress), every
//! few decoding steps, or before every forward (seed 001's StreamingLLM rule). Kept entries keep
//! their original positions unless the rerotate policy moves them. Budgets may differ per row,
//! layer and head, and the cache then holds exactly what is kept.
//!
//! Presses are named as kvpress names them; wrappers compose with `+`, outermost first:
//! `snapkv`, `adakv+snapkv`, `chunkkv+knorm`, `decoding+adakv+expected-attention`.

pub mod budget;
pub mod compress;
pub mod error;
pub mod observation;
pub mod presses;
pub mod scorer;
pub mod scorers;
pub mod select;

pub use budget::Budget;
pub use compress::PositionPolicy;
pub use error::{PressError, Result};
pub use pare_model::hooks::CachePress;

use presses::{AdaKv, ChunkKv, DecodingPress, PrefillPress, PyramidKv, StreamingPress};
use scorer::Scorer;
use select::{HeadTopK, Selector};

/// Scorer presses, usable alone or inside a wrapper.
pub const SCORERS: &[&str] =
    &["knorm", "snapkv", "tova", "observed-attention", "expected-attention", "random", "streaming"];
/// Wrappers, written before the press they wrap.
pub const WRAPPERS: &[&str] = &["decoding", "adakv", "chunkkv"];

/// Every option a press can take; None where the user gave none (kvpress defaults then apply).
#[derive(Debug, Clone, Default)]
pub struct PressOptions {
    pub ratio: Option<f64>,
    pub budget: Option<usize>,
    pub sinks: Option<usize>,
    pub capacity: Option<usize>,
    pub window: Option<usize>,
    pub kernel: Option<usize>,
    pub beta: Option<usize>,
    pub alpha_safeguard: Option<f64>,
    pub chunk_length: Option<usize>,
    pub interval: Option<usize>,
    pub buffer: Option<usize>,
    pub n_future: Option<usize>,
    pub seed: Option<u64>,
    pub positions: PositionPolicy,
}

/// Which option belongs to which press, for the "wrong press" error.
fn options_of(name: &str) -> &'static [&'static str] {
    match name {
        "streaming" => &["sinks", "capacity"],
        "snapkv" => &["window", "kernel"],
        "pyramidkv" => &["window", "kernel", "beta"],
        "expected-attention" => &["sinks", "n-future"],
        "random" => &["seed"],
        "adakv" => &["alpha-safeguard"],
        "chunkkv" => &["chunk-length"],
        "decoding" => &["interval", "buffer"],
        _ => &[],
    }
}

/// Build the press `spec` (a `+` chain) with `opts`; every mistake is one clear message.
pub fn build(spec: &str, opts: &PressOptions) -> Result<Box<dyn CachePress>> {
    let chain: Vec<&str> = spec.split('+').map(str::trim).collect();
    let known = |n: &str| SCORERS.contains(&n) || WRAPPERS.contains(&n) || n == "pyramidkv";
    if let Some(bad) = chain.iter().find(|n| !known(n)) {
        return Err(PressError::config(format!(
            "unknown press {bad:?} (presses: {}, pyramidkv; wrappers: {})",
            SCORERS.join(", "),
            WRAPPERS.join(", ")
        )));
    }
    let given: Vec<(&str, bool)> = vec![
        ("sinks", opts.sinks.is_some()),
        ("capacity", opts.capacity.is_some()),
        ("window", opts.window.is_some()),
        ("kernel", opts.kernel.is_some()),
        ("beta", opts.beta.is_some()),
        ("alpha-safeguard", opts.alpha_safeguard.is_some()),
        ("chunk-length", opts.chunk_length.is_some()),
        ("interval", opts.interval.is_some()),
        ("buffer", opts.buffer.is_some()),
        ("n-future", opts.n_future.is_some()),
        ("seed", opts.seed.is_some()),
    ];
    for (option, is_given) in given {
        if is_given && !chain.iter().any(|n| options_of(n).contains(&option)) {
            return Err(PressError::config(format!("--{option} does not apply to press {spec:?}")));
        }
    }
    let (base, wrappers) = chain.split_last().expect("split yields at least one item");
    if let Some(w) = wrappers.iter().find(|w| !WRAPPERS.contains(w)) {
        return Err(PressError::config(format!(
            "{w:?} is not a wrapper: only {} can wrap another press",
            WRAPPERS.join(", ")
        )));
    }
    if WRAPPERS.contains(base) {
        return Err(PressError::config(format!(
            "{base} wraps a scorer press: write it as {base}+snapkv (or another press)"
        )));
    }
    let decoding = wrappers.first() == Some(&"decoding");
    if wrappers.iter().skip(usize::from(decoding)).any(|&w| w == "decoding") {
        return Err(PressError::config("decoding must be the outermost wrapper"));
    }
    if *base == "streaming" && opts.capacity.is_some() {
        if !wrappers.is_empty() {
            return Err(PressError::config("streaming with --capacity runs on its own; drop the wrappers"));
        }
        if opts.ratio.is_some() || opts.budget.is_some() {
            return Err(PressError::config(
                "streaming takes either --capacity (StreamingLLM's cut before every forward) or --ratio/--budget, not both",
            ));
        }
        return Ok(Box::new(StreamingPress::new(opts.sinks.unwrap_or(4), opts.capacity.unwrap_or(0), opts.positions)?));
    }

    let mut selector = base_selector(base, opts)?;
    for wrapper in wrappers.iter().rev().filter(|&&w| w != "decoding") {
        if *base == "pyramidkv" {
            return Err(PressError::config(format!(
                "pyramidkv sets per-layer budgets itself and cannot be wrapped by {wrapper}"
            )));
        }
        let scorer = selector.scorer().box_clone();
        selector = match *wrapper {
            "adakv" => {
                let alpha = opts.alpha_safeguard.unwrap_or(0.20);
                if !(0.0..=1.0).contains(&alpha) {
                    return Err(PressError::config(format!("--alpha-safeguard must be in [0, 1], got {alpha}")));
                }
                Box::new(AdaKv { scorer, alpha_safeguard: alpha })
            }
            "chunkkv" => {
                let chunk_length = opts.chunk_length.unwrap_or(20);
                if chunk_length == 0 {
                    return Err(PressError::config("--chunk-length must be at least 1"));
                }
                Box::new(ChunkKv { scorer, chunk_length })
            }
            _ => unreachable!("wrappers were checked"),
        };
    }
    if decoding {
        let target = opts.budget.ok_or_else(|| {
            PressError::config("decoding needs --budget N: the entries per head it keeps while decoding")
        })?;
        let prefill = opts.ratio.map(Budget::ratio).transpose()?;
        return Ok(Box::new(DecodingPress::new(
            selector,
            target,
            opts.interval.unwrap_or(512),
            opts.buffer.unwrap_or(256),
            prefill,
            opts.positions,
        )?));
    }
    let budget = match (opts.ratio, opts.budget) {
        (Some(r), None) => Budget::ratio(r)?,
        (None, Some(n)) => Budget::entries(n)?,
        (Some(_), Some(_)) => return Err(PressError::config("give either --ratio or --budget, not both")),
        (None, None) => {
            return Err(PressError::config(format!(
                "press {spec:?} needs --ratio R (fraction removed) or --budget N (entries kept)"
            )))
        }
    };
    Ok(Box::new(PrefillPress { selector, budget, positions: opts.positions }))
}

fn base_selector(name: &str, opts: &PressOptions) -> Result<Box<dyn Selector>> {
    let snapkv = || -> Result<scorers::SnapKv> {
        let s = scorers::SnapKv { window: opts.window.unwrap_or(64), kernel: opts.kernel.unwrap_or(5) };
        if s.window == 0 || s.kernel == 0 || s.kernel.is_multiple_of(2) {
            return Err(PressError::config("snapkv: --window must be at least 1 and --kernel odd"));
        }
        Ok(s)
    };
    let scorer: Box<dyn Scorer> = match name {
        "knorm" => Box::new(scorers::Knorm),
        "snapkv" => Box::new(snapkv()?),
        "tova" => Box::new(scorers::Tova),
        "observed-attention" => Box::new(scorers::ObservedAttention),
        "expected-attention" => Box::new(scorers::ExpectedAttention {
            n_future: opts.n_future.unwrap_or(512).max(1),
            sinks: opts.sinks.unwrap_or(4),
            ..Default::default()
        }),
        "random" => Box::new(scorers::Random { seed: opts.seed.unwrap_or(0) }),
        "streaming" => Box::new(scorers::StreamingScorer { sinks: opts.sinks.unwrap_or(4) }),
        "pyramidkv" => {
            let beta = opts.beta.unwrap_or(20);
            if beta == 0 {
                return Err(PressError::config("--beta must be at least 1"));
            }
            return Ok(Box::new(PyramidKv { snapkv: snapkv()?, beta }));
        }
        other => unreachable!("press {other} was checked"),
    };
    Ok(Box::new(HeadTopK { scorer }))
}
