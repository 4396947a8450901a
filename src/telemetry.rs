//! Process-wide counters for what the event bus does not carry: notification deliveries,
//! schedule slots, and the store writer's batches. The modules where these happen bump them
//! (a few atomic operations each); `metrics` registers them for `/metrics`. This module knows
//! nothing of the others, so the arrows stay one way.
//!
//! Labels are bounded: channel names, outcome words, error kinds and blueprint names (files or
//! Supabase rows, not values), never run ids, item values or message text.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::OnceLock;
use std::time::Duration;

/// Two labels: `[(name, value); 2]`.
pub type Labels2 = [(&'static str, String); 2];

/// The process's counters; see [`get`].
#[derive(Debug)]
pub struct Telemetry {
    /// Notification deliveries (one `deliver` call: every part of one message on one channel)
    /// by `channel` and `outcome` (`sent`, `already_sent`, or the error kind).
    pub notifications: Family<Labels2, Counter>,
    /// Schedule slots by `blueprint` and `outcome`: `fired` (claimed here, its run started),
    /// `missed` (passed while the scheduler was not running or came late), `skipped` (missed
    /// and let go: `missedSlots: skip`), `claimed_elsewhere` (another process fired it),
    /// `claim_failed` (the store could not be asked; not fired).
    pub schedule_slots: Family<Labels2, Counter>,
    /// Seconds one write batch of the store writer took (one `BEGIN IMMEDIATE` … `COMMIT`).
    pub store_batch_seconds: Histogram,
    /// Writes queued to the store writer and not yet applied.
    pub store_queue: Gauge,
    /// Writes the store writer could not apply (each one is also logged).
    pub store_write_failures: Counter,
}

/// The process's counters, created on first use.
pub fn get() -> &'static Telemetry {
    static T: OnceLock<Telemetry> = OnceLock::new();
    T.get_or_init(|| Telemetry {
        notifications: Family::default(),
        schedule_slots: Family::default(),
        // 0.5 ms … ~4 s: a batch is normally a few milliseconds; seconds mean a busy disk or
        // another process holding the write lock.
        store_batch_seconds: Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 4.0, 8),
        ),
        store_queue: Gauge::default(),
        store_write_failures: Counter::default(),
    })
}

/// A notification delivery ended: `outcome` is `sent`, `already_sent` or an error kind.
pub fn notification(channel: &'static str, outcome: &str) {
    get()
        .notifications
        .get_or_create(&[
            ("channel", channel.to_string()),
            ("outcome", outcome.into()),
        ])
        .inc();
}

/// `n` schedule slots of `blueprint` ended as `outcome` (see [`Telemetry::schedule_slots`]).
pub fn schedule_slots(blueprint: &str, outcome: &'static str, n: u64) {
    if n == 0 {
        return;
    }
    get()
        .schedule_slots
        .get_or_create(&[("blueprint", blueprint.into()), ("outcome", outcome.into())])
        .inc_by(n);
}

/// `n` writes were queued to a store writer (negative: applied or dropped).
pub fn store_queued(n: i64) {
    get().store_queue.inc_by(n);
}

/// A store write batch took `took`; `lost` of its writes could not be applied.
pub fn store_batch(took: Duration, lost: u64) {
    let t = get();
    t.store_batch_seconds.observe(took.as_secs_f64());
    if lost > 0 {
        t.store_write_failures.inc_by(lost);
    }
}
