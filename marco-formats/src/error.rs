//! The error type of `marco-formats`.

use std::path::PathBuf;

/// Everything that can go wrong reading a model file's formats: a GGUF file, a ggml block, a
/// tokenizer or a chat template.
///
/// Every variant about a file names the file, and every variant about a tensor names the
/// tensor. `marco-model` maps each variant onto its own error of the same name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
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
    /// A tensor that was asked for is absent.
    #[error("{path}: missing tensor {tensor}")]
    MissingTensor {
        /// The file searched.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// Building the tokenizer, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// An element count that is not a whole number of blocks of a ggml type.
    #[error("{n_elements} elements is not a multiple of the {ty} block size {block_size}")]
    NotBlockMultiple {
        /// The type's ggml name.
        ty: &'static str,
        /// The element count requested.
        n_elements: usize,
        /// Elements per block of the type.
        block_size: usize,
    },
    /// A buffer whose length does not match what the shape and type require.
    #[error("{what}: expected {expected} {unit}, got {actual}")]
    LengthMismatch {
        /// Which buffer is wrong.
        what: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The length provided.
        actual: usize,
        /// The unit of both lengths ("bytes" or "elements").
        unit: &'static str,
    },
    /// A shape that cannot be used (size overflow, ...).
    #[error("invalid shape: {reason}")]
    InvalidShape {
        /// Why the shape is rejected.
        reason: String,
    },
    /// Encoding to a ggml type that has no encoder here (the k-quants, ...).
    #[error("encoding to {ty} is not supported (F32, F16, BF16, Q8_0 and Q4_0 are)")]
    UnsupportedEncoding {
        /// The type's ggml name.
        ty: &'static str,
    },
    /// A streaming GGUF write was handed a tensor out of the declared order (or after the
    /// last one).
    #[error("{path}: tensor {actual} written where {} was declared", expected.as_deref().unwrap_or("no further tensor"))]
    TensorOrder {
        /// The file being written.
        path: PathBuf,
        /// The tensor the table declares next (`None` when all were written).
        expected: Option<String>,
        /// The tensor the caller wrote.
        actual: String,
    },
    /// A streaming GGUF write was handed a tensor whose byte length disagrees with its
    /// declared dimensions and type.
    #[error("{path}: tensor {tensor}: {actual} bytes written, its dimensions and type need {expected}")]
    TensorSize {
        /// The file being written.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The bytes its declaration implies.
        expected: u64,
        /// The bytes handed over.
        actual: u64,
    },
}

impl FormatError {
    /// A [`FormatError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io { path: path.into(), source }
    }

    /// A [`FormatError::Corrupt`] for `path`.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        FormatError::Corrupt { path: path.into(), reason: reason.into() }
    }
}

impl From<FormatError> for marco_core::Error {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Tokenizer(m) | FormatError::ChatTemplate(m) => marco_core::Error::Tokenizer(m),
            other => marco_core::Error::backend(other),
        }
    }
}

/// `Result` with [`FormatError`].
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
