//! How many entries a press keeps.

use crate::error::{PressError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Remove this fraction of the entries (kvpress's `compression_ratio`), in [0, 1).
    Ratio(f64),
    /// Keep at most this many entries per (row, KV head).
    Entries(usize),
}

impl Budget {
    pub fn ratio(r: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&r) || r.is_nan() {
            return Err(PressError::config(format!("`ratio` must be in [0, 1), got {r}")));
        }
        Ok(Budget::Ratio(r))
    }

    pub fn entries(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(PressError::config("`budget` must be at least 1 entry"));
        }
        Ok(Budget::Entries(n))
    }

    /// Entries kept out of `n`, rounded down as kvpress does (`int(n * (1 - ratio))`).
    pub fn kept(&self, n: usize) -> usize {
        match *self {
            Budget::Ratio(r) => ((n as f64) * (1.0 - r)) as usize,
            Budget::Entries(k) => k.min(n),
        }
    }

    /// The fraction removed from `n` entries (for presses whose rule is written as a ratio).
    pub fn ratio_of(&self, n: usize) -> f64 {
        match *self {
            Budget::Ratio(r) => r,
            Budget::Entries(k) if n > 0 => 1.0 - k.min(n) as f64 / n as f64,
            Budget::Entries(_) => 0.0,
        }
    }

    /// Nothing is ever removed: the press must leave logits exactly as without it.
    pub fn is_noop(&self) -> bool {
        matches!(*self, Budget::Ratio(r) if r == 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_rounds_down_like_kvpress() {
        assert_eq!(Budget::Ratio(0.5).kept(301), 150);
        assert_eq!(Budget::Ratio(0.25).kept(300), 225);
        assert_eq!(Budget::Entries(64).kept(30), 30);
        assert!(Budget::ratio(1.0).is_err());
        assert!(Budget::ratio(-0.1).is_err());
        assert!(Budget::entries(0).is_err());
        assert!((Budget::Entries(75).ratio_of(300) - 0.75).abs() < 1e-12);
    }
}
