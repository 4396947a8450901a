//! A per-provider cap on model calls in flight (`OPENAI_CONCURRENCY`, `OLLAMA_CONCURRENCY`,
//! `HF_CONCURRENCY`). A local server has a fixed number of slots (llama-server's `-np`):
//! calls beyond them queue inside the server, where nobody sees them and where the attempt
//! timeout counts the queueing. With the cap, the surplus waits in OmniFlow instead, before
//! the pool (the engine publishes `StepWaitingSlot`), holding no worker.
//!
//! When the OpenAI-compatible server's cap is not configured, the server is asked once:
//! llama-server's `GET /props` answers `total_slots`. An answer without it (another server)
//! means no cap; no answer at all (down, loading) leaves the question open for the next call.

use super::{wire, Link};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long the slot question waits for `/props`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// After a `/props` request that got no answer, calls go uncapped this long before asking again.
const PROBE_BACKOFF: Duration = Duration::from_secs(2);

/// Where a provider's cap comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotSource {
    /// The `*_CONCURRENCY` variable.
    Configured,
    /// llama-server's `GET /props` `total_slots`.
    ServerProps,
}

/// A provider's cap on calls in flight.
#[derive(Debug, Clone)]
pub struct SlotLimit {
    pub limit: usize,
    pub source: SlotSource,
    sem: Arc<Semaphore>,
}

impl SlotLimit {
    fn new(limit: usize, source: SlotSource) -> SlotLimit {
        SlotLimit {
            limit,
            source,
            sem: Arc::new(Semaphore::new(limit)),
        }
    }

    /// A slot now, if one is free.
    pub fn try_take(&self) -> Option<Slot> {
        self.sem.clone().try_acquire_owned().ok().map(Slot)
    }

    /// Waits for a free slot (`None` only if the cap were torn down: the call goes uncapped).
    pub async fn take(&self) -> Option<Slot> {
        self.sem.clone().acquire_owned().await.ok().map(Slot)
    }

    /// Calls in flight now.
    pub fn in_use(&self) -> usize {
        self.limit.saturating_sub(self.sem.available_permits())
    }
}

/// A call's place among its provider's calls in flight; given back when dropped (the call
/// ended, timed out or was cancelled).
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

#[derive(Debug)]
enum Known {
    /// Not decided yet (the server is to be asked); `Some` = when the last question failed.
    Open(Option<Instant>),
    Decided(Option<SlotLimit>),
}

/// One provider's cap, decided once.
#[derive(Debug)]
pub(crate) struct Slots {
    known: Mutex<Known>,
    /// Serialises the `/props` question, so a fan-out asks once, not forty times.
    asking: tokio::sync::Mutex<()>,
}

impl Slots {
    /// `configured` as in `Config` (`Some(0)` = unlimited); `ask_server`: whether an unset cap
    /// is asked of the server.
    pub fn new(configured: Option<usize>, ask_server: bool) -> Slots {
        let known = match configured {
            Some(0) => Known::Decided(None),
            Some(n) => Known::Decided(Some(SlotLimit::new(n, SlotSource::Configured))),
            None if ask_server => Known::Open(None),
            None => Known::Decided(None),
        };
        Slots {
            known: Mutex::new(known),
            asking: tokio::sync::Mutex::new(()),
        }
    }

    fn decided(&self) -> Result<Option<SlotLimit>, Option<Instant>> {
        let k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match &*k {
            Known::Decided(l) => Ok(l.clone()),
            Known::Open(failed) => Err(*failed),
        }
    }

    fn decide(&self, limit: Option<SlotLimit>) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Known::Decided(limit);
    }

    fn failed(&self) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Known::Open(Some(Instant::now()));
    }

    /// The cap, asking `props_url` when it is still open. `None`: no cap (for now).
    pub async fn limit(
        &self,
        http: &reqwest::Client,
        link: Link,
        props_url: Option<&str>,
        bearer: Option<&str>,
    ) -> Option<SlotLimit> {
        let recent = |failed: Option<Instant>| failed.is_some_and(|t| t.elapsed() < PROBE_BACKOFF);
        match self.decided() {
            Ok(l) => return l,
            Err(failed) if recent(failed) => return None,
            Err(_) => {}
        }
        let url = props_url?;
        let _one = self.asking.lock().await;
        match self.decided() {
            Ok(l) => return l,
            Err(failed) if recent(failed) => return None,
            Err(_) => {}
        }
        match tokio::time::timeout(PROBE_TIMEOUT, total_slots(http, link, url, bearer)).await {
            Ok(Ok(n)) => {
                let limit = n.map(|n| SlotLimit::new(n, SlotSource::ServerProps));
                if let Some(l) = &limit {
                    tracing::info!(
                        provider = link.as_str(),
                        slots = l.limit,
                        "the server has {} slots: at most that many calls in flight (set {} to change)",
                        l.limit,
                        concurrency_var(link)
                    );
                }
                self.decide(limit.clone());
                limit
            }
            Ok(Err(())) | Err(_) => {
                self.failed();
                None
            }
        }
    }
}

