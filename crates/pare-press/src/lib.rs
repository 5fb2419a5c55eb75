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

use serde::Deserialize;

use presses::{
    AdaKv, BlockPress, ChunkKv, CriticalAdaKv, CriticalKv, DecodingPress, DuoAttention, DuoPattern, Finch, FinchScorer,
    KvZip, PrefillPress, PyramidKv, StreamingPress, ThinkPress,
};
use scorer::Scorer;
use select::{HeadTopK, Selector};

/// Scorer presses, usable alone or inside a wrapper.
pub const SCORERS: &[&str] = &[
    "knorm",
    "keydiff",
    "lagkv",
    "cur",
    "compactor",
    "snapkv",
    "tova",
    "observed-attention",
    "expected-attention",
    "random",
    "streaming",
];
/// Presses that choose their entries their own way rather than by a scorer's top entries per head
/// (and think, which prunes key channels, first in a chain).
pub const STANDALONE: &[&str] = &["pyramidkv", "finch", "kvzip", "think", "duo-attention"];
/// Wrappers, written before the press they wrap.
pub const WRAPPERS: &[&str] = &["decoding", "adakv", "chunkkv", "critical", "block"];
/// The scorers block wraps: those that read only keys and values. kvpress's BlockPress hands a
/// query-based scorer hidden states whose per-head slices come from different tokens, scored at
/// the last positions of the prompt, which no query pare observes reproduces.
pub const BLOCK_SCORERS: &[&str] = &["knorm", "keydiff", "lagkv", "cur"];

/// Every option a press can take; None where the user gave none (kvpress defaults then apply).
///
/// One definition for both front ends: the CLI's flags (clap, `--press-seed` for `seed`) and the
/// server's JSON (serde, unknown fields rejected by name), so a new option appears in both.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(next_help_heading = "KV-cache compression")]
pub struct PressOptions {
    /// Fraction of the cache entries removed, in [0, 1) (with decoding: of the prompt, at prefill).
    #[arg(long, allow_negative_numbers = true)]
    pub ratio: Option<f64>,
    /// Entries kept per layer and KV head (with decoding: the target while decoding).
    #[arg(long)]
    pub budget: Option<usize>,
    /// streaming, expected-attention, lagkv, cur, compactor: first entries always kept (default
    /// 4; compactor 8).
    #[arg(long)]
    pub sinks: Option<usize>,
    /// compactor: last entries always kept (default 4).
    #[arg(long)]
    pub sinks_end: Option<usize>,
    /// streaming: cut every layer to this many entries before each forward (StreamingLLM).
    #[arg(long)]
    pub capacity: Option<usize>,
    /// snapkv, pyramidkv: observation window of recent queries (default 64).
    #[arg(long)]
    pub window: Option<usize>,
    /// snapkv, pyramidkv: average-pooling kernel (default 5).
    #[arg(long)]
    pub kernel: Option<usize>,
    /// pyramidkv: steepness of the per-layer budgets (default 20).
    #[arg(long)]
    pub beta: Option<usize>,
    /// adakv: share of each head's budget it is guaranteed (default 0.2).
    #[arg(long)]
    pub alpha_safeguard: Option<f64>,
    /// chunkkv: entries per chunk (default 20).
    #[arg(long)]
    pub chunk_length: Option<usize>,
    /// decoding: compress every this many decoding steps (default 512).
    #[arg(long)]
    pub interval: Option<usize>,
    /// decoding: recent queries kept for scoring (default 256).
    #[arg(long)]
    pub buffer: Option<usize>,
    /// expected-attention: future positions averaged over (default 512).
    #[arg(long)]
    pub n_future: Option<usize>,
    /// lagkv: entries per partition, each judged against the next (default 128).
    #[arg(long)]
    pub lag_size: Option<usize>,
    /// critical: share of each head's budget chosen by the wrapped scorer alone (default 0.5).
    #[arg(long)]
    pub first_stage_ratio: Option<f64>,
    /// block: entries scored per block, with what each head kept so far (default 128).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// think: fraction of each KV head's key channels zeroed at prefill, in [0, 1).
    #[arg(long)]
    pub key_channel_ratio: Option<f64>,
    /// kvzip: context tokens each replay pass repeats (default 2048); compactor: tokens per chunk
    /// of its non-causal attention (default 256).
    #[arg(long)]
    pub chunk_size: Option<usize>,
    /// compactor: columns of the Gaussian sketch of the keys (default 48).
    #[arg(long)]
    pub sketch_dimension: Option<usize>,
    /// compactor: weight of the leverage scores against the attention scores, in [0, 1]
    /// (default: the ratio, else 0.35).
    #[arg(long, allow_negative_numbers = true)]
    pub blending: Option<f64>,
    /// kvzip: evict as many entries in every layer (default: the lowest scores over all layers).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub layerwise: Option<bool>,
    /// kvzip: KVzip+ normalization (weights ÷ ‖h‖ of the replay token × ‖v·W_o‖ of the entry).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub kvzip_plus: Option<bool>,
    /// duo-attention: fraction of all (layer, KV head) pairs that become streaming heads, in [0, 1].
    #[arg(long)]
    pub head_ratio: Option<f64>,
    /// duo-attention: the model's head pattern (JSON, written by `pare duo-pattern`).
    #[arg(long, value_name = "FILE")]
    pub duo_pattern: Option<std::path::PathBuf>,
    /// random: seed of the scores; compactor: seed of the Gaussian sketch (default 0).
    #[arg(id = "press_seed", long = "press-seed", value_name = "SEED")]
    pub seed: Option<u64>,
    /// Kept entries keep their original positions, or move to contiguous ones (keys re-rotated).
    #[arg(long, value_enum, default_value_t)]
    #[serde(default)]
    pub positions: PositionPolicy,
}

