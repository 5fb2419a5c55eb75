//! pare-formats: reading model checkpoints and their companions.
//!
//! - [`gguf`]: GGUF files (metadata, tensor layout, dequantization through candle);
//! - [`safetensors_store`]: Hugging Face safetensors checkpoints, single-file or sharded;
//! - [`tokenizer`]: tokenizers built from GGUF metadata or an HF directory;
//! - [`chat`]: chat templates rendered as transformers' `apply_chat_template` does.
//!
//! Every input is treated as untrusted: a malformed file yields a [`FormatError`] naming the
//! file and the problem, never a panic.

pub mod chat;
pub mod error;
pub mod gguf;
pub mod safetensors_store;
pub mod tokenizer;

pub use chat::{render_chat, ChatMessage};
pub use error::{FormatError, Result};
pub use gguf::{write_gguf, GgmlType, GgufFile, GgufTensorData, GgufTensorInfo, GgufValue};
pub use safetensors_store::{save_safetensors, SafetensorsStore};
pub use tokenizer::TokenizerBundle;
