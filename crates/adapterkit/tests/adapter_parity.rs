//! Adapters and heads against PyTorch + AdapterHub's `adapters` 1.3: bottleneck adapters
//! (fixtures made by `tests/fixtures/adapters/make_adapter_fixtures.py`), LoRA, (IA)³ and a
//! union of a LoRA and a bottleneck adapter (`tests/fixtures/lora/make_lora_fixtures.py`), prefix
//! tuning (`tests/fixtures/prefix/make_prefix_fixtures.py`). The
//! saved directories load, logits, loss and every trainable gradient agree within 1e-5, and
//! what we save is what Python saved.

mod common;

use std::path::{Path, PathBuf};

use adapterkit::adapter_model::AdapterModel;
use adapterkit::io::adapter_dir;
use adapterkit::model::load::ModelFiles;
use adapterkit::model::Mode;
use candle_core::{DType, Device, Tensor};
use common::*;

const CASES: &[&str] = &[
    "adapters/houlsby",
    "adapters/pfeiffer",
    "adapters/parallel",
    "adapters/houlsby_ln",
    "adapters/regression",
    "lora/lora_qv",
    "lora/lora_all",
    "lora/ia3",
    "lora/union",
    "prefix/prefix",
    "prefix/prefix_flat",
    "prefix/prefix_leave",
    "prefix/mam",
    "prefix/gated_prefix",
    "prefix/gated_prefix2",
    "prefix/gated_bn",
    "prefix/gated_lora",
    "prefix/unipelt",
];

fn case_dir(case: &str) -> PathBuf {
    fixtures().join(case)
}

fn load_case(dir: &Path) -> AdapterModel {
    adapter_dir::load(dir, tiny_encoder(), &Device::Cpu).unwrap()
}

/// A copy of the adapter and head saved in `dir`, their pickle files alone.
fn pickles_only(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for name in [
        "adapter_config.json",
        "head_config.json",
        "pytorch_adapter.bin",
        "pytorch_model_head.bin",
    ] {
        std::fs::copy(dir.join(name), copy.path().join(name)).unwrap();
    }
    copy
}

/// The fixture's batch (token types all 0 where the model has none).
fn expected_batch(
    expected: &std::collections::HashMap<String, Tensor>,
) -> adapterkit::batch::Batch {
    let ids = &expected["input_ids"];
    let types =
        (expected.get("token_type_ids").cloned()).unwrap_or_else(|| ids.zeros_like().unwrap());
    batch_of(ids, &types, Some(&expected["attention_mask"]))
}

fn targets(expected: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let labels = &expected["labels"];
    match labels.dtype() {
        DType::F32 => labels.clone(),
        _ => labels.to_dtype(DType::U32).unwrap(),
    }
}

#[test]
fn logits_loss_and_gradients_match_adapters_library() {
    for case in CASES {
        matches_adapters_library(case, tiny_encoder());
    }
}

/// LoRA and (IA)³ on the real all-MiniLM-L6-v2 (layers 0 and 5, a one-layer head; fixtures by
/// `tests/fixtures/lora/make_minilm_lora_fixture.py`).
#[test]
fn lora_and_ia3_on_minilm_match_adapters_library() {
    let Some(dir) = minilm_dir() else { return };
    let files = adapterkit::model::load::ModelFiles::in_dir(&dir).unwrap();
    let encoder = files
        .load_model(&files.load_config().unwrap(), &Device::Cpu)
        .unwrap();
    for case in ["lora/minilm/lora", "lora/minilm/ia3"] {
        matches_adapters_library(case, encoder.clone());
    }
}

