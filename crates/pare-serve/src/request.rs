//! Request bodies: parsing (every mistake named by its field), and turning the sampling fields
//! into pare's `GenerationConfig`, press and pruner.
//!
//! Fields are OpenAI's; pare's own processors, presses and token pruning are extension fields
//! named as the CLI names its flags (`top_k`, `repetition_penalty`, `press`, `prune_tokens`, ...).

use std::sync::Arc;

use pare_generate::{GenerationConfig, Settings};
use pare_model::{Hooks, LoadedModel, TokenPruner};
use pare_press::PressSpec;
use pare_token_prune::{PruneSchedule, Pruner, Span, TokenScorer};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Parse `value` as `T`; a mistake names the field it is in (OpenAI's `param`).
pub fn parse<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // A bad map key (a logit_bias key that is no token id) is named by its map.
        let path = path.trim_end_matches(".?");
        let param = (path != ".").then_some(path);
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

/// The fields of both endpoints that are not generation settings: OpenAI's own, and pare's
/// press and token pruning.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFields {
    pub model: Option<String>,
    pub n: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Ignored, as OpenAI's own servers use it only for abuse monitoring.
    pub user: Option<String>,
    /// OpenAI's: one string or a list.
    pub stop: Option<OneOrMany>,
    /// Vocabulary entries (e.g. "<|im_end|>") that end generation like EOS.
    pub stop_token: Option<Vec<String>>,
    /// pare-press's own type: `{"name": ..., "ratio": ..., ...}`, unknown options rejected.
    pub press: Option<PressSpec>,
    pub prune_tokens: Option<String>,
    pub prune_score: Option<String>,
    pub protect_last: Option<usize>,
    /// A context made by `POST /v1/contexts`: the prompt continues a copy of its cache.
    pub context_id: Option<String>,
    /// EOS (and `stop_token`) never end generation: every choice runs to its token limit, as
    /// llama.cpp's and vLLM's `ignore_eos` (load generators send it so every server produces the
    /// same number of tokens). Stop strings still stop.
    pub ignore_eos: Option<bool>,
}

impl RequestFields {
    const KEYS: &[&str] = &[
        "model",
        "n",
        "stream",
        "stream_options",
        "user",
        "stop",
        "stop_token",
        "press",
        "prune_tokens",
        "prune_score",
        "protect_last",
        "context_id",
        "ignore_eos",
    ];
}

/// Generation settings the endpoints set themselves, with what to send instead.
const NOT_IN_BODY: &[(&str, &str)] = &[
    ("max_new_tokens", "use max_tokens"),
    ("do_sample", "temperature 0 is greedy, above 0 samples"),
    ("num_return_sequences", "use n"),
    ("num_beams", "beam search is not served"),
    ("length_penalty", "beam search is not served"),
    ("early_stopping", "beam search is not served"),
    ("eos_token_id", "use stop_token"),
];

/// The sampling, press and pruning fields of both endpoints.
#[derive(Debug, Default)]
pub struct Sampling {
    pub fields: RequestFields,
    /// Every other field: pare-generate's `GenerationConfig` by its own names (`temperature`,
    /// `top_k`, `repetition_penalty`, `dry_multiplier`, ...), so every processor it has is here.
    pub config: GenerationConfig,
}

/// Upper bound on `n`: each choice is a sequence of its own.
const MAX_N: usize = 128;

impl Sampling {
    /// Split the fields both endpoints share into the request's own and the generation settings.
    pub fn parse(body: Value) -> Result<Self, ApiError> {
        let Value::Object(body) = body else { return Err(ApiError::invalid("the body must be a JSON object", None)) };
        let (fields, settings) = split(body, RequestFields::KEYS);
        let fields: RequestFields = parse(fields)?;
        if let Some((key, instead)) = NOT_IN_BODY.iter().find(|(k, _)| settings.get(k).is_some()) {
            return Err(ApiError::invalid(format!("{key} is not a request field: {instead}"), Some(key)));
        }
        Ok(Sampling { fields, config: parse(settings)? })
    }

