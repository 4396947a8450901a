//! The live checks behind `omniflow doctor`: for each link of the chain, what it needs, whether
//! it is configured, and whether it answers.
//!
//! A key is proven, not assumed: listing models proves nothing (llama-server and the Hugging
//! Face router list them without a key), so a configured key is tried with a 1-token
//! completion on the configured model. When that call cannot say (no answer in time, a
//! server error), the detail says plainly that the key was not verified.

use super::{huggingface, ollama, openai, wire, Chat, Link, Providers};
use crate::error::{ErrorKind, StepError};
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

/// One link's state.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LinkCheck {
    pub provider: &'static str,
    /// Whether the configuration enables it (in the `auto` chain).
    pub configured: bool,
    /// What it needs to be configured.
    pub needs: &'static str,
    /// `Some(true)` it answered, `Some(false)` it failed, `None` not checked (not configured).
    pub ok: Option<bool>,
    pub detail: String,
}

/// A live check is given this long.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The 1-token completion that proves a key is given this long.
pub const KEY_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl Providers {
    /// Checks every link (configured ones live), in chain order.
    pub async fn doctor(&self) -> Vec<LinkCheck> {
        let c = self.config().clone();
        let mut out = Vec::new();
        for link in [Link::Ollama, Link::HuggingFace, Link::OpenAi] {
            let (configured, needs) = match link {
                Link::Ollama => (
                    c.use_ollama,
                    "USE_OLLAMA=true and a running `ollama serve` at OLLAMA_URL",
                ),
                Link::HuggingFace | Link::HfInference => (
                    c.huggingface_token.is_some(),
                    "HUGGINGFACE_TOKEN (or HF_TOKEN): a free token from https://huggingface.co/settings/tokens",
                ),
                Link::OpenAi => (
                    c.openai_base_url.is_some(),
                    "OPENAI_BASE_URL (and OPENAI_API_KEY if the server wants one)",
                ),
            };
            let (ok, detail) = if configured {
                match tokio::time::timeout(CHECK_TIMEOUT, self.check_link(link)).await {
                    Ok(Ok(d)) => (Some(true), d),
                    Ok(Err(e)) => (Some(false), format!("{}: {}", e.kind, e.message)),
                    Err(_) => (
                        Some(false),
                        format!(
                            "no answer within {}s from {}",
                            CHECK_TIMEOUT.as_secs(),
                            link.url_var()
                        ),
                    ),
                }
            } else {
                (None, "not configured".to_string())
            };
            out.push(LinkCheck {
                provider: link.as_str(),
                configured,
                needs,
                ok,
                detail,
            });
        }
        out
    }

    async fn check_link(&self, link: Link) -> Result<String, StepError> {
        let c = self.config();
        match link {
            Link::Ollama => {
                let models = ollama::list_models(self.http(), &c.ollama_url).await?;
                let want = &c.ollama_model;
                let has = models
                    .iter()
                    .any(|m| m == want || m.split(':').next() == Some(want.as_str()));
                Ok(format!(
                    "reachable at {}; {} model(s): {}{}",
                    c.ollama_url,
                    models.len(),
                    if models.is_empty() {
                        "none".to_string()
                    } else {
                        models.join(", ")
                    },
                    if has {
                        String::new()
                    } else {
                        format!(" — the default {want} is missing: omniflow doctor --pull {want}")
                    }
                ))
            }
            Link::HuggingFace | Link::HfInference => {
                let token = huggingface::token(c.huggingface_token.as_deref())?;
                let url = openai::models_url(&c.hf_inference_url);
                let n = list_models(self, link, &url, Some(token)).await?;
                let chat = openai::chat_url(&c.hf_inference_url);
                let key = self.prove_key(link, &chat, Some(token), "token").await?;
                Ok(format!(
                    "reachable at {}; {n} chat model(s) available; {key}",
                    c.hf_inference_url
                ))
            }
            Link::OpenAi => {
                let base = c.openai_base_url.as_deref().unwrap_or_default();
                let url = openai::models_url(base);
                let bearer = c.openai_api_key.as_deref();
                let n = list_models(self, link, &url, bearer).await?;
                let key = self
                    .prove_key(link, &openai::chat_url(base), bearer, "key")
                    .await?;
                let slots = match self.slot_limit(link).await {
                    Some(l) if l.source == super::slots::SlotSource::ServerProps => format!(
                        "; the server has {} slots (its /props total_slots): at most {} calls in \
                         flight (OPENAI_CONCURRENCY overrides)",
                        l.limit, l.limit
                    ),
                    Some(l) => {
                        format!("; at most {} calls in flight (OPENAI_CONCURRENCY)", l.limit)
                    }
                    None => String::new(),
                };
                Ok(format!(
                    "reachable at {base}; {n} model(s) listed; {key}{slots}"
                ))
            }
        }
    }

    /// A 1-token completion on the configured model, which needs the key: `Err` when the key
    /// (or the model) is refused; otherwise what it proved, or plainly that it proved nothing.
    async fn prove_key(
        &self,
        link: Link,
        url: &str,
        bearer: Option<&str>,
        what: &str,
    ) -> Result<String, StepError> {
        let model = self.model_for(link, "fast", true);
        let chat = Chat {
            model: &model,
            system: None,
            prompt: "Say OK.",
            temperature: Some(0.0),
            max_tokens: Some(1),
        };
        let call = openai::complete(self.http(), link, url, bearer, &chat, None);
        let no_key = if bearer.is_none() {
            format!("no {what} set, and none needed: ")
        } else {
            format!("{what} accepted: ")
        };
        match tokio::time::timeout(KEY_CHECK_TIMEOUT, call).await {
            Ok(Ok(answer)) => {
                let by = answer
                    .model
                    .filter(|m| !super::same_model(&model, m))
                    .map(|m| format!(", answered by {m}"))
                    .unwrap_or_default();
                Ok(format!(
                    "{no_key}a 1-token completion on model {model} answered{by}"
                ))
            }
            Ok(Err(e))
                if matches!(
                    e.kind,
                    ErrorKind::Auth | ErrorKind::ModelNotSupported | ErrorKind::CreditsExhausted
                ) =>
            {
                Err(e)
            }
            Ok(Err(e)) => Ok(format!(
                "the {what} was NOT verified: a 1-token completion on model {model} failed \
                 ({}: {})",
                e.kind,
                wire::snippet(&e.message)
            )),
            Err(_) => Ok(format!(
                "the {what} was NOT verified: a 1-token completion on model {model} got no \
                 answer within {}s",
                KEY_CHECK_TIMEOUT.as_secs()
            )),
        }
    }
}

/// `GET …/v1/models` → how many models it lists.
async fn list_models(
    p: &Providers,
    link: Link,
    url: &str,
    bearer: Option<&str>,
) -> Result<usize, StepError> {
    let mut rb = p.http().get(url);
    if let Some(t) = bearer {
        rb = rb.bearer_auth(t);
    }
    let reply = wire::send(rb, link, url).await?;
    if !reply.is_success() {
        return Err(reply.into_error(link, url, "").await);
    }
    let text = reply.text(link, url).await?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        StepError::new(
            ErrorKind::BadResponse,
            format!(
                "{} answered {url} with something that is not JSON ({e}) — does {} point at the API?",
                link.label(),
                link.url_var()
            ),
        )
    })?;
    Ok(v.get("data")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or(0))
}
