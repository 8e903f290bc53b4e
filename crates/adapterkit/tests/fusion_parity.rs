//! AdapterFusion against PyTorch + AdapterHub's `adapters` 1.3 (fixtures made by
//! `tests/fixtures/fusion/make_fusion_fixtures.py`): the saved fusion loads with its adapters,
//! and logits, losses, gradients and attention agree within 1e-5.

mod common;

use std::path::Path;

use adapterkit::adapter_model::AdapterModel;
use adapterkit::io::adapter_dir;
use adapterkit::methods::bottleneck::BottleneckAdapters;
use adapterkit::methods::bottleneck_config::BnConfig;
use adapterkit::methods::fusion::{Attention, Fusion, FusionConfig};
use adapterkit::model::hooks::Position;
use adapterkit::model::{BertModel, Mode};
use adapterkit::rng::SeededRng;
use candle_core::{DType, Device};
use common::*;

#[test]
fn fusion_matches_adapters_library() {
    for case in ["dynamic", "static", "single"] {
        let dir = fusion_laid_out(case);
        let expected =
            candle_core::safetensors::load(dir.path().join("expected.safetensors"), &Device::Cpu)
                .unwrap();
        let batch = batch_of(
            &expected["input_ids"],
            &expected["token_type_ids"],
            Some(&expected["attention_mask"]),
        );
        let model = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu).unwrap();
        // The path training and evaluation take, whose last layer computes the first token
        // alone.
        let first_token_logits = model.logits(&batch, &mut Mode::Eval).unwrap();
        let recorder = model.fusion.as_ref().unwrap().recording();
        let hidden = model
            .encoder
            .forward(&batch, &recorder, &mut Mode::Eval)
            .unwrap();
        let logits = model.head.forward(&hidden, &mut Mode::Eval).unwrap();
        let targets = expected["labels"].to_dtype(DType::U32).unwrap();
        let head_loss = model.head.loss(&logits, &targets).unwrap();
        let reg = model.regularization_loss().unwrap();
        let reg_value = reg.as_ref().map_or(0.0, |r| r.to_scalar::<f32>().unwrap());
        let scalar = |name: &str| expected[name].to_scalar::<f32>().unwrap();
        let (hidden_diff, logits_diff) = (
            max_abs_diff(&hidden, &expected["last_hidden_state"]),
            max_abs_diff(&logits, &expected["logits"])
                .max(max_abs_diff(&first_token_logits, &expected["logits"])),
        );
        let loss_diff = (head_loss.to_scalar::<f32>().unwrap() - scalar("loss")).abs();
        let reg_diff = (reg_value - scalar("reg_loss")).abs();

        let mut attn_diff = 0f32;
        for Attention {
            layer,
            position,
            probs,
        } in recorder.take()
        {
            let place = if position == Position::Attention {
                "mh_adapter"
            } else {
                "output_adapter"
            };
            attn_diff = attn_diff.max(max_abs_diff(
                &probs,
                &expected[&format!("attn.{layer}.{place}")],
            ));
        }

        let total = match reg {
            Some(r) => (head_loss + r).unwrap(),
            None => head_loss,
        };
        let grads = total.backward().unwrap();
        let mut grad_diff = 0f32;
        for (name, var) in model.trainable().iter() {
            let torch_name = if name.starts_with("heads.") {
                name.clone()
            } else {
                format!("bert.{name}")
            };
            let got = grads.get(var.as_tensor());
            match expected.get(&format!("grad.{torch_name}")) {
                Some(want) => grad_diff = grad_diff.max(max_abs_diff(got.unwrap(), want)),
                // Over one adapter the softmax is constant: the reference stores no zero gradients.
                None => {
                    assert_eq!(case, "single", "no reference gradient for {torch_name}");
                    let zero = got.map_or(0.0, |g| {
                        g.abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                    });
                    assert_eq!(zero, 0.0, "{torch_name}");
                }
            }
        }
        eprintln!("{case}: max |diff| hidden {hidden_diff:e}, logits {logits_diff:e}, loss {loss_diff:e}, reg {reg_diff:e}, attention {attn_diff:e}, gradients {grad_diff:e}");
        for d in [
            hidden_diff,
            logits_diff,
            loss_diff,
            reg_diff,
            attn_diff,
            grad_diff,
        ] {
            assert!(d < 1e-5, "{case}: {d}");
        }
    }
}

#[test]
fn static_fusion_over_one_adapter_reproduces_that_adapter() {
    let dir = fusion_laid_out("single");
    let expected =
        candle_core::safetensors::load(dir.path().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    let fused = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu).unwrap();
    let adapter =
        adapter_dir::load_adapter(&dir.path().join("a"), &fused.encoder, &Device::Cpu).unwrap();
    let with_fusion = fused
        .encoder
        .forward(&batch, fused.hooks(), &mut Mode::Eval)
        .unwrap();
    let alone = fused
        .encoder
        .forward(&batch, &adapter, &mut Mode::Eval)
        .unwrap();
    assert!(max_abs_diff(&with_fusion, &alone) < 1e-6);
    assert!(max_abs_diff(&alone, &expected["adapter_only.last_hidden_state"]) < 1e-5);
}

