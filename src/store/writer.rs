//! The one writer: a std thread that owns the only writing connection, receives state
//! transitions over a channel and applies everything pending in one `BEGIN IMMEDIATE`
//! transaction (batching), after folding the transitions that touch the same row into one
//! write (see `transitions::coalesce`). A batch that fails on one bad row is replayed write by write so
//! only that row is lost; any failure is logged and kept for `take_write_error`. Writes whose
//! caller needs the answer (`asks.rs`) come the same way and are applied in order, each in its
//! own transaction.

use super::asks::Ask;
use super::transitions::{coalesce, Op, ProcessInfo};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most writes applied in one transaction; bounds how long a flush waits behind a burst.
const MAX_BATCH: usize = 8192;
/// Whole-batch retries when another process holds the write lock past `busy_timeout`.
const BUSY_RETRIES: usize = 3;

/// A message to the writer thread.
pub(crate) enum Msg {
    Write(Op),
    /// A write that is answered (a claim, a delivered notification): applied after every
    /// write queued before it, in its own transaction.
    Ask(Ask),
    /// Acknowledged once every write queued before it is committed (or failed).
    Flush(Ack),
    /// Acknowledged once every write queued before it is committed; while the disk is full,
    /// not before there is room again and they are.
    Durable(Ack),
}

/// How a flush waiter is woken: from async code or from a blocked thread.
pub(crate) enum Ack {
    Async(tokio::sync::oneshot::Sender<()>),
    Blocking(SyncSender<()>),
}

