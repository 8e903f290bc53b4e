//! Texts from the command line or stdin, checked to be UTF-8.

use std::ffi::OsString;
use std::io::BufRead;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// The texts given as arguments; with none (or a single `-`), the lines of stdin.
pub fn texts(args: &[OsString]) -> Result<Vec<String>> {
    if args.is_empty() || (args.len() == 1 && args[0] == "-") {
        return stdin_lines();
    }
    args.iter()
        .enumerate()
        .map(|(i, a)| {
            a.to_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("text argument {} is not valid UTF-8", i + 1))
        })
        .collect()
}

fn stdin_lines() -> Result<Vec<String>> {
    lines(std::io::stdin().lock(), "stdin")
}

/// The lines of a text file.
pub fn file_lines(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    lines(std::io::BufReader::new(file), &path.display().to_string())
}

fn lines(reader: impl BufRead, source: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let mut bytes = line.with_context(|| format!("reading {source}"))?;
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow!("{source} line {} is not valid UTF-8 ({e})", i + 1))?;
        out.push(text);
    }
    Ok(out)
}
