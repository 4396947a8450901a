//! The PostgreSQL backend's threads: one writer, on a connection of its own, that applies
//! batched transitions in one transaction each, and a few readers that run the queries sent
//! to them as closures on connections of the process's shared pool ([`super::pool`]).
//!
//! Every PostgreSQL call happens on these store-owned threads, never on the caller's: the
//! blocking `postgres::Client` drives a tokio runtime of its own, and entering it from a
//! tokio worker thread panics ("Cannot start a runtime from within a runtime"). So a read
//! called from async code only blocks on a channel, like an SQLite read blocks on its file.
//!
//! A dropped connection (a server restart, `pg_terminate_backend`) is reconnected and the
//! batch or query tried again. A batch whose connection dropped while it committed may have
//! committed: each of the writer's transactions records its number in
//! `runner_writer_batches`, and the writer reads it back before applying the batch again
//! (committed: said once, at debug level, and not applied again). The transitions are guarded
//! anyway, so a replay would be a no-op, but one warning per write.

use super::super::asks::Ask;
use super::super::error::{DbError, StoreError, StoreErrorKind};
use super::super::transitions::{coalesce, Op, ProcessInfo};
use super::super::writer::{Ack, Msg, Shared};
use super::connect::{describe, describe_while, explain, PgTarget};
use super::pool::PgPool;
use crate::retry::Doubling;
use postgres::error::SqlState;
use postgres::Client;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most writes applied in one transaction (as on SQLite).
const MAX_BATCH: usize = 8192;
/// Reader threads; their connections come from the shared pool, one per query.
const READERS: usize = 3;
/// How long a batch keeps trying new connections before it is held back.
const RECONNECT_FOR: Duration = Duration::from_secs(15);
/// How often writes held back by an unreachable server are tried again.
const DOWN_RETRY: Duration = Duration::from_millis(500);

/// A failure inside a closure run on a PostgreSQL connection.
pub(crate) enum Fail {
    Pg(postgres::Error),
    /// A value this build cannot decode (a hand edit).
    Corrupt(String),
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

pub(crate) type PgResult<T> = Result<T, Fail>;

type Job = Box<dyn FnOnce(&PgPool) + Send>;

/// The writer's connection, which comes back after it was dropped. It keeps PostgreSQL's
/// plan cache for its few fixed statements (the pool's connections plan each query afresh).
pub(crate) struct Conn {
    target: PgTarget,
    client: Option<Client>,
    /// The writer's prepared statements on `client`.
    statements: super::ops::Statements,
    /// The writer's transaction numbers.
    batches: Batches,
    /// How long a transaction keeps trying new connections before its writes are kept back
    /// (`RECONNECT_FOR`; none in tests of what is kept).
    pub(crate) reconnect_for: Duration,
}

/// What the writer knows of its transactions' numbers (see the module's comment).
#[derive(Default)]
struct Batches {
    /// This writer's row of `runner_writer_batches`: the process and a random part, so two
    /// stores of one process (tests) keep apart.
    key: String,
    /// The last number given to a transaction.
    seq: i64,
    /// A transaction whose connection dropped before its end was heard: its number and how
    /// many writes it held (the first ones of the batch applied next).
    unsure: Option<(i64, usize)>,
}

impl Conn {
    pub(crate) fn new(target: PgTarget) -> Conn {
        Conn {
            target,
            client: None,
            statements: Default::default(),
            batches: Batches::default(),
            reconnect_for: RECONNECT_FOR,
        }
    }

