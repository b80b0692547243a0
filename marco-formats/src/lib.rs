//! # marco-formats: the file formats of language models, without a framework
//!
//! What a model file *is*, apart from what runs it (candle keeps `gguf_file` and `k_quants`
//! apart from its kernels the same way), so that the burn model loader, the CPU kernels and
//! the remote backend (which loads only a tokenizer) share one reader:
//!
//! * [`gguf`]: a defensive GGUF v2/v3 reader (memory-mapped, every length and offset checked,
//!   each fault a typed [`FormatError`]) and two writers: one in memory, one streaming a model
//!   to disk tensor by tensor ([`GgufStreamWriter`]).
//! * [`mapping`]: giving a memory-mapped file's pages back once a tensor is copied out.
//! * [`quant`]: the ggml tensor types ([`GgmlType`]), their block layouts and the exact scalar
//!   reference codecs that the fast kernels are tested against, and the encoders a converter
//!   writes with (F16, BF16, Q8_0, Q4_0, bit-exact with ggml's reference quantizers).
//! * [`tokenizer`]: [`MarcoTokenizer`], marco-core's [`Tokenizer`](marco_core::Tokenizer) built
//!   from `tokenizer.json` or GGUF metadata on the `tokenizers` crate, and [`ChatTemplate`],
//!   the model's own Jinja template rendered with minijinja.
//!
//! Nothing here panics on a bad file.
#![deny(missing_docs)]

pub mod error;
pub mod gguf;
pub mod mapping;
pub mod quant;
pub mod tokenizer;

pub use error::{FormatError, Result};
pub use gguf::{GgufFile, GgufStreamWriter, GgufTensorDesc, GgufValue, GgufWriter};
pub use quant::GgmlType;
pub use tokenizer::{ChatTemplate, MarcoTokenizer, StreamingDecoder};
