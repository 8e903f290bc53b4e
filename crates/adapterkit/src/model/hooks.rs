//! The explicit points where tuning methods attach to the encoder.
//!
//! Every method (bottleneck adapters, AdapterFusion, prefix tuning, LoRA) is a [`LayerHooks`]
//! implementation; the encoder calls the hooks at fixed places and each default is what the
//! plain pre-trained model does there. No global state, no patched classes: a forward pass
//! is `model.forward(&batch, &hooks, &mut mode)`.

use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;

use crate::model::dropout::Mode;
use crate::model::layer_norm::LayerNorm;

/// Which Linear of a transformer layer a [`LayerHooks::linear`] call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearSite {
    Query,
    Key,
    Value,
    /// `attention.output.dense`
    AttentionOutput,
    /// `intermediate.dense`
    Intermediate,
    /// `output.dense`
    Output,
}

/// Key and value states of one attention layer, `[batch, heads, seq, head_dim]`, with the
/// additive mask bias over key positions, `[batch, 1, 1, seq]`.
pub struct KeyValue {
    pub key: Tensor,
    pub value: Tensor,
    pub bias: Tensor,
}

pub trait LayerHooks {
    /// Every Linear of every layer runs through here (LoRA adds its low-rank update).
    fn linear(
        &self,
        _layer: usize,
        _site: LinearSite,
        linear: &Linear,
        x: &Tensor,
        _mode: &mut Mode,
    ) -> Result<Tensor> {
        linear.forward(x)
    }

    /// Keys and values before attention scores are taken (prefix tuning prepends its own).
    fn attention_key_value(&self, _layer: usize, kv: KeyValue) -> Result<KeyValue> {
        Ok(kv)
    }

    /// After the attention output projection and its dropout; must finish the sub-layer,
    /// which the plain model does as `LayerNorm(hidden + residual)` (bottleneck adapters'
    /// `mh_adapter` position).
    fn attention_output(
        &self,
        _layer: usize,
        hidden: &Tensor,
        residual: &Tensor,
        layer_norm: &LayerNorm,
        _mode: &mut Mode,
    ) -> Result<Tensor> {
        layer_norm.forward(&(hidden + residual)?)
    }

    /// After the feed-forward output projection and its dropout; must finish the layer, as
    /// `LayerNorm(hidden + residual)` in the plain model (bottleneck adapters' `output_adapter`
    /// position, where AdapterFusion also sits).
    fn feed_forward_output(
        &self,
        _layer: usize,
        hidden: &Tensor,
        residual: &Tensor,
        layer_norm: &LayerNorm,
        _mode: &mut Mode,
    ) -> Result<Tensor> {
        layer_norm.forward(&(hidden + residual)?)
    }

    /// The finished output of a layer, before the next layer reads it.
    fn layer_output(&self, _layer: usize, hidden: Tensor, _mode: &mut Mode) -> Result<Tensor> {
        Ok(hidden)
    }
}

/// The pre-trained model as it is.
pub struct NoHooks;

impl LayerHooks for NoHooks {}
