//! Applying a plan: rows and columns are physically removed, so the pruned model is smaller and
//! faster, and its config states the new shapes (uniform, or per layer).

use pare_model::Model;

use crate::error::Result;
use crate::plan::PruningPlan;

/// The pruned model. The plan is validated against `model` first.
pub fn apply(model: &Model, plan: &PruningPlan) -> Result<Model> {
    plan.validate(model)?;
    let mut out = model.clone();
    let dtype = model.dtype();
    for lp in &plan.layers {
        let block = out.block_mut(lp.layer);
        if let Some(a) = &lp.attn {
            block.attn.keep_heads(&a.kept_heads, &a.kept_kv_heads, dtype)?;
        }
        if let Some(m) = &lp.mlp {
            block.mlp.keep_channels(&m.kept_channels, dtype)?;
        }
    }
    out.restate_shapes();
    Ok(out)
}
