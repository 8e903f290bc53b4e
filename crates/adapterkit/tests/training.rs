//! The training loop on the tiny random BERT: what changes, what must not, and determinism.

mod common;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::data::{Dataset, Example, Target, TaskKind};
use adapterkit::heads::HeadConfig;
use adapterkit::io::adapter_dir;
use adapterkit::model::load::ModelFiles;
use adapterkit::model::{BertModel, Mode};
use adapterkit::tokenizer::TextTokenizer;
use adapterkit::train::batches::EncodedDataset;
use adapterkit::train::{self, Output, Silent, TrainConfig};
use candle_core::Device;
use common::*;

/// The tiny BERT's shape with weights of std 0.2: in the 0.02-std fixture the first token's
/// state hardly depends on the rest of the text, which leaves a toy task nothing to learn.
fn encoder() -> BertModel {
    let files = ModelFiles::in_dir(&tiny_bert_dir()).unwrap();
    BertModel::random(&files.load_config().unwrap(), 0.2, 3, &Device::Cpu).unwrap()
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&tiny_bert_dir(), 64).unwrap()
}

/// A learnable toy task: is the animal a cat or a dog?
fn toy(name: &str, n: usize) -> Dataset {
    let subjects = ["the", "my", "this", "that", "he", "she", "we", "you"];
    let verbs = ["sat on", "ran to", "is in", "sat in"];
    let examples = (0..n)
        .map(|i| {
            let cat = i % 2 == 0;
            let text = format!(
                "{} {} {} the mat",
                subjects[i % subjects.len()],
                if cat { "cat" } else { "dog" },
                verbs[(i / 2) % verbs.len()]
            );
            Example {
                text,
                text_pair: None,
                target: Target::Class(if cat { "cat" } else { "dog" }.into()),
            }
        })
        .collect();
    Dataset {
        name: name.into(),
        examples,
    }
}

fn head_config() -> HeadConfig {
    HeadConfig::new(
        TaskKind::Classification,
        &["cat".to_string(), "dog".to_string()],
    )
    .unwrap()
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 8,
        learning_rate: 1e-2,
        seed: 7,
        ..Default::default()
    }
}

fn run(
    method: &str,
    train_layer_norms: bool,
    epochs: usize,
    out: Option<&std::path::Path>,
) -> (AdapterModel, train::TrainSummary) {
    let head = head_config();
    let mut model = AdapterModel::new(
        encoder(),
        &Method::from_name(method).unwrap(),
        "toy",
        head.clone(),
        train_layer_norms,
        7,
        &Device::Cpu,
    )
    .unwrap();
    let tok = tokenizer();
    let train_set = EncodedDataset::new(&toy("train", 64), &tok, &head).unwrap();
    let validation = EncodedDataset::new(&toy("validation", 16), &tok, &head).unwrap();
    let output = out.map(|dir| Output {
        dir,
        model_name: "tiny-bert",
    });
    let summary = train::train(
        &mut model,
        &train_set,
        &validation,
        &config(epochs),
        tok.pad_id(),
        output.as_ref(),
        &mut Silent,
    )
    .unwrap();
    (model, summary)
}

#[test]
fn adapter_training_changes_adapters_only_and_the_loss_falls() {
    let before = encoder().named_tensors();
    let untrained = AdapterModel::new(
        encoder(),
        &Method::from_name("houlsby").unwrap(),
        "toy",
        head_config(),
        false,
        7,
        &Device::Cpu,
    )
    .unwrap();
    let initial = untrained.trainable().snapshot().unwrap();

    let (model, summary) = run("houlsby", false, 10, None);
    for ((name, a), (_, b)) in before.iter().zip(model.encoder.named_tensors()) {
        assert_eq!(max_abs_diff(a, &b), 0.0, "base tensor {name} changed");
    }
    for (name, var) in model.trainable().iter() {
        let moved = max_abs_diff(var.as_tensor(), &initial[name]);
        assert!(moved > 0.0, "{name} did not change");
    }
    let losses: Vec<f64> = summary.epochs.iter().map(|e| e.train_loss).collect();
    // One epoch's loss on the toy set swings by a third with the dropout draws, so the last
    // three epochs' mean is compared.
    let last_three = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        last_three < losses[0] * 0.7,
        "loss did not fall: {losses:?}"
    );
    assert!(
        summary.best_value >= 0.9,
        "validation accuracy {}",
        summary.best_value
    );
}

