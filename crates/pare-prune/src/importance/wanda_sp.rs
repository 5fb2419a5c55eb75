//! Wanda-SP (the structured Wanda of the FLAP paper): |W| weighted by the L2 norm of each input
//! feature over the calibration tokens. A row (output channel) scores Σⱼ |W_cj|·‖X_j‖; a column
//! (input channel c) scores ‖X_c‖·Σᵢ |W_ic|.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use pare_model::Model;

use crate::error::{PruneError, Result};
use crate::groups::{Axis, Role};
use pare_model::diff::{DiffModel, Probe};

/// ‖X_j‖ per input feature of every linear map's input, keyed by (layer, input role): Q for
/// q/k/v, O, Gate for gate/up (Up when there is no gate), Down.
pub struct InputNorms(HashMap<(usize, Role), Tensor>);

pub fn input_norms(model: &Model, samples: &[Vec<u32>], mut progress: impl FnMut(usize, usize)) -> Result<InputNorms> {
    if samples.is_empty() {
        return Err(PruneError::input("Wanda-SP needs calibration samples"));
    }
    let diff = DiffModel::new(model, DType::F32, |_, _| false)?;
    let mut probe = Probe { record_inputs: true, ..Probe::default() };
    for (i, ids) in samples.iter().enumerate() {
        diff.forward(ids, &mut probe)?;
        progress(i + 1, samples.len());
    }
    let norms = probe.input_sq_sums.into_iter().map(|(k, v)| Ok((k, v.sqrt()?))).collect::<Result<HashMap<_, _>>>()?;
    Ok(InputNorms(norms))
}

impl InputNorms {
    /// The input a role reads.
    fn input_of(role: Role, gated: bool) -> Role {
        match role {
            Role::Q | Role::K | Role::V => Role::Q,
            Role::O => Role::O,
            Role::Gate => Role::Gate,
            Role::Up => {
                if gated {
                    Role::Gate
                } else {
                    Role::Up
                }
            }
            Role::Down => Role::Down,
        }
    }

    pub fn norms(&self, weight: &Tensor, layer: usize, role: Role, axis: Axis, gated: bool) -> Result<Vec<f64>> {
        let x = self
            .0
            .get(&(layer, Self::input_of(role, gated)))
            .ok_or_else(|| PruneError::input(format!("no activation statistics for layer {layer} {}", role.name())))?;
        let w = weight.to_dtype(DType::F64)?.abs()?;
        let v = match axis {
            Axis::Rows => w.broadcast_mul(&x.unsqueeze(0)?)?.sum(1)?,
            Axis::Cols => (w.sum(0)? * x)?,
        };
        Ok(v.to_vec1::<f64>()?)
    }
}
