//! Prediction heads with AdapterHub's layout and `head_config.json`: classification,
//! multi-label classification and regression (a one-output classification head, as
//! AdapterHub does it).
//!
//! Layout for `layers = 2`: `[Dropout, Linear, Tanh, Dropout, Linear]`, so the weights are
//! `heads.{name}.1.*` and `heads.{name}.4.*`. The head reads the first token's hidden state.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result as CandleResult, Tensor, D};
use candle_nn::Linear;
use serde::{Deserialize, Serialize};

use crate::data::TaskKind;
use crate::error::{Error, Result};
use crate::model::bert::BertPooler;
use crate::model::ops::Activation;
use crate::model::{BertModel, Mode};
use crate::params::{frozen_linear, init, new_linear, Params};
use crate::rng::SeededRng;

/// The `config` object of AdapterHub's `head_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// `classification` (also regression, with one label) or `multilabel_classification`.
    pub head_type: String,
    pub num_labels: usize,
    #[serde(default = "two")]
    pub layers: usize,
    #[serde(default = "tanh")]
    pub activation_function: Activation,
    /// Label name -> output index.
    #[serde(default)]
    pub label2id: BTreeMap<String, usize>,
    #[serde(default)]
    pub use_pooler: bool,
    #[serde(default = "yes")]
    pub bias: bool,
    #[serde(default)]
    pub dropout_prob: Option<f32>,
}

fn two() -> usize {
    2
}
fn tanh() -> Activation {
    Activation::Tanh
}
fn yes() -> bool {
    true
}

/// The most layers a head may have (AdapterHub's are 1 or 2); more is a malformed file, not a
/// model to build.
const MAX_HEAD_LAYERS: usize = 64;

impl HeadConfig {
    /// A head for `kind` over `labels` (ignored for regression).
    pub fn new(kind: TaskKind, labels: &[String]) -> Result<Self> {
        let (head_type, label2id): (&str, BTreeMap<String, usize>) = match kind {
            TaskKind::Regression => ("classification", [("LABEL_0".to_string(), 0)].into()),
            TaskKind::Classification | TaskKind::MultiLabel => {
                if labels.len() < 2 && kind == TaskKind::Classification {
                    return Err(Error::input(format!(
                        "a classification head needs at least 2 labels, the data has {}",
                        labels.len()
                    )));
                }
                let head_type = if kind == TaskKind::MultiLabel {
                    "multilabel_classification"
                } else {
                    "classification"
                };
                (head_type, labels.iter().cloned().zip(0..).collect())
            }
        };
        Ok(Self {
            head_type: head_type.into(),
            num_labels: label2id.len(),
            layers: 2,
            activation_function: Activation::Tanh,
            label2id,
            use_pooler: false,
            bias: true,
            dropout_prob: None,
        })
    }

    pub fn kind(&self) -> Result<TaskKind> {
        match (self.head_type.as_str(), self.num_labels) {
            ("classification", 1) => Ok(TaskKind::Regression),
            ("classification", _) => Ok(TaskKind::Classification),
            ("multilabel_classification", _) => Ok(TaskKind::MultiLabel),
            (other, _) => Err(Error::input(format!(
                "head_type '{other}' is not supported (supported: classification, multilabel_classification)"
            ))),
        }
    }

    /// Checks what serde cannot: a supported head type and a label map that numbers the
    /// outputs `0..num_labels` once each.
    pub fn validate(&self) -> Result<()> {
        let kind = self.kind()?;
        if !(1..=MAX_HEAD_LAYERS).contains(&self.layers) {
            return Err(Error::input(format!(
                "a head of {} layers: adapterkit builds heads of 1 to {MAX_HEAD_LAYERS}",
                self.layers
            )));
        }
        if kind != TaskKind::Regression && self.label2id.len() != self.num_labels {
            return Err(Error::input(format!(
                "num_labels is {}, but label2id names {} labels",
                self.num_labels,
                self.label2id.len()
            )));
        }
        let mut ids: Vec<usize> = self.label2id.values().copied().collect();
        ids.sort_unstable();
        let expected: Vec<usize> = (0..self.num_labels).collect();
        if kind != TaskKind::Regression && ids != expected {
            return Err(Error::input(format!(
                "label2id must number the {} outputs 0..{} once each, got ids {ids:?}",
                self.num_labels, self.num_labels
            )));
        }
        Ok(())
    }

    /// Label names in output order.
    pub fn labels(&self) -> Vec<String> {
        let mut pairs: Vec<(&String, &usize)> = self.label2id.iter().collect();
        pairs.sort_by_key(|(_, i)| **i);
        pairs.into_iter().map(|(l, _)| l.clone()).collect()
    }

    pub fn label_id(&self, label: &str) -> Result<usize> {
        self.label2id.get(label).copied().ok_or_else(|| {
            Error::input(format!(
                "label '{label}' is not one the head knows ({})",
                self.labels().join(", ")
            ))
        })
    }
}

