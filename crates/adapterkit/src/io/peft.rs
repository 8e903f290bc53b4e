//! Hugging Face PEFT's LoRA files: `adapter_config.json` with `"peft_type": "LORA"` and
//! `adapter_model.safetensors` (or `.bin`), read and written.
//!
//! PEFT names a LoRA by its Linear, `base_model.model.[bert.]encoder.layer.{i}.attention.self.query.lora_A.weight`
//! (`[r, in]`, as AdapterHub's `lora_A`), and picks Linears by `target_modules`: a name matches
//! a module whose path is it or ends with `.` and it. A sequence-classification adapter also
//! saves the model's `classifier` (`modules_to_save`), which reads the pooler's output: it is
//! loaded as a one-layer head that does (`use_pooler`). We write the LoRA in PEFT's form for a
//! plain `BertModel` (no `bert.` prefix, each Linear named in full) and our head in AdapterHub's
//! files beside it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::adapter_model::{AdapterFormat, AdapterModel};
use crate::error::{Error, Result};
use crate::heads::{Head, HeadConfig};
use crate::io::adapter_dir::{read_tensors, ADAPTER_CONFIG};
use crate::io::atomic::{write_atomic, write_json_atomic};
use crate::methods::adapter::Adapter;
use crate::methods::lora::{CompositionMode, LoraConfig, PeftOnly};
use crate::model::hooks::LinearSite;
use crate::model::BertModel;
use crate::params::Params;
use crate::rng::SeededRng;

pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
pub const PEFT_WEIGHTS_PICKLE: &str = "adapter_model.bin";
/// What PEFT prefixes every saved key with.
const PREFIX: &str = "base_model.model.";

/// The fields of PEFT's `LoraConfig` we read; the rest must keep their defaults.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f32,
    target_modules: Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default = "none")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    layers_to_transform: Option<Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

fn none() -> String {
    "none".into()
}

/// Whether `dir`'s `adapter_config.json` is PEFT's (it has `peft_type`).
pub fn is_peft(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|json| json.get("peft_type").is_some())
}

/// The Linears of one layer that PEFT's `target_modules` pick in `layer`.
fn targeted(targets: &[String], layer: usize) -> Vec<LinearSite> {
    LinearSite::ALL
        .into_iter()
        .filter(|site| {
            let path = format!("encoder.layer.{layer}.{}", site.module());
            targets
                .iter()
                .any(|t| path == *t || path.ends_with(&format!(".{t}")))
        })
        .collect()
}

/// Our LoRA config for PEFT's, checked against what we implement.
fn lora_config(peft: &PeftConfig, layers: usize) -> std::result::Result<LoraConfig, String> {
    if peft.peft_type != "LORA" {
        return Err(format!(
            "peft_type \"{}\" is not supported (LORA is)",
            peft.peft_type
        ));
    }
    let unsupported = [
        (peft.use_dora, "use_dora"),
        (peft.bias != "none", "bias other than \"none\""),
        (peft.fan_in_fan_out, "fan_in_fan_out"),
        (!peft.rank_pattern.is_empty(), "rank_pattern"),
        (!peft.alpha_pattern.is_empty(), "alpha_pattern"),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(format!("{what} is not supported by adapterkit"));
    }
    let targets: Vec<String> = serde_json::from_value(peft.target_modules.clone())
        .map_err(|_| "target_modules must be a list of module names (a regex is not supported)")?;
    let transformed: Option<Vec<usize>> = match &peft.layers_to_transform {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
        Some(list) => serde_json::from_value(list.clone()).ok(),
    };
    let mut sites: Option<Vec<LinearSite>> = None;
    let mut leave_out = Vec::new();
    for layer in 0..layers {
        let here = targeted(&targets, layer);
        let kept = transformed.as_ref().is_none_or(|t| t.contains(&layer));
        if here.is_empty() || !kept {
            leave_out.push(layer);
            continue;
        }
        match &sites {
            Some(s) if *s != here => {
                return Err(
                    "target_modules pick other Linears in different layers, which \
                            adapterkit does not support"
                        .into(),
                )
            }
            _ => sites = Some(here),
        }
    }
    let sites = sites.ok_or("target_modules pick no Linear of the encoder's layers")?;
    let letters = [
        (LinearSite::Query, "q"),
        (LinearSite::Key, "k"),
        (LinearSite::Value, "v"),
    ];
    let attn_matrices: Vec<String> = letters
        .iter()
        .filter(|(site, _)| sites.contains(site))
        .map(|(_, letter)| letter.to_string())
        .collect();
    let base = LoraConfig::preset("lora").expect("a preset");
    Ok(LoraConfig {
        selfattn_lora: !attn_matrices.is_empty(),
        attn_matrices,
        intermediate_lora: sites.contains(&LinearSite::Intermediate),
        output_lora: sites.contains(&LinearSite::Output),
        leave_out,
        r: peft.r,
        alpha: peft.lora_alpha,
        dropout: peft.lora_dropout,
        peft_only: PeftOnly {
            attention_output: sites.contains(&LinearSite::AttentionOutput),
            rslora: peft.use_rslora,
        },
        ..base
    })
}

