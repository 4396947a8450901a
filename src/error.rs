//! Errors are data: every failure of a step attempt has an [`ErrorKind`], and the retry
//! decision is one exhaustive `match` over the kinds ([`ErrorKind::retry_class`]).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// What went wrong with one attempt of a step. The kind alone decides whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The attempt ran past its timeout and was stopped.
    Timeout,
    /// The provider said "too many requests" (HTTP 429).
    RateLimited,
    /// The model is being loaded (HTTP 503 with `estimated_time`).
    ModelLoading,
    /// The server failed (5xx other than loading).
    Server,
    /// The connection failed or broke (refused, reset, DNS, TLS).
    Network,
    /// The token is missing, invalid or lacks a permission (401/403).
    Auth,
    /// The request itself is wrong (400, 404, 422): repeating it cannot help.
    InvalidRequest,
    /// The model answered with nothing.
    EmptyOutput,
    /// A stream ended before its end marker (`done:true`, `[DONE]`).
    TruncatedStream,
    /// The reply could not be understood (bad JSON, HTML error page).
    BadResponse,
    /// The account has no credits left (HTTP 402).
    CreditsExhausted,
    /// The provider does not serve this model.
    ModelNotSupported,
    /// The run's token budget is spent.
    BudgetExceeded,
    /// The run or step was cancelled by a user or a failing sibling.
    Cancelled,
    /// Something is missing from the configuration (token, URL, chat id).
    Config,
    /// A template failed to render or an expression failed to evaluate.
    Template,
    /// A bug or an unexpected state inside OmniFlow.
    Internal,
    /// The process running the run kept dying (see `MAX_TAKEOVERS`).
    Interrupted,
}

/// How the retry loop treats a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Try again after the backoff (or the provider's hint).
    Retry,
    /// Never try again: the same request will fail the same way.
    Fatal,
}

impl ErrorKind {
    /// The one place that decides retryability. No `_` arm: a new kind must be decided here.
    pub fn retry_class(self) -> RetryClass {
        match self {
            ErrorKind::Timeout
            | ErrorKind::RateLimited
            | ErrorKind::ModelLoading
            | ErrorKind::Server
            | ErrorKind::Network
            | ErrorKind::EmptyOutput
            | ErrorKind::TruncatedStream
            | ErrorKind::BadResponse => RetryClass::Retry,
            ErrorKind::Auth
            | ErrorKind::InvalidRequest
            | ErrorKind::CreditsExhausted
            | ErrorKind::ModelNotSupported
            | ErrorKind::BudgetExceeded
            | ErrorKind::Cancelled
            | ErrorKind::Config
            | ErrorKind::Template
            | ErrorKind::Internal
            | ErrorKind::Interrupted => RetryClass::Fatal,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::ModelLoading => "model_loading",
            ErrorKind::Server => "server",
            ErrorKind::Network => "network",
            ErrorKind::Auth => "auth",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::EmptyOutput => "empty_output",
            ErrorKind::TruncatedStream => "truncated_stream",
            ErrorKind::BadResponse => "bad_response",
            ErrorKind::CreditsExhausted => "credits_exhausted",
            ErrorKind::ModelNotSupported => "model_not_supported",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Config => "config",
            ErrorKind::Template => "template",
            ErrorKind::Internal => "internal",
            ErrorKind::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorKind> {
        ALL_KINDS.iter().copied().find(|k| k.as_str() == s)
    }
}

/// Every kind, for parsing and for exhaustive tests.
pub const ALL_KINDS: [ErrorKind; 18] = [
    ErrorKind::Timeout,
    ErrorKind::RateLimited,
    ErrorKind::ModelLoading,
    ErrorKind::Server,
    ErrorKind::Network,
    ErrorKind::Auth,
    ErrorKind::InvalidRequest,
    ErrorKind::EmptyOutput,
    ErrorKind::TruncatedStream,
    ErrorKind::BadResponse,
    ErrorKind::CreditsExhausted,
    ErrorKind::ModelNotSupported,
    ErrorKind::BudgetExceeded,
    ErrorKind::Cancelled,
    ErrorKind::Config,
    ErrorKind::Template,
    ErrorKind::Internal,
    ErrorKind::Interrupted,
];

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The failure of one attempt: a kind, a message that says what to do, and an optional wait
/// the provider asked for (503 `estimated_time`, 429 `Retry-After`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    pub kind: ErrorKind,
    pub message: String,
    /// The provider's own hint of how long to wait before trying again.
    pub retry_after: Option<Duration>,
}

impl StepError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StepError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    pub fn cancelled() -> Self {
        StepError::new(ErrorKind::Cancelled, "cancelled")
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for StepError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in ALL_KINDS {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
        assert_eq!(ErrorKind::parse("nope"), None);
    }

    #[test]
    fn auth_and_invalid_requests_are_never_retried() {
        assert_eq!(ErrorKind::Auth.retry_class(), RetryClass::Fatal);
        assert_eq!(ErrorKind::InvalidRequest.retry_class(), RetryClass::Fatal);
        assert_eq!(ErrorKind::CreditsExhausted.retry_class(), RetryClass::Fatal);
        assert_eq!(ErrorKind::ModelLoading.retry_class(), RetryClass::Retry);
        assert_eq!(ErrorKind::RateLimited.retry_class(), RetryClass::Retry);
        assert_eq!(ErrorKind::Timeout.retry_class(), RetryClass::Retry);
        assert_eq!(ErrorKind::EmptyOutput.retry_class(), RetryClass::Retry);
    }
}
