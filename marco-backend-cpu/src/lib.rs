//! # marco-backend-cpu: quantized weights and fast CPU kernels for marco's NdArray backend
//!
//! * [`quant`]: ggml/GGUF tensor types ([`GgmlType`]), their block layouts and scalar
//!   reference dequantizers ([`dequantize`]), plus the Q8_0 encoder used by `--quantize q8_0`.
//!
//! Every fallible function returns [`KernelError`].
#![deny(missing_docs)]

mod error;
pub mod quant;

pub use error::KernelError;
pub use quant::{dequantize, row_bytes, GgmlType};
