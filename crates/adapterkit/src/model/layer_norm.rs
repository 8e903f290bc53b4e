//! LayerNorm with a backward pass (candle's fused one has none).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::ops;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    /// The same LayerNorm with plain tensors (no gradient, no graph).
    pub fn frozen(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
