//! Labelled text datasets: read from CSV, TSV or JSON Lines files ([`read_dataset`]), or one of
//! the built-in datasets with fixed, seeded splits ([`builtin()`]). See `docs/DATASETS.md`.

mod builtin;
mod files;

pub use builtin::{builtin, BUILTIN, SPLIT_SEED};
pub use files::read_dataset;

use std::collections::BTreeSet;

/// What an example is labelled with.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Single-label classification: one class name.
    Class(String),
    /// Multi-label classification: any number of class names, possibly none.
    Classes(Vec<String>),
    /// Regression: one finite value.
    Value(f32),
}

/// One text (or text pair) with its target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    pub target: Target,
}

/// A named list of examples.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub examples: Vec<Example>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The class names used by the examples, sorted and without repeats; empty for regression.
    pub fn labels(&self) -> Vec<String> {
        let mut labels = BTreeSet::new();
        for example in &self.examples {
            match &example.target {
                Target::Class(class) => {
                    labels.insert(class.as_str());
                }
                Target::Classes(classes) => labels.extend(classes.iter().map(String::as_str)),
                Target::Value(_) => {}
            }
        }
        labels.into_iter().map(str::to_owned).collect()
    }
}

/// How the label column is read, and so which [`Target`] every example gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Classification,
    MultiLabel,
    Regression,
}

/// Which columns (CSV/TSV header names, or JSON keys) hold the text, the optional second text
/// and the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            text: "text".to_owned(),
            text_pair: None,
            label: "label".to_owned(),
        }
    }
}

/// A dataset cut into training, validation and (optionally) test examples.
#[derive(Debug, Clone, PartialEq)]
pub struct Splits {
    pub train: Dataset,
    pub validation: Dataset,
    pub test: Option<Dataset>,
    pub kind: TaskKind,
}
