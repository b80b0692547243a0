//! One HTTP client per server: JSON in and out, a bearer token, timeouts, and bounded retries
//! with exponential backoff and jitter for the statuses that mean "busy, come back" (429, 503).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{RemoteError, Result};

/// A secret that never shows in `Debug` output, logs or traces.
#[derive(Clone, Default)]
pub(crate) struct Secret(Option<String>);

impl Secret {
    pub(crate) fn new(value: Option<String>) -> Self {
        Secret(value.filter(|v| !v.is_empty()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Secret(<redacted>)" } else { "Secret(none)" })
    }
}

/// Timeouts and retries of the HTTP requests a remote model sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpOptions {
    /// Time to open a connection.
    pub connect_timeout: Duration,
    /// Time for one whole request, answer included.
    pub request_timeout: Duration,
    /// Retries after a 429/503 answer or a dropped connection mid-request (not after a refused
    /// connection: a server that is not running does not start by waiting).
    pub max_retries: u32,
    /// The first retry waits about this long; each next one twice as long (plus jitter).
    pub retry_base: Duration,
    /// No wait between retries is longer than this.
    pub retry_max: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(300),
            max_retries: 4,
            retry_base: Duration::from_millis(250),
            retry_max: Duration::from_secs(8),
        }
    }
}

/// A JSON-over-HTTP client for one base URL.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    agent: ureq::Agent,
    base: String,
    key: Secret,
    options: HttpOptions,
}

/// What a request answered, with how many attempts it took.
pub(crate) struct Answer {
    pub json: Value,
    pub url: String,
}

