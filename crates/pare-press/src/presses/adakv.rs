//! AdaKVPress (arXiv 2407.11550): per-head budgets. The row's budget (heads × kept) is spent on
//! the best entries across all its KV heads, each head first guaranteed `alpha_safeguard` of its
//! share. kvpress only masks the evicted keys; here each head keeps exactly its entries and the
//! cache becomes ragged, so the memory is really freed.

use candle_core::Tensor;
use pare_kernels::{top_k_keep, BufferRows};

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::Result;
use crate::observation::Observation;
use crate::scorer::Scorer;
use crate::select::{Selected, Selector};

#[derive(Debug)]
pub struct AdaKv {
    pub scorer: Box<dyn Scorer>,
    pub alpha_safeguard: f64,
}

impl AdaKv {
    /// Per head the entries kept under the row's budget over all `scores`' heads.
    fn select_heads(&self, scores: &[Vec<f32>], budget: Budget) -> Vec<Vec<usize>> {
        // Safeguarded entries first, then the best of the rest across heads.
        let mut candidates: Vec<(bool, f32, usize, usize)> = Vec::new();
        let mut total_kept = 0;
        for (h, s) in scores.iter().enumerate() {
            let kept = budget.kept(s.len());
            total_kept += kept;
            let safe = top_k(s, (kept as f64 * self.alpha_safeguard) as usize);
            let mut is_safe = vec![false; s.len()];
            safe.iter().for_each(|&i| is_safe[i] = true);
            candidates.extend(s.iter().enumerate().map(|(i, &v)| (is_safe[i], v, h, i)));
        }
        if let Budget::Entries(k) = budget {
            // An entry budget is per head on average: heads that kept less earlier may grow.
            total_kept = (k * scores.len()).min(scores.iter().map(Vec::len).sum());
        }
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then((a.2, a.3).cmp(&(b.2, b.3))));
        let mut chosen = vec![Vec::new(); scores.len()];
        for &(_, _, h, i) in candidates.iter().take(total_kept) {
            chosen[h].push(i);
        }
        chosen
    }
}

impl Selector for AdaKv {
    fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    fn select(&self, obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        // The budget is spent across all of the layer's heads, on every rank of a split model.
        let all = obs.every_head(scores)?;
        let chosen = self.select_heads(&all, budget);
        Ok(chosen[obs.head_range()].to_vec())
    }

    fn selects_on_device(&self, obs: &Observation) -> bool {
        obs.heads_share_entries() && obs.shard.is_none()
    }

    /// [`Selector::select`] in two selections on the device: each head's safeguarded top entries,
    /// which then rank above every score (a NaN above +∞ in `total_cmp` order), then the row's
    /// budget over all heads' entries as one sequence (ties to the lower (head, entry), as above).
    fn select_tensor(
        &self,
        _obs: &Observation,
        scores: &Tensor,
        budget: Budget,
        first: usize,
        stride: usize,
    ) -> Result<Option<Selected>> {
        let (heads, n) = scores.dims2()?;
        let kept = budget.kept(n);
        let total_kept = match budget {
            Budget::Entries(k) => (k * heads).min(heads * n),
            Budget::Ratio(_) => kept * heads,
        };
        let at = BufferRows { first, stride, per_head: n };
        let safe = (kept as f64 * self.alpha_safeguard) as usize;
        let ranked = if safe > 0 {
            let (safe_idx, _) = top_k_keep(scores, safe, at)?;
            let above_all = Tensor::full(f32::from_bits(0x7fff_ffff), (heads, safe), scores.device())?;
            scores.contiguous()?.scatter(&safe_idx, &above_all, 1)?
        } else {
            scores.clone()
        };
        let (idx, rows) = top_k_keep(&ranked.reshape((1, heads * n))?, total_kept, at)?;
        let mut chosen = vec![Vec::new(); heads];
        for e in idx.flatten_all()?.to_vec1::<u32>()? {
            chosen[e as usize / n].push(e as usize % n);
        }
        Ok(Some((chosen, rows.flatten_all()?)))
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(AdaKv { scorer: self.scorer.box_clone(), alpha_safeguard: self.alpha_safeguard })
    }
}
