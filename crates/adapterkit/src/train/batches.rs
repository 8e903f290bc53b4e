//! Examples turned into token ids and target tensors, and grouped into padded batches.

use candle_core::{Device, Tensor};

use crate::batch::{Batch, Encoded};
use crate::data::{Dataset, Target, TaskKind};
use crate::error::{Error, Result};
use crate::heads::HeadConfig;
use crate::rng::SeededRng;
use crate::tokenizer::TextTokenizer;

/// What the head is trained toward, per example.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    Classes(Vec<u32>),
    Values(Vec<f32>),
    /// One row of 0/1 per example, `num_labels` wide.
    MultiHot(Vec<Vec<f32>>),
}

/// A tokenized dataset, ready to batch.
#[derive(Debug, Clone)]
pub struct EncodedDataset {
    pub name: String,
    pub rows: Vec<Encoded>,
    pub targets: Targets,
}

impl EncodedDataset {
    /// Tokenizes `data` and maps its labels through the head's label map; a label the head
    /// does not know is an error naming the example.
    pub fn new(data: &Dataset, tokenizer: &TextTokenizer, head: &HeadConfig) -> Result<Self> {
        if data.examples.is_empty() {
            return Err(Error::input(format!(
                "dataset '{}' has no examples",
                data.name
            )));
        }
        let kind = head.kind()?;
        let mut rows = Vec::with_capacity(data.len());
        let mut classes = Vec::new();
        let mut values = Vec::new();
        let mut multi = Vec::new();
        for (i, example) in data.examples.iter().enumerate() {
            rows.push(tokenizer.encode(&example.text, example.text_pair.as_deref())?);
            let context =
                |e: Error| Error::input(format!("dataset '{}', example {}: {e}", data.name, i + 1));
            match (kind, &example.target) {
                (TaskKind::Classification, Target::Class(label)) => {
                    classes.push(head.label_id(label).map_err(context)? as u32)
                }
                (TaskKind::Regression, Target::Value(v)) => values.push(*v),
                (TaskKind::MultiLabel, Target::Classes(labels)) => {
                    let mut row = vec![0f32; head.num_labels];
                    for label in labels {
                        row[head.label_id(label).map_err(context)?] = 1.0;
                    }
                    multi.push(row);
                }
                (kind, target) => {
                    return Err(context(Error::input(format!(
                        "a {kind:?} head cannot learn the target {target:?}"
                    ))))
                }
            }
        }
        let targets = match kind {
            TaskKind::Classification => Targets::Classes(classes),
            TaskKind::Regression => Targets::Values(values),
            TaskKind::MultiLabel => Targets::MultiHot(multi),
        };
        Ok(Self {
            name: data.name.clone(),
            rows,
            targets,
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The padded batch and target tensor of the examples at `indices`.
    pub fn batch(
        &self,
        indices: &[usize],
        pad_id: u32,
        device: &Device,
    ) -> Result<(Batch, Tensor)> {
        let rows: Vec<Encoded> = indices.iter().map(|i| self.rows[*i].clone()).collect();
        let batch = Batch::pad(&rows, pad_id, device)?;
        let targets = match &self.targets {
            Targets::Classes(c) => Tensor::from_vec(
                indices.iter().map(|i| c[*i]).collect::<Vec<_>>(),
                indices.len(),
                device,
            )?,
            Targets::Values(v) => Tensor::from_vec(
                indices.iter().map(|i| v[*i]).collect::<Vec<_>>(),
                indices.len(),
                device,
            )?,
            Targets::MultiHot(m) => {
                let width = m.first().map_or(0, Vec::len);
                let flat: Vec<f32> = indices.iter().flat_map(|i| m[*i].iter().copied()).collect();
                Tensor::from_vec(flat, (indices.len(), width), device)?
            }
        };
        Ok((batch, targets))
    }

    /// Training batches for one epoch: shuffled, then sorted by length within windows of 50
    /// batches so that each batch pads little, then the batches themselves shuffled.
    pub fn epoch_batches(&self, batch_size: usize, rng: &mut SeededRng) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        rng.shuffle(&mut order);
        let mut batches = Vec::new();
        for window in order.chunks(batch_size * 50) {
            let mut window = window.to_vec();
            window.sort_by_key(|i| self.rows[*i].ids.len());
            batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
        }
        rng.shuffle(&mut batches);
        batches
    }

    /// Evaluation batches in length order (least padding); predictions are put back in
    /// dataset order by index.
    pub fn eval_batches(&self, batch_size: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|i| self.rows[*i].ids.len());
        order.chunks(batch_size).map(<[usize]>::to_vec).collect()
    }
}
