//! Errors of token pruning, as values.

#[derive(Debug, thiserror::Error)]
pub enum TokenPruneError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Press(#[from] pare_press::PressError),
    #[error(transparent)]
    Model(#[from] pare_model::ModelError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TokenPruneError>;

impl TokenPruneError {
    pub fn config(message: impl Into<String>) -> Self {
        TokenPruneError::Config(message.into())
    }
}

impl From<TokenPruneError> for pare_model::ModelError {
    fn from(e: TokenPruneError) -> Self {
        match e {
            TokenPruneError::Model(m) => m,
            TokenPruneError::Candle(c) => pare_model::ModelError::Candle(c),
            other => pare_model::ModelError::Input(other.to_string()),
        }
    }
}
