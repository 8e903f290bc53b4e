//! `BertModel`: embeddings, the stack of layers (`encoder.layer.{i}`) and the pooler.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::batch::Batch;
use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::embeddings::BertEmbeddings;
use crate::model::hooks::LayerHooks;
use crate::model::layer::BertLayer;
use crate::model::layer_norm::LayerNorm;
use crate::model::ops;

/// `pooler`: tanh of a projection of the first (`[CLS]`) token.
#[derive(Debug, Clone)]
pub struct BertPooler {
    pub dense: Linear,
}

impl BertPooler {
    pub fn forward(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        let first = last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
        self.dense.forward(&first)?.tanh()
    }
}

#[derive(Debug, Clone)]
pub struct BertModel {
    pub config: BertConfig,
    pub embeddings: BertEmbeddings,
    /// `encoder.layer`
    pub layers: Vec<BertLayer>,
    /// Present when the checkpoint has `pooler.dense.*`.
    pub pooler: Option<BertPooler>,
}

impl BertModel {
    /// Loads the weights under `vb` (the checkpoint's root, or its `bert.` prefix).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let embeddings = BertEmbeddings::load(vb.pp("embeddings"), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp("encoder").pp("layer").pp(i), config, i))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if vb.contains_tensor("pooler.dense.weight") {
            let h = config.hidden_size;
            Some(BertPooler {
                dense: candle_nn::linear(h, h, vb.pp("pooler").pp("dense"))?,
            })
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            embeddings,
            layers,
            pooler,
        })
    }

    /// The last hidden state, `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        batch: &Batch,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let embeds = self.embeddings.word_embeds(&batch.input_ids)?;
        self.forward_embeds(&embeds, batch, hooks, mode)
    }

    /// As [`forward`](Self::forward), from word embeddings `[batch, seq, hidden]` instead of ids
    /// (`transformers`' `inputs_embeds`); `batch` gives the token types and the padding mask.
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        batch: &Batch,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let mut hidden =
            self.embeddings
                .forward_embeds(inputs_embeds, &batch.token_type_ids, mode)?;
        let bias = ops::attention_bias(&batch.attention_mask)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &bias, hooks, mode)?;
        }
        Ok(hidden)
    }

    /// Every tensor of the model with its checkpoint name (without a `bert.` prefix).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let push_linear = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        let push_norm = |out: &mut Vec<(String, Tensor)>, name: String, n: &LayerNorm| {
            out.push((format!("{name}.weight"), n.weight.clone()));
            out.push((format!("{name}.bias"), n.bias.clone()));
        };
        let e = &self.embeddings;
        for (name, emb) in [
            ("word_embeddings", &e.word_embeddings),
            ("position_embeddings", &e.position_embeddings),
            ("token_type_embeddings", &e.token_type_embeddings),
        ] {
            out.push((
                format!("embeddings.{name}.weight"),
                emb.embeddings().clone(),
            ));
        }
        push_norm(&mut out, "embeddings.LayerNorm".into(), &e.layer_norm);
        for layer in &self.layers {
            let p = format!("encoder.layer.{}", layer.index);
            let a = &layer.attention;
            push_linear(
                &mut out,
                format!("{p}.attention.self.query"),
                &a.self_attention.query,
            );
            push_linear(
                &mut out,
                format!("{p}.attention.self.key"),
                &a.self_attention.key,
            );
            push_linear(
                &mut out,
                format!("{p}.attention.self.value"),
                &a.self_attention.value,
            );
            push_linear(
                &mut out,
                format!("{p}.attention.output.dense"),
                &a.output.dense,
            );
            push_norm(
                &mut out,
                format!("{p}.attention.output.LayerNorm"),
                &a.output.layer_norm,
            );
            push_linear(
                &mut out,
                format!("{p}.intermediate.dense"),
                &layer.intermediate.dense,
            );
            push_linear(&mut out, format!("{p}.output.dense"), &layer.output.dense);
            push_norm(
                &mut out,
                format!("{p}.output.LayerNorm"),
                &layer.output.layer_norm,
            );
        }
        if let Some(pooler) = &self.pooler {
            push_linear(&mut out, "pooler.dense".into(), &pooler.dense);
        }
        out
    }

    /// Number of scalar parameters, as `transformers`' `num_parameters()` counts them.
    pub fn parameter_count(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }
}
