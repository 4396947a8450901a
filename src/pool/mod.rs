//! The priority pool: one per process, shared by every run in it.
//!
//! - `concurrency` worker tasks on tokio, each taking one job at a time, so at most
//!   `concurrency` jobs (step attempts) are in flight.
//! - Four FIFO queues, critical > high > normal > low. A job that has waited `aging` climbs one
//!   level per `aging` interval, so low work is never starved by a stream of urgent work: after
//!   at most 3 × `aging` it competes as critical and, being older, goes first.
//! - Pause/resume and a memory hold stop workers from *taking* jobs; jobs in flight go on.
//! - Per-worker state and queue depth are readable at any time ([`Pool::workers`],
//!   [`Pool::stats`]) and published on the event bus (worker busy/idle per job, stats coalesced
//!   to at most one event per [`STATS_INTERVAL`]).
//!
//! A job is any future; its result comes back through [`Pool::submit`]'s future. A job whose
//! cancellation token fires while it is queued is dropped unstarted; the submitter then sees
//! [`PoolError::Dropped`].

mod queue;

use crate::blueprint::Priority;
use crate::events::{Event, EventBus, PoolStats};
use futures_util::FutureExt;
use queue::{PriorityQueue, Queued};
use serde::Serialize;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// How often at most a [`Event::Pool`] is published.
pub const STATS_INTERVAL: Duration = Duration::from_millis(100);

/// What a job is, for the workers pane and the events.
#[derive(Debug, Clone)]
pub struct JobMeta {
    pub run_id: Arc<str>,
    /// Step key, e.g. `summarize[3]`.
    pub step: Arc<str>,
    pub attempt: u32,
    pub priority: Priority,
}

/// One worker's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerState {
    pub id: usize,
    /// `None` when idle.
    pub job: Option<WorkerJob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerJob {
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    pub priority: Priority,
    /// When the worker took the job.
    #[serde(with = "humantime_serde_compat")]
    pub since: SystemTime,
}

mod humantime_serde_compat {
    use serde::Serializer;
    use std::time::SystemTime;
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The job was dropped before it finished: cancelled while queued, the pool shut down,
    /// or the job panicked.
    #[error("the job was dropped before it finished (cancelled, shut down, or it panicked)")]
    Dropped,
}

/// Settings of a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub concurrency: usize,
    /// A queued job climbs one priority level per `aging` of waiting.
    pub aging: Duration,
}

/// Workers when `CONCURRENCY` is not set: the original ran 25–40 agents at once, and a
/// 40-way fan-out should take one round, not two.
pub const DEFAULT_CONCURRENCY: usize = 40;

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            concurrency: DEFAULT_CONCURRENCY,
            aging: Duration::from_secs(10),
        }
    }
}

type BoxJob = Pin<Box<dyn Future<Output = ()> + Send>>;

struct State {
    queue: PriorityQueue<Item>,
    paused: bool,
    memory_hold: bool,
    /// The history cannot be saved (disk full): no new job at all until it can.
    store_hold: Option<String>,
    shutdown: bool,
    running: usize,
    completed: u64,
    failed: u64,
    workers: Vec<WorkerState>,
}

struct Item {
    meta: JobMeta,
    cancel: CancellationToken,
    job: BoxJob,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
    bus: EventBus,
    concurrency: usize,
    aging: Duration,
    stats_dirty: std::sync::atomic::AtomicBool,
    stop: CancellationToken,
}

/// The process's pool; cheap to clone. When the last clone is dropped the workers stop.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
    _owner: Arc<Owner>,
}

