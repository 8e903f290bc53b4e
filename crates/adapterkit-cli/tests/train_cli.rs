//! `train`, `eval`, `predict` and `info --adapter` end to end on the tiny BERT and small files.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

#[test]
fn train_then_eval_and_predict_the_saved_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_csv(dir.path(), "train.csv", 16);
    let validation = write_csv(dir.path(), "validation.csv", 4);
    let out = dir.path().join("adapter");
    let model = tiny_bert();
    let trained = adapterkit(&[
        "train",
        "--model",
        s(&model),
        "--train",
        s(&train),
        "--validation",
        s(&validation),
        "--test",
        s(&validation),
        "--method",
        "houlsby",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--out",
        s(&out),
        "--quiet",
        "--json",
    ]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&trained.stdout).unwrap();
    assert_eq!(result["epochs"], 2);
    for file in [
        "adapter_config.json",
        "adapter.safetensors",
        "head_config.json",
        "model_head.safetensors",
        "base_weights.safetensors",
        "training_log.jsonl",
        "training_curves.svg",
        "results.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    // The trained LayerNorms are in a file Python's `adapters` does not read: train says so,
    // and `info --adapter` shows it.
    let stderr = String::from_utf8_lossy(&trained.stderr);
    assert!(
        stderr.contains("base_weights.safetensors") && stderr.contains("--freeze-layer-norms"),
        "{stderr}"
    );
    let info = adapterkit(&["info", "--model", s(&model), "--adapter", s(&out), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    // The embeddings' LayerNorm and two a layer, two layers: weight and bias each.
    assert_eq!(info["adapter_base_weight_tensors"], 10);

    let eval = adapterkit(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--test",
        s(&validation),
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let metrics: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(metrics["examples"], 4);
    // The saved best model is the one whose test accuracy train reported.
    assert_eq!(metrics["accuracy"], result["test"]["accuracy"]);

    let predict = adapterkit(&[
        "predict",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "the cat sat",
        "a dog",
    ]);
    assert!(predict.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(predict.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let scores = lines[0]["scores"].as_object().unwrap();
    assert_eq!(scores.len(), 2);
    let total: f64 = scores.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-5);
    assert!(["cat", "dog"].contains(&lines[0]["label"].as_str().unwrap()));

    let info = adapterkit(&["info", "--model", s(&model), "--adapter", s(&out), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    // Houlsby on hidden 32: 2 layers x 2 places x (32*2 + 2 + 2*32 + 32).
    assert_eq!(
        info["adapter_parameters"],
        2 * 2 * (32 * 2 + 2 + 2 * 32 + 32)
    );
}

#[test]
fn bad_training_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 8);
    let out = dir.path().join("out");
    let base = |extra: &[&str]| -> Output {
        let mut args = vec![
            "train",
            "--model",
            s(&model),
            "--out",
            s(&out),
            "--quiet",
            "--epochs",
            "1",
        ];
        args.extend_from_slice(extra);
        adapterkit(&args)
    };
    assert_fails_with(
        &base(&[
            "--train",
            s(&train),
            "--validation",
            s(&train),
            "--method",
            "lora-ish",
        ]),
        &["unknown adapter preset 'lora-ish'"],
    );
    assert_fails_with(
        &base(&[
            "--train",
            s(&train),
            "--validation",
            s(&train),
            "--adapter-option",
            "reduction_factor=64",
        ]),
        &["leaves no bottleneck"],
    );

    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    assert_fails_with(
        &base(&["--train", s(&empty), "--validation", s(&train)]),
        &["empty.csv"],
    );

    let no_label = dir.path().join("no_label.csv");
    std::fs::write(&no_label, "text,category\nhello,a\n").unwrap();
    assert_fails_with(
        &base(&["--train", s(&no_label), "--validation", s(&train)]),
        &["no_label.csv", "label"],
    );

    let bad_bytes = dir.path().join("bad.csv");
    std::fs::write(&bad_bytes, b"text,label\nfine,cat\n\xff\xfe,dog\n").unwrap();
    assert_fails_with(
        &base(&["--train", s(&bad_bytes), "--validation", s(&train)]),
        &["bad.csv", "line 3", "UTF-8"],
    );
    assert!(
        !out.join("adapter.safetensors").exists(),
        "no half-written output"
    );
}

#[test]
fn eval_data_with_a_label_the_head_does_not_know_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 8);
    let out = dir.path().join("adapter");
    let trained = adapterkit(&[
        "train",
        "--model",
        s(&model),
        "--train",
        s(&train),
        "--validation",
        s(&train),
        "--epochs",
        "1",
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert!(trained.status.success());
    let odd = dir.path().join("odd.csv");
    std::fs::write(&odd, "text,label\nthe cat,cat\na bird,bird\n").unwrap();
    let eval = adapterkit(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--test",
        s(&odd),
    ]);
    assert_fails_with(&eval, &["label 'bird'", "example 2"]);
}

#[test]
fn fuse_two_adapters_then_eval_and_plot_the_fusion_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 8);
    let mut adapters = Vec::new();
    for (name, method) in [("first", "houlsby"), ("second", "houlsby")] {
        let out = dir.path().join(name);
        let extra = ["--method", method, "--name", name, "--freeze-layer-norms"];
        train_quick(&model, &train, &out, &extra);
        adapters.push(out);
    }
    let fused = dir.path().join("fused");
    let run = adapterkit(&[
        "fuse",
        "--model",
        s(&model),
        "--adapters",
        s(&adapters[0]),
        s(&adapters[1]),
        "--train",
        s(&train),
        "--validation",
        s(&train),
        "--epochs",
        "1",
        "--out",
        s(&fused),
        "--quiet",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for file in [
        "adapter_fusion_config.json",
        "model_adapter_fusion.safetensors",
        "first/adapter.safetensors",
        "second/adapter_config.json",
        "model_head.safetensors",
    ] {
        assert!(fused.join(file).exists(), "{file}");
    }
    let eval = adapterkit(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&fused),
        "--test",
        s(&train),
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );

    let plot = dir.path().join("weights");
    let run = adapterkit(&[
        "fusion-weights",
        "--model",
        s(&model),
        "--adapter",
        s(&fused),
        "--test",
        s(&train),
        "--out",
        s(&plot),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plot.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["adapters"], serde_json::json!(["first", "second"]));
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "2 layers x 2 places");
    for row in rows {
        let total: f64 = row["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap())
            .sum();
        assert!((total - 1.0).abs() < 1e-4, "attention sums to {total}");
    }
    assert!(std::fs::read_to_string(plot.with_extension("svg"))
        .unwrap()
        .starts_with("<svg"));

    // Both tasks in one pass: each task's scores are what its adapter gives alone.
    let predict = |adapters: &[&Path], setup: Option<&str>| -> Vec<serde_json::Value> {
        let mut args = vec!["predict", "--model", s(&model)];
        for adapter in adapters {
            args.extend(["--adapter", s(adapter)]);
        }
        if let Some(setup) = setup {
            args.extend(["--setup", setup]);
        }
        args.extend(["the cat sat", "a dog"]);
        json_lines(&adapterkit(&args))
    };
    let together = predict(
        &[&adapters[0], &adapters[1]],
        Some("parallel(first,second)"),
    );
    assert_eq!(together.len(), 2);
    for (name, dir) in ["first", "second"].iter().zip(&adapters) {
        for (alone, both) in predict(&[dir], None).iter().zip(&together) {
            let task = &both["tasks"][name];
            assert_eq!(task["label"], alone["label"]);
            for label in ["cat", "dog"] {
                let (a, b) = (
                    alone["scores"][label].as_f64(),
                    task["scores"][label].as_f64(),
                );
                assert!((a.unwrap() - b.unwrap()).abs() < 1e-6, "{name} {label}");
            }
        }
    }
    // `batch_split`: each text to its slice's adapter and head, as that adapter alone.
    let split = predict(
        &[&adapters[0], &adapters[1]],
        Some("batch_split(first,second)[1,1]"),
    );
    for (row, name) in ["first", "second"].iter().enumerate() {
        let tasks = split[row]["tasks"].as_object().unwrap();
        assert_eq!(tasks.keys().collect::<Vec<_>>(), [name], "text {row}");
        let alone = &predict(&[&adapters[row]], None)[row];
        for label in ["cat", "dog"] {
            let (a, b) = (
                alone["scores"][label].as_f64(),
                tasks[*name]["scores"][label].as_f64(),
            );
            assert!((a.unwrap() - b.unwrap()).abs() < 1e-6, "{name} {label}");
        }
    }
    // The fusion's own head under `fuse(...)`, from its directory.
    let fused_lines = predict(&[&fused], Some("fuse(first,second)"));
    assert!(fused_lines[0]["tasks"]["first,second"]["label"].is_string());
    let run = adapterkit(&[
        "predict",
        "--model",
        s(&model),
        "--adapter",
        s(&adapters[0]),
        "--adapter",
        s(&adapters[1]),
        "x",
    ]);
    assert_fails_with(&run, &["--setup"]);
    let run = adapterkit(&[
        "predict",
        "--model",
        s(&model),
        "--adapter",
        s(&adapters[0]),
        "--setup",
        "fuse(parallel(first,second))",
        "x",
    ]);
    assert_fails_with(&run, &["cannot nest Parallel in Fuse"]);

    // An adapter trained with the encoder's LayerNorms cannot be fused: they would be lost.
    let with_norms = dir.path().join("with-norms");
    train_quick(&model, &train, &with_norms, &[]);
    let run = adapterkit(&[
        "fuse",
        "--model",
        s(&model),
        "--adapters",
        s(&adapters[0]),
        s(&with_norms),
        "--train",
        s(&train),
        "--validation",
        s(&train),
        "--out",
        s(&dir.path().join("x")),
        "--quiet",
    ]);
    assert_fails_with(&run, &["base_weights.safetensors", "--freeze-layer-norms"]);

    std::fs::remove_dir_all(fused.join("second")).unwrap();
    let eval = adapterkit(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&fused),
        "--test",
        s(&train),
    ]);
    assert_fails_with(&eval, &["adapter 'second'", "missing"]);
}

#[test]
fn skipping_adapters_at_inference_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 8);
    let out = dir.path().join("adapter");
    train_quick(&model, &train, &out, &["--robust-drop", "1"]);
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--test",
            s(&train),
            "--json",
        ];
        args.extend_from_slice(extra);
        adapterkit(&args)
    };
    assert!(eval(&["--skip-layers", "0"]).status.success());
    assert!(eval(&["--drop-lower", "2"]).status.success());
    assert_fails_with(
        &eval(&["--skip-layers", "5"]),
        &["cannot skip layer 5", "2 layers"],
    );
}

