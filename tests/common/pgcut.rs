//! A TCP proxy in front of PostgreSQL that loses one commit's reply: on the first
//! connection whose client sent a statement containing `marker`, the server's
//! `CommandComplete "COMMIT"` (the transaction is committed) is not passed on; the connection
//! is cut instead, as a network drop or `pg_terminate_backend` right after the commit would.
//! The client cannot tell whether its transaction committed. Speaks the wire protocol only
//! as far as framing server messages (type byte, length); needs `sslmode=disable`.
//!
//! [`start_then_down`] also keeps the server out of reach after the cut, as a network outage
//! that outlasts the client's reconnect attempts: new connections are closed as soon as they
//! are accepted, until [`CommitCut::reachable_again`].

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct CommitCut {
    /// `host:port` to put in the URL instead of the server's.
    pub addr: String,
    /// Commits whose reply was dropped (0 or 1).
    pub cuts: Arc<AtomicUsize>,
    /// While set, connections are closed as soon as they are accepted.
    unreachable: Arc<AtomicBool>,
}

impl CommitCut {
    /// Ends the outage [`start_then_down`] began: new connections reach the server again.
    pub fn reachable_again(&self) {
        self.unreachable.store(false, Ordering::SeqCst);
    }
}

/// Proxies to `upstream` (`host:port`); cuts once, on the first commit of a connection that
/// sent `marker`.
pub fn start(upstream: &str, marker: &'static str) -> CommitCut {
    proxy(upstream, marker, false)
}

/// Like [`start`], and from the cut on the server cannot be reached through the proxy until
/// [`CommitCut::reachable_again`] is called.
pub fn start_then_down(upstream: &str, marker: &'static str) -> CommitCut {
    proxy(upstream, marker, true)
}

fn proxy(upstream: &str, marker: &'static str, down_after_cut: bool) -> CommitCut {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cuts = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(AtomicBool::new(true));
    let unreachable = Arc::new(AtomicBool::new(false));
    let (up, c, out) = (upstream.to_string(), cuts.clone(), unreachable.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if out.load(Ordering::SeqCst) {
                // Dropped unanswered: the client reads end of stream before the server's
                // first message, as when the network is gone.
                continue;
            }
            let Ok(server) = TcpStream::connect(&up) else {
                continue;
            };
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
                        tail.extend_from_slice(&buf[..n]);
                        if !marked.load(Ordering::SeqCst)
                            && tail.windows(marker.len()).any(|w| w == marker.as_bytes())
                        {
                            marked.store(true, Ordering::SeqCst);
                        }
                        let keep = tail.len().saturating_sub(marker.len());
                        tail.drain(..keep);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
            // Server → client: message by message.
            let (armed, cuts, out) = (armed.clone(), c.clone(), out.clone());
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
            });
        }
    });
    CommitCut {
        addr,
        cuts,
        unreachable,
    }
}