impl PressOptions {
    /// The options that are set, by name (dashes, as the flags); `positions` when not original.
    pub fn given(&self) -> Vec<&'static str> {
        let o = self;
        [
            ("ratio", o.ratio.is_some()),
            ("budget", o.budget.is_some()),
            ("sinks", o.sinks.is_some()),
            ("sinks_end", o.sinks_end.is_some()),
            ("capacity", o.capacity.is_some()),
            ("window", o.window.is_some()),
            ("kernel", o.kernel.is_some()),
            ("beta", o.beta.is_some()),
            ("alpha_safeguard", o.alpha_safeguard.is_some()),
            ("chunk_length", o.chunk_length.is_some()),
            ("interval", o.interval.is_some()),
            ("buffer", o.buffer.is_some()),
            ("n_future", o.n_future.is_some()),
            ("lag_size", o.lag_size.is_some()),
            ("first_stage_ratio", o.first_stage_ratio.is_some()),
            ("block_size", o.block_size.is_some()),
            ("key_channel_ratio", o.key_channel_ratio.is_some()),
            ("chunk_size", o.chunk_size.is_some()),
            ("sketch_dimension", o.sketch_dimension.is_some()),
            ("blending", o.blending.is_some()),
            ("layerwise", o.layerwise.is_some()),
            ("kvzip_plus", o.kvzip_plus.is_some()),
            ("head_ratio", o.head_ratio.is_some()),
            ("duo_pattern", o.duo_pattern.is_some()),
            ("seed", o.seed.is_some()),
            ("positions", o.positions != PositionPolicy::Original),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// A press by name with its options: the CLI's `--press NAME` and flags, the server's
/// `"press": {"name": "snapkv", "ratio": 0.5, ...}`.
#[derive(Debug, Clone, Default)]
pub struct PressSpec {
    pub name: String,
    pub options: PressOptions,
}

/// `name` beside the options in one JSON object. Written by hand because `#[serde(flatten)]`
/// cannot reject unknown fields; the options' own `Deserialize` does, naming the field.
impl<'de> Deserialize<'de> for PressSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let name = match fields.remove("name") {
            Some(serde_json::Value::String(name)) => name,
            Some(other) => return Err(D::Error::custom(format!("name must be a string, got {other}"))),
            None => return Err(D::Error::missing_field("name")),
        };
        // A request names no file on the server's disk: a head pattern comes with the server.
        if fields.contains_key("duo_pattern") {
            return Err(D::Error::custom("duo_pattern names a file on the server and cannot come from a request"));
        }
        let options = PressOptions::deserialize(serde_json::Value::Object(fields)).map_err(D::Error::custom)?;
        Ok(PressSpec { name, options })
    }
}

