//! OpenAI-compatible chat completions (`POST …/v1/chat/completions`): the Hugging Face router,
//! llama.cpp's llama-server, vLLM, LM Studio, Ollama's `/v1`. Streams with SSE
//! (`data: {chunk}` … `data: [DONE]`) and reports live token counts; a server that ignores
//! `stream` and answers one JSON object is accepted too.

use super::wire::{self, Lines};
use super::{Answer, Chat, Link, Progress};
use crate::error::{ErrorKind, StepError};
use serde_json::{json, Value};

/// `{base}/v1/chat/completions`, or `{base}/chat/completions` when `base` already ends in `/v1`
/// (the rule of the official HF client, so `OPENAI_BASE_URL=http://host:8000/v1` works).
pub fn chat_url(base: &str) -> String {
    let b = base.trim().trim_end_matches('/');
    if b.ends_with("/chat/completions") {
        b.to_string()
    } else if b.ends_with("/v1") {
        format!("{b}/chat/completions")
    } else {
        format!("{b}/v1/chat/completions")
    }
}

/// `{base}/v1/models` by the same rule.
pub fn models_url(base: &str) -> String {
    let b = base.trim().trim_end_matches('/');
    if b.ends_with("/v1") {
        format!("{b}/models")
    } else {
        format!("{b}/v1/models")
    }
}

pub(crate) fn messages(chat: &Chat<'_>) -> Value {
    let mut m = Vec::new();
    if let Some(s) = chat.system.filter(|s| !s.trim().is_empty()) {
        m.push(json!({ "role": "system", "content": s }));
    }
    m.push(json!({ "role": "user", "content": chat.prompt }));
    Value::Array(m)
}

/// One streamed chat completion.
pub(crate) async fn complete(
    http: &reqwest::Client,
    link: Link,
    url: &str,
    bearer: Option<&str>,
    chat: &Chat<'_>,
    progress: Progress<'_>,
) -> Result<Answer, StepError> {
    let mut body = json!({
        "model": chat.model,
        "messages": messages(chat),
        "stream": true,
        // Asks for `usage` in the last chunk (OpenAI, vLLM, the HF router); ignored elsewhere.
        "stream_options": { "include_usage": true },
    });
    if let Some(t) = chat.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(n) = chat.max_tokens {
        body["max_tokens"] = json!(n);
    }
    let mut rb = http
        .post(url)
        .header(
            reqwest::header::ACCEPT,
            "text/event-stream, application/json",
        )
        .json(&body);
    if let Some(token) = bearer {
        rb = rb.bearer_auth(token);
    }
    let reply = wire::send(rb, link, url).await?;
    if !reply.is_success() {
        return Err(reply.into_error(link, url, chat.model).await);
    }
    if reply.content_type.starts_with("text/event-stream") {
        read_sse(reply.resp, link, url, chat, progress).await
    } else {
        let content_type = reply.content_type.clone();
        let text = reply.text(link, url).await?;
        parse_completion(&text, &content_type, link, chat)
    }
}

/// A non-streamed `chat.completion` object.
pub(crate) fn parse_completion(
    text: &str,
    content_type: &str,
    link: Link,
    chat: &Chat<'_>,
) -> Result<Answer, StepError> {
    if wire::is_html(content_type, text) {
        return Err(bad(
            link,
            format!(
                "answered an HTML page instead of JSON — does {} point at the API?",
                link.url_var()
            ),
        ));
    }
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| {
        bad(
            link,
            format!("answered malformed JSON ({e}): {}", wire::snippet(text)),
        )
    })?;
    if v.get("error").is_some() {
        return Err(stream_error(link, &v, chat.model));
    }
    let content = v
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad(
                link,
                format!(
                    "answered JSON without choices[0].message.content: {}",
                    wire::snippet(text)
                ),
            )
        })?;
    let mut answer = Answer::new(content.to_string(), usage_tokens(&v));
    note_reply(&v, &mut answer);
    Ok(answer)
}

/// Keeps what a reply (or a stream chunk) says about itself: the model that answered and why
/// it stopped.
fn note_reply(v: &Value, answer: &mut Answer) {
    if let Some(m) = v.get("model").and_then(Value::as_str) {
        if answer.model.is_none() && !m.is_empty() {
            answer.model = Some(m.to_string());
        }
    }
    if let Some(r) = v
        .pointer("/choices/0/finish_reason")
        .and_then(Value::as_str)
    {
        answer.finish_reason = Some(r.to_string());
    }
}

