//! Prefix tuning beyond the parity cases of `adapter_parity.rs`: the keys and values it
//! prepends (against `adapters` 1.3's, fixtures by `tests/fixtures/prefix/make_prefix_fixtures.py`),
//! computed once when frozen, prefixes in parallel and batch_split channels, and the configs and
//! files it refuses.

mod common;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::composed_model::ComposedModel;
use adapterkit::data::TaskKind;
use adapterkit::heads::HeadConfig;
use adapterkit::io::adapter_dir;
use adapterkit::methods::adapter::{AdapterConfig, ModuleConfig};
use adapterkit::methods::composition::Setup;
use adapterkit::model::layer::Positions;
use adapterkit::model::Mode;
use candle_core::Device;
use common::*;

#[test]
fn keys_and_values_match_adapters_library_and_freezing_keeps_them() {
    for case in ["prefix", "prefix_flat", "prefix_leave"] {
        let dir = fixtures().join("prefix").join(case);
        let expected =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let model = adapter_dir::load(&dir, tiny_encoder(), &Device::Cpu).unwrap();
        let frozen = model.frozen();
        let prefix = model.adapter.as_ref().unwrap().prefix_tuning().unwrap();
        let frozen_prefix = frozen.adapter.as_ref().unwrap().prefix_tuning().unwrap();
        let mut layers = 0;
        for layer in 0..2 {
            let Some(want_keys) = expected.get(&format!("prefix_keys.{layer}")) else {
                assert!(prefix.keys_values(layer).is_none(), "{case}, layer {layer}");
                continue;
            };
            layers += 1;
            let want_values = &expected[&format!("prefix_values.{layer}")];
            for p in [prefix, frozen_prefix] {
                let (keys, values) = p.keys_values(layer).unwrap().unwrap();
                assert!(
                    max_abs_diff(&keys, want_keys) < 1e-5,
                    "{case}, layer {layer}"
                );
                assert!(
                    max_abs_diff(&values, want_values) < 1e-5,
                    "{case}, layer {layer}"
                );
            }
        }
        assert_eq!(layers, if case == "prefix_leave" { 1 } else { 2 });
        let batch = batch_of(
            &expected["input_ids"],
            &expected["token_type_ids"],
            Some(&expected["attention_mask"]),
        );
        let logits = frozen.logits(&batch, &mut Mode::Eval).unwrap();
        assert!(max_abs_diff(&logits, &expected["logits"]) < 1e-5, "{case}");
        // The prefix changes the output: the comparison is not vacuous.
        assert!(
            max_abs_diff(&logits, &expected["bare_logits"]) > 1e-3,
            "{case}"
        );
    }
}

fn config(options: &[(&str, &str)]) -> Result<AdapterConfig, String> {
    let overrides: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    AdapterConfig::preset("prefix_tuning")
        .unwrap()
        .with_overrides(&overrides)
}

fn model_with(config: &AdapterConfig) -> adapterkit::Result<AdapterModel> {
    let labels: Vec<String> = ["x", "y"].map(String::from).to_vec();
    AdapterModel::new(
        tiny_encoder(),
        &Method::Adapter(config.clone()),
        "task",
        HeadConfig::new(TaskKind::Classification, &labels).unwrap(),
        false,
        1,
        &Device::Cpu,
    )
}

#[test]
fn bad_configs_and_files_are_refused_with_the_reason() {
    let defaults = AdapterConfig::preset("prefix_tuning").unwrap();
    let ModuleConfig::PrefixTuning(c) = &defaults.0[0] else {
        panic!("{defaults:?}")
    };
    // AdapterHub's defaults.
    assert_eq!(
        (c.prefix_length, c.bottleneck_size, c.flat),
        (30, 512, false)
    );
    assert_eq!(c.non_linearity, adapterkit::model::ops::Activation::Tanh);
    for (options, message) in [
        (vec![("prefix_length", "0")], "prefix_length"),
        (vec![("bottleneck_size", "0")], "bottleneck_size"),
        (vec![("leave_out", "[0,1]")], "no layer"),
        (vec![("leave_out", "[7]")], "leave_out names layer 7"),
        (vec![("dropout", "1.5")], "dropout"),
    ] {
        let error = match config(&options) {
            Err(e) => e,
            Ok(config) => model_with(&config).unwrap_err().to_string(),
        };
        assert!(error.contains(message), "{options:?}: {error}");
    }
    let error = config(&[("non_linearity", "sparkle")]).unwrap_err();
    assert!(error.contains("sparkle"), "{error}");
    // Two prefix modules in one union.
    let union = serde_json::json!({
        "architecture": "union",
        "configs": [{"architecture": "prefix_tuning"}, {"architecture": "prefix_tuning"}],
    });
    let error = AdapterConfig::from_json(union, None).unwrap_err();
    assert!(error.contains("two prefix_tuning modules"), "{error}");
    // A prefix file made for another model (here: another prefix length).
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("prefix/prefix"), dir.path());
    let path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"prefix_length\": 5", "\"prefix_length\": 6"),
    )
    .unwrap();
    let error = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu).unwrap_err();
    assert!(error.to_string().contains("shape"), "{error}");
}

