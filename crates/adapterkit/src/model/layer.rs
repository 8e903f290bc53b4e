//! `encoder.layer.{i}`: attention, then the feed-forward block (`intermediate` + `output`).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::model::attention::BertAttention;
use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::hooks::{LayerHooks, LinearSite, Position};
use crate::model::layer_norm::LayerNorm;
use crate::model::ops::Activation;

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
        })
    }

    /// `hidden`: `[batch, seq, hidden]`; `bias`: the additive attention mask `[batch, 1, 1, seq]`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        bias: &Tensor,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let layer = self.index;
        let attended = self.attention.forward(layer, hidden, bias, hooks, mode)?;

        let expanded = hooks.linear(
            layer,
            LinearSite::Intermediate,
            &self.intermediate.dense,
            &attended,
            mode,
        )?;
        let expanded = self.intermediate.activation.forward(&expanded)?;
        let projected = hooks.linear(
            layer,
            LinearSite::Output,
            &self.output.dense,
            &expanded,
            mode,
        )?;
        let projected = mode.dropout(&projected, self.output.dropout)?;
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
}