impl PressSpec {
    pub fn build(&self) -> Result<Box<dyn CachePress>> {
        build(&self.name, &self.options)
    }

    /// Prompt entries per head left after prefill compression of `prompt_len` tokens (an upper
    /// bound: what memory admission must plan for).
    pub fn kept_after_prefill(&self, prompt_len: usize) -> usize {
        let o = &self.options;
        let by_ratio = o.ratio.map(|r| ((prompt_len as f64) * (1.0 - r)).ceil() as usize);
        let decoding = self.name.split('+').map(str::trim).find(|&n| n != "think") == Some("decoding");
        let by_budget = if decoding { None } else { o.budget.or(o.capacity) };
        by_ratio.into_iter().chain(by_budget).fold(prompt_len, usize::min)
    }
}

/// Which option belongs to which press, for the "wrong press" error.
fn options_of(name: &str) -> &'static [&'static str] {
    match name {
        "streaming" => &["sinks", "capacity"],
        "snapkv" => &["window", "kernel"],
        "pyramidkv" => &["window", "kernel", "beta"],
        "finch" => &["window", "chunk_length"],
        "expected-attention" => &["sinks", "n_future"],
        "lagkv" => &["sinks", "lag_size"],
        "cur" => &["sinks"],
        "compactor" => &["sinks", "sinks_end", "chunk_size", "sketch_dimension", "blending", "seed"],
        "kvzip" => &["sinks", "chunk_size", "layerwise", "kvzip_plus"],
        "random" => &["seed"],
        "adakv" => &["alpha_safeguard"],
        "chunkkv" => &["chunk_length"],
        "critical" => &["first_stage_ratio"],
        "block" => &["block_size"],
        "think" => &["key_channel_ratio"],
        "duo-attention" => &["head_ratio", "duo_pattern"],
        "decoding" => &["interval", "buffer"],
        _ => &[],
    }
}

