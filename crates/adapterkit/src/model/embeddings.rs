//! `embeddings`: word + position + token type, then LayerNorm and dropout (and, for ELECTRA's
//! narrower embeddings, the projection to the layers' width).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::model::architecture::Architecture;
use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::layer_norm::LayerNorm;

#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    /// `None` where the architecture has no token types (DistilBERT).
    pub token_type_embeddings: Option<Embedding>,
    pub layer_norm: LayerNorm,
    /// ELECTRA's `embeddings_project` (outside `embeddings.` in its checkpoints), where the
    /// embeddings are narrower than the layers.
    pub projection: Option<Linear>,
    architecture: Architecture,
    pad_token_id: u32,
    /// `BertConfig::max_tokens`.
    max_tokens: usize,
    dropout: f32,
}

impl BertEmbeddings {
    /// Loads `embeddings.*` (and `embeddings_project.*`) under the model's root `vb`.
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let (e, h) = (config.embedding_size(), config.hidden_size);
        let own = vb.pp("embeddings");
        // In the checkpoint's order, which random weights draw in (`model::random`).
        let word_embeddings =
            candle_nn::embedding(config.vocab_size, e, own.pp("word_embeddings"))?;
        let position_embeddings = candle_nn::embedding(
            config.max_position_embeddings,
            e,
            own.pp("position_embeddings"),
        )?;
        let token_type_embeddings = match config.type_vocab_size {
            0 => None,
            types => Some(candle_nn::embedding(
                types,
                e,
                own.pp("token_type_embeddings"),
            )?),
        };
        let layer_norm = LayerNorm::load(own.pp("LayerNorm"), e, config.layer_norm_eps)?;
        let projection = match e == h {
            true => None,
            false => Some(candle_nn::linear(e, h, vb.pp("embeddings_project"))?),
        };
        Ok(Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            layer_norm,
            projection,
            architecture: config.architecture(),
            pad_token_id: config.pad_token_id as u32,
            max_tokens: config.max_tokens(),
            dropout: config.hidden_dropout_prob,
        })
    }

    /// The most tokens a sequence may hold (RoBERTa's positions start after the padding id).
    pub fn max_positions(&self) -> usize {
        self.max_tokens
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

    /// Each token's position, `[batch, seq]`: 0, 1, ... for BERT; for RoBERTa, as
    /// `transformers` numbers them from the ids (`input_ids`; without them, as it numbers
    /// `inputs_embeds`): `pad + 1` upwards over the tokens that are not padding, `pad` for those
    /// that are.
    pub fn position_ids(
        &self,
        input_ids: Option<&Tensor>,
        batch: usize,
        seq: usize,
    ) -> Result<Tensor> {
        let device = self.position_embeddings.embeddings().device();
        let max = self.max_positions();
        if seq > max {
            candle_core::bail!(
                "sequence of {seq} tokens is longer than the model's {max} positions \
                 (truncate the input)"
            );
        }
        let from = match self.architecture.positions_after_padding() {
            true => self.pad_token_id + 1,
            false => 0,
        };
        let counted = Tensor::arange(from, from + seq as u32, device)?
            .unsqueeze(0)?
            .broadcast_as((batch, seq))?;
        match input_ids.filter(|_| self.architecture.positions_after_padding()) {
            None => counted.contiguous(),
            Some(ids) => {
                let real = ids.ne(self.pad_token_id)?.to_dtype(DType::U32)?;
                let pad = Tensor::full(self.pad_token_id, (batch, seq), device)?;
                // The running count of real tokens, `pad` added.
                (real.to_dtype(DType::F32)?.cumsum(1)?.to_dtype(DType::U32)? * &real)? + pad
            }
        }
    }

    /// Adds positions and token types to already embedded words (`[batch, seq, width]`), then
    /// the LayerNorm and dropout.
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        position_ids: &Tensor,
        token_type_ids: &Tensor,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let embeds = self.summed(inputs_embeds, position_ids, token_type_ids)?;
        self.finish(&embeds, &self.layer_norm, mode)
    }

    /// Words + positions + token types, before the LayerNorm.
    pub fn summed(
        &self,
        inputs_embeds: &Tensor,
        position_ids: &Tensor,
        token_type_ids: &Tensor,
    ) -> Result<Tensor> {
        let mut embeds = inputs_embeds.add(&self.position_embeddings.forward(position_ids)?)?;
        if let Some(types) = &self.token_type_embeddings {
            embeds = embeds.add(&types.forward(token_type_ids)?)?;
        }
        Ok(embeds)
    }

    /// `layer_norm` (this one's, or one trained beside an adapter) and dropout on
    /// [`summed`](Self::summed) embeddings, then the projection where there is one.
    pub fn finish(
        &self,
        summed: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let embeds = mode.dropout(&layer_norm.forward(summed)?, self.dropout)?;
        match &self.projection {
            Some(projection) => crate::model::ops::linear(projection, &embeds),
            None => Ok(embeds),
        }
    }
}
