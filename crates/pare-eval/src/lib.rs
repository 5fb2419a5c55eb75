//! Evaluation: perplexity by the sliding-window method of HF's "Perplexity of fixed-length
//! models", needle-in-a-haystack retrieval, RULER's synthetic tasks, and zero-shot tasks as lm-eval-harness scores them.

pub mod needle;
pub mod perplexity;
pub mod plot;
pub mod ruler;
pub mod tasks;

pub use perplexity::{
    perplexity, perplexity_llama_cpp, perplexity_stream, perplexity_with, PerplexityResult, StreamResult, Window,
};
