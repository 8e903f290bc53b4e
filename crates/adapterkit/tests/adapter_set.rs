//! `AdapterSet`, many adapters on one model (what `adapterkit serve` runs): texts of different
//! adapters in one forward pass give what each adapter gives alone (`Predictor`, as
//! `adapterkit predict`), whatever the adapters' kinds, names and LayerNorms.

mod common;

use std::path::PathBuf;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::adapter_set::{AdapterSet, ServedAdapter};
use adapterkit::data::TaskKind;
use adapterkit::heads::HeadConfig;
use adapterkit::io::adapter_dir;
use adapterkit::methods::composition::Setup;
use adapterkit::model::Mode;
use adapterkit::pooling::Pooling;
use adapterkit::predictor::{Prediction, Predictor};
use candle_core::Device;
use common::*;

const TEXTS: [&str; 7] = [
    "the cat sat",
    "a much longer text that pads the other ones in its batch",
    "who wrote it",
    "short",
    "another text of middling length",
    "the dog",
    "what is the time",
];

fn set() -> AdapterSet {
    AdapterSet::load(tiny_bert_dir().to_str().unwrap(), &Device::Cpu).unwrap()
}

/// A Pfeiffer adapter trained (here: drawn) together with the encoder's LayerNorms, saved.
fn with_layer_norms(dir: &std::path::Path) -> PathBuf {
    let labels: Vec<String> = ["x", "y"].map(String::from).to_vec();
    let model = AdapterModel::new(
        tiny_encoder(),
        &Method::from_name("pfeiffer").unwrap(),
        "task",
        HeadConfig::new(TaskKind::Classification, &labels).unwrap(),
        true,
        7,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = adapterkit::rng::SeededRng::new(7);
    for (_, var) in model.trainable().iter() {
        let noise = rng
            .normal_tensor(var.dims(), 0.0, 0.5, &Device::Cpu)
            .unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    let out = dir.join("with_layer_norms");
    adapter_dir::save(&out, &model, "tiny").unwrap();
    assert!(out.join(adapter_dir::BASE_WEIGHTS).exists());
    out
}

/// Served name and directory of every kind: most of them named `task` inside.
fn directories(tmp: &std::path::Path) -> Vec<(&'static str, PathBuf)> {
    let fusion = fusion_laid_out("dynamic").keep();
    vec![
        ("houlsby", fixtures().join("adapters/houlsby")),
        ("pfeiffer", fixtures().join("adapters/pfeiffer")),
        ("regression", fixtures().join("adapters/regression")),
        ("lora", fixtures().join("lora/lora_qv")),
        ("ia3", fixtures().join("lora/ia3")),
        ("union", fixtures().join("lora/union")),
        ("norms", with_layer_norms(tmp)),
        ("fusion", fusion),
    ]
}

/// The largest difference between two predictions' numbers; their labels must agree.
fn difference(a: &Prediction, b: &Prediction) -> f32 {
    let scores = |x: &std::collections::BTreeMap<String, f32>,
                  y: &std::collections::BTreeMap<String, f32>| {
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        x.iter()
            .map(|(k, v)| (v - y[k]).abs())
            .fold(0.0f32, f32::max)
    };
    match (a, b) {
        (Prediction::Value { value: x }, Prediction::Value { value: y }) => (x - y).abs(),
        (
            Prediction::Label {
                label: la,
                scores: x,
            },
            Prediction::Label {
                label: lb,
                scores: y,
            },
        ) => {
            let d = scores(x, y);
            assert!(la == lb || d > 0.0, "labels differ with equal scores");
            d
        }
        (
            Prediction::Labels {
                labels: la,
                scores: x,
            },
            Prediction::Labels {
                labels: lb,
                scores: y,
            },
        ) => {
            assert_eq!(la, lb);
            scores(x, y)
        }
        _ => panic!("different kinds: {a:?} and {b:?}"),
    }
}

#[test]
fn a_mixed_batch_gives_each_text_what_its_adapter_gives_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let set = set();
    let dirs = directories(tmp.path());
    let served: Vec<ServedAdapter> = dirs
        .iter()
        .map(|(name, dir)| set.load_adapter(name, dir).unwrap())
        .collect();
    assert_eq!(served[6].info.kind, "bottleneck");
    assert!(served[6].info.own_layer_norms);
    assert_eq!(served[7].info.kind, "fusion");
    assert_eq!(served[4].info.kind, "ia3");
    assert_eq!(served[5].info.kind, "union");
    // Every adapter gets some texts: group i takes texts i, i+1 (wrapping), so each group
    // pads differently alone than in the whole batch.
    let mut texts = Vec::new();
    let mut groups = Vec::new();
    for (i, adapter) in served.iter().enumerate() {
        let mine = [TEXTS[i % TEXTS.len()], TEXTS[(i + 1) % TEXTS.len()]];
        texts.extend(mine);
        groups.push((adapter, mine.len()));
    }
    let batch = set.tokenizer.batch(&texts, &Device::Cpu).unwrap();
    let mixed = set.predict(&batch, &groups).unwrap();
    let mut row = 0;
    for ((name, dir), (adapter, n)) in dirs.iter().zip(&groups) {
        let mine = &texts[row..row + n];
        let predictor = Predictor::load(
            tiny_bert_dir().to_str().unwrap(),
            std::slice::from_ref(dir),
            None,
            &Device::Cpu,
        )
        .unwrap();
        let alone: Vec<Prediction> = (predictor.predict(mine).unwrap().into_iter())
            .map(|tasks| tasks.into_values().next().unwrap())
            .collect();
        // The same adapter alone in an AdapterSet batch of its own.
        let own_batch = set.tokenizer.batch(mine, &Device::Cpu).unwrap();
        let one = set.predict(&own_batch, &[(adapter, *n)]).unwrap();
        for i in 0..*n {
            let d = difference(&mixed[row + i], &alone[i]);
            assert!(d < 1e-6, "{name}, text {i}: mixed vs predict: {d}");
            let d = difference(&mixed[row + i], &one[i]);
            assert!(d < 1e-6, "{name}, text {i}: mixed vs its own batch: {d}");
        }
        row += n;
    }
    // Two adapters named `task` in their files give one text different answers: nothing was
    // silently shared between them.
    assert_eq!((texts[1], groups[0].1), (texts[2], 2));
    assert!(difference(&mixed[1], &mixed[2]) > 1e-4);
}

#[test]
fn a_setup_over_served_adapters_gives_each_task_its_own_prediction() {
    let set = set();
    let houlsby = set
        .load_adapter("a", &fixtures().join("adapters/houlsby"))
        .unwrap();
    let lora = set
        .load_adapter("b", &fixtures().join("lora/lora_qv"))
        .unwrap();
    let batch = set.tokenizer.batch(&TEXTS, &Device::Cpu).unwrap();
    let setup = Setup::parse("parallel(a,b)").unwrap();
    let together = set
        .predict_setup(&setup, &[&houlsby, &lora], &batch)
        .unwrap();
    let rows = TEXTS.len();
    let a = set.predict(&batch, &[(&houlsby, rows)]).unwrap();
    let b = set.predict(&batch, &[(&lora, rows)]).unwrap();
    for (i, tasks) in together.iter().enumerate() {
        assert!(difference(&tasks["a"], &a[i]) < 1e-6);
        assert!(difference(&tasks["b"], &b[i]) < 1e-6);
    }
    let unknown = Setup::parse("parallel(a,c)").unwrap();
    let error = set
        .predict_setup(&unknown, &[&houlsby, &lora], &batch)
        .unwrap_err();
    assert!(error.to_string().contains("'c'"), "{error}");
}

#[test]
fn embeddings_pool_the_states_the_adapter_makes() {
    let set = set();
    let dir = fixtures().join("adapters/houlsby");
    let served = set.load_adapter("a", &dir).unwrap();
    let batch = set.tokenizer.batch(&TEXTS, &Device::Cpu).unwrap();
    let model = adapter_dir::load(&dir, tiny_encoder(), &Device::Cpu).unwrap();
    for (adapter, hooks) in [(None, None), (Some(&served), Some(model.hooks()))] {
        let hooks = hooks.unwrap_or(&adapterkit::model::NoHooks);
        let hidden = model
            .encoder
            .forward(&batch, hooks, &mut Mode::Eval)
            .unwrap();
        let pooled = Pooling::Mean.pool(&hidden, &batch.attention_mask).unwrap();
        let want = adapterkit::pooling::normalize(&pooled).unwrap();
        let got = set.embed(adapter, &batch, Pooling::Mean, true).unwrap();
        let got = candle_core::Tensor::new(got, &Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-6, "adapter {}: {d}", adapter.is_some());
    }
}

#[test]
fn texts_are_truncated_to_the_limit_an_adapter_was_trained_with() {
    let mut set = set();
    let served = set
        .load_adapter("a", &fixtures().join("adapters/houlsby"))
        .unwrap();
    let text = TEXTS[1];
    for limit in [None, Some(3), Some(5), Some(100)] {
        let info = adapterkit::adapter_set::AdapterInfo {
            max_seq_len: limit,
            ..served.info.clone()
        };
        let ours = set.encode(text, Some(&info)).unwrap();
        let full = set.tokenizer.max_length();
        set.tokenizer
            .set_max_length(limit.unwrap_or(full).min(full))
            .unwrap();
        assert_eq!(ours, set.tokenizer.encode(text, None).unwrap(), "{limit:?}");
        set.tokenizer.set_max_length(full).unwrap();
    }
}

#[test]
fn what_cannot_share_the_model_is_refused_with_the_reason() {
    let set = set();
    let error = set
        .load_adapter("x/y", &fixtures().join("adapters/houlsby"))
        .unwrap_err();
    assert!(error.to_string().contains("name"), "{error}");
    // A fully fine-tuned model brings a whole encoder of its own.
    let tmp = tempfile::tempdir().unwrap();
    let labels: Vec<String> = ["x", "y"].map(String::from).to_vec();
    let head = HeadConfig::new(TaskKind::Classification, &labels).unwrap();
    for (method, message) in [("full", "full fine-tuning"), ("head", "no adapter")] {
        let model = AdapterModel::new(
            tiny_encoder(),
            &Method::from_name(method).unwrap(),
            "task",
            head.clone(),
            false,
            1,
            &Device::Cpu,
        )
        .unwrap();
        let out = tmp.path().join(method);
        adapter_dir::save(&out, &model, "tiny").unwrap();
        let error = set.load_adapter("m", &out).unwrap_err();
        assert!(error.to_string().contains(message), "{method}: {error}");
    }
}
