//! DuoAttentionPress (arXiv 2410.10819): a fraction `head_ratio` of all (layer, KV head) pairs,
//! those with the lowest head scores, become streaming heads and keep only their first
//! `sink_size` and last `recent_size` prompt entries; the other (retrieval) heads keep everything.
//! The scores come from a head pattern learned once per model ([`DuoPattern`], written by
//! `pare duo-pattern` from kvpress's on-the-fly scoring, `scorers::duo_attention`). kvpress masks
//! the streaming heads' middle entries and saves no memory; here each head keeps exactly its
//! entries, so the cache becomes ragged and the memory is freed.

use std::path::Path;

use pare_model::cache::{LayerKv, PAD_POSITION};
use pare_model::hooks::{CachePress, LayerContext};
use serde::{Deserialize, Serialize};

use crate::compress::{keep_where, make_contiguous, PositionPolicy};
use crate::error::{PressError, Result};

/// A model's head pattern: per layer, per KV head, a score (higher: more retrieval-like), and the
/// streaming heads' window. kvpress's on-the-fly scoring uses sink 128, recent 256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuoPattern {
    pub sink_size: usize,
    pub recent_size: usize,
    pub scores: Vec<Vec<f32>>,
    /// How the scores were computed (model, texts, samples, seed): for people, not read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<serde_json::Value>,
}

impl DuoPattern {
    /// Read and check a pattern file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PressError::config(format!("cannot read `duo_pattern` {}: {e}", path.display())))?;
        let pattern: DuoPattern = serde_json::from_str(&text)
            .map_err(|e| PressError::config(format!("`duo_pattern` {} is not a head pattern: {e}", path.display())))?;
        pattern.check().map_err(|e| PressError::config(format!("`duo_pattern` {}: {e}", path.display())))?;
        Ok(pattern)
    }

    /// Write the pattern as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| PressError::config(e.to_string()))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| PressError::config(format!("cannot write {}: {e}", path.display())))
    }

    fn check(&self) -> std::result::Result<(), String> {
        let heads = self.scores.first().map_or(0, Vec::len);
        if heads == 0 {
            return Err("no scores".into());
        }
        if self.scores.iter().any(|l| l.len() != heads) {
            return Err("every layer needs the same number of head scores".into());
        }
        if self.scores.iter().flatten().any(|s| !s.is_finite()) {
            return Err("scores must be finite".into());
        }
        Ok(())
    }

    /// kvpress's streaming mask: the round(heads · head_ratio) lowest scores over all layers
    /// (Python's round, half to even). kvpress's np.argsort is not stable; pare breaks exact
    /// ties by the lower (layer, head).
    pub fn streaming_mask(&self, head_ratio: f64) -> Vec<Vec<bool>> {
        let flat: Vec<(usize, usize, f32)> = self
            .scores
            .iter()
            .enumerate()
            .flat_map(|(l, s)| s.iter().enumerate().map(move |(h, &v)| (l, h, v)))
            .collect();
        let n_pruned = (flat.len() as f64 * head_ratio).round_ties_even() as usize;
        let mut order: Vec<usize> = (0..flat.len()).collect();
        order.sort_by(|&a, &b| flat[a].2.total_cmp(&flat[b].2).then(a.cmp(&b)));
        let mut mask: Vec<Vec<bool>> = self.scores.iter().map(|s| vec![false; s.len()]).collect();
        for &i in &order[..n_pruned] {
            mask[flat[i].0][flat[i].1] = true;
        }
        mask
    }
}

#[derive(Debug, Clone)]
pub struct DuoAttention {
    /// Per layer, per KV head: whether the head streams.
    streaming: Vec<Vec<bool>>,
    sink_size: usize,
    recent_size: usize,
    positions: PositionPolicy,
}

impl DuoAttention {
    pub fn new(pattern: &DuoPattern, head_ratio: f64, positions: PositionPolicy) -> Result<Self> {
        if !(0.0..=1.0).contains(&head_ratio) {
            return Err(PressError::config(format!("`head_ratio` must be in [0, 1], got {head_ratio}")));
        }
        Ok(DuoAttention {
            streaming: pattern.streaming_mask(head_ratio),
            sink_size: pattern.sink_size,
            recent_size: pattern.recent_size,
            positions,
        })
    }

