//! Mutation fuzzing of every file reader, through the binary: seeded mutations (bit flips, byte
//! changes, cuts, insertions, repeated and spliced chunks) of real files, each run in a child
//! process with a memory limit and a time limit. A reader may refuse an input (exit 1, a
//! message) but never panic, abort, hang or exhaust memory.
//!
//! CI runs a fixed number of mutations per target. `scripts/fuzz.sh SECONDS` runs each target
//! for that long instead (`ADAPTERKIT_FUZZ_SECONDS`); a failing input is kept under
//! `target/fuzz-failures/` and its seed printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adapterkit::rng::SeededRng;

/// Mutations per target in an ordinary test run.
const MUTATIONS: usize = 24;
/// How long one input may take, and how much memory it may map.
const TIME_LIMIT: Duration = Duration::from_secs(20);
const MEMORY_LIMIT_KIB: u64 = 4 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// One seeded mutation of `bytes`: a few edits of random kinds.
fn mutate(bytes: &[u8], rng: &mut SeededRng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = |rng: &mut SeededRng, len: usize| rng.below(len.max(1));
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = at(rng, out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = at(rng, out.len());
                out[i] = [0, 0xff, 0x7f, 0x80, b'9', b'"', b'{'][rng.below(7)];
            }
            2 => {
                let keep = at(rng, out.len() + 1);
                out.truncate(keep);
            }
            3 => {
                let i = at(rng, out.len() + 1);
                let junk: Vec<u8> = (0..1 + rng.below(16))
                    .map(|_| rng.below(256) as u8)
                    .collect();
                out.splice(i..i, junk);
            }
            4 if !out.is_empty() => {
                // A chunk repeated: long runs, duplicated keys and records.
                let start = at(rng, out.len());
                let end = (start + 1 + rng.below(64)).min(out.len());
                let chunk = out[start..end].to_vec();
                for _ in 0..1 + rng.below(8) {
                    out.splice(end..end, chunk.iter().copied());
                }
            }
            5 if out.len() > 8 => {
                // Digits made large: sizes, offsets, shapes and counts.
                let i = at(rng, out.len());
                if out[i].is_ascii_digit() {
                    out.splice(i..i, b"99999999999".iter().copied());
                }
            }
            _ if !out.is_empty() => {
                let i = at(rng, out.len());
                out.remove(i);
            }
            _ => out.push(rng.below(256) as u8),
        }
    }
    out
}

/// A reader under test: a folder laid out for the command, the file in it that is mutated,
/// and the command that reads it.
struct Target {
    name: &'static str,
    /// Copies the inputs into the folder.
    lay_out: fn(&Path),
    file: &'static str,
    args: fn(&Path) -> Vec<String>,
}

fn tiny() -> PathBuf {
    repo().join("tests/fixtures/tiny-bert")
}

fn model_in(dir: &Path) {
    copy_dir(&tiny(), dir);
}

fn adapter_in(dir: &Path) {
    copy_dir(&repo().join("tests/fixtures/adapters/houlsby"), dir);
    // One weights file each, so that the mutated one is the one read.
    std::fs::remove_file(dir.join("pytorch_adapter.bin")).unwrap();
    std::fs::remove_file(dir.join("pytorch_model_head.bin")).unwrap();
}

fn pickled_adapter_in(dir: &Path) {
    copy_dir(&repo().join("tests/fixtures/adapters/houlsby"), dir);
    std::fs::remove_file(dir.join("adapter.safetensors")).unwrap();
    std::fs::remove_file(dir.join("model_head.safetensors")).unwrap();
}

/// A LoRA and a bottleneck adapter in one union (adapters 1.3's files).
fn union_in(dir: &Path) {
    copy_dir(&repo().join("tests/fixtures/lora/union"), dir);
    for file in [
        "pytorch_adapter.bin",
        "pytorch_model_head.bin",
        "expected.safetensors",
    ] {
        std::fs::remove_file(dir.join(file)).unwrap();
    }
}

