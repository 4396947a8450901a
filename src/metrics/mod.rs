//! `--listen` / `OMNIFLOW_LISTEN`: Prometheus metrics, `/healthz` and `/readyz` for one process.
//!
//! - **Counting is additive.** A recorder task subscribes to the event bus and moves the
//!   counters ([`registry::Counters::record`]); what the bus does not carry (notifications,
//!   schedule slots, store batches) comes from [`crate::telemetry`]; the pool, workers, memory
//!   and loops are read at scrape time. Nothing in the engine waits on a scrape: the recorder
//!   is one more bus subscriber (publishing never waits), and a scrape only takes the pool's
//!   lock for one `stats()` copy.
//! - **Fleet.** Each process serves its own series, labelled `host` and `role` (`daemon`,
//!   `console`), so a Prometheus scraping every process adds them up correctly.
//! - **Safety.** Loopback unless an address is written out; optional bearer token; no label or
//!   body carries a run id, an item value, a prompt, an output or a secret.
//! - The HTTP side is in [`http`] (hyper, bounded), the health logic in [`health`].

pub mod health;
pub mod http;
mod registry;

use crate::engine::Engine;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What to serve, and how.
#[derive(Clone)]
pub struct Options {
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer …` for `/metrics` when set.
    pub token: Option<String>,
    /// The process runs blueprints in the sandbox: the simulated model counts as a provider
    /// for readiness.
    pub sandbox: bool,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("sandbox", &self.sandbox)
            .finish()
    }
}

/// The running listener and recorder; both stop when this is stopped or dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MetricsServer {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and waits for the tasks.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// This process's host name, as in `runner_processes.id` (`host:pid:start`).
pub fn host() -> String {
    let id = crate::store::process_id();
    id.split(':').next().unwrap_or("localhost").to_string()
}

/// Binds `opts.listen`, subscribes to the engine's events and serves until stopped. Call it
/// after [`Engine::set_role`] (the `role` label) and before runs start (so they are counted).
/// Fails with a message naming the address and the setting when it cannot bind.
pub async fn serve(engine: &Engine, opts: Options) -> Result<MetricsServer, String> {
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} for /metrics: {e} (pick another address with --listen or OMNIFLOW_LISTEN)",
                opts.listen
            )
        })?;
    let addr = listener.local_addr().unwrap_or(opts.listen);
    let metrics = registry::Metrics::new(engine.clone(), &host(), engine.role().as_str());
    let counters = metrics.counters.clone();
    let dropped = metrics.dropped.clone();
    let stop = CancellationToken::new();
    let sub = engine.bus().subscribe();
    let recorder = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = sub.recv() => ev,
                };
                let Some(ev) = ev else { break };
                counters.record(&ev);
                dropped.0.store(sub.dropped(), Ordering::Relaxed);
            }
        })
    };
    if !addr.ip().is_loopback() && opts.token.is_none() {
        tracing::warn!(addr = %addr, "metrics: listening beyond loopback without OMNIFLOW_METRICS_TOKEN; anyone who reaches this address can read /metrics");
    }
    let state = Arc::new(http::State {
        engine: engine.clone(),
        metrics,
        token: opts.token,
        sandbox: opts.sandbox,
    });
    let server = tokio::spawn(http::accept_loop(listener, state, stop.clone()));
    tracing::info!(
        addr = %addr,
        "metrics: serving /metrics, /healthz and /readyz on http://{addr}"
    );
    Ok(MetricsServer {
        addr,
        stop,
        tasks: vec![recorder, server],
    })
}