    /// kvpress's `compression_ratio_` after a prefill of `k_len` entries: the share of streaming
    /// heads × the share of entries each drops (0 where the prompt fits the window, which kvpress
    /// reports as a negative ratio).
    pub fn compression_ratio(&self, k_len: usize) -> f64 {
        let heads = self.streaming.iter().flatten().count();
        let streaming = self.streaming.iter().flatten().filter(|&&s| s).count();
        let dropped = 1.0 - (self.sink_size + self.recent_size) as f64 / k_len.max(1) as f64;
        streaming as f64 / heads as f64 * dropped.max(0.0)
    }
}

impl CachePress for DuoAttention {
    fn after_attention(&mut self, ctx: &LayerContext, kv: &mut LayerKv) -> pare_model::Result<()> {
        if !ctx.is_prefill() {
            return Ok(());
        }
        let (layers, heads) = (self.streaming.len(), self.streaming[0].len());
        // A rank of a split model holds a block of the layer's heads.
        let (ranks, offset) = ctx.shard.map_or((1, 0), |s| (s.world_size(), s.head_offset(kv.kv_heads())));
        if ctx.num_layers != layers || kv.kv_heads() * ranks != heads {
            return Err(PressError::config(format!(
                "the DuoAttention head pattern has {layers} layers × {heads} KV heads, the model {} × {}",
                ctx.num_layers,
                kv.kv_heads() * ranks
            ))
            .into());
        }
        let mask = &self.streaming[ctx.layer][offset..offset + kv.kv_heads()];
        let heads = mask.len();
        let window = self.sink_size + self.recent_size;
        let cuts = (0..kv.batch()).any(|b| {
            (0..heads).any(|h| {
                let p = kv.positions(b, h);
                p.contains(&PAD_POSITION) || (mask[h] && p.len() > window)
            })
        });
        if !cuts {
            return Ok(());
        }
        let (sink, recent) = (self.sink_size, self.recent_size);
        keep_where(kv, |_, h, positions| {
            let real: Vec<usize> = (0..positions.len()).filter(|&i| positions[i] != PAD_POSITION).collect();
            if !mask[h] || real.len() <= window {
                return real;
            }
            real[..sink].iter().chain(&real[real.len() - recent..]).copied().collect()
        })?;
        if self.positions == PositionPolicy::Rerotate {
            make_contiguous(kv, ctx.rope)?;
        }
        Ok(())
    }

    fn next_positions(&self, layers: &[LayerKv], next: &[i64]) -> Vec<i64> {
        self.positions.next_positions(layers, next)
    }

    fn box_clone(&self) -> Box<dyn CachePress> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(scores: Vec<Vec<f32>>) -> DuoPattern {
        DuoPattern { sink_size: 2, recent_size: 3, scores, calibration: None }
    }

    #[test]
    fn the_lowest_scores_stream_and_the_count_rounds_half_to_even() {
        let p = pattern(vec![vec![0.5, 0.1], vec![0.3, 0.1]]);
        // 4 heads × 0.375 = 1.5 → 2; × 0.625 = 2.5 → 2 (Python's round); the tie at 0.1 by (layer, head).
        assert_eq!(p.streaming_mask(0.375), vec![vec![false, true], vec![false, true]]);
        assert_eq!(p.streaming_mask(0.625), p.streaming_mask(0.375));
        assert_eq!(p.streaming_mask(0.2), vec![vec![false, true], vec![false, false]]);
        assert_eq!(p.streaming_mask(1.0), vec![vec![true; 2]; 2]);
    }

    #[test]
    fn the_compression_ratio_is_kvpress_s_and_never_negative() {
        let duo =
            DuoAttention::new(&pattern(vec![vec![0.5, 0.1], vec![0.3, 0.2]]), 0.5, PositionPolicy::Original).unwrap();
        assert!((duo.compression_ratio(20) - 0.5 * 0.75).abs() < 1e-12);
        assert_eq!(duo.compression_ratio(4), 0.0);
    }

    #[test]
    fn a_pattern_file_round_trips_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("pare-duo-unit-{}.json", std::process::id()));
        let p = pattern(vec![vec![0.5, 0.1], vec![0.3, 0.2]]);
        p.save(&path).unwrap();
        assert_eq!(DuoPattern::load(&path).unwrap(), p);
        std::fs::write(&path, r#"{"sink_size": 1, "recent_size": 1, "scores": [[1.0], [1.0, 2.0]]}"#).unwrap();
        assert!(DuoPattern::load(&path).unwrap_err().to_string().contains("same number"));
        std::fs::write(&path, r#"{"sink_size": 1, "recent_size": 1, "scores": [], "extra": 1}"#).unwrap();
        assert!(DuoPattern::load(&path).unwrap_err().to_string().contains("not a head pattern"));
        std::fs::remove_file(path).unwrap();
    }
}
