//! One error type for the library. Every failure a user can cause (bad files, bad shapes, bad
//! arguments) is a variant with a message that names the offending thing; nothing user-facing panics.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("backend: {0}")]
    Backend(String),
    /// The run was stopped through its [`crate::engine::CancelToken`].
    #[error("cancelled")]
    Cancelled,
    /// A NaN or infinity where a number must be finite (hidden states, logits, maps): the message
    /// says where it appeared.
    #[error("non-finite values: {0}")]
    NonFinite(String),
    /// The model, its cache or a run's activations do not fit the device's memory.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A prompt (or a prompt and its answer) longer than the model's context: the message says
    /// by how much. The caller's input, like [`Error::Input`], but a server answers it with its
    /// own code.
    #[error("invalid input: {0}")]
    ContextLength(String),
    /// The KV cache has no room for a sequence now (pages are held by others): a scheduler
    /// admits it later; a lone run is told how much is missing.
    #[error("KV cache full: {0}")]
    KvFull(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
    /// An input error about a command-line flag's value, named by the flag; other errors as
    /// they are.
    pub fn for_flag(self, flag: &str) -> Self {
        match self {
            Error::Input(m) => Error::Input(format!("{flag}: {m}")),
            e => e,
        }
    }
    /// The same error for a second receiver (the continuations of a run that failed): the same
    /// variant and message; I/O errors keep their path and kind.
    pub fn duplicate(&self) -> Self {
        match self {
            Error::Io { path, source } => Error::io(
                path.clone(),
                std::io::Error::new(source.kind(), source.to_string()),
            ),
            Error::Config { path, msg } => Error::Config {
                path: path.clone(),
                msg: msg.clone(),
            },
            Error::Checkpoint { path, msg } => Error::Checkpoint {
                path: path.clone(),
                msg: msg.clone(),
            },
            Error::Tensor { name, msg } => Error::Tensor {
                name: name.clone(),
                msg: msg.clone(),
            },
            Error::Tokenizer { path, msg } => Error::Tokenizer {
                path: path.clone(),
                msg: msg.clone(),
            },
            Error::Image { path, msg } => Error::Image {
                path: path.clone(),
                msg: msg.clone(),
            },
            Error::Input(m) => Error::Input(m.clone()),
            Error::Backend(m) => Error::Backend(m.clone()),
            Error::Cancelled => Error::Cancelled,
            Error::NonFinite(m) => Error::NonFinite(m.clone()),
            Error::OutOfMemory(m) => Error::OutOfMemory(m.clone()),
            Error::ContextLength(m) => Error::ContextLength(m.clone()),
            Error::KvFull(m) => Error::KvFull(m.clone()),
        }
    }
    /// `Ok` when `path` (given by command-line `flag`) is a folder, else an input error naming
    /// both.
    pub fn require_dir(flag: &str, path: &std::path::Path) -> Result<()> {
        if path.is_dir() {
            Ok(())
        } else {
            Err(Error::input(format!(
                "{flag} {}: not a folder",
                path.display()
            )))
        }
    }
}
