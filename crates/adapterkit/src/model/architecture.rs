//! The encoder architectures one implementation serves: BERT and the models that differ from it
//! only in their embeddings and in what their checkpoints call things. RoBERTa and XLM-RoBERTa
//! number positions after the padding id and skip padding; DistilBERT has no token types, no
//! pooler and other module names; ELECTRA's embeddings may be narrower than its layers, with a
//! projection in between. Everything past the embeddings is BERT's.

use serde::{Deserialize, Serialize};

/// A `model_type` of `config.json` that the encoder implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    Bert,
    Roberta,
    XlmRoberta,
    Distilbert,
    Electra,
}

impl Architecture {
    /// Every architecture, as `config.json` names it.
    pub const ALL: [Architecture; 5] = [
        Architecture::Bert,
        Architecture::Roberta,
        Architecture::XlmRoberta,
        Architecture::Distilbert,
        Architecture::Electra,
    ];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Roberta => "roberta",
            Architecture::XlmRoberta => "xlm-roberta",
            Architecture::Distilbert => "distilbert",
            Architecture::Electra => "electra",
        }
    }

    /// The prefix a model with a head (and AdapterHub) puts before the encoder's weight names.
    pub fn weight_prefix(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Roberta | Architecture::XlmRoberta => "roberta",
            Architecture::Distilbert => "distilbert",
            Architecture::Electra => "electra",
        }
    }

    /// Whether positions count from `pad_token_id + 1` over the tokens that are not padding
    /// (`transformers`' `create_position_ids_from_input_ids`), instead of from 0.
    pub fn positions_after_padding(self) -> bool {
        matches!(self, Architecture::Roberta | Architecture::XlmRoberta)
    }

    /// The checkpoint's name for `name`, a weight named as BERT names it (`encoder.layer.0
    /// .attention.self.query.weight`), with or without the model's prefix.
    pub fn checkpoint_name(self, name: &str) -> String {
        if self != Architecture::Distilbert {
            return name.to_string();
        }
        let (before, layer) = match name.find("encoder.layer.") {
            Some(at) => (&name[..at], &name[at + "encoder.layer.".len()..]),
            None => return name.to_string(),
        };
        let (index, rest) = layer.split_once('.').unwrap_or((layer, ""));
        // Longest BERT module paths first: `attention.output.dense` before `output.dense`.
        const DISTILBERT: [(&str, &str); 8] = [
            ("attention.self.query", "attention.q_lin"),
            ("attention.self.key", "attention.k_lin"),
            ("attention.self.value", "attention.v_lin"),
            ("attention.output.dense", "attention.out_lin"),
            ("attention.output.LayerNorm", "sa_layer_norm"),
            ("intermediate.dense", "ffn.lin1"),
            ("output.dense", "ffn.lin2"),
            ("output.LayerNorm", "output_layer_norm"),
        ];
        let rest = DISTILBERT
            .iter()
            .find_map(|(bert, own)| {
                let tail = rest.strip_prefix(bert)?;
                (tail.is_empty() || tail.starts_with('.')).then(|| format!("{own}{tail}"))
            })
            .unwrap_or_else(|| rest.to_string());
        format!("{before}transformer.layer.{index}.{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_read_back_and_distilbert_names_its_modules() {
        for a in Architecture::ALL {
            assert_eq!(Architecture::from_model_type(a.model_type()), Some(a));
        }
        let d = Architecture::Distilbert;
        for (bert, own) in [
            (
                "distilbert.encoder.layer.1.attention.self.query.weight",
                "distilbert.transformer.layer.1.attention.q_lin.weight",
            ),
            (
                "encoder.layer.0.attention.output.LayerNorm.bias",
                "transformer.layer.0.sa_layer_norm.bias",
            ),
            (
                "encoder.layer.11.output.dense.weight",
                "transformer.layer.11.ffn.lin2.weight",
            ),
            ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.weight"),
        ] {
            assert_eq!(d.checkpoint_name(bert), own);
        }
        let name = "encoder.layer.0.attention.self.query.weight";
        assert_eq!(Architecture::Roberta.checkpoint_name(name), name);
    }
}
