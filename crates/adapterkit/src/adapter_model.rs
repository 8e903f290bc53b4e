//! A pre-trained encoder with a tuning method and a task head: what `train`, `eval` and
//! `predict` run.

use candle_core::{Device, Tensor};

use crate::batch::Batch;
use crate::error::Result;
use crate::heads::{Head, HeadConfig};
use crate::methods::bottleneck::BottleneckAdapters;
use crate::methods::bottleneck_config::BnConfig;
use crate::methods::fusion::{Fusion, FusionConfig};
use crate::model::hooks::{LayerHooks, NoHooks};
use crate::model::layer::Positions;
use crate::model::{BertModel, Mode};
use crate::params::Params;
use crate::rng::SeededRng;

/// What training changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// A bottleneck adapter (+ the head, + the LayerNorms unless frozen); the base is frozen.
    Adapter(BnConfig),
    /// Only the head: the floor.
    Head,
    /// Every weight: the ceiling.
    Full,
}

impl Method {
    /// `houlsby`, `pfeiffer`, `parallel` (or any AdapterHub preset name), `head`, `full`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "head" => Ok(Method::Head),
            "full" => Ok(Method::Full),
            preset => Ok(Method::Adapter(BnConfig::preset(preset)?)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdapterModel {
    pub encoder: BertModel,
    /// `None` for head-only training and full fine-tuning.
    pub adapter: Option<BottleneckAdapters>,
    /// AdapterFusion over several adapters; when set, it runs instead of `adapter`.
    pub fusion: Option<Fusion>,
    /// Whether the fused adapters train with the fusion layers (else they are frozen).
    pub train_fused_adapters: bool,
    pub head: Head,
    /// Base-model tensors being trained: the LayerNorms beside an adapter, or every weight in
    /// full fine-tuning (named as in the checkpoint).
    pub base_trainable: Params,
}

impl AdapterModel {
    /// A new task model on `encoder`: adapter and head weights drawn from `seed`.
    /// `train_layer_norms` (the Houlsby paper's choice) also trains the encoder's LayerNorms
    /// beside an adapter; AdapterHub's `train_adapter()` freezes them.
    pub fn new(
        mut encoder: BertModel,
        method: &Method,
        name: &str,
        head: HeadConfig,
        train_layer_norms: bool,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = SeededRng::new(seed);
        let (adapter, base_trainable) = match method {
            Method::Adapter(config) => {
                let adapter =
                    BottleneckAdapters::new(name, config, &encoder.config, &mut rng, device)?;
                let norms = if train_layer_norms {
                    encoder.make_trainable(|n| n.contains("LayerNorm"))?
                } else {
                    Params::default()
                };
                (Some(adapter), norms)
            }
            Method::Head => (None, Params::default()),
            Method::Full => (None, encoder.make_trainable(|_| true)?),
        };
        let (hidden, dropout) = (
            encoder.config.hidden_size,
            encoder.config.hidden_dropout_prob,
        );
        let head = Head::new(name, head, hidden, dropout, &mut rng, device)?;
        Ok(Self {
            encoder,
            adapter,
            fusion: None,
            train_fused_adapters: false,
            head,
            base_trainable,
        })
    }

    /// AdapterFusion's second stage: a new fusion layer per layer over `adapters`, and a new
    /// head, on a frozen encoder. The adapters are frozen unless `train_adapters`.
    pub fn fused(
        encoder: BertModel,
        adapters: Vec<BottleneckAdapters>,
        config: &FusionConfig,
        head: HeadConfig,
        train_adapters: bool,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = SeededRng::new(seed);
        let adapters = if train_adapters {
            adapters
        } else {
            adapters.iter().map(BottleneckAdapters::frozen).collect()
        };
        let fusion = Fusion::new(adapters, config, &encoder.config, &mut rng, device)?;
        let (hidden, dropout) = (
            encoder.config.hidden_size,
            encoder.config.hidden_dropout_prob,
        );
        let head = Head::new(&fusion.name(), head, hidden, dropout, &mut rng, device)?;
        Ok(Self {
            encoder,
            adapter: None,
            fusion: Some(fusion),
            train_fused_adapters: train_adapters,
            head,
            base_trainable: Params::default(),
        })
    }

    /// A copy for inference: adapter, fusion and head weights as plain tensors, so a forward
    /// pass records no graph and frees each activation as soon as the next op has read it.
    /// (It has no trainable parameters left: train and save the original.)
    pub fn frozen(&self) -> Self {
        Self {
            adapter: self.adapter.as_ref().map(BottleneckAdapters::frozen),
            fusion: self.fusion.as_ref().map(Fusion::frozen),
            train_fused_adapters: false,
            head: self.head.frozen(),
            base_trainable: Params::default(),
            encoder: self.encoder.frozen(),
        }
    }

    pub fn hooks(&self) -> &dyn LayerHooks {
        match (&self.fusion, &self.adapter) {
            (Some(fusion), _) => fusion,
            (None, Some(adapter)) => adapter,
            (None, None) => &NoHooks,
        }
    }

    /// AdapterDrop at run time: the adapters (single or fused) of these layers are skipped.
    pub fn set_skip_layers(&mut self, layers: &std::collections::BTreeSet<usize>) {
        if let Some(adapter) = &mut self.adapter {
            adapter.skip_layers = layers.clone();
        }
        if let Some(fusion) = &mut self.fusion {
            for adapter in &mut fusion.adapters {
                adapter.skip_layers = layers.clone();
            }
        }
    }

    /// Terms added to the training loss besides the head's (AdapterFusion's regularisation).
    pub fn regularization_loss(&self) -> Result<Option<Tensor>> {
        match &self.fusion {
            Some(fusion) => Ok(fusion.regularization_loss()?),
            None => Ok(None),
        }
    }

    /// Logits `[batch, num_labels]`. The head reads the first token alone, so the last layer
    /// computes nothing else.
    pub fn logits(&self, batch: &Batch, mode: &mut Mode) -> Result<Tensor> {
        self.logits_at(batch, Positions::First, mode)
    }

    /// [`logits`](Self::logits) with the last layer computed at `last`: `All` gives the same
    /// logits with the work `transformers` does (every position), for comparisons.
    pub fn logits_at(&self, batch: &Batch, last: Positions, mode: &mut Mode) -> Result<Tensor> {
        let hidden = self.encoder.forward_at(batch, last, self.hooks(), mode)?;
        Ok(self.head.forward(&hidden, mode)?)
    }

    /// Every trainable parameter: adapter, head and base tensors being trained.
    pub fn trainable(&self) -> Params {
        let mut all = Params::default();
        if let Some(adapter) = &self.adapter {
            all.0.extend(adapter.params().0);
        }
        if let Some(fusion) = &self.fusion {
            if self.train_fused_adapters {
                for adapter in &fusion.adapters {
                    all.0.extend(adapter.params().0);
                }
            }
            all.0.extend(fusion.params().0);
        }
        all.0.extend(self.head.params().0);
        all.0.extend(self.base_trainable.0.iter().cloned());
        all
    }
}
