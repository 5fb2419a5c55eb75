//! Decoding flags shared by `generate` and `score`, named like HF's GenerationConfig.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use pare_generate::beam::EarlyStopping;
use pare_generate::GenerationConfig;
use pare_model::LoadedModel;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// A JSON file of generation settings with the same names (HF GenerationConfig keys).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub do_sample: bool,
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
    pub min_tokens_to_keep: Option<usize>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    #[arg(long)]
    pub min_new_tokens: Option<usize>,
    #[arg(long)]
    pub num_beams: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,
    /// true, false or never.
    #[arg(long, value_parser = parse_early_stopping)]
    pub early_stopping: Option<EarlyStopping>,
    #[arg(long)]
    pub num_return_sequences: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable); the string is cut from the output.
    #[arg(long)]
    pub stop: Vec<String>,
    /// A token (its exact vocabulary text, e.g. "<|im_end|>") that ends generation like EOS (repeatable).
    #[arg(long)]
    pub stop_token: Vec<String>,
    /// Text that must never be generated (repeatable).
    #[arg(long)]
    pub bad_words: Vec<String>,
    /// ID=BIAS added to a token's logit (repeatable; -inf forbids the token).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_logit_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Token ids that are never generated (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub suppress_tokens: Vec<u32>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub max_time: Option<f64>,
    /// Mirostat v2 sampling (llama.cpp).
    #[arg(long)]
    pub mirostat: bool,
    #[arg(long)]
    pub mirostat_tau: Option<f32>,
    #[arg(long)]
    pub mirostat_eta: Option<f32>,
    /// DRY repetition penalty strength (llama.cpp; 0 = off).
    #[arg(long)]
    pub dry_multiplier: Option<f32>,
    #[arg(long)]
    pub dry_base: Option<f32>,
    #[arg(long)]
    pub dry_allowed_length: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub dry_penalty_last_n: Option<i64>,
    /// XTC: chance per step of excluding the top choices (llama.cpp; 0 = off).
    #[arg(long)]
    pub xtc_probability: Option<f32>,
    #[arg(long)]
    pub xtc_threshold: Option<f32>,
}

impl SamplingArgs {
    /// HF defaults ← the model's generation config ← --config FILE ← flags, each layer checked on
    /// its own first so that an error names the flag or file that holds the bad value.
    /// `max_new_tokens` is the command's own flag (None: not given).
    pub fn generation_config(&self, loaded: &LoadedModel, max_new_tokens: Option<usize>) -> Result<GenerationConfig> {
        let mut config = GenerationConfig::default();
        if let Some(json) = &loaded.generation_config {
            let defaults = GenerationConfig::from_model_defaults(json);
            defaults.check_values().map_err(|e| anyhow!("the model's generation_config.json: {e}"))?;
            config.merge(&defaults);
        }
        config.eos_token_id = Some(loaded.eos_token_ids());
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let file = GenerationConfig::from_json_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            file.check_values().map_err(|e| anyhow!("{}: {e}", path.display()))?;
            config.merge(&file);
        }
        let flags = GenerationConfig {
            max_new_tokens,
            do_sample: self.do_sample.then_some(true),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            epsilon_cutoff: self.epsilon_cutoff,
            eta_cutoff: self.eta_cutoff,
            min_tokens_to_keep: self.min_tokens_to_keep,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            min_new_tokens: self.min_new_tokens,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping,
            num_return_sequences: self.num_return_sequences,
            seed: self.seed,
            stop: (!self.stop.is_empty()).then(|| self.stop.clone()),
            bad_words: (!self.bad_words.is_empty()).then(|| self.bad_words.clone()),
            logit_bias: (!self.logit_bias.is_empty()).then(|| self.logit_bias.iter().copied().collect()),
            suppress_tokens: (!self.suppress_tokens.is_empty()).then(|| self.suppress_tokens.clone()),
            max_time: self.max_time,
            mirostat: self.mirostat.then_some(true),
            mirostat_tau: self.mirostat_tau,
            mirostat_eta: self.mirostat_eta,
            dry_multiplier: self.dry_multiplier,
            dry_base: self.dry_base,
            dry_allowed_length: self.dry_allowed_length,
            dry_penalty_last_n: self.dry_penalty_last_n,
            xtc_probability: self.xtc_probability,
            xtc_threshold: self.xtc_threshold,
            ..GenerationConfig::default()
        };
        flags.check_values().map_err(|e| anyhow!("--{} {}", e.key.replace('_', "-"), e.problem))?;
        config.merge(&flags);
        if !self.stop_token.is_empty() {
            let tok = loaded.tokenizer()?;
            let eos = config.eos_token_id.get_or_insert_with(Vec::new);
            for text in &self.stop_token {
                match tok.token_id(text) {
                    Some(id) => eos.push(id),
                    None => bail!("--stop-token {text:?} is not a token of this model's vocabulary"),
                }
            }
        }
        let vocab = loaded.model.config().vocab_size as u32;
        let ids = config
            .logit_bias
            .iter()
            .flat_map(|m| m.keys().copied())
            .chain(config.suppress_tokens.iter().flatten().copied());
        for id in ids {
            if id >= vocab {
                bail!("token id {id} is outside the vocabulary ({vocab})");
            }
        }
        // Bounded here, so that no length computed from it downstream can overflow.
        let ctx = loaded.model.config().max_position_embeddings;
        if config.max_new_tokens() > ctx {
            bail!("max_new_tokens {} exceeds the model's context of {ctx}", config.max_new_tokens());
        }
        // The combinations are validated where they are used: `Generator::new`.
        Ok(config)
    }
}

fn parse_early_stopping(s: &str) -> std::result::Result<EarlyStopping, String> {
    match s {
        "true" | "True" => Ok(EarlyStopping::True),
        "false" | "False" => Ok(EarlyStopping::False),
        "never" => Ok(EarlyStopping::Never),
        _ => Err("expected true, false or never".into()),
    }
}

/// `ID=BIAS`; the bias may be `-inf` (the token is never chosen).
fn parse_logit_bias(entry: &str) -> std::result::Result<(u32, f32), String> {
    let (id, bias) = entry.split_once('=').ok_or("expected ID=BIAS")?;
    let id = id.trim().parse().map_err(|_| format!("bad token id {:?}", id.trim()))?;
    let bias = bias.trim().parse().map_err(|_| format!("bad bias {:?}", bias.trim()))?;
    Ok((id, bias))
}
