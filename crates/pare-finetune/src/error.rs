//! Errors of fine-tuning, as values: settings, data files and checkpoints are user input.

use std::path::PathBuf;

use pare_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Format(#[from] pare_formats::FormatError),
    /// Settings that cannot work (rank 0, alpha ≤ 0, a target the model lacks, ...).
    #[error("{0}")]
    Input(String),
    /// A data file that cannot be read as training records.
    #[error("{path}:{line}: {message}")]
    Data { path: PathBuf, line: usize, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, FinetuneError>;

impl FinetuneError {
    pub fn input(message: impl Into<String>) -> Self {
        FinetuneError::Input(message.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FinetuneError::Io { path: path.into(), source }
    }
}
