//! all-MiniLM-L6-v2 against `transformers` and sentence-transformers (fixtures made by
//! `tests/fixtures/make_fixtures.py`). Skipped when the pinned model is not fetched, unless
//! `ADAPTERKIT_REQUIRE_ASSETS=1`.

mod common;

use adapterkit::model::load::Pretrained;
use adapterkit::model::{Mode, NoHooks};
use adapterkit::pooling::Pooling;
use candle_core::Device;
use common::*;

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("minilm-cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn texts(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn last_hidden_states_match_transformers_within_1e4() {
    let Some(dir) = minilm_dir() else { return };
    let pretrained = Pretrained::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let expected = load_expected("minilm-expected.safetensors");
    let cases = cases();
    let mut worst = 0f32;
    for case in ["empty", "long", "non_ascii", "batch"] {
        let texts = texts(&cases[case]);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let batch = pretrained.tokenizer.batch(&refs, &Device::Cpu).unwrap();
        assert_eq!(
            ids_of(&batch.input_ids),
            ids_of(&expected[&format!("{case}.input_ids")]),
            "{case}: token ids differ from transformers'"
        );
        assert_eq!(
            ids_of(&batch.attention_mask),
            ids_of(&expected[&format!("{case}.attention_mask")]),
            "{case}: attention mask differs"
        );
        let hidden = pretrained
            .model
            .forward(&batch, &NoHooks, &mut Mode::Eval)
            .unwrap();
        let diff = max_abs_diff(&hidden, &expected[&format!("{case}.last_hidden_state")]);
        let mask = batch
            .attention_mask
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let on_tokens = max_abs_diff(
            &hidden.broadcast_mul(&mask).unwrap(),
            &expected[&format!("{case}.last_hidden_state")]
                .broadcast_mul(&mask)
                .unwrap(),
        );
        eprintln!(
            "MiniLM {case}: shape {:?}, max |diff| = {diff:e} (real tokens only: {on_tokens:e})",
            hidden.dims()
        );
        assert!(diff < 1e-4, "{case}: max |diff| {diff}");
        worst = worst.max(diff);
    }
    eprintln!("MiniLM worst max |diff| over all cases = {worst:e}");
}

#[test]
fn mean_pooling_matches_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let pretrained = Pretrained::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let reference = &cases()["sentence_transformers"];
    let texts = texts(&reference["texts"]);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batch = pretrained.tokenizer.batch(&refs, &Device::Cpu).unwrap();
    let hidden = pretrained
        .model
        .forward(&batch, &NoHooks, &mut Mode::Eval)
        .unwrap();
    let ours = Pooling::Mean
        .pool(&hidden, &batch.attention_mask)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, theirs) in reference["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let theirs: Vec<f64> = theirs
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let ours: Vec<f64> = ours[i].iter().map(|v| *v as f64).collect();
        let dot: f64 = ours.iter().zip(&theirs).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = dot / (norm(&ours) * norm(&theirs));
        eprintln!("text {i}: cosine with sentence-transformers = {cosine:.9}");
        assert!(cosine > 0.9999, "text {i}: cosine {cosine}");
    }
}