#[test]
fn save_then_load_gives_identical_logits() {
    let dir = fusion_laid_out("dynamic");
    let model = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    adapter_dir::save(out.path(), &model, "tiny-bert").unwrap();
    let names = |p: &Path| {
        let mut k: Vec<String> = candle_core::safetensors::load(p, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        names(&out.path().join("model_adapter_fusion.safetensors")),
        names(&dir.path().join("model_adapter_fusion.safetensors"))
    );
    let expected = load_expected("tiny-bert-expected.safetensors");
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    let reloaded = adapter_dir::load(out.path(), tiny_encoder(), &Device::Cpu).unwrap();
    let (a, b) = (
        model.logits(&batch, &mut Mode::Eval).unwrap(),
        reloaded.logits(&batch, &mut Mode::Eval).unwrap(),
    );
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn bad_fusions_get_clear_errors() {
    let encoder = tiny_encoder();
    let adapter =
        adapter_dir::load_adapter(&fixtures().join("fusion/adapter_a"), &encoder, &Device::Cpu)
            .unwrap();
    let config = FusionConfig::preset("dynamic").unwrap();
    let mut rng = SeededRng::new(0);
    let none = Fusion::new(vec![], &config, &encoder.config, &mut rng, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(none.contains("at least one adapter"), "{none}");
    let twice = Fusion::new(
        vec![adapter.clone(), adapter],
        &config,
        &encoder.config,
        &mut rng,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(twice.contains("'a' is named twice"), "{twice}");
    let pfeiffer = BnConfig::preset("pfeiffer").unwrap();
    let other =
        BottleneckAdapters::new("p", &pfeiffer, &encoder.config, &mut rng, &Device::Cpu).unwrap();
    let mixed = Fusion::new(
        vec![
            adapter_dir::load_adapter(&fixtures().join("fusion/adapter_a"), &encoder, &Device::Cpu)
                .unwrap(),
            other,
        ],
        &config,
        &encoder.config,
        &mut rng,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(mixed.contains("different places"), "{mixed}");
    let odd_name = BottleneckAdapters::new(
        "../evil",
        &pfeiffer,
        &encoder.config,
        &mut rng,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(odd_name.contains("only letters"), "{odd_name}");
    assert!(FusionConfig::preset("fancy")
        .unwrap_err()
        .to_string()
        .contains("unknown fusion preset 'fancy'"));

    // A fusion whose adapter directory is missing.
    let dir = fusion_laid_out("dynamic");
    std::fs::remove_dir_all(dir.path().join("b")).unwrap();
    let err = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter 'b'") && err.contains("missing"),
        "{err}"
    );

    // An adapter made for another hidden size.
    let dir = fusion_laid_out("dynamic");
    let path = dir.path().join("b/adapter_config.json");
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"hidden_size\": 32", "\"hidden_size\": 768"),
    )
    .unwrap();
    let err = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden size 768"), "{err}");
}

#[test]
fn fusion_training_moves_only_fusion_and_head() {
    let encoder = BertModel::random(&tiny_encoder().config, 0.2, 3, &Device::Cpu).unwrap();
    let adapters = ["adapter_a", "adapter_b"]
        .iter()
        .map(|d| {
            adapter_dir::load_adapter(&fixtures().join("fusion").join(d), &encoder, &Device::Cpu)
                .unwrap()
        })
        .collect();
    let head = adapterkit::heads::HeadConfig::new(
        adapterkit::data::TaskKind::Classification,
        &["x".into(), "y".into()],
    )
    .unwrap();
    let mut model = AdapterModel::fused(
        encoder,
        adapters,
        &FusionConfig::preset("dynamic").unwrap(),
        head,
        false,
        1,
        &Device::Cpu,
    )
    .unwrap();
    let adapters_before: Vec<_> = model
        .fusion
        .as_ref()
        .unwrap()
        .adapters
        .iter()
        .map(|a| a.params().snapshot().unwrap())
        .collect();
    assert!(
        model
            .fusion
            .as_ref()
            .unwrap()
            .adapters
            .iter()
            .all(|a| a.params().0.is_empty()),
        "frozen adapters expose no parameters"
    );
    let trainable_before = model.trainable().snapshot().unwrap();
    let tok = adapterkit::tokenizer::TextTokenizer::from_dir(&tiny_bert_dir(), 64).unwrap();
    let data = adapterkit::data::Dataset {
        name: "t".into(),
        examples: (0..8)
            .map(|i| adapterkit::data::Example {
                text: if i % 2 == 0 {
                    "the cat".into()
                } else {
                    "a dog ran".into()
                },
                text_pair: None,
                target: adapterkit::data::Target::Class(if i % 2 == 0 { "x" } else { "y" }.into()),
            })
            .collect(),
    };
    let encoded =
        adapterkit::train::batches::EncodedDataset::new(&data, &tok, &model.head.config).unwrap();
    let config = adapterkit::train::TrainConfig {
        epochs: 1,
        batch_size: 4,
        ..Default::default()
    };
    adapterkit::train::train(
        &mut model,
        &encoded,
        &encoded,
        &config,
        0,
        None,
        &mut adapterkit::train::Silent,
    )
    .unwrap();
    for (name, var) in model.trainable().iter() {
        assert!(
            max_abs_diff(var.as_tensor(), &trainable_before[name]) > 0.0,
            "{name} did not move"
        );
    }
    assert_eq!(adapters_before.len(), 2);
}

/// Python lowers the temperature in every forward pass; here the schedule is set from the
/// number of passes, and a loaded fusion runs at its end.
#[test]
fn the_temperature_schedule_gives_python_logits_pass_by_pass() {
    // `temperature/` holds only configs; its weights are `dynamic/`'s.
    let dir = fusion_laid_out("dynamic");
    copy_dir(&fixtures().join("fusion/temperature"), dir.path());
    let expected =
        candle_core::safetensors::load(dir.path().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    let mut model = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu).unwrap();
    let loaded = model.fusion.as_ref().unwrap().temperatures();
    assert!(loaded.iter().all(|t| *t == 1.0), "{loaded:?}");

    for (passes, pass) in ["pass1", "pass2"].iter().enumerate() {
        model.fusion.as_mut().unwrap().set_schedule(passes);
        let logits = model.logits(&batch, &mut Mode::Eval).unwrap();
        let diff = max_abs_diff(&logits, &expected[&format!("{pass}.logits")]);
        assert!(diff < 1e-5, "{pass}: {diff}");
    }
}

/// A fusion's temperature schedule follows the training steps, so a resumed run carries on
/// where its checkpoint left it.
#[test]
fn the_temperature_schedule_follows_the_steps_and_resumes() {
    let make = || {
        let encoder = BertModel::random(&tiny_encoder().config, 0.2, 3, &Device::Cpu).unwrap();
        let adapters = ["adapter_a", "adapter_b"]
            .iter()
            .map(|d| {
                let dir = fixtures().join("fusion").join(d);
                adapter_dir::load_adapter(&dir, &encoder, &Device::Cpu).unwrap()
            })
            .collect();
        let labels = ["x".to_string(), "y".to_string()];
        let head =
            adapterkit::heads::HeadConfig::new(adapterkit::data::TaskKind::Classification, &labels)
                .unwrap();
        let mut config = FusionConfig::preset("dynamic").unwrap();
        config.temperature = true;
        AdapterModel::fused(encoder, adapters, &config, head, false, 1, &Device::Cpu).unwrap()
    };
    let tok = adapterkit::tokenizer::TextTokenizer::from_dir(&tiny_bert_dir(), 64).unwrap();
    let data = adapterkit::data::Dataset {
        name: "t".into(),
        examples: (0..8)
            .map(|i| adapterkit::data::Example {
                text: ["the cat", "a dog ran"][i % 2].into(),
                text_pair: None,
                target: adapterkit::data::Target::Class(["x", "y"][i % 2].into()),
            })
            .collect(),
    };
    let mut model = make();
    let encoded =
        adapterkit::train::batches::EncodedDataset::new(&data, &tok, &model.head.config).unwrap();
    let out = tempfile::tempdir().unwrap();
    let output = adapterkit::train::Output {
        dir: out.path(),
        model_name: "tiny-bert",
    };
    let mut config = adapterkit::train::TrainConfig {
        epochs: 2,
        batch_size: 4,
        ..Default::default()
    };
    let train = |model: &mut AdapterModel, config: &adapterkit::train::TrainConfig| {
        adapterkit::train::train(
            model,
            &encoded,
            &encoded,
            config,
            0,
            Some(&output),
            &mut adapterkit::train::Silent,
        )
        .unwrap()
    };
    train(&mut model, &config);
    let trained = model.fusion.as_ref().unwrap().temperatures();
    // 2 epochs of 2 steps: 50 lowered by 4 x 0.05.
    assert!(
        trained.iter().all(|t| (t - 49.8).abs() < 1e-9),
        "{trained:?}"
    );
    // Resumed with every epoch done, a fresh model takes the checkpoint's place in the schedule.
    config.resume = true;
    let mut resumed = make();
    assert!(resumed
        .fusion
        .as_ref()
        .unwrap()
        .temperatures()
        .iter()
        .all(|t| *t == 50.0));
    assert!(!trained.is_empty());
    train(&mut resumed, &config);
    assert_eq!(resumed.fusion.as_ref().unwrap().temperatures(), trained);
}
