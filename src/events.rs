//! The event bus: every state change of runs, steps, workers and the pool is published here,
//! and the console and the CLI progress display subscribe.
//!
//! Invariant: publishing never waits. Each subscriber has its own bounded `async-channel`.
//! When a subscriber falls behind:
//! - *progress* events (worker busy/idle, pool stats, token counts) are dropped and counted —
//!   they describe a state that the next one replaces;
//! - *lifecycle* events (run and step transitions) go to the subscriber's overflow queue, kept
//!   in order, so nothing is lost; only past [`OVERFLOW_CAP`] (a subscriber that stopped
//!   reading altogether) are they dropped, counted, and the subscriber marked as lagged so it
//!   can resynchronise from the store.

use crate::blueprint::Priority;
use crate::error::ErrorKind;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Capacity of each subscriber's channel.
pub const CHANNEL_CAP: usize = 1024;
/// Lifecycle events kept for one subscriber beyond its channel before dropping.
pub const OVERFLOW_CAP: usize = 100_000;

/// Final or current status of a run (the `runner_executions.status` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Success,
    Error,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Success => "success",
            RunStatus::Error => "error",
            RunStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<RunStatus> {
        [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Success,
            RunStatus::Error,
            RunStatus::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Success | RunStatus::Error | RunStatus::Cancelled
        )
    }
}

/// Status of one step (one node, or one item of a `forEach` node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Pending,
    Running,
    Retrying,
    Success,
    Error,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Retrying => "retrying",
            StepStatus::Success => "success",
            StepStatus::Error => "error",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<StepStatus> {
        [
            StepStatus::Pending,
            StepStatus::Running,
            StepStatus::Retrying,
            StepStatus::Success,
            StepStatus::Error,
            StepStatus::Skipped,
            StepStatus::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StepStatus::Success | StepStatus::Error | StepStatus::Skipped | StepStatus::Cancelled
        )
    }
}

/// Queue depth and activity of the pool at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolStats {
    /// Jobs waiting, indexed by [`Priority::index`] (0 = low … 3 = critical).
    pub queued: [usize; 4],
    pub running: usize,
    pub concurrency: usize,
    pub paused: bool,
    /// True while the pool holds back because memory is above the threshold.
    pub memory_hold: bool,
    /// While the pool holds back because the history database's disk is full: the
    /// directory to free space in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_full: Option<String>,
    pub completed: u64,
    pub failed: u64,
}

impl PoolStats {
    pub fn queued_total(&self) -> usize {
        self.queued.iter().sum()
    }
}

/// One finished attempt, as [`Event::AttemptFinished`] tells it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptInfo {
    pub run_id: String,
    pub step: String,
    pub node: String,
    /// The node's `type` (`llm`, `http`, …).
    pub node_type: &'static str,
    pub attempt: u32,
    /// `None` when it succeeded.
    pub error_kind: Option<ErrorKind>,
    /// Who answered (a model provider, or a notification channel), when known.
    pub provider: Option<String>,
    pub model: Option<String>,
    pub duration_ms: u64,
    pub tokens: u64,
    pub cached: bool,
    /// The wait before the next attempt, when the step is retried.
    pub retry_wait_ms: Option<u64>,
}

