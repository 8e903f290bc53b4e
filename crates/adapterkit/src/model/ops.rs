//! Differentiable building blocks. candle's fused `layer_norm` and `softmax_last_dim` have no
//! backward pass, so the encoder uses these, composed from ops that candle can differentiate.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// A non-linearity, by the names `transformers` (`hidden_act`) and AdapterHub (`non_linearity`) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x * Phi(x)` (`transformers`' "gelu"; AdapterHub's legacy "gelu_orig").
    #[serde(alias = "gelu_orig")]
    Gelu,
    /// GELU's tanh approximation (`transformers`' "gelu_new" and "gelu_pytorch_tanh").
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
    /// `x * sigmoid(x)`.
    #[serde(alias = "silu")]
    Swish,
    Tanh,
}

impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluNew => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Swish => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dimension, shifted by the row maximum for stability.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    // The shift is a constant for the gradient: detaching it keeps the backward graph small.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// The additive attention bias of a padding mask: 0 where `mask` is 1, a very large negative
/// number where it is 0 (as `transformers` does with the dtype's minimum), shaped
/// `[batch, 1, 1, seq]` to broadcast over heads and query positions.
pub fn attention_bias(mask: &Tensor) -> Result<Tensor> {
    let (batch, seq) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    let bias = ((1.0 - keep)? * f32::MIN as f64)?;
    bias.reshape((batch, 1, 1, seq))
}
