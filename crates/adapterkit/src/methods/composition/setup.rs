//! AdapterHub's composition blocks as a value (`adapters.composition`): `Stack`, `Fuse`,
//! `Parallel`, `BatchSplit` and `Average`, read from text or JSON and checked against
//! AdapterHub's nesting rules. [`super::Composition`] runs them.
//!
//! A setup is written `parallel(a,b,c)`, `stack(a,fuse(b,c))`, `average(a,b)[0.3,0.7]` (the
//! weights) or `batch_split(a,b)[4,4]` (the batch sizes), or given as AdapterHub's `to_dict()`
//! JSON.

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::methods::bottleneck::check_name;

/// An adapter setup: one adapter, or a block over child setups.
#[derive(Debug, Clone, PartialEq)]
pub enum Setup {
    Adapter(String),
    /// Each child on the output of the one before.
    Stack(Vec<Setup>),
    /// AdapterFusion's attention over the children's outputs (a fusion layer of that name).
    Fuse(Vec<Setup>),
    /// Each child on its own copy of the batch: one output per child (multi-task inference).
    Parallel(Vec<Setup>),
    /// Consecutive slices of the batch, of these sizes, to the children in turn.
    BatchSplit {
        children: Vec<Setup>,
        batch_sizes: Vec<usize>,
    },
    /// A weighted combination of the children's outputs; the weights are normalised to sum 1.
    Average {
        children: Vec<Setup>,
        weights: Vec<f64>,
    },
}

/// The largest batch_split size accepted: sizes are summed, and no batch is near this.
const MAX_BATCH_SIZE: f64 = 4_294_967_295.0;

/// What each block may hold: AdapterHub's `ALLOWED_NESTINGS` (adapters 1.3), without Split and
/// MultiTask, which we do not have.
fn may_nest(parent: &Setup, child: &Setup) -> bool {
    use Setup::*;
    matches!(
        (parent, child),
        (_, Adapter(_))
            | (
                Stack(_),
                Fuse(_) | Parallel(_) | BatchSplit { .. } | Average { .. }
            )
            | (Fuse(_), Stack(_))
            | (
                Parallel(_) | BatchSplit { .. },
                Stack(_) | BatchSplit { .. } | Average { .. }
            )
            | (Average { .. }, Stack(_) | BatchSplit { .. })
    )
}

