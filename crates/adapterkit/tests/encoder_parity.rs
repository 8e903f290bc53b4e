//! The encoder against PyTorch / `transformers` on a tiny random BERT (fixtures made by
//! `tests/fixtures/make_fixtures.py`): forward, gradients, batching, tokenization.

mod common;

use std::collections::HashMap;

use adapterkit::batch::Batch;
use adapterkit::model::layer::Positions;
use adapterkit::model::load::ModelFiles;
use adapterkit::model::{BertModel, Mode, NoHooks};
use adapterkit::tokenizer::TextTokenizer;
use candle_core::{Device, Tensor, Var};
use common::*;

fn tiny_model() -> BertModel {
    let files = ModelFiles::in_dir(&tiny_bert_dir()).unwrap();
    let config = files.load_config().unwrap();
    files.load_model(&config, &Device::Cpu).unwrap()
}

/// The reference values of the tiny BERT and the batch they were computed on.
fn tiny_fixture() -> (HashMap<String, Tensor>, Batch) {
    let expected = load_expected("tiny-bert-expected.safetensors");
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    (expected, batch)
}

#[test]
fn forward_matches_transformers_within_1e5() {
    let (expected, batch) = tiny_fixture();
    let model = tiny_model();
    let hidden = model.forward(&batch, &NoHooks, &mut Mode::Eval).unwrap();
    let diff = max_abs_diff(&hidden, &expected["last_hidden_state"]);
    eprintln!("tiny BERT last_hidden_state max |diff| = {diff:e}");
    assert!(diff < 1e-5, "max |diff| {diff}");

    let pooled = model.pooler.as_ref().unwrap().forward(&hidden).unwrap();
    let diff = max_abs_diff(&pooled, &expected["pooler_output"]);
    assert!(diff < 1e-5, "pooler max |diff| {diff}");
}

#[test]
fn input_embedding_gradient_matches_transformers_within_1e5() {
    let (expected, batch) = tiny_fixture();
    let model = tiny_model();
    let embeds =
        Var::from_tensor(&model.embeddings.word_embeds(&batch.input_ids).unwrap()).unwrap();
    let hidden = model
        .forward_embeds(embeds.as_tensor(), &batch, &NoHooks, &mut Mode::Eval)
        .unwrap();
    let loss = (hidden * &expected["probe"]).unwrap().sum_all().unwrap();
    let loss_diff =
        (loss.to_scalar::<f32>().unwrap() - expected["loss"].to_scalar::<f32>().unwrap()).abs();
    assert!(loss_diff < 1e-5, "loss differs by {loss_diff}");

    let grads = loss.backward().unwrap();
    let grad = grads
        .get(embeds.as_tensor())
        .expect("a gradient for the input embeddings");
    let diff = max_abs_diff(grad, &expected["grad_inputs_embeds"]);
    eprintln!("tiny BERT d loss / d inputs_embeds max |diff| = {diff:e}");
    assert!(diff < 1e-5, "gradient max |diff| {diff}");
}

#[test]
fn a_batch_gives_the_same_outputs_as_its_texts_one_by_one() {
    let expected = load_expected("tiny-bert-expected.safetensors");
    let model = tiny_model();
    let full = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    let batched = model.forward(&full, &NoHooks, &mut Mode::Eval).unwrap();
    for row in 0..2 {
        let single = batch_of(
            &expected[&format!("ids_single_{row}")],
            &expected[&format!("token_type_ids_single_{row}")],
            None,
        );
        let alone = model.forward(&single, &NoHooks, &mut Mode::Eval).unwrap();
        let len = alone.dim(1).unwrap();
        let from_batch = batched
            .narrow(0, row, 1)
            .unwrap()
            .narrow(1, 0, len)
            .unwrap();
        let diff = max_abs_diff(&alone, &from_batch);
        assert!(diff < 1e-6, "row {row}: batched vs alone max |diff| {diff}");
        let diff = max_abs_diff(&alone, &expected[&format!("hidden_single_{row}")]);
        assert!(
            diff < 1e-5,
            "row {row}: alone vs transformers max |diff| {diff}"
        );
    }
}

