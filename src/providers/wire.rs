//! What every provider client shares on the wire: reading a capped body, line framing for
//! SSE and NDJSON streams, the tolerant error-body parser, and the mapping from an HTTP reply
//! to an [`ErrorKind`] with a message that says what to do.
//!
//! Nothing here ever panics on a reply, and no message contains a token: URLs given to these
//! functions never carry one (tokens travel in headers only), and reqwest's own text has its
//! URL removed.

use super::Link;
use crate::error::{ErrorKind, StepError};
use crate::retry::RATE_LIMIT_DEFAULT;
use serde_json::Value;
use std::time::Duration;

/// A reply (or a whole stream) larger than this is refused: no model answer is 8 MiB, so such
/// a body is a misdirected URL or a broken server, and holding it would only cost memory.
pub const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// A reply whose head is read: what every client looks at before its body.
pub(crate) struct Reply {
    pub resp: reqwest::Response,
    pub status: u16,
    /// Lower-cased, `""` when absent.
    pub content_type: String,
    pub retry_after: Option<Duration>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The whole body as text (capped at [`MAX_REPLY_BYTES`]; invalid UTF-8 replaced).
    pub async fn text(self, link: Link, url: &str) -> Result<String, StepError> {
        let bytes = read_capped(self.resp, link, url).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The error a non-2xx reply stands for, read from its body ([`classify_status`]).
    pub async fn into_error(self, link: Link, url: &str, model: &str) -> StepError {
        let (status, retry_after) = (self.status, self.retry_after);
        let content_type = self.content_type.clone();
        match self.text(link, url).await {
            Ok(body) => classify_status(link, status, retry_after, &content_type, &body, model),
            Err(e) => e,
        }
    }
}

/// Sends a request; a transport failure becomes a classified error without the URL's secrets.
///
/// A request whose connection closed before any byte of a reply came back is sent once more
/// at once, on a connection of its own ([`closed_before_reply`]): that is the pooled
/// keep-alive connection a server closed after its last reply (llama-server closes every
/// connection after a streamed reply while announcing `Keep-Alive`), so the request never
/// reached the model, and it costs neither a backoff nor one of the step's attempts.
pub(crate) async fn send(
    rb: reqwest::RequestBuilder,
    link: Link,
    url: &str,
) -> Result<Reply, StepError> {
    let (client, request) = rb.build_split();
    let request = request.map_err(|e| transport_error(&e, link, url))?;
    let again = request.try_clone();
    let resp = match (client.execute(request).await, again) {
        (Ok(resp), _) => resp,
        (Err(e), Some(again)) if closed_before_reply(&e) => {
            tracing::debug!(provider = link.as_str(), error = %e, "connection closed before the reply; sending again on a new connection");
            unpooled()
                .execute(again)
                .await
                .map_err(|e| transport_error(&e, link, url))?
        }
        (Err(e), _) => return Err(transport_error(&e, link, url)),
    };
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(Reply {
        status: resp.status().as_u16(),
        retry_after: crate::retry::retry_after_header(resp.headers()),
        content_type,
        resp,
    })
}

/// True when a request failed because its connection closed before any byte of the reply
/// came back (not a connect failure, not a timeout, not a broken body): the server closed an
/// idle keep-alive connection as the request went out on it.
fn closed_before_reply(e: &reqwest::Error) -> bool {
    if e.is_connect() || e.is_timeout() || e.is_body() || e.is_decode() || e.is_status() {
        return false;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            ) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// A client that keeps no idle connection, for [`send`]'s second try: every request gets a
/// new connection, so it cannot meet another closed one from the pool.
fn unpooled() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .user_agent(concat!("omniflow/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default()
    })
}

/// Reads the whole body, refusing more than [`MAX_REPLY_BYTES`].
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    link: Link,
    url: &str,
) -> Result<Vec<u8>, StepError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| transport_error(&e, link, url))?
    {
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(too_big(link, url));
        }
        let before = out.len();
        out.extend_from_slice(&chunk);
        crate::limits::memory::grown(before, out.len()).map_err(|m| {
            StepError::new(
                ErrorKind::InvalidRequest,
                format!("{} at {url}: {m}", link.label()),
            )
        })?;
    }
    Ok(out)
}

