//! Fake Telegram, Discord and Supabase (PostgREST) servers that follow PROTOCOLS.md §4–6:
//! paths, validation, success and error bodies, rate-limit replies. Each records every
//! request (method, target, headers, body) for assertions. A script of forced replies is
//! answered first, one per request; then the fake behaves like the service.

#![allow(dead_code)]

use crate::common::http::read_request;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// A request as the fake saw it.
pub use crate::common::http::Request as Req;

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: String::new(),
        }
    }

    pub fn with_header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&Req) -> Reply + Send + Sync>;

pub struct Fake {
    pub url: String,
    pub seen: Arc<Mutex<Vec<Req>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Fake {
    pub fn requests(&self) -> Vec<Req> {
        self.seen.lock().unwrap().clone()
    }

    /// Forces the next replies (in order), before the normal behaviour resumes.
    pub fn push(&self, r: Reply) {
        self.script.lock().unwrap().push_back(r);
    }
}

async fn serve(handler: Handler) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let script: Arc<Mutex<VecDeque<Reply>>> = Arc::new(Mutex::new(VecDeque::new()));
    let (s, sc) = (seen.clone(), script.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (seen, script, handler) = (s.clone(), sc.clone(), handler.clone());
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else {
                    return;
                };
                seen.lock().unwrap().push(req.clone());
                let forced = script.lock().unwrap().pop_front();
                let reply = forced.unwrap_or_else(|| handler(&req));
                crate::common::http::write_reply(
                    &mut sock,
                    reply.status,
                    &reply.headers,
                    &reply.body,
                )
                .await;
            });
        }
    });
    Fake {
        url: format!("http://{addr}"),
        seen,
        script,
    }
}

fn tg_error(code: u16, desc: &str) -> Reply {
    Reply::json(
        code,
        json!({ "ok": false, "error_code": code, "description": desc }),
    )
}

/// True when every HTML tag in `text` is closed in order and no tag is cut.
pub fn html_balanced(text: &str) -> bool {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(lt) = rest.find('<') {
        let Some(gt) = rest[lt..].find('>') else {
            return false;
        };
        let inner = &rest[lt + 1..lt + gt];
        if let Some(name) = inner.strip_prefix('/') {
            if stack.pop().as_deref() != Some(name.trim()) {
                return false;
            }
        } else {
            stack.push(inner.split_whitespace().next().unwrap_or("").to_string());
        }
        rest = &rest[lt + gt + 1..];
    }
    stack.is_empty()
}

/// Telegram: `POST /bot<token>/sendMessage`; validates `chat_id`, the text's length
/// (1..=4096 UTF-16 units) and, with `parse_mode: HTML`, its tags.
pub async fn telegram(token: &str) -> Fake {
    let path = format!("/bot{token}/sendMessage");
    let next_id = Arc::new(Mutex::new(100u64));
    serve(Arc::new(move |req: &Req| {
        if req.method != "POST" || req.target != path {
            return tg_error(404, "Not Found");
        }
        let b = req.json();
        if b["chat_id"].is_null() {
            return tg_error(400, "Bad Request: chat not found");
        }
        let text = b["text"].as_str().unwrap_or("");
        let units = text.encode_utf16().count();
        if units == 0 {
            return tg_error(400, "Bad Request: message text is empty");
        }
        if units > 4096 {
            return tg_error(400, "Bad Request: message is too long");
        }
        if b["parse_mode"] == "HTML" && !html_balanced(text) {
            return tg_error(
                400,
                "Bad Request: can't parse entities: Can't find end tag corresponding to start tag",
            );
        }
        let mut id = next_id.lock().unwrap();
        *id += 1;
        Reply::json(
            200,
            json!({ "ok": true, "result": { "message_id": *id, "date": 1700000000,
                    "chat": { "id": b["chat_id"], "type": "private" }, "text": text } }),
        )
    }))
    .await
}

pub fn telegram_429(retry_after: u64) -> Reply {
    Reply::json(
        429,
        json!({ "ok": false, "error_code": 429,
                "description": format!("Too Many Requests: retry after {retry_after}"),
                "parameters": { "retry_after": retry_after } }),
    )
}

