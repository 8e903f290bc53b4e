//! A pre-trained encoder with a tuning method and a task head: what `train`, `eval` and
//! `predict` run.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};

use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::heads::{Head, HeadConfig};
use crate::methods::adapter::{Adapter, AdapterConfig, Module};
use crate::methods::bottleneck::BottleneckAdapters;
use crate::methods::fusion::{Fusion, FusionConfig};
use crate::model::hooks::{LayerHooks, NoHooks};
use crate::model::layer::Positions;
use crate::model::{BertModel, Mode};
use crate::params::Params;
use crate::rng::SeededRng;

/// What training changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// An adapter (a bottleneck adapter, a LoRA, (IA)³ or a union of them) + the head (+ the
    /// LayerNorms unless frozen); the rest of the base is frozen.
    Adapter(AdapterConfig),
    /// Only the head: the floor.
    Head,
    /// Every weight: the ceiling.
    Full,
}

impl Method {
    /// `houlsby`, `pfeiffer`, `parallel`, `lora`, `ia3` (or any AdapterHub preset name),
    /// `head`, `full`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "head" => Ok(Method::Head),
            "full" => Ok(Method::Full),
            preset => Ok(Method::Adapter(AdapterConfig::preset(preset)?)),
        }
    }
}

/// The files an adapter is saved in: AdapterHub's (`adapter_config.json` +
/// `adapter.safetensors`), or Hugging Face PEFT's (`adapter_config.json` +
/// `adapter_model.safetensors`; a LoRA only). The head is saved in AdapterHub's files either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdapterFormat {
    #[default]
    AdapterHub,
    Peft,
}

#[derive(Debug, Clone)]
pub struct AdapterModel {
    pub encoder: BertModel,
    /// `None` for head-only training and full fine-tuning.
    pub adapter: Option<Adapter>,
    /// AdapterFusion over several adapters; when set, it runs instead of `adapter`.
    pub fusion: Option<Fusion>,
    /// Whether the fused adapters train with the fusion layers (else they are frozen).
    pub train_fused_adapters: bool,
    pub head: Head,
    /// Base-model tensors being trained: the LayerNorms beside an adapter, or every weight in
    /// full fine-tuning (named as in the checkpoint).
    pub base_trainable: Params,
    /// How `io::adapter_dir::save` writes the adapter.
    pub format: AdapterFormat,
}

/// Layers to skip must be layers of the model.
pub fn check_layers(layers: &BTreeSet<usize>, count: usize) -> Result<()> {
    match layers.iter().find(|l| **l >= count) {
        Some(bad) => Err(Error::input(format!(
            "cannot skip layer {bad}: the model has {count} layers (0..{})",
            count.saturating_sub(1)
        ))),
        None => Ok(()),
    }
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
                let adapter = Adapter::new(name, config, &encoder.config, &mut rng, device)?;
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
        let (hidden, dropout) = (encoder.config.hidden_size, encoder.config.head_dropout());
        let head = Head::new(name, head, hidden, dropout, &mut rng, device)?;
        Ok(Self {
            encoder,
            adapter,
            fusion: None,
            train_fused_adapters: false,
            head,
            base_trainable,
            format: AdapterFormat::AdapterHub,
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
        let (hidden, dropout) = (encoder.config.hidden_size, encoder.config.head_dropout());
        let head = Head::new(&fusion.name(), head, hidden, dropout, &mut rng, device)?;
        Ok(Self {
            encoder,
            adapter: None,
            fusion: Some(fusion),
            train_fused_adapters: train_adapters,
            head,
            base_trainable: Params::default(),
            format: AdapterFormat::AdapterHub,
        })
    }

    /// A copy for inference: adapter, fusion and head weights as plain tensors, so a forward
    /// pass records no graph and frees each activation as soon as the next op has read it.
    /// (It has no trainable parameters left: train and save the original.)
    pub fn frozen(&self) -> Self {
        Self {
            adapter: self.adapter.as_ref().map(Adapter::frozen),
            fusion: self.fusion.as_ref().map(Fusion::frozen),
            train_fused_adapters: false,
            head: self.head.frozen(),
            base_trainable: Params::default(),
            encoder: self.encoder.frozen(),
            format: self.format,
        }
    }

    /// The model with its LoRA or (IA)³ folded into the encoder's weights (`W + B A · alpha/r`;
    /// an (IA)³ vector scales W's rows and the bias), so that inference runs at the bare
    /// model's speed; a bottleneck adapter beside it stays as it is. Layers skipped by
    /// AdapterDrop are left unmerged. For inference: the folded weights are plain tensors.
    pub fn merged(&self) -> Result<Self> {
        let Some(adapter) = &self.adapter else {
            return Ok(self.clone());
        };
        let Some(lora) = adapter.lora() else {
            return Ok(self.clone());
        };
        // A gate depends on the input: a gated LoRA stays as it is.
        if lora.config.use_gating() {
            return Ok(self.clone());
        }
        let weights: std::collections::HashMap<String, Tensor> =
            self.encoder.named_tensors().into_iter().collect();
        let mut merged = std::collections::HashMap::new();
        for (layer, site, module) in lora.modules() {
            if lora.skip_layers.contains(&layer) {
                continue;
            }
            let name = format!("encoder.layer.{layer}.{}", site.module());
            let weight = weights[&format!("{name}.weight")].detach();
            let bias = weights.get(&format!("{name}.bias")).map(Tensor::detach);
            let (weight, bias) = module.merge(&lora.config, &weight, bias.as_ref())?;
            merged.insert(format!("{name}.weight"), weight);
            merged.extend(bias.map(|b| (format!("{name}.bias"), b)));
        }
        let mut encoder = self.encoder.clone();
        encoder
            .set_tensors(&merged)
            .map_err(|e| Error::input(format!("merging the LoRA: {e}")))?;
        let rest = Adapter {
            name: adapter.name.clone(),
            modules: (adapter.modules.iter())
                .filter(|m| !matches!(m, Module::Lora(_)))
                .cloned()
                .collect(),
        };
        Ok(Self {
            encoder,
            adapter: Some(rest).filter(|a| !a.modules.is_empty()),
            ..self.clone()
        })
    }

    pub fn hooks(&self) -> &dyn LayerHooks {
        match (&self.fusion, &self.adapter) {
            (Some(fusion), _) => fusion,
            (None, Some(adapter)) => adapter,
            (None, None) => &NoHooks,
        }
    }

    /// AdapterDrop at run time: the adapters (single or fused) of these layers are skipped.
    pub fn set_skip_layers(&mut self, layers: &BTreeSet<usize>) -> Result<()> {
        check_layers(layers, self.encoder.layers.len())?;
        if let Some(adapter) = &mut self.adapter {
            adapter.set_skip_layers(layers);
        }
        if let Some(fusion) = &mut self.fusion {
            for adapter in &mut fusion.adapters {
                adapter.skip_layers = layers.clone();
            }
        }
        Ok(())
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
        let last = Adapter::last_positions(&self.adapter);
        self.logits_at(batch, last, mode)
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