/// The adapter's name: the directory's, if it is a usable name, else PEFT's `default`.
fn adapter_name(dir: &Path) -> String {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match crate::methods::bottleneck::check_name(name) {
        Ok(()) => name.to_string(),
        Err(_) => "default".into(),
    }
}

/// Loads a PEFT LoRA saved in `dir` onto `encoder`, with its head: the `classifier` a
/// sequence-classification adapter saves, or AdapterHub head files beside it (as we write).
pub fn load(dir: &Path, encoder: BertModel, device: &Device) -> Result<AdapterModel> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config_error = |message: String| Error::Config {
        path: path.clone(),
        message,
    };
    let peft: PeftConfig = serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?;
    let config = lora_config(&peft, encoder.config.num_hidden_layers).map_err(config_error)?;
    let name = adapter_name(dir);
    let mut rng = SeededRng::new(0);
    let adapter = Adapter::new(&name, &config.into(), &encoder.config, &mut rng, device)
        .map_err(|e| Error::file(&path, e))?;
    let (weights, tensors) = read_tensors(dir, PEFT_WEIGHTS, PEFT_WEIGHTS_PICKLE, device)?;
    let mut lora = HashMap::new();
    let mut classifier = HashMap::new();
    for (key, tensor) in tensors {
        let key = key.strip_prefix(PREFIX).unwrap_or(&key);
        let key = key.strip_prefix("bert.").unwrap_or(key);
        if let Some(part) = key.strip_prefix("classifier.") {
            classifier.insert(format!("heads.{name}.1.{part}"), tensor);
            continue;
        }
        let renamed = [".lora_A.weight", ".lora_B.weight"].iter().find_map(|end| {
            let module = key.strip_suffix(end)?;
            let matrix = &end[1..7];
            Some(format!("{module}.loras.{name}.{matrix}"))
        });
        let renamed = renamed.ok_or_else(|| {
            Error::file(
                &weights,
                format!("unexpected tensor {key} in a LoRA adapter"),
            )
        })?;
        lora.insert(renamed, tensor);
    }
    load_all(&weights, &adapter.params(), &lora)?;
    let saves_classifier = peft
        .modules_to_save
        .iter()
        .flatten()
        .any(|m| m == "classifier");
    let mut head = if saves_classifier && !classifier.is_empty() {
        classifier_head(&name, &classifier, &encoder, &weights, device)?
    } else if dir.join(crate::io::adapter_dir::HEAD_CONFIG).exists() {
        crate::io::adapter_dir::read_head(dir, &encoder, device)?
    } else {
        return Err(Error::file(
            dir,
            "a PEFT adapter with neither a saved classifier (modules_to_save) nor a head's \
             head_config.json: there is nothing to predict with",
        ));
    };
    head.read_pooler_of(&encoder)
        .map_err(|e| Error::file(&weights, e))?;
    Ok(AdapterModel {
        encoder,
        adapter: Some(adapter),
        fusion: None,
        train_fused_adapters: false,
        head,
        base_trainable: Params::default(),
        format: AdapterFormat::Peft,
    })
}

