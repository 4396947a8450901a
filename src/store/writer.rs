//! The one writer: a std thread that owns the only writing connection, receives state
//! transitions over a channel and applies everything pending in one `BEGIN IMMEDIATE`
//! transaction (batching). A batch that fails on one bad row is replayed write by write so
//! only that row is lost; any failure is logged and kept for `take_write_error`.

use super::transitions::{Op, ProcessInfo};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Most writes applied in one transaction; bounds how long a flush waits behind a burst.
const MAX_BATCH: usize = 8192;
/// Whole-batch retries when another process holds the write lock past `busy_timeout`.
const BUSY_RETRIES: usize = 3;

/// A message to the writer thread.
pub(crate) enum Msg {
    Write(Op),
    /// A read-modify-write that needs an answer (claiming a lease): run on the writer's
    /// connection after every write queued before it, in its own transaction.
    Txn(Box<dyn FnOnce(&mut Connection) + Send>),
    /// Acknowledged once every write queued before it is committed (or failed).
    Flush(Ack),
}

/// How a flush waiter is woken: from async code or from a blocked thread.
pub(crate) enum Ack {
    Async(tokio::sync::oneshot::Sender<()>),
    Blocking(SyncSender<()>),
}

impl Ack {
    fn send(self) {
        // The waiter may have given up (dropped future); nothing to do then.
        match self {
            Ack::Async(tx) => {
                let _ = tx.send(());
            }
            Ack::Blocking(tx) => {
                let _ = tx.try_send(());
            }
        }
    }
}

/// State shared between the writer thread and every `Store` clone.
#[derive(Default)]
pub(crate) struct Shared {
    /// The first write failure since the last `take_write_error`.
    pub(crate) write_error: Mutex<Option<String>>,
    /// The last batch's failure, cleared by the next batch that commits (readiness).
    pub(crate) failing: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn record_error(&self, msg: String) {
        let mut slot = self.write_error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(msg);
        }
    }
}

/// The writer thread's body. Returns when every `Store` clone is gone and the channel drained.
pub(crate) fn run(
    mut conn: Connection,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    path: String,
    owner: String,
) {
    let proc = ProcessInfo::current(owner);
    let mut ops: Vec<Op> = Vec::new();
    let mut acks: Vec<Ack> = Vec::new();
    // `recv` fails only once all senders are dropped *and* the queue is empty, so pending
    // writes are always applied before the thread ends.
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Write(op) => ops.push(op),
                Msg::Flush(ack) => acks.push(ack),
                Msg::Txn(f) => {
                    // Keep the order: what was queued before it is committed first.
                    if !ops.is_empty() {
                        apply_batch(&mut conn, &ops, &shared, &proc, &path);
                        ops.clear();
                    }
                    f(&mut conn);
                }
            }
            next = if ops.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !ops.is_empty() {
            apply_batch(&mut conn, &ops, &shared, &proc, &path);
            ops.clear();
        }
        for ack in acks.drain(..) {
            ack.send();
        }
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(path, error = %e, "closing the database writer failed");
    }
}

fn apply_batch(conn: &mut Connection, ops: &[Op], shared: &Shared, proc: &ProcessInfo, path: &str) {
    let started = std::time::Instant::now();
    let lost = apply_ops(conn, ops, shared, proc, path);
    crate::telemetry::store_queued(-(ops.len() as i64));
    crate::telemetry::store_batch(started.elapsed(), lost);
    let mut failing = shared.failing.lock().unwrap_or_else(|e| e.into_inner());
    if lost == 0 {
        *failing = None;
    }
}

/// Applies a batch; returns how many writes were lost.
fn apply_ops(
    conn: &mut Connection,
    ops: &[Op],
    shared: &Shared,
    proc: &ProcessInfo,
    path: &str,
) -> u64 {
    let mut tries = 0;
    let err = loop {
        match try_apply(conn, ops, proc) {
            Ok(skipped) => {
                log_skipped(&skipped);
                return 0;
            }
            Err(e) if is_busy(&e) && tries < BUSY_RETRIES => {
                tries += 1;
                tracing::warn!(path, error = %e, tries, "database busy; retrying the batch");
            }
            Err(e) => break e,
        }
    };
    if ops.len() > 1 && is_per_row(&err) {
        // One bad write (a constraint it breaks) must not take the others down with it:
        // apply them one by one and lose only the bad one.
        tracing::warn!(path, error = %err, writes = ops.len(), "batch failed; applying its writes one by one");
        let mut lost = 0;
        for op in ops {
            match try_apply(conn, std::slice::from_ref(op), proc) {
                Ok(skipped) => log_skipped(&skipped),
                Err(e) => {
                    lost += 1;
                    fail(shared, path, &op.describe(), 1, &e);
                }
            }
        }
        lost
    } else {
        let what = ops.first().map(Op::describe).unwrap_or_default();
        fail(shared, path, &what, ops.len(), &err);
        ops.len() as u64
    }
}

fn fail(shared: &Shared, path: &str, what: &str, lost: usize, e: &rusqlite::Error) {
    tracing::error!(path, error = %e, writes_lost = lost, first = what, "could not save to the database");
    *shared.failing.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    shared.record_error(format!(
        "could not save {lost} change(s) to {path} (first: {what}): {e}"
    ));
}

fn log_skipped(skipped: &[String]) {
    for reason in skipped {
        tracing::warn!("store: ignored {reason}");
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Errors caused by one row's content rather than by the database as a whole.
fn is_per_row(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig)
    ) || matches!(e, rusqlite::Error::ToSqlConversionFailure(_))
}

fn try_apply(
    conn: &mut Connection,
    ops: &[Op],
    proc: &ProcessInfo,
) -> rusqlite::Result<Vec<String>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut skipped = Vec::new();
    for op in ops {
        if let Some(reason) = op.apply(&tx, proc)? {
            skipped.push(format!("{}: {reason}", op.describe()));
        }
    }
    tx.commit()?;
    Ok(skipped)
}

// ---- one function per transition -------------------------------------------------------