    /// The live client, connecting first if needed.
    pub(crate) fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            self.statements.clear();
            self.client = Some(self.target.connect()?);
        }
        self.client
            .as_mut()
            .ok_or_else(|| "no connection".to_string())
    }

    /// The live client, its prepared statements and the writer's transaction numbers.
    fn parts(
        &mut self,
    ) -> Result<(&mut Client, &mut super::ops::Statements, &mut Batches), String> {
        self.client()?;
        match self.client.as_mut() {
            Some(c) => Ok((c, &mut self.statements, &mut self.batches)),
            None => Err("no connection".into()),
        }
    }

    /// Runs `f`, reconnecting and trying once more when the connection was lost.
    pub(crate) fn run<T>(
        &mut self,
        doing: &'static str,
        mut f: impl FnMut(&mut Client) -> PgResult<T>,
    ) -> Result<T, StoreError> {
        let mut tries = 0;
        loop {
            let client = self
                .client()
                .map_err(|message| StoreError::Unavailable { message })?;
            match f(client) {
                Ok(v) => return Ok(v),
                Err(Fail::Pg(e)) if lost(&e) && tries < 2 => {
                    tries += 1;
                    tracing::warn!(database = %self.target.shown(), error = %describe_while(&e, &self.target, doing), "PostgreSQL connection lost; reconnecting");
                    self.client = None;
                }
                Err(Fail::Pg(e)) => return Err(pg_error(&self.target, doing, e)),
                Err(Fail::Corrupt(detail)) => {
                    return Err(StoreError::Corrupt {
                        place: self.target.shown().to_string(),
                        setting: "DATABASE_URL",
                        detail,
                    })
                }
            }
        }
    }
}

/// Runs `f` on a connection of `pool`; a connection the server dropped (a restart,
/// `pg_terminate_backend`) is let go and `f` tried on another (each pooled one may have been
/// dropped too, hence up to the pool's size and one more). Reads only: safe to run twice.
fn run_pooled<T>(
    pool: &PgPool,
    doing: &'static str,
    mut f: impl FnMut(&mut Client) -> PgResult<T>,
) -> Result<T, StoreError> {
    let target = pool.target();
    let mut tries = 0;
    loop {
        let mut c = pool
            .get()
            .map_err(|message| StoreError::Unavailable { message })?;
        match f(&mut c) {
            Ok(v) => return Ok(v),
            Err(Fail::Pg(e)) if lost(&e) && tries <= pool.size() => {
                tries += 1;
                tracing::debug!(database = %target.shown(), error = %describe_while(&e, target, doing), "PostgreSQL connection lost; trying another");
            }
            Err(Fail::Pg(e)) => return Err(pg_error(target, doing, e)),
            Err(Fail::Corrupt(detail)) => {
                return Err(StoreError::Corrupt {
                    place: target.shown().to_string(),
                    setting: "DATABASE_URL",
                    detail,
                })
            }
        }
    }
}

/// Whether `e` means the connection is gone (not that the statement was wrong).
pub(crate) fn lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => session_ended(c),
        // No SQL state: an I/O error on the socket.
        None => e.as_db_error().is_none(),
    }
}

/// The states by which the server says it ended our session or cannot take it now
/// (pg_terminate_backend, a shutdown, a crash, a server still starting, class 08): worth a
/// new connection, unlike a statement the server refused.
fn session_ended(c: &SqlState) -> bool {
    *c == SqlState::ADMIN_SHUTDOWN
        || *c == SqlState::CRASH_SHUTDOWN
        || *c == SqlState::CANNOT_CONNECT_NOW
        || c.code().starts_with("08")
}

/// A driver error as a store error, worded with its fix and never with the password.
pub(crate) fn pg_error(target: &PgTarget, doing: &'static str, e: postgres::Error) -> StoreError {
    let kind = match e.code() {
        Some(c) if *c == SqlState::DISK_FULL => StoreErrorKind::Full,
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::LOCK_NOT_AVAILABLE =>
        {
            StoreErrorKind::Busy
        }
        _ if lost(&e) => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Other,
    };
    if kind == StoreErrorKind::Unavailable {
        return StoreError::Unavailable {
            message: describe_while(&e, target, doing),
        };
    }
    StoreError::Database {
        place: target.shown().to_string(),
        doing,
        source: DbError::new(kind, explain(&e)),
    }
}

