//! A pre-trained encoder with a tuning method and a task head: what `train`, `eval` and
//! `predict` run.

use candle_core::Tensor;

use crate::batch::Batch;
use crate::error::Result;
use crate::heads::Head;
use crate::methods::bottleneck::BottleneckAdapters;
use crate::model::hooks::{LayerHooks, NoHooks};
use crate::model::{BertModel, Mode};
use crate::params::Params;

#[derive(Debug, Clone)]
pub struct AdapterModel {
    pub encoder: BertModel,
    /// `None` for head-only training and full fine-tuning.
    pub adapter: Option<BottleneckAdapters>,
    pub head: Head,
    /// Base-model tensors being trained: the LayerNorms beside an adapter, or every weight in
    /// full fine-tuning (named as in the checkpoint).
    pub base_trainable: Params,
}

impl AdapterModel {
    pub fn hooks(&self) -> &dyn LayerHooks {
        match &self.adapter {
            Some(adapter) => adapter,
            None => &NoHooks,
        }
    }

    /// Logits `[batch, num_labels]`.
    pub fn logits(&self, batch: &Batch, mode: &mut Mode) -> Result<Tensor> {
        let hidden = self.encoder.forward(batch, self.hooks(), mode)?;
        Ok(self.head.forward(&hidden, mode)?)
    }

    /// Every trainable parameter: adapter, head and base tensors being trained.
    pub fn trainable(&self) -> Params {
        let mut all = Params::default();
        if let Some(adapter) = &self.adapter {
            all.0.extend(adapter.params().0);
        }
        all.0.extend(self.head.params().0);
        all.0.extend(self.base_trainable.0.iter().cloned());
        all
    }
}