/// Everything the engine and the pool tell their watchers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunQueued {
        run_id: String,
        blueprint: String,
        priority: Priority,
        sandbox: bool,
    },
    RunStarted {
        run_id: String,
        blueprint: String,
        /// How many nodes the graph has.
        nodes: usize,
    },
    RunFinished {
        run_id: String,
        blueprint: String,
        status: RunStatus,
        total_time_ms: u64,
        error: Option<String>,
    },
    /// The run was handed over unfinished (graceful shutdown): another process resumes it.
    RunReleased {
        run_id: String,
        blueprint: String,
    },
    /// A `forEach` node fanned out into `items` steps.
    FanOut {
        run_id: String,
        node: String,
        items: usize,
    },
    StepStarted {
        run_id: String,
        step: String,
        node: String,
        attempt: u32,
    },
    StepRetrying {
        run_id: String,
        step: String,
        node: String,
        attempt: u32,
        kind: ErrorKind,
        message: String,
        wait_ms: u64,
    },
    /// The step waits for its provider's rate limit (`*_RATE_LIMIT`, or a 429's pause)
    /// before its next attempt, outside the pool: no worker is held meanwhile.
    StepWaiting {
        run_id: String,
        step: String,
        node: String,
        provider: String,
        wait_ms: u64,
    },
    /// The step waits for a free place among its provider's calls in flight (`limit` of
    /// them: `*_CONCURRENCY`, or the server's slot count), outside the pool: no worker is
    /// held meanwhile. It ends with the step's `StepStarted` (or `StepFinished`).
    StepWaitingSlot {
        run_id: String,
        step: String,
        node: String,
        provider: String,
        limit: usize,
    },
    StepFinished {
        run_id: String,
        step: String,
        node: String,
        /// The node's `type` (`llm`, `http`, …).
        node_type: &'static str,
        status: StepStatus,
        attempts: u32,
        duration_ms: u64,
        error: Option<String>,
        error_kind: Option<ErrorKind>,
    },
    /// One attempt of a step ended (recorded in `runner_attempts`); what `/metrics` counts
    /// attempts, retries, latency and tokens by. No prompt or output: labels only.
    AttemptFinished(Box<AttemptInfo>),
    WorkerBusy {
        worker: usize,
        run_id: String,
        step: String,
        attempt: u32,
    },
    WorkerIdle {
        worker: usize,
    },
    Pool(PoolStats),
    Tokens {
        run_id: String,
        step: String,
        tokens: u64,
    },
}

impl Event {
    /// Lifecycle events are never dropped for a subscriber that is merely slow.
    pub fn is_lifecycle(&self) -> bool {
        match self {
            Event::RunQueued { .. }
            | Event::RunStarted { .. }
            | Event::RunFinished { .. }
            | Event::RunReleased { .. }
            | Event::FanOut { .. }
            | Event::StepStarted { .. }
            | Event::StepRetrying { .. }
            | Event::StepFinished { .. }
            | Event::AttemptFinished(_) => true,
            Event::StepWaiting { .. }
            | Event::StepWaitingSlot { .. }
            | Event::WorkerBusy { .. }
            | Event::WorkerIdle { .. }
            | Event::Pool(_)
            | Event::Tokens { .. } => false,
        }
    }

    pub fn run_id(&self) -> Option<&str> {
        match self {
            Event::RunQueued { run_id, .. }
            | Event::RunStarted { run_id, .. }
            | Event::RunFinished { run_id, .. }
            | Event::RunReleased { run_id, .. }
            | Event::FanOut { run_id, .. }
            | Event::StepStarted { run_id, .. }
            | Event::StepRetrying { run_id, .. }
            | Event::StepWaiting { run_id, .. }
            | Event::StepWaitingSlot { run_id, .. }
            | Event::StepFinished { run_id, .. }
            | Event::WorkerBusy { run_id, .. }
            | Event::Tokens { run_id, .. } => Some(run_id),
            Event::AttemptFinished(a) => Some(&a.run_id),
            Event::WorkerIdle { .. } | Event::Pool(_) => None,
        }
    }
}

struct SubscriberSlot {
    tx: async_channel::Sender<Event>,
    shared: Arc<SubShared>,
}

#[derive(Default)]
struct SubShared {
    overflow: Mutex<VecDeque<Event>>,
    dropped: AtomicU64,
    lagged: std::sync::atomic::AtomicBool,
}