pub(crate) fn too_big(link: Link, url: &str) -> StepError {
    StepError::new(
        ErrorKind::BadResponse,
        format!(
            "{} at {url} sent more than {} MiB; refused (no model answer is that large — check {})",
            link.label(),
            MAX_REPLY_BYTES >> 20,
            link.url_var()
        ),
    )
}

/// Splits a byte stream into lines (`\n`, with an optional `\r` before it), whatever the
/// chunk boundaries: a chunk may end in the middle of a line or of a UTF-8 character.
///
/// Linear in the bytes pushed: each byte is looked at once for a newline (a long line
/// arriving in many chunks is not rescanned from its start), and the lines a chunk completes
/// are cut from the buffer in one move.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
}

impl Lines {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(off) = self.buf[from..].iter().position(|&b| b == b'\n') {
            let end = from + off;
            let text = String::from_utf8_lossy(&self.buf[start..end]);
            out.push(text.trim_end_matches('\r').to_string());
            start = end + 1;
            from = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        out
    }

    /// What is left after the last newline (a last line without one).
    pub fn rest(&mut self) -> Option<String> {
        self.scanned = 0;
        let t = String::from_utf8_lossy(&std::mem::take(&mut self.buf))
            .trim()
            .to_string();
        (!t.is_empty()).then_some(t)
    }
}

/// The useful parts of an error body, whichever of the documented shapes it has:
/// `{"error":"…"}`, `{"error":{"message","type","code"}}`, `{"detail":"…"}`, `{"message":"…"}`,
/// plus HF's `estimated_time`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ErrorBody {
    pub message: Option<String>,
    pub code: Option<String>,
    pub estimated_time: Option<f64>,
}

pub(crate) fn parse_error_body(body: &str) -> ErrorBody {
    let Ok(v) = serde_json::from_str::<Value>(body.trim()) else {
        return ErrorBody::default();
    };
    error_fields(&v)
}

/// [`parse_error_body`] on an already parsed value (a mid-stream error object).
pub(crate) fn error_fields(v: &Value) -> ErrorBody {
    let text = |x: &Value| match x {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    let mut out = ErrorBody::default();
    match v.get("error") {
        Some(Value::Object(e)) => {
            out.message = e.get("message").and_then(text);
            out.code = e.get("code").and_then(text);
        }
        Some(e) => out.message = text(e),
        None => {}
    }
    if out.message.is_none() {
        out.message = v
            .get("detail")
            .and_then(text)
            .or_else(|| v.get("message").and_then(text));
    }
    if out.code.is_none() {
        out.code = v.get("code").and_then(text);
    }
    out.estimated_time = v
        .get("estimated_time")
        .and_then(Value::as_f64)
        .filter(|t| t.is_finite() && *t >= 0.0);
    out
}

/// The first 200 characters of a body, on one line.
pub(crate) fn snippet(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        s.push('…');
    }
    s
}

pub(crate) fn is_html(content_type: &str, body: &str) -> bool {
    content_type.contains("text/html") || {
        let t = body.trim_start().to_ascii_lowercase();
        t.starts_with("<!doctype html") || t.starts_with("<html")
    }
}

/// `<title>…</title>` of an HTML page, for the message.
fn html_title(body: &str) -> Option<String> {
    let lower = body.to_ascii_lowercase();
    let start = lower.find("<title>")? + "<title>".len();
    let end = lower[start..].find("</title>")? + start;
    let t = body.get(start..end)?.trim();
    (!t.is_empty()).then(|| snippet(t))
}

