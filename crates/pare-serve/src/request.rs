//! Request bodies: parsing (every mistake named by its field), and turning the sampling fields
//! into pare's `GenerationConfig`, press and pruner.
//!
//! Fields are OpenAI's; pare's own processors, presses and token pruning are extension fields
//! named as the CLI names its flags (`top_k`, `repetition_penalty`, `press`, `prune_tokens`, ...).

use std::collections::BTreeMap;

use std::sync::Arc;

use pare_generate::{GenerationConfig, Settings};
use pare_model::{Hooks, LoadedModel, TokenPruner};
use pare_press::{PositionPolicy, PressOptions};
use pare_token_prune::{PruneSchedule, Pruner, Span, TokenScorer};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Parse `value` as `T`; a mistake names the field it is in (OpenAI's `param`).
pub fn parse<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path.as_str());
        ApiError::invalid(format!("invalid request body: {}", e.inner()), param)
    })
}

/// Split `body` into the fields `keys` lists and the rest (the sampling fields both endpoints share).
pub fn split(mut body: Map<String, Value>, keys: &[&str]) -> (Value, Value) {
    let own: Map<String, Value> = keys.iter().filter_map(|k| body.remove(*k).map(|v| (k.to_string(), v))).collect();
    (Value::Object(own), Value::Object(body))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `"press": {"name": "knorm", "ratio": 0.5}`: the press and its options, as `--press` and its flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PressSpec {
    pub name: String,
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
    /// "original" (default) or "rerotate".
    pub positions: Option<String>,
}

impl PressSpec {
    fn options(&self) -> Result<PressOptions, ApiError> {
        let positions = match self.positions.as_deref() {
            None | Some("original") => PositionPolicy::Original,
            Some("rerotate") => PositionPolicy::Rerotate,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("press.positions must be \"original\" or \"rerotate\", got {other:?}"),
                    Some("press.positions"),
                ))
            }
        };
        Ok(PressOptions {
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
            seed: self.seed,
            positions,
        })
    }

    /// Prompt entries per head left after prefill compression (what admission reserves).
    fn kept(&self, prompt_len: usize) -> usize {
        let by_ratio = self.ratio.map(|r| ((prompt_len as f64) * (1.0 - r)).ceil() as usize);
        let decoding = self.name.split('+').next().map(str::trim) == Some("decoding");
        let by_budget = if decoding { None } else { self.budget.or(self.capacity) };
        by_ratio.into_iter().chain(by_budget).fold(prompt_len, usize::min)
    }
}

/// The sampling, press and pruning fields of both endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    pub model: Option<String>,
    pub n: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, OpenAI's JSON) → bias added to its logit.
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Ignored, as OpenAI's own servers use it only for abuse monitoring.
    pub user: Option<String>,
    // pare's processors, named as the CLI flags.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub epsilon_cutoff: Option<f32>,
    pub eta_cutoff: Option<f32>,
    pub min_tokens_to_keep: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub bad_words: Option<Vec<String>>,
    pub suppress_tokens: Option<Vec<u32>>,
    /// Vocabulary entries (e.g. "<|im_end|>") that end generation like EOS.
    pub stop_token: Option<Vec<String>>,
    /// EOS (and `stop_token`) never end generation: every choice runs to its token limit, as
    /// llama.cpp's and vLLM's `ignore_eos` (load generators send it so every server produces the
    /// same number of tokens). Stop strings still stop.
    pub ignore_eos: Option<bool>,
    pub mirostat: Option<bool>,
    pub mirostat_tau: Option<f32>,
    pub mirostat_eta: Option<f32>,
    pub dry_multiplier: Option<f32>,
    pub dry_base: Option<f32>,
    pub dry_allowed_length: Option<usize>,
    pub dry_penalty_last_n: Option<i64>,
    pub dry_sequence_breakers: Option<Vec<String>>,
    pub xtc_probability: Option<f32>,
    pub xtc_threshold: Option<f32>,
    // KV-cache compression and prefill token pruning.
    pub press: Option<PressSpec>,
    pub prune_tokens: Option<String>,
    pub prune_score: Option<String>,
    pub protect_last: Option<usize>,
}

/// Upper bound on `n`: each choice is a sequence of its own.
const MAX_N: usize = 128;

