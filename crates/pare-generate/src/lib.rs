//! Decoding: logits processors (one per file, in HF's order), greedy and seeded sampling, beam
//! search over a reordered KV cache, and stopping.

pub mod batch;
pub mod beam;
pub mod config;
pub mod generate;
pub mod processors;
pub mod sampling;
pub mod stopping;

pub use batch::{top_logprobs, Batch, CacheBytes, Event, GroupSpec, SeqId, Settings, Suspended};
pub use beam::beam_search_with;
pub use config::GenerationConfig;
pub use generate::{CacheStats, FinishReason, GenerationOutput, Generator, Prompts, Sequence, Timings};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] pare_model::ModelError),
    #[error("{0}")]
    Config(String),
}

impl From<candle_core::Error> for GenerateError {
    fn from(e: candle_core::Error) -> Self {
        GenerateError::Model(e.into())
    }
}

pub type Result<T> = std::result::Result<T, GenerateError>;
