//! `config.json` of a Hugging Face BERT checkpoint.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};
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

/// The architectures this encoder implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["bert"];

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

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| Error::Config {
            path: path.into(),
            message,
        })?;
        Ok(config)
    }

    /// Checks what serde cannot: a supported architecture and consistent sizes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(format!(
                "unsupported model_type '{}' (supported: {})",
                self.model_type,
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
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
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
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