/// Build the press `spec` (a `+` chain) with `opts`; every mistake is one clear message.
pub fn build(spec: &str, opts: &PressOptions) -> Result<Box<dyn CachePress>> {
    let chain: Vec<&str> = spec.split('+').map(str::trim).collect();
    let known = |n: &str| SCORERS.contains(&n) || WRAPPERS.contains(&n) || STANDALONE.contains(&n);
    if let Some(bad) = chain.iter().find(|n| !known(n)) {
        return Err(PressError::config(format!(
            "unknown press {bad:?} (presses: {}, {}; wrappers: {})",
            SCORERS.join(", "),
            STANDALONE.join(", "),
            WRAPPERS.join(", ")
        )));
    }
    if chain == ["duo-attention"] {
        return build_duo(opts);
    }
    if chain.contains(&"duo-attention") {
        return Err(PressError::config("duo-attention chooses its kept entries itself and runs on its own"));
    }
    if let Some(&"think") = chain.first() {
        return build_think(&chain[1..], opts);
    }
    if chain.contains(&"think") {
        return Err(PressError::config("think must come first: think+snapkv prunes key channels after snapkv"));
    }
    // ratio, budget and positions apply to every press.
    for option in opts.given().into_iter().filter(|o| !["ratio", "budget", "positions"].contains(o)) {
        if !chain.iter().any(|n| options_of(n).contains(&option)) {
            return Err(PressError::config(format!("`{option}` does not apply to press {spec:?}")));
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
    if *base == "kvzip" {
        if !wrappers.is_empty() {
            return Err(PressError::config(
                "kvzip chooses its entries itself (globally over layers and heads) and takes no wrapper",
            ));
        }
        return Ok(Box::new(KvZip::new(opts)?));
    }
    let decoding = wrappers.first() == Some(&"decoding");
    if wrappers.iter().skip(usize::from(decoding)).any(|&w| w == "decoding") {
        return Err(PressError::config("decoding must be the outermost wrapper"));
    }
    if decoding && *base == "compactor" {
        // Its attention pairs every entry with the query of its own token: a prompt's.
        return Err(PressError::config("compactor scores a prompt at prefill only and cannot run inside decoding"));
    }
    if *base == "streaming" && opts.capacity.is_some() {
        if !wrappers.is_empty() {
            return Err(PressError::config("streaming with `capacity` runs on its own; drop the wrappers"));
        }
        if opts.ratio.is_some() || opts.budget.is_some() {
            return Err(PressError::config(
                "streaming takes either `capacity` (StreamingLLM's cut before every forward) or `ratio`/`budget`, not both",
            ));
        }
        return Ok(Box::new(StreamingPress::new(opts.sinks.unwrap_or(4), opts.capacity.unwrap_or(0), opts.positions)?));
    }

    // Selection wrappers replace the rule around the scorer, so one of them at a time, except
    // critical+adakv (kvpress's CriticalAdaKVPress).
    let selecting: Vec<&str> = wrappers.iter().copied().filter(|&w| w != "decoding").collect();
    let critical_adakv = selecting == ["critical", "adakv"];
    if selecting.len() > 1 && !critical_adakv {
        return Err(PressError::config(format!(
            "{} cannot be combined: each chooses the kept entries its own way (critical+adakv is the one combination)",
            selecting.join(" and ")
        )));
    }
    let mut selector = base_selector(base, opts)?;
    for wrapper in selecting.iter().rev().filter(|&&w| !(critical_adakv && w == "adakv")) {
        if *base == "pyramidkv" || *base == "finch" {
            return Err(PressError::config(format!(
                "{base} chooses its kept entries itself and cannot be wrapped by {wrapper}"
            )));
        }
        let scorer = selector.scorer().box_clone();
        selector = match *wrapper {
            "adakv" => Box::new(AdaKv { scorer, alpha_safeguard: alpha_safeguard(opts)? }),
            "chunkkv" => {
                let chunk_length = opts.chunk_length.unwrap_or(20);
                if chunk_length == 0 {
                    return Err(PressError::config("`chunk_length` must be at least 1"));
                }
                Box::new(ChunkKv { scorer, chunk_length })
            }
            "critical" => {
                let first_stage_ratio = opts.first_stage_ratio.unwrap_or(0.5);
                if !(0.0..=1.0).contains(&first_stage_ratio) {
                    return Err(PressError::config(format!(
                        "`first_stage_ratio` must be in [0, 1], got {first_stage_ratio}"
                    )));
                }
                let critical = CriticalKv { scorer, first_stage_ratio, epsilon: 1e-4 };
                if critical_adakv {
                    Box::new(CriticalAdaKv { critical, alpha_safeguard: alpha_safeguard(opts)? })
                } else {
                    Box::new(critical)
                }
            }
            "block" => {
                if !BLOCK_SCORERS.contains(base) {
                    return Err(PressError::config(format!(
                        "block wraps a scorer that reads only keys and values ({}), not {base}",
                        BLOCK_SCORERS.join(", ")
                    )));
                }
                let block_size = opts.block_size.unwrap_or(128);
                if block_size == 0 {
                    return Err(PressError::config("`block_size` must be at least 1"));
                }
                Box::new(BlockPress { scorer, block_size })
            }
            _ => unreachable!("wrappers were checked"),
        };
    }
    if decoding {
        let target = opts.budget.ok_or_else(|| {
            PressError::config("decoding needs `budget` N: the entries per head it keeps while decoding")
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
    Ok(Box::new(PrefillPress { selector, budget: budget(opts, spec)?, positions: opts.positions }))
}

/// `ratio` or `budget`, exactly one of them.
pub(crate) fn budget(opts: &PressOptions, spec: &str) -> Result<Budget> {
    match (opts.ratio, opts.budget) {
        (Some(r), None) => Budget::ratio(r),
        (None, Some(n)) => Budget::entries(n),
        (Some(_), Some(_)) => Err(PressError::config("give either `ratio` or `budget`, not both")),
        (None, None) => Err(PressError::config(format!(
            "press {spec:?} needs `ratio` R (fraction removed) or `budget` N (entries kept)"
        ))),
    }
}

/// ThinK's key-channel pruning after the sequence press `inner` (a `+` chain, maybe empty), as
/// kvpress's `ComposedPress([inner, ThinKPress])`.
fn build_think(inner: &[&str], opts: &PressOptions) -> Result<Box<dyn CachePress>> {
    let ratio = opts
        .key_channel_ratio
        .ok_or_else(|| PressError::config("think needs `key_channel_ratio` R: the fraction of key channels zeroed"))?;
    if !(0.0..1.0).contains(&ratio) {
        return Err(PressError::config(format!("`key_channel_ratio` must be in [0, 1), got {ratio}")));
    }
    let inner = if inner.is_empty() {
        if let Some(option) = opts.given().into_iter().find(|&o| o != "key_channel_ratio") {
            return Err(PressError::config(format!(
                "`{option}` does not apply to think alone: name a sequence press after it (think+snapkv)"
            )));
        }
        None
    } else {
        // A later re-rotation would rotate the zeroed channels back into their nonzero partners.
        let rotates_later = inner[0] == "decoding" || opts.capacity.is_some();
        if rotates_later && opts.positions == PositionPolicy::Rerotate {
            return Err(PressError::config(
                "think zeroes key channels at prefill; `positions` rerotate while decoding would rotate them back",
            ));
        }
        Some(build(&inner.join("+"), &PressOptions { key_channel_ratio: None, ..opts.clone() })?)
    };
    Ok(Box::new(ThinkPress { inner, key_channel_ratio: ratio, window: 32 }))
}

/// DuoAttention from its head pattern file: `head_ratio` of the heads stream.
fn build_duo(opts: &PressOptions) -> Result<Box<dyn CachePress>> {
    if let Some(option) = opts.given().into_iter().find(|o| !["head_ratio", "duo_pattern", "positions"].contains(o)) {
        return Err(PressError::config(format!(
            "`{option}` does not apply to duo-attention: `head_ratio` sets the fraction of streaming heads"
        )));
    }
    let head_ratio = opts
        .head_ratio
        .ok_or_else(|| PressError::config("duo-attention needs `head_ratio` R: the fraction of heads that stream"))?;
    let path = opts.duo_pattern.as_ref().ok_or_else(|| {
        PressError::config(
            "duo-attention needs `duo_pattern` FILE: the model's head pattern (pare duo-pattern writes one)",
        )
    })?;
    Ok(Box::new(DuoAttention::new(&DuoPattern::load(path)?, head_ratio, opts.positions)?))
}

fn alpha_safeguard(opts: &PressOptions) -> Result<f64> {
    let alpha = opts.alpha_safeguard.unwrap_or(0.20);
    if !(0.0..=1.0).contains(&alpha) {
        return Err(PressError::config(format!("`alpha_safeguard` must be in [0, 1], got {alpha}")));
    }
    Ok(alpha)
}

fn compactor(opts: &PressOptions) -> Result<scorers::Compactor> {
    let d = scorers::Compactor::default();
    let c = scorers::Compactor {
        sinks_start: opts.sinks.unwrap_or(d.sinks_start),
        sinks_end: opts.sinks_end.unwrap_or(d.sinks_end),
        chunk_size: opts.chunk_size.unwrap_or(d.chunk_size),
        sketch_dimension: opts.sketch_dimension.unwrap_or(d.sketch_dimension),
        // kvpress blends by the compression ratio unless told otherwise; with a budget there is
        // none, and 0.35 is kvpress's own fallback.
        blending: opts.blending.or(opts.ratio).unwrap_or(d.blending as f64) as f32,
        seed: opts.seed.unwrap_or(d.seed),
    };
    if c.chunk_size == 0 || c.sketch_dimension == 0 {
        return Err(PressError::config("compactor: `chunk_size` and `sketch_dimension` must be at least 1"));
    }
    if let Some(b) = opts.blending.filter(|b| !(0.0..=1.0).contains(b)) {
        return Err(PressError::config(format!("`blending` must be in [0, 1], got {b}")));
    }
    Ok(c)
}

fn base_selector(name: &str, opts: &PressOptions) -> Result<Box<dyn Selector>> {
    let snapkv = || -> Result<scorers::SnapKv> {
        let s = scorers::SnapKv { window: opts.window.unwrap_or(64), kernel: opts.kernel.unwrap_or(5) };
        if s.window == 0 || s.kernel == 0 || s.kernel.is_multiple_of(2) {
            return Err(PressError::config("snapkv: `window` must be at least 1 and `kernel` odd"));
        }
        Ok(s)
    };
    let scorer: Box<dyn Scorer> = match name {
        "knorm" => Box::new(scorers::Knorm),
        "keydiff" => Box::new(scorers::KeyDiff),
        "cur" => Box::new(scorers::Cur { sinks: opts.sinks.unwrap_or(4), ..Default::default() }),
        "lagkv" => {
            let lag = opts.lag_size.unwrap_or(128);
            if lag < 2 {
                return Err(PressError::config("lagkv: `lag_size` must be at least 2"));
            }
            Box::new(scorers::LagKv { sinks: opts.sinks.unwrap_or(4), lag })
        }
        "compactor" => Box::new(compactor(opts)?),
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
        "finch" => {
            let window = opts.window.unwrap_or(64);
            if window == 0 || opts.chunk_length == Some(0) {
                return Err(PressError::config("finch: `window` and `chunk_length` must be at least 1"));
            }
            return Ok(Box::new(Finch { scorer: FinchScorer { window }, chunk_length: opts.chunk_length }));
        }
        "pyramidkv" => {
            let beta = opts.beta.unwrap_or(20);
            if beta == 0 {
                return Err(PressError::config("`beta` must be at least 1"));
            }
            return Ok(Box::new(PyramidKv { snapkv: snapkv()?, beta }));
        }
        other => unreachable!("press {other} was checked"),
    };
    Ok(Box::new(HeadTopK { scorer }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_parses_from_json_and_names_an_unknown_option() {
        let spec: PressSpec =
            serde_json::from_value(serde_json::json!({"name": "snapkv", "ratio": 0.5, "positions": "rerotate"}))
                .unwrap();
        assert_eq!((spec.name.as_str(), spec.options.ratio), ("snapkv", Some(0.5)));
        assert_eq!(spec.options.positions, PositionPolicy::Rerotate);
        let err = serde_json::from_value::<PressSpec>(serde_json::json!({"name": "knorm", "ratoi": 0.5})).unwrap_err();
        assert!(err.to_string().contains("ratoi"), "{err}");
        assert!(serde_json::from_value::<PressSpec>(serde_json::json!({"ratio": 0.5})).is_err());
        assert!(serde_json::from_value::<PressSpec>(serde_json::json!({"name": "knorm", "positions": "x"})).is_err());
    }

    #[test]
    fn estimates_count_what_prefill_keeps() {
        let spec = |name: &str, ratio: Option<f64>, budget: Option<usize>| PressSpec {
            name: name.into(),
            options: PressOptions { ratio, budget, ..PressOptions::default() },
        };
        assert_eq!(spec("knorm", Some(0.75), None).kept_after_prefill(100), 25);
        assert_eq!(spec("knorm", None, Some(10)).kept_after_prefill(100), 10);
        assert_eq!(spec("knorm", None, Some(500)).kept_after_prefill(100), 100);
        // decoding's budget is its target while decoding: the prompt stays whole at prefill.
        assert_eq!(spec("decoding+knorm", None, Some(10)).kept_after_prefill(100), 100);
    }
}
