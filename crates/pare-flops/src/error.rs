//! Errors of a FLOPs analysis: inputs that describe no run pare could make.

#[derive(Debug, thiserror::Error)]
pub enum FlopsError {
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, FlopsError>;

impl FlopsError {
    pub fn input(message: impl Into<String>) -> Self {
        FlopsError::Input(message.into())
    }
}
