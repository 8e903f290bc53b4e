//! The library's entry point for inference: a pre-trained model with trained adapters, texts in,
//! labels out. What `adapterkit predict` runs.
//!
//! ```no_run
//! use adapterkit::predictor::Predictor;
//! let device = candle_core::Device::Cpu;
//! let adapters = ["runs/trec6".into()];
//! let predictor = Predictor::load("assets/all-MiniLM-L6-v2", &adapters, None, &device)?;
//! for tasks in predictor.predict(&["What is the capital of France?"])? {
//!     println!("{}", serde_json::to_string(&tasks).unwrap());
//! }
//! # Ok::<(), adapterkit::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::adapter_model::{check_layers, AdapterModel};
use crate::composed_model::ComposedModel;
use crate::data::TaskKind;
use crate::error::{Error, Result};
use crate::heads::{scores, Head};
use crate::io::adapter_dir;
use crate::methods::composition::Setup;
use crate::model::load::Pretrained;
use crate::model::{Mode, Precision};
use crate::tokenizer::TextTokenizer;

/// What a head predicts for one text, decoded: the JSON objects `adapterkit predict` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prediction {
    /// Classification: the most probable label and every label's probability.
    Label {
        label: String,
        scores: BTreeMap<String, f32>,
    },
    /// Multi-label classification: the labels over 0.5 and every label's probability.
    Labels {
        labels: Vec<String>,
        scores: BTreeMap<String, f32>,
    },
    /// Regression.
    Value { value: f32 },
}

/// One [`Prediction`] per row of `logits` (`[rows, num_labels]`) of `head`.
pub fn predictions(head: &Head, logits: &Tensor) -> Result<Vec<Prediction>> {
    let kind = head.config.kind()?;
    let scores = scores(kind, logits)?;
    if kind == TaskKind::Regression {
        let values = scores.to_vec1::<f32>()?;
        return Ok(values
            .into_iter()
            .map(|value| Prediction::Value { value })
            .collect());
    }
    let labels = head.config.labels();
    let rows = scores.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let by_label = labels.iter().cloned().zip(row.iter().copied()).collect();
            if kind == TaskKind::MultiLabel {
                let chosen = labels
                    .iter()
                    .zip(&row)
                    .filter(|(_, p)| **p > 0.5)
                    .map(|(l, _)| l.clone())
                    .collect();
                Prediction::Labels {
                    labels: chosen,
                    scores: by_label,
                }
            } else {
                let best = crate::train::evaluate::argmax(&row);
                Prediction::Label {
                    label: labels[best].clone(),
                    scores: by_label,
                }
            }
        })
        .collect())
}

/// One tuned model, or several under a composition setup.
#[derive(Debug, Clone)]
enum Tuned {
    /// The model as loaded, and the one that runs: its LoRA (if any) folded into the weights
    /// ([`AdapterModel::merged`]), made again when the layers to skip change.
    One {
        model: Box<AdapterModel>,
        merged: Box<AdapterModel>,
    },
    Composed(Box<ComposedModel>),
}

impl Tuned {
    fn one(model: AdapterModel) -> Result<Self> {
        Ok(Tuned::One {
            merged: Box::new(model.merged()?),
            model: Box::new(model),
        })
    }
}

/// A pre-trained model with its tokenizer and trained adapters, for inference.
pub struct Predictor {
    pub tokenizer: TextTokenizer,
    tuned: Tuned,
    device: Device,
}

impl Predictor {
    /// `model`: a local Hugging Face model directory or hub id. `adapters`: directories saved by
    /// `adapterkit train` or `fuse`, or AdapterHub's `save_adapter`. `setup` (AdapterHub's
    /// composition, e.g. `parallel(a,b)`) runs several together, and is needed for more than
    /// one.
    pub fn load(
        model: &str,
        adapters: &[PathBuf],
        setup: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let mut pretrained = Pretrained::load(model, device)?;
        // The sequence limit the (first) adapter was trained with, if it recorded one.
        if let Some(dir) = adapters.first() {
            if let Some(n) = adapter_dir::recorded_max_seq_len(dir)? {
                pretrained.tokenizer.set_max_length(n)?;
            }
        }
        let tuned = match (adapters, setup) {
            (_, Some(setup)) => Tuned::Composed(Box::new(adapter_dir::load_composed(
                adapters,
                Setup::parse(setup)?,
                pretrained.model,
                device,
            )?)),
            ([one], None) => {
                Tuned::one(adapter_dir::load(one, pretrained.model, device)?.frozen())?
            }
            _ => {
                return Err(Error::input(format!(
                    "{} adapter directories given without a setup; several run together only \
                     under a composition setup such as parallel(a,b)",
                    adapters.len()
                )))
            }
        };
        Ok(Self {
            tokenizer: pretrained.tokenizer,
            tuned,
            device: device.clone(),
        })
    }

    /// The encoder's layer count.
    pub fn layers(&self) -> usize {
        match &self.tuned {
            Tuned::One { model, .. } => model.encoder.layers.len(),
            Tuned::Composed(model) => model.encoder.layers.len(),
        }
    }

    /// AdapterDrop at inference: no adapter runs in these layers (AdapterHub's `skip_layers`).
    pub fn set_skip_layers(&mut self, layers: &BTreeSet<usize>) -> Result<()> {
        match &mut self.tuned {
            Tuned::One { model, merged } => {
                model.set_skip_layers(layers)?;
                **merged = model.merged()?;
            }
            Tuned::Composed(model) => {
                check_layers(layers, model.encoder.layers.len())?;
                for adapter in model.composition.adapters.values_mut() {
                    adapter.set_skip_layers(layers);
                }
            }
        }
        Ok(())
    }

    /// The precision of the encoder's frozen products (`model::precision`).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        match &mut self.tuned {
            Tuned::One { model, merged } => {
                model.encoder.set_precision(precision)?;
                merged.encoder.set_precision(precision)?;
            }
            Tuned::Composed(model) => model.encoder.set_precision(precision)?,
        }
        Ok(())
    }

    /// Whether a batch of `rows` texts can run (a setup's batch_split sizes must add up to it).
    pub fn check_batch(&self, rows: usize) -> Result<()> {
        match &self.tuned {
            Tuned::One { .. } => Ok(()),
            Tuned::Composed(model) => model.check_batch(rows),
        }
    }

    /// One map per text, from each task's head name to its prediction: one task for a single
    /// adapter, one per parallel channel (or batch slice) under a setup.
    pub fn predict(&self, texts: &[&str]) -> Result<Vec<BTreeMap<String, Prediction>>> {
        let batch = self.tokenizer.batch(texts, &self.device)?;
        let mut out = vec![BTreeMap::new(); texts.len()];
        match &self.tuned {
            Tuned::One { merged: model, .. } => {
                let logits = model.logits(&batch, &mut Mode::Eval)?;
                for (tasks, p) in out.iter_mut().zip(predictions(&model.head, &logits)?) {
                    tasks.insert(model.head.name.clone(), p);
                }
            }
            Tuned::Composed(model) => {
                for task in model.logits(&batch, &mut Mode::Eval)? {
                    let head = &model.heads[task.head];
                    for (row, p) in task.rows.zip(predictions(head, &task.logits)?) {
                        out[row].insert(head.name.clone(), p);
                    }
                }
            }
        }
        Ok(out)
    }
}
