//! The history database: every run, step and attempt, in SQLite at `DB_FILE`.
//!
//! Shape: all SQL of OmniFlow lives in this module.
//! - Writes are state transitions ([`Store::run_started`], [`Store::step_finished`], …). Each
//!   is queued to **one writer thread** and returns at once, so the async runtime never blocks
//!   on SQLite. The writer applies everything pending in one `BEGIN IMMEDIATE` transaction
//!   (batching: thousands of writes per second cost a few commits). Each transition is guarded
//!   by the state it expects, so a repeated or late event is a logged no-op, never a step
//!   backwards.
//! - Reads are blocking queries on read-only connections (never the writer's); call them from
//!   `spawn_blocking` or plain CLI code. WAL lets them run while the writer commits.
//! - Timestamps are ISO-8601 UTC text with milliseconds ([`iso8601`]), which sorts like time.
//!
//! The original's monitoring queries work unchanged:
//! ```sql
//! SELECT blueprint_name, status, total_time_ms FROM runner_executions ORDER BY started_at DESC LIMIT 10;
//! SELECT * FROM runner_executions WHERE status = 'error';
//! ```
//!
//! ```no_run
//! # use omniflow::store::*;
//! # use omniflow::blueprint::Priority;
//! # use std::time::SystemTime;
//! # fn main() -> Result<(), StoreError> {
//! let store = Store::open("automation_runner.db".as_ref())?;
//! store.insert_run(NewRun {
//!     id: "r1".into(), blueprint_name: "tech-digest".into(), priority: Priority::Normal,
//!     trigger: "cli".into(), sandbox: false, seed: None, simulate_failures: 0.0,
//!     variables: serde_json::json!({}), blueprint: serde_json::Value::Null,
//!     parent_run_id: None, queued_at: SystemTime::now(),
//! });
//! store.run_started("r1", SystemTime::now(), 3);
//! store.flush_blocking();
//! assert_eq!(store.find_run("r1")?.status, omniflow::events::RunStatus::Running);
//! # Ok(()) }
//! ```

// The store must never take the process down: every fallible path returns or logs.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

// Writes that are answered (claims, sent notifications), typed, for the one writer.
mod asks;
// Notifications sent and schedule slots claimed: synchronous, committed at once.
mod claims;
mod error;
mod lease;
pub mod pg;
mod providers;
mod read;
mod schema;
mod transitions;
mod types;
mod writer;

pub use claims::{NotificationRecord, PartState, SlotClaim};
pub use error::{BackupFailure, DbError, StoreError, StoreErrorKind};
pub use lease::{owner_is_gone, process_id, short_span, Claim, Health, ProcessRow};
pub use pg::PgTarget;
pub use providers::CachedAnswer;
pub use read::backup_file;
pub use types::{
    AttemptRecord, AttemptRow, NewRun, NewStep, RunCursor, RunEnd, RunFilter, RunRow, StepEnd,
    StepRow,
};

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use transitions::Op;
use writer::{Ack, Msg, Shared};

/// The newest schema version this build can read and write.
pub const SCHEMA_VERSION: i64 = schema::LATEST;

/// Writes that may wait for the writer before a run's driver holds back new steps
/// ([`Store::room`]). A step's writes (queued, started, its attempt, finished) are a few
/// hundred bytes each; the bound keeps a fan-out that outruns the writer within a few MB,
/// and still lets one batch amortise its commit. Measured on a 10,000-item forEach, 2 cores:
/// 1,024 gave both the lowest peak RSS and the shortest run (256: batches too small; 4,096:
/// 2-3 MB more and no faster).
pub const ROOM: usize = 1024;
/// The longest a driver waits for room at once (see [`Store::room`]).
pub const ROOM_WAIT: Duration = Duration::from_millis(100);

/// Handle to the history database. Cheap to clone (an `Arc`), `Send + Sync`.
///
/// When the last clone is dropped, the writer applies every pending write and exits; the drop
/// waits for it (a few milliseconds normally), so nothing queued is lost on a clean exit.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    writer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    owner: String,
}

/// The database behind a [`Store`]: two known implementations, so an enum (static dispatch).
/// Each holds its writer's queue; the writer thread itself is [`Inner::writer`].
pub(crate) enum Backend {
    Sqlite(SqliteBackend),
    Postgres(Box<pg::backend::PgBackend>),
}

