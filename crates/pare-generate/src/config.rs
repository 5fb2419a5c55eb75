//! Generation settings, named as HF's `GenerationConfig` (plus llama.cpp's mirostat, DRY, XTC).
//!
//! Defaults come from HF (`GenerationConfig._get_default_generation_params`: top_k 50 when
//! sampling, temperature 1, ...), then the model's generation_config.json, then a `--config`
//! JSON file, then command-line flags; each layer overrides only what it sets.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::beam::EarlyStopping;
use crate::processors::chain::ProcessorConfig;
use crate::processors::dry::DryConfig;
use crate::processors::xtc::XtcConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub epsilon_cutoff: Option<f32>,
    pub eta_cutoff: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<EarlyStopping>,
    pub num_return_sequences: Option<usize>,
    pub seed: Option<u64>,
    /// Stop strings (HF `stop_strings`): generation ends once the text contains one; it is cut off.
    pub stop: Option<Vec<String>>,
    /// Words or phrases that may never be generated (HF `bad_words_ids`, given as text).
    pub bad_words: Option<Vec<String>>,
    pub bad_words_ids: Option<Vec<Vec<u32>>>,
    /// Token id → additive bias (OpenAI / llama.cpp `logit_bias`).
    pub logit_bias: Option<std::collections::BTreeMap<u32, f32>>,
    pub suppress_tokens: Option<Vec<u32>>,
    /// Wall-clock limit in seconds (HF `max_time`).
    pub max_time: Option<f64>,
    pub eos_token_id: Option<Vec<u32>>,
    pub min_tokens_to_keep: Option<usize>,
    pub mirostat_tau: Option<f32>,
    pub mirostat_eta: Option<f32>,
    /// Turns mirostat v2 on.
    pub mirostat: Option<bool>,
    pub dry_multiplier: Option<f32>,
    pub dry_base: Option<f32>,
    pub dry_allowed_length: Option<usize>,
    pub dry_penalty_last_n: Option<i64>,
    pub dry_sequence_breakers: Option<Vec<String>>,
    pub xtc_probability: Option<f32>,
    pub xtc_threshold: Option<f32>,
}

impl GenerationConfig {
    /// Values set in `other` replace ours.
    pub fn merge(&mut self, other: &GenerationConfig) {
        let mine = serde_json::to_value(&*self).expect("serializable");
        let theirs = serde_json::to_value(other).expect("serializable");
        let (Value::Object(mut a), Value::Object(b)) = (mine, theirs) else { unreachable!("structs are objects") };
        for (k, v) in b {
            if !v.is_null() {
                a.insert(k, v);
            }
        }
        *self = serde_json::from_value(Value::Object(a)).expect("same shape");
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
                Some(Value::Array(a)) => Some(a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect()),
                Some(v) => v.as_u64().map(|x| vec![x as u32]),
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

    /// Check every value; one message naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_beams == Some(0) {
            return Err("num_beams must be at least 1".into());
        }
        if self.num_return_sequences == Some(0) {
            return Err("num_return_sequences must be at least 1".into());
        }
        if self.num_beams() > 1 && self.num_return_sequences() > self.num_beams() {
            return Err(format!(
                "num_return_sequences ({}) must not exceed num_beams ({})",
                self.num_return_sequences(),
                self.num_beams()
            ));
        }
        if self.num_beams() == 1 && !self.do_sample() && self.num_return_sequences() > 1 {
            return Err("num_return_sequences > 1 needs sampling (--do-sample) or beam search (--num-beams)".into());
        }
        if self.num_beams() > 1 && self.do_sample() {
            return Err("beam search with sampling is not supported: use --num-beams or --do-sample".into());
        }
        if let Some(k) = self.top_k {
            if k < 0 {
                return Err(format!("top_k must be ≥ 0, got {k}"));
            }
        }
        if let Some(t) = self.max_time {
            if t.is_nan() || t <= 0.0 {
                return Err(format!("max_time must be positive, got {t}"));
            }
        }
        if let Some(lp) = self.length_penalty {
            if !lp.is_finite() {
                return Err("length_penalty must be finite".into());
            }
        }
        if let Some(stop) = &self.stop {
            if stop.iter().any(String::is_empty) {
                return Err("a stop string must not be empty".into());
            }
        }
        if self.mirostat == Some(true) && !self.do_sample() {
            return Err("mirostat samples: add --do-sample".into());
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
