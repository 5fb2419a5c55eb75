//! KeyDiffPress (arXiv 2504.15364): keys that point where the average key points carry little
//! that the others do not, so the score is the negated cosine similarity of each key to the mean
//! of the unit-normalized keys. Query-agnostic: it needs no attention and no queries.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::observation::{per_head, to_vec, Observation};
use crate::scorer::Scorer;

#[derive(Debug, Clone, Default)]
pub struct KeyDiff;

/// −cos(k_j, mean_i k_i/‖k_i‖) for keys (..., entries, head_dim) → (..., entries).
fn negated_similarity_to_anchor(keys: &Tensor) -> Result<Tensor> {
    let norms = keys.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    // F.normalize's eps and cosine_similarity's, so that zero keys score as kvpress scores them.
    let anchor = keys.broadcast_div(&norms.clamp(1e-12, f64::INFINITY)?)?.mean_keepdim(D::Minus2)?;
    let dot = keys.broadcast_mul(&anchor)?.sum(D::Minus1)?;
    let anchor_norm = anchor.sqr()?.sum(D::Minus1)?.sqrt()?;
    let denom = norms.squeeze(D::Minus1)?.broadcast_mul(&anchor_norm)?.clamp(1e-8, f64::INFINITY)?;
    Ok(dot.div(&denom)?.neg()?)
}

impl Scorer for KeyDiff {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        match obs.stacked_keys()? {
            Some(keys) => per_head(&negated_similarity_to_anchor(keys)?),
            None => obs.keys()?.iter().map(|k| to_vec(&negated_similarity_to_anchor(k)?)).collect(),
        }
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}
