//! `BertModel`: embeddings, the stack of layers (`encoder.layer.{i}`) and the pooler.

use candle_core::{Module, Result, Tensor, Var};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::params::Params;

use crate::batch::Batch;
use crate::model::config::BertConfig;
use crate::model::dropout::Mode;
use crate::model::embeddings::BertEmbeddings;
use crate::model::hooks::LayerHooks;
use crate::model::layer::{BertLayer, Positions};
use crate::model::layer_norm::{EncoderLayerNorms, LayerNorm};
use crate::model::ops;
use crate::model::precision::Precision;

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
    /// Of the frozen blocks' products; set with [`set_precision`](Self::set_precision).
    precision: Precision,
}

impl BertModel {
    /// Loads the weights under `vb` (the checkpoint's root, or its `bert.` prefix), named as
    /// BERT names them (`load::ModelFiles` renames other architectures' weights).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let embeddings = BertEmbeddings::load(vb.clone(), config)?;
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
            precision: Precision::F32,
        })
    }

    /// The precision of the frozen blocks' matrix products (`model::precision`): in bf16 each
    /// layer packs bf16 copies of its weights now.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let device = self.embeddings.word_embeddings.embeddings().device();
        if precision != Precision::F32 && !device.is_cpu() {
            candle_core::bail!("--dtype {precision} runs on the CPU only");
        }
        self.precision = precision;
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.set_precision(precision))
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The last hidden state, `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        batch: &Batch,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        self.forward_at(batch, Positions::All, hooks, mode)
    }

    /// The last hidden state at `last`: every position, `[batch, seq, hidden]`, or the first
    /// token (`[CLS]`) alone, `[batch, 1, hidden]`, what a classification head reads, with the
    /// last layer run for that position only ([`Positions::First`]).
    pub fn forward_at(
        &self,
        batch: &Batch,
        last: Positions,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let hidden = self.embed(batch, mode)?;
        let layers = 0..self.layers.len();
        self.run_layers(hidden, &batch.attention_mask, layers, last, hooks, mode)
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
        // Positions from the batch's ids, as the ids' own embeddings get them (transformers
        // numbers RoBERTa's `inputs_embeds` as if nothing were padding).
        let (rows, seq, _) = inputs_embeds.dims3()?;
        let ids = Some(&batch.input_ids).filter(|ids| ids.dims() == [rows, seq]);
        let positions = self.embeddings.position_ids(ids, rows, seq)?;
        let hidden = (self.embeddings).forward_embeds(
            inputs_embeds,
            &positions,
            &batch.token_type_ids,
            mode,
        )?;
        self.run_layers(
            hidden,
            &batch.attention_mask,
            0..self.layers.len(),
            Positions::All,
            hooks,
            mode,
        )
    }

    /// The embeddings' output for `batch`, what layer 0 reads.
    pub fn embed(&self, batch: &Batch, mode: &mut Mode) -> Result<Tensor> {
        let summed = self.embed_summed(batch)?;
        let layer_norm = &self.embeddings.layer_norm;
        self.embeddings.finish(&summed, layer_norm, mode)
    }

    /// The embeddings for `batch` before their LayerNorm ([`BertEmbeddings::summed`]).
    pub fn embed_summed(&self, batch: &Batch) -> Result<Tensor> {
        let ids = &batch.input_ids;
        let embeds = self.embeddings.word_embeds(ids)?;
        let (rows, seq) = ids.dims2()?;
        let positions = self.embeddings.position_ids(Some(ids), rows, seq)?;
        (self.embeddings).summed(&embeds, &positions, &batch.token_type_ids)
    }

    /// Its LayerNorms (see [`EncoderLayerNorms`]).
    pub fn layer_norms(&self) -> EncoderLayerNorms {
        EncoderLayerNorms {
            embeddings: self.embeddings.layer_norm.clone(),
            layers: (self.layers.iter())
                .map(|l| {
                    [
                        l.attention.output.layer_norm.clone(),
                        l.output.layer_norm.clone(),
                    ]
                })
                .collect(),
        }
    }

    /// Runs `layers` on `hidden` (what the first of them reads), `[batch, seq, hidden]`, with
    /// the padding mask `[batch, seq]`; the last of them computes its output at `last`.
    pub fn run_layers(
        &self,
        mut hidden: Tensor,
        attention_mask: &Tensor,
        layers: std::ops::Range<usize>,
        last: Positions,
        hooks: &dyn LayerHooks,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let bias = ops::attention_bias(attention_mask)?;
        let count = layers.len();
        for (i, layer) in self.layers[layers].iter().enumerate() {
            let positions = if i + 1 == count { last } else { Positions::All };
            hidden = layer.forward(&hidden, &bias, positions, hooks, mode)?;
        }
        Ok(hidden)
    }

    /// Every tensor of the model with its checkpoint name (without a `bert.` prefix).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.clone()
            .visit_tensors_mut(&mut |name, t| out.push((name.to_string(), t.clone())));
        out
    }

    /// Makes the tensors whose checkpoint names pass `select` trainable (candle `Var`s, in
    /// place) and returns them; full fine-tuning selects all, adapter training the LayerNorms.
    pub fn make_trainable(&mut self, select: impl Fn(&str) -> bool) -> Result<Params> {
        let mut params = Params::default();
        let mut failure = None;
        self.visit_tensors_mut(&mut |name, t| {
            if !select(name) || failure.is_some() {
                return;
            }
            match Var::from_tensor(t) {
                Ok(var) => {
                    *t = var.as_tensor().clone();
                    params.push(name, var);
                }
                Err(e) => failure = Some(e),
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(params),
        }
    }

    /// A copy whose tensors are all plain (trainable ones detached): no gradient, no graph.
    pub fn frozen(&self) -> Self {
        let mut copy = self.clone();
        copy.visit_tensors_mut(&mut |_, t| *t = t.detach());
        if self.precision != Precision::F32 {
            // Detached weights are new tensors: their bf16 copies are made anew.
            copy.set_precision(self.precision)
                .expect("packing weights that packed before");
        }
        copy
    }

    /// Replaces the tensors named in `tensors` (checkpoint names), checking shapes; every
    /// name must be one of the model's.
    pub fn set_tensors(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let mut seen = 0;
        let mut error = None;
        self.visit_tensors_mut(&mut |name, t| {
            if let Some(new) = tensors.get(name) {
                seen += 1;
                if new.dims() != t.dims() {
                    error.get_or_insert(format!(
                        "tensor {name} has shape {:?}, expected {:?}",
                        new.dims(),
                        t.dims()
                    ));
                } else {
                    *t = new.clone();
                }
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        if seen != tensors.len() {
            let known: std::collections::HashSet<String> =
                self.named_tensors().into_iter().map(|(n, _)| n).collect();
            let mut unknown: Vec<&String> =
                tensors.keys().filter(|k| !known.contains(*k)).collect();
            unknown.sort();
            return Err(format!("tensors the model does not have: {unknown:?}"));
        }
        // New weights need new bf16 copies.
        self.set_precision(self.precision)
            .map_err(|e| e.to_string())
    }

    /// Calls `f` on every tensor with its name as BERT's checkpoints have it (other
    /// architectures: `Architecture::checkpoint_name` of it); `f` may replace the tensor.
    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        fn linear(name: &str, l: &mut Linear, f: &mut dyn FnMut(&str, &mut Tensor)) {
            let mut weight = l.weight().clone();
            let mut bias = l.bias().cloned();
            f(&format!("{name}.weight"), &mut weight);
            if let Some(b) = bias.as_mut() {
                f(&format!("{name}.bias"), b);
            }
            *l = Linear::new(weight, bias);
        }
        fn norm(name: &str, n: &mut LayerNorm, f: &mut dyn FnMut(&str, &mut Tensor)) {
            f(&format!("{name}.weight"), &mut n.weight);
            f(&format!("{name}.bias"), &mut n.bias);
        }
        fn embedding(name: &str, e: &mut Embedding, f: &mut dyn FnMut(&str, &mut Tensor)) {
            let mut table = e.embeddings().clone();
            let hidden = table.dims().last().copied().unwrap_or(0);
            f(&format!("embeddings.{name}.weight"), &mut table);
            *e = Embedding::new(table, hidden);
        }
        let e = &mut self.embeddings;
        embedding("word_embeddings", &mut e.word_embeddings, f);
        embedding("position_embeddings", &mut e.position_embeddings, f);
        if let Some(types) = &mut e.token_type_embeddings {
            embedding("token_type_embeddings", types, f);
        }
        norm("embeddings.LayerNorm", &mut e.layer_norm, f);
        if let Some(projection) = &mut e.projection {
            linear("embeddings_project", projection, f);
        }
        for layer in &mut self.layers {
            let p = format!("encoder.layer.{}", layer.index);
            let a = &mut layer.attention;
            linear(
                &format!("{p}.attention.self.query"),
                &mut a.self_attention.query,
                f,
            );
            linear(
                &format!("{p}.attention.self.key"),
                &mut a.self_attention.key,
                f,
            );
            linear(
                &format!("{p}.attention.self.value"),
                &mut a.self_attention.value,
                f,
            );
            linear(
                &format!("{p}.attention.output.dense"),
                &mut a.output.dense,
                f,
            );
            norm(
                &format!("{p}.attention.output.LayerNorm"),
                &mut a.output.layer_norm,
                f,
            );
            linear(
                &format!("{p}.intermediate.dense"),
                &mut layer.intermediate.dense,
                f,
            );
            linear(&format!("{p}.output.dense"), &mut layer.output.dense, f);
            norm(
                &format!("{p}.output.LayerNorm"),
                &mut layer.output.layer_norm,
                f,
            );
        }
        if let Some(pooler) = &mut self.pooler {
            linear("pooler.dense", &mut pooler.dense, f);
        }
    }

    /// Number of scalar parameters, as `transformers`' `num_parameters()` counts them.
    pub fn parameter_count(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }
}
