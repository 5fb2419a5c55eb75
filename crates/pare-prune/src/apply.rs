//! Applying a plan: rows and columns are physically removed, so the pruned model is smaller and
//! faster, and its config states the new shapes (uniform, or per layer).

use candle_core::Tensor;
use pare_model::config::LayerShapes;
use pare_model::layers::Linear;
use pare_model::Model;

use crate::error::Result;
use crate::groups::attn_kept_channels;
use crate::importance::attn_shape;
use crate::plan::PruningPlan;

fn index(ids: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), ids.len(), device)?)
}

/// Keep rows `ids` of the weight (and bias): output channels.
fn keep_rows(l: &Linear, ids: &[usize], model: &Model) -> Result<Linear> {
    let idx = index(ids, &model.device)?;
    Ok(Linear::Dense {
        weight: l.dense_weight(model.dtype)?.index_select(&idx, 0)?.contiguous()?,
        bias: l.bias().map(|b| b.index_select(&idx, 0)).transpose()?,
    })
}

/// Keep columns `ids` of the weight: input channels (the bias, per output, stays).
fn keep_cols(l: &Linear, ids: &[usize], model: &Model) -> Result<Linear> {
    let idx = index(ids, &model.device)?;
    Ok(Linear::Dense {
        weight: l.dense_weight(model.dtype)?.index_select(&idx, 1)?.contiguous()?,
        bias: l.bias().cloned(),
    })
}

/// The pruned model. The plan is validated against `model` first.
pub fn apply(model: &Model, plan: &PruningPlan) -> Result<Model> {
    plan.validate(model)?;
    let mut out = model.clone();
    for lp in &plan.layers {
        let block = &mut out.blocks[lp.layer];
        if let Some(a) = &lp.attn {
            let (q_rows, kv_rows) = attn_kept_channels(attn_shape(block), &a.kept_heads, &a.kept_kv_heads);
            let attn = &mut block.attn;
            attn.qkv = None;
            attn.q = keep_rows(&attn.q, &q_rows, model)?;
            attn.k = keep_rows(&attn.k, &kv_rows, model)?;
            attn.v = keep_rows(&attn.v, &kv_rows, model)?;
            attn.o = keep_cols(&attn.o, &q_rows, model)?;
            attn.num_heads = a.kept_heads.len();
            attn.num_kv_heads = a.kept_kv_heads.len();
        }
        if let Some(m) = &lp.mlp {
            let mlp = &mut block.mlp;
            mlp.gate_up = None;
            if let Some(gate) = &mlp.gate {
                mlp.gate = Some(keep_rows(gate, &m.kept_channels, model)?);
            }
            mlp.up = keep_rows(&mlp.up, &m.kept_channels, model)?;
            mlp.down = keep_cols(&mlp.down, &m.kept_channels, model)?;
        }
    }
    restate_shapes(&mut out);
    Ok(out)
}

/// Make the config state the layers' shapes: the uniform fields when all layers agree (an HF
/// checkpoint can express that), per-layer lists otherwise.
pub fn restate_shapes(model: &mut Model) {
    let heads: Vec<usize> = model.blocks.iter().map(|b| b.attn.num_heads).collect();
    let kv: Vec<usize> = model.blocks.iter().map(|b| b.attn.num_kv_heads).collect();
    let widths: Vec<usize> = model.blocks.iter().map(|b| b.mlp.width()).collect();
    let uniform = |v: &[usize]| v.windows(2).all(|w| w[0] == w[1]);
    let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let cfg = &mut model.config;
    cfg.num_heads = max(&heads);
    cfg.num_kv_heads = max(&kv);
    cfg.intermediate_size = max(&widths);
    cfg.layer_shapes = if uniform(&heads) && uniform(&kv) && uniform(&widths) {
        None
    } else {
        Some(LayerShapes { num_heads: heads, num_kv_heads: kv, intermediate_size: widths })
    };
}
