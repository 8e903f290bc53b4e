//! AdapterDrop: skipping adapters at run time, and robust training over random drops.

mod common;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::data::{Dataset, Example, Target, TaskKind};
use adapterkit::heads::HeadConfig;
use adapterkit::methods::bottleneck::BottleneckAdapters;
use adapterkit::methods::bottleneck_config::BnConfig;
use adapterkit::model::load::ModelFiles;
use adapterkit::model::{BertModel, Mode};
use adapterkit::rng::SeededRng;
use adapterkit::tokenizer::TextTokenizer;
use adapterkit::train::batches::EncodedDataset;
use adapterkit::train::{self, Silent, TrainConfig};
use candle_core::Device;
use common::*;

fn encoder() -> BertModel {
    let files = ModelFiles::in_dir(&tiny_bert_dir()).unwrap();
    BertModel::random(&files.load_config().unwrap(), 0.2, 3, &Device::Cpu).unwrap()
}

fn batch() -> adapterkit::batch::Batch {
    let expected = load_expected("tiny-bert-expected.safetensors");
    batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    )
}

#[test]
fn skipping_a_layer_equals_leaving_it_out() {
    let encoder = encoder();
    let houlsby = BnConfig::preset("houlsby").unwrap();
    // Far from the identity, so that skipping a layer changes the output.
    let mut full = BottleneckAdapters::new(
        "a",
        &houlsby,
        &encoder.config,
        &mut SeededRng::new(1),
        &Device::Cpu,
    )
    .unwrap();
    for (_, var) in full.params().iter() {
        var.set(&(var.as_tensor() * 20.0).unwrap()).unwrap();
    }
    let weights = full.params().snapshot().unwrap();
    for layer in 0..encoder.config.num_hidden_layers {
        let config = houlsby
            .with_overrides(&[("leave_out".into(), format!("[{layer}]"))])
            .unwrap();
        let left_out = BottleneckAdapters::new(
            "a",
            &config,
            &encoder.config,
            &mut SeededRng::new(2),
            &Device::Cpu,
        )
        .unwrap();
        let subset = weights
            .iter()
            .filter(|(n, _)| !n.starts_with(&format!("encoder.layer.{layer}.")))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        assert!(left_out.params().load(&subset).unwrap().is_empty());

        full.skip_layers = [layer].into();
        let skipped = encoder.forward(&batch(), &full, &mut Mode::Eval).unwrap();
        let without = encoder
            .forward(&batch(), &left_out, &mut Mode::Eval)
            .unwrap();
        full.skip_layers.clear();
        let with = encoder.forward(&batch(), &full, &mut Mode::Eval).unwrap();
        assert!(max_abs_diff(&skipped, &without) < 1e-6, "layer {layer}");
        assert!(
            max_abs_diff(&skipped, &with) > 1e-3,
            "skipping layer {layer} changed nothing"
        );
    }
}

fn toy() -> Dataset {
    let examples = (0..32)
        .map(|i| Example {
            text: if i % 2 == 0 {
                "the cat sat on the mat".into()
            } else {
                "my dog ran to the mat".into()
            },
            text_pair: None,
            target: Target::Class(if i % 2 == 0 { "cat" } else { "dog" }.into()),
        })
        .collect();
    Dataset {
        name: "toy".into(),
        examples,
    }
}

fn robust_run(seed: u64) -> AdapterModel {
    let head = HeadConfig::new(TaskKind::Classification, &["cat".into(), "dog".into()]).unwrap();
    let mut model = AdapterModel::new(
        encoder(),
        &Method::from_name("houlsby").unwrap(),
        "toy",
        head.clone(),
        false,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(&tiny_bert_dir(), 64).unwrap();
    let data = EncodedDataset::new(&toy(), &tok, &head).unwrap();
    let config = TrainConfig {
        epochs: 2,
        batch_size: 4,
        seed,
        robust_drop_max: Some(2),
        ..Default::default()
    };
    train::train(
        &mut model,
        &data,
        &data,
        &config,
        tok.pad_id(),
        None,
        &mut Silent,
    )
    .unwrap();
    model
}

#[test]
fn robust_drop_training_is_deterministic_for_a_seed() {
    let (a, b, c) = (robust_run(5), robust_run(5), robust_run(6));
    let mut same_as_other_seed = true;
    for (((name, x), (_, y)), (_, z)) in a
        .trainable()
        .iter()
        .zip(b.trainable().iter())
        .zip(c.trainable().iter())
    {
        assert_eq!(max_abs_diff(x.as_tensor(), y.as_tensor()), 0.0, "{name}");
        same_as_other_seed &= max_abs_diff(x.as_tensor(), z.as_tensor()) == 0.0;
    }
    assert!(!same_as_other_seed, "another seed should train differently");
    assert!(
        a.adapter
            .as_ref()
            .unwrap()
            .bottleneck()
            .unwrap()
            .skip_layers
            .is_empty(),
        "training ends with every adapter active"
    );
}

/// Hooks that run an adapter and note, per layer, whether the layer's output carries a graph.
struct GraphProbe<'a> {
    adapter: &'a BottleneckAdapters,
    tracked: std::cell::RefCell<Vec<bool>>,
}

impl adapterkit::model::hooks::LayerHooks for GraphProbe<'_> {
    fn sub_layer_output(
        &self,
        layer: usize,
        position: adapterkit::model::hooks::Position,
        hidden: &candle_core::Tensor,
        input: &candle_core::Tensor,
        layer_norm: &adapterkit::model::layer_norm::LayerNorm,
        mode: &mut Mode,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.adapter
            .sub_layer_output(layer, position, hidden, input, layer_norm, mode)
    }

    fn layer_output(
        &self,
        _layer: usize,
        hidden: candle_core::Tensor,
        _mode: &mut Mode,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.tracked.borrow_mut().push(hidden.track_op());
        Ok(hidden)
    }
}

#[test]
fn no_graph_is_recorded_below_the_lowest_adapter() {
    use adapterkit::model::hooks::LayerHooks;
    let encoder = encoder();
    let config = BnConfig::preset("houlsby")
        .unwrap()
        .with_overrides(&[("leave_out".into(), "[0]".into())])
        .unwrap();
    let adapter = BottleneckAdapters::new(
        "a",
        &config,
        &encoder.config,
        &mut SeededRng::new(1),
        &Device::Cpu,
    )
    .unwrap();
    let probe = GraphProbe {
        adapter: &adapter,
        tracked: Default::default(),
    };
    let hooks: &dyn LayerHooks = &probe;
    encoder
        .forward(&batch(), hooks, &mut Mode::train(1))
        .unwrap();
    // Layer 0 has no trainable tensor: nothing there is recorded, so backward stops above it.
    assert_eq!(*probe.tracked.borrow(), [false, true]);
}
