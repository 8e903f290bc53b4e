//! Many trained adapters on one frozen pre-trained model, each text naming its adapter: texts
//! of different adapters run in one forward pass (AdapterHub's `BatchSplit`, one head per
//! slice), so the base layers run once for all of them. What `adapterkit serve` runs.
//!
//! ```no_run
//! use adapterkit::adapter_set::AdapterSet;
//! let set = AdapterSet::load("assets/all-MiniLM-L6-v2", &candle_core::Device::Cpu)?;
//! let trec = set.load_adapter("trec6", "runs/trec6".as_ref())?;
//! let sentiment = set.load_adapter("sentiment", "runs/sentiment".as_ref())?;
//! let batch = set.tokenizer.batch(&["Who wrote Hamlet?", "A fine film."], set.device())?;
//! // The first text through trec6, the second through sentiment, in one pass.
//! let predictions = set.predict(&batch, &[(&trec, 1), (&sentiment, 1)])?;
//! # Ok::<(), adapterkit::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::adapter_model::AdapterModel;
use crate::batch::{Batch, Encoded};
use crate::composed_model::ComposedModel;
use crate::data::TaskKind;
use crate::error::{Error, Result};
use crate::io::adapter_dir;
use crate::methods::adapter::Module;
use crate::methods::composition::Setup;
use crate::methods::lora_config::CompositionMode;
use crate::model::layer::Positions;
use crate::model::load::Pretrained;
use crate::model::{BertModel, Mode, Precision};
use crate::pooling::Pooling;
use crate::predictor::{predictions, Prediction};
use crate::tokenizer::TextTokenizer;

/// What a loaded adapter is, for listings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterInfo {
    pub name: String,
    /// `bottleneck`, `lora`, `ia3`, `union` (several modules), `fusion` or `head` (a head
    /// alone).
    pub kind: String,
    /// Adapter (or fusion and its adapters) and head parameters.
    pub parameters: usize,
    pub task: TaskKind,
    /// The head's labels, in output order.
    pub labels: Vec<String>,
    /// Whether it was trained with the encoder's LayerNorms, which it brings along.
    pub own_layer_norms: bool,
    /// The token limit it was trained with (`--max-seq-len`), which its texts are truncated
    /// to, as `adapterkit predict` does.
    pub max_seq_len: Option<usize>,
    pub path: PathBuf,
}

/// One adapter directory loaded for an [`AdapterSet`], under the name it is served by.
#[derive(Debug, Clone)]
pub struct ServedAdapter {
    pub info: AdapterInfo,
    /// For inference, with its adapter and head (a fusion's adapters: `NAME.adapter`) renamed
    /// after the served name, so that adapters of different directories never clash.
    model: AdapterModel,
    /// How it runs in a batch: the adapter, or `stack(fuse(...))`.
    setup: Setup,
}

/// A pre-trained model and its tokenizer, on which [`ServedAdapter`]s run.
pub struct AdapterSet {
    pub tokenizer: TextTokenizer,
    encoder: BertModel,
    device: Device,
}

impl AdapterSet {
    /// `model`: a local Hugging Face model directory or hub id.
    pub fn load(model: &str, device: &Device) -> Result<Self> {
        let pretrained = Pretrained::load(model, device)?;
        Ok(Self {
            tokenizer: pretrained.tokenizer,
            encoder: pretrained.model.frozen(),
            device: device.clone(),
        })
    }

    /// The precision of the encoder's frozen products (`model::precision`), for every adapter
    /// loaded after.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        Ok(self.encoder.set_precision(precision)?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `text` tokenized for `adapter`: truncated to the limit it was trained with, if lower
    /// than the tokenizer's (the tokenizer's own truncation to that limit: the text's tokens
    /// cut, the closing special token kept).
    pub fn encode(&self, text: &str, adapter: Option<&AdapterInfo>) -> Result<Encoded> {
        let mut row = self.tokenizer.encode(text, None)?;
        if let Some(limit) = adapter.and_then(|a| a.max_seq_len) {
            if row.ids.len() > limit && limit >= 2 {
                let last = row.ids.len() - 1;
                let (id, kind) = (row.ids[last], row.type_ids[last]);
                row.ids.truncate(limit - 1);
                row.type_ids.truncate(limit - 1);
                row.ids.push(id);
                row.type_ids.push(kind);
            }
        }
        Ok(row)
    }

