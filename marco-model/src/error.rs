//! The error type of `marco-model`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Every variant about a file names the file, and every variant about a tensor names the
/// tensor, so a user can tell which download is broken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file or directory does not exist or cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is shorter than its header says, or a read ran past its end.
    #[error("{path}: truncated ({what})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
    },
    /// A file's content is malformed (bad magic, bad version, bad offsets, bad JSON, ...).
    #[error("{path}: corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint's architecture is not one marco implements.
    #[error("{path}: unknown architecture {architecture:?} (supported: llama, qwen2, mistral)")]
    UnknownArchitecture {
        /// The file naming it.
        path: PathBuf,
        /// The architecture string.
        architecture: String,
    },
    /// A tensor is stored in a type marco cannot read.
    #[error("{path}: tensor {tensor}: unsupported type {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The type as the file names it.
        dtype: String,
    },
    /// The model would not fit in the memory available (checked before loading).
    #[error("{path}: the model needs ~{} but ~{} of memory is available ({detail}); ways out: {ways}", crate::memory::gib(*.needed), crate::memory::gib(*.available))]
    InsufficientMemory {
        /// The checkpoint.
        path: PathBuf,
        /// Bytes the loaded model would hold.
        needed: u64,
        /// Bytes available.
        available: u64,
        /// What makes up `needed`.
        detail: String,
        /// What the user can do (smaller formats with their sizes, a shorter context).
        ways: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{path}: missing tensor {tensor}")]
    MissingTensor {
        /// The file (or directory) searched.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor's shape disagrees with the configuration.
    #[error("{path}: tensor {tensor}: shape {actual:?}, the configuration implies {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// The tokenizer's vocabulary does not fit the model's embedding table.
    #[error("{path}: tokenizer has {tokenizer} tokens, the model's vocabulary has {model}")]
    VocabMismatch {
        /// The tokenizer file.
        path: PathBuf,
        /// Tokens in the tokenizer.
        tokenizer: usize,
        /// Rows of the embedding table.
        model: usize,
    },
    /// A configuration value is missing or out of range.
    #[error("{path}: invalid configuration: {reason}")]
    InvalidConfig {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Building the tokenizer, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Obtaining the default model failed (no network, pip missing, checksum mismatch, ...).
    #[error("fetching the default model: {0}")]
    Fetch(String),
    /// A contract of `marco-core` was broken (unknown sequence, context overflow, ...).
    #[error(transparent)]
    Core(#[from] marco_core::Error),
}

impl ModelError {
    /// An [`ModelError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }

    /// A [`ModelError::Corrupt`] for `path`.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ModelError::Corrupt { path: path.into(), reason: reason.into() }
    }
}

impl From<ModelError> for marco_core::Error {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Core(core) => core,
            other => marco_core::Error::backend(other),
        }
    }
}

impl From<marco_formats::FormatError> for ModelError {
    fn from(e: marco_formats::FormatError) -> Self {
        use marco_formats::FormatError as F;
        match e {
            F::Io { path, source } => ModelError::Io { path, source },
            F::Truncated { path, what } => ModelError::Truncated { path, what },
            F::Corrupt { path, reason } => ModelError::Corrupt { path, reason },
            F::UnsupportedDtype { path, tensor, dtype } => ModelError::UnsupportedDtype { path, tensor, dtype },
            F::MissingTensor { path, tensor } => ModelError::MissingTensor { path, tensor },
            F::Tokenizer(m) => ModelError::Tokenizer(m),
            F::ChatTemplate(m) => ModelError::ChatTemplate(m),
            other => ModelError::Corrupt { path: std::path::PathBuf::new(), reason: other.to_string() },
        }
    }
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
