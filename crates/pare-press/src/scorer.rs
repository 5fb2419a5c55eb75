//! A scorer press only computes a score per cache entry; the press around it decides what to
//! keep (kvpress's ScorerPress split).

use candle_core::Tensor;

use crate::error::Result;
use crate::observation::Observation;

pub trait Scorer: std::fmt::Debug + Send + Sync {
    /// One score per entry of every KV head of one row, in cache order: higher is kept first.
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>>;

    /// The scores of every KV head as one (kv_heads, entries) f32 tensor on the observation's
    /// device, ranking the entries as [`Scorer::score`] does, when the scorer can compute them
    /// there for this observation (its heads hold the same entries); None otherwise. A press
    /// then selects on the device and reads back only what it keeps.
    fn score_tensor(&self, _obs: &Observation) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn box_clone(&self) -> Box<dyn Scorer>;
}

/// Give `protected` entries a score above every other score of the row (kvpress pads them with
/// `max + 1`, the maximum over all of the layer's heads: every rank's, on a split model, so rules
/// that rank entries across heads see the value the whole model gives them).
pub(crate) fn protect(
    obs: &Observation,
    scores: &mut [Vec<f32>],
    protected: impl Fn(usize, usize) -> bool,
) -> Result<()> {
    let local = scores
        .iter()
        .enumerate()
        .flat_map(|(h, s)| s.iter().enumerate().filter(|&(i, _)| !protected(h, i)).map(|(_, &v)| v).collect::<Vec<_>>())
        .fold(f32::NEG_INFINITY, f32::max);
    let max = obs.every_head(&[vec![local]])?.into_iter().flatten().fold(f32::NEG_INFINITY, f32::max);
    let top = if max.is_finite() { max + 1.0 } else { 1.0 };
    for (h, s) in scores.iter_mut().enumerate() {
        for (i, v) in s.iter_mut().enumerate() {
            if protected(h, i) {
                *v = top;
            }
        }
    }
    Ok(())
}