/// The PostgreSQL side of a `Store`.
pub(crate) struct PgBackend {
    target: PgTarget,
    /// Shared by the readers and the fleet's queue.
    pool: PgPool,
    /// `None` once closing.
    tx: Option<Sender<Msg>>,
    /// `None` once closing.
    jobs: Option<async_channel::Sender<Job>>,
    readers: Vec<JoinHandle<()>>,
}

impl PgBackend {
    /// Connects, migrates and starts the threads. The returned handle is the writer's.
    pub(crate) fn open(
        target: &PgTarget,
        owner: String,
        shared: Arc<Shared>,
    ) -> Result<(PgBackend, JoinHandle<()>), StoreError> {
        // Connect and migrate on a thread of our own: the caller may be on a tokio runtime.
        let t = target.clone();
        let client = std::thread::Builder::new()
            .name("omniflow-pg-open".into())
            .spawn(move || -> Result<Client, StoreError> {
                let mut client = t
                    .connect()
                    .map_err(|message| StoreError::Unavailable { message })?;
                super::schema::migrate(&mut client, &t)?;
                Ok(client)
            })
            .map_err(|e| thread_error(target, e))?
            .join()
            .map_err(|_| StoreError::Unavailable {
                message: format!("opening PostgreSQL at {} panicked", target.shown()),
            })??;
        let (tx, rx) = mpsc::channel();
        let writer = {
            let mut conn = Conn::new(target.clone());
            conn.client = Some(client);
            std::thread::Builder::new()
                .name("omniflow-pg-writer".into())
                .spawn(move || write_loop(conn, rx, shared, owner))
                .map_err(|e| thread_error(target, e))?
        };
        let pool = PgPool::new(target).map_err(|message| StoreError::Unavailable { message })?;
        let (jobs, queue) = async_channel::unbounded::<Job>();
        let mut readers = Vec::new();
        for i in 0..READERS {
            let queue = queue.clone();
            let pool = pool.clone();
            let handle = std::thread::Builder::new()
                .name(format!("omniflow-pg-read-{i}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv_blocking() {
                        job(&pool);
                    }
                })
                .map_err(|e| thread_error(target, e))?;
            readers.push(handle);
        }
        Ok((
            PgBackend {
                target: target.clone(),
                pool,
                tx: Some(tx),
                jobs: Some(jobs),
                readers,
            },
            writer,
        ))
    }

    pub(crate) fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The process's shared pool (the fleet's queue runs its statements on it too).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the queues: the writer finishes what is queued and stops; readers stop.
    pub(crate) fn close(&mut self) {
        self.tx = None;
        self.jobs = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Queues a message to the writer thread; false if it is gone.
    pub(crate) fn send(&self, msg: Msg) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok())
    }

    /// Runs `f` on a reader thread's connection and waits for its answer. Blocking, like an
    /// SQLite read; safe on any thread, async ones included (the driver runs on the reader).
    /// A heartbeat on a reader's connection, not waited for: the process's liveness must not
    /// queue behind the writer's backlog (a long batch of history would make the fleet take
    /// this process for dead and adopt its runs). A heartbeat that cannot be sent is logged;
    /// the next one comes a third of a lease later.
    pub(crate) fn heartbeat_now(&self, h: &crate::store::Health, owner: &str) {
        let row = super::ops::HeartbeatRow::new(h, &ProcessInfo::current(owner.to_string()));
        let job: Job = Box::new(move |pool: &PgPool| {
            let r = run_pooled(pool, "recording a heartbeat", |c| {
                c.execute(super::ops::HEARTBEAT, &row.params())?;
                Ok(())
            });
            if let Err(e) = r {
                tracing::warn!(error = %e, "heartbeat not recorded");
            }
        });
        if let Some(jobs) = &self.jobs {
            let _ = jobs.try_send(job);
        }
    }

    pub(crate) fn read<T: Send + 'static>(
        &self,
        doing: &'static str,
        f: impl FnMut(&mut Client) -> PgResult<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |pool: &PgPool| {
            let _ = tx.send(run_pooled(pool, doing, f));
        });
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send_blocking(job).is_ok());
        let gone = || StoreError::Database {
            place: self.target.shown().to_string(),
            doing,
            source: DbError::new(StoreErrorKind::Other, "the store's readers have stopped"),
        };
        if !sent {
            return Err(gone());
        }
        rx.recv().unwrap_or_else(|_| Err(gone()))
    }
}