/// Maps a non-2xx reply to an error kind, with a message that carries the fix.
pub(crate) fn classify_status(
    link: Link,
    status: u16,
    retry_after: Option<Duration>,
    content_type: &str,
    body: &str,
    model: &str,
) -> StepError {
    let url_var = link.url_var();
    let name = link.label();
    if is_html(content_type, body) {
        let title = html_title(body)
            .map(|t| format!(" \"{t}\""))
            .unwrap_or_default();
        let kind = match status {
            429 => ErrorKind::RateLimited,
            500..=599 => ErrorKind::Server,
            401 | 403 => ErrorKind::Auth,
            _ => ErrorKind::BadResponse,
        };
        let mut e = StepError::new(
            kind,
            format!(
                "{name} answered HTTP {status} with an HTML page{title} instead of JSON — a proxy \
                 or gateway error, or {url_var} does not point at the API"
            ),
        );
        e.retry_after = retry_after;
        return e;
    }
    let parsed = parse_error_body(body);
    let detail = parsed
        .message
        .clone()
        .unwrap_or_else(|| snippet(body))
        .trim()
        .to_string();
    let detail = if detail.is_empty() {
        "no details".to_string()
    } else {
        snippet(&detail)
    };
    let code = parsed.code.as_deref().unwrap_or("");
    let lower = detail.to_lowercase();
    match status {
        503 if parsed.estimated_time.is_some() => {
            let t = parsed.estimated_time.unwrap_or(0.0);
            StepError::new(
                ErrorKind::ModelLoading,
                format!(
                    "model {model} is currently loading on {name} (HTTP 503); this is normal for \
                     a model that was not used recently (the provider asks for a {t:.1}s wait)"
                ),
            )
            .with_retry_after(crate::limits::secs_f64(t))
        }
        503 if lower.contains("loading") => StepError::new(
            ErrorKind::ModelLoading,
            format!(
                "model {model} is loading on {name} (HTTP 503: {detail}); this is normal for a \
                 model that was not used recently — retrying with backoff"
            ),
        ),
        429 => {
            let wait = match retry_after {
                Some(w) => format!("the provider says retry after {:.0}s", w.as_secs_f64()),
                None => format!(
                    "no Retry-After given, waiting {}s",
                    RATE_LIMIT_DEFAULT.as_secs()
                ),
            };
            let fix = match link {
                Link::Ollama => "lower OLLAMA_RATE_LIMIT or CONCURRENCY".to_string(),
                Link::OpenAi => {
                    "set OPENAI_RATE_LIMIT to the server's quota (e.g. 60/min)".to_string()
                }
                Link::HuggingFace | Link::HfInference => {
                    "set HF_RATE_LIMIT to your quota; a local model has no limit: USE_OLLAMA=true"
                        .to_string()
                }
            };
            let mut e = StepError::new(
                ErrorKind::RateLimited,
                format!("rate limit reached on {name} (HTTP 429: {detail}); {wait}; {fix}"),
            );
            e.retry_after = retry_after;
            e
        }
        401 | 403 => StepError::new(ErrorKind::Auth, auth_message(link, status, &detail)),
        402 => StepError::new(
            ErrorKind::CreditsExhausted,
            match link {
                Link::HuggingFace | Link::HfInference => format!(
                    "Hugging Face credits are exhausted (HTTP 402: {detail}); the free monthly \
                     credits are used up — run models locally for free with USE_OLLAMA=true and \
                     `ollama serve`, or add credits at https://huggingface.co/settings/billing"
                ),
                _ => format!(
                    "{name} says payment is required (HTTP 402: {detail}); add credits to the \
                     account, or run models locally with USE_OLLAMA=true"
                ),
            },
        ),
        400 | 404 | 422
            if code == "model_not_supported"
                || lower.contains("not supported by any provider")
                || (status == 404 && (lower.contains("model") || link == Link::Ollama)) =>
        {
            StepError::new(
                ErrorKind::ModelNotSupported,
                model_missing(link, model, &detail),
            )
        }
        408 => StepError::new(
            ErrorKind::Timeout,
            format!("{name} timed out the request (HTTP 408: {detail})"),
        ),
        500..=599 => {
            let mut e = StepError::new(
                ErrorKind::Server,
                format!(
                    "{name} answered HTTP {status} (a server error: {detail}); usually \
                     temporary, retrying"
                ),
            );
            e.retry_after = retry_after;
            e
        }
        400 | 413 if exceeds_context(code, &lower) => StepError::new(
            ErrorKind::InvalidRequest,
            format!(
                "{name} refused the prompt because it does not fit in the model's context \
                 (HTTP {status}: {detail}); shorten the prompt (or what is templated into it) or \
                 lower maxTokens, or give the server a larger context — for llama-server raise \
                 -c, which is shared among its -np slots (each gets -c / -np tokens), or start \
                 it with fewer slots"
            ),
        ),
        _ => StepError::new(
            ErrorKind::InvalidRequest,
            format!(
                "{name} refused the request (HTTP {status}: {detail}); check the node's model, \
                 temperature and maxTokens"
            ),
        ),
    }
}

