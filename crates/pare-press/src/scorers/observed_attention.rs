//! ObservedAttentionPress (H2O, arXiv 2306.14048): the attention each entry received from every
//! observed query, divided by how many queries could see it, averaged over the query heads of
//! each KV head. Needs every observed query's attention; it is computed in chunks of queries.

use crate::error::Result;
use crate::observation::{to_vec, Observation};
use crate::scorer::Scorer;

#[derive(Debug, Clone, Default)]
pub struct ObservedAttention;

impl Scorer for ObservedAttention {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        (0..obs.kv_heads())
            .map(|h| {
                let (sums, seen_by) = obs.attention_sums(h)?;
                let mean = to_vec(&sums.mean(0)?)?;
                Ok(mean.iter().zip(seen_by).map(|(&s, n)| if n == 0 { 0.0 } else { s / n as f32 }).collect())
            })
            .collect()
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}