impl Setup {
    /// Reads the text form (`parallel(a,b)`) or AdapterHub's JSON, and validates it. One bare
    /// name is AdapterHub's `Stack(name)`.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let setup = if text.starts_with('{') || text.starts_with('"') {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| Error::input(format!("adapter setup JSON: {e}")))?;
            Self::from_json(&value)?
        } else {
            let mut parser = Parser { text, at: 0 };
            let setup = parser.setup()?;
            parser.skip_space();
            if parser.at != text.len() {
                return Err(parser.error("unexpected text after the setup"));
            }
            setup
        };
        let setup = match setup {
            Setup::Adapter(name) => Setup::Stack(vec![Setup::Adapter(name)]),
            other => other,
        };
        setup.validate(0)?;
        Ok(setup)
    }

    /// AdapterHub's `AdapterCompositionBlock.from_dict` (or a bare name).
    pub fn from_json(value: &Value) -> Result<Self> {
        let bad = |what: &str| Error::input(format!("adapter setup JSON: {what} in {value}"));
        if let Some(name) = value.as_str() {
            return Ok(Setup::Adapter(name.into()));
        }
        let kind = value["type"].as_str().ok_or_else(|| bad("no \"type\""))?;
        let children = value["children"]
            .as_array()
            .ok_or_else(|| bad("no \"children\" list"))?;
        if kind == "single" {
            return match children.as_slice() {
                [Value::String(name)] => Ok(Setup::Adapter(name.clone())),
                _ => Err(bad("a \"single\" needs one adapter name")),
            };
        }
        let children = children
            .iter()
            .map(Self::from_json)
            .collect::<Result<Vec<_>>>()?;
        let numbers = |key: &str| -> Result<Option<Vec<f64>>> {
            match &value["kwargs"][key] {
                Value::Null => Ok(None),
                v => serde_json::from_value(v.clone())
                    .map(Some)
                    .map_err(|_| bad(&format!("\"{key}\" is not a list of numbers"))),
            }
        };
        Self::block(
            &kind.to_lowercase(),
            children,
            numbers("batch_sizes")?.or(numbers("weights")?),
        )
    }

    /// A block from its (lower-case) name, children and the numbers in brackets.
    fn block(kind: &str, children: Vec<Setup>, numbers: Option<Vec<f64>>) -> Result<Self> {
        let takes_numbers = matches!(kind, "batchsplit" | "batch_split" | "average");
        if numbers.is_some() && !takes_numbers {
            return Err(Error::input(format!(
                "{kind}(...) takes no [numbers]; only batch_split (the batch sizes) and average (the weights) do"
            )));
        }
        Ok(match kind {
            "stack" => Setup::Stack(children),
            "fuse" => Setup::Fuse(children),
            "parallel" => Setup::Parallel(children),
            "batchsplit" | "batch_split" => {
                let sizes = numbers.ok_or_else(|| {
                    Error::input("batch_split(...) needs its batch sizes, e.g. batch_split(a,b)[4,4]")
                })?;
                if sizes
                    .iter()
                    .any(|s| s.fract() != 0.0 || !(0.0..=MAX_BATCH_SIZE).contains(s))
                {
                    return Err(Error::input(format!(
                        "batch_split sizes must be whole numbers from 0 to {MAX_BATCH_SIZE}, got {sizes:?}"
                    )));
                }
                Setup::BatchSplit {
                    children,
                    batch_sizes: sizes.iter().map(|s| *s as usize).collect(),
                }
            }
            "average" => {
                let n = children.len().max(1);
                let weights = numbers.unwrap_or_else(|| vec![1.0; n]);
                let total: f64 = weights.iter().sum();
                if !total.is_finite() || total == 0.0 {
                    return Err(Error::input(format!(
                        "average weights must have a finite, non-zero sum, got {weights:?}"
                    )));
                }
                Setup::Average {
                    children,
                    weights: weights.iter().map(|w| w / total).collect(),
                }
            }
            other => {
                return Err(Error::input(format!(
                    "unknown composition block '{other}' (known: stack, fuse, parallel, batch_split, average)"
                )))
            }
        })
    }

    /// The block's name as AdapterHub's class.
    fn kind(&self) -> &'static str {
        match self {
            Setup::Adapter(_) => "single",
            Setup::Stack(_) => "Stack",
            Setup::Fuse(_) => "Fuse",
            Setup::Parallel(_) => "Parallel",
            Setup::BatchSplit { .. } => "BatchSplit",
            Setup::Average { .. } => "Average",
        }
    }

    pub fn children(&self) -> &[Setup] {
        match self {
            Setup::Adapter(_) => &[],
            Setup::Stack(c) | Setup::Fuse(c) | Setup::Parallel(c) => c,
            Setup::BatchSplit { children, .. } | Setup::Average { children, .. } => children,
        }
    }

    /// AdapterHub's `validate_composition`: the nesting table, and below the first level only
    /// stacks and adapters. Also checks names and that the numbers fit the children.
    pub(crate) fn validate(&self, level: usize) -> Result<()> {
        if level > 1 && !matches!(self, Setup::Stack(_) | Setup::Adapter(_)) {
            return Err(Error::input(format!(
                "adapter setup too deep: {self} cannot sit at nesting level {level} (only stack and adapters can)"
            )));
        }
        if let Setup::Adapter(name) = self {
            return check_name(name).map_err(|m| Error::input(format!("adapter '{name}': {m}")));
        }
        let children = self.children();
        if children.is_empty() {
            return Err(Error::input(format!("{self} has no adapters")));
        }
        let counts = match self {
            Setup::BatchSplit { batch_sizes, .. } => Some(batch_sizes.len()),
            Setup::Average { weights, .. } => Some(weights.len()),
            _ => None,
        };
        if let Some(count) = counts.filter(|c| *c != children.len()) {
            return Err(Error::input(format!(
                "{self}: {count} numbers for {} children",
                children.len()
            )));
        }
        if let Setup::Stack(_) = self {
            let mut parallels = children.iter().filter(|c| matches!(c, Setup::Parallel(_)));
            if let Some(first) = parallels.next() {
                if let Some(other) =
                    parallels.find(|p| p.children().len() != first.children().len())
                {
                    return Err(Error::input(format!(
                        "{self}: the parallel blocks of a stack must have as many children each \
                         ({first} has {}, {other} has {})",
                        first.children().len(),
                        other.children().len()
                    )));
                }
            }
        }
        for child in children {
            if !may_nest(self, child) {
                return Err(Error::input(format!(
                    "cannot nest {} in {} ({child} in {self}); {} may hold {}",
                    child.kind(),
                    self.kind(),
                    self.kind(),
                    allowed_children(self)
                )));
            }
            child.validate(level + 1)?;
        }
        Ok(())
    }

    /// AdapterHub's `to_dict()`.
    pub fn to_json(&self) -> Value {
        if let Setup::Adapter(name) = self {
            return json!({"type": "single", "children": [name]});
        }
        let mut value = json!({
            "type": self.kind(),
            "children": self.children().iter().map(Setup::to_json).collect::<Vec<_>>(),
        });
        match self {
            Setup::BatchSplit { batch_sizes, .. } => {
                value["kwargs"] = json!({ "batch_sizes": batch_sizes })
            }
            Setup::Average { weights, .. } => value["kwargs"] = json!({ "weights": weights }),
            _ => {}
        }
        value
    }

    /// Every adapter name, in order of first appearance.
    pub fn names(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        self.visit(&mut |s| {
            if let Setup::Adapter(name) = s {
                if !out.contains(&name.as_str()) {
                    out.push(name);
                }
            }
        });
        out
    }

    pub fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Setup)) {
        f(self);
        for child in self.children() {
            child.visit(f);
        }
    }

    /// AdapterHub's `first()`: the first adapter named.
    pub fn first(&self) -> &str {
        match self {
            Setup::Adapter(name) => name,
            block => block.children()[0].first(),
        }
    }

    /// AdapterHub's `last()`: the last adapter named.
    pub fn last(&self) -> &str {
        match self {
            Setup::Adapter(name) => name,
            block => block
                .children()
                .last()
                .expect("validated: not empty")
                .last(),
        }
    }

    /// A `Fuse` block's fusion layer name: its children's last adapters joined by commas.
    pub fn fusion_name(children: &[Setup]) -> String {
        children
            .iter()
            .map(Setup::last)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many copies of the batch the setup runs on (AdapterHub's `parallel_channels`).
    pub fn parallel_channels(&self) -> usize {
        match self {
            Setup::Adapter(_) => 1,
            Setup::Parallel(children) => children.len(),
            block => block
                .children()
                .iter()
                .map(Setup::parallel_channels)
                .max()
                .unwrap_or(1),
        }
    }
}

fn allowed_children(parent: &Setup) -> &'static str {
    match parent {
        Setup::Adapter(_) => "nothing",
        Setup::Stack(_) => "adapters, fuse, parallel, batch_split and average",
        Setup::Fuse(_) => "adapters and stack",
        Setup::Parallel(_) | Setup::BatchSplit { .. } => "adapters, stack, batch_split and average",
        Setup::Average { .. } => "adapters, stack and batch_split",
    }
}

