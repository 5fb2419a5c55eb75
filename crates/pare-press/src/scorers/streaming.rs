//! StreamingLLMPress as a scorer (arXiv 2309.17453): the first `sinks` entries and then the
//! most recent ones. kvpress zeroes the entries right after the sinks; ranking by recency keeps
//! the same set for any budget of at least `sinks` entries.

use crate::error::Result;
use crate::observation::Observation;
use crate::scorer::{protect, Scorer};

#[derive(Debug, Clone)]
pub struct StreamingScorer {
    pub sinks: usize,
}

impl Scorer for StreamingScorer {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        let mut scores: Vec<Vec<f32>> =
            obs.positions.iter().map(|p| (0..p.len()).map(|i| i as f32).collect()).collect();
        protect(obs, &mut scores, |_, i| i < self.sinks)?;
        Ok(scores)
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}