    pub fn model(&self) -> Option<&str> {
        self.fields.model.as_deref()
    }

    pub fn n(&self) -> Result<usize, ApiError> {
        match self.fields.n.unwrap_or(1) {
            0 => Err(ApiError::invalid("n must be at least 1", Some("n"))),
            n if n > MAX_N => Err(ApiError::invalid(format!("n must be at most {MAX_N}, got {n}"), Some("n"))),
            n => Ok(n),
        }
    }

    pub fn stream(&self) -> bool {
        self.fields.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> Result<bool, ApiError> {
        match (&self.fields.stream_options, self.stream()) {
            (Some(_), false) => Err(ApiError::invalid("stream_options needs stream: true", Some("stream_options"))),
            (Some(o), true) => Ok(o.include_usage.unwrap_or(false)),
            (None, _) => Ok(false),
        }
    }

    /// The generation settings of the request's first choice (choice i draws with seed + i).
    /// OpenAI's semantics: temperature 1 by default, 0 is greedy; no top-k unless one is given.
    pub fn settings(&self, loaded: &LoadedModel, max_tokens: usize) -> Result<Settings, ApiError> {
        let tok = loaded.tokenizer().map_err(|e| ApiError::internal(e.to_string()))?;
        let given = &self.config;
        let temperature = given.temperature.unwrap_or(1.0);
        // OpenAI's own fields are named in the error; pare's processors check the rest below.
        let ranges = [
            ("temperature", given.temperature, 0.0, f32::MAX),
            ("top_p", given.top_p, f32::MIN_POSITIVE, 1.0),
            ("presence_penalty", given.presence_penalty, -2.0, 2.0),
            ("frequency_penalty", given.frequency_penalty, -2.0, 2.0),
        ];
        for (name, value, low, high) in ranges {
            if let Some(v) = value.filter(|v| !(low..=high).contains(v)) {
                return Err(ApiError::invalid(format!("{name} is out of range: {v}"), Some(name)));
            }
        }
        let sampling = temperature != 0.0;
        let mut eos = loaded.eos_token_ids();
        for (i, text) in self.fields.stop_token.iter().flatten().enumerate() {
            let id = tok.token_id(text).ok_or_else(|| {
                ApiError::invalid(
                    format!("{text:?} is not a token of this model's vocabulary"),
                    Some(&format!("stop_token[{i}]")),
                )
            })?;
            eos.push(id);
        }
        for (&id, &bias) in given.logit_bias.iter().flatten() {
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(
                    format!("logit_bias values must be in [-100, 100], got {bias} for token {id}"),
                    Some("logit_bias"),
                ));
            }
        }
        if let Some(k) = given.top_k.filter(|&k| k < -1) {
            return Err(ApiError::invalid(format!("top_k must be >= 0 (-1 or 0 = off), got {k}"), Some("top_k")));
        }
        if given.mirostat == Some(true) && !sampling {
            return Err(ApiError::invalid("mirostat samples: it needs temperature > 0", Some("mirostat")));
        }
        let stop = self.fields.stop.as_ref().map(|s| match s {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        });
        // OpenAI's semantics over the settings as given: temperature 1 by default and 0 greedy,
        // no top-k unless one is given (-1, vLLM's "off", and 0 both turn it off).
        let config = GenerationConfig {
            max_new_tokens: Some(max_tokens),
            do_sample: Some(sampling),
            temperature: sampling.then_some(temperature),
            top_k: Some(if sampling { given.top_k.map_or(0, |k| k.max(0)) } else { 0 }),
            seed: Some(given.seed.unwrap_or_else(rand::random)),
            stop,
            logit_bias: given.logit_bias.clone().filter(|b| !b.is_empty()),
            eos_token_id: Some(eos),
            // HF's min_new_tokens suppresses the EOS ids until the count is reached: up to the
            // limit, that is ignoring EOS.
            min_new_tokens: if self.fields.ignore_eos == Some(true) { Some(max_tokens) } else { given.min_new_tokens },
            ..given.clone()
        };
        let vocab = loaded.model.config().vocab_size;
        let processors = config.processor_config(&[]).map_err(|e| ApiError::invalid(e, None))?;
        processors.validate_vocab(vocab).map_err(|e| ApiError::invalid(e, None))?;
        // The whole processor chain's checks, as `pare generate` runs them.
        let settings = Settings::new(config, Some(tok)).map_err(|e| ApiError::invalid(e.to_string(), None))?;
        settings.chain().map_err(|e| ApiError::invalid(e.to_string(), None))?;
        Ok(settings)
    }

    /// A fresh press and pruner (each sequence owns its own); checked before anything is queued.
    pub fn hooks(&self, loaded: &LoadedModel) -> Result<Hooks, ApiError> {
        let num_layers = loaded.model.num_layers();
        let f = &self.fields;
        let press = match &f.press {
            Some(spec) => Some(spec.build().map_err(|e| ApiError::invalid(e.to_string(), Some("press")))?),
            None => None,
        };
        let pruner = match &f.prune_tokens {
            Some(spec) => {
                let bad = |e: String| ApiError::invalid(e, Some("prune_tokens"));
                let schedule = PruneSchedule::parse(spec).map_err(|e| bad(e.to_string()))?;
                schedule.check(num_layers).map_err(|e| bad(e.to_string()))?;
                let score = f.prune_score.as_deref().unwrap_or("last-attn");
                // A learned scorer is a file path: the server reads no files its clients name.
                if score.starts_with("learned") {
                    return Err(ApiError::invalid(
                        "prune_score learned:FILE is not accepted over HTTP (last-attn, mean-attn, knorm, random)",
                        Some("prune_score"),
                    ));
                }
                let scorer: TokenScorer = pare_token_prune::scorer(score, 0)
                    .map_err(|e| ApiError::invalid(e.to_string(), Some("prune_score")))?;
                let span = Span::Prompt { protect_last: f.protect_last.unwrap_or(8) };
                Some(Arc::new(Pruner { schedule, span, scorer }) as Arc<dyn TokenPruner>)
            }
            None => {
                if f.prune_score.is_some() || f.protect_last.is_some() {
                    return Err(ApiError::invalid(
                        "prune_score and protect_last need prune_tokens",
                        Some("prune_tokens"),
                    ));
                }
                None
            }
        };
        let mut hooks = Hooks::new(press, pruner);
        hooks.bind(loaded).map_err(|e| ApiError::invalid(e.to_string(), Some("press")))?;
        Ok(hooks)
    }

    /// KV bytes one sequence may come to hold: its prompt after prefill compression, plus every
    /// token it may generate, uncompressed.
    pub fn kv_estimate(&self, prompt_len: usize, max_tokens: usize, bytes_per_token: usize) -> usize {
        let kept = self.fields.press.as_ref().map_or(prompt_len, |p| p.kept_after_prefill(prompt_len));
        (kept + max_tokens) * bytes_per_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named() {
        let err = Sampling::parse(serde_json::json!({"temperature": "hot"})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"));
        let err = Sampling::parse(serde_json::json!({"press": {"name": "knorm", "ratoi": 0.5}})).unwrap_err();
        assert!(err.message.contains("ratoi"), "{}", err.message);
        assert!(Sampling::parse(serde_json::json!({"temprature": 1})).unwrap_err().message.contains("temprature"));
        let err = Sampling::parse(serde_json::json!({"num_beams": 4})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("num_beams"));
    }

    #[test]
    fn every_generation_setting_is_a_field() {
        let body = serde_json::json!({"top_k": 5, "dry_multiplier": 0.8, "xtc_probability": 0.5, "logit_bias": {"7": 2},
                                      "press": {"name": "snapkv", "ratio": 0.5, "window": 8}, "stop": "x"});
        let s = Sampling::parse(body).unwrap();
        assert_eq!(
            (s.config.top_k, s.config.dry_multiplier, s.config.xtc_probability),
            (Some(5), Some(0.8), Some(0.5))
        );
        assert_eq!(s.config.logit_bias.unwrap()[&7], 2.0);
        assert_eq!(s.fields.press.unwrap().options.window, Some(8));
    }
}
