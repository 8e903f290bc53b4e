//! `attention`: multi-head self-attention (`attention.self`) and its output projection
//! (`attention.output`).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::hooks::{KeyValue, LayerHooks, LinearSite, Position};
use crate::model::layer_norm::LayerNorm;
use crate::model::ops;

/// `attention.self`: query, key and value projections and scaled dot-product attention.
#[derive(Debug, Clone)]
pub struct BertSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    num_heads: usize,
    dropout: f32,
}

impl BertSelfAttention {
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            query: candle_nn::linear(h, h, vb.pp("query"))?,
            key: candle_nn::linear(h, h, vb.pp("key"))?,
            value: candle_nn::linear(h, h, vb.pp("value"))?,
            num_heads: config.num_attention_heads,
            dropout: config.attention_probs_dropout_prob,
        })
    }

    pub fn forward(
        &self,
        layer: usize,
        hidden: &Tensor,
        bias: &Tensor,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let query = hooks.linear(layer, LinearSite::Query, &self.query, hidden, mode)?;
        let kv = KeyValue {
            key: hooks.linear(layer, LinearSite::Key, &self.key, hidden, mode)?,
            value: hooks.linear(layer, LinearSite::Value, &self.value, hidden, mode)?,
            bias: bias.clone(),
        };
        let KeyValue { key, value, bias } = hooks.attention_key_value(layer, kv)?;
        ops::attention(
            &query,
            &key,
            &value,
            &bias,
            self.num_heads,
            self.dropout,
            mode,
        )
    }
}

/// `attention.output`: projection, dropout, then residual + LayerNorm (through the hook).
#[derive(Debug, Clone)]
pub struct BertSelfOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    dropout: f32,
}

impl BertSelfOutput {
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            dense: candle_nn::linear(h, h, vb.pp("dense"))?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), h, config.layer_norm_eps)?,
            dropout: config.hidden_dropout_prob,
        })
    }

    pub fn forward(
        &self,
        layer: usize,
        attended: &Tensor,
        residual: &Tensor,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let hidden = hooks.linear(
            layer,
            LinearSite::AttentionOutput,
            &self.dense,
            attended,
            mode,
        )?;
        let hidden = mode.dropout(&hidden, self.dropout)?;
        hooks.sub_layer_output(
            layer,
            Position::Attention,
            &hidden,
            residual,
            &self.layer_norm,
            mode,
        )
    }
}

/// `attention`
#[derive(Debug, Clone)]
pub struct BertAttention {
    pub self_attention: BertSelfAttention,
    pub output: BertSelfOutput,
}

impl BertAttention {
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Ok(Self {
            self_attention: BertSelfAttention::load(vb.pp("self"), config)?,
            output: BertSelfOutput::load(vb.pp("output"), config)?,
        })
    }

    pub fn forward(
        &self,
        layer: usize,
        hidden: &Tensor,
        bias: &Tensor,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let attended = self
            .self_attention
            .forward(layer, hidden, bias, hooks, mode)?;
        self.output.forward(layer, &attended, hidden, hooks, mode)
    }
}