/// A prediction head: `layers - 1` blocks of `[Dropout, Linear, activation]`, then
/// `[Dropout, Linear]` to the outputs.
#[derive(Debug, Clone)]
pub struct Head {
    pub name: String,
    pub config: HeadConfig,
    linears: Vec<Linear>,
    dropout: f32,
    params: Params,
    /// The encoder's pooler (frozen), for a head that reads its output (`use_pooler`).
    pooler: Option<BertPooler>,
}

impl Head {
    /// A freshly initialised head (N(0, 0.02) weights, zero biases, as `transformers` does).
    pub fn new(
        name: &str,
        config: HeadConfig,
        hidden_size: usize,
        default_dropout: f32,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        if config.layers == 0 || config.num_labels == 0 || !config.bias {
            return Err(Error::input(format!(
                "head '{name}': layers and num_labels must be positive; bias=false is not supported"
            )));
        }
        let mut params = Params::default();
        let mut linears = Vec::new();
        for layer in 0..config.layers {
            let out = if layer + 1 == config.layers {
                config.num_labels
            } else {
                hidden_size
            };
            let index = 3 * layer + 1;
            linears.push(new_linear(
                &mut params,
                &format!("{index}"),
                init::normal(rng, (out, hidden_size), 0.02, device)?,
                init::zeros(out, device)?,
            )?);
        }
        Ok(Self {
            name: name.into(),
            dropout: config.dropout_prob.unwrap_or(default_dropout),
            config,
            linears,
            params,
            pooler: None,
        })
    }

    /// Gives a head that reads the pooler's output (`use_pooler`, as a Hugging Face
    /// sequence-classification model's classifier does) the encoder's pooler, frozen.
    pub fn read_pooler_of(&mut self, encoder: &BertModel) -> Result<()> {
        if !self.config.use_pooler {
            return Ok(());
        }
        let pooler = encoder.pooler.as_ref().ok_or_else(|| {
            Error::input(format!(
                "head '{}' reads the pooler's output (use_pooler), but the model has no pooler",
                self.name
            ))
        })?;
        self.pooler = Some(BertPooler {
            dense: frozen_linear(&pooler.dense),
        });
        Ok(())
    }

    /// A copy with plain-tensor weights: it runs, takes no gradient and records no graph.
    pub fn frozen(&self) -> Self {
        Self {
            linears: self.linears.iter().map(frozen_linear).collect(),
            params: Params::default(),
            ..self.clone()
        }
    }

    /// Parameters as AdapterHub names them: `heads.{name}.{index}.{weight,bias}`.
    pub fn params(&self) -> Params {
        let mut all = Params::default();
        all.extend_prefixed(&format!("heads.{}", self.name), self.params.clone());
        all
    }

    /// Logits `[batch, num_labels]` from the encoder's last hidden state `[batch, seq, hidden]`
    /// (its first position, or the pooler's output of it; `[batch, 1, hidden]` is enough).
    pub fn forward(&self, last_hidden_state: &Tensor, mode: &mut Mode) -> CandleResult<Tensor> {
        let mut x = match (&self.pooler, self.config.use_pooler) {
            (Some(pooler), _) => pooler.forward(last_hidden_state)?,
            (None, false) => last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?,
            (None, true) => candle_core::bail!("head '{}' has no pooler to read", self.name),
        };
        let last = self.linears.len() - 1;
        for (i, linear) in self.linears.iter().enumerate() {
            x = crate::model::ops::linear(linear, &mode.dropout(&x, self.dropout)?)?;
            if i < last {
                x = self.config.activation_function.forward(&x)?;
            }
        }
        Ok(x)
    }

    /// The training loss, averaged over the batch, as AdapterHub's heads compute it:
    /// cross-entropy (`targets`: u32 class ids), MSE (`targets`: f32 values), or binary
    /// cross-entropy with logits (`targets`: f32 0/1, `[batch, num_labels]`).
    pub fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(match self.config.kind()? {
            TaskKind::Classification => candle_nn::loss::cross_entropy(logits, targets)?,
            TaskKind::Regression => {
                let diff = (logits.flatten_all()? - targets.flatten_all()?)?;
                diff.sqr()?.mean_all()?
            }
            TaskKind::MultiLabel => bce_with_logits(logits, targets)?,
        })
    }
}

/// `mean(max(x, 0) - x y + log(1 + exp(-|x|)))`: binary cross-entropy on logits, stable for
/// large |x|.
fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> CandleResult<Tensor> {
    let targets = targets.to_dtype(DType::F32)?;
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (logits.relu()? - (logits * targets)? + softplus)?.mean_all()
}

/// Probabilities from logits, per task kind: softmax, sigmoid, or the value itself.
pub fn scores(kind: TaskKind, logits: &Tensor) -> CandleResult<Tensor> {
    match kind {
        TaskKind::Classification => crate::model::ops::softmax_last_dim(logits),
        TaskKind::MultiLabel => candle_nn::ops::sigmoid(logits),
        TaskKind::Regression => logits.squeeze(D::Minus1),
    }
}