/// Held only by `Pool` handles (workers hold `Inner`), so its drop means "no handle left".
struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl Pool {
    /// Starts the workers on the current tokio runtime.
    pub fn new(options: PoolOptions, bus: EventBus) -> Pool {
        let concurrency = options.concurrency.max(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                queue: PriorityQueue::new(),
                paused: false,
                memory_hold: false,
                store_hold: None,
                shutdown: false,
                running: 0,
                completed: 0,
                failed: 0,
                workers: (0..concurrency)
                    .map(|id| WorkerState { id, job: None })
                    .collect(),
            }),
            wake: Notify::new(),
            bus,
            concurrency,
            aging: options.aging,
            stats_dirty: std::sync::atomic::AtomicBool::new(true),
            stop: CancellationToken::new(),
        });
        for id in 0..concurrency {
            tokio::spawn(worker(inner.clone(), id));
        }
        tokio::spawn(stats_publisher(inner.clone()));
        Pool {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        }
    }

    /// Queues `fut` and returns a future of its output. Dropping the returned future does not
    /// cancel the job; fire `cancel` for that.
    pub fn submit<F, T>(
        &self,
        meta: JobMeta,
        cancel: CancellationToken,
        fut: F,
    ) -> impl Future<Output = Result<T, PoolError>> + Send + 'static
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: BoxJob = Box::pin(async move {
            let out = fut.await;
            let _ = tx.send(out);
        });
        {
            let mut st = self.inner.lock();
            let level = meta.priority;
            st.queue.push(level, Item { meta, cancel, job });
        }
        self.inner.mark_dirty();
        self.inner.wake.notify_one();
        async move { rx.await.map_err(|_| PoolError::Dropped) }
    }

    /// Stops workers from taking new jobs; jobs in flight go on.
    pub fn pause(&self) {
        self.inner.lock().paused = true;
        self.inner.mark_dirty();
    }

    pub fn resume(&self) {
        self.inner.lock().paused = false;
        self.inner.mark_dirty();
        self.inner.wake.notify_waiters();
        // Waiters that were between checks get a permit too.
        for _ in 0..self.inner.concurrency {
            self.inner.wake.notify_one();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.inner.lock().paused
    }

    /// While on, workers take no new job unless nothing at all is running (so a process
    /// whose baseline is above the threshold still makes progress, one job at a time).
    pub fn set_memory_hold(&self, hold: bool) {
        let changed = {
            let mut st = self.inner.lock();
            let changed = st.memory_hold != hold;
            st.memory_hold = hold;
            changed
        };
        if changed {
            self.inner.mark_dirty();
            if !hold {
                self.resume_waiters();
            }
        }
    }

    /// While set (to the directory to free space in), workers take no new job: the history
    /// of what they would do could not be saved.
    pub fn set_store_hold(&self, dir: Option<String>) {
        let changed = {
            let mut st = self.inner.lock();
            let changed = st.store_hold != dir;
            st.store_hold = dir;
            changed
        };
        if changed {
            self.inner.mark_dirty();
            if self.inner.lock().store_hold.is_none() {
                self.resume_waiters();
            }
        }
    }

    fn resume_waiters(&self) {
        self.inner.wake.notify_waiters();
        for _ in 0..self.inner.concurrency {
            self.inner.wake.notify_one();
        }
    }

    /// Queue depth by priority and activity, now.
    pub fn stats(&self) -> PoolStats {
        self.inner.stats()
    }

    /// Every worker's state, now.
    pub fn workers(&self) -> Vec<WorkerState> {
        self.inner.lock().workers.clone()
    }

    /// Workers that would take a job now and have none waiting for them: what a fleet
    /// process may claim from the shared queue. Zero while the pool is paused or held.
    pub fn free_workers(&self) -> usize {
        let st = self.inner.lock();
        if st.shutdown || st.paused || st.store_hold.is_some() {
            return 0;
        }
        if st.memory_hold {
            return usize::from(st.running == 0 && st.queue.depths().iter().sum::<usize>() == 0);
        }
        let queued: usize = st.queue.depths().iter().sum();
        self.inner
            .concurrency
            .saturating_sub(st.running)
            .saturating_sub(queued)
    }

    pub fn concurrency(&self) -> usize {
        self.inner.concurrency
    }

    /// Moves the queued jobs of `run_id` to `priority`, keeping their order of arrival.
    /// Returns how many moved.
    pub fn set_run_priority(&self, run_id: &str, priority: Priority) -> usize {
        let n = {
            let mut st = self.inner.lock();
            st.queue.retarget(|it: &mut Item| {
                if &*it.meta.run_id == run_id {
                    it.meta.priority = priority;
                    Some(priority)
                } else {
                    None
                }
            })
        };
        self.inner.mark_dirty();
        n
    }

    /// Drops every queued job of `run_id` (their submitters see [`PoolError::Dropped`]).
    pub fn remove_run(&self, run_id: &str) -> usize {
        let removed = {
            let mut st = self.inner.lock();
            st.queue
                .remove_where(|it: &Item| &*it.meta.run_id == run_id)
        };
        self.inner.mark_dirty();
        removed.len()
    }

    /// Stops the workers once they finish their current job; queued jobs are dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        let dropped = {
            let mut st = self.lock();
            st.shutdown = true;
            st.queue.remove_where(|_| true)
        };
        drop(dropped);
        self.stop.cancel();
        self.wake.notify_waiters();
        for _ in 0..self.concurrency {
            self.wake.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only mutated in short, non-panicking sections.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_dirty(&self) {
        self.stats_dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            queued: st.queue.depths(),
            running: st.running,
            concurrency: self.concurrency,
            paused: st.paused,
            memory_hold: st.memory_hold,
            disk_full: st.store_hold.clone(),
            completed: st.completed,
            failed: st.failed,
        }
    }

    /// Takes the next job this worker may run, waiting while there is none or the pool is
    /// held. `None` on shutdown.
    async fn next(&self, worker: usize) -> Option<Item> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if st.shutdown {
                    return None;
                }
                let held =
                    st.paused || st.store_hold.is_some() || (st.memory_hold && st.running > 0);
                if !held {
                    while let Some(Queued { item, .. }) = st.queue.pop(Instant::now(), self.aging) {
                        if item.cancel.is_cancelled() {
                            continue; // dropped unstarted; its submitter sees Dropped
                        }
                        st.running += 1;
                        st.workers[worker].job = Some(WorkerJob {
                            run_id: item.meta.run_id.to_string(),
                            step: item.meta.step.to_string(),
                            attempt: item.meta.attempt,
                            priority: item.meta.priority,
                            since: SystemTime::now(),
                        });
                        return Some(item);
                    }
                }
            }
            notified.await;
        }
    }
}

async fn worker(inner: Arc<Inner>, id: usize) {
    while let Some(item) = inner.next(id).await {
        inner.mark_dirty();
        inner.bus.publish(Event::WorkerBusy {
            worker: id,
            run_id: item.meta.run_id.to_string(),
            step: item.meta.step.to_string(),
            attempt: item.meta.attempt,
        });
        // A panicking job must not take its worker down; its submitter sees Dropped.
        let ok = AssertUnwindSafe(item.job).catch_unwind().await.is_ok();
        if !ok {
            tracing::error!(run_id = %item.meta.run_id, step = %item.meta.step, "a job panicked");
        }
        {
            let mut st = inner.lock();
            st.running -= 1;
            st.workers[id].job = None;
            if ok {
                st.completed += 1;
            } else {
                st.failed += 1;
            }
        }
        inner.mark_dirty();
        inner.bus.publish(Event::WorkerIdle { worker: id });
    }
}

async fn stats_publisher(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if inner
            .stats_dirty
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            inner.bus.publish(Event::Pool(inner.stats()));
        }
    }
}

#[cfg(test)]
mod tests;
