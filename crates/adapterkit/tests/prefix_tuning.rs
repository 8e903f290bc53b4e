//! Prefix tuning beyond the parity cases of `adapter_parity.rs`: the keys and values it
//! prepends (against `adapters` 1.3's, fixtures by `tests/fixtures/prefix/make_prefix_fixtures.py`),
//! computed once when frozen, and the configs and files it refuses.

mod common;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::data::TaskKind;
use adapterkit::heads::HeadConfig;
use adapterkit::io::adapter_dir;
use adapterkit::methods::adapter::{AdapterConfig, ModuleConfig};
use adapterkit::methods::composition::Setup;
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
        (vec![("use_gating", "true")], "use_gating"),
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

#[test]
fn prefix_tuning_runs_alone_for_now() {
    let model = model_with(&config(&[("prefix_length", "3")]).unwrap()).unwrap();
    let other = model_with(&AdapterConfig::preset("pfeiffer").unwrap()).unwrap();
    let mut other = other;
    other.adapter.as_mut().unwrap().name = "b".into();
    other.head.name = "b".into();
    let setup = Setup::parse("parallel(task,b)").unwrap();
    let error =
        adapterkit::composed_model::ComposedModel::new(tiny_encoder(), setup, vec![model, other])
            .unwrap_err();
    assert!(error.to_string().contains("prefix tuning"), "{error}");
}