#[test]
fn layer_norms_train_beside_the_adapter_when_asked() {
    let before = encoder().named_tensors();
    let (model, _) = run("pfeiffer", true, 1, None);
    for ((name, a), (_, b)) in before.iter().zip(model.encoder.named_tensors()) {
        let changed = max_abs_diff(a, &b) > 0.0;
        assert_eq!(changed, name.contains("LayerNorm"), "{name}");
    }
}

#[test]
fn the_same_seed_gives_identical_weights() {
    let (a, _) = run("houlsby", true, 2, None);
    let (b, _) = run("houlsby", true, 2, None);
    for ((name, x), (_, y)) in a.trainable().iter().zip(b.trainable().iter()) {
        assert_eq!(max_abs_diff(x.as_tensor(), y.as_tensor()), 0.0, "{name}");
    }
}

#[test]
fn the_saved_best_adapter_reloads_to_the_same_logits() {
    let out = tempfile::tempdir().unwrap();
    let (model, summary) = run("houlsby", true, 2, Some(out.path()));
    let log = std::fs::read_to_string(out.path().join(train::TRAINING_LOG)).unwrap();
    assert_eq!(log.lines().count(), summary.epochs.len());
    let reloaded = adapter_dir::load(out.path(), encoder(), &Device::Cpu).unwrap();
    let tok = tokenizer();
    let batch = tok
        .batch(&["the cat sat on the mat", "my dog ran"], &Device::Cpu)
        .unwrap();
    let a = model.logits(&batch, &mut Mode::Eval).unwrap();
    let b = reloaded.logits(&batch, &mut Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn head_only_and_full_fine_tuning_run_on_the_same_loop() {
    let before = encoder().named_tensors();
    let (head_only, _) = run("head", false, 1, None);
    for ((name, a), (_, b)) in before.iter().zip(head_only.encoder.named_tensors()) {
        assert_eq!(
            max_abs_diff(a, &b),
            0.0,
            "head-only training changed {name}"
        );
    }
    let (full, _) = run("full", false, 1, None);
    let changed = before
        .iter()
        .zip(full.encoder.named_tensors())
        .filter(|((_, a), (_, b))| max_abs_diff(a, b) > 0.0)
        .count();
    // The pooler is not on the path to the head (it reads the first token's state).
    assert!(
        changed >= before.len() - 2,
        "{changed} of {} tensors changed",
        before.len()
    );
}

#[test]
fn a_label_the_head_does_not_know_is_named() {
    let mut data = toy("eval", 4);
    data.examples[2].target = Target::Class("bird".into());
    let err = EncodedDataset::new(&data, &tokenizer(), &head_config())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("label 'bird'") && err.contains("example 3"),
        "{err}"
    );
}

#[test]
fn a_non_finite_loss_stops_training_with_a_clear_error() {
    let head = HeadConfig::new(TaskKind::Regression, &[]).unwrap();
    let mut model = AdapterModel::new(
        encoder(),
        &Method::from_name("houlsby").unwrap(),
        "toy",
        head.clone(),
        false,
        1,
        &Device::Cpu,
    )
    .unwrap();
    let mut data = toy("train", 8);
    for e in &mut data.examples {
        e.target = Target::Value(f32::MAX);
    }
    let encoded = EncodedDataset::new(&data, &tokenizer(), &head).unwrap();
    let out = tempfile::tempdir().unwrap();
    let output = Output {
        dir: out.path(),
        model_name: "tiny-bert",
    };
    let err = train::train(
        &mut model,
        &encoded,
        &encoded,
        &config(1),
        0,
        Some(&output),
        &mut Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the loss became inf") && err.contains("nothing was saved"),
        "{err}"
    );
    assert!(!out.path().join("adapter.safetensors").exists());
}
