//! Ollama's native API: `POST /api/chat` streamed as NDJSON (a stream must end with an object
//! with `done:true`, else it was truncated), `GET /api/tags` and `POST /api/pull` for
//! `omniflow doctor`.

use super::wire::{self, Lines};
use super::{Answer, Chat, Link, Progress};
use crate::error::{ErrorKind, StepError};
use serde_json::{json, Value};

pub(crate) fn base(url: &str) -> &str {
    url.trim().trim_end_matches('/')
}

/// One streamed chat call.
pub(crate) async fn complete(
    http: &reqwest::Client,
    ollama_url: &str,
    chat: &Chat<'_>,
    progress: Progress<'_>,
) -> Result<Answer, StepError> {
    let url = format!("{}/api/chat", base(ollama_url));
    let mut options = serde_json::Map::new();
    if let Some(t) = chat.temperature {
        options.insert("temperature".into(), json!(t));
    }
    if let Some(n) = chat.max_tokens {
        options.insert("num_predict".into(), json!(n));
    }
    let body = json!({
        "model": chat.model,
        "messages": super::openai::messages(chat),
        "stream": true,
        "options": options,
    });
    let reply = wire::send(http.post(&url).json(&body), Link::Ollama, &url).await?;
    if !reply.is_success() {
        return Err(reply.into_error(Link::Ollama, &url, chat.model).await);
    }
    read_ndjson(reply.resp, &url, chat, progress).await
}

async fn read_ndjson(
    mut resp: reqwest::Response,
    url: &str,
    chat: &Chat<'_>,
    progress: Progress<'_>,
) -> Result<Answer, StepError> {
    let mut lines = Lines::default();
    let mut text = String::new();
    let mut chunks: u64 = 0;
    let mut total = 0usize;
    let mut ended = false;
    while !ended {
        let chunk = resp
            .chunk()
            .await
            .map_err(|e| wire::transport_error(&e, Link::Ollama, url))?;
        let mut batch = match chunk {
            Some(c) => {
                total += c.len();
                if total > wire::MAX_REPLY_BYTES {
                    return Err(wire::too_big(Link::Ollama, url));
                }
                lines.push(&c)
            }
            None => {
                ended = true;
                // A last object without a trailing newline still counts.
                lines.rest().into_iter().collect()
            }
        };
        for line in batch.drain(..) {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| {
                StepError::new(
                    ErrorKind::BadResponse,
                    format!(
                        "Ollama sent a malformed stream line ({e}): {}",
                        wire::snippet(&line)
                    ),
                )
            })?;
            if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                let msg = err
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| err.to_string());
                return Err(if msg.contains("not found") {
                    StepError::new(
                        ErrorKind::ModelNotSupported,
                        wire::model_missing(Link::Ollama, chat.model, &msg),
                    )
                } else {
                    StepError::new(
                        ErrorKind::Server,
                        format!("Ollama reported an error: {}", wire::snippet(&msg)),
                    )
                });
            }
            if let Some(piece) = v.pointer("/message/content").and_then(Value::as_str) {
                if !piece.is_empty() {
                    text.push_str(piece);
                    chunks += 1;
                    if let Some(p) = progress {
                        p(chunks);
                    }
                }
            }
            if v.get("done").and_then(Value::as_bool) == Some(true) {
                let count = |k: &str| v.get(k).and_then(Value::as_u64);
                let tokens = match (count("prompt_eval_count"), count("eval_count")) {
                    (None, None) => None,
                    (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
                };
                let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
                return Ok(Answer {
                    model: field("model"),
                    finish_reason: field("done_reason"),
                    ..Answer::new(text, tokens)
                });
            }
        }
    }
    Err(StepError::new(
        ErrorKind::TruncatedStream,
        format!(
            "the stream from Ollama ended without its final `done:true` object (after {} \
             characters): the server stopped or the connection was cut; retrying",
            text.chars().count()
        ),
    ))
}

/// `GET /api/tags`: the names of the local models.
pub async fn list_models(
    http: &reqwest::Client,
    ollama_url: &str,
) -> Result<Vec<String>, StepError> {
    let url = format!("{}/api/tags", base(ollama_url));
    let reply = wire::send(http.get(&url), Link::Ollama, &url).await?;
    if !reply.is_success() {
        return Err(reply.into_error(Link::Ollama, &url, "").await);
    }
    let text = reply.text(Link::Ollama, &url).await?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        StepError::new(
            ErrorKind::BadResponse,
            format!("Ollama's /api/tags is not JSON ({e}) — is OLLAMA_URL an Ollama server?"),
        )
    })?;
    Ok(v.get("models")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .filter_map(|m| {
                    m.get("name")
                        .or_else(|| m.get("model"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default())
}

/// One status line of a pull.
#[derive(Debug, Clone, PartialEq)]
pub struct PullStatus {
    pub status: String,
    pub completed: Option<u64>,
    pub total: Option<u64>,
}

/// `POST /api/pull`, streaming: calls `on_status` for every status line; Ok when the stream
/// ends with `{"status":"success"}`.
pub async fn pull(
    http: &reqwest::Client,
    ollama_url: &str,
    model: &str,
    mut on_status: impl FnMut(&PullStatus),
) -> Result<(), StepError> {
    let url = format!("{}/api/pull", base(ollama_url));
    // `name` for older servers; sending both is harmless.
    let rb = http
        .post(&url)
        .json(&json!({ "model": model, "name": model, "stream": true }));
    let reply = wire::send(rb, Link::Ollama, &url).await?;
    if !reply.is_success() {
        return Err(reply.into_error(Link::Ollama, &url, model).await);
    }
    let mut resp = reply.resp;
    let mut lines = Lines::default();
    let mut ended = false;
    while !ended {
        let chunk = resp
            .chunk()
            .await
            .map_err(|e| wire::transport_error(&e, Link::Ollama, &url))?;
        let batch = match chunk {
            Some(c) => lines.push(&c),
            None => {
                ended = true;
                lines.rest().into_iter().collect()
            }
        };
        for line in batch {
            if line.trim().is_empty() {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(err) = v.get("error").and_then(Value::as_str) {
                return Err(StepError::new(
                    ErrorKind::ModelNotSupported,
                    format!("Ollama could not pull {model}: {err} (check the name at https://ollama.com/library)"),
                ));
            }
            let st = PullStatus {
                status: v
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                completed: v.get("completed").and_then(Value::as_u64),
                total: v.get("total").and_then(Value::as_u64),
            };
            on_status(&st);
            if st.status == "success" {
                return Ok(());
            }
        }
    }
    Err(StepError::new(
        ErrorKind::TruncatedStream,
        format!("the pull of {model} ended without {{\"status\":\"success\"}}; run it again"),
    ))
}
