//! Magnitude importance (LLM-Pruner's `MagnitudeImportance`): Σ |w|^p over a row (an output
//! channel) or a column (an input channel).

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::groups::Axis;

/// Per-channel Σ |w|^p along `axis` of an (out, in) weight.
pub fn norms(weight: &Tensor, axis: Axis, p: u32) -> Result<Vec<f64>> {
    let a = weight.to_dtype(DType::F32)?.abs()?;
    let powered = if p == 1 { a } else { a.powf(p as f64)? };
    let summed = match axis {
        Axis::Rows => powered.sum(1)?,
        Axis::Cols => powered.sum(0)?,
    };
    Ok(summed.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_and_columns() {
        let w = Tensor::new(&[[1f32, -2.0], [3.0, -4.0]], &Device::Cpu).unwrap();
        assert_eq!(norms(&w, Axis::Rows, 1).unwrap(), vec![3.0, 7.0]);
        assert_eq!(norms(&w, Axis::Cols, 1).unwrap(), vec![4.0, 6.0]);
        assert_eq!(norms(&w, Axis::Rows, 2).unwrap(), vec![5.0, 25.0]);
        assert_eq!(norms(&w, Axis::Cols, 2).unwrap(), vec![10.0, 20.0]);
    }
}
