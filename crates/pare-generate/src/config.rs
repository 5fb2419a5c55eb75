//! Generation settings, named as HF's `GenerationConfig` (plus llama.cpp's mirostat, DRY, XTC).
//!
//! Defaults come from HF (`GenerationConfig._get_default_generation_params`: top_k 50 when
//! sampling, temperature 1, ...), then the model's generation_config.json, then a `--config`
//! JSON file, then command-line flags; each layer overrides only what it sets.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::beam::EarlyStopping;
use crate::processors::chain::ProcessorConfig;
use crate::processors::dry::DryConfig;
use crate::processors::xtc::XtcConfig;

/// A setting outside its range, by its key (HF's name; the CLI turns it into its flag).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{key} {problem}")]
pub struct InvalidSetting {
    pub key: &'static str,
    pub problem: String,
}

impl InvalidSetting {
    fn new(key: &'static str, problem: String) -> Self {
        InvalidSetting { key, problem }
    }
}

/// Every generation setting, by HF's name. One definition for every front end: a `--config`
/// JSON file and the server's request body (serde, unknown fields rejected by name), and the
/// CLI's flags (clap: `--top-k`, `--repetition-penalty`, ...), so a new processor's setting
/// appears in all of them. Fields without a flag are set by the commands themselves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Each command names its own length flag (`--max-new-tokens`, `max_tokens`).
    #[arg(skip)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub min_new_tokens: Option<usize>,
    /// Sample instead of greedy decoding (`--do-sample`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub do_sample: Option<bool>,
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (HF default 50 when sampling; 0 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub typical_p: Option<f32>,
    #[arg(long)]
    pub epsilon_cutoff: Option<f32>,
    #[arg(long)]
    pub eta_cutoff: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    #[arg(long)]
    pub num_beams: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,
    /// true, false or never.
    #[arg(long)]
    pub early_stopping: Option<EarlyStopping>,
    #[arg(long)]
    pub num_return_sequences: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (HF `stop_strings`; repeatable); it is cut off.
    #[arg(long)]
    pub stop: Option<Vec<String>>,
    /// Text that must never be generated (HF `bad_words_ids`, given as text; repeatable).
    #[arg(long)]
    pub bad_words: Option<Vec<String>>,
    #[arg(skip)]
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    /// Token id → additive bias (OpenAI / llama.cpp `logit_bias`); the CLI's flag is `ID=BIAS`.
    #[arg(skip)]
    pub logit_bias: Option<std::collections::BTreeMap<u32, f32>>,
    /// Token ids that are never generated (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub suppress_tokens: Option<Vec<u32>>,
    /// Stop after this many seconds (HF `max_time`).
    #[arg(long)]
    pub max_time: Option<f64>,
    /// The model's own, plus what `--stop-token` names.
    #[arg(skip)]
    pub eos_token_id: Option<Vec<u32>>,
    #[arg(long)]
    pub min_tokens_to_keep: Option<usize>,
    #[arg(long)]
    pub mirostat_tau: Option<f32>,
    #[arg(long)]
    pub mirostat_eta: Option<f32>,
    /// Mirostat v2 sampling (llama.cpp).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub mirostat: Option<bool>,
    /// DRY repetition penalty strength (llama.cpp; 0 = off).
    #[arg(long)]
    pub dry_multiplier: Option<f32>,
    #[arg(long)]
    pub dry_base: Option<f32>,
    #[arg(long)]
    pub dry_allowed_length: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub dry_penalty_last_n: Option<i64>,
    /// DRY: strings that break a repeated sequence (repeatable; default llama.cpp's).
    #[arg(long)]
    pub dry_sequence_breakers: Option<Vec<String>>,
    /// XTC: chance per step of excluding the top choices (llama.cpp; 0 = off).
    #[arg(long)]
    pub xtc_probability: Option<f32>,
    #[arg(long)]
    pub xtc_threshold: Option<f32>,
}

