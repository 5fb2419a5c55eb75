//! Evaluation: perplexity by the sliding-window method of HF's "Perplexity of fixed-length models".

pub mod needle;
pub mod perplexity;
pub mod plot;

pub use perplexity::{perplexity, perplexity_stream, perplexity_with, PerplexityResult, StreamResult, Window};
