//! The fleet: several `omniflow` processes, on one host or many, sharing one PostgreSQL
//! database (`DATABASE_URL=postgres://…`) as one pool of workers.
//!
//! - **Driver side** ([`dispatch`]): a run's driver keeps its readiness, fan-out, retry
//!   decisions and backoff, but instead of handing an attempt to the local pool it enqueues a
//!   row of `runner_queue` and awaits its result (woken by `NOTIFY omniflow_done`, by this
//!   process when it ran the attempt itself, or by a slow poll).
//! - **Worker side** ([`worker`]): every process claims rows into its local pool's free
//!   workers (`CONCURRENCY`), runs each with its own providers (its Ollama), heartbeats the
//!   leases, and records results with the fenced completion.
//! - **Wake-ups:** one dedicated `LISTEN` connection per process on a plain thread (the
//!   blocking client runs its own runtime), reconnecting when it drops; a slow poll covers
//!   what a dropped connection missed. An idle fleet costs a poll per [`POLL`] per process.
//! - **Fleet-wide rate limits** ([`rates`]): a provider's `*_RATE_LIMIT` is one budget for
//!   every host.
//!
//! With `DATABASE_URL` unset nothing here runs: the engine's local pool path is unchanged.
//! Sandbox runs and replayed steps stay on the process that drives them (they call no real
//! provider, and their simulated model is the run's own).

pub(crate) mod dispatch;
pub(crate) mod requests;
pub(crate) mod worker;

pub(crate) use dispatch::dispatcher;

use crate::config::Config;
use crate::store::pg::events::{Live, EVENTS_CHANNEL, REQUESTS_CHANNEL};
use crate::store::pg::queue::{self, blocking, Outcome, Queue};
use crate::store::pg::PgTarget;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// The slow poll: how often an idle process looks at the queue without being told to (a
/// `NOTIFY` missed while the listening connection was down is found this late at worst).
pub const POLL: Duration = Duration::from_secs(2);

/// The fleet database of this configuration, or `None` (no fleet, the local pool alone) when
/// `DATABASE_URL` is unset or is not a PostgreSQL URL. The one place that decides whether the
/// queue is on.
pub fn target(config: &Config) -> Option<PgTarget> {
    let url = config.database_url.as_deref()?;
    if !crate::store::pg::is_postgres_url(url) {
        return None;
    }
    match PgTarget::parse(url) {
        Ok(t) => Some(t.with_pool_size(crate::store::pg::connect::pool_size(config.concurrency))),
        Err(e) => {
            // The message never holds the password (see `PgTarget::parse`).
            tracing::error!(error = %e, "fleet: DATABASE_URL cannot be used; this process runs its steps locally");
            None
        }
    }
}

/// Resolves once every history write this process queued so far is committed (at once when
/// the engine is gone). A queue row is inserted, and a result handed back, only after the
/// history writes that precede it: another process acts on the row at once, and its own
/// writes about the step (`step_started` on the worker, `step_finished` on the driver) must
/// find the step in the state they expect, not race this process's writer.
async fn history_committed(engine: &std::sync::Weak<crate::engine::Inner>) {
    let store = engine.upgrade().map(|inner| inner.store.clone());
    if let Some(store) = store {
        store.flush().await;
    }
}

/// A row whose attempt this process runs: its token (for the fenced completion) and what
/// stops it when the lease is lost.
struct Held {
    token: String,
    cancel: CancellationToken,
}

/// An attempt to enqueue, and where its row id (with its result's receiver) goes.
pub(crate) struct Enqueue {
    job: queue::NewJob,
    reply: oneshot::Sender<Result<(i64, oneshot::Receiver<Outcome>), String>>,
}

/// The most rows one transaction inserts (steps sent together) or completes (results that
/// came together): a whole pool's fan-out in one round trip, and still a statement of
/// bounded size.
const MAX_BATCH: usize = 1000;

/// `first` and the items already waiting behind it, up to `max` in all: what came together
/// goes in one transaction, and nothing waits for more to come.
fn batch_from<T>(first: T, rx: &mut mpsc::UnboundedReceiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(x) => batch.push(x),
            Err(_) => break,
        }
    }
    batch
}

/// What this process did through the shared queue, since it started (`/metrics`).
#[derive(Default)]
pub(crate) struct Counters {
    /// Rows its runs put in the queue.
    pub enqueued: AtomicU64,
    /// Rows its workers took: claimed from the queue, or at their insert.
    pub claimed: AtomicU64,
    /// Results its workers recorded.
    pub completed: AtomicU64,
    /// Results dropped because the lease was lost first (a zombie's late answer).
    pub fenced: AtomicU64,
}

