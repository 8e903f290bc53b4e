//! Composition blocks: AdapterHub parity (fixtures by
//! `tests/fixtures/composition/make_composition_fixtures.py`), multi-task `Parallel` inference
//! equal to each adapter alone, and the nesting rules.

mod common;

use std::collections::BTreeMap;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::composed_model::ComposedModel;
use adapterkit::data::TaskKind;
use adapterkit::heads::HeadConfig;
use adapterkit::io::adapter_dir;
use adapterkit::methods::adapter::Adapter;
use adapterkit::methods::bottleneck_config::BnConfig;
use adapterkit::methods::composition::{Composition, Setup};
use adapterkit::model::layer::Positions;
use adapterkit::model::Mode;
use candle_core::Device;
use common::*;

#[test]
fn blocks_match_adapters_library() {
    let expected = load_expected("composition/expected.safetensors");
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("composition/expected.json")).unwrap(),
    )
    .unwrap();
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    // The fusion fixture holds adapters "a" and "b" and their dynamic fusion.
    let dir = fusion_laid_out("dynamic");
    let tuned = adapter_dir::load(dir.path(), tiny_encoder(), &Device::Cpu).unwrap();
    let fusion = tuned.fusion.unwrap();
    let mut adapters: BTreeMap<_, _> = fusion
        .adapters
        .iter()
        .map(|a| (a.name.clone(), Adapter::of_bottleneck(a.clone())))
        .collect();
    // The Pfeiffer adapter of the adapter fixtures, as the script loads it.
    let pfeiffer = python_made("adapters/pfeiffer", "p").adapter.unwrap();
    adapters.insert("p".into(), pfeiffer);
    // And the prefix tunings of the prefix fixtures (Mix-and-Match as "m").
    for (case, name) in [("prefix", "x"), ("prefix_leave", "y"), ("mam", "m")] {
        let prefix = python_made(&format!("prefix/{case}"), name)
            .adapter
            .unwrap();
        adapters.insert(name.into(), prefix);
    }
    let fusions = BTreeMap::from([(fusion.name(), fusion.clone())]);
    for (case, listing) in cases["cases"].as_object().unwrap() {
        let text = listing["setup"].as_str().unwrap();
        let setup = Setup::parse(text).unwrap();
        // AdapterHub's JSON for the same setup reads as the same setup.
        let from_json = Setup::parse(&listing["adapterhub"].to_string()).unwrap();
        assert_eq!(from_json, setup, "{case}");
        let model = ComposedModel {
            encoder: tiny_encoder(),
            composition: Composition::new(setup, adapters.clone(), fusions.clone()).unwrap(),
            heads: vec![],
            share_base_layers: true,
        };
        let hidden = model
            .hidden(&batch, Positions::All, &mut Mode::Eval)
            .unwrap();
        let diff = max_abs_diff(&hidden, &expected[&format!("{case}.last_hidden_state")]);
        eprintln!("{case} ({text}): max |diff| {diff:.2e}");
        assert!(diff < 1e-5, "{case}: {diff}");
    }
}

/// An adapter (and head) made by Python's `adapters` 1.3 (`tests/fixtures/adapters/CASE`),
/// renamed `name`.
fn python_made(case: &str, name: &str) -> AdapterModel {
    let dir = fixtures().join(case);
    let mut model = adapter_dir::load(&dir, tiny_encoder(), &Device::Cpu).unwrap();
    model.adapter.as_mut().unwrap().rename(name);
    model.head.name = name.into();
    model
}

/// Python's logits for the adapter fixture CASE alone, and the batch they are for.
fn python_logits(case: &str) -> (adapterkit::batch::Batch, candle_core::Tensor) {
    let expected = load_expected(&format!("adapters/{case}/expected.safetensors"));
    let batch = batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    );
    (batch, expected["logits"].clone())
}