fn thread_error(target: &PgTarget, e: std::io::Error) -> StoreError {
    StoreError::Unavailable {
        message: format!(
            "cannot start a thread for PostgreSQL at {}: {e}",
            target.shown()
        ),
    }
}

/// The writer thread: gathers what is queued, folds it (`coalesce`, as on SQLite) and applies
/// it in one transaction. While the server cannot be reached the writes are held, in order,
/// and tried again; plain flushes are answered (the failure is reported), durable ones wait.
fn write_loop(mut conn: Conn, rx: Receiver<Msg>, shared: Arc<Shared>, owner: String) {
    let _gone = super::super::writer::GoneOnExit(shared.clone());
    let proc = ProcessInfo::current(owner);
    conn.batches.key = format!("{}#{:08x}", proc.id, rand::random::<u32>());
    let shown = conn.target.shown().to_string();
    let mut held: Vec<Op> = Vec::new();
    let mut held_acks: Vec<Ack> = Vec::new();
    let mut last_try = Instant::now();
    loop {
        let first = if held.is_empty() {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(DOWN_RETRY) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        if !held.is_empty() && last_try.elapsed() >= DOWN_RETRY {
            last_try = Instant::now();
            let kept = held.len();
            let done = apply_batch(&mut conn, &held, &shared, &proc, &shown);
            held.drain(..done);
            if held.is_empty() {
                tracing::info!(database = %shown, writes = kept, "PostgreSQL answers again: the held writes are saved");
                for ack in held_acks.drain(..) {
                    ack.send();
                }
            }
        }
        let Some(first) = first else { continue };
        let mut ops: Vec<Op> = Vec::new();
        let mut acks: Vec<Ack> = Vec::new();
        let mut durable: Vec<Ack> = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Write(op) => ops.push(op),
                Msg::Flush(a) => acks.push(a),
                Msg::Durable(a) => durable.push(a),
                Msg::Ask(ask) => {
                    if !ops.is_empty() {
                        shared.taken(ops.len());
                        apply_or_hold(
                            &mut conn,
                            std::mem::take(&mut ops),
                            &mut held,
                            &shared,
                            &proc,
                            &shown,
                        );
                    }
                    answer(&mut conn, ask, &proc);
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
            apply_or_hold(&mut conn, ops, &mut held, &shared, &proc, &shown);
            last_try = Instant::now();
        }
        for a in acks {
            a.send();
        }
        if held.is_empty() {
            for a in durable {
                a.send();
            }
        } else {
            held_acks.extend(durable);
        }
    }
    if !held.is_empty() {
        // Closing while the server is away: one last try (itself reconnecting for up to
        // RECONNECT_FOR), then the writes are lost (reported), as the process is going away.
        let done = apply_batch(&mut conn, &held, &shared, &proc, &shown);
        held.drain(..done);
        if !held.is_empty() {
            fail(
                &shared,
                &shown,
                &held[0].describe(),
                held.len(),
                &"PostgreSQL cannot be reached",
            );
        }
    }
    for a in held_acks {
        a.send();
    }
    // This writer's transaction number is of no more use (a connection already lost is not
    // opened again for it: the sweep prunes rows a day old).
    if let Some(c) = conn.client.as_mut().filter(|c| !c.is_closed()) {
        let _ = c.execute(
            "DELETE FROM runner_writer_batches WHERE writer = $1",
            &[&conn.batches.key],
        );
    }
}

/// Applies an ask in its own transaction (reconnecting once if the connection was lost)
/// and answers it; a failure is the answer.
fn answer(conn: &mut Conn, ask: Ask, proc: &ProcessInfo) {
    let doing = ask.doing();
    match ask {
        Ask::ClaimRun {
            run_id,
            lease,
            max_takeovers,
            reply,
        } => reply.send(conn.run("claiming a run", |c| {
            super::lease::claim(c, &run_id, &proc.id, lease, max_takeovers)
        })),
        Ask::ClaimSlot {
            blueprint,
            slot,
            reply,
        } => reply.send(conn.run(doing, |c| {
            super::claims::claim_slot(c, &blueprint, slot, proc)
        })),
        Ask::SlotRun {
            blueprint,
            slot,
            run_id,
            reply,
        } => reply.send(conn.run(doing, |c| {
            super::claims::slot_run(c, &blueprint, slot, &run_id)
        })),
        Ask::NotificationIntent { rec, reply } => reply.send(conn.run(doing, |c| {
            super::claims::record_notification_intent(c, &rec)
        })),
        Ask::ClearNotificationIntent { dedupe_key, reply } => reply.send(conn.run(doing, |c| {
            super::claims::clear_notification_intent(c, &dedupe_key)
        })),
        Ask::RecordNotification { rec, reply } => {
            reply.send(conn.run(doing, |c| super::claims::record_notification(c, &rec)))
        }
    }
}

fn apply_or_hold(
    conn: &mut Conn,
    ops: Vec<Op>,
    held: &mut Vec<Op>,
    shared: &Shared,
    proc: &ProcessInfo,
    shown: &str,
) {
    let mut ops = coalesce(ops);
    if !held.is_empty() {
        held.extend(ops);
        return;
    }
    let done = apply_batch(conn, &ops, shared, proc, shown);
    if done < ops.len() {
        *held = ops.split_off(done);
    }
}

/// Why a transaction did not go in.
enum Failure {
    /// No connection could be had before the deadline: the writes are to be kept.
    Down(String),
    /// The server refused it (after a few tries, for a conflict).
    Refused(postgres::Error),
}

/// Applies a batch: how many of `ops`, from the front, are settled (saved, or refused and
/// reported). The rest are to be kept and applied again once the server answers. A refused
/// batch is applied one write at a time, so only the refused writes are lost, as on SQLite.
pub(crate) fn apply_batch(
    conn: &mut Conn,
    ops: &[Op],
    shared: &Shared,
    proc: &ProcessInfo,
    shown: &str,
) -> usize {
    let started = Instant::now();
    let (from, err) = match apply_reconnecting(conn, ops, proc, shown, 5) {
        Ok(()) => {
            crate::telemetry::store_batch(started.elapsed(), 0);
            *shared.failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return ops.len();
        }
        Err((from, Failure::Down(message))) => {
            down(shared, shown, &message);
            return from;
        }
        Err((from, Failure::Refused(e))) => (from, e),
    };
    let rest = &ops[from..];
    let mut lost_rows = 0;
    if rest.len() > 1 {
        tracing::warn!(database = shown, error = %err, writes = rest.len(), "batch failed; applying its writes one by one");
        for (i, op) in rest.iter().enumerate() {
            // A write alone is not tried again on a conflict: its batch already was.
            match apply_reconnecting(conn, std::slice::from_ref(op), proc, shown, 0) {
                Ok(()) => {}
                Err((_, Failure::Down(message))) => {
                    // Kept from this write on; the ones before it are settled.
                    down(shared, shown, &message);
                    crate::telemetry::store_batch(started.elapsed(), lost_rows);
                    return from + i;
                }
                Err((_, Failure::Refused(e))) => {
                    lost_rows += 1;
                    fail(
                        shared,
                        shown,
                        &op.describe(),
                        1,
                        &describe(&e, &conn.target, "write the history"),
                    );
                }
            }
        }
    } else {
        lost_rows = rest.len() as u64;
        let what = rest.first().map(Op::describe).unwrap_or_default();
        fail(
            shared,
            shown,
            &what,
            rest.len(),
            &describe(&err, &conn.target, "write the history"),
        );
    }
    crate::telemetry::store_batch(started.elapsed(), lost_rows);
    ops.len()
}

/// Applies `ops` in one transaction, on a new connection when the one in hand is lost (for
/// up to `reconnect_for`), and again on a conflict up to `conflict_tries` times. On failure,
/// how many of `ops` from the front were found committed before (by an earlier try whose
/// connection dropped), and why the rest did not go in.
fn apply_reconnecting(
    conn: &mut Conn,
    ops: &[Op],
    proc: &ProcessInfo,
    shown: &str,
    conflict_tries: u32,
) -> Result<(), (usize, Failure)> {
    // Most cuts (a restart, a failover, `pg_terminate_backend`) last well under this.
    let deadline = Instant::now() + conn.reconnect_for;
    let mut pause = Doubling::new(Duration::from_millis(10), Duration::from_millis(500));
    let mut conflicts = 0;
    let mut from = 0;
    let err = loop {
        let (client, statements, batches) = match conn.parts() {
            Ok(c) => c,
            Err(message) if Instant::now() < deadline => {
                tracing::debug!(database = shown, error = %message, "reconnecting");
                std::thread::sleep(pause.next_wait());
                continue;
            }
            Err(message) => return Err((from, Failure::Down(message))),
        };
        if let Some((n, writes)) = batches.unsure {
            match committed(client, &batches.key, n) {
                Ok(done) => {
                    batches.unsure = None;
                    if done {
                        tracing::debug!(
                            database = shown,
                            writes,
                            "store: the batch was committed before its connection dropped; not applied again"
                        );
                        from = (from + writes).min(ops.len());
                        if from == ops.len() {
                            return Ok(());
                        }
                    }
                }
                Err(e) if lost(&e) && Instant::now() < deadline => {
                    conn.client = None;
                    continue;
                }
                Err(e) => {
                    // Cannot tell: applied again, the guarded transitions keep it right.
                    batches.unsure = None;
                    tracing::debug!(database = shown, error = %e, "store: cannot read whether the batch was committed; applying it again");
                }
            }
        }
        match try_apply(client, statements, batches, &ops[from..], proc) {
            Ok(skipped) => {
                log_skipped(&skipped);
                return Ok(());
            }
            Err(e) if lost(&e) && Instant::now() < deadline => {
                tracing::warn!(database = shown, error = %e, "PostgreSQL connection lost while writing; reconnecting, then applying the batch again unless it was committed");
                // It may have committed all the same: looked up before it is applied again.
                batches.unsure = Some((batches.seq, ops.len() - from));
                conn.client = None;
            }
            Err(e) if retryable(&e) && conflicts < conflict_tries => {
                conflicts += 1;
                tracing::warn!(database = shown, error = %e, conflicts, "write conflict; applying the batch again");
            }
            Err(e) => break e,
        }
    };
    if lost(&err) {
        // Kept: the kept writes start with this transaction's.
        conn.batches.unsure = Some((conn.batches.seq, ops.len() - from));
        conn.client = None;
        let message = describe(&err, &conn.target, "write the history");
        return Err((from, Failure::Down(message)));
    }
    Err((from, Failure::Refused(err)))
}

fn retryable(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// Whether the writer's transaction number `n` was committed. `FOR UPDATE` waits for a
/// transaction of this writer that the server may still be finishing (when the connection
/// was lost on this side only).
fn committed(client: &mut Client, key: &str, n: i64) -> Result<bool, postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT batch FROM runner_writer_batches WHERE writer = $1 FOR UPDATE",
            &[&key],
        )?
        .is_some_and(|r| r.get::<_, i64>(0) == n))
}