/// Houlsby adapters (and LoRA, and a prefix on DistilBERT) with heads, made by adapters 1.3 on
/// the tiny RoBERTa, XLM-R, DistilBERT and ELECTRA (`tests/fixtures/encoders/adapters/`): they
/// load from either file format with Python's scores and gradients, save under Python's names
/// and envelope, and refuse to load onto another architecture.
#[test]
fn adapters_on_every_encoder_match_adapters_library() {
    let cases = [
        ("roberta", "houlsby"),
        ("xlm-roberta", "houlsby"),
        ("distilbert", "houlsby"),
        ("electra", "houlsby"),
        ("roberta", "lora"),
        ("distilbert", "lora"),
        ("distilbert", "prefix"),
    ];
    for (arch, method) in cases {
        let files = ModelFiles::in_dir(&fixtures().join("encoders").join(arch)).unwrap();
        let encoder = files
            .load_model(&files.load_config().unwrap(), &Device::Cpu)
            .unwrap();
        let case = format!("encoders/adapters/{arch}-{method}");
        matches_adapters_library(&case, encoder.clone());

        let dir = case_dir(&case);
        let expected =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let batch = expected_batch(&expected);
        let pickles = pickles_only(&dir);
        let model = adapter_dir::load(pickles.path(), encoder.clone(), &Device::Cpu).unwrap();
        let logits = model.logits(&batch, &mut Mode::Eval).unwrap();
        assert!(
            max_abs_diff(&logits, &expected["logits"]) < 1e-5,
            "{case}: .bin"
        );

        // Saved under the names and envelope Python wrote (its .bin repeats a prefix's tensors
        // under every layer's pool, which we do not write).
        let out = tempfile::tempdir().unwrap();
        adapter_dir::save(out.path(), &model, arch).unwrap();
        let ours =
            candle_core::safetensors::load(out.path().join("adapter.safetensors"), &Device::Cpu)
                .unwrap();
        let theirs = adapterkit::io::guard::read_pickle(&dir.join("pytorch_adapter.bin")).unwrap();
        let mut a: Vec<&String> = ours.keys().collect();
        let mut b: Vec<&String> = (theirs.iter().map(|(k, _)| k))
            .filter(|k| !k.contains(".pool."))
            .collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: tensor names");
        let envelope = |d: &Path| -> serde_json::Value {
            let text = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
            serde_json::from_str(&text).unwrap()
        };
        for field in ["model_type", "model_class", "hidden_size", "config"] {
            assert_eq!(
                envelope(out.path())[field],
                envelope(&dir)[field],
                "{case}: {field}"
            );
        }
        let again = adapter_dir::load(out.path(), encoder, &Device::Cpu).unwrap();
        let after = again.logits(&batch, &mut Mode::Eval).unwrap();
        assert_eq!(max_abs_diff(&logits, &after), 0.0, "{case}: reload");

        // A LoRA folded into the encoder: a model directory under the architecture's names,
        // which loads (with its head) to the same scores.
        if method == "lora" {
            let merged = tempfile::tempdir().unwrap();
            adapterkit::io::model_dir::save_merged(merged.path(), &files, &model, arch).unwrap();
            let merged_files = ModelFiles::in_dir(merged.path()).unwrap();
            let config = merged_files.load_config().unwrap();
            let encoder = merged_files.load_model(&config, &Device::Cpu).unwrap();
            let head_only = adapter_dir::load(merged.path(), encoder, &Device::Cpu).unwrap();
            let folded = head_only.logits(&batch, &mut Mode::Eval).unwrap();
            let diff = max_abs_diff(&folded, &expected["logits"]);
            assert!(diff < 1e-5, "{case}: merged, {diff}");
        }

        // Onto BERT: refused, naming both architectures.
        let error = adapter_dir::load(&dir, tiny_encoder(), &Device::Cpu).unwrap_err();
        let wanted = format!("made for model_type '{arch}', but the model is 'bert'");
        assert!(error.to_string().contains(&wanted), "{case}: {error}");
    }
}

