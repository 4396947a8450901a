//! The listener: HTTP/1.1 through hyper (already built for reqwest; only its server half is
//! added), three read-only paths, and bounds on everything a client controls.
//!
//! - At most [`MAX_CONNECTIONS`] connections at once; more are closed at once.
//! - Headers must arrive within [`HEADER_TIMEOUT`] and fit [`MAX_HEADER_BYTES`] (hyper answers
//!   431 past it) in at most [`MAX_HEADERS`] lines; a whole connection lives at most
//!   [`CONNECTION_TIMEOUT`]; one request per connection (no keep-alive), so a slow client
//!   holds one slot for a bounded time.
//! - Only `GET` and `HEAD` of `/metrics`, `/healthz`, `/readyz`; anything else is 404 or 405.
//!   No file is ever read, so a path with `..` is just an unknown path.
//! - With `OMNIFLOW_METRICS_TOKEN`, `/metrics` needs `Authorization: Bearer <token>`, compared
//!   in constant time. The health paths stay open so uptime checkers and probes without
//!   headers work; their bodies carry nothing secret.

use super::health;
use super::registry::Metrics;
use crate::engine::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, request and answer included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Read buffer, and so the largest request head (hyper's minimum).
pub const MAX_HEADER_BYTES: usize = 8192;
/// Most header lines in one request.
pub const MAX_HEADERS: usize = 32;

pub(crate) struct State {
    pub engine: Engine,
    pub metrics: Metrics,
    pub token: Option<String>,
    pub sandbox: bool,
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, body: &serde_json::Value) -> Answer {
    let mut text = body.to_string();
    text.push('\n');
    answer(status, "application/json", text)
}

fn verdict(v: health::Verdict) -> Answer {
    let status = if v.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &v.body)
}

/// True when the request carries the bearer token (or none is required).
fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    use subtle::ConstantTimeEq;
    let Some(token) = &state.token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.trim().as_bytes().ct_eq(token.as_bytes()).into()
}

/// Answers one request. Never panics on input: every branch builds a fixed-shape answer.
pub(crate) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Answer {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({ "error": "only GET and HEAD are served" }),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            if !authorized(&state, &req) {
                let mut r = json(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({ "error": "this listener needs Authorization: Bearer <OMNIFLOW_METRICS_TOKEN>" }),
                );
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
                return r;
            }
            answer(
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                state.metrics.render(),
            )
        }
        "/healthz" => verdict(health::liveness(&state.engine, SystemTime::now())),
        "/readyz" => verdict(health::readiness(&state.engine, state.sandbox).await),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": "not found", "paths": ["/metrics", "/healthz", "/readyz"] }),
        ),
    }
}

/// Accepts connections until `stop`.
pub(crate) async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "metrics: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Every slot is taken (slow or hostile clients): refuse rather than queue.
            drop(stream);
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .max_headers(MAX_HEADERS)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
            }
            drop(slot);
        });
    }
}
