//! The explicit points where tuning methods attach to the encoder.
//!
//! Every method (bottleneck adapters, AdapterFusion, LoRA, (IA)³, prefix tuning) works through
//! [`LayerHooks`]: the encoder asks the hooks at fixed places and each default is what the
//! plain pre-trained model does there. No global state, no patched classes: a forward pass
//! is `model.forward(&batch, &hooks, &mut mode)`.

use candle_core::{Result, Tensor};
use candle_nn::Linear;

use crate::model::dropout::Mode;
use crate::model::layer_norm::LayerNorm;

/// Which Linear of a transformer layer a [`LayerHooks::linear`] call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

impl LinearSite {
    /// The Linears of the attention block, in order.
    pub const ATTENTION: [LinearSite; 4] = [
        LinearSite::Query,
        LinearSite::Key,
        LinearSite::Value,
        LinearSite::AttentionOutput,
    ];
    /// The Linears of the feed-forward block.
    pub const FEED_FORWARD: [LinearSite; 2] = [LinearSite::Intermediate, LinearSite::Output];
    /// Every Linear of a layer.
    pub const ALL: [LinearSite; 6] = [
        LinearSite::Query,
        LinearSite::Key,
        LinearSite::Value,
        LinearSite::AttentionOutput,
        LinearSite::Intermediate,
        LinearSite::Output,
    ];

    /// The Linear's module path in a layer, as the checkpoint (and AdapterHub) name it.
    pub fn module(self) -> &'static str {
        match self {
            LinearSite::Query => "attention.self.query",
            LinearSite::Key => "attention.self.key",
            LinearSite::Value => "attention.self.value",
            LinearSite::AttentionOutput => "attention.output.dense",
            LinearSite::Intermediate => "intermediate.dense",
            LinearSite::Output => "output.dense",
        }
    }
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

/// Keys and values a method puts in front of one attention layer's own (prefix tuning), each
/// `[rows, P, hidden]` (the heads side by side), with their additive mask bias `[rows, 1, 1, P]`:
/// 0 where every query may attend, a large negative value where none may (a composition pads
/// shorter prefixes so).
pub struct KeyValuePrefix {
    pub keys: Tensor,
    pub values: Tensor,
    pub bias: Tensor,
}

/// From a Linear's input `x` and output `W x + b` to the output the layer goes on with.
pub type OutputChange<'a> = Box<dyn Fn(&Tensor, Tensor, &mut Mode) -> Result<Tensor> + 'a>;

/// From a Linear's input `x` to what is added to its output `W x + b`.
pub type OutputUpdate<'a> = Box<dyn Fn(&Tensor, &mut Mode) -> Result<Tensor> + 'a>;

/// The vector `[out]` a Linear's output is multiplied by, which does not depend on the input.
pub type OutputScale<'a> = Box<dyn Fn(&mut Mode) -> Result<Tensor> + 'a>;

/// A method's change to one Linear.
pub enum LinearChange<'a> {
    /// Applied to the Linear's output (a composition of modules mixes).
    Apply(OutputChange<'a>),
    /// The Linear's output times a vector (an (IA)³ vector): the fused attention op takes the
    /// scales of q, k and v as inputs, the feed-forward op the expansion's.
    Scale(OutputScale<'a>),
    /// Added to the Linear's output, a function of its input alone (a LoRA's low-rank update):
    /// the fused attention op takes the updates of q, k and v as inputs, so a trained LoRA
    /// there keeps the block fused.
    Add(OutputUpdate<'a>),
    /// The same Linear with other weights for this pass: frozen LoRA and (IA)³ modules folded
    /// in (plain tensors), which the fused block ops run as they run the bare model.
    Weights(Linear),
}

pub trait LayerHooks {
    /// What the hooks do to `site`'s Linear in `layer` (`base`: its weights); `None` leaves it
    /// alone. The encoder asks before it picks a path: a block whose Linears are left alone or
    /// given other weights (or updates and scales the fused ops take: see [`LinearChange`]) may
    /// run as one fused op, any other change sends it node by node through the change. So a change
    /// cannot be skipped, and there is nothing else to keep in step with it.
    fn linear(&self, _layer: usize, _site: LinearSite, _base: &Linear) -> Option<LinearChange<'_>> {
        None
    }

    /// What the hooks put in front of `layer`'s keys and values, given the layer's input
    /// `[rows, seq, hidden]` (which a prefix's gate reads); `None` puts nothing there. Asked once
    /// per layer and pass, before the attention block picks its path: both take the prefix, the
    /// fused op as plain values when it tracks no gradient.
    fn key_value_prefix(
        &self,
        _layer: usize,
        _input: &Tensor,
        _mode: &mut Mode,
    ) -> Result<Option<KeyValuePrefix>> {
        Ok(None)
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
