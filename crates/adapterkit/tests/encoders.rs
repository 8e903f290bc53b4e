//! RoBERTa, XLM-RoBERTa, DistilBERT and ELECTRA: tiny models made by `transformers` from each
//! real checkpoint's config (`tests/fixtures/encoders/make_encoder_fixtures.py`) encode a padded
//! batch as `transformers` does, loaded from a bare `model.safetensors` or from a
//! `pytorch_model.bin` whose keys carry the prefix of a model with a head.

mod common;

use adapterkit::model::load::{ModelFiles, Pretrained};
use adapterkit::model::{Architecture, BertModel, Mode, NoHooks};
use adapterkit::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use common::*;

const ARCHITECTURES: [&str; 4] = ["roberta", "xlm-roberta", "distilbert", "electra"];

fn load(dir: &str) -> BertModel {
    let files = ModelFiles::in_dir(&fixtures().join("encoders").join(dir)).unwrap();
    let config = files.load_config().unwrap();
    files.load_model(&config, &Device::Cpu).unwrap()
}

/// `a` and `b` `[batch, seq, hidden]` at the positions `mask` `[batch, seq]` keeps.
fn diff_at_real_tokens(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let a = a.broadcast_mul(&keep).unwrap();
    let b = b.broadcast_mul(&keep).unwrap();
    max_abs_diff(&a, &b)
}

#[test]
fn every_architecture_encodes_a_padded_batch_as_transformers_does() {
    for arch in ARCHITECTURES {
        let expected = load_expected(&format!("encoders/{arch}/expected.safetensors"));
        let ids = &expected["input_ids"];
        let types = match expected.get("token_type_ids") {
            Some(types) => types.clone(),
            None => ids.zeros_like().unwrap(),
        };
        let batch = batch_of(ids, &types, Some(&expected["attention_mask"]));
        for dir in [arch.to_string(), format!("{arch}-prefixed")] {
            let model = load(&dir);
            assert_eq!(
                model.config.architecture(),
                Architecture::from_model_type(arch).unwrap()
            );
            let hidden = model.forward(&batch, &NoHooks, &mut Mode::Eval).unwrap();
            let want = &expected["last_hidden_state"];
            let diff = diff_at_real_tokens(&hidden, want, &expected["attention_mask"]);
            eprintln!("{dir}: max |diff| {diff:.2e}");
            assert!(diff < 1e-5, "{dir}: {diff}");
        }
    }
}

/// RoBERTa's byte-level BPE (`tokenizer.json` as `save_pretrained` writes it) gives
/// transformers' ids, `<s> A </s></s> B </s>` for a pair, and pads with `<pad>`.
#[test]
fn roberta_tokenizes_texts_and_pairs_as_transformers_does() {
    let dir = fixtures().join("encoders/roberta");
    let listing: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("texts.json")).unwrap()).unwrap();
    let pretrained = Pretrained::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let tokenizer = &pretrained.tokenizer;
    assert_eq!(tokenizer.pad_id(), 1);
    let texts = listing["texts"].as_array().unwrap();
    let pairs = listing["pairs"].as_array().unwrap();
    for (i, (text, pair)) in texts.iter().zip(pairs).enumerate() {
        let encoded = tokenizer
            .encode(text.as_str().unwrap(), pair.as_str())
            .unwrap();
        let want: Vec<u32> = serde_json::from_value(listing["input_ids"][i].clone()).unwrap();
        assert_eq!(encoded.ids, want, "{text} / {pair}");
        assert!(encoded.type_ids.iter().all(|&t| t == 0));
    }
}

#[test]
fn roberta_numbers_positions_after_the_padding_id_and_skips_padding() {
    let model = load("roberta");
    // Padding (id 1) anywhere gets position 1; the other tokens count up from 2.
    let ids = Tensor::new(&[[0u32, 5, 6, 2, 1, 1], [1, 1, 0, 7, 1, 2]], &Device::Cpu).unwrap();
    let positions = model.embeddings.position_ids(Some(&ids), 2, 6).unwrap();
    assert_eq!(
        ids_of(&positions),
        vec![vec![2, 3, 4, 5, 1, 1], vec![1, 1, 2, 3, 1, 4]]
    );
    // 514 positions hold 512 tokens.
    assert_eq!(model.config.max_tokens(), 512);
    assert_eq!(model.embeddings.max_positions(), 512);
    let long = Tensor::zeros((1, 513), DType::U32, &Device::Cpu).unwrap();
    let error = model
        .embeddings
        .position_ids(Some(&long), 1, 513)
        .unwrap_err();
    assert!(error.to_string().contains("512 positions"), "{error}");
}

#[test]
fn weights_of_another_architecture_are_refused_with_the_reason() {
    // A DistilBERT config over BERT-named weights: the missing tensor is named.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("encoders/roberta"), dir.path());
    let distilbert = std::fs::read_to_string(fixtures().join("encoders/distilbert/config.json"));
    let roberta = ModelFiles::in_dir(&fixtures().join("encoders/roberta")).unwrap();
    let vocab = roberta.load_config().unwrap().vocab_size;
    let config = (distilbert.unwrap())
        .replace(
            "\"max_position_embeddings\": 512",
            "\"max_position_embeddings\": 514",
        )
        .replace("\"vocab_size\": 99", &format!("\"vocab_size\": {vocab}"));
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let files = ModelFiles::in_dir(dir.path()).unwrap();
    let config = files.load_config().unwrap();
    let error = files
        .load_model(&config, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(error.contains("transformer.layer.0"), "{error}");
    // A model_type we do not implement is named with the ones we do.
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let error = ModelFiles::in_dir(dir.path())
        .unwrap()
        .load_config()
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("'gpt2' (supported: bert, roberta, xlm-roberta, distilbert, electra)"),
        "{error}"
    );
}

/// XLM-RoBERTa's real Unigram tokenizer (`scripts/fetch-assets.sh`) gives `transformers`' ids
/// on texts in several scripts and on a pair.
#[test]
fn xlm_roberta_tokenizes_as_transformers_does() {
    let Some(dir) = asset_dir("xlm-roberta-tokenizer", "tokenizer.json") else {
        return;
    };
    let tokenizer = TextTokenizer::from_dir(&dir, 512).unwrap();
    assert_eq!(tokenizer.pad_id(), 1);
    assert_eq!(tokenizer.vocab_size(), 250_002);
    let listing: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("encoders/xlm-roberta-tokens.json")).unwrap(),
    )
    .unwrap();
    for (i, text) in listing["texts"].as_array().unwrap().iter().enumerate() {
        let encoded = tokenizer.encode(text.as_str().unwrap(), None).unwrap();
        let want: Vec<u32> = serde_json::from_value(listing["input_ids"][i].clone()).unwrap();
        assert_eq!(encoded.ids, want, "{text}");
    }
    let pair = &listing["pair"];
    let encoded = tokenizer
        .encode(pair[0].as_str().unwrap(), pair[1].as_str())
        .unwrap();
    let want: Vec<u32> = serde_json::from_value(listing["pair_ids"].clone()).unwrap();
    assert_eq!(encoded.ids, want);
}
