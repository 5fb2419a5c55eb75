//! Errors of image loading, preprocessing and the LLaVA forward pass, as values.

use pare_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: cannot read the image: {message}")]
    Image { path: String, message: String },
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("{0}")]
    Input(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, VisionError>;

impl VisionError {
    pub fn input(message: impl Into<String>) -> Self {
        VisionError::Input(message.into())
    }

    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        VisionError::Config { path: path.into(), message: message.into() }
    }
}
