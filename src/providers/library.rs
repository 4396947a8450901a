//! The original's library call, `callHuggingFaceModel({task, model?, temperature?, maxTokens?,
//! timeout?, useOllama?})` → `{success, output?, error?, model, tokensUsed?, cached?}`, with
//! the same retries as a blueprint step (`MAX_RETRIES`, the provider's hints, backoff).
//!
//! ```no_run
//! # async fn demo() {
//! use omniflow::providers::{call_hugging_face_model, Request};
//! let r = call_hugging_face_model(Request::new("Two sentences on Rust.")).await;
//! if r.success {
//!     println!("{} ({} tokens)", r.output.unwrap_or_default(), r.tokens_used.unwrap_or(0));
//! } else {
//!     eprintln!("{}", r.error.unwrap_or_default());
//! }
//! # }
//! ```

use super::{AttemptKey, CallOptions, LlmRequest, Providers, DEFAULT_MODEL};
use crate::config::Config;
use crate::error::{ErrorKind, StepError};
use crate::retry::{Decision, RetryPolicy};
use serde::Serialize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What to ask.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// The prompt.
    pub task: String,
    /// A model id or an alias (`fast`, `better`, `powerful`); default `fast`.
    pub model: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// Per attempt; default `REQUEST_TIMEOUT`.
    pub timeout: Option<Duration>,
    /// Overrides `USE_OLLAMA` (Ollama first in the chain).
    pub use_ollama: Option<bool>,
}

impl Request {
    pub fn new(task: impl Into<String>) -> Request {
        Request {
            task: task.into(),
            ..Default::default()
        }
    }
}

/// The answer, shaped like the original's (`tokensUsed` etc. in JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
}

/// Calls the model with the process's configuration (environment and `.env`); the response
/// cache is kept in the history database (`DB_FILE`, or `DATABASE_URL`) when it opens. Never panics: every failure is in `error`.
pub async fn call_hugging_face_model(req: Request) -> Response {
    static PROVIDERS: OnceLock<Result<Providers, String>> = OnceLock::new();
    let providers = PROVIDERS.get_or_init(|| {
        let config = Config::load().map_err(|e| format!("config: {e}"))?;
        let store = config
            .database()
            .ok()
            .and_then(|at| crate::store::Store::open_at(&at).ok());
        let p = Providers::new(Arc::new(config));
        Ok(match store {
            Some(s) => p.with_store(s),
            None => p,
        })
    });
    match providers {
        Ok(p) => call_with(p, req).await,
        Err(e) => Response {
            success: false,
            error: Some(format!("{e} (check your environment or .env)")),
            model: req.model.unwrap_or_else(|| DEFAULT_MODEL.into()),
            ..Default::default()
        },
    }
}

/// [`call_hugging_face_model`] with explicit providers (tests, embedders with their own
/// configuration).
pub async fn call_with(providers: &Providers, req: Request) -> Response {
    let config = providers.config().clone();
    let llm = LlmRequest {
        provider: "auto".into(),
        model: req.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
        system: None,
        prompt: req.task.clone(),
        temperature: req.temperature,
        max_tokens: req.max_tokens,
        subject: None,
    };
    let policy = RetryPolicy::from_max_retries(config.max_retries);
    let timeout = config.scaled(req.timeout.unwrap_or(config.request_timeout));
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        let mut opts = CallOptions::new(AttemptKey {
            step: "library",
            attempt,
        });
        opts.use_ollama = req.use_ollama;
        let r = match tokio::time::timeout(timeout, providers.complete_with(&llm, opts)).await {
            Ok(r) => r,
            Err(_) => Err(StepError::new(
                ErrorKind::Timeout,
                format!(
                    "the model call timed out after {}s and was stopped; raise the timeout \
                     (REQUEST_TIMEOUT={}) if the model is just slow",
                    req.timeout.unwrap_or(config.request_timeout).as_secs_f64(),
                    config.request_timeout.as_secs()
                ),
            )),
        };
        let err = match r {
            Ok(reply) => break Ok(reply),
            Err(e) => e,
        };
        match policy.decide_now(attempt, &err) {
            Decision::GiveUp { .. } => break Err(err),
            Decision::Retry { wait, .. } => {
                tracing::warn!(attempt, kind = %err.kind, error = %err.message, "model call failed, retrying");
                tokio::time::sleep(config.scaled(wait)).await;
            }
        }
    };
    match result {
        Ok(reply) => Response {
            success: true,
            output: Some(reply.text),
            error: None,
            model: reply.model,
            tokens_used: reply.tokens_used,
            cached: Some(reply.cached),
        },
        Err(e) => Response {
            success: false,
            output: None,
            error: Some(format!("{}: {}", e.kind, e.message)),
            model: llm.model,
            tokens_used: None,
            cached: None,
        },
    }
}
