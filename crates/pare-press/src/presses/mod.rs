//! Presses: what runs when (prefill, decoding, before every forward) and how scores become
//! budgets (per layer, per head, per chunk). Each wraps a scorer or another selector.

pub mod adakv;
pub mod block;
pub mod chunkkv;
pub mod criticalkv;
pub mod decoding;
pub mod duo_attention;
pub mod finch;
pub mod kvzip;
pub mod prefill;
pub mod pyramidkv;
pub mod streaming;
pub mod think;

pub use adakv::AdaKv;
pub use block::BlockPress;
pub use chunkkv::ChunkKv;
pub use criticalkv::{CriticalAdaKv, CriticalKv};
pub use decoding::DecodingPress;
pub use duo_attention::{DuoAttention, DuoPattern};
pub use finch::{Finch, FinchScorer};
pub use kvzip::{KvZip, ReplayPrompt};
pub use prefill::PrefillPress;
pub use pyramidkv::PyramidKv;
pub use streaming::StreamingPress;
pub use think::ThinkPress;