/// `transformers`' sequence-classification head, `classifier(dropout(pooler_output))`, as a
/// one-layer head that reads the pooler. Its labels are `LABEL_0`, ... (PEFT saves none).
fn classifier_head(
    name: &str,
    tensors: &HashMap<String, Tensor>,
    encoder: &BertModel,
    path: &Path,
    device: &Device,
) -> Result<Head> {
    let weight = tensors
        .get(&format!("heads.{name}.1.weight"))
        .ok_or_else(|| Error::file(path, "classifier.bias without classifier.weight"))?;
    let outputs = weight.dim(0).map_err(|e| Error::file(path, e))?;
    let labels: Vec<String> = (0..outputs).map(|i| format!("LABEL_{i}")).collect();
    let kind = if outputs == 1 {
        crate::data::TaskKind::Regression
    } else {
        crate::data::TaskKind::Classification
    };
    let config = HeadConfig {
        layers: 1,
        use_pooler: true,
        ..HeadConfig::new(kind, &labels)?
    };
    let (hidden, dropout) = (encoder.config.hidden_size, encoder.config.head_dropout());
    let head = Head::new(
        name,
        config,
        hidden,
        dropout,
        &mut SeededRng::new(0),
        device,
    )?;
    load_all(path, &head.params(), tensors)?;
    Ok(head)
}

fn load_all(path: &Path, params: &Params, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let unexpected = params.load(tensors).map_err(|m| Error::file(path, m))?;
    match unexpected.is_empty() {
        true => Ok(()),
        false => Err(Error::file(
            path,
            format!("unexpected tensors: {}", unexpected.join(", ")),
        )),
    }
}

/// The LoRA PEFT's files can hold: `model`'s adapter, if it is a LoRA alone.
pub fn writable(model: &AdapterModel) -> Result<&crate::methods::lora::Lora> {
    match model.adapter.as_ref().map(|a| (a.lora(), a.modules.len())) {
        Some((Some(lora), 1)) if lora.config.composition_mode == CompositionMode::Add => Ok(lora),
        _ => Err(Error::input(
            "PEFT's files hold a LoRA alone; this adapter is not one (save it in AdapterHub's \
             format)",
        )),
    }
}

/// Writes `model`'s LoRA in PEFT's files into `dir` (the head goes beside it in AdapterHub's,
/// see [`crate::io::adapter_dir::save`]). Only a LoRA alone can be written so.
pub fn save_adapter(dir: &Path, model: &AdapterModel, model_name: &str) -> Result<()> {
    let lora = writable(model)?;
    let config = &lora.config;
    let mut targets = Vec::new();
    let mut tensors = Vec::new();
    for (layer, site, _) in lora.modules() {
        targets.push(format!("encoder.layer.{layer}.{}", site.module()));
    }
    for (name, tensor) in lora.tensors() {
        // `encoder.layer.0.attention.self.query.loras.{name}.lora_A` -> `....query.lora_A.weight`
        let (module, matrix) = name
            .rsplit_once(&format!(".loras.{}.", lora.name))
            .expect("our own key layout");
        tensors.push((format!("{PREFIX}{module}.{matrix}.weight"), tensor));
    }
    let json = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": model_name,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.peft_only.rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
    });
    write_json_atomic(&dir.join(ADAPTER_CONFIG), &json)?;
    let path = dir.join(PEFT_WEIGHTS);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::file(&path, e))?;
    write_atomic(&path, &bytes)
}
