//! Decoding flags shared by `generate` and `score`, named like HF's GenerationConfig.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use pare_generate::GenerationConfig;
use pare_model::LoadedModel;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// A JSON file of generation settings with the same names (HF GenerationConfig keys).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Every setting pare-generate defines, one flag each (the server's JSON takes the same).
    #[command(flatten)]
    pub flags: GenerationConfig,
    /// A token (its exact vocabulary text, e.g. "<|im_end|>") that ends generation like EOS (repeatable).
    #[arg(long)]
    pub stop_token: Vec<String>,
    /// ID=BIAS added to a token's logit (repeatable; -inf forbids the token).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_logit_bias)]
    pub logit_bias: Vec<(u32, f32)>,
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
            logit_bias: (!self.logit_bias.is_empty()).then(|| self.logit_bias.iter().copied().collect()),
            ..self.flags.clone()
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

/// `ID=BIAS`; the bias may be `-inf` (the token is never chosen).
fn parse_logit_bias(entry: &str) -> std::result::Result<(u32, f32), String> {
    let (id, bias) = entry.split_once('=').ok_or("expected ID=BIAS")?;
    let id = id.trim().parse().map_err(|_| format!("bad token id {:?}", id.trim()))?;
    let bias = bias.trim().parse().map_err(|_| format!("bad bias {:?}", bias.trim()))?;
    Ok((id, bias))
}
