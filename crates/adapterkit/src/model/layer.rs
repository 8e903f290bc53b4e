//! `encoder.layer.{i}`: attention, then the feed-forward block (`intermediate` + `output`).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::feed_forward::FeedForwardOp;
use crate::kernels::fused::PackedWeight;
use crate::model::attention::BertAttention;
use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::hooks::{LayerHooks, LinearSite, Position};
use crate::model::layer_norm::LayerNorm;
use crate::model::ops::{self, Activation};
use crate::model::precision::{packed_weights, Precision};

/// The positions a layer computes its output at. A classification head reads the first
/// token's state alone (`[CLS]`), so the last layer need not compute the others: with `First`
/// its queries, output projections, feed-forward block and adapters run on one row per
/// sequence instead of `seq` (keys and values still cover every token), and its output is
/// `[batch, 1, hidden]`, the first token's state as `All` would give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    All,
    First,
}

/// `intermediate`: the feed-forward block's expansion and non-linearity.
#[derive(Debug, Clone)]
pub struct BertIntermediate {
    pub dense: Linear,
    pub activation: Activation,
}

/// `output`: the feed-forward block's projection back, dropout, residual + LayerNorm.
#[derive(Debug, Clone)]
pub struct BertOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    dropout: f32,
}

#[derive(Debug, Clone)]
pub struct BertLayer {
    pub index: usize,
    pub attention: BertAttention,
    pub intermediate: BertIntermediate,
    pub output: BertOutput,
    /// The feed-forward block's weights in bf16 or int8 (`model::precision`).
    packed: Option<[PackedWeight; 2]>,
}

impl BertLayer {
    pub fn load(vb: VarBuilder, config: &BertConfig, index: usize) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            index,
            attention: BertAttention::load(vb.pp("attention"), config)?,
            intermediate: BertIntermediate {
                dense: candle_nn::linear(h, i, vb.pp("intermediate").pp("dense"))?,
                activation: config.hidden_act,
            },
            output: BertOutput {
                dense: candle_nn::linear(i, h, vb.pp("output").pp("dense"))?,
                layer_norm: LayerNorm::load(
                    vb.pp("output").pp("LayerNorm"),
                    h,
                    config.layer_norm_eps,
                )?,
                dropout: config.hidden_dropout_prob,
            },
            packed: None,
        })
    }

    /// The precision of the frozen blocks' products (see `model::precision`).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.attention.set_precision(precision)?;
        let linears = [&self.intermediate.dense, &self.output.dense];
        self.packed = packed_weights(precision, linears)?;
        Ok(())
    }

    /// `hidden`: `[batch, seq, hidden]`; `bias`: the additive attention mask `[batch, 1, 1, seq]`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        bias: &Tensor,
        positions: Positions,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let layer = self.index;
        let attended = self
            .attention
            .forward(layer, hidden, bias, positions, hooks, mode)?;
        let projected = match self.frozen_feed_forward(&attended, hooks, mode)? {
            Some(projected) => projected,
            None => self.feed_forward(&attended, hooks, mode)?,
        };
        let out = hooks.sub_layer_output(
            layer,
            Position::Output,
            &projected,
            &attended,
            &self.output.layer_norm,
            mode,
        )?;
        hooks.layer_output(layer, out, mode)
    }

    /// `dropout(output(activation(intermediate(x))))`, node by node.
    fn feed_forward(&self, x: &Tensor, hooks: &dyn LayerHooks, mode: &mut Mode) -> Result<Tensor> {
        let mut linear =
            |site, linear, x: &Tensor| ops::hooked_linear(hooks, self.index, site, linear, x, mode);
        let expanded = linear(LinearSite::Intermediate, &self.intermediate.dense, x)?;
        let expanded = self.intermediate.activation.forward(&expanded)?;
        let projected = linear(LinearSite::Output, &self.output.dense, &expanded)?;
        mode.dropout(&projected, self.output.dropout)
    }

    /// [`feed_forward`](Self::feed_forward) as one op (`kernels::feed_forward`) when its
    /// weights are frozen (as the hooks give them, the expansion scaled at most: see
    /// [`ops::frozen_linears`]), its activation is GELU and `x` is f32 on CPU; `None`
    /// otherwise. Same values, same dropout draws.
    fn frozen_feed_forward(
        &self,
        x: &Tensor,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Option<Tensor>> {
        if self.intermediate.activation != Activation::Gelu || !ops::fused_applies(x) {
            return Ok(None);
        }
        let linears = [
            (LinearSite::Intermediate, &self.intermediate.dense),
            (LinearSite::Output, &self.output.dense),
        ];
        let packed = self.packed.as_ref();
        // The op takes a scale of the expansion, no update: a Linear with one (or a change to
        // the projection, whose input is inside the op) runs the block node by node.
        let Some([(expand, change), (project, None)]) =
            ops::frozen_linears(hooks, self.index, linears, packed)?
        else {
            return Ok(None);
        };
        let scale = match change {
            None => None,
            Some(ops::FusedChange::Scale(scale)) => Some(scale(mode)?),
            Some(ops::FusedChange::Add(_)) => return Ok(None),
        };
        let dropout = mode.dropout_mask(x.elem_count(), self.output.dropout);
        let inputs: Vec<&Tensor> = [x].into_iter().chain(&scale).collect();
        let activations = ops::block_activations(&inputs, packed);
        let op = FeedForwardOp::new(expand, project, dropout, activations);
        op.apply(x, scale.as_ref()).map(Some)
    }
}
