//! A local fake model server for the provider tests: HTTP/1.1 on a tokio listener, one
//! request per connection, answering through a handler. Replies can be whole bodies, chunked
//! streams (SSE or NDJSON, each piece flushed on its own), huge bodies, or nothing at all (a
//! server that accepts and never answers). Follows PROTOCOLS.md §0–2.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
// tokio's clock, so a test on a paused clock reads arrivals in its own time.
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A reply.
#[derive(Debug, Clone)]
pub enum Reply {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// `Transfer-Encoding: chunked`, one chunk per piece, a short pause between pieces.
    Stream {
        content_type: String,
        pieces: Vec<String>,
    },
    /// 200 with a body of `n` bytes of `x`.
    Huge(usize),
    /// Reads the request, then never answers (holds the connection until the client leaves).
    Hang,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply::Full {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }
    pub fn raw(status: u16, content_type: &str, body: &str) -> Reply {
        Reply::Full {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }
    pub fn with_header(self, k: &str, v: &str) -> Reply {
        match self {
            Reply::Full {
                status,
                mut headers,
                body,
            } => {
                headers.push((k.into(), v.into()));
                Reply::Full {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }
    /// An SSE stream of chat-completion chunks, ending in `data: [DONE]` when `done`.
    pub fn sse(words: &[&str], usage: Option<u64>, done: bool) -> Reply {
        let mut pieces: Vec<String> = words
            .iter()
            .map(|w| {
                format!(
                    "data: {}\n\n",
                    serde_json::json!({"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",
                        "choices":[{"index":0,"delta":{"content":w},"finish_reason":null}]})
                )
            })
            .collect();
        if let Some(t) = usage {
            pieces.push(format!(
                "data: {}\n\n",
                serde_json::json!({"id":"c1","object":"chat.completion.chunk","choices":[],
                    "usage":{"prompt_tokens":t/2,"completion_tokens":t - t/2,"total_tokens":t}})
            ));
        }
        if done {
            pieces.push("data: [DONE]\n\n".into());
        }
        Reply::Stream {
            content_type: "text/event-stream".into(),
            pieces,
        }
    }
    /// An Ollama `/api/chat` NDJSON stream, ending with `done:true` and counts when `done`.
    pub fn ndjson(words: &[&str], done: bool) -> Reply {
        let mut pieces: Vec<String> = words
            .iter()
            .map(|w| {
                format!(
                    "{}\n",
                    serde_json::json!({"model":"mistral","created_at":"2024-01-01T00:00:00Z",
                        "message":{"role":"assistant","content":w},"done":false})
                )
            })
            .collect();
        if done {
            pieces.push(format!(
                "{}\n",
                serde_json::json!({"model":"mistral","created_at":"2024-01-01T00:00:00Z",
                    "message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",
                    "total_duration":5191566416u64,"prompt_eval_count":26,"eval_count":298})
            ));
        }
        Reply::Stream {
            content_type: "application/x-ndjson".into(),
            pieces,
        }
    }
    /// A non-streamed chat completion with usage.
    pub fn completion(text: &str, total: u64) -> Reply {
        Reply::json(
            200,
            serde_json::json!({"id":"x","object":"chat.completion","created":1,"model":"m",
                "choices":[{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}],
                "usage":{"prompt_tokens":total/2,"completion_tokens":total - total/2,"total_tokens":total}}),
        )
    }
}

type Handler = Arc<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

pub struct Fake {
    pub url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections whose client went away while the fake was holding them (`Hang`).
    pub dropped_by_client: Arc<AtomicUsize>,
    pub stop: Arc<AtomicBool>,
}

impl Fake {
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// Starts a fake; `handler(request, index)` picks each reply (index counts from 0).
pub async fn start(handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Fake {
    let handler: Handler = Arc::new(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let dropped = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let (s, d) = (seen.clone(), dropped.clone());
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                break;
            };
            let (handler, seen, dropped, counter) =
                (handler.clone(), s.clone(), d.clone(), counter.clone());
            tokio::spawn(async move {
                serve(sock, handler, seen, dropped, counter).await;
            });
        }
    });
    Fake {
        url: format!("http://{addr}"),
        seen,
        dropped_by_client: dropped,
        stop,
    }
}

/// A port where nothing listens (connection refused).
pub async fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    handler: Handler,
    seen: Arc<Mutex<Vec<Seen>>>,
    dropped: Arc<AtomicUsize>,
    counter: Arc<AtomicUsize>,
) {
    let Some(r) = crate::common::http::read_request(&mut sock).await else {
        return;
    };
    let req = Seen {
        method: r.method,
        path: r.target,
        headers: r.headers,
        body: r.body,
        at: Instant::now(),
    };
    let index = counter.fetch_add(1, Ordering::SeqCst);
    let reply = handler(&req, index);
    seen.lock().unwrap().push(req);
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut out = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            out.push_str(&body);
            let _ = sock.write_all(out.as_bytes()).await;
        }
        Reply::Stream {
            content_type,
            pieces,
        } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            );
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for p in pieces {
                let c = format!("{:x}\r\n{p}\r\n", p.len());
                if sock.write_all(c.as_bytes()).await.is_err() {
                    return;
                }
                let _ = sock.flush().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let _ = sock.write_all(b"0\r\n\r\n").await;
        }
        Reply::Huge(n) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
            );
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let block = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(block.len());
                if sock.write_all(&block[..k]).await.is_err() {
                    return; // the client stopped reading: expected
                }
                left -= k;
            }
        }
        Reply::Hang => {
            // Wait until the client closes its side: that is how we know nothing of the
            // client outlived its timeout.
            let mut chunk = [0u8; 1024];
            loop {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                }
            }
        }
    }
    let _ = sock.shutdown().await;
}
