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
