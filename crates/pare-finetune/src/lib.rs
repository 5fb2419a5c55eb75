//! LoRA fine-tuning: the second stage of LLM-Pruner (prune, then recover).
//!
//! - [`lora`]: which projections get adapters, their rank and scale, and their initial values.
//! - [`peft`]: adapters on disk exactly as HF peft writes and reads them.
//! - [`data`]: plain text, prompt/response and chat records turned into token ids with the
//!   tokens the loss is taken on.
//! - [`optim`]: AdamW and the warm-up schedules, as torch and transformers compute them.
//! - [`train`]: the training loop over pare's differentiable forward, with checkpoints.

pub mod data;
pub mod error;
pub mod lora;
pub mod optim;
pub mod peft;
pub mod train;

pub use error::{FinetuneError, Result};
pub use lora::{Adapter, LoraConfig};
