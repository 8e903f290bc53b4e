//! Several trained adapters (and fusions) on one encoder under a composition setup: what
//! `predict --setup` runs, and multi-task inference with `Parallel`.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::Tensor;

use crate::adapter_model::AdapterModel;
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::heads::Head;
use crate::methods::adapter::Adapter;
use crate::methods::composition::{Composition, Setup};
use crate::model::hooks::NoHooks;
use crate::model::layer::Positions;
use crate::model::{BertModel, Mode};

#[derive(Debug, Clone)]
pub struct ComposedModel {
    pub encoder: BertModel,
    pub composition: Composition,
    /// The heads the setup's channels end in, each once, in the order they first appear.
    pub heads: Vec<Head>,
    /// Run the layers below the lowest active adapter once for all parallel channels (the
    /// default). Off, every channel runs the whole encoder: the same result, slower; tests
    /// compare the two.
    pub share_base_layers: bool,
}

/// One head's logits for some rows of the input batch.
#[derive(Debug, Clone)]
pub struct TaskLogits {
    /// Index into [`ComposedModel::heads`].
    pub head: usize,
    /// Rows of the input batch these logits are for.
    pub rows: Range<usize>,
    /// `[rows.len(), num_labels]`
    pub logits: Tensor,
}

/// Where a channel's output goes: rows of the encoder's (replicated) batch, their head.
struct Route {
    rows: Range<usize>,
    head: String,
}

impl ComposedModel {
    /// `setup` over the adapters, fusions and heads of `parts` (tuned models loaded on
    /// `encoder`'s weights; a name given twice keeps its first). Each channel's output goes to
    /// the head named after the adapter (or fusion) that ends it. For inference only: the
    /// weights are taken as plain tensors ([`AdapterModel::frozen`]).
    pub fn new(encoder: BertModel, setup: Setup, parts: Vec<AdapterModel>) -> Result<Self> {
        let parts = parts.iter().map(AdapterModel::frozen);
        let base_layer_norms = encoder.layer_norms();
        let mut adapters = BTreeMap::new();
        let mut fusions = BTreeMap::new();
        let mut loaded = BTreeMap::new();
        let mut layer_norms = BTreeMap::new();
        for part in parts {
            if let Some(adapter) = part.adapter {
                let own = part.encoder.layer_norms();
                if !own.same_as(&base_layer_norms)? {
                    layer_norms.entry(adapter.name.clone()).or_insert(own);
                }
                adapters.entry(adapter.name.clone()).or_insert(adapter);
            }
            if let Some(fusion) = part.fusion {
                for adapter in &fusion.adapters {
                    adapters
                        .entry(adapter.name.clone())
                        .or_insert_with(|| Adapter::of_bottleneck(adapter.clone()));
                }
                fusions.entry(fusion.name()).or_insert(fusion);
            }
            loaded.entry(part.head.name.clone()).or_insert(part.head);
        }
        let routes = routes_of_some_batch(&setup)?;
        let mut heads: Vec<Head> = Vec::new();
        for route in &routes {
            if heads.iter().any(|h| h.name == route.head) {
                continue;
            }
            let head = loaded.get(&route.head).cloned().ok_or_else(|| {
                Error::input(format!(
                    "no head named '{}' is loaded for the setup {setup} (loaded: {:?})",
                    route.head,
                    loaded.keys().collect::<Vec<_>>()
                ))
            })?;
            heads.push(head);
        }
        let mut composition = Composition::new(setup, adapters, fusions)?;
        composition.layer_norms = layer_norms;
        // Adapters with LayerNorms of their own must run alone in their channels.
        composition.on_rows(routes.iter().map(|r| r.rows.end).max().unwrap_or(1))?;
        Ok(Self {
            composition,
            encoder,
            heads,
            share_base_layers: true,
        })
    }