impl Client {
    pub(crate) fn new(base: &str, key: Secret, options: HttpOptions) -> Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(RemoteError::InvalidConfig(format!(
                "the server URL must start with http:// or https://, got {base:?}"
            )));
        }
        if options.request_timeout.is_zero() || options.connect_timeout.is_zero() {
            return Err(RemoteError::InvalidConfig("timeouts must be positive".into()));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(options.connect_timeout))
            .timeout_global(Some(options.request_timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Client { agent, base, key, options })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`, JSON answer.
    pub(crate) fn get(&self, path: &str) -> Result<Answer> {
        self.send(path, None)
    }

    /// `POST path` with a JSON body, JSON answer.
    pub(crate) fn post(&self, path: &str, body: &Value) -> Result<Answer> {
        self.send(path, Some(body))
    }

    fn send(&self, path: &str, body: Option<&Value>) -> Result<Answer> {
        let url = format!("{}{}", self.base, path);
        let payload = body.map(Value::to_string);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = self.once(&url, payload.as_deref());
            let retry = match &result {
                Err(Failure::Busy { .. }) | Err(Failure::Dropped(_)) => attempt <= self.options.max_retries,
                _ => false,
            };
            if !retry {
                return match result {
                    Ok(json) => Ok(Answer { json, url }),
                    Err(Failure::Busy { status, message, .. }) => {
                        Err(RemoteError::Overloaded { url, status, attempts: attempt, message })
                    }
                    Err(Failure::Dropped(reason)) => Err(RemoteError::Connect { url, reason }),
                    Err(Failure::Final(e)) => Err(e),
                };
            }
            let wait = match &result {
                Err(Failure::Busy { retry_after: Some(after), .. }) => (*after).min(self.options.retry_max),
                _ => self.backoff(attempt, started),
            };
            tracing::warn!(url = %url, attempt, wait_ms = wait.as_millis() as u64, "server busy or connection dropped; retrying");
            std::thread::sleep(wait);
        }
    }

    /// Exponential backoff with full jitter: uniform in `[base·2^(n-1)/2, base·2^(n-1)]`.
    fn backoff(&self, attempt: u32, started: Instant) -> Duration {
        let exp = self.options.retry_base.saturating_mul(1u32 << (attempt - 1).min(16));
        let cap = exp.min(self.options.retry_max);
        // Jitter from the clock: different processes and threads retry at different times.
        let nanos = started.elapsed().subsec_nanos() as u64 ^ std::process::id() as u64;
        let frac = (marco_core::sampling::splitmix64(nanos) >> 11) as f64 / (1u64 << 53) as f64;
        cap.mul_f64(0.5 + 0.5 * frac)
    }

    fn once(&self, url: &str, payload: Option<&str>) -> std::result::Result<Value, Failure> {
        let response = match payload {
            Some(body) => {
                let mut request = self.agent.post(url).header("Content-Type", "application/json");
                if let Some(key) = &self.key.0 {
                    request = request.header("Authorization", format!("Bearer {key}"));
                }
                request.send(body)
            }
            None => {
                let mut request = self.agent.get(url);
                if let Some(key) = &self.key.0 {
                    request = request.header("Authorization", format!("Bearer {key}"));
                }
                request.call()
            }
        };
        let mut response = response.map_err(|e| self.transport_failure(url, e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.body_mut().with_config().limit(64 << 20).read_to_string().map_err(|e| match e {
            ureq::Error::Timeout(_) => {
                Failure::Final(RemoteError::Timeout { url: url.to_string(), after: self.options.request_timeout })
            }
            ureq::Error::Io(io) => Failure::Dropped(format!("the connection broke while reading the answer: {io}")),
            other => Failure::Final(RemoteError::Malformed {
                url: url.to_string(),
                reason: format!("cannot read the body: {other}"),
            }),
        })?;
        if (200..300).contains(&status) {
            return serde_json::from_str(&text).map_err(|e| {
                Failure::Final(RemoteError::Malformed {
                    url: url.to_string(),
                    reason: format!("not valid JSON ({e}): {}", preview(&text)),
                })
            });
        }
        let message = error_message(&text);
        if status == 429 || status == 503 {
            return Err(Failure::Busy { status, message, retry_after });
        }
        Err(Failure::Final(RemoteError::Http { url: url.to_string(), status, message }))
    }

    fn transport_failure(&self, url: &str, e: ureq::Error) -> Failure {
        match e {
            ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
                Failure::Final(RemoteError::Connect {
                    url: url.to_string(),
                    reason: format!("no connection within {:?}", self.options.connect_timeout),
                })
            }
            ureq::Error::Timeout(_) => {
                Failure::Final(RemoteError::Timeout { url: url.to_string(), after: self.options.request_timeout })
            }
            ureq::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Failure::Dropped(io.to_string())
            }
            other => Failure::Final(RemoteError::Connect { url: url.to_string(), reason: other.to_string() }),
        }
    }
}

enum Failure {
    Busy {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The connection broke mid-request: worth one more try, unlike a refused one.
    Dropped(String),
    Final(RemoteError),
}

/// The message of an error body: OpenAI's `{"error": {"message"}}`, vLLM's and SGLang's
/// `{"message"}`, `{"error": "text"}`, or the start of the body as it is.
pub(crate) fn error_message(body: &str) -> String {
    if let Ok(json) = serde_json::from_str::<Value>(body) {
        let candidates = [
            json.pointer("/error/message"),
            json.get("message"),
            json.get("error").filter(|e| e.is_string()),
            json.get("detail"),
        ];
        for c in candidates.into_iter().flatten() {
            match c {
                Value::String(s) => return s.clone(),
                Value::Null => {}
                other => return other.to_string(),
            }
        }
    }
    let p = preview(body);
    if p.is_empty() {
        "(empty body)".into()
    } else {
        p
    }
}

fn preview(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_from_each_server_shape() {
        assert_eq!(
            error_message(r#"{"error":{"code":400,"message":"bad token","type":"invalid_request_error"}}"#),
            "bad token"
        );
        assert_eq!(
            error_message(r#"{"object":"error","message":"too long","type":"BadRequestError","code":400}"#),
            "too long"
        );
        assert_eq!(error_message(r#"{"error":"schema violation"}"#), "schema violation");
        assert_eq!(error_message("<html>502 Bad Gateway</html>"), "<html>502 Bad Gateway</html>");
        assert_eq!(error_message(""), "(empty body)");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new(Some("sk-very-secret".into()));
        assert!(!format!("{s:?}").contains("sk-"));
        let c = Client::new("http://127.0.0.1:1", s, HttpOptions::default()).unwrap();
        assert!(!format!("{c:?}").contains("very-secret"));
    }

    #[test]
    fn bad_urls_and_timeouts_are_refused() {
        assert!(Client::new("127.0.0.1:8080", Secret::default(), HttpOptions::default()).is_err());
        let zero = HttpOptions { request_timeout: Duration::ZERO, ..HttpOptions::default() };
        assert!(Client::new("http://127.0.0.1:8080", Secret::default(), zero).is_err());
    }
}