/// A reading of a process's fleet counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounts {
    pub enqueued: u64,
    pub claimed: u64,
    pub completed: u64,
    pub fenced: u64,
}

impl Counters {
    pub(crate) fn read(&self) -> FleetCounts {
        FleetCounts {
            enqueued: self.enqueued.load(Ordering::Relaxed),
            claimed: self.claimed.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
        }
    }
}

/// One process's membership in the fleet.
pub(crate) struct Fleet {
    queue: Queue,
    /// `locked_by` of the rows this process claims: `host:pid:start`, as in
    /// `runner_processes`.
    worker_id: String,
    tags: Vec<String>,
    lease: Duration,
    max_rescues: u32,
    /// Drivers waiting for rows to finish.
    waiters: Mutex<HashMap<i64, oneshot::Sender<Outcome>>>,
    /// Rows this process claimed and is running.
    held: Mutex<HashMap<i64, Held>>,
    /// Rows whose results this process is writing: their completion hands this process's
    /// drivers their results itself, so its own `NOTIFY omniflow_done` wakes no one here.
    completing: Mutex<std::collections::HashSet<i64>>,
    /// Rows whose results drivers here took, to delete once no completion is being written.
    to_forget: Mutex<Vec<i64>>,
    /// Something finished (a `NOTIFY omniflow_done`, a local completion): look for results.
    results_wake: Notify,
    /// Rows may be claimable (a `NOTIFY omniflow_jobs`, a reconnect).
    jobs_wake: Notify,
    /// A local worker freed up: claim again.
    slot_freed: Notify,
    /// A console asked something of a run's driver (`NOTIFY omniflow_requests`).
    requests_wake: Notify,
    enqueue_tx: mpsc::UnboundedSender<Enqueue>,
    complete_tx: mpsc::UnboundedSender<(i64, String, serde_json::Value)>,
    receivers: Mutex<Option<Receivers>>,
    stop: CancellationToken,
    listener_stop: Arc<AtomicBool>,
    /// A console's subscription to the fleet's announcements of changed runs, heard on this
    /// process's one `LISTEN` connection (only a console asks: a daemon would discard them).
    events: Mutex<Option<std::sync::mpsc::Sender<Live>>>,
    /// Set once a console subscribed: the listener adds `EVENTS_CHANNEL`.
    events_on: Arc<AtomicBool>,
    /// The queue's tables exist (claims and sweeps wait for them).
    ready: AtomicBool,
    /// Set when the process stops: no more claims.
    closing: AtomicBool,
    /// Held by the claimer from a claim until its rows are in `held`, so [`Fleet::finish`]
    /// cannot miss rows a claim in flight brings back.
    claiming: tokio::sync::Mutex<()>,
    /// Results sent to the completer and not yet written, and taken results whose rows are
    /// not yet deleted (a stopping process waits for both).
    pending: std::sync::atomic::AtomicUsize,
    pub(crate) counters: Counters,
}

struct Receivers {
    enqueue: mpsc::UnboundedReceiver<Enqueue>,
    complete: mpsc::UnboundedReceiver<(i64, String, serde_json::Value)>,
}

/// The engine's hold on its fleet: when the engine goes, every fleet task and the listening
/// thread stop.
pub(crate) struct FleetHandle(pub Arc<Fleet>);

impl Drop for FleetHandle {
    fn drop(&mut self) {
        self.0.stop.cancel();
        self.0.listener_stop.store(true, Ordering::Relaxed);
    }
}