#[test]
fn tokenizer_json_and_vocab_txt_give_transformers_ids() {
    let expected = load_expected("tiny-bert-expected.safetensors");
    let want = ids_of(&expected["input_ids"]);
    let dir = tiny_bert_dir();
    let from_json = TextTokenizer::from_dir(&dir, 64).unwrap();
    let from_vocab = TextTokenizer::from_files(
        None,
        Some(dir.join("vocab.txt")),
        Some(dir.join("tokenizer_config.json")),
        &dir,
        64,
    )
    .unwrap();
    for tokenizer in [&from_json, &from_vocab] {
        let pair = tokenizer.encode("the cat", Some("sat on")).unwrap();
        assert_eq!(pair.ids, want[0]);
        assert_eq!(pair.type_ids, vec![0, 0, 0, 0, 1, 1, 1]);
        let single = tokenizer.encode("hello world!", None).unwrap();
        assert_eq!(single.ids, want[1][..5]);
        let batch: Batch = tokenizer
            .batch(&["the cat", "hello world!"], &Device::Cpu)
            .unwrap();
        assert_eq!(ids_of(&batch.attention_mask)[0], vec![1, 1, 1, 1, 0]);
    }
}

#[test]
fn dropout_in_training_is_seeded() {
    let (_, batch) = tiny_fixture();
    let model = tiny_model();
    let run = |seed| {
        model
            .forward(&batch, &NoHooks, &mut Mode::train(seed))
            .unwrap()
    };
    let eval = model.forward(&batch, &NoHooks, &mut Mode::Eval).unwrap();
    assert_eq!(
        max_abs_diff(&run(1), &run(1)),
        0.0,
        "same seed, same output"
    );
    assert!(
        max_abs_diff(&run(1), &run(2)) > 1e-3,
        "other seed, other dropout"
    );
    assert!(
        max_abs_diff(&run(1), &eval) > 1e-3,
        "training applies dropout"
    );
}

#[test]
fn a_sequence_longer_than_the_positions_is_a_clear_error() {
    let model = tiny_model();
    let ids = candle_core::Tensor::ones((1, 65), candle_core::DType::U32, &Device::Cpu).unwrap();
    let batch = Batch {
        token_type_ids: ids.zeros_like().unwrap(),
        attention_mask: ids.clone(),
        input_ids: ids,
    };
    let err = model
        .forward(&batch, &NoHooks, &mut Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("65 tokens") && err.contains("64 positions"),
        "{err}"
    );
}

/// `forward_at(.., Positions::First, ..)` (the last layer at the first position alone, what `logits` runs)
/// against `forward`'s first position: the same states, and for a fully trainable encoder (the
/// node-by-node path) the same gradient for every weight; for a frozen one (the fused block
/// ops) the same states.
#[test]
fn the_first_position_alone_matches_every_position() {
    let (expected, batch) = tiny_fixture();
    let frozen = tiny_model();
    let every = frozen.forward(&batch, &NoHooks, &mut Mode::Eval).unwrap();
    let first = frozen
        .forward_at(&batch, Positions::First, &NoHooks, &mut Mode::Eval)
        .unwrap();
    assert_eq!(first.dims()[1], 1);
    let diff = max_abs_diff(&first, &every.narrow(1, 0, 1).unwrap());
    assert!(diff < 1e-6, "frozen: states differ by {diff}");

    let mut trainable = tiny_model();
    let params = trainable.make_trainable(|_| true).unwrap();
    let probe = expected["probe"].narrow(1, 0, 1).unwrap();
    let grads_of = |hidden: &Tensor| {
        (hidden * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let every = trainable
        .forward(&batch, &NoHooks, &mut Mode::Eval)
        .unwrap();
    let first = trainable
        .forward_at(&batch, Positions::First, &NoHooks, &mut Mode::Eval)
        .unwrap();
    let every_first = every.narrow(1, 0, 1).unwrap();
    let diff = max_abs_diff(&first, &every_first);
    assert!(diff < 1e-6, "trainable: states differ by {diff}");
    let (a, b) = (grads_of(&every_first), grads_of(&first));
    let mut compared = 0;
    for (name, var) in params.iter() {
        let (ga, gb) = match (a.get(var.as_tensor()), b.get(var.as_tensor())) {
            (Some(ga), Some(gb)) => (ga, gb),
            (None, None) => continue, // the pooler: not part of the hidden states
            _ => panic!("{name}: a gradient in one path only"),
        };
        let diff = max_abs_diff(ga, gb);
        assert!(diff < 1e-5, "{name}: gradients differ by {diff}");
        compared += 1;
    }
    assert!(compared > 30, "only {compared} weights compared");
}
