//! Text to token ids, with the `tokenizers` crate: from `tokenizer.json`, or built from
//! `vocab.txt` as BERT's WordPiece pipeline when there is no `tokenizer.json`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{EncodeInput, Model, Tokenizer, TruncationParams};

use crate::batch::{Batch, Encoded};
use crate::error::{Error, Result};

/// A tokenizer that truncates to the model's limit; padding is done by [`Batch::pad`].
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_length: usize,
    /// The most the model takes (its positions, or `model_max_length` below them).
    model_limit: usize,
    source: PathBuf,
}

/// The fields of `tokenizer_config.json` that matter when building from `vocab.txt`.
#[derive(Debug, serde::Deserialize)]
struct TokenizerConfig {
    #[serde(default = "yes")]
    do_lower_case: bool,
    #[serde(default)]
    model_max_length: Option<f64>,
}

fn yes() -> bool {
    true
}

impl TextTokenizer {
    /// Loads the tokenizer of a model directory: `tokenizer.json` if present, else `vocab.txt`
    /// (with `tokenizer_config.json`'s `do_lower_case`, default true). `max_length` is the
    /// model's number of positions; `tokenizer_config.json`'s `model_max_length` can lower it.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self> {
        Self::from_files(
            Some(dir.join("tokenizer.json")).filter(|p| p.exists()),
            Some(dir.join("vocab.txt")).filter(|p| p.exists()),
            Some(dir.join("tokenizer_config.json")).filter(|p| p.exists()),
            dir,
            max_length,
        )
    }

    /// As [`from_dir`](Self::from_dir), from files that may sit in different places (a hub cache).
    pub fn from_files(
        tokenizer_json: Option<PathBuf>,
        vocab_txt: Option<PathBuf>,
        tokenizer_config: Option<PathBuf>,
        dir: &Path,
        max_length: usize,
    ) -> Result<Self> {
        let config = match &tokenizer_config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                serde_json::from_str::<TokenizerConfig>(&text).map_err(|e| Error::Config {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => TokenizerConfig {
                do_lower_case: true,
                model_max_length: None,
            },
        };
        let (inner, source) = match (tokenizer_json, vocab_txt) {
            (Some(path), _) => {
                // The tokenizers crate can panic on a malformed file.
                let read = crate::io::guard::guarded(|| Tokenizer::from_file(&path));
                let inner = read
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|message| Error::Tokenizer {
                        path: path.clone(),
                        message,
                    })?;
                (inner, path)
            }
            (None, Some(path)) => (wordpiece_from_vocab(&path, config.do_lower_case)?, path),
            (None, None) => {
                return Err(Error::Tokenizer {
                    path: dir.into(),
                    message: "no tokenizer.json or vocab.txt found".into(),
                })
            }
        };
        // tokenizer_config.json says 1e30 when the tokenizer itself has no limit.
        let max_length = match config.model_max_length {
            Some(m) if m >= 1.0 && m < max_length as f64 => m as usize,
            _ => max_length,
        };
        Self::new(inner, max_length, source)
    }

    fn new(mut inner: Tokenizer, max_length: usize, source: PathBuf) -> Result<Self> {
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        // Padding is ours (to the longest row); the file's fixed padding would waste compute.
        inner.with_padding(None);
        let mut tokenizer = Self {
            inner,
            pad_id,
            max_length,
            model_limit: max_length,
            source,
        };
        tokenizer.set_max_length(max_length)?;
        Ok(tokenizer)
    }

    /// The most tokens a text (or pair) keeps, special tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Truncates to `max_length` tokens from now on (`--max-seq-len`): at least 2 (the special
    /// tokens and one more), at most what the model takes.
    pub fn set_max_length(&mut self, max_length: usize) -> Result<()> {
        if !(2..=self.model_limit).contains(&max_length) {
            return Err(Error::input(format!(
                "a maximum sequence length of {max_length} tokens: the model takes 2 to {}",
                self.model_limit
            )));
        }
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                message: e.to_string(),
            })?;
        self.max_length = max_length;
        Ok(())
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenizes one text, or a text pair, with special tokens, truncated to the limit.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Encoded> {
        let input: EncodeInput = match pair {
            Some(b) => (text, b).into(),
            None => text.into(),
        };
        // A malformed tokenizer.json can make the tokenizers crate panic here too.
        let encoding = crate::io::guard::guarded(|| self.inner.encode(input, true))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|message| Error::Tokenizer {
                path: self.source.clone(),
                message,
            })?;
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
        })
    }

    /// Tokenizes and pads several texts into one batch.
    pub fn batch(&self, texts: &[&str], device: &Device) -> Result<Batch> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t, None))
            .collect::<Result<Vec<_>>>()?;
        Ok(Batch::pad(&rows, self.pad_id, device)?)
    }
}

/// BERT's tokenizer as `transformers`' `BertTokenizerFast` builds it from a vocabulary.
fn wordpiece_from_vocab(path: &Path, lowercase: bool) -> Result<Tokenizer> {
    let fail = |message: String| Error::Tokenizer {
        path: path.into(),
        message,
    };
    let vocab = path
        .to_str()
        .ok_or_else(|| fail("path is not UTF-8".into()))?;
    let wordpiece = WordPiece::from_file(vocab)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let id = |token: &str| {
        wordpiece
            .get_vocab()
            .get(token)
            .copied()
            .ok_or_else(|| fail(format!("the vocabulary has no {token} token")))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let mut tokenizer = Tokenizer::new(wordpiece);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
        .map_err(|e| fail(e.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tokenizer)
}