/// A PEFT sequence-classification LoRA (PEFT 0.21's files).
fn peft_in(dir: &Path) {
    copy_dir(&repo().join("tests/fixtures/peft/lora"), dir);
    std::fs::remove_file(dir.join("expected.safetensors")).unwrap();
}

/// A fusion saved as `fuse` saves it: its layer and head, the fused adapters in sub-folders.
fn fusion_in(dir: &Path) {
    let fusion = repo().join("tests/fixtures/fusion");
    copy_dir(&fusion.join("dynamic"), dir);
    std::fs::remove_file(dir.join("pytorch_model_adapter_fusion.bin")).unwrap();
    std::fs::remove_file(dir.join("pytorch_model_head.bin")).unwrap();
    for name in ["a", "b"] {
        copy_dir(&fusion.join(format!("adapter_{name}")), &dir.join(name));
        std::fs::remove_file(dir.join(name).join("pytorch_adapter.bin")).unwrap();
    }
}

fn data_in(dir: &Path) {
    let labels = ["neg", "neu", "pos"];
    let csv: String = (0..12)
        .map(|i| format!("\"text number {i}, with a comma\",{}\n", labels[i % 3]))
        .collect();
    std::fs::write(dir.join("data.csv"), format!("text,label\n{csv}")).unwrap();
    let jsonl: String = (0..12)
        .map(|i| {
            format!(
                "{{\"text\": \"text {i}\", \"label\": \"{}\"}}\n",
                labels[i % 3]
            )
        })
        .collect();
    std::fs::write(dir.join("data.jsonl"), jsonl).unwrap();
    let tsv: String = (0..12)
        .map(|i| format!("text {i}, with a comma\t{}\n", labels[i % 3]))
        .collect();
    std::fs::write(dir.join("data.tsv"), format!("text\tlabel\n{tsv}")).unwrap();
    adapter_in(&dir.join("adapter"));
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn encode(dir: &Path) -> Vec<String> {
    ["encode", "--model", &s(dir), "a text, with some words"]
        .map(String::from)
        .to_vec()
}

fn predict(dir: &Path) -> Vec<String> {
    let args = [
        "predict",
        "--model",
        &s(&tiny()),
        "--adapter",
        &s(dir),
        "a text",
    ];
    args.map(String::from).to_vec()
}

fn eval(file: &'static str) -> impl Fn(&Path) -> Vec<String> {
    move |dir: &Path| {
        let args = [
            "eval",
            "--model",
            &s(&tiny()),
            "--adapter",
            &s(&dir.join("adapter")),
            "--test",
            &s(&dir.join(file)),
        ];
        args.map(String::from).to_vec()
    }
}

fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "model config.json",
            lay_out: model_in,
            file: "config.json",
            args: encode,
        },
        Target {
            name: "model.safetensors",
            lay_out: model_in,
            file: "model.safetensors",
            args: encode,
        },
        Target {
            name: "tokenizer.json",
            lay_out: model_in,
            file: "tokenizer.json",
            args: encode,
        },
        Target {
            name: "tokenizer_config.json",
            lay_out: model_in,
            file: "tokenizer_config.json",
            args: encode,
        },
        Target {
            name: "adapter_config.json",
            lay_out: adapter_in,
            file: "adapter_config.json",
            args: predict,
        },
        Target {
            name: "adapter.safetensors",
            lay_out: adapter_in,
            file: "adapter.safetensors",
            args: predict,
        },
        Target {
            name: "head_config.json",
            lay_out: adapter_in,
            file: "head_config.json",
            args: predict,
        },
        Target {
            name: "model_head.safetensors",
            lay_out: adapter_in,
            file: "model_head.safetensors",
            args: predict,
        },
        Target {
            name: "pytorch_adapter.bin (pickle)",
            lay_out: pickled_adapter_in,
            file: "pytorch_adapter.bin",
            args: predict,
        },
        Target {
            name: "pytorch_model_head.bin (pickle)",
            lay_out: pickled_adapter_in,
            file: "pytorch_model_head.bin",
            args: predict,
        },
        Target {
            name: "adapter_fusion_config.json",
            lay_out: fusion_in,
            file: "adapter_fusion_config.json",
            args: predict,
        },
        Target {
            name: "model_adapter_fusion.safetensors",
            lay_out: fusion_in,
            file: "model_adapter_fusion.safetensors",
            args: predict,
        },
        Target {
            name: "union adapter_config.json (LoRA + bottleneck)",
            lay_out: union_in,
            file: "adapter_config.json",
            args: predict,
        },
        Target {
            name: "union adapter.safetensors (LoRA + bottleneck)",
            lay_out: union_in,
            file: "adapter.safetensors",
            args: predict,
        },
        Target {
            name: "PEFT adapter_config.json",
            lay_out: peft_in,
            file: "adapter_config.json",
            args: predict,
        },
        Target {
            name: "PEFT adapter_model.safetensors",
            lay_out: peft_in,
            file: "adapter_model.safetensors",
            args: predict,
        },
        Target {
            name: "CSV data",
            lay_out: data_in,
            file: "data.csv",
            args: |d| eval("data.csv")(d),
        },
        Target {
            name: "JSONL data",
            lay_out: data_in,
            file: "data.jsonl",
            args: |d| eval("data.jsonl")(d),
        },
        Target {
            name: "TSV data",
            lay_out: data_in,
            file: "data.tsv",
            args: |d| eval("data.tsv")(d),
        },
    ]
}

