//! RandomPress: uniform random scores, the baseline every other press must beat.

use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::observation::Observation;
use crate::scorer::Scorer;

#[derive(Debug, Clone)]
pub struct Random {
    pub seed: u64,
}

impl Scorer for Random {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        // Seeded per layer and per cache state, so a run is reproducible and layers differ.
        let state = obs.next_position() as u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (obs.layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ state << 32,
        );
        // Drawn for all of the layer's heads in order, so a rank of a split model draws its
        // heads' scores as the whole model does.
        let lens: Vec<Vec<f32>> = obs.positions.iter().map(|p| vec![p.len() as f32]).collect();
        let all: Vec<Vec<f32>> = obs
            .every_head(&lens)?
            .iter()
            .map(|len| (0..len[0] as usize).map(|_| rng.random::<f32>()).collect())
            .collect();
        Ok(all[obs.head_range()].to_vec())
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}
