//! Errors of a FLOPs analysis: inputs that describe no run pare could make.

#[derive(Debug, thiserror::Error)]
pub enum FlopsError {
    #[error("{0}")]
    Input(String),
    /// Boxed: the pruning error carries model errors, and this one travels by value.
    #[error(transparent)]
    Prune(Box<pare_token_prune::PruneError>),
}

impl From<pare_token_prune::PruneError> for FlopsError {
    fn from(e: pare_token_prune::PruneError) -> Self {
        FlopsError::Prune(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, FlopsError>;

impl FlopsError {
    pub fn input(message: impl Into<String>) -> Self {
        FlopsError::Input(message.into())
    }
}