fn bad(link: Link, what: String) -> StepError {
    StepError::new(ErrorKind::BadResponse, format!("{} {what}", link.label()))
}

/// `usage.total_tokens`, else `prompt_tokens + completion_tokens`.
pub(crate) fn usage_tokens(v: &Value) -> Option<u64> {
    let u = v.get("usage")?;
    u.get("total_tokens").and_then(Value::as_u64).or_else(|| {
        Some(
            u.get("prompt_tokens").and_then(Value::as_u64)?
                + u.get("completion_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
        )
    })
}

/// An error object inside a 200 reply or a stream (`{"error": "…"}` or `{"error":{…}}`).
fn stream_error(link: Link, v: &Value, model: &str) -> StepError {
    let e = wire::error_fields(v);
    let msg = e.message.unwrap_or_else(|| "no details".into());
    if e.code.as_deref() == Some("model_not_supported") {
        return StepError::new(
            ErrorKind::ModelNotSupported,
            wire::model_missing(link, model, &msg),
        );
    }
    StepError::new(
        ErrorKind::Server,
        format!(
            "{} reported an error in its reply: {}",
            link.label(),
            wire::snippet(&msg)
        ),
    )
}

async fn read_sse(
    mut resp: reqwest::Response,
    link: Link,
    url: &str,
    chat: &Chat<'_>,
    progress: Progress<'_>,
) -> Result<Answer, StepError> {
    let mut lines = Lines::default();
    let mut text = String::new();
    let mut tokens = None;
    let mut seen = Answer::new(String::new(), None);
    let mut chunks: u64 = 0;
    let mut total = 0usize;
    loop {
        let chunk = resp
            .chunk()
            .await
            .map_err(|e| wire::transport_error(&e, link, url))?;
        let Some(chunk) = chunk else { break };
        total += chunk.len();
        if total > wire::MAX_REPLY_BYTES {
            return Err(wire::too_big(link, url));
        }
        for line in lines.push(&chunk) {
            let Some(data) = line.strip_prefix("data:") else {
                // Blank separators, `event:`, `id:`, `retry:` and `: comments`.
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(Answer {
                    text,
                    tokens,
                    ..seen
                });
            }
            if data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| {
                bad(
                    link,
                    format!(
                        "sent a malformed stream event ({e}): {}",
                        wire::snippet(data)
                    ),
                )
            })?;
            if v.get("error").is_some_and(|e| !e.is_null()) {
                return Err(stream_error(link, &v, chat.model));
            }
            if let Some(t) = usage_tokens(&v) {
                tokens = Some(t);
            }
            note_reply(&v, &mut seen);
            if let Some(piece) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                if !piece.is_empty() {
                    text.push_str(piece);
                    // One chunk is about one token; the exact count comes with `usage`.
                    chunks += 1;
                    if let Some(p) = progress {
                        p(chunks);
                    }
                }
            }
        }
    }
    Err(StepError::new(
        ErrorKind::TruncatedStream,
        format!(
            "the stream from {} ended before `data: [DONE]` (after {} characters): the \
             connection was cut or the server stopped; retrying",
            link.label(),
            text.chars().count()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_hf_client_rule() {
        assert_eq!(
            chat_url("http://h:8080"),
            "http://h:8080/v1/chat/completions"
        );
        assert_eq!(
            chat_url("http://h:8080/v1/"),
            "http://h:8080/v1/chat/completions"
        );
        assert_eq!(
            chat_url("http://h/v1/chat/completions"),
            "http://h/v1/chat/completions"
        );
        assert_eq!(models_url("http://h/v1"), "http://h/v1/models");
        assert_eq!(models_url("http://h"), "http://h/v1/models");
    }

    #[test]
    fn usage_is_total_or_the_sum() {
        assert_eq!(
            usage_tokens(&json!({"usage":{"total_tokens":46}})),
            Some(46)
        );
        assert_eq!(
            usage_tokens(&json!({"usage":{"prompt_tokens":12,"completion_tokens":34}})),
            Some(46)
        );
        assert_eq!(usage_tokens(&json!({})), None);
    }
}
