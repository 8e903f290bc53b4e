//! `attention`: multi-head self-attention (`attention.self`) and its output projection
//! (`attention.output`).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::attention::AttentionOp;
use crate::kernels::attention_block::{
    AttentionBlockOp, PrefixValues, ProjectionChange, ProjectionChanges,
};
use crate::kernels::fused::PackedWeight;
use crate::model::architecture::Architecture;
use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::hooks::{KeyValuePrefix, LayerHooks, LinearSite, Position};
use crate::model::layer::Positions;
use crate::model::layer_norm::LayerNorm;
use crate::model::ops;
use crate::model::precision::{packed_weights, Precision};

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

    /// Attention of `queries` `[batch, q, hidden]` over the keys and values of `hidden`
    /// `[batch, seq, hidden]` (the same tensor, or its first position), behind `prefix`'s;
    /// `bias` masks them all (the prefix's positions first).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        queries: &Tensor,
        hidden: &Tensor,
        bias: &Tensor,
        prefix: Option<&KeyValuePrefix>,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let mut linear = |site, linear, x| ops::hooked_linear(hooks, layer, site, linear, x, mode);
        let query = linear(LinearSite::Query, &self.query, queries)?;
        let mut key = linear(LinearSite::Key, &self.key, hidden)?;
        let mut value = linear(LinearSite::Value, &self.value, hidden)?;
        if let Some(prefix) = prefix {
            key = Tensor::cat(&[&prefix.keys, &key], 1)?;
            value = Tensor::cat(&[&prefix.values, &value], 1)?;
        }
        ops::attention(
            &query,
            &key,
            &value,
            bias,
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
            // DistilBERT drops out nothing after its attention's projection.
            dropout: match config.architecture() {
                Architecture::Distilbert => 0.0,
                _ => config.hidden_dropout_prob,
            },
        })
    }

    /// The projection and its dropout; the residual + LayerNorm is the hooks' `sub_layer_output`.
    pub fn project(
        &self,
        layer: usize,
        attended: &Tensor,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let site = LinearSite::AttentionOutput;
        let hidden = ops::hooked_linear(hooks, layer, site, &self.dense, attended, mode)?;
        mode.dropout(&hidden, self.dropout)
    }
}

/// `attention`
#[derive(Debug, Clone)]
pub struct BertAttention {
    pub self_attention: BertSelfAttention,
    pub output: BertSelfOutput,
    /// Query, key, value and output weights in bf16 or int8 (`model::precision`).
    packed: Option<[PackedWeight; 4]>,
}