    /// The encoder's output at `positions` (all: `[channels * batch, seq, hidden]`; the first:
    /// `[channels * batch, 1, hidden]`), the batch replicated once per parallel channel. With
    /// [`share_base_layers`](Self::share_base_layers), the layers below the lowest active
    /// adapter run once on the batch, which is replicated from there.
    pub fn hidden(&self, batch: &Batch, positions: Positions, mode: &mut Mode) -> Result<Tensor> {
        let channels = self.composition.setup.parallel_channels();
        let rows = batch.input_ids.dim(0)? * channels;
        let hooks = self.composition.on_rows(rows)?;
        let mut mask = batch.attention_mask.clone();
        if hooks.has_own_layer_norms() {
            // Each channel's embeddings with its own LayerNorm; no layer is shared.
            let mut summed = self.encoder.embed_summed(batch)?;
            if channels > 1 {
                summed = Tensor::cat(&vec![summed; channels], 0)?;
                mask = Tensor::cat(&vec![mask; channels], 0)?;
            }
            let hidden = hooks.embeddings(&self.encoder, &summed, mode)?;
            let layers = 0..self.encoder.layers.len();
            return Ok(self
                .encoder
                .run_layers(hidden, &mask, layers, positions, &hooks, mode)?);
        }
        let mut hidden = self.encoder.embed(batch, mode)?;
        let layers = self.encoder.layers.len();
        let encoder = &self.encoder;
        let shared = match self.composition.lowest_active_layer(layers) {
            _ if channels == 1 || !self.share_base_layers => 0,
            lowest => lowest.unwrap_or(layers),
        };
        if shared > 0 {
            // With no adapter active anywhere the shared run is the whole encoder, so its last
            // layer is the encoder's last.
            let last = if shared == layers {
                positions
            } else {
                Positions::All
            };
            hidden = encoder.run_layers(hidden, &mask, 0..shared, last, &NoHooks, mode)?;
        }
        if channels > 1 {
            let replicate = |t: &Tensor| Tensor::cat(&vec![t.clone(); channels], 0);
            hidden = replicate(&hidden)?;
            mask = replicate(&mask)?;
        }
        Ok(encoder.run_layers(hidden, &mask, shared..layers, positions, &hooks, mode)?)
    }

    /// Whether the setup runs on a batch of `rows` texts (batch_split sizes must add up to it):
    /// to check every batch before any output is written.
    pub fn check_batch(&self, rows: usize) -> Result<()> {
        routes(&self.composition.setup, rows).map(|_| ())
    }

    /// Each channel's logits by its head, in the order of the setup's channels.
    pub fn logits(&self, batch: &Batch, mode: &mut Mode) -> Result<Vec<TaskLogits>> {
        let last = Adapter::last_positions(self.composition.adapters.values());
        let hidden = self.hidden(batch, last, mode)?;
        let batch_rows = batch.input_ids.dim(0)?;
        let setup = &self.composition.setup;
        routes(setup, batch_rows)?
            .into_iter()
            .map(|route| {
                let head = self
                    .heads
                    .iter()
                    .position(|h| h.name == route.head)
                    .ok_or_else(|| Error::input(format!("no head '{}' loaded", route.head)))?;
                let channel = hidden.narrow(0, route.rows.start, route.rows.len())?;
                let start = route.rows.start % batch_rows;
                Ok(TaskLogits {
                    head,
                    rows: start..start + route.rows.len(),
                    logits: self.heads[head].forward(&channel, mode)?,
                })
            })
            .collect()
    }
}

/// The routes on a batch the setup runs on: one row, or what its batch_split sizes add up to
/// (before the batch is replicated per parallel channel, or after). Checks the heads and row
/// counts before any batch comes.
fn routes_of_some_batch(setup: &Setup) -> Result<Vec<Route>> {
    let channels = setup.parallel_channels();
    let mut batches = vec![1];
    setup.visit(&mut |s| {
        if let Setup::BatchSplit { batch_sizes, .. } = s {
            let total: usize = batch_sizes.iter().sum();
            batches.push(total);
            if total.is_multiple_of(channels) {
                batches.push(total / channels);
            }
        }
    });
    let first = routes(setup, batches[0]);
    batches[1..]
        .iter()
        .map(|&rows| routes(setup, rows))
        .find(Result::is_ok)
        .unwrap_or(first)
}

/// Where the channels of `setup` on a batch of `batch_rows` go: neighbouring channels with the
/// same head joined. Two outputs for one head on the same input row are refused (nowhere to put
/// the second).
fn routes(setup: &Setup, batch_rows: usize) -> Result<Vec<Route>> {
    let rows = batch_rows * setup.parallel_channels();
    let mut routes: Vec<Route> = Vec::new();
    for channel in setup.channels(0..rows)? {
        let head = channel.setup.head_name();
        match routes.last_mut() {
            // Channels are contiguous: join neighbours within one copy of the batch.
            Some(last) if last.head == head && channel.rows.start % batch_rows != 0 => {
                last.rows.end = channel.rows.end
            }
            _ => routes.push(Route {
                rows: channel.rows,
                head,
            }),
        }
    }
    let input_rows =
        |r: &Route| (r.rows.start % batch_rows)..(r.rows.start % batch_rows + r.rows.len());
    for (i, a) in routes.iter().enumerate() {
        let clash = routes[..i].iter().find(|b| {
            let (ra, rb) = (input_rows(a), input_rows(b));
            b.head == a.head && ra.start < rb.end && rb.start < ra.end
        });
        if clash.is_some() {
            return Err(Error::input(format!(
                "the setup {setup} gives head '{}' two outputs for the same texts; \
                 end each parallel channel with an adapter (or fusion) of its own",
                a.head
            )));
        }
    }
    Ok(routes)
}