    /// The adapter (or fusion) and head saved in `dir`, served as `name`. Its base-model
    /// tensors other than LayerNorms must be the model's: a fully fine-tuned model is refused.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<ServedAdapter> {
        crate::methods::bottleneck::check_name(name)
            .map_err(|e| Error::input(format!("adapter name '{name}': {e}")))?;
        let dir = adapter_dir::locate(dir)?;
        let trained = adapter_dir::trained_base_tensors(&dir)?;
        if trained.iter().any(|n| !n.contains("LayerNorm")) {
            return Err(Error::file(
                dir.join(adapter_dir::BASE_WEIGHTS),
                "this model was trained with the whole encoder (full fine-tuning); only \
                 adapters share one pre-trained model",
            ));
        }
        let loaded = adapter_dir::load(&dir, self.encoder.clone(), &self.device)?;
        let mut parameters = loaded.head.params().count();
        let kind = match (&loaded.adapter, &loaded.fusion) {
            (_, Some(fusion)) => {
                parameters += fusion.params().count();
                parameters += (fusion.adapters.iter())
                    .map(|a| a.params().count())
                    .sum::<usize>();
                "fusion"
            }
            (Some(adapter), None) => {
                parameters += adapter.params().count();
                match &adapter.modules[..] {
                    [Module::Bottleneck(_)] => "bottleneck",
                    [Module::Lora(l)] if l.config.composition_mode == CompositionMode::Scale => {
                        "ia3"
                    }
                    [Module::Lora(_)] => "lora",
                    [Module::PrefixTuning(_)] => "prefix_tuning",
                    _ => "union",
                }
            }
            (None, None) => "head",
        };
        let mut model = loaded.frozen();
        let setup = match (&mut model.adapter, &mut model.fusion) {
            (_, Some(fusion)) => {
                for adapter in &mut fusion.adapters {
                    adapter.name = format!("{name}.{}", adapter.name);
                }
                let children = (fusion.adapters.iter())
                    .map(|a| Setup::Adapter(a.name.clone()))
                    .collect();
                model.head.name = fusion.name();
                Setup::Stack(vec![Setup::Fuse(children)])
            }
            (Some(adapter), None) => {
                adapter.rename(name);
                model.head.name = name.into();
                Setup::Stack(vec![Setup::Adapter(name.into())])
            }
            (None, None) => {
                return Err(Error::file(
                    &dir,
                    "holds a head and no adapter: served models share the pre-trained model \
                     and differ by their adapters",
                ))
            }
        };
        let info = AdapterInfo {
            name: name.into(),
            kind: kind.into(),
            parameters,
            task: model.head.config.kind()?,
            labels: model.head.config.labels(),
            own_layer_norms: !trained.is_empty(),
            max_seq_len: adapter_dir::recorded_max_seq_len(&dir)?,
            path: dir,
        };
        Ok(ServedAdapter { info, model, setup })
    }

    /// Predictions for `batch`, row by row: its rows are cut into consecutive groups, each
    /// `(adapter, rows)` run through its adapter and head, all in one forward pass; a fusion
    /// runs in a pass of its own (AdapterHub's `BatchSplit` cannot hold one).
    pub fn predict(
        &self,
        batch: &Batch,
        groups: &[(&ServedAdapter, usize)],
    ) -> Result<Vec<Prediction>> {
        let rows = batch.len();
        if groups.iter().map(|(_, n)| n).sum::<usize>() != rows {
            return Err(Error::input(format!(
                "the groups' rows do not add up to the batch's {rows}"
            )));
        }
        let is_fusion = |a: &ServedAdapter| a.info.kind == "fusion";
        // Passes: runs of neighbouring groups that mix, and each fusion alone.
        let mut passes: Vec<Vec<(&ServedAdapter, usize)>> = Vec::new();
        for &(adapter, n) in groups.iter().filter(|(_, n)| *n > 0) {
            match passes.last_mut() {
                Some(pass) if !is_fusion(adapter) && !is_fusion(pass[0].0) => {
                    pass.push((adapter, n))
                }
                _ => passes.push(vec![(adapter, n)]),
            }
        }
        let mut out = Vec::with_capacity(rows);
        for pass in passes {
            let n = pass.iter().map(|(_, n)| n).sum();
            out.extend(self.predict_pass(&batch.rows(out.len(), n)?, &pass)?);
        }
        Ok(out)
    }

    /// [`predict`](Self::predict) in one forward pass.
    fn predict_pass(
        &self,
        batch: &Batch,
        groups: &[(&ServedAdapter, usize)],
    ) -> Result<Vec<Prediction>> {
        let setup = match groups {
            [(one, _)] => one.setup.clone(),
            _ => Setup::BatchSplit {
                children: groups.iter().map(|(a, _)| a.setup.clone()).collect(),
                batch_sizes: groups.iter().map(|(_, n)| *n).collect(),
            },
        };
        let parts = groups.iter().map(|(a, _)| a.model.clone()).collect();
        let model = ComposedModel::new(self.encoder.clone(), setup, parts)?;
        let mut out: Vec<Option<Prediction>> = vec![None; batch.len()];
        for task in model.logits(batch, &mut Mode::Eval)? {
            let head = &model.heads[task.head];
            for (row, p) in task.rows.zip(predictions(head, &task.logits)?) {
                out[row] = Some(p);
            }
        }
        Ok(out.into_iter().map(|p| p.expect("every row")).collect())
    }

    /// One map per text, from each task's adapter name to its prediction, under `setup`
    /// (AdapterHub's blocks over the served names, e.g. `parallel(a,b)`).
    pub fn predict_setup(
        &self,
        setup: &Setup,
        adapters: &[&ServedAdapter],
        batch: &Batch,
    ) -> Result<Vec<BTreeMap<String, Prediction>>> {
        for name in setup.names() {
            match adapters.iter().find(|a| a.info.name == name) {
                Some(a) if a.info.kind == "fusion" => {
                    return Err(Error::input(format!(
                        "'{name}' is a fusion; a setup names adapters (fuse them in it)"
                    )))
                }
                Some(_) => {}
                None => return Err(Error::input(format!("no adapter '{name}' is loaded"))),
            }
        }
        let parts = adapters.iter().map(|a| a.model.clone()).collect();
        let model = ComposedModel::new(self.encoder.clone(), setup.clone(), parts)?;
        let rows = batch.input_ids.dim(0)?;
        model.check_batch(rows)?;
        let mut out = vec![BTreeMap::new(); rows];
        for task in model.logits(batch, &mut Mode::Eval)? {
            let head = &model.heads[task.head];
            for (row, p) in task.rows.zip(predictions(head, &task.logits)?) {
                out[row].insert(head.name.clone(), p);
            }
        }
        Ok(out)
    }

    /// One vector per row of `batch`: the last hidden states (adapted by `adapter`, if given)
    /// pooled, scaled to unit length if `normalize`.
    pub fn embed(
        &self,
        adapter: Option<&ServedAdapter>,
        batch: &Batch,
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let hidden = match adapter {
            None => self
                .encoder
                .forward(batch, &crate::model::NoHooks, &mut Mode::Eval)?,
            Some(a) => {
                let parts = vec![a.model.clone()];
                let model = ComposedModel::new(self.encoder.clone(), a.setup.clone(), parts)?;
                model.hidden(batch, Positions::All, &mut Mode::Eval)?
            }
        };
        let mut pooled: Tensor = pooling.pool(&hidden, &batch.attention_mask)?;
        if normalize {
            pooled = crate::pooling::normalize(&pooled)?;
        }
        Ok(pooled.to_vec2::<f32>()?)
    }
}
