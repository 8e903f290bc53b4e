//! Reading a labelled dataset from a CSV, TSV or JSON Lines file. Every error names the file
//! and, where there is one, the 1-based line (the header is line 1).

use std::path::Path;

use serde_json::Value;

use super::{Columns, Dataset, Example, Target, TaskKind};
use crate::error::{Error, Result};

/// Reads the examples of a `.csv` (comma-separated), `.tsv` (tab-separated) or `.jsonl`/`.json`
/// (one JSON object per line) file. CSV and TSV files start with a header line naming the
/// columns. The label is read according to `kind`:
///
/// - classification: the class name (trimmed); in JSON also a number or a boolean, as written;
/// - multi-label: in CSV/TSV the class names separated by `|` (an empty cell is no class), in
///   JSON an array of strings;
/// - regression: a finite number (as an `f32`).
pub fn read_dataset(path: &Path, columns: &Columns, kind: TaskKind) -> Result<Dataset> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let delimiter = match extension.as_deref() {
        Some("csv") => Some(b','),
        Some("tsv") => Some(b'\t'),
        Some("jsonl" | "json") => None,
        _ => {
            return Err(Error::file(
                path,
                "unknown dataset format: expected a .csv, .tsv, .jsonl or .json file",
            ))
        }
    };
    let text = read_utf8(path)?;
    // Spreadsheet programs often start their exports with a byte-order mark, which would
    // otherwise become part of the first column's name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    // Checked here so that an empty CSV says so, rather than that its header lacks a column.
    if text.trim().is_empty() {
        return Err(Error::file(path, "no examples (the file is empty)"));
    }
    let examples = match delimiter {
        Some(delimiter) => read_delimited(path, text, delimiter, columns, kind)?,
        None => read_json_lines(path, text, columns, kind)?,
    };
    if examples.is_empty() {
        return Err(Error::file(path, "no examples"));
    }
    let name = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    Ok(Dataset { name, examples })
}

/// The whole file as text. Decoding ourselves (rather than leaving it to a parser) lets a bad
/// byte be reported by its line.
pub(super) fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..valid]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::file(path, format!("line {line} is not valid UTF-8"))
    })
}

fn read_delimited(
    path: &Path,
    text: &str,
    delimiter: u8,
    columns: &Columns,
    kind: TaskKind,
) -> Result<Vec<Example>> {
    // Real TSV files (the VADER ground truth among them) hold `"` and `''` inside unquoted
    // text, so quotes are special only in CSV.
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(delimiter == b',')
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| csv_error(path, e))?
        .iter()
        .map(|name| name.trim().to_owned())
        .collect();
    let find = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            Error::file(
                path,
                format!("no column '{name}' (columns: {})", list(&header)),
            )
        })
    };
    let text_at = find(&columns.text)?;
    let pair_at = columns.text_pair.as_deref().map(find).transpose()?;
    let label_at = find(&columns.label)?;

    let mut examples = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, e))?;
        let line = record.position().map_or(0, |p| p.line());
        // `flexible(false)` has checked that every record is as wide as the header.
        let cell = |at: usize| record.get(at).unwrap_or("");
        let at_cell = |name: &str, message: String| {
            Error::file(path, format!("line {line}: column '{name}': {message}"))
        };
        let text = non_empty(cell(text_at)).map_err(|m| at_cell(&columns.text, m))?;
        let text_pair = match (pair_at, &columns.text_pair) {
            (Some(at), Some(name)) => Some(non_empty(cell(at)).map_err(|m| at_cell(name, m))?),
            _ => None,
        };
        let target = cell_target(cell(label_at), kind).map_err(|m| at_cell(&columns.label, m))?;
        examples.push(Example {
            text,
            text_pair,
            target,
        });
    }
    Ok(examples)
}

fn csv_error(path: &Path, error: csv::Error) -> Error {
    match error.kind() {
        csv::ErrorKind::UnequalLengths {
            pos: Some(pos),
            expected_len,
            len,
        } => Error::file(
            path,
            format!(
                "line {}: {len} fields, but the header has {expected_len}",
                pos.line()
            ),
        ),
        _ => Error::file(path, error),
    }
}