impl Fleet {
    /// The fleet of `config`, if it has one. Connects nothing yet ([`Fleet::start`] does, in
    /// the background, retrying: a database that is down delays steps, it does not stop the
    /// process).
    /// Its statements run on the store's pool when the store is on the same database (as
    /// it is whenever both come from `DATABASE_URL`): one pool per process.
    pub(crate) fn new(config: &Config, store: &crate::store::Store) -> Option<Arc<Fleet>> {
        let target = target(config)?;
        let shared = store
            .pg_pool()
            .filter(|p| p.target().shown() == target.shown());
        let queue = match shared {
            Some(pool) => Queue::on(pool),
            None => match Queue::new(&target, target.pool_size()) {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!(error = %e, "fleet: cannot use DATABASE_URL; this process runs its steps locally");
                    return None;
                }
            },
        };
        Some(Fleet::on_queue(
            queue,
            crate::store::process_id().to_string(),
            config.tags.clone(),
            config.lease_timeout,
            config.max_takeovers,
        ))
    }

    /// A fleet on `queue`, its tasks not started.
    fn on_queue(
        queue: Queue,
        worker_id: String,
        tags: Vec<String>,
        lease: Duration,
        max_rescues: u32,
    ) -> Arc<Fleet> {
        let (enqueue_tx, enqueue) = mpsc::unbounded_channel();
        let (complete_tx, complete) = mpsc::unbounded_channel();
        Arc::new(Fleet {
            queue,
            worker_id,
            tags,
            lease,
            max_rescues,
            waiters: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            completing: Mutex::new(std::collections::HashSet::new()),
            to_forget: Mutex::new(Vec::new()),
            results_wake: Notify::new(),
            jobs_wake: Notify::new(),
            slot_freed: Notify::new(),
            requests_wake: Notify::new(),
            enqueue_tx,
            complete_tx,
            receivers: Mutex::new(Some(Receivers { enqueue, complete })),
            stop: CancellationToken::new(),
            listener_stop: Arc::new(AtomicBool::new(false)),
            events: Mutex::new(None),
            events_on: Arc::new(AtomicBool::new(false)),
            ready: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            claiming: tokio::sync::Mutex::new(()),
            pending: std::sync::atomic::AtomicUsize::new(0),
            counters: Counters::default(),
        })
    }

    /// Starts the fleet's tasks on the current tokio runtime and its listening thread; the
    /// claimer runs attempts on `engine`'s pool for as long as the engine lives.
    pub(crate) fn start(self: &Arc<Self>, engine: std::sync::Weak<crate::engine::Inner>) {
        let Some(rx) = lock(&self.receivers).take() else {
            return; // started already
        };
        let tags = if self.tags.is_empty() {
            "none (untagged steps only)".to_string()
        } else {
            self.tags.join(",")
        };
        tracing::info!(database = %self.queue.target().shown(), worker = %self.worker_id, tags = %tags, "fleet: steps go through the shared queue");
        self.spawn_listener();
        tokio::spawn(dispatch::schema_then_enqueue(
            self.clone(),
            engine.clone(),
            rx.enqueue,
        ));
        tokio::spawn(dispatch::collector(self.clone()));
        tokio::spawn(worker::completer(self.clone(), engine.clone(), rx.complete));
        tokio::spawn(worker::claimer(self.clone(), engine.clone()));
        tokio::spawn(worker::heartbeats(self.clone()));
        tokio::spawn(worker::sweeper(self.clone()));
        tokio::spawn(requests::watcher(self.clone(), engine));
    }

    /// The fleet's announcements of runs other processes changed, from now on (a console
    /// follows them), on the process's `LISTEN` connection rather than one more of its own.
    /// [`Live::Connected`] comes first once the connection listens to them.
    pub(crate) fn follow_events(&self) -> std::sync::mpsc::Receiver<Live> {
        let (tx, rx) = std::sync::mpsc::channel();
        *lock(&self.events) = Some(tx);
        self.events_on.store(true, Ordering::Relaxed);
        rx
    }

    /// Hands `live` to the subscribed console, if any (one that went away unsubscribes).
    fn tell_console(&self, live: Live) {
        let mut events = lock(&self.events);
        if events.as_ref().is_some_and(|tx| tx.send(live).is_err()) {
            *events = None;
        }
    }

    fn spawn_listener(self: &Arc<Self>) {
        let target = self.queue.target().clone();
        let stop = self.listener_stop.clone();
        let events_on = self.events_on.clone();
        let me = crate::store::process_id().to_string();
        // Weak: the thread must not keep the fleet alive.
        let fleet = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("fleet-listen".into())
            .spawn(move || {
                let mut lost_once = false;
                // Whether the channels last asked for (those the connection listens to when it
                // says it is connected) include the console's.
                let asked_events = std::cell::Cell::new(false);
                let channels = || {
                    let mut c: Vec<String> = [queue::JOBS_CHANNEL, queue::DONE_CHANNEL, REQUESTS_CHANNEL]
                        .iter()
                        .map(|c| c.to_string())
                        .collect();
                    let events = events_on.load(Ordering::Relaxed);
                    asked_events.set(events);
                    if events {
                        c.push(EVENTS_CHANNEL.to_string());
                    }
                    c
                };
                crate::store::pg::listen::listen_growing(
                    &target,
                    &channels,
                    Duration::from_millis(250),
                    Duration::from_secs(1),
                    &|| stop.load(Ordering::Relaxed),
                    &mut |heard| {
                        let Some(f) = fleet.upgrade() else { return };
                        match heard {
                            queue::Heard::Notice(n) => match Channel::of(&n.channel) {
                                Channel::Done => {
                                    if f.awaits_elsewhere(&n.payload) {
                                        f.results_wake.notify_one()
                                    }
                                }
                                Channel::Requests => f.requests_wake.notify_one(),
                                Channel::Events => {
                                    if let Some(live) =
                                        crate::store::pg::events::heard_runs(&n.payload, &me)
                                    {
                                        f.tell_console(live);
                                    }
                                }
                                Channel::Jobs => f.jobs_wake.notify_one(),
                            },
                            queue::Heard::Connected => {
                                if lost_once {
                                    tracing::info!("fleet: listening again");
                                }
                                f.jobs_wake.notify_one();
                                f.results_wake.notify_one();
                                f.requests_wake.notify_one();
                                if asked_events.get() {
                                    f.tell_console(Live::Connected);
                                }
                            }
                            queue::Heard::Lost(e) => {
                                // Said once per outage, not once per retry.
                                if !lost_once {
                                    tracing::warn!(error = %e, "fleet: lost the listening connection; polling every 2 s until it is back");
                                }
                                lost_once = true;
                                f.tell_console(Live::Lost(e));
                            }
                        }
                    },
                )
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "fleet: cannot start the listening thread; polling only");
        }
    }

    /// Whether a finished row (`NOTIFY omniflow_done`, payload its id) is one a driver here
    /// waits for and this process's completer does not hand over itself. A payload that is
    /// not an id wakes the collector, as before.
    fn awaits_elsewhere(&self, payload: &str) -> bool {
        let Ok(id) = payload.parse::<i64>() else {
            return true;
        };
        lock(&self.waiters).contains_key(&id) && !lock(&self.completing).contains(&id)
    }

    /// Before the process exits: the results of finished attempts are written, and the rows
    /// of attempts still running here go back to the queue at once (not when their lease
    /// runs out), their attempts stopped. Waits at most a few seconds.
    pub(crate) async fn finish(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // A claim in flight lands its rows in `held` first.
        let _no_claims = self.claiming.lock().await;
        let held: Vec<(i64, Held)> = lock(&self.held).drain().collect();
        for (id, h) in held {
            h.cancel.cancel();
            let q = self.queue.clone();
            match blocking(move || q.release(id, &h.token)).await {
                Ok(true) => {
                    tracing::info!(row = id, "fleet: gave a step back to the queue (stopping)")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, row = id, "fleet: cannot give a step back; it returns to the queue when its lease expires")
                }
            }
        }
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while self.pending.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Taken rows whose delete was put off while completions were being written go now,
        // rather than waiting for the sweep once their run has ended.
        let taken = std::mem::take(&mut *lock(&self.to_forget));
        if !taken.is_empty() {
            let q = self.queue.clone();
            if let Err(e) = blocking(move || q.forget(&taken)).await {
                tracing::debug!(error = %e, "fleet: taken rows are left for the sweep");
            }
        }
    }

    pub(crate) fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Moves the run's queued attempts in the shared queue too (in the background: the
    /// console's key press does not wait for the database).
    pub(crate) fn set_run_priority(&self, run_id: &str, priority: crate::blueprint::Priority) {
        let (q, run) = (self.queue.clone(), run_id.to_string());
        let p = u8::try_from(priority.index()).unwrap_or(1);
        // A plain thread: callers may be on the runtime or not.
        let _ = std::thread::Builder::new()
            .name("fleet-priority".into())
            .spawn(move || {
                if let Err(e) = q.set_run_priority(&run, p) {
                    tracing::warn!(error = %e, "fleet: cannot change the priority of queued steps");
                }
            });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only short, non-panicking sections hold these locks.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a notification the fleet listens for is about, by its channel.
#[derive(Debug, PartialEq, Eq)]
enum Channel {
    /// A row finished: a driver here may wait for its result.
    Done,
    /// A console asked a run's driver to cancel it or change its priority.
    Requests,
    /// A batch of history writes changed some runs (for a subscribed console).
    Events,
    /// Rows became claimable. Anything else heard wakes the claimer too: a look at the
    /// queue too many costs one claim, a wake-up missed costs a poll's wait.
    Jobs,
}

impl Channel {
    fn of(channel: &str) -> Channel {
        match channel {
            queue::DONE_CHANNEL => Channel::Done,
            REQUESTS_CHANNEL => Channel::Requests,
            EVENTS_CHANNEL => Channel::Events,
            _ => Channel::Jobs,
        }
    }
}

#[cfg(test)]
mod tests;
