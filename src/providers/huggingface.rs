//! Hugging Face, two ways:
//!
//! - **`huggingface`** (what `auto` uses): the Inference Providers router,
//!   `POST {HF_INFERENCE_URL}/v1/chat/completions`, OpenAI-compatible and streamed. Model ids
//!   with a `:provider` or `:fastest` suffix pass through unchanged.
//! - **`hf-inference`** (a node's `"provider": "hf-inference"`): the text-generation path
//!   `POST {HF_INFERENCE_URL}/hf-inference/models/{id}` with `{inputs, parameters}`, for models
//!   served by HF itself. This is where the original's "model is loading" reply lives:
//!   503 `{"error": "…currently loading", "estimated_time": 579.3}`, retried after that wait.
//!
//! The token comes from `HUGGINGFACE_TOKEN` (or `HF_TOKEN`) and travels only in the
//! `Authorization` header.

use super::wire;
use super::{Answer, Chat, Link, Progress};
use crate::error::{ErrorKind, StepError};
use serde_json::{json, Value};

/// The original's message for a missing token, with the steps to get one.
pub const MISSING_TOKEN: &str = "HUGGINGFACE_TOKEN not found. To create a free read token: \
    1. sign in at https://huggingface.co and open https://huggingface.co/settings/tokens; \
    2. \"Create new token\" (type \"Read\", or fine-grained with \"Make calls to Inference \
    Providers\"); 3. put it in .env as HUGGINGFACE_TOKEN=hf_… (HF_TOKEN also works). Or use a \
    local model: USE_OLLAMA=true, or try the blueprint with --sandbox";

pub(crate) fn token(config_token: Option<&str>) -> Result<&str, StepError> {
    config_token
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| StepError::new(ErrorKind::Config, MISSING_TOKEN))
}

pub(crate) fn router_url(base: &str) -> String {
    format!("{}/v1/chat/completions", base.trim().trim_end_matches('/'))
}

pub(crate) fn text_generation_url(base: &str, model: &str) -> String {
    format!(
        "{}/hf-inference/models/{}",
        base.trim().trim_end_matches('/'),
        model.trim_start_matches('/')
    )
}

/// A chat completion through the router.
pub(crate) async fn chat(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    chat: &Chat<'_>,
    progress: Progress<'_>,
) -> Result<Answer, StepError> {
    let url = router_url(base);
    super::openai::complete(http, Link::HuggingFace, &url, Some(token), chat, progress).await
}

/// A text-generation call on the hf-inference path (not streamed; tokens are estimated, the
/// service reports none).
pub(crate) async fn text_generation(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    chat: &Chat<'_>,
) -> Result<Answer, StepError> {
    let url = text_generation_url(base, chat.model);
    let inputs = match chat.system.filter(|s| !s.trim().is_empty()) {
        Some(s) => format!("{s}\n\n{}", chat.prompt),
        None => chat.prompt.to_string(),
    };
    let mut parameters = json!({ "return_full_text": false });
    if let Some(t) = chat.temperature {
        parameters["temperature"] = json!(t);
    }
    if let Some(n) = chat.max_tokens {
        parameters["max_new_tokens"] = json!(n);
    }
    let rb = http
        .post(&url)
        .bearer_auth(token)
        .json(&json!({ "inputs": inputs, "parameters": parameters }));
    let reply = wire::send(rb, Link::HfInference, &url).await?;
    if !reply.is_success() {
        return Err(reply.into_error(Link::HfInference, &url, chat.model).await);
    }
    let ct = reply.content_type.clone();
    let text = reply.text(Link::HfInference, &url).await?;
    let bad = |what: String| {
        StepError::new(
            ErrorKind::BadResponse,
            format!("Hugging Face (hf-inference) {what}"),
        )
    };
    if wire::is_html(&ct, &text) {
        return Err(bad(
            "answered an HTML page instead of JSON — does HF_INFERENCE_URL point at the API?"
                .into(),
        ));
    }
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
        bad(format!(
            "answered malformed JSON ({e}): {}",
            wire::snippet(&text)
        ))
    })?;
    // The deployed service answers `[{"generated_text"}]`; the spec says `{"generated_text"}`.
    let generated = v
        .pointer("/0/generated_text")
        .or_else(|| v.get("generated_text"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad(format!(
                "answered without generated_text: {}",
                wire::snippet(&text)
            ))
        })?;
    let tokens = v
        .pointer("/0/details/generated_tokens")
        .and_then(Value::as_u64)
        .map(|g| g + super::sandbox::estimate_tokens(&inputs));
    Ok(Answer {
        finish_reason: v
            .pointer("/0/details/finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        ..Answer::new(generated.to_string(), tokens)
    })
}
