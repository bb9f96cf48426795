//! The crate's error type. Every failure a user can cause (bad files, bad
//! options, a device that cannot run the request) ends up here with a message
//! that names the problem, so the binary can print it and exit non-zero. Underlying I/O and JSON
//! errors are kept as `source()`, not repeated in the message.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed JSON in {path}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid model config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unknown model_type {0:?}: supported are \"llada\" (LLaDA-8B, LLaDA-1.5), \"Dream\" (Dream-7B) and \"llada2_moe\" (LLaDA2.0, LLaDA2.1)")]
    UnknownArchitecture(String),
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("device: {0}")]
    Device(String),
    #[error("the request was cancelled")]
    Cancelled,
    #[error("internal error while running the request: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidRequest(message.into())
    }
}
