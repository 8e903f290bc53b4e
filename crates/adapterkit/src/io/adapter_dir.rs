//! A trained adapter as a directory in AdapterHub's layout:
//!
//! | file | content |
//! |---|---|
//! | `adapter_config.json` + `adapter.safetensors` | the adapter: a bottleneck adapter, a LoRA, (IA)³, or a union of them (absent for head-only and full fine-tuning; a LoRA may be in PEFT's files instead, `io/peft.rs`) |
//! | `head_config.json` + `model_head.safetensors` | the prediction head and its label map |
//! | `adapter_fusion_config.json` + `model_adapter_fusion.safetensors` | an AdapterFusion layer (`io/fusion_dir.rs`; its `adapter_names` name the fused adapters, saved in sub-directories of the same names) |
//! | `base_weights.safetensors` | ours: base-model tensors that training changed (the LayerNorms trained beside an adapter, or every weight after full fine-tuning) |
//!
//! Python's `adapters` reads the first two pairs (`load_adapter(dir, use_safetensors=True)`);
//! we also read its pickle files (`pytorch_adapter.bin`, `pytorch_model_head.bin`) when the
//! safetensors ones are absent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::adapter_model::{AdapterFormat, AdapterModel};
use crate::composed_model::ComposedModel;
use crate::error::{Error, Result};
use crate::heads::{Head, HeadConfig};
use crate::io::atomic::{write_atomic, write_json_atomic};
use crate::io::fusion_dir;
use crate::methods::adapter::{Adapter, AdapterConfig, Module};
use crate::methods::bottleneck::BottleneckAdapters;
use crate::methods::composition::Setup;
use crate::model::{BertConfig, BertModel};
use crate::params::Params;
use crate::rng::SeededRng;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter.safetensors";
pub const ADAPTER_WEIGHTS_PICKLE: &str = "pytorch_adapter.bin";
pub const HEAD_CONFIG: &str = "head_config.json";
pub const HEAD_WEIGHTS: &str = "model_head.safetensors";
pub const HEAD_WEIGHTS_PICKLE: &str = "pytorch_model_head.bin";
pub const BASE_WEIGHTS: &str = "base_weights.safetensors";
pub const FUSION_CONFIG: &str = "adapter_fusion_config.json";
pub const FUSION_WEIGHTS: &str = "model_adapter_fusion.safetensors";
pub const FUSION_WEIGHTS_PICKLE: &str = "pytorch_model_adapter_fusion.bin";

/// The `adapters` version whose format we write.
pub const ADAPTERHUB_VERSION: &str = "adapters.1.3.0";
/// Present while [`save`] writes a directory: files of two saves may be mixed there, so
/// [`load`] refuses it.
pub const SAVING: &str = ".adapterkit-saving";

pub use crate::io::run_dir::{
    check_output_dir, locate, record_max_seq_len, recorded_max_seq_len, RUN_SETTINGS,
};
/// AdapterHub's envelope around a method's `config`, for a model of `encoder`'s shape.
pub(crate) fn envelope(config: Value, encoder: &BertConfig, model_name: &str, name: &str) -> Value {
    let architecture = encoder.architecture();
    json!({
        "config": config,
        "hidden_size": encoder.hidden_size,
        "model_class": architecture.adapter_model_class(),
        "model_name": model_name,
        "model_type": architecture.model_type(),
        "name": name,
        "version": ADAPTERHUB_VERSION,
    })
}

pub(crate) fn save_tensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::file(path, e))?;
    write_atomic(path, &bytes)
}

