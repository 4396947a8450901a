//! Reading one HTTP/1.1 request off a socket, for every fake server the tests start (model
//! providers, Telegram, Discord, PostgREST, scripted replies): the head, then exactly
//! `Content-Length` bytes of body.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as a fake saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
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

/// The next request on `sock`; `None` when the client closed or sent something that is not
/// a request.
pub async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if let Some(done) = grown(&mut buf, &chunk[..n]) {
            return done;
        }
    }
}

/// [`read_request`] for the fakes that serve each connection on a plain thread.
pub fn read_request_blocking(sock: &mut std::net::TcpStream) -> Option<Request> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = sock.read(&mut chunk).ok()?;
        if let Some(done) = grown(&mut buf, &chunk[..n]) {
            return done;
        }
    }
}

/// Adds what a read returned to `buf`: `Some` once the request is whole, or can never be
/// (the client closed, or it is not a request); `None` while more is to come.
fn grown(buf: &mut Vec<u8>, read: &[u8]) -> Option<Option<Request>> {
    if read.is_empty() {
        return Some(None);
    }
    buf.extend_from_slice(read);
    match parse(buf) {
        Parsed::Incomplete => None,
        Parsed::Bad => Some(None),
        Parsed::Whole(r) => Some(Some(r)),
    }
}

enum Parsed {
    /// The head or the body is not all there yet.
    Incomplete,
    /// Not a request line.
    Bad,
    Whole(Request),
}

/// The request in `buf` once its head and `Content-Length` bytes of body have arrived.
fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parsed::Incomplete;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target)) = (first.next(), first.next()) else {
        return Parsed::Bad;
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if buf.len() < end + 4 + len {
        return Parsed::Incomplete;
    }
    Parsed::Whole(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string(),
    })
}

/// Answers with a whole body (`Content-Length`) and closes the connection.
pub async fn write_reply(
    sock: &mut tokio::net::TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &str,
) {
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    let _ = sock.write_all(out.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// Sends `raw` on a new blocking connection and reads the reply to its end (the request asks
/// for `Connection: close`): (status, body), or `None` when nothing (or no status line)
/// answers within `patience`.
pub fn exchange(
    addr: std::net::SocketAddr,
    raw: &[u8],
    patience: std::time::Duration,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, patience).ok()?;
    s.set_read_timeout(Some(patience)).ok()?;
    s.write_all(raw).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
