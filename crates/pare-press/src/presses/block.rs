//! kvpress's BlockPress (the KeyDiff paper's block-wise prompt processing, arXiv 2504.15364):
//! the prompt is compressed block by block, as a chunked prefill would see it. Each head starts
//! from its first `kept` entries; then each block of `block_size` entries is scored together with
//! what the head kept so far, and the head keeps the best `kept` of them. As in kvpress, all
//! entries were computed by one forward pass first: only the scoring is block-wise.

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::{PressError, Result};
use crate::observation::Observation;
use crate::scorer::Scorer;
use crate::select::Selector;

#[derive(Debug)]
pub struct BlockPress {
    pub scorer: Box<dyn Scorer>,
    pub block_size: usize,
}

impl Selector for BlockPress {
    fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    fn scores_whole_row(&self) -> bool {
        false
    }

    fn select(&self, obs: &Observation, _scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        let n = obs.positions[0].len();
        if obs.positions.iter().any(|p| p.len() != n) {
            return Err(PressError::config(
                "block needs KV heads that hold the same number of entries (do not combine it after a per-head press)",
            ));
        }
        let kept = budget.kept(n);
        let block = self.block_size.min(n);
        let mut chosen: Vec<Vec<usize>> = vec![(0..kept).collect(); obs.kv_heads()];
        for start in (kept..n).step_by(block.max(1)) {
            // kvpress's order: what each head kept (best first), then the block.
            let current: Vec<Vec<usize>> =
                chosen.iter().map(|c| c.iter().copied().chain(start..(start + block).min(n)).collect()).collect();
            let scores = self.scorer.score(&obs.subset(&current)?)?;
            chosen =
                current.iter().zip(&scores).map(|(c, s)| top_k(s, kept).into_iter().map(|i| c[i]).collect()).collect();
        }
        Ok(chosen)
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(BlockPress { scorer: self.scorer.box_clone(), block_size: self.block_size })
    }
}