/// Discord: `POST /api/webhooks/:id/:token`; validates content ≤ 2000, embeds ≤ 10 and their
/// text ≤ 6000, that something is sent; 204, or 200 with a message when `?wait=true`.
pub async fn discord() -> Fake {
    let next_id = Arc::new(Mutex::new(1000u64));
    serve(Arc::new(move |req: &Req| {
        let path = req.target.split('?').next().unwrap_or("");
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if req.method != "POST" || segs.len() != 4 || segs[0] != "api" || segs[1] != "webhooks" {
            return Reply::json(404, json!({ "message": "404: Not Found", "code": 0 }));
        }
        let b = req.json();
        let content = b["content"].as_str().unwrap_or("");
        let embeds = b["embeds"].as_array().cloned().unwrap_or_default();
        if content.is_empty() && embeds.is_empty() {
            return Reply::json(400, json!({ "message": "Cannot send an empty message", "code": 50006 }));
        }
        if content.encode_utf16().count() > 2000 || embeds.len() > 10 {
            return Reply::json(400, json!({ "message": "Invalid Form Body", "code": 50035 }));
        }
        let embed_text: usize = embeds.iter().map(embed_chars).sum();
        if embed_text > 6000 {
            return Reply::json(400, json!({ "message": "Invalid Form Body", "code": 50035 }));
        }
        if req.target.contains("wait=true") {
            let mut id = next_id.lock().unwrap();
            *id += 1;
            Reply::json(200, json!({ "id": id.to_string(), "content": content, "embeds": embeds, "webhook_id": segs[2] }))
        } else {
            Reply::empty(204)
        }
    }))
    .await
}

fn embed_chars(e: &Value) -> usize {
    let s = |v: &Value| v.as_str().map(|t| t.chars().count()).unwrap_or(0);
    s(&e["title"])
        + s(&e["description"])
        + s(&e["footer"]["text"])
        + e["fields"]
            .as_array()
            .map(|f| f.iter().map(|x| s(&x["name"]) + s(&x["value"])).sum())
            .unwrap_or(0)
}

pub fn discord_429(retry_after: f64) -> Reply {
    Reply::json(
        429,
        json!({ "message": "You are being rate limited.", "retry_after": retry_after, "global": false }),
    )
    .with_header("Retry-After", &format!("{}", retry_after.ceil()))
    .with_header("X-RateLimit-Scope", "user")
}

pub fn discord_unknown_webhook() -> Reply {
    Reply::json(404, json!({ "message": "Unknown Webhook", "code": 10015 }))
}

/// Supabase PostgREST: `GET /rest/v1/<table>` with `apikey`; `col=eq.val` filters.
pub async fn supabase(key: &str, table: &str, rows: Vec<Value>) -> Fake {
    let key = key.to_string();
    let path = format!("/rest/v1/{table}");
    serve(Arc::new(move |req: &Req| {
        let (p, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        if req.header("apikey") != Some(key.as_str()) {
            return Reply::json(
                401,
                json!({ "message": "Invalid API key", "hint": "Double check your Supabase `anon` or `service_role` API key." }),
            );
        }
        if p != path {
            return Reply::json(
                404,
                json!({ "code": "42P01", "details": null, "hint": null,
                        "message": format!("relation \"public.{}\" does not exist", p.rsplit('/').next().unwrap_or("")) }),
            );
        }
        let mut out = rows.clone();
        for pair in query.split('&').filter(|s| !s.is_empty()) {
            let Some((col, cond)) = pair.split_once('=') else { continue };
            if col == "select" {
                continue;
            }
            if let Some(v) = cond.strip_prefix("eq.") {
                out.retain(|r| match &r[col] {
                    Value::Bool(b) => b.to_string() == v,
                    Value::String(s) => s == v,
                    Value::Number(n) => n.to_string() == v,
                    _ => false,
                });
            }
        }
        Reply::json(200, Value::Array(out))
    }))
    .await
}
