//! LLaVA's multimodal projector: two linear layers with a GELU between them, mapping vision
//! features into the language model's embedding space.

use candle_core::Tensor;
use pare_model::layers::Linear;

use crate::clip::VisionActivation;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Projector {
    pub linear_1: Linear,
    pub activation: VisionActivation,
    pub linear_2: Linear,
}

impl Projector {
    /// (…, vision features) → (…, text hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.activation.apply(&self.linear_1.forward(x)?)?;
        Ok(self.linear_2.forward(&h)?)
    }

    pub fn param_count(&self) -> usize {
        self.linear_1.param_count() + self.linear_2.param_count()
    }
}
