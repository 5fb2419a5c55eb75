//! Prefill token pruning inside pare's forward pass (FastV: cut after layer K keeping a share of
//! the image tokens; PyramidDrop: several cuts; LazyLLM-style: prompt tokens of text models).
//!
//! Layers up to a cut see every token; later layers and their KV caches only the kept ones, which
//! keep their original positions. Decoding then runs unchanged over the shorter cache. Scores come
//! from the press scorer API (`pare-press`), computed for the queries they need only.

pub mod error;
pub mod pruner;
pub mod schedule;

pub use error::{PruneError, Result};
pub use pruner::{scorer, Pruner, Span};
pub use schedule::{Keep, PruneSchedule, Stage};
