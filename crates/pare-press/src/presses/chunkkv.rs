//! ChunkKVPress (arXiv 2502.00299): keep whole chunks of consecutive entries, ranked by their
//! mean score summed over KV heads, so kept context stays contiguous. Every head keeps the same
//! chunks. Needs heads that hold the same entries (it runs at the end of prefill).

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::{PressError, Result};
use crate::observation::Observation;
use crate::scorer::Scorer;
use crate::select::Selector;

#[derive(Debug)]
pub struct ChunkKv {
    pub scorer: Box<dyn Scorer>,
    pub chunk_length: usize,
}

impl Selector for ChunkKv {
    fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    fn select(&self, obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        if !obs.heads_share_entries() {
            return Err(PressError::config(
                "chunkkv needs KV heads that hold the same entries (do not combine it after a per-head press)",
            ));
        }
        let n = scores[0].len();
        let ratio = budget.ratio_of(n);
        let complete = n / self.chunk_length;
        if complete == 0 {
            // Shorter than one chunk: the inner scorer's own top-k, as kvpress falls back to.
            return Ok(scores.iter().map(|s| top_k(s, budget.kept(s.len()))).collect());
        }
        // Over all of the layer's heads, on every rank of a split model.
        let all = obs.every_head(scores)?;
        let summed: Vec<f32> = (0..n).map(|i| all.iter().map(|s| s[i]).sum()).collect();
        let chunks: Vec<std::ops::Range<usize>> = (0..complete)
            .map(|c| c * self.chunk_length..(c + 1) * self.chunk_length)
            .chain((!n.is_multiple_of(self.chunk_length)).then(|| complete * self.chunk_length..n))
            .collect();
        let chunk_scores: Vec<f32> =
            chunks.iter().map(|r| summed[r.clone()].iter().sum::<f32>() / r.len() as f32).collect();
        let kept_chunks = ((chunks.len() as f64 * (1.0 - ratio)) as usize).max(1);
        let mut kept: Vec<usize> =
            top_k(&chunk_scores, kept_chunks).into_iter().flat_map(|c| chunks[c].clone()).collect();
        kept.sort_unstable();
        Ok(vec![kept; scores.len()])
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(ChunkKv { scorer: self.scorer.box_clone(), chunk_length: self.chunk_length })
    }
}
