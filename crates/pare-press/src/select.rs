//! Selectors turn scores into the entries a row keeps. The default keeps each KV head's top
//! entries under the budget (kvpress's ScorerPress); wrappers in `presses/` change the rule
//! (per-layer budgets, per-head budgets, chunks) around any scorer.

use candle_core::Tensor;
use pare_kernels::{top_k_keep, BufferRows};

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::Result;
use crate::observation::Observation;
use crate::scorer::Scorer;

/// Per KV head the kept indices, ascending, and the same entries as cache buffer rows (u32, on
/// the device).
pub type Selected = (Vec<Vec<usize>>, Tensor);

pub trait Selector: std::fmt::Debug + Send + Sync {
    fn scorer(&self) -> &dyn Scorer;

    /// Per KV head, indices (into that head's scores) of the entries to keep.
    fn select(&self, obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>>;

    /// Whether [`Selector::select`] reads the scorer's scores of the whole row. A selector that
    /// scores parts of the row itself (BlockPress) says no, and is handed no scores.
    fn scores_whole_row(&self) -> bool {
        true
    }

    /// Whether [`Selector::select_tensor`] selects for this observation (asked before scoring).
    fn selects_on_device(&self, _obs: &Observation) -> bool {
        false
    }

    /// [`Selector::select`] on the device from every head's scores (kv_heads, entries), the same
    /// entries: per head the kept indices, ascending (read back: the positions live on the host),
    /// and the same entries as cache buffer rows on the device, head `h`'s entry `i` at
    /// `first + h · stride + i`. None when this selector selects on the host only.
    fn select_tensor(
        &self,
        _obs: &Observation,
        _scores: &Tensor,
        _budget: Budget,
        _first: usize,
        _stride: usize,
    ) -> Result<Option<Selected>> {
        Ok(None)
    }

    fn box_clone(&self) -> Box<dyn Selector>;
}

/// kvpress's ScorerPress: each KV head keeps its own top `budget.kept(n)` entries.
#[derive(Debug)]
pub struct HeadTopK {
    pub scorer: Box<dyn Scorer>,
}

impl Selector for HeadTopK {
    fn scorer(&self) -> &dyn Scorer {
        self.scorer.as_ref()
    }

    fn select(&self, _obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>> {
        Ok(scores.iter().map(|s| top_k(s, budget.kept(s.len()))).collect())
    }

    fn selects_on_device(&self, obs: &Observation) -> bool {
        obs.heads_share_entries()
    }

    fn select_tensor(
        &self,
        _obs: &Observation,
        scores: &Tensor,
        budget: Budget,
        first: usize,
        stride: usize,
    ) -> Result<Option<Selected>> {
        let n = scores.dim(1)?;
        let (idx, rows) = top_k_keep(scores, budget.kept(n), BufferRows { first, stride, per_head: n })?;
        let kept = idx.to_vec2::<u32>()?.into_iter().map(|h| h.into_iter().map(|i| i as usize).collect()).collect();
        Ok(Some((kept, rows.flatten_all()?)))
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(HeadTopK { scorer: self.scorer.box_clone() })
    }
}
