//! # marco-backend-remote: search a model that an inference server runs
//!
//! People serve 7B–70B models with llama.cpp's `llama-server`, vLLM or SGLang. [`RemoteLm`]
//! implements marco-core's [`LanguageModel`](marco_core::LanguageModel) over their
//! OpenAI-compatible HTTP APIs, so every marco search policy runs unchanged against them. It
//! knows no ML framework: the server computes, marco searches.
//!
//! What makes it efficient, where peers re-send prompts token by token:
//! - **one request per action**: [`LanguageModel::extend`](marco_core::LanguageModel::extend)
//!   generates a whole step, line or mini-step per request, bounded by the granularity's
//!   [hints](marco_core::ActionHints); tokens past the action's end are trimmed here, so the
//!   tree is what the in-process loop would have built from the same choices;
//! - **the server's prefix cache does the tree's sharing**: prompts go as token ids, so a
//!   fork's request shares its prefix with its parent's, and the counters report the prompt
//!   tokens the server actually computed (the search's recompute ratio stays honest);
//! - **concurrency**: the sequences of a batched call are sent at once, up to
//!   [`RemoteConfig::concurrency`] in flight.
//!
//! Safety: the tokenizer (a local `tokenizer.json` or GGUF) is checked against the server's at
//! connect time ([`RemoteError::TokenizerMismatch`]); token ids outside the vocabulary,
//! malformed answers, dead servers and timeouts are typed [`RemoteError`]s; 429/503 answers
//! are retried with exponential backoff and jitter ([`HttpOptions`]). The API key is read from
//! an environment variable, sent as a bearer token and never printed; `https://` uses rustls.
//!
//! ```no_run
//! use marco_backend_remote::{RemoteConfig, RemoteLm, TokenizerSource};
//! let config = RemoteConfig::new("http://127.0.0.1:8080");
//! let model = RemoteLm::connect(config, TokenizerSource::File("model.gguf".into()))?;
//! println!("{:?} serving {:?}", model.server_kind(), model.model_name());
//! # Ok::<(), marco_backend_remote::RemoteError>(())
//! ```
#![deny(missing_docs)]

pub mod error;
mod http;
pub mod lm;
pub mod protocol;
pub mod tokenizer;

pub use error::{RemoteError, Result};
pub use http::HttpOptions;
pub use lm::{RemoteConfig, RemoteLm, RemoteStats, TokenizerSource, DEFAULT_API_KEY_ENV, TOKENIZER_PROBE};
pub use protocol::ServerKind;
pub use tokenizer::ServerTokenizer;