/// Records the transaction's number in the transaction itself.
const MARK_BATCH: &str = "INSERT INTO runner_writer_batches (writer, batch) VALUES ($1, $2)
     ON CONFLICT (writer) DO UPDATE SET batch = excluded.batch, at = now()";

fn try_apply(
    client: &mut Client,
    statements: &mut super::ops::Statements,
    batches: &mut Batches,
    ops: &[Op],
    proc: &ProcessInfo,
) -> Result<Vec<String>, postgres::Error> {
    // Numbered before anything is sent: a transaction that fails at its BEGIN is unsure too,
    // and must not be taken for the last one committed.
    batches.seq += 1;
    let mut tx = client.transaction()?;
    let mark = super::ops::prepared(&mut tx, statements, MARK_BATCH)?;
    tx.execute(&mark, &[&batches.key, &batches.seq])?;
    let mut skipped = Vec::new();
    let verdicts = super::ops::apply_all(&mut tx, statements, ops, proc)?;
    for (op, verdict) in ops.iter().zip(verdicts) {
        if let Some(reason) = verdict {
            skipped.push(format!("{}: {reason}", op.describe()));
        }
    }
    // Consoles on other hosts learn which runs changed, at commit (one notification a batch).
    super::events::announce(&mut tx, &proc.id, ops)?;
    tx.commit()?;
    Ok(skipped)
}