impl Sampling {
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::invalid("n must be at least 1", Some("n"))),
            n if n > MAX_N => Err(ApiError::invalid(format!("n must be at most {MAX_N}, got {n}"), Some("n"))),
            n => Ok(n),
        }
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> Result<bool, ApiError> {
        match (&self.stream_options, self.stream()) {
            (Some(_), false) => Err(ApiError::invalid("stream_options needs stream: true", Some("stream_options"))),
            (Some(o), true) => Ok(o.include_usage.unwrap_or(false)),
            (None, _) => Ok(false),
        }
    }

    /// The generation settings of the request's first choice (choice i draws with seed + i).
    /// OpenAI's semantics: temperature 1 by default, 0 is greedy; no top-k unless one is given.
    pub fn settings(&self, loaded: &LoadedModel, max_tokens: usize) -> Result<Settings, ApiError> {
        let tok = loaded.tokenizer().map_err(|e| ApiError::internal(e.to_string()))?;
        let temperature = self.temperature.unwrap_or(1.0);
        // OpenAI's own fields are named in the error; pare's processors check the rest below.
        let ranges = [
            ("temperature", self.temperature, 0.0, f32::MAX),
            ("top_p", self.top_p, f32::MIN_POSITIVE, 1.0),
            ("presence_penalty", self.presence_penalty, -2.0, 2.0),
            ("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
        ];
        for (name, value, low, high) in ranges {
            if let Some(v) = value.filter(|v| !(low..=high).contains(v)) {
                return Err(ApiError::invalid(format!("{name} is out of range: {v}"), Some(name)));
            }
        }
        let sampling = temperature != 0.0;
        let mut eos = loaded.eos_token_ids();
        for (i, text) in self.stop_token.iter().flatten().enumerate() {
            let id = tok.token_id(text).ok_or_else(|| {
                ApiError::invalid(
                    format!("{text:?} is not a token of this model's vocabulary"),
                    Some(&format!("stop_token[{i}]")),
                )
            })?;
            eos.push(id);
        }
        let mut logit_bias = BTreeMap::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let id: u32 = key.parse().map_err(|_| {
                ApiError::invalid(format!("logit_bias keys are token ids, got {key:?}"), Some("logit_bias"))
            })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(
                    format!("logit_bias values must be in [-100, 100], got {bias} for token {id}"),
                    Some("logit_bias"),
                ));
            }
            logit_bias.insert(id, bias);
        }
        let stop = self.stop.as_ref().map(|s| match s {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        });
        let config = GenerationConfig {
            max_new_tokens: Some(max_tokens),
            // HF's min_new_tokens suppresses the EOS ids until the count is reached: up to the limit,
            // that is ignoring EOS.
            min_new_tokens: if self.ignore_eos == Some(true) { Some(max_tokens) } else { self.min_new_tokens },
            do_sample: Some(sampling),
            temperature: sampling.then_some(temperature),
            // -1 (vLLM's "off") and 0 both turn top-k off.
            top_k: Some(if sampling { self.top_k.map_or(0, |k| if k == -1 { 0 } else { k }) } else { 0 }),
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            epsilon_cutoff: self.epsilon_cutoff,
            eta_cutoff: self.eta_cutoff,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            seed: Some(self.seed.unwrap_or_else(rand::random)),
            stop,
            bad_words: self.bad_words.clone(),
            logit_bias: (!logit_bias.is_empty()).then_some(logit_bias),
            suppress_tokens: self.suppress_tokens.clone(),
            eos_token_id: Some(eos),
            min_tokens_to_keep: self.min_tokens_to_keep,
            mirostat: self.mirostat,
            mirostat_tau: self.mirostat_tau,
            mirostat_eta: self.mirostat_eta,
            dry_multiplier: self.dry_multiplier,
            dry_base: self.dry_base,
            dry_allowed_length: self.dry_allowed_length,
            dry_penalty_last_n: self.dry_penalty_last_n,
            dry_sequence_breakers: self.dry_sequence_breakers.clone(),
            xtc_probability: self.xtc_probability,
            xtc_threshold: self.xtc_threshold,
            ..GenerationConfig::default()
        };
        if let Some(k) = self.top_k.filter(|&k| k < -1) {
            return Err(ApiError::invalid(format!("top_k must be >= 0 (-1 or 0 = off), got {k}"), Some("top_k")));
        }
        if self.mirostat == Some(true) && !sampling {
            return Err(ApiError::invalid("mirostat samples: it needs temperature > 0", Some("mirostat")));
        }
        let vocab = loaded.model.config().vocab_size;
        let processors = config.processor_config(&[]).map_err(|e| ApiError::invalid(e, None))?;
        processors.validate_vocab(vocab).map_err(|e| ApiError::invalid(e, None))?;
        // The whole processor chain's checks, as `pare generate` runs them.
        let settings = Settings::new(config, Some(tok)).map_err(|e| ApiError::invalid(e.to_string(), None))?;
        settings.chain().map_err(|e| ApiError::invalid(e.to_string(), None))?;
        Ok(settings)
    }

    /// A fresh press and pruner (each sequence owns its own); checked before anything is queued.
    pub fn hooks(&self, num_layers: usize) -> Result<Hooks, ApiError> {
        let press = match &self.press {
            Some(spec) => Some(
                pare_press::build(&spec.name, &spec.options()?)
                    .map_err(|e| ApiError::invalid(e.to_string(), Some("press")))?,
            ),
            None => None,
        };
        let pruner = match &self.prune_tokens {
            Some(spec) => {
                let bad = |e: String| ApiError::invalid(e, Some("prune_tokens"));
                let schedule = PruneSchedule::parse(spec).map_err(|e| bad(e.to_string()))?;
                schedule.check(num_layers).map_err(|e| bad(e.to_string()))?;
                let score = self.prune_score.as_deref().unwrap_or("last-attn");
                // A learned scorer is a file path: the server reads no files its clients name.
                if score.starts_with("learned") {
                    return Err(ApiError::invalid(
                        "prune_score learned:FILE is not accepted over HTTP (last-attn, mean-attn, knorm, random)",
                        Some("prune_score"),
                    ));
                }
                let scorer: TokenScorer = pare_token_prune::scorer(score, 0)
                    .map_err(|e| ApiError::invalid(e.to_string(), Some("prune_score")))?;
                let span = Span::Prompt { protect_last: self.protect_last.unwrap_or(8) };
                Some(Arc::new(Pruner { schedule, span, scorer }) as Arc<dyn TokenPruner>)
            }
            None => {
                if self.prune_score.is_some() || self.protect_last.is_some() {
                    return Err(ApiError::invalid(
                        "prune_score and protect_last need prune_tokens",
                        Some("prune_tokens"),
                    ));
                }
                None
            }
        };
        Ok(Hooks::new(press, pruner))
    }

    /// KV bytes one sequence may come to hold: its prompt after prefill compression, plus every
    /// token it may generate, uncompressed.
    pub fn kv_estimate(&self, prompt_len: usize, max_tokens: usize, bytes_per_token: usize) -> usize {
        let kept = self.press.as_ref().map_or(prompt_len, |p| p.kept(prompt_len));
        (kept + max_tokens) * bytes_per_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named() {
        let body = serde_json::json!({"temperature": "hot"});
        let err = parse::<Sampling>(body).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"));
        let err = parse::<Sampling>(serde_json::json!({"press": {"name": "knorm", "ratoi": 0.5}})).unwrap_err();
        assert!(err.message.contains("ratoi"), "{}", err.message);
        assert!(parse::<Sampling>(serde_json::json!({"temprature": 1})).unwrap_err().message.contains("temprature"));
    }

    #[test]
    fn press_estimates_count_what_prefill_keeps() {
        let spec = |name: &str, ratio: Option<f64>, budget: Option<usize>| PressSpec {
            name: name.into(),
            ratio,
            budget,
            ..PressSpec::default()
        };
        assert_eq!(spec("knorm", Some(0.75), None).kept(100), 25);
        assert_eq!(spec("knorm", None, Some(10)).kept(100), 10);
        assert_eq!(spec("knorm", None, Some(500)).kept(100), 100);
        // decoding's budget is its target while decoding: the prompt stays whole at prefill.
        assert_eq!(spec("decoding+knorm", None, Some(10)).kept(100), 100);
    }
}