fn cell_target(cell: &str, kind: TaskKind) -> std::result::Result<Target, String> {
    let cell = cell.trim();
    match kind {
        TaskKind::Classification => class_name(cell).map(Target::Class),
        TaskKind::MultiLabel if cell.is_empty() => Ok(Target::Classes(Vec::new())),
        TaskKind::MultiLabel => cell
            .split('|')
            .map(|name| {
                class_name(name).map_err(|_| {
                    format!("empty class name in '{cell}' (classes are separated by '|')")
                })
            })
            .collect::<std::result::Result<_, _>>()
            .map(Target::Classes),
        TaskKind::Regression => match cell.parse::<f32>() {
            Ok(value) => finite(value, cell),
            Err(_) => Err(format!("'{cell}' is not a number")),
        },
    }
}

fn read_json_lines(
    path: &Path,
    text: &str,
    columns: &Columns,
    kind: TaskKind,
) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let n = index + 1;
        // A blank line (often the last one) holds no example.
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            // serde_json ends its message with "at line 1 column C", its line within ours.
            let message = e.to_string();
            let reason = message.split(" at line ").next().unwrap_or(&message);
            Error::file(
                path,
                format!(
                    "line {n}, column {}: malformed JSON ({reason}); the file must hold one object per line",
                    e.column()
                ),
            )
        })?;
        let Value::Object(object) = value else {
            return Err(Error::file(
                path,
                format!(
                    "line {n}: expected a JSON object, found {} (the file must hold one object per line)",
                    type_name(&value)
                ),
            ));
        };
        let field = |name: &str| {
            object.get(name).ok_or_else(|| {
                let keys: Vec<&String> = object.keys().collect();
                Error::file(
                    path,
                    format!("line {n}: no field '{name}' (fields: {})", list(&keys)),
                )
            })
        };
        let at_field = |name: &str, message: String| {
            Error::file(path, format!("line {n}: field '{name}': {message}"))
        };
        let text = json_text(field(&columns.text)?).map_err(|m| at_field(&columns.text, m))?;
        let text_pair = match &columns.text_pair {
            Some(name) => Some(json_text(field(name)?).map_err(|m| at_field(name, m))?),
            None => None,
        };
        let target =
            json_target(field(&columns.label)?, kind).map_err(|m| at_field(&columns.label, m))?;
        examples.push(Example {
            text,
            text_pair,
            target,
        });
    }
    Ok(examples)
}

fn json_text(value: &Value) -> std::result::Result<String, String> {
    match value {
        Value::String(text) => non_empty(text),
        other => Err(format!("expected a string, found {}", type_name(other))),
    }
}

fn json_target(value: &Value, kind: TaskKind) -> std::result::Result<Target, String> {
    match (kind, value) {
        (TaskKind::Classification, Value::String(name)) => class_name(name).map(Target::Class),
        // Numeric and boolean labels (0/1, true/false) are common; the class is their text.
        (TaskKind::Classification, Value::Number(x)) => Ok(Target::Class(x.to_string())),
        (TaskKind::Classification, Value::Bool(b)) => Ok(Target::Class(b.to_string())),
        (TaskKind::MultiLabel, Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(name) => class_name(name),
                other => Err(format!(
                    "expected an array of strings, found {} in it",
                    type_name(other)
                )),
            })
            .collect::<std::result::Result<_, _>>()
            .map(Target::Classes),
        (TaskKind::Regression, Value::Number(x)) => match x.as_f64() {
            Some(value) => finite(value as f32, &x.to_string()),
            None => Err(format!("'{x}' is not a number")),
        },
        (_, other) => {
            let expected = match kind {
                TaskKind::Classification => "a string, number or boolean",
                TaskKind::MultiLabel => "an array of strings",
                TaskKind::Regression => "a number",
            };
            Err(format!("expected {expected}, found {}", type_name(other)))
        }
    }
}

fn non_empty(text: &str) -> std::result::Result<String, String> {
    if text.trim().is_empty() {
        Err("empty text".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

fn class_name(name: &str) -> std::result::Result<String, String> {
    let name = name.trim();
    if name.is_empty() {
        Err("empty label".to_owned())
    } else {
        Ok(name.to_owned())
    }
}

/// A regression value; `written` is how the file wrote it, for the message.
fn finite(value: f32, written: &str) -> std::result::Result<Target, String> {
    if value.is_finite() {
        Ok(Target::Value(value))
    } else {
        Err(format!("'{written}' is not a finite number"))
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn list<T: std::fmt::Display>(names: &[T]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names
        .iter()
        .map(|name| format!("'{name}'"))
        .collect::<Vec<_>>()
        .join(", ")
}
