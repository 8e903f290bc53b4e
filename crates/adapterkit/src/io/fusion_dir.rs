//! An AdapterFusion in AdapterHub's layout: `adapter_fusion_config.json` (its `adapter_names`
//! name the fused adapters, saved in sub-directories of the same names) and
//! `model_adapter_fusion.safetensors`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::io::adapter_dir::{
    check_envelope, config_field, envelope, load_params, name_field, read_bottleneck, read_json,
    read_tensors, save_adapter, save_tensors, FUSION_CONFIG, FUSION_WEIGHTS, FUSION_WEIGHTS_PICKLE,
};
use crate::io::atomic::write_json_atomic;
use crate::methods::adapter::Adapter;
use crate::methods::fusion::{Fusion, FusionConfig};
use crate::model::{BertConfig, BertModel};
use crate::rng::SeededRng;

/// Writes `fusion` and the adapters it fuses into `dir`.
pub fn save(dir: &Path, fusion: &Fusion, encoder: &BertConfig, model_name: &str) -> Result<()> {
    for adapter in &fusion.adapters {
        let adapter = Adapter::of_bottleneck(adapter.clone());
        save_adapter(&dir.join(&adapter.name), &adapter, encoder, model_name)?;
    }
    let path = dir.join(FUSION_CONFIG);
    let config = serde_json::to_value(&fusion.config).map_err(|e| Error::file(&path, e))?;
    let mut json = envelope(config, encoder, model_name, &fusion.name());
    json["adapter_names"] = fusion
        .adapters
        .iter()
        .map(|a| a.name.clone())
        .collect::<Vec<_>>()
        .into();
    write_json_atomic(&path, &json)?;
    let tensors = fusion
        .params()
        .iter()
        .map(|(n, v)| (encoder.architecture().file_name(n), v.as_tensor().clone()))
        .collect();
    save_tensors(&dir.join(FUSION_WEIGHTS), tensors)?;
    Ok(())
}

/// Loads a fusion layer saved in `dir` with the adapters its config names, from `dir/{name}/`.
pub fn load(dir: &Path, encoder: &BertModel, device: &Device) -> Result<Fusion> {
    let path = dir.join(FUSION_CONFIG);
    let json = read_json(&path)?;
    check_envelope(&path, &json, encoder)?;
    let config: FusionConfig =
        serde_json::from_value(config_field(&path, &json)?).map_err(|e| Error::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let names: Vec<String> = match json.get("adapter_names") {
        Some(names) => serde_json::from_value(names.clone()).map_err(|e| Error::Config {
            path: path.clone(),
            message: format!("adapter_names: {e}"),
        })?,
        None => name_field(&path, &json)?
            .split(',')
            .map(str::to_owned)
            .collect(),
    };
    let mut adapters = Vec::new();
    for name in &names {
        let adapter_dir = dir.join(name);
        if !adapter_dir.is_dir() {
            return Err(Error::file(
                &path,
                format!(
                    "names adapter '{name}', but {} is missing",
                    adapter_dir.display()
                ),
            ));
        }
        adapters.push(read_bottleneck(&adapter_dir, encoder, device)?.frozen());
    }
    let mut fusion = Fusion::new(
        adapters,
        &config,
        &encoder.config,
        &mut SeededRng::new(0),
        device,
    )
    .map_err(|e| Error::file(&path, e))?;
    fusion.set_schedule(crate::methods::fusion::SCHEDULE_END);
    let (weights, tensors) = read_tensors(dir, FUSION_WEIGHTS, FUSION_WEIGHTS_PICKLE, device)?;
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| (encoder.config.architecture().module_name(&n), t))
        .collect();
    load_params(&weights, &fusion.params(), &tensors)?;
    Ok(fusion)
}
