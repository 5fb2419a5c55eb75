//! Reducing a group's member contributions to one score per root channel, and root channels to
//! units (LLM-Pruner's `_reduce` and MetaPruner's consecutive-group sum).

use serde::{Deserialize, Serialize};

use crate::error::{PruneError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    Sum,
    Mean,
    Max,
}

impl Reduction {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            "max" => Ok(Reduction::Max),
            other => Err(PruneError::input(format!("unknown `reduction` {other:?} (expected sum, mean or max)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Reduction::Sum => "sum",
            Reduction::Mean => "mean",
            Reduction::Max => "max",
        }
    }

    /// Reduce aligned member vectors (all of root length) channel by channel.
    pub fn reduce(self, members: &[Vec<f64>]) -> Vec<f64> {
        let n = members.first().map_or(0, Vec::len);
        (0..n)
            .map(|c| {
                let values = members.iter().map(|m| m[c]);
                match self {
                    Reduction::Sum => values.sum(),
                    Reduction::Mean => values.sum::<f64>() / members.len() as f64,
                    Reduction::Max => values.fold(f64::NEG_INFINITY, f64::max),
                }
            })
            .collect()
    }
}

/// Sum consecutive runs of `width` root channels into unit scores.
pub fn units(root: &[f64], width: usize) -> Vec<f64> {
    root.chunks(width).map(|c| c.iter().sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions() {
        let m = vec![vec![1.0, 4.0], vec![3.0, 2.0]];
        assert_eq!(Reduction::Sum.reduce(&m), vec![4.0, 6.0]);
        assert_eq!(Reduction::Mean.reduce(&m), vec![2.0, 3.0]);
        assert_eq!(Reduction::Max.reduce(&m), vec![3.0, 4.0]);
        assert_eq!(units(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3), vec![6.0, 15.0]);
        assert!(Reduction::parse("prod").is_err());
    }
}
