//! Hugging Face PEFT's LoRA files against PEFT 0.21 (fixtures made by
//! `tests/fixtures/peft/make_peft_fixtures.py`): a sequence-classification LoRA on
//! query, value and attention.output.dense (and one with rank-stabilised scaling) loads with
//! its pooler-reading classifier, and logits, loss and every gradient agree within 1e-5; we
//! write PEFT's files and read them back.

mod common;

use std::path::{Path, PathBuf};

use adapterkit::adapter_model::{AdapterFormat, AdapterModel};
use adapterkit::io::adapter_dir;
use adapterkit::model::Mode;
use candle_core::{DType, Device};
use common::*;

fn peft_dir(case: &str) -> PathBuf {
    fixtures().join("peft").join(case)
}

fn load(dir: &Path) -> AdapterModel {
    adapter_dir::load(dir, tiny_encoder(), &Device::Cpu).unwrap()
}

/// PEFT's name for one of our parameters.
fn peft_name(ours: &str, adapter: &str) -> String {
    if let Some(part) = ours.strip_prefix(&format!("heads.{adapter}.1.")) {
        return format!("base_model.model.classifier.{part}");
    }
    let (module, matrix) = ours.rsplit_once(&format!(".loras.{adapter}.")).unwrap();
    format!("base_model.model.bert.{module}.{matrix}.weight")
}

#[test]
fn peft_loras_match_peft_logits_loss_and_gradients() {
    for case in ["lora", "rslora"] {
        let dir = peft_dir(case);
        let expected = load_expected(&format!("peft/{case}/expected.safetensors"));
        let batch = batch_of(
            &expected["input_ids"],
            &expected["token_type_ids"],
            Some(&expected["attention_mask"]),
        );
        let model = load(&dir);
        assert_eq!(model.format, AdapterFormat::Peft);
        let hidden = model
            .encoder
            .forward(&batch, model.hooks(), &mut Mode::Eval)
            .unwrap();
        let hidden_diff = max_abs_diff(&hidden, &expected["last_hidden_state"]);
        let logits = model.logits(&batch, &mut Mode::Eval).unwrap();
        let logits_diff = max_abs_diff(&logits, &expected["logits"]);
        let targets = expected["labels"].to_dtype(DType::U32).unwrap();
        let loss = model.head.loss(&logits, &targets).unwrap();
        let loss_diff =
            (loss.to_scalar::<f32>().unwrap() - expected["loss"].to_scalar::<f32>().unwrap()).abs();
        let grads = loss.backward().unwrap();
        let mut grad_diff = 0f32;
        let trainable = model.trainable();
        for (name, var) in trainable.iter() {
            let want = &expected[&format!("grad.{}", peft_name(name, case))];
            grad_diff = grad_diff.max(max_abs_diff(grads.get(var.as_tensor()).unwrap(), want));
        }
        let reference = expected.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(trainable.0.len(), reference, "{case}: trainable tensors");
        let merged = model.frozen().merged().unwrap();
        let merged_diff = max_abs_diff(
            &merged.logits(&batch, &mut Mode::Eval).unwrap(),
            &expected["merged_logits"],
        );
        eprintln!("{case}: hidden {hidden_diff:e}, logits {logits_diff:e}, loss {loss_diff:e}, gradients {grad_diff:e}, merged {merged_diff:e}");
        for diff in [hidden_diff, logits_diff, loss_diff, grad_diff, merged_diff] {
            assert!(diff < 1e-5, "{case}: {diff}");
        }
    }
}

#[test]
fn peft_files_we_write_read_back_and_adapterhub_files_refuse_what_they_cannot_hold() {
    let model = load(&peft_dir("rslora"));
    let expected = load_expected("peft/rslora/expected.safetensors");
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("rslora");
    adapter_dir::save(&dir, &model, "tiny-bert").unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["use_rslora"], true);
    let saved = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(
        saved.contains_key("base_model.model.encoder.layer.1.attention.output.dense.lora_B.weight")
    );
    // The classifier reads the pooler: it is saved as a one-layer head that does.
    let reloaded = load(&dir);
    assert!(reloaded.head.config.use_pooler);
    let before = model.logits(&batch, &mut Mode::Eval).unwrap();
    let after = reloaded.logits(&batch, &mut Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&before, &after), 0.0);

    let mut adapterhub = model.clone();
    adapterhub.format = AdapterFormat::AdapterHub;
    let error = adapter_dir::save(&out.path().join("hub"), &adapterhub, "tiny-bert")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("attention.output.dense") && error.contains("--format peft"),
        "{error}"
    );
}

#[test]
fn peft_configs_we_cannot_run_are_named() {
    for (edit, reason) in [
        (
            r#""peft_type": "IA3""#,
            "peft_type \"IA3\" is not supported",
        ),
        (r#""use_dora": true"#, "use_dora is not supported"),
        (
            r#""target_modules": "query|value""#,
            "a regex is not supported",
        ),
        (r#""target_modules": ["classifier"]"#, "pick no Linear"),
        (r#""bias": "all""#, "bias other than"),
    ] {
        let copy = tempfile::tempdir().unwrap();
        let dir = copy.path().join("lora");
        copy_dir(&peft_dir("lora"), &dir);
        let path = dir.join("adapter_config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let patch: serde_json::Value = serde_json::from_str(&format!("{{{edit}}}")).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::write(&path, config.to_string()).unwrap();
        let error = adapter_dir::load(&dir, tiny_encoder(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(error.contains(reason), "{edit}: {error}");
    }
}
