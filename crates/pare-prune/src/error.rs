//! Errors of structured pruning, as values: bad settings and plans are user input.

use pare_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Format(#[from] pare_formats::FormatError),
    /// Settings that cannot work for this model (ranges, ratios, round-to, calibration size).
    #[error("{0}")]
    Input(String),
    /// A pruning plan that does not fit the model or is inconsistent.
    #[error("pruning plan: {0}")]
    Plan(String),
}

pub type Result<T> = std::result::Result<T, PruneError>;

impl PruneError {
    pub fn input(message: impl Into<String>) -> Self {
        PruneError::Input(message.into())
    }
}
