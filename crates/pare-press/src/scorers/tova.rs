//! TOVAPress (arXiv 2401.06104): the attention the last query pays to each entry, averaged over
//! all query heads (so every KV head ranks entries alike). The last entry is always kept.

use crate::error::Result;
use crate::observation::{per_head, to_vec, Observation};
use crate::scorer::{protect, Scorer};

#[derive(Debug, Clone, Default)]
pub struct Tova;

impl Scorer for Tova {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        let last = *obs.query_positions.last().expect("at least one observed query");
        // The last query's weights averaged over each KV head's query heads: (kv_heads, entries).
        let per_head: Vec<Vec<f32>> = match obs.stacked_attention(1)? {
            Some(weights) => per_head(&weights.mean(1)?.squeeze(1)?)?,
            None => (0..obs.kv_heads()).map(|h| to_vec(&obs.attention(h, 1)?.mean(0)?)).collect::<Result<_>>()?,
        };
        let mut scores = if obs.all_heads_share_entries()? {
            // kvpress averages over every query head (every rank's, when split); heads hold the
            // same entries here.
            let all = obs.every_head(&per_head)?;
            let n = all[0].len();
            let mean: Vec<f32> = (0..n).map(|i| all.iter().map(|s| s[i]).sum::<f32>() / all.len() as f32).collect();
            vec![mean; obs.kv_heads()]
        } else {
            // Heads chose different entries earlier: each KV head's own query heads vote.
            per_head
        };
        protect(obs, &mut scores, |h, i| obs.positions[h][i] >= last)?;
        Ok(scores)
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}
