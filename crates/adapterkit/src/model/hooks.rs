//! The explicit points where tuning methods attach to the encoder.
//!
//! Every method (bottleneck adapters, AdapterFusion, prefix tuning, LoRA) is a [`LayerHooks`]
//! implementation; the encoder calls the hooks at fixed places and each default is what the
//! plain pre-trained model does there. No global state, no patched classes: a forward pass
//! is `model.forward(&batch, &hooks, &mut mode)`.

use candle_core::{Result, Tensor};
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

/// Which sub-layer of a transformer layer a [`LayerHooks::sub_layer_output`] call ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// Multi-head attention: `attention.output`.
    Attention,
    /// The feed-forward block: `output`.
    Output,
}

impl Position {
    pub const BOTH: [Position; 2] = [Position::Attention, Position::Output];

    /// The module path AdapterHub (and the checkpoint) use for this place in a layer.
    pub fn module(self) -> &'static str {
        match self {
            Position::Attention => "attention.output",
            Position::Output => "output",
        }
    }

    /// 0 for attention, 1 for the feed-forward block.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Key and value states of one attention layer, `[batch, seq, hidden]` (the heads side by side),
/// with the additive mask bias over key positions, `[batch, 1, 1, seq]`.
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
        crate::model::ops::linear(linear, x)
    }

    /// Whether `linear` and `attention_key_value` are the defaults for `layer`, so that the
    /// encoder may run a frozen block of its projections (attention, the feed-forward block)
    /// as one fused op that calls neither. An implementation that overrides either must
    /// return false for the layers it changes.
    fn plain_projections(&self, _layer: usize) -> bool {
        true
    }

    /// Keys and values before attention scores are taken (prefix tuning prepends its own).
    fn attention_key_value(&self, _layer: usize, kv: KeyValue) -> Result<KeyValue> {
        Ok(kv)
    }

    /// After a sub-layer's output projection and its dropout (`hidden`), with the sub-layer's
    /// input (`residual`); must finish the sub-layer, which the plain model does as
    /// `LayerNorm(hidden + residual)`. Bottleneck adapters sit here (`mh_adapter` after
    /// attention, `output_adapter` after the feed-forward block), and AdapterFusion with them.
    fn sub_layer_output(
        &self,
        _layer: usize,
        _position: Position,
        hidden: &Tensor,
        residual: &Tensor,
        layer_norm: &LayerNorm,
        _mode: &mut Mode,
    ) -> Result<Tensor> {
        layer_norm.of_sum(&[hidden, residual])
    }

    /// The finished output of a layer, before the next layer reads it.
    fn layer_output(&self, _layer: usize, hidden: Tensor, _mode: &mut Mode) -> Result<Tensor> {
        Ok(hidden)
    }
}

/// The pre-trained model as it is.
pub struct NoHooks;

impl LayerHooks for NoHooks {}
