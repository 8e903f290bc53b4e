//! What the command-line tests share: the tiny BERT, the binary, small CSV files.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tiny_bert() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert")
}

pub fn adapterkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_adapterkit"))
        .args(args)
        .output()
        .unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn write_csv(dir: &Path, name: &str, rows: usize) -> PathBuf {
    let mut text = String::from("text,label\n");
    for i in 0..rows {
        let (word, label) = if i % 2 == 0 {
            ("cat", "cat")
        } else {
            ("dog", "dog")
        };
        text.push_str(&format!("\"the {word}, it sat on the mat\",{label}\n"));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `train` for one epoch on `train` (validated on it too), quietly, into `out`.
pub fn train_quick(model: &Path, train: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model",
        s(model),
        "--train",
        s(train),
        "--validation",
        s(train),
        "--epochs",
        "1",
        "--out",
        s(out),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let run = adapterkit(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    run
}

pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr:?}");
    }
}

/// A successful run's stdout as JSON lines (`predict`'s output).
pub fn json_lines(run: &Output) -> Vec<serde_json::Value> {
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