#[test]
fn export_writes_the_splits_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_csv(dir.path(), "train.csv", 4);
    let validation = write_csv(dir.path(), "validation.csv", 2);
    let out = dir.path().join("export");
    let run = adapterkit(&[
        "export",
        "--train",
        s(&train),
        "--validation",
        s(&validation),
        "--out",
        s(&out),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[0],
        serde_json::json!({"text": "the cat, it sat on the mat", "label": "cat"})
    );
    assert_eq!(
        std::fs::read_to_string(out.join("validation.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    assert!(!out.join("test.jsonl").exists());
}

#[test]
fn an_output_folder_that_is_not_a_run_is_refused_unless_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 8);
    let out = dir.path().join("someone-elses");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let args = [
        "train",
        "--model",
        s(&model),
        "--train",
        s(&train),
        "--validation",
        s(&train),
        "--epochs",
        "1",
        "--out",
        s(&out),
        "--quiet",
    ];
    assert_fails_with(&adapterkit(&args), &["no adapterkit run", "--overwrite"]);
    assert!(!out.join("adapter_config.json").exists(), "nothing written");
    // With --overwrite our files go in beside theirs; a second run there needs no flag.
    train_quick(&model, &train, &out, &["--overwrite"]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    train_quick(&model, &train, &out, &[]);
}

#[test]
fn the_sequence_limit_trained_with_is_used_again_unless_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 8);
    let out = dir.path().join("short");
    train_quick(&model, &train, &out, &["--max-seq-len", "4"]);
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapterkit_settings.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(settings["max_seq_len"], 4);
    let text = "the cat, it sat on the mat and then it sat on the mat again";
    let predict = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["predict", "--model", s(&model), "--adapter", s(&out)];
        args.extend_from_slice(extra);
        args.push(text);
        let run = adapterkit(&args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        serde_json::from_slice(&run.stdout).unwrap()
    };
    let recorded = predict(&[]);
    assert_eq!(recorded, predict(&["--max-seq-len", "4"]));
    assert_ne!(
        recorded["scores"],
        predict(&["--max-seq-len", "64"])["scores"]
    );
    // A checkpoint resumes only the run that wrote it.
    let mut other = vec!["--resume", "--seed", "7"];
    other.extend(["--max-seq-len", "4"]);
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--train",
        s(&train),
        "--validation",
        s(&train),
        "--epochs",
        "1",
        "--out",
        s(&out),
        "--quiet",
    ];
    args.extend(other);
    assert_fails_with(&adapterkit(&args), &["is of another run", "seed: 7"]);
    // Retrained without the flag, the record goes.
    train_quick(&model, &train, &out, &[]);
    assert!(!out.join("adapterkit_settings.json").exists());
    let run = adapterkit(&["encode", "--model", s(&model), "--max-seq-len", "1", "x"]);
    assert_fails_with(
        &run,
        &["maximum sequence length of 1", "the model takes 2 to 64"],
    );
    let run = adapterkit(&["encode", "--model", s(&model), "--max-seq-len", "65", "x"]);
    assert_fails_with(&run, &["the model takes 2 to 64"]);
}