/// A refusal because the prompt (plus the tokens asked for) is longer than the context:
/// llama-server's `exceeds the available context size` (`exceed_context_size_error`),
/// OpenAI's and vLLM's `context_length_exceeded` / `maximum context length`.
fn exceeds_context(code: &str, lower: &str) -> bool {
    code == "context_length_exceeded"
        || lower.contains("context size")
        || lower.contains("context length")
        || lower.contains("context window")
}

fn auth_message(link: Link, status: u16, detail: &str) -> String {
    match link {
        Link::HuggingFace | Link::HfInference => format!(
            "Hugging Face refused the token (HTTP {status}: {detail}): it is invalid, expired, or \
             lacks the \"Make calls to Inference Providers\" permission — create a fine-grained \
             token with that permission at https://huggingface.co/settings/tokens and put it in \
             .env as HUGGINGFACE_TOKEN=hf_…"
        ),
        Link::OpenAi => format!(
            "the OpenAI-compatible server refused the key (HTTP {status}: {detail}); check \
             OPENAI_API_KEY in .env"
        ),
        Link::Ollama => format!(
            "Ollama refused the request (HTTP {status}: {detail}); a proxy in front of it may \
             need credentials — check OLLAMA_URL"
        ),
    }
}

/// The message for a model the provider does not have.
pub(crate) fn model_missing(link: Link, model: &str, detail: &str) -> String {
    match link {
        Link::Ollama => format!(
            "model {model} not found — run: ollama pull {model} (or: omniflow doctor --pull \
             {model}); Ollama said: {detail}"
        ),
        Link::HuggingFace | Link::HfInference => format!(
            "model {model} is not served by any Inference Provider you have enabled ({detail}); \
             pick a served model (e.g. \"model\": \"meta-llama/Llama-3.1-8B-Instruct\" or an \
             alias: fast, better, powerful), or enable providers at \
             https://hf.co/settings/inference-providers"
        ),
        Link::OpenAi => format!(
            "the OpenAI-compatible server does not serve model {model} ({detail}); set the \
             node's \"model\" (or OPENAI_MODEL) to one it lists at GET /v1/models"
        ),
    }
}

