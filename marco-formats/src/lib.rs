//! # marco-formats: the file formats of language models, without a framework
//!
//! What a model file *is*, apart from what runs it (candle keeps `gguf_file` and `k_quants`
//! apart from its kernels the same way), so that the burn model loader, the CPU kernels and
//! the remote backend (which loads only a tokenizer) share one reader:
//!
//! * [`gguf`]: a defensive GGUF v2/v3 reader (memory-mapped, every length and offset checked,
//!   each fault a typed [`FormatError`]) and a writer.
//! * [`quant`]: the ggml tensor types ([`GgmlType`]), their block layouts and the exact scalar
//!   reference codecs that the fast kernels are tested against.
//! * [`tokenizer`]: [`MarcoTokenizer`], marco-core's [`Tokenizer`](marco_core::Tokenizer) built
//!   from `tokenizer.json` or GGUF metadata on the `tokenizers` crate, and [`ChatTemplate`],
//!   the model's own Jinja template rendered with minijinja.
//!
//! Nothing here panics on a bad file.
#![deny(missing_docs)]

pub mod error;
pub mod gguf;
pub mod quant;
pub mod tokenizer;

pub use error::{FormatError, Result};
pub use gguf::{GgufFile, GgufValue, GgufWriter};
pub use quant::GgmlType;
pub use tokenizer::{ChatTemplate, MarcoTokenizer, StreamingDecoder};