/// Runs `args` under the limits; `Err` says what went wrong.
fn run_limited(args: &[String]) -> Result<(), String> {
    let script = format!("ulimit -v {MEMORY_LIMIT_KIB}; exec \"$0\" \"$@\"");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_adapterkit"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return match status.code() {
                Some(0) => Ok(()),
                // candle may warn on stderr before our error line.
                Some(1)
                    if !stderr.contains("panicked")
                        && stderr.lines().any(|l| l.starts_with("error: ")) =>
                {
                    Ok(())
                }
                code => Err(format!("exit {code:?} ({status}): {stderr}")),
            };
        }
        if started.elapsed() > TIME_LIMIT {
            child.kill().unwrap();
            child.wait().unwrap();
            return Err(format!("still running after {TIME_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn every_reader_survives_mutated_files() {
    let seconds: Option<u64> = std::env::var("ADAPTERKIT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let only = std::env::var("ADAPTERKIT_FUZZ_TARGET").ok();
    let mut failures = Vec::new();
    for (t, target) in targets().into_iter().enumerate() {
        if only.as_deref().is_some_and(|o| !target.name.contains(o)) {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        (target.lay_out)(dir.path());
        let path = dir.path().join(target.file);
        let original = std::fs::read(&path).unwrap();
        // The unmutated input reads.
        let args = (target.args)(dir.path());
        run_limited(&args).unwrap_or_else(|e| panic!("{}: the original fails: {e}", target.name));
        let started = Instant::now();
        let mut runs = 0u64;
        while match seconds {
            Some(s) => started.elapsed() < Duration::from_secs(s),
            None => runs < MUTATIONS as u64,
        } {
            let seed = (t as u64) << 32 | runs;
            let input = mutate(&original, &mut SeededRng::new(seed));
            std::fs::write(&path, &input).unwrap();
            if let Err(e) = run_limited(&args) {
                let keep = repo()
                    .join("target/fuzz-failures")
                    .join(format!("{t}-{runs}"));
                copy_dir(dir.path(), &keep);
                failures.push(format!(
                    "{} (seed {seed}, kept in {}): {e}",
                    target.name,
                    keep.display()
                ));
            }
            runs += 1;
        }
        eprintln!("{}: {runs} mutated inputs", target.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
