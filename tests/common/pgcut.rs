//! A TCP proxy in front of PostgreSQL that loses one commit's reply: on the first
//! connection whose client sent a statement containing `marker`, the server's
//! `CommandComplete "COMMIT"` (the transaction is committed) is not passed on; the connection
//! is cut instead, as a network drop or `pg_terminate_backend` right after the commit would.
//! The client cannot tell whether its transaction committed. Speaks the wire protocol only
//! as far as framing server messages (type byte, length); needs `sslmode=disable`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct CommitCut {
    /// `host:port` to put in the URL instead of the server's.
    pub addr: String,
    /// Commits whose reply was dropped (0 or 1).
    pub cuts: Arc<AtomicUsize>,
}

/// Proxies to `upstream` (`host:port`); cuts once, on the first commit of a connection that
/// sent `marker`.
pub fn start(upstream: &str, marker: &'static str) -> CommitCut {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cuts = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(AtomicBool::new(true));
    let (up, c) = (upstream.to_string(), cuts.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
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
            let (armed, cuts) = (armed.clone(), c.clone());
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
    CommitCut { addr, cuts }
}
