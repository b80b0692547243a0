//! The crate's single error type.
//!
//! Every fallible entry point of this crate (decoding GGUF blocks, building packed weights,
//! running a kernel on caller-provided buffers) reports bad input through [`KernelError`]
//! instead of panicking, so that a corrupt model file or a shape bug upstream surfaces as a
//! typed error that the loader can attach a file and tensor name to.

use thiserror::Error;

/// Errors raised by the quantization codecs and the kernels.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A ggml type id that this crate does not know.
    #[error("unknown ggml type id {id}")]
    UnknownType {
        /// The raw type id read from the file.
        id: u32,
    },
    /// A known ggml type whose codec this crate does not implement (for the requested operation).
    #[error("ggml type {ty} is not supported for {operation}")]
    UnsupportedType {
        /// The type's ggml name.
        ty: &'static str,
        /// What was attempted (e.g. "dequantize", "packed matmul").
        operation: &'static str,
    },
    /// An element count that is not a whole number of blocks of the type.
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
    /// A shape that cannot be used (zero-sized where that is not allowed, size overflow, ...).
    #[error("invalid shape: {reason}")]
    InvalidShape {
        /// Why the shape is rejected.
        reason: String,
    },
}

impl From<marco_formats::FormatError> for KernelError {
    fn from(e: marco_formats::FormatError) -> Self {
        use marco_formats::FormatError as F;
        match e {
            F::NotBlockMultiple { ty, n_elements, block_size } => {
                KernelError::NotBlockMultiple { ty, n_elements, block_size }
            }
            F::LengthMismatch { what, expected, actual, unit } => {
                KernelError::LengthMismatch { what, expected, actual, unit }
            }
            F::InvalidShape { reason } => KernelError::InvalidShape { reason },
            other => KernelError::InvalidShape { reason: other.to_string() },
        }
    }
}
