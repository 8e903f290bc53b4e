//! `train --resume` end to end: runs killed at random moments and resumed.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// `train` killed (SIGKILL) at seeded random moments and resumed each time ends with the files
/// of an uninterrupted run, byte for byte.
#[test]
fn a_run_killed_and_resumed_ends_as_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 160);
    let run_args = |out: &Path, resume: bool| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--model",
            s(&model),
            "--train",
            s(&train),
            "--validation",
            s(&train),
            "--epochs",
            "8",
            "--batch-size",
            "4",
            "--threads",
            "2",
            "--seed",
            "3",
            // Checkpoints inside epochs too (40 steps each), so kills resume mid-epoch.
            "--save-steps",
            "7",
            "--out",
            s(out),
            "--quiet",
        ]
        .map(String::from)
        .to_vec();
        if resume {
            args.push("--resume".into());
        }
        args
    };
    let run = |args: &[String]| {
        let out = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let reference = dir.path().join("uninterrupted");
    run(&run_args(&reference, false));

    // Each run is killed a seeded 0-20 ms after it writes its next checkpoint, so every kill
    // lands mid-run and the runs progress however fast this machine is.
    let out = dir.path().join("killed");
    let latest = || std::fs::read_to_string(out.join("checkpoint/LATEST")).unwrap_or_default();
    let mut rng = adapterkit::rng::SeededRng::new(13);
    let mut kills = 0;
    let mut checkpoints = std::collections::BTreeSet::new();
    for attempt in 0..10 {
        let before = latest();
        let mut child = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
            .args(run_args(&out, attempt > 0))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while child.try_wait().unwrap().is_none()
            && latest() == before
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let delay = std::time::Duration::from_millis(rng.below(21) as u64);
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        eprintln!(
            "attempt {attempt}: killed {delay:?} after a checkpoint; now {:?}",
            latest()
        );
        checkpoints.insert(latest());
    }
    run(&run_args(&out, true));
    assert!(
        kills >= 8,
        "only {kills} of the runs were killed before they finished"
    );
    // Killed at different stages: the resumed runs got further each time.
    assert!(checkpoints.len() >= 8, "checkpoints seen: {checkpoints:?}");
    for file in [
        "adapter.safetensors",
        "adapter_config.json",
        "model_head.safetensors",
        "head_config.json",
        "base_weights.safetensors",
    ] {
        let (a, b) = (
            std::fs::read(reference.join(file)).unwrap(),
            std::fs::read(out.join(file)).unwrap(),
        );
        assert!(a == b, "{file} differs after {kills} kills");
    }
    let epochs = std::fs::read_to_string(out.join("training_log.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 8);
}

/// A bf16 run's checkpoint resumes in bf16 only: its products differ from f32's. int8 does
/// not train.
#[test]
fn a_checkpoint_resumes_only_with_the_dtype_it_was_made_with() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bert();
    let train = write_csv(dir.path(), "train.csv", 24);
    let out = dir.path().join("run");
    let run = |dtype: &str, resume: bool| {
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
            "--batch-size",
            "4",
            "--dtype",
            dtype,
            "--out",
            s(&out),
            "--quiet",
        ];
        if resume {
            args.push("--resume");
        }
        adapterkit(&args)
    };
    let first = run("bf16", false);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let other = run("f32", true);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "resumed in f32");
    assert!(
        stderr.contains("--dtype differ") && stderr.contains("bf16 products"),
        "{stderr}"
    );
    let same = run("bf16", true);
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    // int8 is for inference.
    let int8 = run("int8", false);
    let stderr = String::from_utf8_lossy(&int8.stderr);
    assert!(
        !int8.status.success() && stderr.contains("int8 is for inference"),
        "{stderr}"
    );
}
