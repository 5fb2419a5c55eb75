//! KnormPress (arXiv 2406.11430): keys with a small L2 norm draw the most attention, so the
//! score is the negated key norm.

use crate::error::Result;
use candle_core::{Tensor, D};

use crate::observation::{per_head, to_vec, Observation};
use crate::scorer::Scorer;

#[derive(Debug, Clone, Default)]
pub struct Knorm;

impl Scorer for Knorm {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        match self.score_tensor(obs)? {
            Some(scores) => per_head(&scores),
            None => obs.keys()?.iter().map(|k| to_vec(&k.sqr()?.sum(1)?.sqrt()?.neg()?)).collect(),
        }
    }

    fn score_tensor(&self, obs: &Observation) -> Result<Option<Tensor>> {
        // Only the keys are read (and converted to f32).
        obs.stacked_keys()?.map(|keys| Ok(keys.sqr()?.sum(D::Minus1)?.sqrt()?.neg()?)).transpose()
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}