/// A fixture adapter (and head), renamed `name`.
fn fixture(case: &str, name: &str) -> AdapterModel {
    let mut model =
        adapter_dir::load(&fixtures().join(case), tiny_encoder(), &Device::Cpu).unwrap();
    model.adapter.as_mut().unwrap().rename(name);
    model.head.name = name.into();
    model
}

#[test]
fn prefixes_in_parallel_batch_split_and_stacks_give_what_each_gives_alone() {
    let expected = load_expected("prefix/prefix/expected.safetensors");
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    // Prefixes of lengths 5 and 3 (the second only in layer 1), a bottleneck adapter, a union
    // of a prefix and a parallel adapter (Mix-and-Match), UniPELT (a gated prefix, bottleneck
    // adapter and LoRA) and a prefix with a gate each for keys and values.
    let parts = vec![
        fixture("prefix/prefix", "a"),
        fixture("adapters/houlsby", "b"),
        fixture("prefix/prefix_leave", "c"),
        fixture("prefix/mam", "d"),
        fixture("prefix/unipelt", "e"),
        fixture("prefix/gated_prefix2", "f"),
    ];
    let alone: Vec<_> = (parts.iter())
        .map(|p| p.logits(&batch, &mut Mode::Eval).unwrap())
        .collect();
    for text in [
        "parallel(a,b,c,d)",
        "batch_split(a,c)[1,1]",
        "batch_split(b,d)[1,1]",
    ] {
        let setup = Setup::parse(text).unwrap();
        let model = ComposedModel::new(tiny_encoder(), setup, parts.clone()).unwrap();
        // Every layer holds a prefix of some channel: none is shared.
        assert_eq!(model.composition.lowest_active_layer(2), Some(0), "{text}");
        for task in model.logits(&batch, &mut Mode::Eval).unwrap() {
            let name = &model.heads[task.head].name;
            let i = ["a", "b", "c", "d", "e", "f"]
                .iter()
                .position(|n| n == name)
                .unwrap();
            let want = alone[i]
                .narrow(0, task.rows.start, task.rows.len())
                .unwrap();
            let diff = max_abs_diff(&want, &task.logits);
            assert!(diff < 1e-6, "{text}, task {name}: {diff}");
        }
    }
    // Stacks with prefixes in channels: each channel gives what its stack gives alone, padded
    // to the longest channel's prefixes with positions no query sees.
    let stack = |text: &str| {
        let setup = Setup::parse(text).unwrap();
        let model = ComposedModel::new(tiny_encoder(), setup, parts.clone()).unwrap();
        model
            .hidden(&batch, Positions::All, &mut Mode::Eval)
            .unwrap()
    };
    let together = stack("parallel(stack(a,c,b),c,stack(d,f))");
    for (i, text) in ["stack(a,c,b)", "c", "stack(d,f)"].iter().enumerate() {
        let rows = batch.input_ids.dim(0).unwrap();
        let channel = together.narrow(0, i * rows, rows).unwrap();
        let diff = max_abs_diff(&stack(text), &channel);
        assert!(diff < 1e-6, "{text} in a parallel: {diff}");
    }
    // Averaging a prefix with others is not defined, and said so.
    for (text, message) in [
        ("average(a,b)", "averages the prefix tuning 'a'"),
        ("stack(b,average(c,b))", "averages the prefix tuning 'c'"),
    ] {
        let setup = Setup::parse(text).unwrap();
        let error = ComposedModel::new(tiny_encoder(), setup, parts.clone()).unwrap_err();
        assert!(error.to_string().contains(message), "{text}: {error}");
    }
}

#[test]
fn a_gated_lora_is_never_folded_into_the_weights() {
    let dir = fixtures().join("prefix/gated_lora");
    let expected = load_expected("prefix/gated_lora/expected.safetensors");
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    let model = adapter_dir::load(&dir, tiny_encoder(), &Device::Cpu).unwrap();
    // `merged` (what predict runs) keeps it as it is, with the same logits.
    let merged = model.merged().unwrap();
    assert!(merged.adapter.as_ref().unwrap().lora().is_some());
    let logits = merged.frozen().logits(&batch, &mut Mode::Eval).unwrap();
    assert!(max_abs_diff(&logits, &expected["logits"]) < 1e-5);
    // Writing it as a merged model directory is refused, with the reason.
    let files = adapterkit::model::load::ModelFiles::in_dir(&tiny_bert_dir()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let error = adapterkit::io::model_dir::save_merged(out.path(), &files, &model, "tiny-bert")
        .unwrap_err();
    assert!(error.to_string().contains("gated LoRA"), "{error}");
    // A gated (IA)³ is not supported.
    let ia3 = AdapterConfig::preset("ia3")
        .unwrap()
        .with_overrides(&[("use_gating".into(), "true".into())])
        .unwrap();
    let error = model_with(&ia3).unwrap_err();
    assert!(error.to_string().contains("use_gating"), "{error}");
}
