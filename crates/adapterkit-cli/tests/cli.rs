//! The `adapterkit` binary end to end: outputs, exit codes and error messages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_bert() -> PathBuf {
    repo().join("tests/fixtures/tiny-bert")
}

fn adapterkit(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Runs a command that must fail cleanly: non-zero exit, no panic, and a message on stderr
/// that contains every one of `needles`.
fn assert_clean_failure(args: &[&str], stdin: &[u8], needles: &[&str]) {
    let out = adapterkit(args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stderr: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr:?}"
        );
    }
}

/// A copy of the tiny model's directory, to break one file of it.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_bert()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn info_json_counts_every_parameter_of_the_checkpoint() {
    let out = adapterkit(&["info", "--model", s(&tiny_bert()), "--json"], b"");
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(info["model_type"], "bert");
    assert_eq!(info["num_layers"], 2);
    assert_eq!(info["hidden_size"], 32);
    // The checkpoint holds every parameter (and no buffers), so the count is its element total.
    let tensors = candle_core::safetensors::load(
        tiny_bert().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let total: usize = tensors.values().map(|t| t.elem_count()).sum();
    assert_eq!(info["parameters"], total);
}

#[test]
fn info_reports_minilm_parameters_like_transformers() {
    let dir = repo().join("assets/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        assert_ne!(
            std::env::var("ADAPTERKIT_REQUIRE_ASSETS").as_deref(),
            Ok("1"),
            "assets missing"
        );
        eprintln!("skipping: MiniLM not fetched");
        return;
    }
    let out = adapterkit(&["info", "--model", s(&dir), "--json"], b"");
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(info["parameters"], 22_713_216);
    assert_eq!(info["num_layers"], 6);
    assert_eq!(info["hidden_size"], 384);
}

#[test]
fn encode_reads_arguments_or_stdin_lines_alike() {
    let model = tiny_bert();
    let from_args = adapterkit(
        &["encode", "--model", s(&model), "the cat", "hello world!"],
        b"",
    );
    let from_stdin = adapterkit(
        &["encode", "--model", s(&model)],
        b"the cat\nhello world!\n",
    );
    assert!(from_args.status.success() && from_stdin.status.success());
    assert_eq!(stdout(&from_args), stdout(&from_stdin));
    let text = stdout(&from_args);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l.split(' ').count() == 32));

    let json = adapterkit(
        &[
            "encode",
            "--model",
            s(&model),
            "--pooling",
            "cls",
            "--json",
            "--normalize",
            "the cat",
        ],
        b"",
    );
    let line: serde_json::Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    assert_eq!(line["text"], "the cat");
    let norm: f64 = line["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap().powi(2))
        .sum();
    assert!(
        (norm - 1.0).abs() < 1e-5,
        "normalized embedding has squared norm {norm}"
    );
}

#[test]
fn a_directory_without_config_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    assert_clean_failure(
        &["info", "--model", s(dir.path())],
        b"",
        &["config.json", "missing"],
    );
}

#[test]
fn a_missing_directory_is_named() {
    assert_clean_failure(
        &["info", "--model", "./no/such/dir"],
        b"",
        &["no/such/dir", "no such model directory"],
    );
}

#[test]
fn an_unknown_model_type_is_named() {
    let dir = tiny_copy();
    edit_config(dir.path(), |c| c["model_type"] = "gpt2".into());
    assert_clean_failure(
        &["info", "--model", s(dir.path())],
        b"",
        &["config.json", "unsupported model_type 'gpt2'"],
    );
}

#[test]
fn a_malformed_config_is_named() {
    let dir = tiny_copy();
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"bert\", \"hidden_size\": \"big\"",
    )
    .unwrap();
    assert_clean_failure(
        &["info", "--model", s(dir.path())],
        b"",
        &["config.json", "invalid config"],
    );
}

#[test]
fn weights_whose_shapes_disagree_with_the_config_are_named() {
    let dir = tiny_copy();
    edit_config(dir.path(), |c| c["intermediate_size"] = 40.into());
    assert_clean_failure(
        &["info", "--model", s(dir.path())],
        b"",
        &["model.safetensors", "intermediate.dense.weight", "shape"],
    );
}

