//! The closed-form prefill estimates of the design documents and of FastV, evaluated layer by
//! layer on the same per-layer sequence lengths as the exact count, so that they can be put
//! side by side with it.

use std::str::FromStr;

use serde::Serialize;

use crate::error::{FlopsError, Result};
use crate::flops::TextShapes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Formula {
    /// pare's count from the model's shapes (`flops::analyze`).
    Exact,
    /// Attention scores only: 4·s²·h per layer (the design notes' FastV estimate).
    Attention,
    /// The transformer-FLOPs lecture rule: 24·b·s·h² + 4·b·s²·h per layer (MHA, a 4h MLP), b = 1.
    Lecture,
    /// FastV: 4·n·d² + 2·n²·d + 2·n·d·m per layer.
    Fastv,
}

impl FromStr for Formula {
    type Err = FlopsError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(Formula::Exact),
            "attention" => Ok(Formula::Attention),
            "lecture" => Ok(Formula::Lecture),
            "fastv" => Ok(Formula::Fastv),
            other => Err(FlopsError::input(format!("unknown `formula` {other:?} (exact, attention, lecture, fastv)"))),
        }
    }
}

impl Formula {
    /// The `--formula` name.
    pub fn name(self) -> &'static str {
        match self {
            Formula::Exact => "exact",
            Formula::Attention => "attention",
            Formula::Lecture => "lecture",
            Formula::Fastv => "fastv",
        }
    }

    /// The formula as written, for reports.
    pub fn expression(self) -> &'static str {
        match self {
            Formula::Exact => "matmuls of the model's shapes",
            Formula::Attention => "Σ_layers 4·s²·h",
            Formula::Lecture => "Σ_layers 24·s·h² + 4·s²·h",
            Formula::Fastv => "Σ_layers 4·n·d² + 2·n²·d + 2·n·d·m",
        }
    }

    /// The prefill estimate for per-layer lengths `seq` (None for `Exact`, which is not a formula).
    pub fn prefill(self, shapes: &TextShapes, seq: &[usize]) -> Option<u64> {
        let h = shapes.hidden as u64;
        let per_layer = |s: u64, m: u64| -> u64 {
            match self {
                Formula::Exact => 0,
                Formula::Attention => 4 * s * s * h,
                Formula::Lecture => 24 * s * h * h + 4 * s * s * h,
                Formula::Fastv => 4 * s * h * h + 2 * s * s * h + 2 * s * h * m,
            }
        };
        if self == Formula::Exact {
            return None;
        }
        Some(shapes.layers.iter().zip(seq).map(|(l, &s)| per_layer(s as u64, l.mlp_width as u64)).sum())
    }
}
