//! Loading a pre-trained Hugging Face encoder (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA):
//! from a local directory or a hub model id.
//!
//! Weights come from `model.safetensors` (memory-mapped), or, only when there is none, from
//! `pytorch_model.bin` through candle's pickle reader, which interprets the pickle's data
//! opcodes and never executes code. Keys may carry the architecture's prefix (`bert.`,
//! `roberta.`, ...: a model with a head) or not (a bare model); buffers such as
//! `embeddings.position_ids` are ignored.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{tensor_message, Error, Result};
use crate::model::{Architecture, BertConfig, BertModel};
use crate::tokenizer::TextTokenizer;

/// The files of a pre-trained model, wherever they are.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The local directory, or the model id for a hub model.
    pub source: String,
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer_json: Option<PathBuf>,
    pub vocab_txt: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
}

const SAFETENSORS: &str = "model.safetensors";
const PICKLE: &str = "pytorch_model.bin";

impl ModelFiles {
    /// A local directory when `dir_or_id` is one, else a Hugging Face model id fetched through
    /// `hf-hub` (its cache first; `HF_HUB_OFFLINE=1` uses the cache alone).
    pub fn locate(dir_or_id: &str) -> Result<Self> {
        let path = Path::new(dir_or_id);
        if path.is_dir() {
            return Self::in_dir(path);
        }
        if path.exists() {
            return Err(Error::file(path, "is a file; expected a model directory"));
        }
        if looks_like_model_id(dir_or_id) {
            return Self::from_hub(dir_or_id);
        }
        Err(Error::file(path, "no such model directory"))
    }

    pub fn in_dir(dir: &Path) -> Result<Self> {
        let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let config = existing("config.json").ok_or_else(|| {
            Error::file(dir.join("config.json"), "missing (not a model directory?)")
        })?;
        let weights = existing(SAFETENSORS)
            .or_else(|| existing(PICKLE))
            .ok_or_else(|| {
                Error::file(
                    dir,
                    format!("no weights: neither {SAFETENSORS} nor {PICKLE}"),
                )
            })?;
        Ok(Self {
            source: dir.display().to_string(),
            config,
            weights,
            tokenizer_json: existing("tokenizer.json"),
            vocab_txt: existing("vocab.txt"),
            tokenizer_config: existing("tokenizer_config.json"),
        })
    }

    fn from_hub(model_id: &str) -> Result<Self> {
        let hub = HubRepo::open(model_id)?;
        let config = hub
            .fetch("config.json")
            .ok_or_else(|| hub.missing("config.json"))?;
        let weights = hub
            .fetch(SAFETENSORS)
            .or_else(|| hub.fetch(PICKLE))
            .ok_or_else(|| hub.missing(&format!("{SAFETENSORS} or {PICKLE}")))?;
        Ok(Self {
            source: model_id.into(),
            config,
            weights,
            tokenizer_json: hub.fetch("tokenizer.json"),
            vocab_txt: hub.fetch("vocab.txt"),
            tokenizer_config: hub.fetch("tokenizer_config.json"),
        })
    }

    pub fn load_config(&self) -> Result<BertConfig> {
        BertConfig::from_file(&self.config)
    }

    /// The encoder with frozen (plain tensor) weights.
    pub fn load_model(&self, config: &BertConfig, device: &Device) -> Result<BertModel> {
        let weights_error = |message: String| Error::Weights {
            path: self.weights.clone(),
            message,
        };
        let is_safetensors = self.weights.extension().is_some_and(|e| e == "safetensors");
        // SAFETY (mmap): the file must not change while mapped, as with any memory-mapped
        // checkpoint loader; we only read it.
        let (vb, names) = if is_safetensors {
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&self.weights) }
                .map_err(|e| {
                    weights_error(format!(
                        "not a readable safetensors file: {}",
                        tensor_message(&e)
                    ))
                })?;
            let names: Vec<String> = st.tensors().into_iter().map(|(name, _)| name).collect();
            (
                VarBuilder::from_backend(Box::new(st), DType::F32, device.clone()),
                names,
            )
        } else {
            let pth = crate::io::guard::open_pickle(&self.weights)?;
            let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
            (
                VarBuilder::from_backend(Box::new(pth), DType::F32, device.clone()),
                names,
            )
        };
        let architecture = config.architecture();
        let vb = match architecture {
            Architecture::Bert => vb,
            other => vb.rename_f(move |name| other.checkpoint_name(name)),
        };
        let prefix = architecture.weight_prefix();
        let vb = if names.iter().any(|n| n.starts_with(&format!("{prefix}."))) {
            vb.pp(prefix)
        } else {
            vb
        };
        BertModel::load(vb, config).map_err(|e| {
            weights_error(format!(
                "weights do not fit the config: {}",
                tensor_message(&e)
            ))
        })
    }

    pub fn load_tokenizer(&self, config: &BertConfig) -> Result<TextTokenizer> {
        let dir = self.config.parent().unwrap_or(Path::new("."));
        TextTokenizer::from_files(
            self.tokenizer_json.clone(),
            self.vocab_txt.clone(),
            self.tokenizer_config.clone(),
            dir,
            config.max_tokens(),
        )
    }
}

/// `owner/name` (or a bare `name`), in the characters the hub allows.
/// A Hugging Face Hub repository's files, fetched through `hf-hub`: its cache first, and with
/// `HF_HUB_OFFLINE=1` the cache alone.
pub(crate) struct HubRepo {
    id: String,
    cache: hf_hub::CacheRepo,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl HubRepo {
    pub(crate) fn open(id: &str) -> Result<Self> {
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
        let api = if offline {
            None
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| Error::Hub {
                    model: id.into(),
                    message: e.to_string(),
                })?;
            Some(api.model(id.to_string()))
        };
        Ok(Self {
            id: id.into(),
            cache: hf_hub::Cache::from_env().model(id.to_string()),
            api,
        })
    }

    /// The local path of `name`, if the repository has it; a required file missing is the
    /// caller's to report ([`missing`](Self::missing)).
    pub(crate) fn fetch(&self, name: &str) -> Option<PathBuf> {
        self.cache
            .get(name)
            .or_else(|| self.api.as_ref().and_then(|repo| repo.get(name).ok()))
    }

    pub(crate) fn missing(&self, what: &str) -> Error {
        let where_ = if self.api.is_none() {
            "in the hub cache (HF_HUB_OFFLINE is set)"
        } else {
            "on the hub or in its cache"
        };
        Error::Hub {
            model: self.id.clone(),
            message: format!("no {what} {where_}"),
        }
    }
}

pub(crate) fn looks_like_model_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// A pre-trained encoder with its tokenizer, ready to run.
pub struct Pretrained {
    pub files: ModelFiles,
    pub config: BertConfig,
    pub model: BertModel,
    pub tokenizer: TextTokenizer,
}

impl Pretrained {
    pub fn load(dir_or_id: &str, device: &Device) -> Result<Self> {
        let files = ModelFiles::locate(dir_or_id)?;
        let config = files.load_config()?;
        let model = files.load_model(&config, device)?;
        let tokenizer = files.load_tokenizer(&config)?;
        Ok(Self {
            files,
            config,
            model,
            tokenizer,
        })
    }
}