pub(crate) struct SqliteBackend {
    path: PathBuf,
    /// `None` only during drop, to close the channel before joining the writer.
    tx: Option<Sender<Msg>>,
    /// Idle read-only connections.
    readers: Mutex<Vec<Connection>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel is the writer's signal to finish what is queued and stop.
        match &mut self.backend {
            Backend::Sqlite(b) => drop(b.tx.take()),
            Backend::Postgres(b) => b.close(),
        }
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!(database = %self.backend.place(), "the database writer thread panicked");
            }
        }
    }
}

impl Backend {
    /// The database as shown to people: the file, or the PostgreSQL URL without its password.
    fn place(&self) -> String {
        match self {
            Backend::Sqlite(b) => b.path.display().to_string(),
            Backend::Postgres(b) => b.target().shown().to_string(),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("database", &self.inner.backend.place())
            .finish()
    }
}

/// Which database a process uses: `DATABASE_URL` when it names PostgreSQL, else the SQLite
/// file at `DB_FILE`.
#[derive(Debug, Clone)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(Box<PgTarget>),
}

impl Store {
    /// Opens `path` (creating the file and its directories if missing), migrates it, and
    /// starts the writer thread.
    ///
    /// Refuses, without writing anything, a file that is not an SQLite database and a
    /// database whose schema is newer than this build ([`SCHEMA_VERSION`]).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_as(path, lease::process_id().to_string())
    }

    /// Opens whichever database `at` names (see [`Store::open`] and [`Store::open_postgres`]).
    pub fn open_at(at: &Location) -> Result<Store, StoreError> {
        match at {
            Location::Sqlite(path) => Store::open(path),
            Location::Postgres(target) => Store::open_postgres(target),
        }
    }

    /// Connects to PostgreSQL, applies the migrations this build has and the database lacks
    /// (under an advisory lock, so processes starting together do not race), and starts the
    /// writer and reader threads. Refuses a database migrated by a newer omniflow.
    pub fn open_postgres(target: &PgTarget) -> Result<Store, StoreError> {
        Store::open_postgres_as(target, lease::process_id().to_string())
    }

    /// Like [`Store::open_postgres`], with runs owned by `owner` (tests play several
    /// processes in one).
    pub fn open_postgres_as(target: &PgTarget, owner: String) -> Result<Store, StoreError> {
        let shared = Arc::new(Shared::default());
        let (backend, writer) =
            pg::backend::PgBackend::open(target, owner.clone(), shared.clone())?;
        Ok(Store {
            inner: Arc::new(Inner {
                backend: Backend::Postgres(Box::new(backend)),
                writer: Some(writer),
                shared,
                owner,
            }),
        })
    }

    /// Like [`Store::open`], with runs owned by `owner` instead of this process's id (tests
    /// use it to play several processes in one).
    pub fn open_as(path: &Path, owner: String) -> Result<Store, StoreError> {
        let conn = schema::open_writer(path)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let writer = {
            let shared = shared.clone();
            let shown = path.display().to_string();
            std::thread::Builder::new()
                .name("omniflow-store".into())
                .spawn({
                    let owner = owner.clone();
                    move || writer::run(conn, rx, shared, shown, owner)
                })
                .map_err(|e| StoreError::Unwritable {
                    path: path.to_path_buf(),
                    source: DbError::new(
                        StoreErrorKind::Unavailable,
                        format!("cannot start the writer thread: {e}"),
                    ),
                })?
        };
        Ok(Store {
            inner: Arc::new(Inner {
                backend: Backend::Sqlite(SqliteBackend {
                    path: path.to_path_buf(),
                    tx: Some(tx),
                    readers: Mutex::new(Vec::new()),
                }),
                writer: Some(writer),
                shared,
                owner,
            }),
        })
    }

    /// The process id (`runner_processes.id`) that owns the runs this store records.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The SQLite file; `None` on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        match &self.inner.backend {
            Backend::Sqlite(b) => Some(&b.path),
            Backend::Postgres(_) => None,
        }
    }

    /// The PostgreSQL database this store uses; `None` on SQLite.
    pub fn postgres(&self) -> Option<&PgTarget> {
        match &self.inner.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => Some(b.target()),
        }
    }

    /// The database as people should see it: the file, or the PostgreSQL URL without its
    /// password.
    pub fn place(&self) -> String {
        self.inner.backend.place()
    }

    /// The PostgreSQL side, when that is the backend.
    pub(crate) fn pg(&self) -> Option<&pg::backend::PgBackend> {
        match &self.inner.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => Some(b),
        }
    }

    /// The process's shared pool of PostgreSQL connections (the store's reads use it; the
    /// fleet's queue shares it), when that is the backend.
    pub fn pg_pool(&self) -> Option<pg::pool::PgPool> {
        self.pg().map(|b| b.pool().clone())
    }

    /// The SQLite file. Only called on the SQLite paths (after `pg()` returned `None`).
    pub(crate) fn sqlite_path(&self) -> &Path {
        match &self.inner.backend {
            Backend::Sqlite(b) => &b.path,
            Backend::Postgres(_) => Path::new(""),
        }
    }

    fn readers(&self) -> MutexGuard<'_, Vec<Connection>> {
        static NONE: Mutex<Vec<Connection>> = Mutex::new(Vec::new());
        let pool = match &self.inner.backend {
            Backend::Sqlite(b) => &b.readers,
            Backend::Postgres(_) => &NONE,
        };
        // A panic while holding the pool leaves only whole connections in it.
        pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message; false if the writer is gone (it only stops when the store is dropped,
    /// so this means it panicked).
    fn send(&self, msg: Msg) -> bool {
        // Counted before it is sent, so the writer's decrement never comes first.
        let write = matches!(msg, Msg::Write(_));
        if write {
            self.inner.shared.queued_one();
        }
        let sent = match &self.inner.backend {
            Backend::Sqlite(b) => b.tx.as_ref().map(|tx| tx.send(msg).is_ok()),
            Backend::Postgres(b) => Some(b.send(msg)),
        };
        if sent != Some(true) {
            if write {
                self.inner.shared.taken(1);
            }
            self.inner.shared.record_error(format!(
                "the database writer for {} has stopped; changes are not being saved",
                self.place()
            ));
            return false;
        }
        true
    }

    fn write(&self, op: Op) {
        self.send(Msg::Write(op));
    }

    /// Why the last write batch failed, while no batch has committed since: the database is
    /// not writable now (readiness). `None` when the last batch committed.
    pub fn write_problem(&self) -> Option<String> {
        self.inner
            .shared
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    // ---- writes ------------------------------------------------------------------------

    /// Records a new run as `queued`; its `started_at` is the queue time until it starts.
    /// A second insert with the same id is ignored.
    pub fn insert_run(&self, run: NewRun) {
        self.write(Op::InsertRun(Box::new(run)));
    }

    /// `queued` → `running`: sets `started_at` to the real start and `steps_total`.
    pub fn run_started(&self, run_id: &str, at: SystemTime, steps_total: u32) {
        self.write(Op::RunStarted {
            run_id: run_id.to_string(),
            at,
            steps_total,
        });
    }

    /// `queued`/`running` → the final status in `end`. The first end of a run wins.
    pub fn run_finished(&self, end: RunEnd) {
        self.write(Op::RunFinished(Box::new(end)));
    }

    /// Records a step as `pending` (ignored if the step is already recorded).
    pub fn step_queued(&self, step: NewStep) {
        self.write(Op::StepQueued(Box::new(step)));
    }

    /// A non-final step → `running`, `attempts = attempt`; `started_at` is set by the first
    /// attempt only.
    pub fn step_started(&self, run_id: &str, step_key: &str, attempt: u32, at: SystemTime) {
        self.write(Op::StepStarted {
            run_id: run_id.to_string(),
            step_key: step_key.to_string(),
            attempt,
            at,
        });
    }

    /// `running` → `retrying` (waiting for the backoff before the next attempt).
    pub fn step_retrying(&self, run_id: &str, step_key: &str) {
        self.write(Op::StepRetrying {
            run_id: run_id.to_string(),
            step_key: step_key.to_string(),
        });
    }

    /// Records one attempt of a recorded step (once per attempt number).
    pub fn attempt_finished(&self, a: AttemptRecord) {
        self.write(Op::AttemptFinished(Box::new(a)));
    }

    /// A non-final step → its final status, output, error and totals. Creates the row if the
    /// step was never queued (e.g. skipped steps).
    pub fn step_finished(&self, end: StepEnd) {
        self.write(Op::StepFinished(Box::new(end)));
    }

    /// Updates the counters of a run in flight (ignored once the run is final).
    pub fn run_progress(&self, run_id: &str, steps_done: u32, tokens_used: u64) {
        self.write(Op::RunProgress {
            run_id: run_id.to_string(),
            steps_done,
            tokens_used,
        });
    }

    /// Resolves once every write queued before it is committed (or has failed: see
    /// [`Store::take_write_error`]).
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.send(Msg::Flush(Ack::Async(tx))) {
            // An error means the writer dropped the ack: it is gone, nothing left to wait for.
            let _ = rx.await;
        }
    }

    /// Resolves once every write queued before it is committed. Unlike [`Store::flush`], a
    /// full disk does not end the wait: the writes are kept and tried again, and this resolves
    /// when there is room and they are saved. For what must be on disk before a side effect
    /// (a notification is sent only once its intent is recorded).
    pub async fn flush_durable(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.send(Msg::Durable(Ack::Async(tx))) {
            let _ = rx.await;
        }
    }

    /// Resolves when the writer's queue has room: at once while fewer than [`ROOM`] writes
    /// wait for it, else once it has taken them down to half that, or after
    /// [`ROOM_WAIT`] at most. A run's driver waits here before it starts more steps, so a
    /// fan-out that outruns the history writer waits for it instead of piling its steps' writes
    /// up in memory. Bounded, so a writer held up (another process holding the write lock)
    /// slows the driver but never stops it from seeing a cancel or its deadline. Writes held
    /// back by a full disk have left the queue (the pool holds new work then), and a writer
    /// that has stopped makes nobody wait.
    pub async fn room(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let shared = &self.inner.shared;
        if shared.queued.load(Relaxed) < ROOM || shared.gone.load(Relaxed) {
            return;
        }
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let drained = shared.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a wake between the check and the wait is kept.
            drained.as_mut().enable();
            if shared.queued.load(Relaxed) <= ROOM / 2 || shared.gone.load(Relaxed) {
                return;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return;
            }
        }
    }

    /// While the disk holding the database is full (writes are held back until there is
    /// room): the directory to free space in.
    pub fn disk_full(&self) -> Option<PathBuf> {
        self.inner
            .shared
            .full
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Like [`Store::flush`], blocking the calling thread (not for use on the async runtime).
    pub fn flush_blocking(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.send(Msg::Flush(Ack::Blocking(tx))) {
            let _ = rx.recv();
        }
    }

    /// The first write failure since the last call (disk full, database locked for too
    /// long, …), worded for the user, so the console or CLI can surface it.
    pub fn take_write_error(&self) -> Option<String> {
        self.inner
            .shared
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Store {
    /// `PRAGMA integrity_check` (every page and every index entry; linear in the file, so
    /// for `omniflow doctor`, not for every open): up to 20 problems, none when intact.
    pub fn integrity_problems(&self) -> Result<Vec<String>, StoreError> {
        if self.pg().is_some() {
            // PostgreSQL checks its own pages; there is no file of ours to scan.
            return Ok(Vec::new());
        }
        self.read("checking integrity", |c| {
            schema::run_check(c, "integrity_check", 20)
        })
    }
}

/// ISO-8601 UTC with milliseconds, e.g. `2026-11-27T09:44:38.123Z`: the store's timestamp
/// format. Times outside 1970…9999 are clamped (the formatter cannot show them).
pub fn iso8601(t: SystemTime) -> String {
    // Last millisecond of year 9999.
    let max = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
    let t = t.clamp(UNIX_EPOCH, max);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The SQL of schema version 1 (every table), for exported programs that write the same
/// `runner_executions` rows as OmniFlow (`omniflow export`).
pub fn schema_v1_sql() -> &'static str {
    schema::MIGRATIONS[0]
}

/// Milliseconds since the Unix epoch (0 before it, clamped at `i64::MAX`).
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`unix_ms`] (negative values are the epoch).
pub(crate) fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The time of day in UTC, `13:24:56`, or `13:24:56.123` with `millis`: how the console and
/// the CLI show a time of today.
pub fn utc_clock(t: SystemTime, millis: bool) -> String {
    let ms = unix_ms(t).rem_euclid(86_400_000);
    let (h, m, s, f) = (
        ms / 3_600_000,
        (ms / 60_000) % 60,
        (ms / 1000) % 60,
        ms % 1000,
    );
    if millis {
        format!("{h:02}:{m:02}:{s:02}.{f:03}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// Date and time in UTC to the second, `2026-11-27 13:24:56`.
pub fn utc_date_time(t: SystemTime) -> String {
    let days = unix_ms(t).div_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    format!("{y:04}-{mo:02}-{d:02} {}", utc_clock(t, false))
}

/// Month and day in UTC with the time to the second, `11-27 13:24:56` (history rows).
pub fn utc_month_day_time(t: SystemTime) -> String {
    let days = unix_ms(t).div_euclid(86_400_000);
    let (_, mo, d) = civil_from_days(days);
    format!("{mo:02}-{d:02} {}", utc_clock(t, false))
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (Howard Hinnant's
/// well-known civil-from-days algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// SQLite integers are i64; counters beyond that are clamped rather than wrapped.
fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