/// A dynamic AdapterFusion of two Houlsby adapters on DistilBERT, made by adapters 1.3 (its
/// `attention_adapters` / `output_adapters` names): scores and gradients, and saved back under
/// Python's names.
#[test]
fn a_fusion_on_distilbert_matches_adapters_library() {
    let files = ModelFiles::in_dir(&fixtures().join("encoders/distilbert")).unwrap();
    let encoder = files
        .load_model(&files.load_config().unwrap(), &Device::Cpu)
        .unwrap();
    let case = "encoders/adapters/distilbert-fusion";
    matches_adapters_library(case, encoder.clone());
    let model = adapter_dir::load(&case_dir(case), encoder, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    adapter_dir::save(out.path(), &model, "distilbert").unwrap();
    for file in ["model_adapter_fusion.safetensors", "a/adapter.safetensors"] {
        let names = |d: &Path| {
            let tensors = candle_core::safetensors::load(d.join(file), &Device::Cpu).unwrap();
            let mut names: Vec<String> = tensors.into_keys().collect();
            names.sort();
            names
        };
        assert_eq!(names(out.path()), names(&case_dir(case)), "{file}");
    }
}

/// Hidden states, logits, loss and every trainable gradient within 1e-5 of the fixture's.
fn matches_adapters_library(case: &str, encoder: adapterkit::model::BertModel) {
    let dir = case_dir(case);
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let batch = expected_batch(&expected);
    let architecture = encoder.config.architecture();
    let model = adapter_dir::load(&dir, encoder, &Device::Cpu).unwrap();

    let hidden = model
        .encoder
        .forward(&batch, model.hooks(), &mut Mode::Eval)
        .unwrap();
    let hidden_diff = max_abs_diff(&hidden, &expected["last_hidden_state"]);
    // Logits and gradients by the path training and evaluation take, whose last layer
    // computes the first token alone.
    let logits = model.logits(&batch, &mut Mode::Eval).unwrap();
    let logits_diff = max_abs_diff(&logits, &expected["logits"]);
    let loss = model.head.loss(&logits, &targets(&expected)).unwrap();
    let loss_diff =
        (loss.to_scalar::<f32>().unwrap() - expected["loss"].to_scalar::<f32>().unwrap()).abs();

    let grads = loss.backward().unwrap();
    let mut grad_diff = 0f32;
    let trainable = model.trainable();
    for (name, var) in trainable.iter() {
        // Adapter tensors carry the model-with-head's prefix (`bert.`, ...) in PyTorch and
        // the architecture's module names; an `ln_before` norm is registered there as
        // `adapter_norm_before`.
        let mut torch_name = if name.starts_with("heads.") {
            name.clone()
        } else {
            architecture.file_name(name)
        };
        if model
            .adapter
            .as_ref()
            .and_then(|a| a.bottleneck())
            .is_some_and(|a| a.config.ln_before)
        {
            torch_name = torch_name.replace(".adapter_down.0.", ".adapter_norm_before.");
        }
        // PyTorch names a prefix's parameters after the first layer's view of its pool.
        let pool = architecture.file_name("encoder.layer.0.attention.self.prefix_tuning.pool");
        let layer_view = torch_name.replace(
            &format!("{}.prefix_tuning.", architecture.weight_prefix()),
            &format!("{pool}."),
        );
        let want = (expected.get(&format!("grad.{torch_name}")))
            .or_else(|| expected.get(&format!("grad.{layer_view}")))
            .unwrap_or_else(|| panic!("{case}: no reference gradient for {torch_name}"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        grad_diff = grad_diff.max(max_abs_diff(got, want));
    }
    let reference_count = expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        trainable.0.len(),
        reference_count,
        "{case}: trainable tensors"
    );
    eprintln!("{case}: max |diff| hidden {hidden_diff:e}, logits {logits_diff:e}, loss {loss_diff:e}, gradients {grad_diff:e}");
    assert!(
        hidden_diff < 1e-5 && logits_diff < 1e-5 && loss_diff < 1e-5 && grad_diff < 1e-5,
        "{case}"
    );
}

#[test]
fn pickle_files_load_like_safetensors() {
    for case in [
        "adapters/houlsby",
        "adapters/houlsby_ln",
        "lora/lora_all",
        "lora/ia3",
        "lora/union",
        "prefix/prefix",
        "prefix/prefix_leave",
    ] {
        let copy = pickles_only(&case_dir(case));
        let expected = candle_core::safetensors::load(
            case_dir(case).join("expected.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let batch = batch_of(
            &expected["input_ids"],
            &expected["token_type_ids"],
            Some(&expected["attention_mask"]),
        );
        let logits = load_case(copy.path())
            .logits(&batch, &mut Mode::Eval)
            .unwrap();
        assert!(max_abs_diff(&logits, &expected["logits"]) < 1e-5, "{case}");
    }
}

#[test]
fn save_then_load_gives_identical_logits_and_adapterhub_names() {
    for case in CASES {
        let model = load_case(&case_dir(case));
        let out = tempfile::tempdir().unwrap();
        adapter_dir::save(out.path(), &model, "tiny-bert").unwrap();
        // The same tensor names as the adapters library wrote.
        for file in ["adapter.safetensors", "model_head.safetensors"] {
            let ours = candle_core::safetensors::load(out.path().join(file), &Device::Cpu).unwrap();
            let theirs =
                candle_core::safetensors::load(case_dir(case).join(file), &Device::Cpu).unwrap();
            let mut a: Vec<_> = ours.keys().collect();
            let mut b: Vec<_> = theirs.keys().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{case}: {file} names");
        }
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case_dir(case).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["config"], reference["config"],
            "{case}: adapter config"
        );

        let expected = candle_core::safetensors::load(
            case_dir(case).join("expected.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let batch = batch_of(
            &expected["input_ids"],
            &expected["token_type_ids"],
            Some(&expected["attention_mask"]),
        );
        let before = model.logits(&batch, &mut Mode::Eval).unwrap();
        let after = load_case(out.path())
            .logits(&batch, &mut Mode::Eval)
            .unwrap();
        assert_eq!(
            max_abs_diff(&before, &after),
            0.0,
            "{case}: bit-identical after reload"
        );
    }
}

#[test]
fn an_adapter_with_zero_up_projection_is_the_identity() {
    let mut model = load_case(&case_dir("adapters/houlsby"));
    let adapter = model.adapter.as_mut().unwrap();
    for (name, var) in adapter.params().iter() {
        if name.contains("adapter_up") {
            var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
        }
    }
    let expected = load_expected("tiny-bert-expected.safetensors");
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    let with_adapter = model
        .encoder
        .forward(&batch, model.hooks(), &mut Mode::Eval)
        .unwrap();
    let plain = model
        .encoder
        .forward(&batch, &adapterkit::model::NoHooks, &mut Mode::Eval)
        .unwrap();
    assert_eq!(max_abs_diff(&with_adapter, &plain), 0.0);
}

#[test]
fn an_adapter_for_another_hidden_size_is_named() {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(case_dir("adapters/houlsby")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let path = copy.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"hidden_size\": 32", "\"hidden_size\": 384");
    std::fs::write(&path, text).unwrap();
    let err = adapter_dir::load(copy.path(), tiny_encoder(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("hidden size 384"),
        "{err}"
    );
}

#[test]
fn a_directory_left_half_written_is_refused() {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&case_dir("adapters/houlsby"), copy.path());
    std::fs::write(copy.path().join(".adapterkit-saving"), "").unwrap();
    let err = adapter_dir::load(copy.path(), tiny_encoder(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("being written when its run stopped"), "{err}");
    // A save completes the set and takes the mark away.
    let model = load_case(&case_dir("adapters/houlsby"));
    adapter_dir::save(copy.path(), &model, "tiny-bert").unwrap();
    assert!(!copy.path().join(".adapterkit-saving").exists());
    load_case(copy.path());
}

#[test]
fn adapter_weights_without_their_config_are_refused() {
    for weights in ["adapter.safetensors", "pytorch_adapter.bin"] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(&case_dir("adapters/houlsby"), copy.path());
        std::fs::remove_file(copy.path().join("adapter_config.json")).unwrap();
        let other = ["adapter.safetensors", "pytorch_adapter.bin"]
            .into_iter()
            .find(|w| *w != weights)
            .unwrap();
        std::fs::remove_file(copy.path().join(other)).unwrap();
        let err = adapter_dir::load(copy.path(), tiny_encoder(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(weights) && err.contains("without their adapter_config.json"),
            "{err}"
        );
    }
}

#[test]
fn saving_over_an_older_adapter_removes_what_the_new_model_lacks() {
    let out = tempfile::tempdir().unwrap();
    let with_adapter = load_case(&case_dir("adapters/houlsby"));
    adapter_dir::save(out.path(), &with_adapter, "tiny-bert").unwrap();
    let head_only = AdapterModel {
        adapter: None,
        ..with_adapter
    };
    adapter_dir::save(out.path(), &head_only, "tiny-bert").unwrap();
    assert!(
        !out.path().join("adapter_config.json").exists()
            && !out.path().join("adapter.safetensors").exists()
    );
    assert!(adapter_dir::load(out.path(), tiny_encoder(), &Device::Cpu)
        .unwrap()
        .adapter
        .is_none());
}

#[test]
fn a_head_whose_label_ids_do_not_number_its_outputs_is_named() {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(case_dir("adapters/houlsby")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let path = copy.path().join("head_config.json");
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"pos\": 2", "\"pos\": 7"),
    )
    .unwrap();
    let err = adapter_dir::load(copy.path(), tiny_encoder(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head_config.json") && err.contains("label2id"),
        "{err}"
    );
}
