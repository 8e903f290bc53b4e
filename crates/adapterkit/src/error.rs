//! The library's one error type. Every variant names the file or input it is about, so that a
//! command-line user can act on the message without a backtrace.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("model '{model}': {message}")]
    Hub { model: String, message: String },

    #[error("invalid input: {0}")]
    Input(String),

    #[error("training stopped: {0}")]
    Training(String),

    #[error("{}", tensor_message(.0))]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn input(message: impl std::fmt::Display) -> Self {
        Error::Input(message.to_string())
    }
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is
/// set: users get the message, developers can still ask for the backtrace with a debugger.
pub fn tensor_message(error: &candle_core::Error) -> String {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => tensor_message(inner),
        other => other.to_string(),
    }
}
