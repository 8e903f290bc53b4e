//! Several trained adapters (and fusions) on one encoder under a composition setup: what
//! `predict --setup` runs, and multi-task inference with `Parallel`.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::adapter_model::AdapterModel;
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::heads::Head;
use crate::methods::composition::{Composition, Setup};
use crate::model::hooks::NoHooks;
use crate::model::layer::Positions;
use crate::model::{BertModel, Mode};

#[derive(Debug, Clone)]
pub struct ComposedModel {
    pub encoder: BertModel,
    pub composition: Composition,
    /// One head per output: per parallel channel, in the setup's order (else one).
    pub heads: Vec<Head>,
}

impl ComposedModel {
    /// `setup` over the adapters, fusions and heads of `parts` (tuned models loaded on
    /// `encoder`'s weights; a name given twice keeps its first). Each output's head is the one
    /// named after the adapter (or fusion) that ends its channel. For inference only: the
    /// weights are taken as plain tensors ([`AdapterModel::frozen`]).
    pub fn new(encoder: BertModel, setup: Setup, parts: Vec<AdapterModel>) -> Result<Self> {
        let parts = parts.iter().map(AdapterModel::frozen);
        let mut adapters = BTreeMap::new();
        let mut fusions = BTreeMap::new();
        let mut heads = BTreeMap::new();
        for part in parts {
            if let Some(adapter) = part.adapter {
                adapters.entry(adapter.name.clone()).or_insert(adapter);
            }
            if let Some(fusion) = part.fusion {
                for adapter in &fusion.adapters {
                    adapters
                        .entry(adapter.name.clone())
                        .or_insert_with(|| adapter.clone());
                }
                fusions.entry(fusion.name()).or_insert(fusion);
            }
            heads.entry(part.head.name.clone()).or_insert(part.head);
        }
        let channels = setup.parallel_channels();
        let head_names = setup.head_names();
        if head_names.len() != channels {
            return Err(Error::input(format!(
                "the setup {setup} gives {channels} outputs but names {} heads ({head_names:?}); \
                 put the parallel block at the top or at the end of a stack",
                head_names.len()
            )));
        }
        let heads = head_names
            .iter()
            .map(|name| {
                heads.get(name).cloned().ok_or_else(|| {
                    Error::input(format!(
                        "no head named '{name}' is loaded for the setup {setup} (loaded: {:?})",
                        heads.keys().collect::<Vec<_>>()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            composition: Composition::new(setup, adapters, fusions)?,
            encoder,
            heads,
        })
    }

    /// The encoder's output at `positions` (all: `[channels * batch, seq, hidden]`; the first:
    /// `[channels * batch, 1, hidden]`), channel by channel. With parallel channels, the layers
    /// below the lowest active adapter run once on the batch; from there the batch is
    /// replicated per channel.
    pub fn hidden(&self, batch: &Batch, positions: Positions, mode: &mut Mode) -> Result<Tensor> {
        let channels = self.composition.setup.parallel_channels();
        let hidden = self.encoder.embed(batch, mode)?;
        let mask = &batch.attention_mask;
        let layers = self.encoder.layers.len();
        let hooks = &self.composition;
        let encoder = &self.encoder;
        if channels == 1 {
            return Ok(encoder.run_layers(hidden, mask, 0..layers, positions, hooks, mode)?);
        }
        let shared = self
            .composition
            .lowest_active_layer(layers)
            .unwrap_or(layers);
        // With no adapter active anywhere the shared run is the whole encoder, so its last layer
        // is the encoder's last.
        let shared_last = if shared == layers {
            positions
        } else {
            Positions::All
        };
        let hidden = encoder.run_layers(hidden, mask, 0..shared, shared_last, &NoHooks, mode)?;
        let replicate = |t: &Tensor| Tensor::cat(&vec![t.clone(); channels], 0);
        Ok(encoder.run_layers(
            replicate(&hidden)?,
            &replicate(mask)?,
            shared..layers,
            positions,
            hooks,
            mode,
        )?)
    }

    /// Logits `[batch, num_labels]` of each head, in the order of [`heads`](Self::heads).
    pub fn logits(&self, batch: &Batch, mode: &mut Mode) -> Result<Vec<Tensor>> {
        let hidden = self.hidden(batch, Positions::First, mode)?;
        let rows = batch.input_ids.dim(0)?;
        self.heads
            .iter()
            .enumerate()
            .map(|(i, head)| Ok(head.forward(&hidden.narrow(0, i * rows, rows)?, mode)?))
            .collect()
    }
}
