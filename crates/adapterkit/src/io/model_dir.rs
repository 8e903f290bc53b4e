//! Writing a pre-trained model directory: what `adapterkit merge` makes of a model with its
//! LoRA folded in, a plain Hugging Face directory that `transformers` loads.

use std::path::Path;

use crate::adapter_model::AdapterModel;
use crate::error::{Error, Result};
use crate::io::adapter_dir;
use crate::io::atomic::write_atomic;
use crate::model::load::ModelFiles;

/// Writes `model` with its LoRA or (IA)³ folded into the weights ([`AdapterModel::merged`])
/// into `dir`: the source's `config.json` and tokenizer files, the merged encoder as
/// `model.safetensors` (the source's tensor names, without a model prefix), and the head's
/// files (AdapterHub's layout), so that `predict --model DIR --adapter DIR` runs it. An adapter
/// without a LoRA is refused: there is nothing to fold.
pub fn save_merged(
    dir: &Path,
    source: &ModelFiles,
    model: &AdapterModel,
    model_name: &str,
) -> Result<()> {
    if model.adapter.as_ref().and_then(|a| a.lora()).is_none() {
        return Err(Error::input(
            "the adapter holds no LoRA or (IA)³ module, so there is nothing to merge",
        ));
    }
    if model
        .adapter
        .as_ref()
        .and_then(|a| a.lora())
        .is_some_and(|l| l.config.use_gating())
    {
        return Err(Error::input(
            "a gated LoRA (use_gating) scales its update by a value read off each input, so it \
             cannot be folded into the weights",
        ));
    }
    if !model.base_trainable.0.is_empty() {
        return Err(Error::input(
            "merging a model whose base weights are being trained is not supported",
        ));
    }
    let merged = model.merged()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let copies = [
        Some(&source.config),
        source.tokenizer_json.as_ref(),
        source.vocab_txt.as_ref(),
        source.tokenizer_config.as_ref(),
    ];
    for from in copies.into_iter().flatten() {
        let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
        let name = from.file_name().expect("a file path");
        write_atomic(&dir.join(name), &bytes)?;
    }
    let architecture = merged.encoder.config.architecture();
    let tensors: Vec<(String, _)> = (merged.encoder.named_tensors().into_iter())
        .map(|(name, t)| (architecture.checkpoint_name(&name), t))
        .collect();
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::file(dir.join("model.safetensors"), e))?;
    write_atomic(&dir.join("model.safetensors"), &bytes)?;
    adapter_dir::save(dir, &merged, model_name)
}