/// A token id from JSON (ids past u32 are not ids: dropped, not truncated).
fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

impl GenerationConfig {
    /// Values set in `other` replace ours. Field by field, as typed values: a JSON round-trip
    /// would turn NaN and ±inf into null and silently drop them.
    pub fn merge(&mut self, other: &GenerationConfig) {
        macro_rules! overlay {
            ($($field:ident),* $(,)?) => {{
                // Exhaustive: a new field that is not listed here does not compile.
                let GenerationConfig { $($field),* } = other;
                $(if $field.is_some() {
                    self.$field = $field.clone();
                })*
            }};
        }
        overlay!(
            max_new_tokens,
            min_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            min_p,
            typical_p,
            epsilon_cutoff,
            eta_cutoff,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            no_repeat_ngram_size,
            num_beams,
            length_penalty,
            early_stopping,
            num_return_sequences,
            seed,
            stop,
            bad_words,
            bad_words_ids,
            logit_bias,
            suppress_tokens,
            max_time,
            eos_token_id,
            min_tokens_to_keep,
            mirostat_tau,
            mirostat_eta,
            mirostat,
            dry_multiplier,
            dry_base,
            dry_allowed_length,
            dry_penalty_last_n,
            dry_sequence_breakers,
            xtc_probability,
            xtc_threshold,
        );
    }

