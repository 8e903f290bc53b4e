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
    head_dim: usize,
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
            head_dim: config.head_dim(),
            dropout: config.attention_probs_dropout_prob,
        })
    }

    /// `[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]`
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        x.reshape((batch, seq, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    pub fn forward(
        &self,
        layer: usize,
        hidden: &Tensor,
        bias: &Tensor,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let (batch, seq, hidden_size) = hidden.dims3()?;
        let project = |site, linear: &Linear, mode: &mut Mode| {
            self.split_heads(&hooks.linear(layer, site, linear, hidden, mode)?)
        };
        let query = project(LinearSite::Query, &self.query, mode)?;
        let kv = KeyValue {
            key: project(LinearSite::Key, &self.key, mode)?,
            value: project(LinearSite::Value, &self.value, mode)?,
            bias: bias.clone(),
        };
        let KeyValue { key, value, bias } = hooks.attention_key_value(layer, kv)?;

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = query.matmul(&key.t()?.contiguous()?)?;
        let probs = ops::attention_probs(&scores, &bias, scale, self.dropout, mode)?;
        probs
            .matmul(&value)?
            .transpose(1, 2)?
            .reshape((batch, seq, hidden_size))
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
