//! Prefill token pruning inside pare's forward pass (FastV: cut after layer K keeping a share of
//! the image tokens; PyramidDrop: several cuts; LazyLLM-style: prompt tokens of text models).
//!
//! Layers up to a cut see every token; later layers and their KV caches only the kept ones, which
//! keep their original positions. Decoding then runs unchanged over the shorter cache. Scores come
//! from the press scorer API (`pare-press`), computed for the queries they need only, or from a
//! small learned network over the tokens' hidden states ([`learned`], trained by [`train`] on the
//! model's own next-token loss with a soft mask).

pub mod error;
pub mod learned;
pub mod pruner;
pub mod schedule;
pub mod train;

pub use error::{Result, TokenPruneError};
pub use learned::{LearnedScorer, ScorerInfo, ScorerNet, ScorerShape};
pub use pruner::{scorer, Pruner, Span, TokenScorer};
pub use schedule::{Keep, PruneSchedule, Stage};