/// Maps a transport failure (connect, reset, body read). reqwest's text has its URL removed.
pub(crate) fn transport_error(e: &reqwest::Error, link: Link, url: &str) -> StepError {
    let strip = |s: String| match e.url() {
        Some(u) => s
            .replace(&format!(" for url ({u})"), "")
            .replace(u.as_str(), ""),
        None => s,
    };
    let mut text = strip(e.to_string());
    // The deepest cause says what happened ("Connection refused (os error 111)").
    let mut cause = std::error::Error::source(e);
    let mut deepest = None;
    while let Some(c) = cause {
        deepest = Some(c.to_string());
        cause = c.source();
    }
    if let Some(d) = deepest {
        text = format!("{}: {}", text.trim(), strip(d));
    }
    let what = text.trim().to_string();
    // A connect that timed out is a server not reachable, like a refused one: it is not the
    // model being slow, so it must not read as REQUEST_TIMEOUT's and it falls through an
    // `auto` chain. The client has no other timeout (the engine's attempt timeout drops the
    // future), so the branch below is for a timeout from elsewhere in the stack.
    if e.is_timeout() && !e.is_connect() {
        return StepError::new(
            ErrorKind::Timeout,
            format!("{} at {url} timed out ({what})", link.label()),
        );
    }
    if e.is_connect() && link == Link::Ollama {
        return StepError::new(
            ErrorKind::Network,
            format!(
                "Ollama connection failed at {url} ({what}). Fix: start it with `ollama serve`, \
                 or `docker compose up ollama`, or set USE_OLLAMA=false to use Hugging Face"
            ),
        );
    }
    if e.is_connect() {
        return StepError::new(
            ErrorKind::Network,
            format!(
                "could not connect to {} at {url} ({what}); check the network and {}",
                link.label(),
                link.url_var()
            ),
        );
    }
    if e.is_body() || e.is_decode() {
        // The connection broke while the reply was being read: a retry usually helps.
        return StepError::new(
            ErrorKind::Network,
            format!(
                "the connection to {} broke while reading the reply ({what})",
                link.label()
            ),
        );
    }
    StepError::new(
        ErrorKind::Network,
        format!("request to {} at {url} failed ({what})", link.label()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_hf_error_shapes_and_the_others() {
        let a = parse_error_body(
            r#"{"error":"Model X is currently loading","estimated_time":579.3385620117188}"#,
        );
        assert_eq!(a.message.as_deref(), Some("Model X is currently loading"));
        assert_eq!(a.estimated_time, Some(579.3385620117188));
        let b = parse_error_body(
            r#"{"error":{"message":"The requested model 'X' is not supported by any provider you have enabled.","type":"invalid_request_error","param":"model","code":"model_not_supported"}}"#,
        );
        assert_eq!(b.code.as_deref(), Some("model_not_supported"));
        assert!(b.message.unwrap().starts_with("The requested model"));
        assert_eq!(
            parse_error_body(r#"{"detail":"nope"}"#).message.as_deref(),
            Some("nope")
        );
        assert_eq!(
            parse_error_body(r#"{"message":"m","code":401}"#),
            ErrorBody {
                message: Some("m".into()),
                code: Some("401".into()),
                estimated_time: None
            }
        );
        assert_eq!(parse_error_body("<html>"), ErrorBody::default());
    }

    #[test]
    fn lines_survive_any_chunking() {
        let text = "data: {\"a\":\"é\"}\r\n\r\ndata: [DONE]\n\ntail";
        for cut in 1..text.len() {
            let bytes = text.as_bytes();
            let mut l = Lines::default();
            let mut got = l.push(&bytes[..cut]);
            got.extend(l.push(&bytes[cut..]));
            assert_eq!(
                got,
                vec!["data: {\"a\":\"é\"}", "", "data: [DONE]", ""],
                "cut at {cut}"
            );
            assert_eq!(l.rest().as_deref(), Some("tail"));
        }
    }

    #[test]
    fn a_long_line_in_many_chunks_and_many_lines_in_one_chunk() {
        // A 1 MB line arriving 1 KB at a time, then 10,000 short lines in one chunk.
        let long = "x".repeat(1 << 20);
        let mut l = Lines::default();
        let mut got = Vec::new();
        for piece in long.as_bytes().chunks(1024) {
            got.extend(l.push(piece));
        }
        assert!(got.is_empty(), "no newline yet");
        got.extend(l.push(b"\r\n"));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), long.len());
        let many: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        let got = l.push(format!("{many}half").as_bytes());
        assert_eq!(got.len(), 10_000);
        assert_eq!(got[9_999], "line 9999");
        assert_eq!(l.push(b" a line\n"), vec!["half a line"]);
        assert_eq!(l.rest(), None);
    }

    /// A reply that breaks off before its `Content-Length` (the server closed): the message
    /// says the connection broke while the reply was being read, and it is retried as a
    /// network failure.
    #[tokio::test]
    async fn a_reply_cut_off_mid_body_says_the_connection_broke() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                        Content-Length: 100\r\n\r\n{\"choices\": [";
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
        let resp = reqwest::Client::new().get(&url).send().await.unwrap();
        let e = read_capped(resp, Link::OpenAi, &url).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Network, "{}", e.message);
        assert!(
            e.message
                .contains("the connection to the OpenAI-compatible server broke while reading"),
            "{}",
            e.message
        );
    }

    /// A server whose accept queue is full never finishes the TCP handshake (the kernel drops
    /// the SYN): the connect times out, and that is a server not reached (`network`, which an
    /// `auto` chain falls through), not a slow model (`timeout`, REQUEST_TIMEOUT's advice).
    #[tokio::test]
    async fn a_connect_that_times_out_is_a_network_failure() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        // Backlog 0 and nobody accepting: after a connection or two the queue is full.
        let _listener = socket.listen(0).unwrap();
        let mut held = Vec::new();
        for _ in 0..8 {
            if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                held.push(c);
            }
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let url = format!("http://{addr}/v1/chat/completions");
        let e = client.get(&url).send().await.unwrap_err();
        assert!(e.is_connect() && e.is_timeout(), "{e:?}");
        let got = transport_error(&e, Link::OpenAi, &url);
        assert_eq!(got.kind, ErrorKind::Network, "{}", got.message);
        assert!(got.message.contains("could not connect"), "{}", got.message);
        assert!(crate::providers::falls_through(got.kind));
    }

    /// An error body quoted in a message: one line, at most 200 characters, and an ellipsis
    /// when it was cut.
    #[test]
    fn a_quoted_body_is_one_line_and_says_when_it_was_cut() {
        assert_eq!(snippet("a\n  b\tc"), "a b c");
        let exact = "x".repeat(200);
        assert_eq!(snippet(&exact), exact);
        let long = snippet(&"y".repeat(300));
        assert_eq!(long.chars().count(), 201);
        assert!(long.ends_with("y…"), "{long}");
    }

    #[test]
    fn statuses_map_to_kinds() {
        let k = |s: u16, body: &str| {
            classify_status(Link::HuggingFace, s, None, "application/json", body, "m").kind
        };
        assert_eq!(
            k(503, r#"{"error":"loading","estimated_time":2.5}"#),
            ErrorKind::ModelLoading
        );
        assert_eq!(k(503, r#"{"error":"unavailable"}"#), ErrorKind::Server);
        assert_eq!(
            k(503, r#"{"error":"Model is currently loading"}"#),
            ErrorKind::ModelLoading
        );
        assert_eq!(k(429, r#"{"error":"Rate limit"}"#), ErrorKind::RateLimited);
        assert_eq!(k(401, r#"{"error":"bad"}"#), ErrorKind::Auth);
        assert_eq!(k(403, r#"{"error":"bad"}"#), ErrorKind::Auth);
        assert_eq!(
            k(402, r#"{"error":"credits"}"#),
            ErrorKind::CreditsExhausted
        );
        assert_eq!(
            k(
                400,
                r#"{"error":{"message":"x","code":"model_not_supported"}}"#
            ),
            ErrorKind::ModelNotSupported
        );
        assert_eq!(k(400, r#"{"error":"bad temp"}"#), ErrorKind::InvalidRequest);
        let overflow = classify_status(
            Link::OpenAi,
            400,
            None,
            "application/json",
            r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#,
            "m",
        );
        assert_eq!(overflow.kind, ErrorKind::InvalidRequest);
        // Another 400 is not blamed on the context size.
        let other = classify_status(
            Link::OpenAi,
            400,
            None,
            "application/json",
            r#"{"error":{"code":400,"message":"temperature must be at most 2","type":"invalid_request_error"}}"#,
            "m",
        );
        assert!(
            other.message.contains("temperature must be at most 2"),
            "{}",
            other.message
        );
        assert!(!other.message.contains("context"), "{}", other.message);
        assert!(
            overflow.message.contains("shorten the prompt"),
            "{}",
            overflow.message
        );
        assert!(
            overflow.message.contains("raise -c"),
            "{}",
            overflow.message
        );
        assert!(
            !overflow.message.contains("temperature"),
            "{}",
            overflow.message
        );
        assert_eq!(k(500, "boom"), ErrorKind::Server);
        let html = classify_status(
            Link::HuggingFace,
            502,
            None,
            "text/html",
            "<html><title>502 Bad Gateway</title></html>",
            "m",
        );
        assert_eq!(html.kind, ErrorKind::Server);
        assert!(html.message.contains("502 Bad Gateway"), "{}", html.message);
        // The message names who answered.
        assert!(
            html.message.starts_with("Hugging Face answered HTTP 502"),
            "{}",
            html.message
        );
        let o = classify_status(
            Link::Ollama,
            404,
            None,
            "application/json",
            r#"{"error":"model \"llama3.2\" not found, try pulling it first"}"#,
            "llama3.2",
        );
        assert_eq!(o.kind, ErrorKind::ModelNotSupported);
        assert!(o
            .message
            .starts_with("model llama3.2 not found — run: ollama pull llama3.2"));
        // Ollama's 404s are about the model even when they do not say so; another server's
        // bare 404 is a wrong address, not a missing model.
        let bare = |link| {
            classify_status(
                link,
                404,
                None,
                "application/json",
                r#"{"error":"not found"}"#,
                "llama3.2",
            )
        };
        assert_eq!(bare(Link::Ollama).kind, ErrorKind::ModelNotSupported);
        let elsewhere = bare(Link::OpenAi);
        assert_eq!(
            elsewhere.kind,
            ErrorKind::InvalidRequest,
            "{}",
            elsewhere.message
        );
        assert!(
            !elsewhere.message.contains("ollama pull"),
            "{}",
            elsewhere.message
        );
        assert!(
            elsewhere
                .message
                .starts_with("the OpenAI-compatible server refused the request (HTTP 404"),
            "{}",
            elsewhere.message
        );
    }
}