/// The variable that sets a provider's cap.
pub fn concurrency_var(link: Link) -> &'static str {
    match link {
        Link::Ollama => "OLLAMA_CONCURRENCY",
        Link::HuggingFace | Link::HfInference => "HF_CONCURRENCY",
        Link::OpenAi => "OPENAI_CONCURRENCY",
    }
}

/// `{base}/props` for an OpenAI-compatible base URL (`http://h:8080/v1` → `http://h:8080/props`).
pub fn props_url(base: &str) -> String {
    let b = base.trim().trim_end_matches('/');
    let b = b.strip_suffix("/chat/completions").unwrap_or(b);
    let b = b.strip_suffix("/v1").unwrap_or(b);
    format!("{b}/props")
}

/// `GET /props` → `Ok(Some(total_slots))`; `Ok(None)` when the server answered but has no such
/// field (not llama-server: 404, or JSON without it); `Err` when it did not answer (down,
/// loading, a server error), so the question stays open.
async fn total_slots(
    http: &reqwest::Client,
    link: Link,
    url: &str,
    bearer: Option<&str>,
) -> Result<Option<usize>, ()> {
    let mut rb = http.get(url);
    if let Some(t) = bearer {
        rb = rb.bearer_auth(t);
    }
    let reply = wire::send(rb, link, url).await.map_err(|_| ())?;
    if reply.status >= 500 || reply.status == 429 {
        return Err(());
    }
    if !reply.is_success() {
        return Ok(None);
    }
    let text = reply.text(link, url).await.map_err(|_| ())?;
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    Ok(v.get("total_slots")
        .and_then(serde_json::Value::as_u64)
        .filter(|n| *n > 0)
        .and_then(|n| usize::try_from(n).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log line that reports a server's slot count tells the user which variable changes
    /// the cap: it must be the one the configuration reads for that provider.
    #[test]
    fn the_variable_named_for_the_cap_is_the_one_read() {
        type Field = fn(&crate::config::Config) -> Option<usize>;
        let cases: [(Link, Field); 4] = [
            (Link::Ollama, |c| c.ollama_concurrency),
            (Link::HuggingFace, |c| c.hf_concurrency),
            (Link::HfInference, |c| c.hf_concurrency),
            (Link::OpenAi, |c| c.openai_concurrency),
        ];
        for (link, field) in cases {
            let vars = std::collections::HashMap::from([(
                concurrency_var(link).to_string(),
                "3".to_string(),
            )]);
            let config = crate::config::Config::from_vars(&vars).unwrap();
            assert_eq!(field(&config), Some(3), "{link:?}");
        }
    }

    #[test]
    fn props_sits_beside_v1() {
        assert_eq!(props_url("http://h:8080/v1"), "http://h:8080/props");
        assert_eq!(props_url("http://h:8080/v1/"), "http://h:8080/props");
        assert_eq!(props_url("http://h:8080"), "http://h:8080/props");
        assert_eq!(props_url("http://h/v1/chat/completions"), "http://h/props");
    }

    #[tokio::test]
    async fn a_configured_cap_holds_and_gives_back() {
        let s = Slots::new(Some(2), true);
        let http = reqwest::Client::new();
        let l = s.limit(&http, Link::OpenAi, None, None).await.unwrap();
        assert_eq!((l.limit, l.source), (2, SlotSource::Configured));
        let a = l.try_take().unwrap();
        let _b = l.try_take().unwrap();
        assert!(l.try_take().is_none());
        assert_eq!(l.in_use(), 2);
        drop(a);
        assert!(l.try_take().is_some());
        assert!(Slots::new(Some(0), true)
            .limit(&http, Link::OpenAi, None, None)
            .await
            .is_none());
        assert!(Slots::new(None, false)
            .limit(&http, Link::Ollama, Some("http://127.0.0.1:9/props"), None)
            .await
            .is_none());
    }

    /// A server whose `/props` fails is asked once, not once per call: calls that waited for
    /// that answer, and calls soon after it, go ahead without a cap rather than ask again.
    #[tokio::test]
    async fn a_failing_props_is_asked_once_by_calls_together() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/props", listener.local_addr().unwrap());
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
        });
        let s = Slots::new(None, true);
        let http = reqwest::Client::new();
        let ask = || s.limit(&http, Link::OpenAi, Some(&url), None);
        let (a, b, c, d) = tokio::join!(ask(), ask(), ask(), ask());
        assert!([a, b, c, d].iter().all(Option::is_none));
        assert!(ask().await.is_none());
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
