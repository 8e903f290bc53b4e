pub mod encode;
pub mod eval;
pub mod fuse;
pub mod fusion_weights;
pub mod info;
pub mod predict;
pub mod train;

use std::path::Path;

use anyhow::Result;
use candle_core::Device;

use adapterkit::adapter_model::AdapterModel;
use adapterkit::io::adapter_dir;
use adapterkit::model::load::Pretrained;
use adapterkit::tokenizer::TextTokenizer;

/// The pre-trained model with the adapter (and head) saved in `adapter`.
pub fn load_tuned(
    model: &str,
    adapter: &Path,
    device: &Device,
) -> Result<(TextTokenizer, AdapterModel)> {
    let pretrained = Pretrained::load(model, device)?;
    let tuned = adapter_dir::load(adapter, pretrained.model, device)?;
    Ok((pretrained.tokenizer, tuned))
}
