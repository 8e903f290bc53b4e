//! `config.json` of a Hugging Face encoder checkpoint (BERT and the architectures of
//! [`Architecture`]), read into BERT's field names.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::architecture::Architecture;
use crate::model::ops::Activation;

/// The fields of Hugging Face's `BertConfig` that the encoder uses; optional ones take
/// `transformers`' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub model_type: String,
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "defaults::dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "defaults::dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "defaults::position_embedding_type")]
    pub position_embedding_type: String,
    /// The dropout AdapterHub's heads use, when not `hidden_dropout_prob` (DistilBERT's
    /// `seq_classif_dropout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_dropout: Option<f32>,
    /// ELECTRA: the embeddings' width, projected to `hidden_size` when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<usize>,
}

mod defaults {
    use crate::model::ops::Activation;
    pub fn vocab_size() -> usize {
        30522
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn hidden_act() -> Activation {
        Activation::Gelu
    }
    pub fn dropout() -> f32 {
        0.1
    }
    pub fn max_position_embeddings() -> usize {
        512
    }
    pub fn type_vocab_size() -> usize {
        2
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn position_embedding_type() -> String {
        "absolute".into()
    }
}

impl BertConfig {
    /// BERT-base's shape (110M parameters), for benchmarks with random weights.
    pub fn bert_base() -> Self {
        serde_json::from_str(r#"{"model_type": "bert"}"#).expect("defaults are valid")
    }

    /// all-MiniLM-L6-v2's shape (22.7M parameters).
    pub fn minilm_l6() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 6,
            intermediate_size: 1536,
            ..Self::bert_base()
        }
    }

    /// roberta-base's shape (its `config.json`'s sizes), for benchmarks with random weights.
    pub fn roberta_base() -> Self {
        let config = serde_json::json!({
            "model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
            "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
        });
        Self::from_json(config).expect("a valid config")
    }

    /// distilbert-base-uncased's shape (its `config.json`'s sizes), for benchmarks.
    pub fn distilbert_base() -> Self {
        let config = serde_json::json!({
            "model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6,
            "n_heads": 12, "hidden_dim": 3072, "activation": "gelu", "seq_classif_dropout": 0.2,
        });
        Self::from_json(config).expect("a valid config")
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config_error = |message: String| Error::Config {
            path: path.into(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?;
        let config = Self::from_json(value).map_err(config_error)?;
        config.validate().map_err(config_error)?;
        Ok(config)
    }

    /// Reads a `config.json`'s fields, each architecture's own names and defaults (as
    /// `transformers` has them) taken to BERT's.
    pub fn from_json(mut value: serde_json::Value) -> std::result::Result<Self, String> {
        let Some(fields) = value.as_object_mut() else {
            return Err("config.json is not a JSON object".into());
        };
        let model_type = fields
            .get("model_type")
            .and_then(|t| t.as_str())
            .unwrap_or("");
        let architecture = Architecture::from_model_type(model_type);
        // DistilBERT names its fields its own way, has no token types and a fixed eps.
        if architecture == Some(Architecture::Distilbert) {
            for (own, bert) in [
                ("dim", "hidden_size"),
                ("n_layers", "num_hidden_layers"),
                ("n_heads", "num_attention_heads"),
                ("hidden_dim", "intermediate_size"),
                ("activation", "hidden_act"),
                ("dropout", "hidden_dropout_prob"),
                ("attention_dropout", "attention_probs_dropout_prob"),
                ("seq_classif_dropout", "classifier_dropout"),
            ] {
                if let Some(v) = fields.remove(own) {
                    fields.insert(bert.into(), v);
                }
            }
            fields.insert("type_vocab_size".into(), 0.into());
            fields.insert("layer_norm_eps".into(), 1e-12.into());
        }
        let defaults: &[(&str, serde_json::Value)] = match architecture {
            Some(Architecture::Roberta | Architecture::XlmRoberta) => {
                &[("pad_token_id", serde_json::json!(1))]
            }
            Some(Architecture::Distilbert) => &[("num_hidden_layers", serde_json::json!(6))],
            Some(Architecture::Electra) => &[
                ("embedding_size", serde_json::json!(128)),
                ("hidden_size", serde_json::json!(256)),
                ("num_attention_heads", serde_json::json!(4)),
                ("intermediate_size", serde_json::json!(1024)),
            ],
            _ => &[],
        };
        for (name, default) in defaults {
            fields.entry(*name).or_insert_with(|| default.clone());
        }
        // `null` where transformers writes its default (e.g. ELECTRA's `embedding_size`).
        fields.retain(|_, v| !v.is_null());
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    /// The architecture (`validate` has checked that it is one).
    pub fn architecture(&self) -> Architecture {
        Architecture::from_model_type(&self.model_type).unwrap_or(Architecture::Bert)
    }

    /// The dropout of AdapterHub's heads on this model (its `_get_dropout_prob`).
    pub fn head_dropout(&self) -> f32 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// The width of the embeddings: `hidden_size` but for ELECTRA's narrower ones.
    pub fn embedding_size(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    /// The most tokens a sequence may hold: the position table's length, less the
    /// positions RoBERTa's numbering skips (it starts after the padding id).
    pub fn max_tokens(&self) -> usize {
        match self.architecture().positions_after_padding() {
            true => self
                .max_position_embeddings
                .saturating_sub(self.pad_token_id + 1),
            false => self.max_position_embeddings,
        }
    }

    /// Checks what serde cannot: a supported architecture and consistent sizes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let Some(architecture) = Architecture::from_model_type(&self.model_type) else {
            let supported: Vec<&str> = Architecture::ALL.iter().map(|a| a.model_type()).collect();
            return Err(format!(
                "unsupported model_type '{}' (supported: {})",
                self.model_type,
                supported.join(", ")
            ));
        };
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "unsupported position_embedding_type '{}' (supported: absolute)",
                self.position_embedding_type
            ));
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("embedding_size", self.embedding_size()),
            ("max_tokens", self.max_tokens()),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        // Only DistilBERT has no token types.
        if (self.type_vocab_size == 0) != (architecture == Architecture::Distilbert) {
            return Err(format!(
                "type_vocab_size {} does not fit model_type '{}'",
                self.type_vocab_size, self.model_type
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
