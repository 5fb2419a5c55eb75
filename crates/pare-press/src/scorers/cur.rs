//! CURPress (CurDKV, arXiv 2509.15038): approximate leverage scores of keys and values. Each
//! entry's squared key norm and squared value norm, normalized within local blocks of 16
//! entries, multiplied, and normalized over the head; the first `sinks` entries score 1 (kept).
//! kvpress's defaults: kv_product leverage, local approximation, no random projection.
//! Query-agnostic.

use crate::error::Result;
use crate::observation::{per_head_on_host, Observation};
use crate::scorer::Scorer;

#[derive(Debug, Clone)]
pub struct Cur {
    pub sinks: usize,
    pub block: usize,
}

impl Default for Cur {
    fn default() -> Self {
        Cur { sinks: 4, block: 16 }
    }
}

/// Squared row norms of `rows` (entries × d), each divided by the sum over its block.
fn block_leverage(rows: &[f32], d: usize, block: usize) -> Vec<f32> {
    let sq: Vec<f32> = rows.chunks(d).map(|r| r.iter().map(|x| x * x).sum()).collect();
    sq.chunks(block)
        .flat_map(|b| {
            let total: f32 = b.iter().sum();
            b.iter().map(move |x| x / total)
        })
        .collect()
}

impl Cur {
    fn head_scores(&self, keys: &[f32], values: &[f32], d: usize) -> Vec<f32> {
        let k2 = block_leverage(keys, d, self.block);
        let v2 = block_leverage(values, d, self.block);
        let product: Vec<f32> = k2.iter().zip(&v2).map(|(k, v)| k * v).collect();
        let total: f32 = product.iter().sum();
        product.iter().enumerate().map(|(i, p)| if i < self.sinks { 1.0 } else { p / total }).collect()
    }
}

impl Scorer for Cur {
    fn score(&self, obs: &Observation) -> Result<Vec<Vec<f32>>> {
        per_head_on_host(obs, |k, v, d| self.head_scores(k, v, d))
    }

    fn box_clone(&self) -> Box<dyn Scorer> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leverage_is_normalized_per_block_and_sinks_score_one() {
        let cur = Cur { sinks: 1, block: 2 };
        // Rows of norm² 1, 3, 2, 2, 5 (d = 1 would hide the sum over channels: d = 2).
        let keys = [1.0, 0.0, 1.0, 2f32.sqrt(), 1.0, 1.0, 1.0, 1.0, 1.0, 2.0];
        let s = cur.head_scores(&keys, &keys, 2);
        // Block leverage 1/4, 3/4, 1/2, 1/2, 1; squared: 1/16, 9/16, 4/16, 4/16, 16/16, normalized
        // over all 34/16 (the sink included) before the sink is set to 1.
        let want = [1.0, 9.0 / 34.0, 4.0 / 34.0, 4.0 / 34.0, 16.0 / 34.0];
        assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{s:?}");
    }
}
