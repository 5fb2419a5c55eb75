//! Errors of model loading and the forward pass, as values.

use pare_formats::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("unsupported architecture {0:?} (pare runs llama, mistral, qwen2, gpt_neox)")]
    UnknownArchitecture(String),
    #[error("missing weight {0}")]
    MissingWeight(String),
    #[error("weight {name} has shape {actual:?}, expected {expected}")]
    WeightShape { name: String, actual: Vec<usize>, expected: String },
    #[error("{0}")]
    Input(String),
    #[error("model not found: {0} (a GGUF file, an HF directory, or an alias such as smollm2-135m; run `make assets` for the aliases)")]
    NotFound(String),
    #[error("{0}")]
    NonFinite(String),
    /// What does not fit, how much it needs and how much is available.
    #[error("{0}")]
    OutOfMemory(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub fn input(message: impl Into<String>) -> Self {
        ModelError::Input(message.into())
    }
}

/// Library errors name a setting by its field in backticks (`` `ratio` ``, `` `prune_tokens` ``):
/// a library does not know how a front end spells it. The names a message holds, in order.
pub fn setting_names(message: &str) -> Vec<&str> {
    setting_spans(message).into_iter().map(|(start, end)| &message[start + 1..end - 1]).collect()
}

/// `message` with each backticked setting name written as `spell(name)`: the CLI writes
/// `--prune-tokens`, the server the request field `prune_tokens`.
pub fn spell_settings(message: &str, spell: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(message.len());
    let mut at = 0;
    for (start, end) in setting_spans(message) {
        out.push_str(&message[at..start]);
        out.push_str(&spell(&message[start + 1..end - 1]));
        at = end;
    }
    out.push_str(&message[at..]);
    out
}

/// Byte ranges of `` `name` `` spans whose name is a field name (lower case, digits, `_`):
/// backticked commands such as `` `pare train-scorer` `` are left alone.
fn setting_spans(message: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut rest = 0;
    while let Some(open) = message[rest..].find('`').map(|i| rest + i) {
        let Some(close) = message[open + 1..].find('`').map(|i| open + 1 + i) else { break };
        let name = &message[open + 1..close];
        let is_field = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if is_field {
            spans.push((open, close + 1));
            rest = close + 1;
        } else {
            rest = open + 1;
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_spelled_by_the_front_end() {
        let message = "`prune_tokens`: layer 3 keeps more than `ratio` allows (see `pare train-scorer`)";
        assert_eq!(setting_names(message), ["prune_tokens", "ratio"]);
        let cli = spell_settings(message, |n| format!("--{}", n.replace('_', "-")));
        assert_eq!(cli, "--prune-tokens: layer 3 keeps more than --ratio allows (see `pare train-scorer`)");
        assert_eq!(spell_settings("no settings, one ` tick", |n| n.to_string()), "no settings, one ` tick");
    }
}