impl std::fmt::Display for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, numbers) = match self {
            Setup::Adapter(name) => return write!(f, "{name}"),
            Setup::Stack(_) => ("stack", None),
            Setup::Fuse(_) => ("fuse", None),
            Setup::Parallel(_) => ("parallel", None),
            Setup::BatchSplit { batch_sizes, .. } => (
                "batch_split",
                Some(
                    batch_sizes
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>(),
                ),
            ),
            Setup::Average { weights, .. } => (
                "average",
                Some(weights.iter().map(|w| w.to_string()).collect::<Vec<_>>()),
            ),
        };
        let children: Vec<String> = self.children().iter().map(|c| c.to_string()).collect();
        write!(f, "{name}({})", children.join(","))?;
        if let Some(numbers) = numbers {
            write!(f, "[{}]", numbers.join(","))?;
        }
        Ok(())
    }
}

/// A recursive-descent reader of `block(child,...)[numbers]`.
struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn error(&self, message: &str) -> Error {
        Error::input(format!(
            "adapter setup '{}': {message} at character {}",
            self.text,
            self.at + 1
        ))
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.text[self.at..]
            .chars()
            .next()
            .filter(|c| c.is_whitespace())
        {
            self.at += c.len_utf8();
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.text[self.at..].starts_with(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn word(&mut self) -> &str {
        self.skip_space();
        let start = self.at;
        let rest = &self.text[start..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.+e".contains(c)))
            .unwrap_or(rest.len());
        self.at += len;
        &self.text[start..start + len]
    }

    fn setup(&mut self) -> Result<Setup> {
        let word = self.word().to_string();
        if word.is_empty() {
            return Err(self.error("expected an adapter name or a block"));
        }
        if !self.eat('(') {
            return Ok(Setup::Adapter(word));
        }
        let mut children = vec![self.setup()?];
        while self.eat(',') {
            children.push(self.setup()?);
        }
        if !self.eat(')') {
            return Err(self.error("expected ',' or ')'"));
        }
        let numbers = if self.eat('[') {
            let mut numbers = Vec::new();
            loop {
                let word = self.word().to_string();
                numbers.push(
                    word.parse::<f64>()
                        .map_err(|_| self.error(&format!("'{word}' is not a number")))?,
                );
                if self.eat(']') {
                    break;
                }
                if !self.eat(',') {
                    return Err(self.error("expected ',' or ']'"));
                }
            }
            Some(numbers)
        } else {
            None
        };
        Setup::block(&word.to_lowercase(), children, numbers)
    }
}
