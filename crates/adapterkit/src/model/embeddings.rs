//! `embeddings`: word + position + token type, then LayerNorm and dropout.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::layer_norm::LayerNorm;

#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    dropout: f32,
}

impl BertEmbeddings {
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            word_embeddings: candle_nn::embedding(config.vocab_size, h, vb.pp("word_embeddings"))?,
            position_embeddings: candle_nn::embedding(
                config.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: candle_nn::embedding(
                config.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), h, config.layer_norm_eps)?,
            dropout: config.hidden_dropout_prob,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.position_embeddings.embeddings().dim(0).unwrap_or(0)
    }

    /// The word embeddings of `input_ids` (`[batch, seq]`), checked against the vocabulary.
    pub fn word_embeds(&self, input_ids: &Tensor) -> Result<Tensor> {
        let vocab = self.word_embeddings.embeddings().dim(0)?;
        let max_id = input_ids.flatten_all()?.max(0)?.to_dtype(DType::U32)?;
        let max_id = max_id.to_scalar::<u32>()? as usize;
        if input_ids.elem_count() > 0 && max_id >= vocab {
            candle_core::bail!("token id {max_id} is outside the vocabulary of {vocab} tokens");
        }
        self.word_embeddings.forward(input_ids)
    }

    /// Adds positions and token types to already embedded words (`[batch, seq, hidden]`), then
    /// the LayerNorm and dropout.
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        token_type_ids: &Tensor,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let embeds = self.summed(inputs_embeds, token_type_ids)?;
        self.finish(&embeds, &self.layer_norm, mode)
    }

    /// Words + positions + token types, before the LayerNorm.
    pub fn summed(&self, inputs_embeds: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let (_, seq, _) = inputs_embeds.dims3()?;
        let max = self.max_positions();
        if seq > max {
            candle_core::bail!(
                "sequence of {seq} tokens is longer than the model's {max} positions \
                 (truncate the input)"
            );
        }
        let positions = Tensor::arange(0u32, seq as u32, inputs_embeds.device())?;
        let embeds = inputs_embeds
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?
            .add(&self.token_type_embeddings.forward(token_type_ids)?)?;
        Ok(embeds)
    }

    /// `layer_norm` (this one's, or one trained beside an adapter) and dropout on
    /// [`summed`](Self::summed) embeddings.
    pub fn finish(
        &self,
        summed: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        mode.dropout(&layer_norm.forward(summed)?, self.dropout)
    }
}