fn down(shared: &Shared, shown: &str, message: &str) {
    tracing::error!(
        database = shown,
        error = message,
        "PostgreSQL cannot be reached; writes are kept and tried again"
    );
    *shared.failing.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.to_string());
    shared.record_error(message.to_string());
}

fn fail(shared: &Shared, shown: &str, what: &str, lost: usize, e: &dyn std::fmt::Display) {
    tracing::error!(database = shown, error = %e, writes_lost = lost, first = what, "could not save to the database");
    *shared.failing.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    shared.record_error(format!(
        "could not save {lost} change(s) to {shown} (first: {what}): {e}"
    ));
}

fn log_skipped(skipped: &[String]) {
    for reason in skipped {
        tracing::warn!("store: ignored {reason}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row another transaction holds (here `NOWAIT` on a locked row) is a busy database,
    /// worth trying again later, not a broken one; nor is it a lost connection.
    #[test]
    fn a_held_lock_is_a_busy_database() {
        let Some(db) = crate::store::pg::testing::ScratchDb::new("pg_error_kinds") else {
            return;
        };
        let mut holder = db.target().connect().unwrap();
        holder
            .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
            .unwrap();
        holder
            .batch_execute("BEGIN; SELECT * FROM t FOR UPDATE")
            .unwrap();
        let mut other = db.target().connect().unwrap();
        let Err(e) = other.query("SELECT * FROM t FOR UPDATE NOWAIT", &[]) else {
            panic!("the locked row was taken");
        };
        assert!(!lost(&e));
        let err = pg_error(db.target(), "reading", e);
        assert_eq!(err.kind(), StoreErrorKind::Busy, "{err}");
        holder.batch_execute("ROLLBACK").unwrap();
    }

    /// A server out of disk space (SQLSTATE 53100; raised here by hand, as a real full disk
    /// cannot be had on demand) is a full database, as SQLite's SQLITE_FULL is.
    #[test]
    fn a_server_out_of_disk_space_is_a_full_database() {
        let Some(db) = crate::store::pg::testing::ScratchDb::new("pg_disk_full") else {
            return;
        };
        let mut c = db.target().connect().unwrap();
        let Err(e) = c.batch_execute(
            "DO $$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$",
        ) else {
            panic!("the raised error was not reported");
        };
        assert!(!lost(&e));
        let err = pg_error(db.target(), "writing", e);
        assert_eq!(err.kind(), StoreErrorKind::Full, "{err}");
    }

    /// A refused statement reads as one sentence: the database, what the store was doing, the
    /// server's words and what to do, each once. A session the server ended says so, with the
    /// server and what was being done.
    #[test]
    fn a_refused_statement_reads_as_one_sentence() {
        let Some(db) = crate::store::pg::testing::ScratchDb::new("refused_wording") else {
            return;
        };
        let mut c = db.target().connect().unwrap();
        let Err(e) = c.query("SELECT * FROM no_such_table", &[]) else {
            panic!("a missing table was read");
        };
        let err = pg_error(db.target(), "reading runs", e);
        assert_eq!(
            err.kind(),
            StoreErrorKind::Other,
            "not worth trying again: {err}"
        );
        let text = err.to_string();
        let at = db.target().shown().to_string();
        assert_eq!(
            text,
            format!(
                "database {at} failed while reading runs: the server refused it: relation \"no_such_table\" does not exist (42P01)"
            )
        );
        let Err(e) = c.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())") else {
            panic!("the session outlived its own termination");
        };
        let text = pg_error(db.target(), "reading runs", e).to_string();
        // The server's "terminating connection" notice, or the closed socket when it comes
        // first: either way the same sentence.
        assert!(
            text.starts_with(&format!("PostgreSQL at {at} failed while reading runs: ")),
            "{text}"
        );
    }

    /// A statement whose session the server ended (a restart, `pg_terminate_backend`) is
    /// run again on a new connection; a loss that keeps happening is given up after two new
    /// connections rather than tried for ever, and a statement the server refused is not run
    /// again.
    #[test]
    fn a_lost_connection_is_tried_again_on_a_fresh_one_twice_at_most() {
        let Some(db) = crate::store::pg::testing::ScratchDb::new("conn_run_retry") else {
            return;
        };
        let mut conn = Conn::new(db.target().clone());
        let end_session =
            |c: &mut Client| c.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())");

        let mut sessions = Vec::new();
        let r = conn.run("test", |c| {
            let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
            sessions.push(pid);
            if sessions.len() == 1 {
                end_session(c)?;
            }
            Ok(pid)
        });
        assert!(
            r.is_ok(),
            "a lost connection failed the statement: {:?}",
            r.err()
        );
        assert_eq!(sessions.len(), 2, "runs: {sessions:?}");
        assert_ne!(sessions[0], sessions[1], "run again on the lost connection");

        // Hang detection: a retry without end stops here.
        let mut runs = 0;
        let r = conn.run("test", |c| {
            runs += 1;
            if runs <= 10 {
                end_session(c)?;
            }
            Ok(())
        });
        assert_eq!(
            runs, 3,
            "runs of a statement whose connection is lost every time"
        );
        let err = r.expect_err("a connection lost every time").to_string();
        // The server's last word, or the closed socket when the driver saw that first.
        assert!(
            err.contains("terminating connection") || err.contains("connection closed"),
            "{err}"
        );

        // On a connection not lost before (the last one above may not look closed yet).
        let mut conn = Conn::new(db.target().clone());
        let mut runs = 0;
        let r = conn.run("test", |c| {
            runs += 1;
            c.batch_execute("SELECT * FROM no_such_table")?;
            Ok(())
        });
        assert_eq!(runs, 1, "runs of a refused statement");
        let err = r.expect_err("a refused statement");
        assert!(err.to_string().contains("no_such_table"), "{err}");
    }

    /// A restart or crash of the server keeps the writes (reconnect, or hold them until it is
    /// back); a statement the server refused does not loop on new connections.
    #[test]
    fn a_server_ending_the_session_is_a_lost_connection_and_a_refusal_is_not() {
        for code in ["57P01", "57P02", "57P03", "08000", "08006", "08P01"] {
            assert!(session_ended(&SqlState::from_code(code)), "{code}");
        }
        for code in ["23505", "42P01", "53100", "40001", "57014"] {
            assert!(!session_ended(&SqlState::from_code(code)), "{code}");
        }
    }
}
