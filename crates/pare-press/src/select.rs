//! Selectors turn scores into the entries a row keeps. The default keeps each KV head's top
//! entries under the budget (kvpress's ScorerPress); wrappers in `presses/` change the rule
//! (per-layer budgets, per-head budgets, chunks) around any scorer.

use crate::budget::Budget;
use crate::compress::top_k;
use crate::error::Result;
use crate::observation::Observation;
use crate::scorer::Scorer;

pub trait Selector: std::fmt::Debug + Send + Sync {
    fn scorer(&self) -> &dyn Scorer;

    /// Per KV head, indices (into that head's scores) of the entries to keep.
    fn select(&self, obs: &Observation, scores: &[Vec<f32>], budget: Budget) -> Result<Vec<Vec<usize>>>;

    /// When this selector keeps each KV head's own top entries, how many ([`top_k`]'s rule: ties
    /// to the earlier entry): a press may then rank on the device. None for any other rule.
    fn head_budget(&self, _obs: &Observation, _budget: Budget) -> Option<usize> {
        None
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

    fn head_budget(&self, obs: &Observation, budget: Budget) -> Option<usize> {
        obs.heads_share_entries().then(|| budget.kept(obs.positions.first().map_or(0, Vec::len)))
    }

    fn box_clone(&self) -> Box<dyn Selector> {
        Box::new(HeadTopK { scorer: self.scorer.box_clone() })
    }
}