#[test]
fn a_truncated_weights_file_is_named() {
    let dir = tiny_copy();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &["info", "--model", s(dir.path())],
        b"",
        &["model.safetensors", "not a readable safetensors file"],
    );
}

#[test]
fn a_missing_tokenizer_is_named() {
    let dir = tiny_copy();
    for name in ["tokenizer.json", "vocab.txt"] {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    assert_clean_failure(
        &["encode", "--model", s(dir.path()), "hello"],
        b"",
        &["no tokenizer.json or vocab.txt"],
    );
}

#[test]
fn non_utf8_text_is_rejected() {
    let model = tiny_bert();
    assert_clean_failure(
        &["encode", "--model", s(&model)],
        b"fine\n\xff\xfe bad\n",
        &["stdin line 2", "not valid UTF-8"],
    );
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"\xff");
        let out = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
            .args(["encode", "--model", s(&model)])
            .arg(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("text argument 1 is not valid UTF-8"));
    }
}

#[test]
fn every_command_takes_a_thread_count() {
    let tiny = tiny_bert();
    // The same embedding on one thread and on two.
    let embed = |threads: &str| {
        let out = adapterkit(
            &[
                "encode",
                "--model",
                s(&tiny),
                "--json",
                "--threads",
                threads,
                "a text",
            ],
            b"",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        line["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let (one, two) = (embed("1"), embed("2"));
    assert!(one.iter().zip(&two).all(|(a, b)| (a - b).abs() < 1e-6));
    assert_clean_failure(
        &["--threads", "0", "info", "--model", s(&tiny)],
        b"",
        &["--threads must be positive"],
    );
}

#[test]
fn encode_takes_a_dtype() {
    let tiny = tiny_bert();
    let embed = |dtype: &str| {
        let out = adapterkit(
            &[
                "encode",
                "--model",
                s(&tiny),
                "--json",
                "--dtype",
                dtype,
                "a text",
            ],
            b"",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        let values = line["embedding"].as_array().unwrap().iter();
        values.map(|v| v.as_f64().unwrap()).collect::<Vec<_>>()
    };
    let f32 = embed("f32");
    for dtype in ["bf16", "int8"] {
        let other = embed(dtype);
        let off = (f32.iter().zip(&other)).fold(0.0, |m: f64, (a, b)| m.max((a - b).abs()));
        // Near f32's, not equal (tests/precision.rs checks them exactly).
        assert!(off > 0.0 && off < 0.1, "{dtype} is {off} off f32");
    }
    // A usage error, as clap reports them (exit code 2).
    let out = adapterkit(&["encode", "--model", s(&tiny), "--dtype", "f16", "x"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(
        stderr.contains("unknown dtype 'f16' (f32, bf16 or int8)"),
        "{stderr}"
    );
}

#[test]
fn an_adapter_is_also_found_by_its_hub_id_in_the_cache() {
    // A Hub cache as hf-hub lays it out, holding an adapter made by Python's `adapters`.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--AdapterHub--tiny-houlsby");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let fixture = repo_fixture("tests/fixtures/adapters/houlsby");
    for file in [
        "adapter_config.json",
        "adapter.safetensors",
        "head_config.json",
        "model_head.safetensors",
    ] {
        std::fs::copy(fixture.join(file), snapshot.join(file)).unwrap();
    }
    let tiny = tiny_bert();
    let predict = |adapter: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
            .args([
                "predict",
                "--model",
                s(&tiny),
                "--adapter",
                adapter,
                "the cat sat",
            ])
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        (
            out.status.success(),
            stdout(&out),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, by_id, stderr) = predict("AdapterHub/tiny-houlsby");
    assert!(ok, "{stderr}");
    let (_, by_dir, _) = predict(s(&fixture));
    assert_eq!(by_id, by_dir);
    let (ok, _, stderr) = predict("AdapterHub/not-there");
    assert!(!ok && stderr.contains("AdapterHub/not-there"), "{stderr}");
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}

fn repo_fixture(path: &str) -> PathBuf {
    repo().join(path)
}