/// Saves one adapter (`adapter_config.json` + `adapter.safetensors`) into `dir`, with the tensor
/// names AdapterHub gives it on `encoder`'s architecture.
pub fn save_adapter(
    dir: &Path,
    adapter: &Adapter,
    encoder: &BertConfig,
    model_name: &str,
) -> Result<()> {
    if let Some(what) = adapter
        .lora()
        .and_then(|l| l.config.peft_only.beyond_adapterhub())
    {
        return Err(Error::input(format!(
            "AdapterHub's files cannot hold {what}; save it in PEFT's format (--format peft)"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = adapter.config().to_json();
    write_json_atomic(
        &dir.join(ADAPTER_CONFIG),
        &envelope(config, encoder, model_name, &adapter.name),
    )?;
    let architecture = encoder.architecture();
    let tensors = adapter.tensors().into_iter();
    let tensors = tensors.map(|(name, t)| (architecture.file_name(&name), t));
    save_tensors(&dir.join(ADAPTER_WEIGHTS), tensors.collect())
}

/// Saves `model`'s trained parts into `dir` (created if needed); every file is written
/// atomically, and the set is marked incomplete ([`SAVING`]) until the last one is. A fusion's
/// adapters go to `dir/{adapter name}/`.
pub fn save(dir: &Path, model: &AdapterModel, model_name: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let marker = dir.join(SAVING);
    write_atomic(&marker, b"adapterkit is writing this directory\n")?;
    write_files(dir, model, model_name)?;
    std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // the removal is durable once the directory is synced
    }
    Ok(())
}

fn write_files(dir: &Path, model: &AdapterModel, model_name: &str) -> Result<()> {
    remove_stale(dir, model)?;
    let encoder = &model.encoder.config;
    match (&model.adapter, model.format) {
        (Some(_), AdapterFormat::Peft) => crate::io::peft::save_adapter(dir, model, model_name)?,
        (Some(adapter), AdapterFormat::AdapterHub) => {
            save_adapter(dir, adapter, encoder, model_name)?
        }
        (None, _) => {}
    }
    if let Some(fusion) = &model.fusion {
        fusion_dir::save(dir, fusion, encoder, model_name)?;
    }
    let head = &model.head;
    let config =
        serde_json::to_value(&head.config).map_err(|e| Error::file(dir.join(HEAD_CONFIG), e))?;
    write_json_atomic(
        &dir.join(HEAD_CONFIG),
        &envelope(config, encoder, model_name, &head.name),
    )?;
    save_tensors(&dir.join(HEAD_WEIGHTS), to_pairs(&head.params()))?;
    if !model.base_trainable.0.is_empty() {
        save_tensors(&dir.join(BASE_WEIGHTS), to_pairs(&model.base_trainable))?;
    }
    Ok(())
}

/// Removes what an earlier save into `dir` left that `model` does not have, so that loading
/// `dir` gives back `model` and nothing else.
fn remove_stale(dir: &Path, model: &AdapterModel) -> Result<()> {
    let remove = |path: std::path::PathBuf| -> Result<()> {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
            _ => Ok(()),
        }
    };
    let fusion_path = dir.join(FUSION_CONFIG);
    if fusion_path.exists() {
        let old: Vec<String> = read_json(&fusion_path)?
            .get("adapter_names")
            .and_then(|n| serde_json::from_value(n.clone()).ok())
            .unwrap_or_default();
        let keep: Vec<&str> = model
            .fusion
            .iter()
            .flat_map(|f| f.adapters.iter().map(|a| a.name.as_str()))
            .collect();
        for name in old.iter().filter(|n| {
            !keep.contains(&n.as_str()) && crate::methods::bottleneck::check_name(n).is_ok()
        }) {
            for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
                remove(dir.join(name).join(file))?;
            }
            let _ = std::fs::remove_dir(dir.join(name)); // only if now empty
        }
    }
    let mut stale = vec![HEAD_WEIGHTS_PICKLE];
    let (peft, pickle) = (
        crate::io::peft::PEFT_WEIGHTS,
        crate::io::peft::PEFT_WEIGHTS_PICKLE,
    );
    match (&model.adapter, model.format) {
        (None, _) => stale.extend([
            ADAPTER_CONFIG,
            ADAPTER_WEIGHTS,
            ADAPTER_WEIGHTS_PICKLE,
            peft,
        ]),
        (Some(_), AdapterFormat::AdapterHub) => stale.push(peft),
        (Some(_), AdapterFormat::Peft) => stale.extend([ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE]),
    }
    stale.push(pickle);
    if model.fusion.is_none() {
        stale.extend([FUSION_CONFIG, FUSION_WEIGHTS, FUSION_WEIGHTS_PICKLE]);
    }
    if model.base_trainable.0.is_empty() {
        stale.push(BASE_WEIGHTS);
    }
    for name in stale {
        remove(dir.join(name))?;
    }
    Ok(())
}

fn to_pairs(params: &Params) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Tensors from `safetensors_name` in `dir`, or else from the pickle file (read without
/// executing anything).
pub(crate) fn read_tensors(
    dir: &Path,
    safetensors_name: &str,
    pickle_name: &str,
    device: &Device,
) -> Result<(std::path::PathBuf, HashMap<String, Tensor>)> {
    let st = dir.join(safetensors_name);
    if st.exists() {
        let tensors = candle_core::safetensors::load(&st, device).map_err(|e| {
            Error::file(
                &st,
                format!(
                    "not a readable safetensors file: {}",
                    crate::error::tensor_message(&e)
                ),
            )
        })?;
        return Ok((st, tensors));
    }
    let pickle = dir.join(pickle_name);
    if pickle.exists() {
        let tensors = crate::io::guard::read_pickle(&pickle)?;
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(device)?)))
            .collect::<Result<_>>()?;
        return Ok((pickle, tensors));
    }
    Err(Error::file(
        dir,
        format!("neither {safetensors_name} nor {pickle_name} is here"),
    ))
}