/// `parallel(...)` over adapters made by `adapters` 1.3 that differ in placement and options:
/// each task gets Python's logits for its adapter alone. (adapters 1.3 itself fails on these
/// setups; before issue 13 we gave the later channels the first adapter's preparation and
/// the last one's finish, off by up to 0.18 in probability on MiniLM.)
fn check_parallel_of_python_adapters(cases: &[(&str, &str)]) {
    let tasks: Vec<AdapterModel> = (cases.iter())
        .map(|(c, n)| python_made(&format!("adapters/{c}"), n))
        .collect();
    let names: Vec<&str> = cases.iter().map(|(_, n)| *n).collect();
    let setup = Setup::parse(&format!("parallel({})", names.join(","))).unwrap();
    for share in [true, false] {
        let mut model = ComposedModel::new(tiny_encoder(), setup.clone(), tasks.clone()).unwrap();
        model.share_base_layers = share;
        let (batch, _) = python_logits(cases[0].0);
        let together = model.logits(&batch, &mut Mode::Eval).unwrap();
        assert_eq!(together.len(), cases.len());
        for ((case, name), task) in cases.iter().zip(&together) {
            let (_, python) = python_logits(case);
            assert_eq!(model.heads[task.head].name, *name);
            let diff = max_abs_diff(&task.logits, &python);
            assert!(
                diff < 1e-5,
                "{setup}, share {share}: task {name} ({case}) is {diff} off Python's"
            );
        }
    }
}

#[test]
fn parallel_of_two_pfeiffer_adapters() {
    check_parallel_of_python_adapters(&[("pfeiffer", "pfeiffer_a"), ("pfeiffer", "pfeiffer_b")]);
}

#[test]
fn parallel_of_houlsby_then_pfeiffer() {
    check_parallel_of_python_adapters(&[("houlsby", "houlsby"), ("pfeiffer", "pfeiffer")]);
}

#[test]
fn parallel_of_pfeiffer_then_houlsby() {
    check_parallel_of_python_adapters(&[("pfeiffer", "pfeiffer"), ("houlsby", "houlsby")]);
}

#[test]
fn parallel_with_a_parallel_adapter() {
    check_parallel_of_python_adapters(&[("houlsby", "houlsby"), ("parallel", "par_bn")]);
    check_parallel_of_python_adapters(&[("parallel", "par_bn"), ("pfeiffer", "pfeiffer")]);
    // Every option the fixtures cover at once: ln_before/ln_after and residual after the norm.
    check_parallel_of_python_adapters(&[
        ("houlsby_ln", "houlsby_ln"),
        ("parallel", "par_bn"),
        ("pfeiffer", "pfeiffer"),
        ("houlsby", "houlsby"),
    ]);
}

