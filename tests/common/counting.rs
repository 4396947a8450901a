//! A threaded HTTP fake for the tests that kill or starve the real binary: every request is
//! answered after `latency` and counted by path once its answer was written (a call cut short
//! by a kill did not happen). Telegram's `sendMessage` gets Telegram's reply and, when the
//! message starts with "run <id>:", is counted under `…/sendMessage/<id>`, so a test can tell
//! which run sent what; every other path gets `other_body`. A chat completion (a body with
//! `messages`) is also counted under its path and last message in `prompts`, so a test can
//! tell which step was answered where, and how often.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct CountingFake {
    pub url: String,
    /// The most requests open at the fake at one moment.
    pub peak: Arc<std::sync::atomic::AtomicUsize>,
    pub calls: Arc<Mutex<HashMap<String, usize>>>,
    /// `(path, prompt)` → answers written.
    pub prompts: Arc<Mutex<HashMap<(String, String), usize>>>,
}

pub fn start(latency: Duration, other_body: String) -> CountingFake {
    serve(Hold::For(latency), other_body)
}

/// Holds every request until `n` are open at once, then answers them all (and every later
/// one at once): a client that never has `n` calls in flight together gets no answer, for a
/// minute (then the held ones are answered, and `peak` tells how many there were).
pub fn start_gathering(n: usize, other_body: String) -> CountingFake {
    serve(Hold::Until(n), other_body)
}

#[derive(Clone, Copy)]
enum Hold {
    For(Duration),
    Until(usize),
}

/// Requests open now, and whether the gathering is over.
type Gate = Arc<(Mutex<(usize, bool)>, std::sync::Condvar)>;

fn serve(hold: Hold, other_body: String) -> CountingFake {
    let gate: Gate = Arc::default();
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let prompts = Arc::new(Mutex::new(HashMap::new()));
    let c = calls.clone();
    let pr = prompts.clone();
    let pk = peak.clone();
    let other_body = Arc::new(other_body);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (calls, other_body, prompts) = (c.clone(), other_body.clone(), pr.clone());
            let (gate, peak) = (gate.clone(), pk.clone());
            std::thread::spawn(move || {
                let Some(req) = super::http::read_request_blocking(&mut stream) else {
                    return;
                };
                let mut path = req.target.clone();
                let telegram = path.ends_with("/sendMessage");
                if telegram {
                    let text = req.json()["text"].as_str().unwrap_or_default().to_string();
                    if let Some(run) = text.strip_prefix("run ").and_then(|t| t.split(':').next()) {
                        path = format!("{path}/{run}");
                    }
                }
                let prompt = {
                    let v = req.json();
                    v["messages"]
                        .as_array()
                        .and_then(|m| m.last())
                        .and_then(|last| last["content"].as_str().map(str::to_string))
                };
                {
                    let (open, cv) = &*gate;
                    let mut g = open.lock().unwrap();
                    g.0 += 1;
                    peak.fetch_max(g.0, std::sync::atomic::Ordering::SeqCst);
                    match hold {
                        Hold::For(latency) => {
                            drop(g);
                            std::thread::sleep(latency);
                        }
                        Hold::Until(n) => {
                            if g.0 >= n {
                                g.1 = true;
                                cv.notify_all();
                            }
                            let (g2, _) = cv
                                .wait_timeout_while(g, Duration::from_secs(60), |g| !g.1)
                                .unwrap();
                            drop(g2);
                        }
                    }
                }
                let body = if telegram {
                    r#"{"ok":true,"result":{"message_id":1}}"#
                } else {
                    other_body.as_str()
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let written = stream.write_all(reply.as_bytes()).is_ok();
                gate.0.lock().unwrap().0 -= 1;
                if written {
                    if let Some(p) = prompt {
                        *prompts
                            .lock()
                            .unwrap()
                            .entry((path.clone(), p))
                            .or_insert(0) += 1;
                    }
                    *calls.lock().unwrap().entry(path).or_insert(0) += 1;
                }
            });
        }
    });
    CountingFake {
        url,
        peak,
        calls,
        prompts,
    }
}
