//! The error type of `marco-backend-remote`.

use std::time::Duration;

use marco_core::TokenId;

/// Everything that can go wrong talking to an inference server.
///
/// Every variant about a request names the URL it went to. None of them ever holds the API
/// key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The server could not be reached (not running, wrong port, DNS, TLS handshake).
    #[error("cannot reach the inference server at {url}: {reason}")]
    Connect {
        /// The URL that was tried.
        url: String,
        /// What failed.
        reason: String,
    },
    /// A request took longer than its timeout.
    #[error("{url}: no complete answer within {after:?} (raise the request timeout if the server is just slow)")]
    Timeout {
        /// The URL that was tried.
        url: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The server answered with an error status; `message` is the error message of its JSON
    /// body where it sent one.
    #[error("{url}: HTTP {status}: {message}")]
    Http {
        /// The URL that was tried.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The server's message (or the start of its body).
        message: String,
    },
    /// The server kept answering 429 or 503 (busy, loading) after every retry.
    #[error("{url}: still busy (HTTP {status}) after {attempts} attempts: {message}")]
    Overloaded {
        /// The URL that was tried.
        url: String,
        /// The last status.
        status: u16,
        /// Requests sent.
        attempts: u32,
        /// The server's last message.
        message: String,
    },
    /// An answer that is not what the protocol promises: not JSON, truncated, a field missing
    /// or of the wrong type, no log-probabilities.
    #[error("{url}: malformed answer: {reason}")]
    Malformed {
        /// The URL that answered.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server returned a token id outside the tokenizer's vocabulary.
    #[error("the server returned token id {token}, outside the vocabulary of {vocab_size} tokens (a different model or tokenizer?)")]
    TokenOutOfVocab {
        /// The token id.
        token: TokenId,
        /// The local tokenizer's vocabulary size.
        vocab_size: usize,
    },
    /// marco's tokenizer and the server's disagree on a probe text: the log-probabilities
    /// would belong to other tokens than marco thinks.
    #[error("tokenizer mismatch on {probe:?}: marco's tokenizer gives {local:?}, the server's gives {server:?} (pass the served model's tokenizer with --tokenizer)")]
    TokenizerMismatch {
        /// The probe text.
        probe: String,
        /// marco's tokens.
        local: Vec<TokenId>,
        /// The server's tokens.
        server: Vec<TokenId>,
    },
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] marco_formats::FormatError),
    /// A setting is out of range, or the environment variable named for the API key is unset.
    #[error("invalid remote configuration: {0}")]
    InvalidConfig(String),
    /// Something the server's protocol cannot do (forcing a token whose log-probability the
    /// server never reported, say).
    #[error("not supported by the remote backend: {0}")]
    Unsupported(String),
}

impl From<RemoteError> for marco_core::Error {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::TokenOutOfVocab { token, vocab_size } => {
                marco_core::Error::TokenOutOfRange { token, vocab_size }
            }
            other => marco_core::Error::backend(other),
        }
    }
}

/// `Result` with [`RemoteError`].
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;