impl BertAttention {
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        Ok(Self {
            self_attention: BertSelfAttention::load(vb.pp("self"), config)?,
            output: BertSelfOutput::load(vb.pp("output"), config)?,
            packed: None,
        })
    }

    /// The precision of the frozen block's products (see `model::precision`).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let s = &self.self_attention;
        self.packed = packed_weights(precision, [&s.query, &s.key, &s.value, &self.output.dense])?;
        Ok(())
    }

    /// The sub-layer's output at `positions` of `hidden` `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        layer: usize,
        hidden: &Tensor,
        bias: &Tensor,
        positions: Positions,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let queries = match positions {
            Positions::All => hidden.clone(),
            Positions::First => hidden.narrow(1, 0, 1)?.contiguous()?,
        };
        let prefix = hooks.key_value_prefix(layer, hidden, mode)?;
        let prefix = prefix.as_ref();
        // The mask over every key, the prefix's first.
        let bias = match prefix {
            Some(p) => &Tensor::cat(&[&p.bias.to_dtype(bias.dtype())?, bias], 3)?,
            None => bias,
        };
        let frozen = self.frozen_block(layer, &queries, hidden, bias, prefix, hooks, mode)?;
        let projected = match frozen {
            Some(projected) => projected,
            None => {
                let attended = (self.self_attention)
                    .forward(layer, &queries, hidden, bias, prefix, hooks, mode)?;
                self.output.project(layer, &attended, hooks, mode)?
            }
        };
        hooks.sub_layer_output(
            layer,
            Position::Attention,
            &projected,
            &queries,
            &self.output.layer_norm,
            mode,
        )
    }

    /// Self-attention and the output projection with its dropout as one op
    /// (`kernels::attention::AttentionBlockOp`) when all four Linears are frozen (as the hooks
    /// give them: see [`ops::frozen_linears`]; the updates or scales they give q, k and v are
    /// the op's inputs, trained or not, and do not mix), the prefix (if any) tracks no gradient
    /// and meets no scale, and `hidden` is f32 on CPU; `None` otherwise. `queries` are `hidden` or its first positions; `bias` masks every
    /// key, the prefix's first. Same values, same dropout draws.
    #[allow(clippy::too_many_arguments)]
    fn frozen_block(
        &self,
        layer: usize,
        queries: &Tensor,
        hidden: &Tensor,
        bias: &Tensor,
        prefix: Option<&KeyValuePrefix>,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Option<Tensor>> {
        let s = &self.self_attention;
        let linears = [
            (LinearSite::Query, &s.query),
            (LinearSite::Key, &s.key),
            (LinearSite::Value, &s.value),
            (LinearSite::AttentionOutput, &self.output.dense),
        ];
        let (batch, seq, hidden_size) = hidden.dims3()?;
        let prefix_len = prefix.map_or(Ok(0), |p| p.keys.dim(1))?;
        let prefix_tracks =
            prefix.is_some_and(|p| p.keys.track_op() || p.values.track_op() || p.bias.track_op());
        if !ops::fused_applies(hidden)
            || prefix_tracks
            || bias.dims() != [batch, 1, 1, prefix_len + seq]
            || bias.track_op()
        {
            return Ok(None);
        }
        let packed = self.packed.as_ref();
        // The op takes no update of the output projection's (a function of the attention's
        // output, inside it).
        let Some([(q, q_change), (k, k_change), (v, v_change), (o, None)]) =
            ops::frozen_linears(hooks, layer, linears, packed)?
        else {
            return Ok(None);
        };
        let changes = [&q_change, &k_change, &v_change];
        let adds = changes
            .iter()
            .any(|c| matches!(c, Some(ops::FusedChange::Add(_))));
        let scales = changes
            .iter()
            .any(|c| matches!(c, Some(ops::FusedChange::Scale(_))));
        if scales && (adds || prefix.is_some()) {
            return Ok(None);
        }
        // In the order the node path draws their dropout: q, k, v.
        let mut change = |c: Option<ops::FusedChange>, x| {
            c.map(|c| match c {
                ops::FusedChange::Add(update) => update(x, mode).map(ProjectionChange::Add),
                ops::FusedChange::Scale(scale) => scale(mode).map(ProjectionChange::Scale),
            })
            .transpose()
        };
        let projection_changes = ProjectionChanges {
            query: change(q_change, queries)?,
            key: change(k_change, hidden)?,
            value: change(v_change, hidden)?,
        };
        let prefix = prefix
            .map(|p| PrefixValues::new(&p.keys, &p.values))
            .transpose()?;
        let querying = queries.dim(1)?;
        let mask = ops::attention_dropout(mode, s.num_heads, querying, bias, s.dropout)?;
        let attention = AttentionOp::new(s.num_heads, hidden_size, bias, mask)?;
        let dropout = mode.dropout_mask(batch * querying * hidden_size, self.output.dropout);
        let inputs: Vec<&Tensor> = ([hidden].into_iter())
            .chain(projection_changes.tensors())
            .collect();
        let activations = ops::block_activations(&inputs, packed);
        let op = AttentionBlockOp::new([q, k, v, o], attention, dropout, activations)
            .first_query_only(querying < seq)
            .with_prefix(prefix);
        op.apply(hidden, projection_changes).map(Some)
    }
}
