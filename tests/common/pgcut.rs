//! A TCP proxy in front of PostgreSQL for tests of a network that fails under the client.
//!
//! [`start`] loses one commit's reply: on the first connection whose client sent a statement
//! containing `marker`, the server's `CommandComplete "COMMIT"` (the transaction is committed)
//! is not passed on; the connection is cut instead, as a network drop or
//! `pg_terminate_backend` right after the commit would. The client cannot tell whether its
//! transaction committed. Speaks the wire protocol only as far as framing server messages
//! (type byte, length); needs `sslmode=disable`.
//!
//! [`start_then_down`] also keeps the server out of reach after the cut, as a network outage
//! that outlasts the client's reconnect attempts: new connections are closed as soon as they
//! are accepted, until [`CommitCut::reachable_again`].
//!
//! [`start_plain`] cuts nothing by itself; [`CommitCut::go_down`] begins an outage when the
//! test says so.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub struct CommitCut {
    /// `host:port` to put in the URL instead of the server's.
    pub addr: String,
    /// Commits whose reply was dropped (0 or 1).
    pub cuts: Arc<AtomicUsize>,
    /// While set, connections are closed as soon as they are accepted.
    unreachable: Arc<AtomicBool>,
    /// The client side of each connection passing through, by number.
    live: Live,
}

type Live = Arc<Mutex<HashMap<u64, TcpStream>>>;

/// `host:port` of the server a PostgreSQL URL names: what the proxy passes on to.
pub fn upstream(db_url: &str) -> String {
    let url = url::Url::parse(db_url).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
}

impl CommitCut {
    /// `db_url` going through this proxy instead (plain TCP: the proxy reads the protocol).
    pub fn url_for(&self, db_url: &str) -> String {
        let mut url = url::Url::parse(db_url).unwrap();
        let (host, port) = self.addr.split_once(':').unwrap();
        url.set_host(Some(host)).unwrap();
        url.set_port(Some(port.parse().unwrap())).unwrap();
        url.set_query(Some("sslmode=disable"));
        url.to_string()
    }

    /// Ends the outage [`start_then_down`] or [`CommitCut::go_down`] began: new connections
    /// reach the server again.
    pub fn reachable_again(&self) {
        self.unreachable.store(false, Ordering::SeqCst);
    }

    /// The network goes away: every connection passing through is cut, and new ones are closed
    /// as soon as they are accepted, until [`CommitCut::reachable_again`].
    pub fn go_down(&self) {
        // Under the lock the accept loop registers under, so no connection slips through.
        let mut live = self.live.lock().unwrap();
        self.unreachable.store(true, Ordering::SeqCst);
        for (_, client) in live.drain() {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

/// Proxies to `upstream` (`host:port`); cuts once, on the first commit of a connection that
/// sent `marker`.
pub fn start(upstream: &str, marker: &'static str) -> CommitCut {
    proxy(upstream, Some(marker), false)
}

/// Like [`start`], and from the cut on the server cannot be reached through the proxy until
/// [`CommitCut::reachable_again`] is called.
pub fn start_then_down(upstream: &str, marker: &'static str) -> CommitCut {
    proxy(upstream, Some(marker), true)
}

/// Proxies to `upstream` (`host:port`) and cuts nothing until [`CommitCut::go_down`].
pub fn start_plain(upstream: &str) -> CommitCut {
    proxy(upstream, None, false)
}

fn proxy(upstream: &str, marker: Option<&'static str>, down_after_cut: bool) -> CommitCut {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cuts = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(AtomicBool::new(true));
    let unreachable = Arc::new(AtomicBool::new(false));
    let live: Live = Arc::default();
    let (up, c, out, all) = (
        upstream.to_string(),
        cuts.clone(),
        unreachable.clone(),
        live.clone(),
    );
    std::thread::spawn(move || {
        for (id, client) in (0u64..).zip(listener.incoming()) {
            let Ok(client) = client else { continue };
            if out.load(Ordering::SeqCst) {
                // Dropped unanswered: the client reads end of stream before the server's
                // first message, as when the network is gone.
                continue;
            }
            let Ok(server) = TcpStream::connect(&up) else {
                continue;
            };
            {
                let mut live = all.lock().unwrap();
                // Gone down while the server was being reached: this one is cut too.
                if out.load(Ordering::SeqCst) {
                    continue;
                }
                live.insert(id, client.try_clone().unwrap());
            }
            // Small messages pass at once (no waiting for the peer's delayed ACK).
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let marked = Arc::new(AtomicBool::new(false));
            // Client → server: raw, watching for the marker.
            {
                let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let marked = marked.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(marker) = marker {
                            tail.extend_from_slice(&buf[..n]);
                            if !marked.load(Ordering::SeqCst)
                                && tail.windows(marker.len()).any(|w| w == marker.as_bytes())
                            {
                                marked.store(true, Ordering::SeqCst);
                            }
                            let keep = tail.len().saturating_sub(marker.len());
                            tail.drain(..keep);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
            // Server → client: message by message.
            let (armed, cuts, out, all) = (armed.clone(), c.clone(), out.clone(), all.clone());
            std::thread::spawn(move || {
                let (mut from, mut to) = (server, client);
                loop {
                    let mut head = [0u8; 5];
                    if from.read_exact(&mut head).is_err() {
                        break;
                    }
                    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                    let mut message = head.to_vec();
                    message.resize(1 + len.max(4), 0);
                    if from.read_exact(&mut message[5..]).is_err() {
                        break;
                    }
                    if head[0] == b'C'
                        && &message[5..] == b"COMMIT\0"
                        && marked.load(Ordering::SeqCst)
                        && armed.swap(false, Ordering::SeqCst)
                    {
                        // Out of reach before this connection ends, so the client's first
                        // reconnect already finds the server gone.
                        if down_after_cut {
                            out.store(true, Ordering::SeqCst);
                        }
                        cuts.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    if to.write_all(&message).is_err() {
                        break;
                    }
                }
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                all.lock().unwrap().remove(&id);
            });
        }
    });
    CommitCut {
        addr,
        cuts,
        unreachable,
        live,
    }
}