/// The publishing side; cheap to clone.
#[derive(Clone, Default)]
pub struct EventBus {
    subs: Arc<Mutex<Vec<SubscriberSlot>>>,
    published: Arc<AtomicU64>,
}

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscriber that sees every event published from now on.
    pub fn subscribe(&self) -> Subscriber {
        let (tx, rx) = async_channel::bounded(CHANNEL_CAP);
        let shared = Arc::new(SubShared::default());
        self.lock().push(SubscriberSlot {
            tx,
            shared: shared.clone(),
        });
        Subscriber { rx, shared }
    }

    /// Never waits. See the module docs for what happens when a subscriber is behind.
    pub fn publish(&self, ev: Event) {
        self.published.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.lock();
        subs.retain(|s| !s.tx.is_closed());
        for s in subs.iter() {
            let ev = ev.clone();
            deliver(s, ev);
        }
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    pub fn subscriber_count(&self) -> usize {
        let mut subs = self.lock();
        subs.retain(|s| !s.tx.is_closed());
        subs.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SubscriberSlot>> {
        // A panic while holding this lock cannot leave the list inconsistent; keep going.
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn deliver(s: &SubscriberSlot, ev: Event) {
    let lifecycle = ev.is_lifecycle();
    let mut overflow = s.shared.overflow.lock().unwrap_or_else(|e| e.into_inner());
    // Once anything is in the overflow, lifecycle events queue behind it to keep their order.
    if lifecycle && !overflow.is_empty() {
        if overflow.len() < OVERFLOW_CAP {
            overflow.push_back(ev);
        } else {
            s.shared.dropped.fetch_add(1, Ordering::Relaxed);
            s.shared.lagged.store(true, Ordering::Relaxed);
        }
        return;
    }
    match s.tx.try_send(ev) {
        Ok(()) => {}
        Err(async_channel::TrySendError::Full(ev)) => {
            if lifecycle {
                overflow.push_back(ev);
            } else {
                s.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(async_channel::TrySendError::Closed(_)) => {}
    }
}

/// The receiving side of one subscription.
pub struct Subscriber {
    rx: async_channel::Receiver<Event>,
    shared: Arc<SubShared>,
}

impl Subscriber {
    /// The next event, waiting for one. `None` when the bus is gone.
    pub async fn recv(&self) -> Option<Event> {
        if let Some(ev) = self.try_recv() {
            return Some(ev);
        }
        self.rx.recv().await.ok()
    }

    /// The next event if one is ready.
    pub fn try_recv(&self) -> Option<Event> {
        if let Ok(ev) = self.rx.try_recv() {
            return Some(ev);
        }
        // The channel is empty: everything in it was older than the overflow.
        let mut overflow = self
            .shared
            .overflow
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        overflow.pop_front()
    }

    /// Events dropped for this subscriber because it was behind.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// True once a lifecycle event had to be dropped: resynchronise from the store.
    pub fn lagged(&self) -> bool {
        self.shared.lagged.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(i: usize) -> Event {
        Event::StepStarted {
            run_id: "r".into(),
            step: format!("s{i}"),
            node: "s".into(),
            attempt: 1,
        }
    }

    #[test]
    fn a_stalled_subscriber_keeps_every_lifecycle_event_in_order() {
        let bus = EventBus::new();
        let sub = bus.subscribe();
        let total = CHANNEL_CAP * 3;
        for i in 0..total {
            bus.publish(started(i));
            bus.publish(Event::WorkerIdle { worker: i });
        }
        let mut seen = Vec::new();
        while let Some(ev) = sub.try_recv() {
            if let Event::StepStarted { step, .. } = ev {
                seen.push(step);
            }
        }
        let want: Vec<String> = (0..total).map(|i| format!("s{i}")).collect();
        assert_eq!(seen, want);
        assert!(
            sub.dropped() > 0,
            "progress events beyond the channel are dropped"
        );
        assert!(!sub.lagged());
    }

    #[test]
    fn closed_subscribers_are_forgotten() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let _b = bus.subscribe();
        assert_eq!(bus.subscriber_count(), 2);
        drop(a);
        bus.publish(started(0));
        assert_eq!(bus.subscriber_count(), 1);
    }
}