/// Checks an envelope's `hidden_size` and `model_type` against the encoder's.
pub(crate) fn check_envelope(path: &Path, value: &Value, encoder: &BertModel) -> Result<()> {
    let hidden = encoder.config.hidden_size;
    if let Some(h) = value.get("hidden_size").and_then(Value::as_u64) {
        if h as usize != hidden {
            return Err(Error::file(
                path,
                format!("made for hidden size {h}, but the model has {hidden}"),
            ));
        }
    }
    if let Some(t) = value.get("model_type").and_then(Value::as_str) {
        if t != encoder.config.model_type {
            return Err(Error::file(
                path,
                format!(
                    "made for model_type '{t}', but the model is '{}'",
                    encoder.config.model_type
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn config_field(path: &Path, value: &Value) -> Result<Value> {
    value.get("config").cloned().ok_or_else(|| Error::Config {
        path: path.into(),
        message: "no \"config\" object".into(),
    })
}

pub(crate) fn name_field(path: &Path, value: &Value) -> Result<String> {
    value
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Error::Config {
            path: path.into(),
            message: "no \"name\"".into(),
        })
}

/// Sets `params` from `tensors`, naming `path` in any missing, misshapen or unexpected tensor.
pub(crate) fn load_params(
    path: &Path,
    params: &Params,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let unexpected = params.load(tensors).map_err(|m| Error::file(path, m))?;
    if !unexpected.is_empty() {
        return Err(Error::file(
            path,
            format!("unexpected tensors: {}", unexpected.join(", ")),
        ));
    }
    Ok(())
}

/// Loads the adapter and head saved in `dir` onto `encoder`.
pub fn load(dir: &Path, mut encoder: BertModel, device: &Device) -> Result<AdapterModel> {
    let dir = &locate(dir)?;
    if dir.join(SAVING).exists() {
        return Err(Error::file(
            dir,
            "this directory was being written when its run stopped, so its files may come from \
             two epochs; resume the run (train --resume) or train again",
        ));
    }
    if crate::io::peft::is_peft(dir) {
        return crate::io::peft::load(dir, encoder, device);
    }
    let mut head = read_head(dir, &encoder, device)?;
    let adapter = if dir.join(ADAPTER_CONFIG).exists() {
        Some(read_adapter(dir, &encoder, device)?)
    } else {
        // Weights without their config would otherwise run silently as a head-only model.
        if let Some(weights) = [ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE]
            .iter()
            .find(|f| dir.join(f).exists())
        {
            return Err(Error::file(
                dir.join(weights),
                format!(
                    "adapter weights without their {ADAPTER_CONFIG}: the adapter cannot be built"
                ),
            ));
        }
        None
    };
    let fusion_path = dir.join(FUSION_CONFIG);
    if adapter.is_some() && fusion_path.exists() {
        return Err(Error::file(
            dir,
            format!(
                "holds both an adapter ({ADAPTER_CONFIG}) and a fusion ({FUSION_CONFIG}); a \
                 directory is one or the other (a fusion's adapters are in its sub-directories)"
            ),
        ));
    }
    let fusion = if fusion_path.exists() {
        Some(fusion_dir::load(dir, &encoder, device)?)
    } else {
        None
    };

    let base_path = dir.join(BASE_WEIGHTS);
    if base_path.exists() {
        let tensors = candle_core::safetensors::load(&base_path, device)
            .map_err(|e| Error::file(&base_path, crate::error::tensor_message(&e)))?;
        encoder
            .set_tensors(&tensors)
            .map_err(|m| Error::file(&base_path, m))?;
    }
    let head_path = dir.join(HEAD_CONFIG);
    head.read_pooler_of(&encoder)
        .map_err(|e| Error::file(&head_path, e))?;
    Ok(AdapterModel {
        encoder,
        adapter,
        fusion,
        train_fused_adapters: false,
        head,
        base_trainable: Params::default(),
        format: AdapterFormat::AdapterHub,
    })
}

/// The head saved in `dir` (`head_config.json` and its weights).
pub(crate) fn read_head(dir: &Path, encoder: &BertModel, device: &Device) -> Result<Head> {
    // Weights are overwritten from the files; the generator only shapes the modules.
    let mut rng = SeededRng::new(0);
    let head_path = dir.join(HEAD_CONFIG);
    let head_json = read_json(&head_path)?;
    check_envelope(&head_path, &head_json, encoder)?;
    let head_config: HeadConfig = serde_json::from_value(config_field(&head_path, &head_json)?)
        .map_err(|e| Error::Config {
            path: head_path.clone(),
            message: e.to_string(),
        })?;
    head_config
        .validate()
        .map_err(|e| Error::file(&head_path, e))?;
    let head = Head::new(
        &name_field(&head_path, &head_json)?,
        head_config,
        encoder.config.hidden_size,
        encoder.config.head_dropout(),
        &mut rng,
        device,
    )
    .map_err(|e| Error::file(&head_path, e))?;
    let (path, tensors) = read_tensors(dir, HEAD_WEIGHTS, HEAD_WEIGHTS_PICKLE, device)?;
    load_params(&path, &head.params(), &tensors)?;
    Ok(head)
}

/// Loads adapter (and fusion) directories onto `encoder` to run them under `setup`. An adapter
/// trained with the encoder's LayerNorms keeps them in its channels; with several directories,
/// one trained with more of the encoder (full fine-tuning) is refused: they would share it.
pub fn load_composed(
    dirs: &[PathBuf],
    setup: Setup,
    encoder: BertModel,
    device: &Device,
) -> Result<ComposedModel> {
    if dirs.len() > 1 {
        for dir in dirs {
            let names = trained_base_tensors(&locate(dir)?)?;
            if names.iter().any(|n| !n.contains("LayerNorm")) {
                return Err(Error::file(
                    dir.join(BASE_WEIGHTS),
                    "this model was trained with the whole encoder (full fine-tuning), which \
                     composed models cannot share; only adapters compose",
                ));
            }
        }
    }
    let parts = dirs
        .iter()
        .map(|dir| load(dir, encoder.clone(), device))
        .collect::<Result<Vec<_>>>()?;
    // One directory runs on its own encoder, whatever it changed in it.
    let encoder = match &parts[..] {
        [one] => one.encoder.clone(),
        _ => encoder,
    };
    ComposedModel::new(encoder, setup, parts)
}

/// The names of the base-model tensors training changed (`base_weights.safetensors`), if any.
pub fn trained_base_tensors(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join(BASE_WEIGHTS);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, e.to_string()))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(&path, e.to_string()))?;
    Ok(tensors.names().into_iter().map(String::from).collect())
}

/// Loads one adapter saved in `dir` to use apart from the rest of its directory (to fuse it),
/// checked against `encoder`'s shape. An adapter trained together with the encoder's
/// LayerNorms is refused: apart from them it would not be the adapter that was trained.
pub fn load_adapter(
    dir: &Path,
    encoder: &BertModel,
    device: &Device,
) -> Result<BottleneckAdapters> {
    if dir.join(BASE_WEIGHTS).exists() {
        return Err(Error::file(
            dir.join(BASE_WEIGHTS),
            "this adapter was trained together with the encoder's LayerNorms, which a fusion \
             cannot share; train it with --freeze-layer-norms to fuse it",
        ));
    }
    read_bottleneck(dir, encoder, device)
}

/// The bottleneck adapter saved in `dir`, which must hold nothing else (a fusion's part).
pub(crate) fn read_bottleneck(
    dir: &Path,
    encoder: &BertModel,
    device: &Device,
) -> Result<BottleneckAdapters> {
    let adapter = read_adapter(dir, encoder, device)?;
    match &adapter.modules[..] {
        [Module::Bottleneck(bottleneck)] => Ok(bottleneck.clone()),
        _ => Err(Error::file(
            dir.join(ADAPTER_CONFIG),
            format!(
                "a fusion weighs bottleneck adapters only, and '{}' is not one alone",
                adapter.name
            ),
        )),
    }
}

/// Reads the adapter files of `dir` (ours or AdapterHub's `save_adapter`).
fn read_adapter(dir: &Path, encoder: &BertModel, device: &Device) -> Result<Adapter> {
    let path = dir.join(ADAPTER_CONFIG);
    if !path.exists() {
        return Err(Error::file(&path, "missing: not an adapter directory"));
    }
    let json = read_json(&path)?;
    check_envelope(&path, &json, encoder)?;
    let mut raw = config_field(&path, &json)?;
    let version = json.get("version").and_then(Value::as_str);
    // Configs older than AdapterHub's `version` key meant the tanh approximation by "gelu".
    if version.is_none() && raw.get("non_linearity").and_then(Value::as_str) == Some("gelu") {
        raw["non_linearity"] = "gelu_new".into();
    }
    let config = AdapterConfig::from_json(raw, version).map_err(|message| Error::Config {
        path: path.clone(),
        message,
    })?;
    // Weights are overwritten from the file; the generator only shapes the modules.
    let adapter = Adapter::new(
        &name_field(&path, &json)?,
        &config,
        &encoder.config,
        &mut SeededRng::new(0),
        device,
    )
    .map_err(|e| Error::file(&path, e))?;
    let (weights, tensors) = read_tensors(dir, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE, device)?;
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(n, _)| !n.contains(".adapter_norm_before.")) // the alias of adapter_down.0
        // Python's .bin files repeat a prefix's tensors under every layer's pool.
        .filter(|(n, _)| !n.contains(".prefix_tuning.pool."))
        .map(|(n, t)| (encoder.config.architecture().module_name(&n), t))
        .collect();
    load_params(&weights, &adapter.params(), &tensors)?;
    Ok(adapter)
}
