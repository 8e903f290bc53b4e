//! LoRA and (IA)³ from the command line: `train --method lora|ia3`, `predict`, and `merge`,
//! whose directory predicts what the unmerged adapter does.

mod common;

use common::*;

fn predict(model: &std::path::Path, adapter: &std::path::Path) -> Vec<serde_json::Value> {
    let texts = ["the cat sat", "a dog"];
    json_lines(&adapterkit(
        &[
            &["predict", "--model", s(model), "--adapter", s(adapter)],
            &texts[..],
        ]
        .concat(),
    ))
}

fn scores(line: &serde_json::Value) -> Vec<f64> {
    let scores = line["scores"].as_object().unwrap();
    scores.values().map(|v| v.as_f64().unwrap()).collect()
}

#[test]
fn train_a_lora_predict_merge_and_predict_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_csv(dir.path(), "train.csv", 8);
    let model = tiny_bert();
    for method in ["lora", "ia3"] {
        let out = dir.path().join(method);
        let mut args = vec!["train", "--model", s(&model), "--train", s(&train)];
        args.extend(["--validation", s(&train), "--epochs", "1", "--quiet"]);
        args.extend(["--method", method, "--freeze-layer-norms", "--out", s(&out)]);
        if method == "lora" {
            args.extend(["--adapter-option", "r=4", "--adapter-option", "alpha=16"]);
        }
        let trained = adapterkit(&args);
        assert!(
            trained.status.success(),
            "{}",
            String::from_utf8_lossy(&trained.stderr)
        );
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["config"]["architecture"], "lora");
        let mode = if method == "lora" { "add" } else { "scale" };
        assert_eq!(config["config"]["composition_mode"], mode);

        let unmerged = predict(&model, &out);
        let merged_dir = dir.path().join(format!("{method}-merged"));
        let merged = adapterkit(&[
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&out),
            "--out",
            s(&merged_dir),
        ]);
        assert!(
            merged.status.success(),
            "{}",
            String::from_utf8_lossy(&merged.stderr)
        );
        let merged = predict(&merged_dir, &merged_dir);
        for (a, b) in unmerged.iter().zip(&merged) {
            assert_eq!(a["label"], b["label"]);
            for (x, y) in scores(a).iter().zip(scores(b)) {
                assert!((x - y).abs() < 1e-5, "{method}: {x} vs {y}");
            }
        }
    }
    // Counts before training, by preset name.
    let info = adapterkit(&["info", "--model", s(&model), "--adapter", "lora", "--json"]);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    // q and v in 2 layers: A [8, 32] and B [32, 8] each.
    assert_eq!(info["adapter_parameters"], 2 * 2 * (8 * 32 + 32 * 8));
}

#[test]
fn lora_mistakes_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_csv(dir.path(), "train.csv", 4);
    let model = tiny_bert();
    let out = dir.path().join("out");
    let run = adapterkit(&[
        "train",
        "--model",
        s(&model),
        "--train",
        s(&train),
        "--validation",
        s(&train),
        "--method",
        "ia3",
        "--adapter-option",
        "r=2",
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("needs r = 1"));
    assert!(!out.exists(), "nothing written");
    let houlsby = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters/houlsby");
    let run = adapterkit(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&houlsby),
        "--out",
        s(&out),
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("nothing to merge"));
}

#[test]
fn train_a_lora_in_peft_files() {
    let dir = tempfile::tempdir().unwrap();
    let train = write_csv(dir.path(), "train.csv", 8);
    let model = tiny_bert();
    let out = dir.path().join("peft");
    let base = [
        "train",
        "--model",
        s(&model),
        "--train",
        s(&train),
        "--validation",
        s(&train),
    ];
    let mut args = base.to_vec();
    args.extend([
        "--epochs",
        "1",
        "--quiet",
        "--method",
        "lora",
        "--freeze-layer-norms",
    ]);
    args.extend(["--format", "peft", "--out", s(&out)]);
    let trained = adapterkit(&args);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    assert!(out.join("adapter_model.safetensors").exists());
    assert!(!out.join("adapter.safetensors").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(predict(&model, &out).len(), 2);

    let mut args = base.to_vec();
    let refused = dir.path().join("refused");
    args.extend([
        "--method",
        "houlsby",
        "--format",
        "peft",
        "--out",
        s(&refused),
        "--quiet",
    ]);
    let run = adapterkit(&args);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("PEFT's files hold a LoRA alone"));
    assert!(!refused.exists());
}

/// Python's `adapters`, PEFT and `transformers` read what we write and get our numbers
/// (`scripts/python_reads_ours.py`, and on RoBERTa, XLM-R, DistilBERT and ELECTRA
/// `scripts/python_reads_ours_encoders.py`). Runs when ADAPTERKIT_PYTHON names a Python with
/// them installed; CI has none, and says so.
#[test]
fn python_reads_our_lora_files() {
    let Ok(python) = std::env::var("ADAPTERKIT_PYTHON") else {
        eprintln!("ADAPTERKIT_PYTHON is not set: Python's side is not checked here");
        return;
    };
    for script in ["python_reads_ours.py", "python_reads_ours_encoders.py"] {
        let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts")
            .join(script);
        let run = std::process::Command::new(&python)
            .arg(&script)
            .args(["--binary", env!("CARGO_BIN_EXE_adapterkit")])
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&run.stderr)
        );
    }
}