/// A task model on the tiny BERT: a Houlsby adapter (up-projections far from zero) and a
/// 3-class head, both named `name`.
fn task(name: &str, leave_out: &str, seed: u64) -> AdapterModel {
    let config = BnConfig::preset("houlsby")
        .unwrap()
        .with_overrides(&[
            ("leave_out".into(), leave_out.into()),
            ("init_weights".into(), "bert".into()),
        ])
        .unwrap();
    let labels: Vec<String> = ["x", "y", "z"].map(String::from).to_vec();
    let head = HeadConfig::new(TaskKind::Classification, &labels).unwrap();
    let model = AdapterModel::new(
        tiny_encoder(),
        &Method::Adapter(config.into()),
        name,
        head,
        false,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    for (_, var) in model.trainable().iter() {
        var.set(&(var.as_tensor() * 20.0).unwrap()).unwrap();
    }
    model
}

fn batch() -> adapterkit::batch::Batch {
    let expected = load_expected("composition/expected.safetensors");
    batch_of(
        &expected["input_ids"],
        &expected["token_type_ids"],
        Some(&expected["attention_mask"]),
    )
}

#[test]
fn parallel_gives_each_task_what_its_adapter_gives_alone() {
    // Layer 0 has no adapter in any task, so it runs once for all three.
    for leave_out in ["[]", "[0]"] {
        let tasks = [
            task("a", leave_out, 1),
            task("b", leave_out, 2),
            task("c", leave_out, 3),
        ];
        let alone: Vec<_> = tasks
            .iter()
            .map(|t| t.logits(&batch(), &mut Mode::Eval).unwrap())
            .collect();
        let setup = Setup::parse("parallel(a,b,c)").unwrap();
        let model = ComposedModel::new(tiny_encoder(), setup, tasks.to_vec()).unwrap();
        let shared = model.composition.lowest_active_layer(2);
        assert_eq!(shared, Some(if leave_out == "[]" { 0 } else { 1 }));
        let together = model.logits(&batch(), &mut Mode::Eval).unwrap();
        assert_eq!(together.len(), 3);
        for ((name, a), b) in ["a", "b", "c"].iter().zip(&alone).zip(&together) {
            let diff = max_abs_diff(a, &b.logits);
            assert!(diff < 1e-6, "task {name}, leave_out {leave_out}: {diff}");
        }
        // The tasks differ, so the comparison above is not vacuous.
        assert!(max_abs_diff(&alone[0], &alone[1]) > 1e-3);
        // `logits` runs the last layer at the first position alone; with every position
        // computed, the heads read the same first-token states.
        let every = model
            .hidden(&batch(), Positions::All, &mut Mode::Eval)
            .unwrap();
        let rows = batch().input_ids.dim(0).unwrap();
        for (i, (head, b)) in model.heads.iter().zip(&together).enumerate() {
            let channel = every.narrow(0, i * rows, rows).unwrap();
            let a = head.forward(&channel, &mut Mode::Eval).unwrap();
            let diff = max_abs_diff(&a, &b.logits);
            assert!(diff < 1e-6, "head {i}, every position: {diff}");
        }
    }
}

/// [`task`] trained together with the encoder's LayerNorms: those are its own (and differ).
fn task_with_layer_norms(name: &str, seed: u64) -> AdapterModel {
    let config = BnConfig::preset("pfeiffer").unwrap();
    let labels: Vec<String> = ["x", "y", "z"].map(String::from).to_vec();
    let head = HeadConfig::new(TaskKind::Classification, &labels).unwrap();
    let model = AdapterModel::new(
        tiny_encoder(),
        &Method::Adapter(config.into()),
        name,
        head,
        true,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = adapterkit::rng::SeededRng::new(seed);
    for (_, var) in model.trainable().iter() {
        let noise = rng
            .normal_tensor(var.dims(), 0.0, 0.5, &Device::Cpu)
            .unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    model.frozen()
}

#[test]
fn adapters_with_their_own_layer_norms_keep_them_in_their_channels() {
    // a and c bring LayerNorms of their own, b uses the encoder's.
    let tasks = [
        task_with_layer_norms("a", 1),
        task("b", "[]", 2),
        task_with_layer_norms("c", 3),
    ];
    // The fixture's two texts, twice.
    let two = batch();
    let twice = |t: &candle_core::Tensor| candle_core::Tensor::cat(&[t, t], 0).unwrap();
    let batch = || adapterkit::batch::Batch {
        input_ids: twice(&two.input_ids),
        token_type_ids: twice(&two.token_type_ids),
        attention_mask: twice(&two.attention_mask),
    };
    let rows = batch().input_ids.dim(0).unwrap();
    let alone: Vec<_> = tasks
        .iter()
        .map(|t| t.logits(&batch(), &mut Mode::Eval).unwrap())
        .collect();
    let split = format!("batch_split(a,b,c)[1,{},1]", rows - 2);
    for text in ["parallel(a,b,c)", &split] {
        let setup = Setup::parse(text).unwrap();
        let model = ComposedModel::new(tiny_encoder(), setup, tasks.to_vec()).unwrap();
        assert_eq!(model.composition.layer_norms.len(), 2, "{text}");
        for task in model.logits(&batch(), &mut Mode::Eval).unwrap() {
            let i = task.head;
            let expected = alone[i]
                .narrow(0, task.rows.start, task.rows.len())
                .unwrap();
            let diff = max_abs_diff(&expected, &task.logits);
            assert!(diff < 1e-6, "{text}, task {i}: {diff}");
        }
    }
    // Without its own LayerNorms, a gives other logits: the comparison above is not vacuous.
    let mut without = tasks[0].clone();
    without.encoder = tiny_encoder();
    let diff = max_abs_diff(
        &alone[0],
        &without.logits(&batch(), &mut Mode::Eval).unwrap(),
    );
    assert!(diff > 1e-3, "{diff}");
    // Stacked with another adapter, whose LayerNorms would run is not defined: refused.
    let setup = Setup::parse("stack(a,b)").unwrap();
    let refused = ComposedModel::new(tiny_encoder(), setup, tasks.to_vec()).unwrap_err();
    assert!(refused.to_string().contains("LayerNorms"), "{refused}");
}

#[test]
fn plain_adapters_side_by_side_run_as_one_op_with_the_same_result() {
    use adapterkit::model::hooks::Position;
    // A Houlsby adapter with LayerNorms of its own (another task's), and one with a non-unit
    // scaling.
    let houlsby_with_norms = AdapterModel {
        adapter: task("c", "[]", 9).adapter,
        ..task_with_layer_norms("c", 9)
    };
    let scaled = {
        let config = BnConfig::preset("houlsby")
            .unwrap()
            .with_overrides(&[("scaling".into(), "2.5".into())])
            .unwrap();
        let labels: Vec<String> = ["x", "y", "z"].map(String::from).to_vec();
        let head = HeadConfig::new(TaskKind::Classification, &labels).unwrap();
        let model = AdapterModel::new(
            tiny_encoder(),
            &Method::Adapter(config.into()),
            "d",
            head,
            false,
            4,
            &Device::Cpu,
        )
        .unwrap();
        for (_, var) in model.trainable().iter() {
            var.set(&(var.as_tensor() * 20.0).unwrap()).unwrap();
        }
        model.frozen()
    };
    // Houlsby adapters placed differently (b leaves layer 0 out), one with its own
    // LayerNorms; then Pfeiffer adapters (the original LayerNorm before the adapter), each
    // with its own LayerNorms.
    let sets = [
        vec![
            task("a", "[]", 1),
            task("b", "[0]", 2),
            houlsby_with_norms,
            scaled,
        ],
        vec![
            task_with_layer_norms("a", 4),
            task_with_layer_norms("b", 5),
            task_with_layer_norms("c", 6),
            task_with_layer_norms("d", 7),
        ],
    ];
    let two = batch();
    let pick = |t: &candle_core::Tensor| {
        let idx = candle_core::Tensor::new(&[0u32, 1, 0, 1, 1, 0], &Device::Cpu).unwrap();
        t.index_select(&idx, 0).unwrap()
    };
    let batch = || adapterkit::batch::Batch {
        input_ids: pick(&two.input_ids),
        token_type_ids: pick(&two.token_type_ids),
        attention_mask: pick(&two.attention_mask),
    };
    let rows = 6;
    for (s, tasks) in sets.iter().enumerate() {
        let alone: Vec<_> = tasks
            .iter()
            .map(|t| t.logits(&batch(), &mut Mode::Eval).unwrap())
            .collect();
        for text in ["batch_split(a,b,c,d)[2,1,2,1]", "parallel(a,b,c,d)"] {
            let setup = Setup::parse(text).unwrap();
            let mut model = ComposedModel::new(tiny_encoder(), setup, tasks.to_vec()).unwrap();
            let replicated = rows * model.composition.setup.parallel_channels();
            for layer in [0, 1] {
                let grouped = model
                    .composition
                    .grouped_at(replicated, layer, Position::Output);
                assert!(
                    grouped.unwrap(),
                    "set {s}, {text}, layer {layer}: not grouped"
                );
            }
            for group in [true, false] {
                model.composition.group_adapters = group;
                for task in model.logits(&batch(), &mut Mode::Eval).unwrap() {
                    let i = task.head;
                    let want = alone[i]
                        .narrow(0, task.rows.start, task.rows.len())
                        .unwrap();
                    let diff = max_abs_diff(&want, &task.logits);
                    assert!(
                        diff < 1e-6,
                        "set {s}, {text}, grouped {group}, task {i}: {diff}"
                    );
                }
            }
        }
    }
    // Adapters that read their input differently run one by one.
    let mixed = vec![task("a", "[]", 1), task_with_layer_norms("b", 2)];
    let setup = Setup::parse("parallel(a,b)").unwrap();
    let model = ComposedModel::new(tiny_encoder(), setup, mixed).unwrap();
    let grouped = model.composition.grouped_at(4, 1, Position::Output);
    assert!(!grouped.unwrap());
}

#[test]
fn adapter_drop_applies_under_parallel() {
    // Skipping both layers leaves no adapter active: the whole encoder is shared.
    for (skip, lowest) in [(vec![0], Some(1)), (vec![0, 1], None)] {
        let skip: std::collections::BTreeSet<usize> = skip.into_iter().collect();
        let mut tasks = [task("a", "[]", 1), task("b", "[]", 2)];
        let setup = Setup::parse("parallel(a,b)").unwrap();
        let mut model = ComposedModel::new(tiny_encoder(), setup, tasks.to_vec()).unwrap();
        for adapter in model.composition.adapters.values_mut() {
            adapter.set_skip_layers(&skip);
        }
        assert_eq!(model.composition.lowest_active_layer(2), lowest);
        let together = model.logits(&batch(), &mut Mode::Eval).unwrap();
        for (task, b) in tasks.iter_mut().zip(&together) {
            task.set_skip_layers(&skip).unwrap();
            let alone = task.logits(&batch(), &mut Mode::Eval).unwrap();
            assert!(max_abs_diff(&alone, &b.logits) < 1e-6, "skipping {skip:?}");
        }
    }
}

#[test]
fn illegal_setups_are_rejected_with_the_reason() {
    let cases = [
        (
            "parallel(parallel(a,b),c)",
            "cannot nest Parallel in Parallel",
        ),
        ("fuse(parallel(a,b))", "cannot nest Parallel in Fuse"),
        ("parallel(fuse(a,b))", "cannot nest Fuse in Parallel"),
        ("average(fuse(a,b),c)", "cannot nest Fuse in Average"),
        // AdapterHub's ALLOWED_NESTINGS has no Stack in Stack and no Average in Average.
        ("stack(stack(a,b),c)", "cannot nest Stack in Stack"),
        ("average(average(a,b),c)", "cannot nest Average in Average"),
        (
            "batch_split(parallel(a,b),c)[1,1]",
            "cannot nest Parallel in BatchSplit",
        ),
        (
            "stack(parallel(a,b),parallel(a,b,c))",
            "must have as many children each",
        ),
        ("batch_split(a,b)[1e20,1]", "whole numbers from 0"),
        ("stack(parallel(stack(average(a,b))))", "too deep"),
        ("stack(fuse(stack(a),b))", ""),
        ("split(a,b)", "unknown composition block 'split'"),
        ("batch_split(a,b)", "needs its batch sizes"),
        ("batch_split(a,b)[1]", "1 numbers for 2 children"),
        ("average(a,b)[1,-1]", "non-zero sum"),
        ("parallel(a,b)[1,2]", "takes no [numbers]"),
        ("parallel(a,", "expected an adapter name"),
        ("parallel(a b)", "expected ',' or ')'"),
        ("stack(a) b", "unexpected text"),
        ("parallel(a/b)", "expected ',' or ')'"),
        ("{\"type\": \"Stack\"}", "no \"children\""),
    ];
    for (text, message) in cases {
        match Setup::parse(text) {
            Ok(setup) if message.is_empty() => assert!(setup.names() == ["a", "b"]),
            Ok(setup) => panic!("{text} was accepted as {setup}"),
            Err(e) => assert!(
                !message.is_empty() && e.to_string().contains(message),
                "{text}: {e}"
            ),
        }
    }
}

#[test]
fn setups_read_and_print_as_adapterhub_writes_them() {
    let setup = Setup::parse("Parallel(stack(a, b), average(c, d)[1, 3])").unwrap();
    assert_eq!(
        setup.to_string(),
        "parallel(stack(a,b),average(c,d)[0.25,0.75])"
    );
    assert_eq!(setup.parallel_channels(), 2);
    let heads: Vec<String> = setup
        .channels(0..4)
        .unwrap()
        .iter()
        .map(|c| c.setup.head_name())
        .collect();
    assert_eq!(heads, ["b", "d"]);
    let json = setup.to_json();
    assert_eq!(json["children"][1]["kwargs"]["weights"][1], 0.75);
    assert_eq!(Setup::parse(&json.to_string()).unwrap(), setup);
    // One name is AdapterHub's Stack(name).
    assert_eq!(
        Setup::parse("a").unwrap(),
        Setup::Stack(vec![Setup::Adapter("a".into())])
    );
}

#[test]
fn missing_adapters_heads_and_fusions_are_named() {
    let tasks = vec![task("a", "[]", 1), task("b", "[]", 2)];
    let error = |text: &str| {
        ComposedModel::new(tiny_encoder(), Setup::parse(text).unwrap(), tasks.clone())
            .unwrap_err()
            .to_string()
    };
    assert!(error("parallel(a,c)").contains("no head named 'c'"));
    assert!(error("stack(c,a)").contains("names adapter 'c', which is not loaded"));
    assert!(error("fuse(a,b)").contains("no head named 'a,b'"));
    assert!(error("stack(a,parallel(a,b),b)").contains("two outputs for the same texts"));
    // Batch sizes fix the batch, however large; a batch of another size is refused by name.
    let split = ComposedModel::new(
        tiny_encoder(),
        Setup::parse("batch_split(a,b)[200,100]").unwrap(),
        tasks.clone(),
    )
    .unwrap();
    assert!(split.check_batch(300).is_ok());
    let wrong = split.check_batch(2).unwrap_err().to_string();
    assert!(
        wrong.contains("add up to 300, but the batch has 2 rows"),
        "{wrong}"
    );
    // Whitespace of any width between the parts.
    assert_eq!(
        Setup::parse("parallel(a,\u{3000}b)").unwrap(),
        Setup::parse("parallel(a,b)").unwrap()
    );
}

/// On the real all-MiniLM-L6-v2: `parallel(...)` over adapters of every preset placement
/// (Houlsby at both places, two Pfeiffer adapters after the feed-forward block, a parallel
/// adapter), in every order, gives each task the scores its adapter gives alone, shared or not.
#[test]
fn parallel_over_mixed_placements_on_minilm() {
    let Some(dir) = minilm_dir() else { return };
    let pretrained =
        adapterkit::model::load::Pretrained::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let labels: Vec<String> = ["neg", "pos"].map(String::from).to_vec();
    let head = HeadConfig::new(TaskKind::Classification, &labels).unwrap();
    let presets = [
        ("houlsby", "houlsby"),
        ("pfeiffer_a", "pfeiffer"),
        ("pfeiffer_b", "pfeiffer"),
        ("par_bn", "parallel"),
    ];
    let tasks: Vec<AdapterModel> = presets
        .iter()
        .enumerate()
        .map(|(i, (name, preset))| {
            // `bert` init for all, so that the parallel adapter's up-projection is not zero.
            let config = BnConfig::preset(preset)
                .unwrap()
                .with_overrides(&[("init_weights".into(), "bert".into())])
                .unwrap();
            let model = AdapterModel::new(
                pretrained.model.clone(),
                &Method::Adapter(config.into()),
                name,
                head.clone(),
                false,
                10 + i as u64,
                &Device::Cpu,
            )
            .unwrap();
            for (_, var) in model.trainable().iter() {
                var.set(&(var.as_tensor() * 4.0).unwrap()).unwrap();
            }
            model
        })
        .collect();
    let texts = [
        "Adapters are small.",
        "A much longer sentence, so that the shorter ones in this batch are padded.",
        "Ünïcödé too",
    ];
    let batch = pretrained.tokenizer.batch(&texts, &Device::Cpu).unwrap();
    let probabilities =
        |logits: &candle_core::Tensor| candle_nn::ops::softmax_last_dim(logits).unwrap();
    let alone: Vec<_> = tasks
        .iter()
        .map(|t| probabilities(&t.logits(&batch, &mut Mode::Eval).unwrap()))
        .collect();
    for order in [[0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0], [2, 0, 3, 1]] {
        let names: Vec<&str> = order.iter().map(|&i| presets[i].0).collect();
        let setup = Setup::parse(&format!("parallel({})", names.join(","))).unwrap();
        for share in [true, false] {
            let mut model =
                ComposedModel::new(pretrained.model.clone(), setup.clone(), tasks.clone()).unwrap();
            model.share_base_layers = share;
            for (task, &i) in model
                .logits(&batch, &mut Mode::Eval)
                .unwrap()
                .iter()
                .zip(&order)
            {
                let diff = max_abs_diff(&probabilities(&task.logits), &alone[i]);
                assert!(
                    diff < 1e-5,
                    "{setup}, share {share}: {} off by {diff}",
                    presets[i].0
                );
            }
        }
    }
    // The tasks differ, so the comparison is not vacuous.
    assert!(max_abs_diff(&alone[0], &alone[1]) > 1e-3);
    assert!(max_abs_diff(&alone[1], &alone[2]) > 1e-3);
}

/// Setup strings mutated from valid ones (AdapterHub's text and JSON forms) never panic the
/// parser: each parses, or is refused with a message. `ADAPTERKIT_FUZZ_SECONDS` runs longer
/// (`scripts/fuzz.sh`).
#[test]
fn mutated_setups_are_parsed_or_refused() {
    let seeds = [
        "parallel(stack(a,b),average(c,d)[1,3])",
        "stack(a,fuse(b,c),batch_split(d,e)[2,2])",
        "average(a,batch_split(b,stack(c,d))[1,1])[0.25,0.75]",
        r#"{"type": "Parallel", "children": [{"type": "single", "children": ["a"]}, {"type": "BatchSplit", "children": [{"type": "single", "children": ["b"]}], "kwargs": {"batch_sizes": [2]}}]}"#,
    ];
    let seconds: Option<u64> = std::env::var("ADAPTERKIT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let started = std::time::Instant::now();
    let mut rng = adapterkit::rng::SeededRng::new(5);
    let alphabet =
        b"(),[]{}\":. -_01239eEaAbcdxyzparallelstackfusebatch_splitaveragechildrentypekwargs";
    let mut runs = 0u64;
    while match seconds {
        Some(s) => started.elapsed().as_secs() < s,
        None => runs < 2000,
    } {
        let mut text: Vec<char> = seeds[rng.below(seeds.len())].chars().collect();
        for _ in 0..1 + rng.below(5) {
            let at = rng.below(text.len() + 1);
            match rng.below(4) {
                0 if at < text.len() => {
                    text.remove(at);
                }
                1 if at < text.len() => text[at] = alphabet[rng.below(alphabet.len())] as char,
                2 => text.insert(at, ['\u{3000}', 'é', '\0', '9'][rng.below(4)]),
                _ => text.insert(at, alphabet[rng.below(alphabet.len())] as char),
            }
        }
        let text: String = text.into_iter().collect();
        let outcome = std::panic::catch_unwind(|| {
            if let Ok(setup) = Setup::parse(&text) {
                // A setup that parses prints as one that parses (weights may move in the last
                // digit: they are normalised again), and hands out rows.
                let printed = Setup::parse(&setup.to_string());
                assert!(printed.is_ok(), "{text} printed as {setup}: {printed:?}");
                let _ = setup.channels(0..4 * setup.parallel_channels());
            }
        });
        assert!(outcome.is_ok(), "the setup {text:?} panicked");
        runs += 1;
    }
    eprintln!("{runs} mutated setups");
}
