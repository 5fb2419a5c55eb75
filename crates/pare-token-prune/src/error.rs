//! Errors of token pruning, as values.

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Press(#[from] pare_press::PressError),
    #[error(transparent)]
    Model(#[from] pare_model::ModelError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, PruneError>;

impl PruneError {
    pub fn config(message: impl Into<String>) -> Self {
        PruneError::Config(message.into())
    }
}

impl From<PruneError> for pare_model::ModelError {
    fn from(e: PruneError) -> Self {
        match e {
            PruneError::Model(m) => m,
            PruneError::Candle(c) => pare_model::ModelError::Candle(c),
            other => pare_model::ModelError::Input(other.to_string()),
        }
    }
}