impl Ack {
    pub(crate) fn send(self) {
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

/// How often writes held back by a full disk are tried again.
const FULL_RETRY: Duration = Duration::from_millis(500);

/// State shared between the writer thread and every `Store` clone.
#[derive(Default)]
pub(crate) struct Shared {
    /// The first write failure since the last `take_write_error`.
    pub(crate) write_error: Mutex<Option<String>>,
    /// While writes wait for room on a full disk: the directory to free space in.
    pub(crate) full: Mutex<Option<PathBuf>>,
    /// The last batch's failure, cleared by the next batch that commits (readiness).
    pub(crate) failing: Mutex<Option<String>>,
    /// Writes sent and not yet taken into a batch by the writer (see [`Store::room`]).
    ///
    /// [`Store::room`]: super::Store::room
    pub(crate) queued: std::sync::atomic::AtomicUsize,
    /// Woken by the writer when it takes writes off the queue, for [`Store::room`].
    ///
    /// [`Store::room`]: super::Store::room
    pub(crate) drained: tokio::sync::Notify,
    /// The writer thread has ended (or panicked): nothing will take the queue down, so
    /// nobody waits for room.
    pub(crate) gone: std::sync::atomic::AtomicBool,
}

/// Marks the writer gone however its thread ends, a panic included, and wakes whoever waits
/// for room.
pub(crate) struct GoneOnExit(pub(crate) Arc<Shared>);

impl Drop for GoneOnExit {
    fn drop(&mut self) {
        self.0
            .gone
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.0.drained.notify_waiters();
    }
}

impl Shared {
    /// A write was queued.
    pub(crate) fn queued_one(&self) {
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::store_queued(1);
    }

    /// `n` writes left the queue (taken into a batch, or never sent).
    pub(crate) fn taken(&self, n: usize) {
        self.queued
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::store_queued(-(n as i64));
        self.drained.notify_waiters();
    }

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
    let _gone = GoneOnExit(shared.clone());
    let proc = ProcessInfo::current(owner);
    // Every transition's statement stays prepared (`prepare_cached`); the default cache of 16
    // is smaller than the number of distinct statements the writer runs.
    conn.set_prepared_statement_cache_capacity(64);
    let mut ops: Vec<Op> = Vec::new();
    let mut acks: Vec<Ack> = Vec::new();
    // A full disk: the writes that could not be committed, kept in order (never dropped, so
    // nothing done is forgotten and redone), with the durable flushes waiting for them.
    let mut held = Held::default();
    // `recv` fails only once all senders are dropped *and* the queue is empty, so pending
    // writes are always applied before the thread ends.
    loop {
        let first = if held.ops.is_empty() {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(FULL_RETRY) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        if held.due() {
            held.retry(&mut conn, &shared, &proc, &path);
        }
        // A timeout: only the retry was due.
        let Some(first) = first else {
            continue;
        };
        let mut next = Some(first);
        let mut durable: Vec<Ack> = Vec::new();
        while let Some(msg) = next {
            match msg {
                Msg::Write(op) => ops.push(op),
                Msg::Flush(ack) => acks.push(ack),
                Msg::Durable(ack) => durable.push(ack),
                Msg::Ask(ask) => {
                    // Keep the order: what was queued before it is committed first.
                    if !ops.is_empty() {
                        shared.taken(ops.len());
                        held.apply(
                            &mut conn,
                            coalesce(std::mem::take(&mut ops)),
                            &shared,
                            &proc,
                            &path,
                        );
                    }
                    answer(&mut conn, ask, &proc, &path);
                }
            }
            next = if ops.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !ops.is_empty() {
            shared.taken(ops.len());
            held.apply(
                &mut conn,
                coalesce(std::mem::take(&mut ops)),
                &shared,
                &proc,
                &path,
            );
        }
        for ack in acks.drain(..) {
            ack.send();
        }
        if held.ops.is_empty() {
            for ack in durable {
                ack.send();
            }
        } else {
            held.acks.extend(durable);
        }
    }
    if !held.ops.is_empty() {
        // Closing with writes still held back by a full disk: one last try, then they are
        // lost (reported), as the process is going away.
        held.retry(&mut conn, &shared, &proc, &path);
        if !held.ops.is_empty() {
            fail(
                &shared,
                &path,
                &held.ops[0].describe(),
                held.ops.len(),
                &"the disk is still full",
            );
        }
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(path, error = %e, "closing the database writer failed");
    }
}

/// Applies an ask in its own transaction and answers it; a failure is the answer.
fn answer(conn: &mut Connection, ask: Ask, proc: &ProcessInfo, path: &str) {
    let doing = ask.doing();
    let error = |e: rusqlite::Error| super::StoreError::Database {
        place: path.to_string(),
        doing,
        source: e.into(),
    };
    match ask {
        Ask::ClaimRun {
            run_id,
            lease,
            max_takeovers,
            reply,
        } => {
            let now = std::time::SystemTime::now();
            let r = super::lease::claim(conn, &run_id, &proc.id, now, lease, max_takeovers);
            reply.send(r.map_err(error))
        }
        Ask::ClaimSlot {
            blueprint,
            slot,
            reply,
        } => reply.send(super::claims::claim_slot(conn, &blueprint, slot, proc).map_err(error)),
        Ask::SlotRun {
            blueprint,
            slot,
            run_id,
            reply,
        } => reply.send(super::claims::slot_run(conn, &blueprint, slot, &run_id).map_err(error)),
        Ask::NotificationIntent { rec, reply } => {
            reply.send(super::claims::record_notification_intent(conn, &rec).map_err(error))
        }
        Ask::ClearNotificationIntent { dedupe_key, reply } => {
            reply.send(super::claims::clear_notification_intent(conn, &dedupe_key).map_err(error))
        }
        Ask::RecordNotification { rec, reply } => {
            reply.send(super::claims::record_notification(conn, &rec).map_err(error))
        }
    }
}

/// Writes held back by a full disk.
#[derive(Default)]
struct Held {
    ops: Vec<Op>,
    acks: Vec<Ack>,
    last_try: Option<Instant>,
}

impl Held {
    /// Whether the held writes are due for another try.
    fn due(&self) -> bool {
        !self.ops.is_empty() && self.last_try.is_none_or(|t| t.elapsed() >= FULL_RETRY)
    }

    /// Applies `ops`, or holds them back (after any already held, to keep the order) when
    /// the disk is full.
    fn apply(
        &mut self,
        conn: &mut Connection,
        ops: Vec<Op>,
        shared: &Shared,
        proc: &ProcessInfo,
        path: &str,
    ) {
        if !self.ops.is_empty() {
            self.ops.extend(ops);
            return;
        }
        if let Err(full) = apply_batch(conn, &ops, shared, proc, path) {
            tracing::error!(path, error = %full.source, dir = %full.dir.display(), writes = ops.len(), "disk full: the history cannot be saved; the pool holds new work and the writes are kept until there is room");
            *shared.full.lock().unwrap_or_else(|e| e.into_inner()) = Some(full.dir);
            self.ops = ops;
            self.last_try = Some(Instant::now());
        }
    }

    /// Tries the held writes again; on success the disk has room and the waiters go on.
    fn retry(&mut self, conn: &mut Connection, shared: &Shared, proc: &ProcessInfo, path: &str) {
        self.last_try = Some(Instant::now());
        let ops = std::mem::take(&mut self.ops);
        match apply_batch(conn, &ops, shared, proc, path) {
            Ok(()) => {
                tracing::info!(
                    path,
                    writes = ops.len(),
                    "there is room again: the held writes are saved"
                );
                *shared.full.lock().unwrap_or_else(|e| e.into_inner()) = None;
                for ack in self.acks.drain(..) {
                    ack.send();
                }
            }
            Err(_) => self.ops = ops,
        }
    }
}

/// A batch that failed for lack of space.
pub(super) struct Full {
    dir: PathBuf,
    source: rusqlite::Error,
}

/// Applies a batch and counts it for the metrics; a failure is logged and reported, except a
/// full disk, which is handed back so the batch can be kept and tried again.
fn apply_batch(
    conn: &mut Connection,
    ops: &[Op],
    shared: &Shared,
    proc: &ProcessInfo,
    path: &str,
) -> Result<(), Full> {
    let started = std::time::Instant::now();
    let lost = apply_ops(conn, ops, shared, proc, path)?;
    crate::telemetry::store_batch(started.elapsed(), lost);
    if lost == 0 {
        *shared.failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    Ok(())
}

/// Applies a batch; returns how many writes were lost, or the full disk.
pub(super) fn apply_ops(
    conn: &mut Connection,
    ops: &[Op],
    shared: &Shared,
    proc: &ProcessInfo,
    path: &str,
) -> Result<u64, Full> {
    let mut tries = 0;
    let err = loop {
        match try_apply(conn, ops, proc) {
            Ok(skipped) => {
                log_skipped(&skipped);
                return Ok(0);
            }
            Err(e) if is_busy(&e) && tries < BUSY_RETRIES => {
                tries += 1;
                tracing::warn!(path, error = %e, tries, "database busy; retrying the batch");
            }
            Err(e) => break e,
        }
    };
    if let Some(dir) = super::schema::out_of_space(Path::new(path), &err) {
        return Err(Full { dir, source: err });
    }
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
        Ok(lost)
    } else {
        let what = ops.first().map(Op::describe).unwrap_or_default();
        fail(shared, path, &what, ops.len(), &err);
        Ok(ops.len() as u64)
    }
}

fn fail(shared: &Shared, path: &str, what: &str, lost: usize, e: &dyn std::fmt::Display) {
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
