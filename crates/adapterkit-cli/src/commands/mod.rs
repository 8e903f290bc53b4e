pub mod bench;
pub mod encode;
pub mod eval;
pub mod export;
pub mod fuse;
pub mod fusion_weights;
pub mod info;
pub mod merge;
pub mod predict;
pub mod train;

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use std::collections::BTreeSet;

use adapterkit::adapter_model::AdapterModel;
use adapterkit::io::adapter_dir;
use adapterkit::model::load::Pretrained;
use adapterkit::model::Precision;
use adapterkit::tokenizer::TextTokenizer;

/// A pre-trained model and trained adapter (or fusion) directories to run on it.
#[derive(clap::Args, Debug, Clone)]
pub struct TunedArgs {
    /// The pre-trained model the adapter was trained on (directory or hub id).
    #[arg(long)]
    pub model: String,
    /// A directory saved by `adapterkit train` or `fuse` (or AdapterHub's `save_adapter`);
    /// `predict --setup` takes several (`--adapter A --adapter B`).
    #[arg(long, required = true)]
    pub adapter: Vec<PathBuf>,
}

impl TunedArgs {
    /// The one adapter directory (several need a composition setup).
    pub fn dir(&self) -> Result<&PathBuf> {
        match self.adapter.as_slice() {
            [one] => Ok(one),
            _ => anyhow::bail!(
                "give one --adapter directory; several run together only under `predict --setup`"
            ),
        }
    }

    /// The tokenizer (truncating as the adapter was trained, or to `max_seq_len`) and the
    /// model with the adapter (and head) loaded.
    pub fn load(
        &self,
        max_seq_len: &MaxSeqLen,
        device: &Device,
    ) -> Result<(TextTokenizer, AdapterModel)> {
        let dir = self.dir()?;
        let mut pretrained = Pretrained::load(&self.model, device)?;
        let tuned = adapter_dir::load(dir, pretrained.model, device)?;
        if let Some(n) = adapter_dir::recorded_max_seq_len(dir)? {
            pretrained.tokenizer.set_max_length(n)?;
        }
        max_seq_len.apply(&mut pretrained.tokenizer)?;
        Ok((pretrained.tokenizer, tuned.frozen()))
    }
}

/// `--max-seq-len`: how many tokens of a text the model reads.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MaxSeqLen {
    /// Truncate texts to N tokens, special tokens included (default: what the adapter was
    /// trained with, else what the model takes).
    #[arg(long, value_name = "N")]
    pub max_seq_len: Option<usize>,
}

impl MaxSeqLen {
    pub fn apply(&self, tokenizer: &mut TextTokenizer) -> Result<()> {
        if let Some(n) = self.max_seq_len {
            tokenizer.set_max_length(n)?;
        }
        Ok(())
    }
}

/// `--dtype`: the precision of the encoder's frozen matrix products.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DtypeArg {
    /// f32; bf16: the frozen encoder's matrix products in bf16 with f32 sums; int8 (inference
    /// only): in int8, each input row and weight column quantised with its own scale. Adapters,
    /// heads, attention scores, softmax and LayerNorm stay in f32.
    #[arg(long, default_value = "f32", value_name = "f32|bf16|int8")]
    pub dtype: Precision,
}

/// AdapterDrop at inference: which layers' adapters to skip.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DropArgs {
    /// Skip the adapters of these layers (AdapterHub's `skip_layers`), e.g. `0,1,2`.
    #[arg(long, value_delimiter = ',', conflicts_with = "drop_lower")]
    skip_layers: Vec<usize>,
    /// Skip the adapters of the lowest N layers.
    #[arg(long, value_name = "N")]
    drop_lower: Option<usize>,
}

impl DropArgs {
    /// The layers to skip (the model checks that it has them).
    pub fn layers(&self) -> BTreeSet<usize> {
        match self.drop_lower {
            Some(n) => (0..n).collect(),
            None => self.skip_layers.iter().copied().collect(),
        }
    }

    /// Applies the choice to `model`.
    pub fn apply(&self, model: &mut AdapterModel) -> Result<()> {
        Ok(model.set_skip_layers(&self.layers())?)
    }
}