    /// Every value that is set, alone, against its range (finite numbers, probabilities in
    /// [0, 1], counts ≥ 1). Run on each layer before merging, so an error names the layer that
    /// holds the value; `validate` runs it again with the checks that combine settings.
    pub fn check_values(&self) -> Result<(), InvalidSetting> {
        type Range = (&'static str, fn(f32) -> bool);
        const FINITE: Range = ("a finite number", |v| v.is_finite());
        const NON_NEGATIVE: Range = ("a finite number >= 0", |v| v.is_finite() && v >= 0.0);
        const POSITIVE: Range = ("a finite number > 0", |v| v.is_finite() && v > 0.0);
        const OPEN_UNIT: Range = ("in (0, 1]", |v| v > 0.0 && v <= 1.0);
        const UNIT: Range = ("in [0, 1]", |v| (0.0..=1.0).contains(&v));
        const HALF_OPEN_UNIT: Range = ("in [0, 1)", |v| (0.0..1.0).contains(&v));
        const PENALTY: Range = ("in [-2, 2]", |v| (-2.0..=2.0).contains(&v));
        const AT_LEAST_ONE: Range = ("a finite number >= 1", |v| v.is_finite() && v >= 1.0);
        let floats: [(&'static str, Option<f32>, Range); 16] = [
            ("temperature", self.temperature, NON_NEGATIVE),
            ("top_p", self.top_p, OPEN_UNIT),
            ("min_p", self.min_p, UNIT),
            ("typical_p", self.typical_p, OPEN_UNIT),
            ("epsilon_cutoff", self.epsilon_cutoff, HALF_OPEN_UNIT),
            ("eta_cutoff", self.eta_cutoff, HALF_OPEN_UNIT),
            ("repetition_penalty", self.repetition_penalty, POSITIVE),
            ("presence_penalty", self.presence_penalty, PENALTY),
            ("frequency_penalty", self.frequency_penalty, PENALTY),
            ("length_penalty", self.length_penalty, FINITE),
            ("mirostat_tau", self.mirostat_tau, POSITIVE),
            ("mirostat_eta", self.mirostat_eta, NON_NEGATIVE),
            ("dry_multiplier", self.dry_multiplier, NON_NEGATIVE),
            ("dry_base", self.dry_base, AT_LEAST_ONE),
            ("xtc_probability", self.xtc_probability, UNIT),
            ("xtc_threshold", self.xtc_threshold, UNIT),
        ];
        for (key, value, (allowed, ok)) in floats {
            if let Some(v) = value.filter(|&v| !ok(v)) {
                return Err(InvalidSetting::new(key, format!("must be {allowed}, got {v}")));
            }
        }
        for (&token, &bias) in self.logit_bias.iter().flatten() {
            // -inf is the documented way to forbid a token.
            if bias.is_nan() || bias == f32::INFINITY {
                return Err(InvalidSetting::new(
                    "logit_bias",
                    format!("for token {token} must be a number or -inf, got {bias}"),
                ));
            }
        }
        if let Some(t) = self.max_time.filter(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(InvalidSetting::new("max_time", format!("must be a finite number of seconds > 0, got {t}")));
        }
        let counts = [
            ("num_beams", self.num_beams),
            ("num_return_sequences", self.num_return_sequences),
            ("min_tokens_to_keep", self.min_tokens_to_keep),
        ];
        if let Some((key, _)) = counts.into_iter().find(|(_, v)| *v == Some(0)) {
            return Err(InvalidSetting::new(key, "must be at least 1".into()));
        }
        if let Some(k) = self.top_k.filter(|&k| k < 0) {
            return Err(InvalidSetting::new("top_k", format!("must be >= 0 (0 = off), got {k}")));
        }
        if let Some(n) = self.dry_penalty_last_n.filter(|&n| n < -1) {
            return Err(InvalidSetting::new(
                "dry_penalty_last_n",
                format!("must be >= -1 (-1 = whole context), got {n}"),
            ));
        }
        if self.stop.iter().flatten().any(String::is_empty) {
            return Err(InvalidSetting::new("stop", "strings must not be empty".into()));
        }
        Ok(())
    }

    /// Parse a `--config FILE.json` with the same names as the flags (HF GenerationConfig names).
    pub fn from_json_str(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("generation config: {e}"))
    }

    /// The settings HF reads from a model's generation_config.json (unknown keys ignored there).
    pub fn from_model_defaults(json: &Value) -> Self {
        let f = |k: &str| json.get(k).and_then(Value::as_f64).map(|v| v as f32);
        let u = |k: &str| json.get(k).and_then(Value::as_u64).map(|v| v as usize);
        GenerationConfig {
            do_sample: json.get("do_sample").and_then(Value::as_bool),
            temperature: f("temperature"),
            top_k: json.get("top_k").and_then(Value::as_i64),
            top_p: f("top_p"),
            min_p: f("min_p"),
            typical_p: f("typical_p"),
            repetition_penalty: f("repetition_penalty"),
            no_repeat_ngram_size: u("no_repeat_ngram_size"),
            num_beams: u("num_beams"),
            length_penalty: f("length_penalty"),
            max_new_tokens: u("max_new_tokens"),
            eos_token_id: match json.get("eos_token_id") {
                Some(Value::Array(a)) => Some(a.iter().filter_map(token_id).collect()),
                Some(v) => token_id(v).map(|id| vec![id]),
                None => None,
            },
            ..GenerationConfig::default()
        }
    }

    pub fn do_sample(&self) -> bool {
        self.do_sample.unwrap_or(false)
    }

    pub fn num_beams(&self) -> usize {
        self.num_beams.unwrap_or(1)
    }

    pub fn num_return_sequences(&self) -> usize {
        self.num_return_sequences.unwrap_or(1)
    }

    pub fn max_new_tokens(&self) -> usize {
        self.max_new_tokens.unwrap_or(64)
    }

    /// Check every value and how they combine; one message naming the first problem.
    pub fn validate(&self) -> Result<(), String> {
        self.check_values().map_err(|e| e.to_string())?;
        if self.num_beams() > 1 && self.num_return_sequences() > self.num_beams() {
            return Err(format!(
                "num_return_sequences ({}) must not exceed num_beams ({})",
                self.num_return_sequences(),
                self.num_beams()
            ));
        }
        if self.num_beams() == 1 && !self.do_sample() && self.num_return_sequences() > 1 {
            return Err("num_return_sequences > 1 needs sampling (`do_sample`) or beam search (`num_beams`)".into());
        }
        if self.num_beams() > 1 && self.do_sample() {
            return Err("beam search with sampling is not supported: use `num_beams` or `do_sample`".into());
        }
        if self.mirostat == Some(true) && !self.do_sample() {
            return Err("mirostat samples: add `do_sample`".into());
        }
        self.processor_config(&[])?.validate()
    }

    /// The logits-processor settings, with `bad_words_ids` already resolved from text.
    pub fn processor_config(&self, bad_words_ids: &[Vec<u32>]) -> Result<ProcessorConfig, String> {
        let mut bad = self.bad_words_ids.clone().unwrap_or_default();
        bad.extend(bad_words_ids.iter().cloned());
        let sampling = self.do_sample();
        Ok(ProcessorConfig {
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            bad_words_ids: bad,
            logit_bias: self.logit_bias.as_ref().map(|m| m.iter().map(|(&k, &v)| (k, v)).collect()).unwrap_or_default(),
            suppress_tokens: self.suppress_tokens.clone().unwrap_or_default(),
            min_new_tokens: self.min_new_tokens,
            eos_token_ids: self.eos_token_id.clone().unwrap_or_default(),
            do_sample: sampling,
            temperature: self.temperature,
            // HF's default: top_k 50 whenever sampling, unless set (0 turns it off).
            top_k: if sampling { Some(self.top_k.unwrap_or(50).max(0) as usize) } else { None },
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            epsilon_cutoff: self.epsilon_cutoff,
            eta_cutoff: self.eta_cutoff,
            min_tokens_to_keep: self.min_tokens_to_keep.unwrap_or(1),
            mirostat: (self.mirostat == Some(true)).then(|| crate::processors::mirostat_v2::MirostatConfig {
                tau: self.mirostat_tau.unwrap_or(5.0),
                eta: self.mirostat_eta.unwrap_or(0.1),
            }),
            dry: self.dry_multiplier.filter(|&m| m > 0.0).map(|multiplier| {
                let d = DryConfig::default();
                DryConfig {
                    multiplier,
                    base: self.dry_base.unwrap_or(d.base),
                    allowed_length: self.dry_allowed_length.unwrap_or(d.allowed_length),
                    penalty_last_n: self.dry_penalty_last_n.unwrap_or(d.penalty_last_n),
                    sequence_breakers: self.dry_sequence_breakers.clone().unwrap_or(d.sequence_breakers),
                }
            }),
            xtc: self.xtc_probability.filter(|&p| p > 0.0).map(|probability| XtcConfig {
                probability,
                threshold: self.xtc_threshold.unwrap_or(XtcConfig::default().threshold),
                ..XtcConfig::default()
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_non_finite_values_and_check_names_them() {
        let mut config = GenerationConfig { temperature: Some(0.7), top_k: Some(5), ..GenerationConfig::default() };
        let layer = GenerationConfig {
            temperature: Some(f32::NAN),
            logit_bias: Some([(5, f32::NEG_INFINITY)].into()),
            ..GenerationConfig::default()
        };
        config.merge(&layer);
        assert!(config.temperature.unwrap().is_nan(), "a NaN must reach the check, not vanish in the merge");
        assert_eq!(config.top_k, Some(5), "unset values keep the lower layer's");
        assert_eq!(config.logit_bias.as_ref().unwrap()[&5], f32::NEG_INFINITY);
        let err = config.check_values().unwrap_err();
        assert_eq!(err.key, "temperature");
        config.temperature = Some(1.0);
        config.check_values().expect("-inf is a valid logit bias");
        for bad in [
            GenerationConfig { top_p: Some(f32::NAN), ..GenerationConfig::default() },
            GenerationConfig { max_time: Some(f64::INFINITY), ..GenerationConfig::default() },
            GenerationConfig { length_penalty: Some(f32::INFINITY), ..GenerationConfig::default() },
            GenerationConfig { num_beams: Some(0), ..GenerationConfig::default() },
        ] {
            assert!(bad.check_values().is_err() && bad.validate().is_err(), "{bad:?}");
        }
    }
}
