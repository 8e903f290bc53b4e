//! `Predictor`, the library's entry point for inference: texts in, decoded predictions out,
//! equal to the model's own logits; bad requests are errors that say why.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use adapterkit::io::adapter_dir;
use adapterkit::model::Mode;
use adapterkit::predictor::{Prediction, Predictor};
use candle_core::Device;
use common::*;

fn adapter(case: &str) -> PathBuf {
    fixtures().join("adapters").join(case)
}

fn load(dirs: &[PathBuf], setup: Option<&str>) -> adapterkit::Result<Predictor> {
    Predictor::load(tiny_bert_dir().to_str().unwrap(), dirs, setup, &Device::Cpu)
}

const TEXTS: [&str; 2] = ["the cat sat", "a much longer text that pads the other one"];

#[test]
fn a_classifier_gives_the_most_probable_label_and_every_probability() {
    let predictor = load(&[adapter("houlsby")], None).unwrap();
    let model = adapter_dir::load(&adapter("houlsby"), tiny_encoder(), &Device::Cpu).unwrap();
    let batch = predictor.tokenizer.batch(&TEXTS, &Device::Cpu).unwrap();
    let logits = model.logits(&batch, &mut Mode::Eval).unwrap();
    let probabilities = candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let labels = model.head.config.labels();
    let predicted = predictor.predict(&TEXTS).unwrap();
    assert_eq!(predicted.len(), 2);
    for (tasks, want) in predicted.iter().zip(&probabilities) {
        let Some(Prediction::Label { label, scores }) = tasks.get("task") else {
            panic!("{tasks:?}")
        };
        for (name, p) in labels.iter().zip(want) {
            assert!((scores[name] - p).abs() < 1e-6, "{name}");
        }
        let best = want.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(scores[label], best);
    }
}

#[test]
fn a_regression_head_gives_its_value() {
    let predictor = load(&[adapter("regression")], None).unwrap();
    let model = adapter_dir::load(&adapter("regression"), tiny_encoder(), &Device::Cpu).unwrap();
    let batch = predictor.tokenizer.batch(&TEXTS, &Device::Cpu).unwrap();
    let want = model
        .logits(&batch, &mut Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (tasks, want) in predictor.predict(&TEXTS).unwrap().iter().zip(want) {
        assert_eq!(tasks.get("task"), Some(&Prediction::Value { value: want }));
    }
}

#[test]
fn bad_requests_say_what_is_wrong() {
    let two = [adapter("houlsby"), adapter("pfeiffer")];
    let error = load(&two, None).err().unwrap().to_string();
    assert!(error.contains("without a setup"), "{error}");
    let mut predictor = load(&[adapter("houlsby")], None).unwrap();
    let error = predictor
        .set_skip_layers(&BTreeSet::from([2]))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot skip layer 2: the model has 2 layers"),
        "{error}"
    );
    let error = load(&[adapter("houlsby")], Some("parallel(task,"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("expected an adapter name"), "{error}");
}

/// Several threads may serve one loaded model: nothing in it changes during a forward pass.
#[test]
fn inference_models_are_send_and_sync() {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<adapterkit::predictor::Predictor>();
    shared_across_threads::<adapterkit::adapter_model::AdapterModel>();
    shared_across_threads::<adapterkit::composed_model::ComposedModel>();
}
