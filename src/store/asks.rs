//! Writes whose caller needs the answer before going on: claiming a run or a schedule slot,
//! noting a slot's run, recording a notification part's intent and its delivery. They are typed messages to
//! the same writer thread as every other write (never a closure, never a connection of their
//! own), so on either backend there is one write path: the writer applies an ask after every
//! write queued before it, in a transaction of its own, and answers through the ask's reply
//! channel once that transaction is committed (or has failed).
//!
//! Each backend's writer turns an [`Ask`] into its own SQL (`claims.rs` and `lease.rs` for
//! SQLite, `pg/claims.rs` and `pg/lease.rs` for PostgreSQL).

use super::claims::NotificationRecord;
use super::error::StoreError;
use super::lease::Claim;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, SystemTime};

/// A write that is answered.
pub(crate) enum Ask {
    /// Take an orphaned run for the store's owner (see `Store::claim_run`).
    ClaimRun {
        run_id: String,
        lease: Duration,
        max_takeovers: u32,
        reply: Reply<Claim>,
    },
    /// Claim a schedule slot: `true` for exactly one claimer across processes.
    ClaimSlot {
        blueprint: String,
        slot: SystemTime,
        reply: Reply<bool>,
    },
    /// Note which run a claimed slot started.
    SlotRun {
        blueprint: String,
        slot: SystemTime,
        run_id: String,
        reply: Reply<()>,
    },
    /// Record that a message part is about to be sent: `true` when this call recorded it,
    /// `false` when the part already has a record (and must not be sent).
    NotificationIntent {
        rec: Box<NotificationRecord>,
        reply: Reply<bool>,
    },
    /// Remove the intent of a part the service refused or never got (a part recorded as
    /// sent is left alone).
    ClearNotificationIntent {
        dedupe_key: String,
        reply: Reply<()>,
    },
    /// Record a delivered message part: its intent becomes `sent` with the message ids (a
    /// part already recorded as sent is left alone).
    RecordNotification {
        rec: Box<NotificationRecord>,
        reply: Reply<()>,
    },
}

impl Ask {
    /// What the store is doing, for error messages ("… failed while {doing}").
    pub(crate) fn doing(&self) -> &'static str {
        match self {
            Ask::ClaimRun { .. } => "claiming a run",
            Ask::ClaimSlot { .. } => "claiming a schedule slot",
            Ask::SlotRun { .. } => "recording a schedule slot's run",
            Ask::NotificationIntent { .. } => "recording a notification about to be sent",
            Ask::ClearNotificationIntent { .. } => "clearing a notification that was not sent",
            Ask::RecordNotification { .. } => "recording a sent notification",
        }
    }
}

/// Where an ask's answer goes: to async code or to a blocked thread.
pub(crate) enum Reply<T> {
    Async(tokio::sync::oneshot::Sender<Result<T, StoreError>>),
    Blocking(SyncSender<Result<T, StoreError>>),
}

impl<T> Reply<T> {
    /// Answers; a caller that gave up waiting (a dropped future) is not an error.
    pub(crate) fn send(self, answer: Result<T, StoreError>) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(answer);
            }
            Reply::Blocking(tx) => {
                let _ = tx.try_send(answer);
            }
        }
    }
}

/// The error for an ask the writer can no longer answer: it stops only when the store is
/// dropped, so this means it panicked (the log has its message).
pub(crate) fn writer_stopped(place: String, doing: &'static str) -> StoreError {
    StoreError::WriterStopped { place, doing }
}
