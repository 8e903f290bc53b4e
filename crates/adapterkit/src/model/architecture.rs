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

    /// AdapterHub's model class, which its files name.
    pub fn adapter_model_class(self) -> &'static str {
        match self {
            Architecture::Bert => "BertAdapterModel",
            Architecture::Roberta => "RobertaAdapterModel",
            Architecture::XlmRoberta => "XLMRobertaAdapterModel",
            Architecture::Distilbert => "DistilBertAdapterModel",
            Architecture::Electra => "ElectraAdapterModel",
        }
    }

    /// The checkpoint's (and AdapterHub's) name for `name`, a tensor named as BERT and our
    /// modules name it (`encoder.layer.0.attention.self.query.weight`, `encoder.layer.0
    /// .output.adapters.a.adapter_up.weight`, `prefix_tuning.prefix_tunings.a.self_prefix...`),
    /// with or without the model's prefix.
    pub fn checkpoint_name(self, name: &str) -> String {
        match self {
            Architecture::Distilbert => distilbert_name(name, true),
            _ => name.to_string(),
        }
    }

    /// The inverse of [`checkpoint_name`](Self::checkpoint_name).
    pub fn bert_name(self, checkpoint: &str) -> String {
        match self {
            Architecture::Distilbert => distilbert_name(checkpoint, false),
            _ => checkpoint.to_string(),
        }
    }

    /// The name a method's tensor (as our modules name it) has in AdapterHub's files: the
    /// checkpoint's name under the model's prefix.
    pub fn file_name(self, name: &str) -> String {
        format!("{}.{}", self.weight_prefix(), self.checkpoint_name(name))
    }

    /// The inverse of [`file_name`](Self::file_name) (a name without the prefix is taken as it
    /// is, as AdapterHub's heads are).
    pub fn module_name(self, file_name: &str) -> String {
        let prefix = format!("{}.", self.weight_prefix());
        self.bert_name(file_name.strip_prefix(&prefix).unwrap_or(file_name))
    }
}

/// DistilBERT's module paths in a layer for BERT's (AdapterHub's too: its bottleneck layers sit
/// on the block, as `attention_adapters` and `output_adapters`).
const DISTILBERT: [(&str, &str); 13] = [
    ("attention.self.query", "attention.q_lin"),
    ("attention.self.key", "attention.k_lin"),
    ("attention.self.value", "attention.v_lin"),
    ("attention.self.prefix_tuning", "attention.prefix_tuning"),
    ("attention.output.dense", "attention.out_lin"),
    ("attention.output.LayerNorm", "sa_layer_norm"),
    ("attention.output.adapters", "attention_adapters.adapters"),
    (
        "attention.output.adapter_fusion_layer",
        "attention_adapters.adapter_fusion_layer",
    ),
    ("intermediate.dense", "ffn.lin1"),
    ("output.dense", "ffn.lin2"),
    ("output.LayerNorm", "output_layer_norm"),
    ("output.adapters", "output_adapters.adapters"),
    (
        "output.adapter_fusion_layer",
        "output_adapters.adapter_fusion_layer",
    ),
];

/// `name` (BERT's) in DistilBERT's names, or back (`to_distilbert` false).
fn distilbert_name(name: &str, to_distilbert: bool) -> String {
    let direction = |(bert, own): (&'static str, &'static str)| match to_distilbert {
        true => (bert, own),
        false => (own, bert),
    };
    let (from, to) = direction(("self_prefix", "self"));
    let name = prefix_location(name, from, to);
    let (from, to) = direction(("encoder.layer.", "transformer.layer."));
    rename_layer_path(&name, from, to, |path| {
        DISTILBERT.iter().find_map(|&pair| {
            let (from, to) = direction(pair);
            swap_start(path, from, to)
        })
    })
}

/// `path` with `from` at its start (a whole module path) replaced by `to`.
fn swap_start(path: &str, from: &str, to: &str) -> Option<String> {
    let tail = path.strip_prefix(from)?;
    (tail.is_empty() || tail.starts_with('.')).then(|| format!("{to}{tail}"))
}

/// `name` with its layer list `from` (`encoder.layer.`) renamed `to` and the module path after
/// the layer's index renamed by `rename` (kept where it gives nothing).
fn rename_layer_path(
    name: &str,
    from: &str,
    to: &str,
    rename: impl Fn(&str) -> Option<String>,
) -> String {
    let Some(at) = name.find(from) else {
        return name.to_string();
    };
    let (before, layer) = (&name[..at], &name[at + from.len()..]);
    let (index, path) = layer.split_once('.').unwrap_or((layer, ""));
    let path = rename(path).unwrap_or_else(|| path.to_string());
    format!("{before}{to}{index}.{path}")
}

/// `name` with the location of a prefix tuning (`prefix_tunings.{adapter}.{location}.`) `from`
/// renamed `to`.
fn prefix_location(name: &str, from: &str, to: &str) -> String {
    const POOL: &str = "prefix_tunings.";
    let Some(at) = name.find(POOL) else {
        return name.to_string();
    };
    let (before, rest) = name.split_at(at + POOL.len());
    let mut parts: Vec<&str> = rest.splitn(3, '.').collect();
    if parts.get(1) == Some(&from) {
        parts[1] = to;
    }
    format!("{before}{}", parts.join("."))
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
        assert_eq!(
            Architecture::Roberta.file_name(name),
            format!("roberta.{name}")
        );
    }

    /// Every method's tensor names, as AdapterHub 1.3 names them on DistilBERT, and back.
    #[test]
    fn adapter_names_on_distilbert_are_adapterhubs_and_read_back() {
        let d = Architecture::Distilbert;
        for (ours, theirs) in [
            (
                "encoder.layer.1.attention.output.adapters.a.adapter_down.0.weight",
                "distilbert.transformer.layer.1.attention_adapters.adapters.a.adapter_down.0.weight",
            ),
            (
                "encoder.layer.0.output.adapters.self.adapter_up.bias",
                "distilbert.transformer.layer.0.output_adapters.adapters.self.adapter_up.bias",
            ),
            (
                "encoder.layer.0.output.adapter_fusion_layer.a,b.query.weight",
                "distilbert.transformer.layer.0.output_adapters.adapter_fusion_layer.a,b.query.weight",
            ),
            (
                "encoder.layer.0.attention.self.value.loras.a.lora_B",
                "distilbert.transformer.layer.0.attention.v_lin.loras.a.lora_B",
            ),
            (
                "encoder.layer.0.intermediate.dense.loras.a.lora_B",
                "distilbert.transformer.layer.0.ffn.lin1.loras.a.lora_B",
            ),
            (
                "prefix_tuning.prefix_tunings.self.self_prefix.wte.weight",
                "distilbert.prefix_tuning.prefix_tunings.self.self.wte.weight",
            ),
            (
                "encoder.layer.0.attention.self.prefix_tuning.prefix_gates.a.weight",
                "distilbert.transformer.layer.0.attention.prefix_tuning.prefix_gates.a.weight",
            ),
        ] {
            assert_eq!(d.file_name(ours), theirs);
            assert_eq!(d.module_name(theirs), ours);
        }
        assert_eq!(d.module_name("heads.a.1.weight"), "heads.a.1.weight");
    }
}
