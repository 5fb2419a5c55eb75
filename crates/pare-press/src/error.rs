//! Errors of building and running presses, as values.

#[derive(Debug, thiserror::Error)]
pub enum PressError {
    /// A press or option the user named is not valid; the message is shown as is.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] pare_model::ModelError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, PressError>;

impl PressError {
    pub fn config(message: impl Into<String>) -> Self {
        PressError::Config(message.into())
    }
}

/// Presses run inside the forward pass, whose hooks return model errors.
impl From<PressError> for pare_model::ModelError {
    fn from(e: PressError) -> Self {
        match e {
            PressError::Model(m) => m,
            PressError::Candle(c) => pare_model::ModelError::Candle(c),
            PressError::Config(m) => pare_model::ModelError::Input(m),
        }
    }
}
