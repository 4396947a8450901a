//! Opening the database safely and migrating it.
//!
//! Invariant: nothing is written to `DB_FILE` until we know it is an SQLite database (or a new,
//! empty file) whose schema version this build understands. Only then are WAL mode and the
//! migrations applied, and the migrations run in one `BEGIN IMMEDIATE` transaction so a crash
//! or a concurrent opener never leaves a half-migrated file.

use super::error::{StoreError, StoreErrorKind};
use crate::retry::Doubling;
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// How long a connection waits for another one's lock before giving up.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migration `i` (0-based) moves the schema from version `i` to `i + 1`. Append only: a
/// released migration is never edited, because databases in the field already ran it.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: everything. `started_at` is the queue time until the run starts, so the original's
    // monitoring query `ORDER BY started_at DESC` sorts queued runs sensibly.
    r#"
    CREATE TABLE runner_executions (
        id                TEXT PRIMARY KEY,
        blueprint_name    TEXT NOT NULL,
        status            TEXT NOT NULL
                          CHECK (status IN ('queued','running','success','error','cancelled')),
        priority          TEXT NOT NULL,
        trigger           TEXT NOT NULL,
        sandbox           INTEGER NOT NULL,
        seed              INTEGER,
        simulate_failures REAL,
        variables         TEXT,
        blueprint         TEXT,
        parent_run_id     TEXT,
        queued_at         TEXT NOT NULL,
        started_at        TEXT,
        finished_at       TEXT,
        total_time_ms     INTEGER,
        tokens_used       INTEGER NOT NULL DEFAULT 0,
        steps_total       INTEGER,
        steps_done        INTEGER,
        error             TEXT,
        error_kind        TEXT,
        failed_step       TEXT,
        host              TEXT,
        pid               INTEGER
    );
    -- History paging is keyset paging on (started_at, id), newest first, optionally filtered.
    CREATE INDEX runner_executions_started ON runner_executions (started_at DESC, id DESC);
    CREATE INDEX runner_executions_status ON runner_executions (status, started_at DESC, id DESC);
    CREATE INDEX runner_executions_blueprint
        ON runner_executions (blueprint_name, started_at DESC, id DESC);

    CREATE TABLE runner_steps (
        run_id      TEXT NOT NULL REFERENCES runner_executions (id) ON DELETE CASCADE,
        step_key    TEXT NOT NULL,
        node_id     TEXT NOT NULL,
        item_index  INTEGER,
        status      TEXT NOT NULL CHECK (status IN
                    ('pending','running','retrying','success','error','skipped','cancelled')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        input       TEXT,
        output      TEXT,
        error_kind  TEXT,
        error       TEXT,
        tokens_used INTEGER NOT NULL DEFAULT 0,
        cached      INTEGER NOT NULL DEFAULT 0,
        provider    TEXT,
        model       TEXT,
        queued_at   TEXT,
        started_at  TEXT,
        finished_at TEXT,
        duration_ms INTEGER,
        -- Insertion order within the run: graph order for display.
        seq         INTEGER NOT NULL,
        PRIMARY KEY (run_id, step_key)
    );
    -- Serves both `ORDER BY seq` and the `MAX(seq)` of each insert in O(log n).
    CREATE INDEX runner_steps_seq ON runner_steps (run_id, seq);

    CREATE TABLE runner_attempts (
        run_id      TEXT NOT NULL,
        step_key    TEXT NOT NULL,
        attempt     INTEGER NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('success','error')),
        error_kind  TEXT,
        error       TEXT,
        wait_ms     INTEGER,
        started_at  TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        duration_ms INTEGER NOT NULL,
        tokens_used INTEGER NOT NULL DEFAULT 0,
        provider    TEXT,
        model       TEXT,
        cached      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, step_key, attempt),
        FOREIGN KEY (run_id, step_key) REFERENCES runner_steps (run_id, step_key)
            ON DELETE CASCADE
    );
    "#,
    // 2: leases and health. A run is owned by the process that runs it (`owner`, a
    // `runner_processes.id`); the owner's heartbeat keeps the lease alive. A run whose owner
    // stopped heartbeating is orphaned and may be claimed (`takeovers` counts how often).
    r#"
    ALTER TABLE runner_executions ADD COLUMN owner TEXT;
    ALTER TABLE runner_executions ADD COLUMN takeovers INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX runner_executions_unfinished ON runner_executions (queued_at)
        WHERE status IN ('queued', 'running');
    CREATE TABLE runner_processes (
        id            TEXT PRIMARY KEY,
        host          TEXT,
        pid           INTEGER NOT NULL,
        role          TEXT NOT NULL,
        version       TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        heartbeat_at  TEXT NOT NULL,
        heartbeat_ms  INTEGER NOT NULL,
        stopped_at    TEXT,
        rss_mb        REAL,
        memory_hold   INTEGER NOT NULL DEFAULT 0,
        paused        INTEGER NOT NULL DEFAULT 0,
        queued        INTEGER NOT NULL DEFAULT 0,
        running       INTEGER NOT NULL DEFAULT 0,
        completed     INTEGER NOT NULL DEFAULT 0,
        failed        INTEGER NOT NULL DEFAULT 0,
        concurrency   INTEGER
    );
    "#,
    // 3: delivered notifications, so a retried or resumed run never sends the same message
    // twice, and claimed schedule slots, so a slot fires once even with two processes on one
    // database.
    r#"
    CREATE TABLE notifications_sent (
        -- root run of the retry chain | step key | channel | part | hash of the part's text
        dedupe_key  TEXT PRIMARY KEY,
        run_id      TEXT NOT NULL,
        step_key    TEXT NOT NULL,
        channel     TEXT NOT NULL,
        part        INTEGER NOT NULL,
        sent_at     TEXT NOT NULL,
        -- JSON: the message id(s) the service returned, when it returns one
        message_ids TEXT
    );
    CREATE INDEX notifications_sent_run ON notifications_sent (run_id);

    CREATE TABLE schedule_slots (
        blueprint_name TEXT NOT NULL,
        -- the cron slot, milliseconds since the epoch (UTC) and as ISO-8601 text
        slot_ms        INTEGER NOT NULL,
        slot           TEXT NOT NULL,
        claimed_at     TEXT NOT NULL,
        run_id         TEXT,
        host           TEXT,
        pid            INTEGER,
        PRIMARY KEY (blueprint_name, slot_ms)
    );
    "#,
    // 4: the model-answer cache, keyed by a hash of provider, model, messages and parameters;
    // and which providers an `auto` call skipped before one answered.
    r#"
    CREATE TABLE provider_cache (
        key         TEXT PRIMARY KEY,
        provider    TEXT NOT NULL,
        model       TEXT NOT NULL,
        output      TEXT NOT NULL,
        tokens_used INTEGER NOT NULL DEFAULT 0,
        created_at  TEXT NOT NULL,
        -- Unix milliseconds: compared on every lookup, pruned on every insert.
        expires_at  INTEGER NOT NULL
    );
    CREATE INDEX provider_cache_expires ON provider_cache (expires_at);
    ALTER TABLE runner_attempts ADD COLUMN fallback TEXT;
    "#,
    // 5: what the server said about its answer: the model that answered (a local server
    // answers with its one loaded model whatever was asked) and why it stopped (`length`: the
    // answer was cut off).
    r#"
    ALTER TABLE runner_steps ADD COLUMN reply_model TEXT;
    ALTER TABLE runner_steps ADD COLUMN finish_reason TEXT;
    "#,
    // 6: a notification part's intent is recorded before it is sent (`sending`), its delivery
    // after (`sent`): a crash between two parts of a long message resends neither the parts
    // that arrived nor the one whose outcome is unknown. Rows from before were all delivered.
    r#"
    ALTER TABLE notifications_sent ADD COLUMN state TEXT NOT NULL DEFAULT 'sent';
    "#,
];

/// The newest schema version this build knows.
pub(crate) const LATEST: i64 = MIGRATIONS.len() as i64;

/// The first 16 bytes of every SQLite database file.
const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Process-wide SQLite settings, applied once before the first connection (SQLite accepts
/// them only before it initialises itself).
///
/// Memory statistics off: with them on, every allocation SQLite makes takes a global mutex
/// to count it, which costs the writer about a tenth of its time; OmniFlow reads its memory
/// from the OS (`memory-stats`), never from `sqlite3_memory_used`, and sets no soft heap limit.
pub(crate) fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sqlite3_config` is called before any other SQLite call of this process
        // that goes through the store (the `Once` runs ahead of every open below), and only
        // once. Should something else in the process have initialised SQLite first, SQLite
        // refuses with SQLITE_MISUSE and keeps its settings: only the speed-up is lost.
        let off: std::os::raw::c_int = 0;
        let rc =
            unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, off) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was already initialised; its memory statistics stay on"
            );
        }
    });
}

/// Opens (creating if needed) and migrates the database; returns the writer's connection.
pub(crate) fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    configure_sqlite();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    check_header(path)?;
    // Two processes creating or migrating one file at once (two cron jobs in the same
    // minute) may see SQLITE_BUSY where SQLite does not call the busy handler (a lock
    // upgrade inside an open read transaction): start over on a fresh connection, up to
    // BUSY_TIMEOUT. Every step is idempotent, so a retry repeats nothing.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Doubling::new(Duration::from_millis(5), Duration::from_millis(100));
    loop {
        match open_writer_once(path) {
            Err(e) if open_again(&e, std::time::Instant::now(), deadline) => {
                std::thread::sleep(pause.next_wait());
            }
            other => return other,
        }
    }
}

/// Whether an open that failed with `e` at `now` starts over: only when the database was
/// busy, which another process creating or migrating the file causes, and only until
/// `deadline`. Any other failure (a damaged, read-only or newer file) would fail the same
/// way again, so it is reported at once.
fn open_again(e: &StoreError, now: std::time::Instant, deadline: std::time::Instant) -> bool {
    matches!(e, StoreError::Database { source, .. } if source.kind() == StoreErrorKind::Busy)
        && now < deadline
}

fn open_writer_once(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path).map_err(|e| open_error(path, "opening", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| open_error(path, "setting busy_timeout", e))?;
    // A read: refuse a newer schema before anything (even the WAL switch) is written.
    check_version(&conn, path)?;

    // Refuse a damaged file before anything (even the WAL switch) writes into it.
    check_integrity(&conn, path)?;

    let mode = switch_to_wal(&conn, path)?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some filesystems (network mounts) cannot do WAL; the store still works, only
        // readers then wait for the writer.
        tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| open_error(path, "setting synchronous", e))?;
    // Foreign keys are not enforced on the writer: every transition that inserts a child row
    // checks its parent in its own guard (`WHERE EXISTS …`, a refused write is a warning, not
    // an error), so enforcement would only repeat that lookup, and it makes SQLite keep a
    // statement journal for every insert of a step or an attempt (about a tenth of the
    // writer's time in a large fan-out). Nothing here deletes runs; the schema's
    // `ON DELETE CASCADE` serves a connection that turns enforcement on to prune history.
    conn.pragma_update(None, "foreign_keys", false)
        .map_err(|e| open_error(path, "setting foreign keys", e))?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Switches to WAL. Two processes creating the same new file at once race for the lock
/// this needs, and SQLite answers the loser `SQLITE_BUSY` without waiting (the busy handler
/// is not called for it): that error ends this open, and [`open_writer`] starts over on a
/// fresh connection until `BUSY_TIMEOUT`.
fn switch_to_wal(conn: &Connection, path: &Path) -> Result<String, StoreError> {
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .map_err(|e| open_error(path, "switching to WAL", e))
}

/// `PRAGMA quick_check`: SQLite's check of every page's structure (not of index contents,
/// which `integrity_check` adds; `omniflow doctor` runs that one). Linear in the file's size,
/// read-only.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let problems = run_check(conn, "quick_check", 5)
        .map_err(|e| open_error(path, "checking its integrity", e))?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Malformed {
            path: path.to_path_buf(),
            detail: format!("quick_check: {}", problems.join("; ")),
        })
    }
}

/// Runs `PRAGMA quick_check(n)` or `integrity_check(n)`: the problems found, none when "ok".
pub(crate) fn run_check(conn: &Connection, pragma: &str, n: u32) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare(&format!("PRAGMA {pragma}({n})"))?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    let lines: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
    Ok(problems(&lines))
}

/// The problems in a check's rows: a row may hold several lines under a
/// "*** in database main ***" heading, and a sound file answers one row, "ok".
fn problems(rows: &[String]) -> Vec<String> {
    rows.iter()
        .flat_map(|l| l.lines())
        .map(str::trim)
        .filter(|l| *l != "ok" && !l.is_empty() && !l.starts_with("***"))
        .map(str::to_string)
        .collect()
}

/// A read-only connection for queries and backups (never the writer's).
pub(crate) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    configure_sqlite();
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| open_error(path, "opening for reading", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| open_error(path, "setting busy_timeout", e))?;
    Ok(conn)
}

/// Refuses a non-empty file that does not start with SQLite's magic, before SQLite opens it
/// (SQLite would only notice on first read, after we might have asked it to write).
fn check_header(path: &Path) -> Result<(), StoreError> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        // Missing: SQLite creates it. Unreadable: let SQLite report it with its own words.
        Err(_) => return Ok(()),
    };
    let mut head = Vec::with_capacity(MAGIC.len());
    if file
        .by_ref()
        .take(MAGIC.len() as u64)
        .read_to_end(&mut head)
        .is_err()
    {
        return Ok(());
    }
    if head.is_empty() || head == MAGIC {
        Ok(())
    } else {
        Err(StoreError::NotADatabase {
            path: path.to_path_buf(),
        })
    }
}

fn check_version(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| open_error(path, "reading the schema version", e))?;
    if found > LATEST {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            known: LATEST,
        });
    }
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| open_error(path, "starting the migration", e))?;
    // Read again under the write lock: another process may have migrated meanwhile.
    let current: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| open_error(path, "reading the schema version", e))?;
    if current > LATEST {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: current,
            known: LATEST,
        });
    }
    if current == LATEST {
        return Ok(());
    }
    let done = usize::try_from(current).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tx.execute_batch(sql).map_err(|e| {
            tracing::error!(version = i + 1, error = %e, "migration failed");
            open_error(path, "migrating the schema", e)
        })?;
    }
    tx.pragma_update(None, "user_version", LATEST)
        .map_err(|e| open_error(path, "recording the schema version", e))?;
    tx.commit()
        .map_err(|e| open_error(path, "committing the migration", e))?;
    tracing::info!(path = %path.display(), from = current, to = LATEST, "database migrated");
    Ok(())
}

/// Turns an SQLite failure while opening into the error a user can act on.
pub(crate) fn open_error(path: &Path, doing: &'static str, e: rusqlite::Error) -> StoreError {
    if let Some(dir) = out_of_space(path, &e) {
        return StoreError::DiskFull {
            path: path.to_path_buf(),
            dir,
            source: e.into(),
        };
    }
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotADatabase {
            path: path.to_path_buf(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Malformed {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => {
            StoreError::Unwritable {
                path: path.to_path_buf(),
                source: e.into(),
            }
        }
        _ => StoreError::Database {
            place: path.display().to_string(),
            doing,
            source: e.into(),
        },
    }
}

/// Below this much free space, an I/O error is read as "disk full": SQLite reports a full
/// disk as `SQLITE_FULL` when a write fails, but as a plain I/O error when it cannot create
/// or grow its `-shm` and `-wal` files.
const NEARLY_FULL: u64 = 1 << 20;

/// The directory of `path` when `e` means its file system has no room left.
pub(crate) fn out_of_space(path: &Path, e: &rusqlite::Error) -> Option<std::path::PathBuf> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => std::path::PathBuf::from("."),
    };
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => Some(dir),
        Some(ErrorCode::SystemIoFailure) => {
            (free_bytes(&dir).is_some_and(|free| free < NEARLY_FULL)).then_some(dir)
        }
        _ => None,
    }
}

/// Free bytes for unprivileged users on the file system holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `doctor` and the refusal to open a damaged file list: the problems themselves,
    /// not the heading SQLite puts above them, and nothing for a sound file.
    #[test]
    fn a_check_lists_its_problems_without_their_heading() {
        let rows = [
            "*** in database main ***\nPage 5: btreeInitPage() returns error code 11\n".to_string(),
            "row 3 missing from index idx_steps_run".to_string(),
        ];
        assert_eq!(
            problems(&rows),
            [
                "Page 5: btreeInitPage() returns error code 11",
                "row 3 missing from index idx_steps_run"
            ]
        );
        assert!(problems(&["ok".to_string()]).is_empty());
    }

    /// Two processes creating one file at once may see "busy" where SQLite does not wait:
    /// that open starts over, until the busy timeout. A file that cannot be opened for any
    /// other reason is reported at once rather than after the busy timeout.
    #[test]
    fn only_a_busy_database_is_opened_again() {
        let path = Path::new("runs.db");
        let failed = |code| {
            open_error(
                path,
                "migrating the schema",
                rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
            )
        };
        let now = std::time::Instant::now();
        let later = now + BUSY_TIMEOUT;
        let again = |e: &StoreError| open_again(e, now, later);
        assert!(again(&failed(rusqlite::ffi::SQLITE_BUSY)));
        assert!(again(&failed(rusqlite::ffi::SQLITE_LOCKED)));
        // Any other database error, as well as the failures with a variant of their own.
        assert!(matches!(
            failed(rusqlite::ffi::SQLITE_ERROR),
            StoreError::Database { .. }
        ));
        assert!(!again(&failed(rusqlite::ffi::SQLITE_ERROR)));
        assert!(!again(&failed(rusqlite::ffi::SQLITE_READONLY)));
        assert!(!again(&failed(rusqlite::ffi::SQLITE_CORRUPT)));
        assert!(!again(&StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: LATEST + 1,
            known: LATEST,
        }));
        // Busy past the busy timeout: reported, not tried for ever.
        assert!(!open_again(
            &failed(rusqlite::ffi::SQLITE_BUSY),
            later,
            later
        ));
        assert!(!open_again(
            &failed(rusqlite::ffi::SQLITE_READONLY),
            later,
            now
        ));
    }

    /// A file with SQLite's magic whose header is nonsense (a page size SQLite does not
    /// allow): SQLite says "not a database" when it first reads it, and the user is told so,
    /// not given a bare database error; the file is left as it was.
    #[test]
    fn a_file_with_a_broken_sqlite_header_is_refused_as_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.db");
        let mut bytes = MAGIC.to_vec();
        bytes.resize(4096, 0);
        // The page size (bytes 16-17, big-endian): 3 is not a power of two.
        bytes[16] = 0;
        bytes[17] = 3;
        std::fs::write(&path, &bytes).unwrap();
        let err = open_writer(&path).map(drop).unwrap_err();
        assert!(
            matches!(err, StoreError::NotADatabase { .. }),
            "a broken header read as {err:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    /// Another connection holding the file's lock while a new file is switched to WAL (two
    /// processes creating one history at once): SQLite answers "busy" at once, and the open
    /// waits for the lock rather than failing; a lock held past the busy timeout is reported
    /// as busy rather than waited for without end.
    #[test]
    fn a_wal_switch_waits_for_a_lock_until_the_busy_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.db");
        // A file in the rollback journal, with a reader in a transaction: its shared lock
        // keeps the WAL switch from taking the exclusive one.
        let holder = Connection::open(&path).unwrap();
        holder
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1); BEGIN; SELECT * FROM t;")
            .unwrap();
        let open = |path: std::path::PathBuf| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(open_writer(&path).map(drop));
            });
            rx
        };

        let opened = open(path.clone());
        std::thread::sleep(Duration::from_millis(300));
        holder.execute_batch("COMMIT").unwrap();
        // Hang detection only.
        let r = opened
            .recv_timeout(BUSY_TIMEOUT * 6)
            .expect("the open never ended");
        assert!(r.is_ok(), "a lock held for a moment failed the open: {r:?}");
        drop(holder);
        let mode: String = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");

        let other = dir.path().join("other.db");
        let holder = Connection::open(&other).unwrap();
        holder
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1); BEGIN; SELECT * FROM t;")
            .unwrap();
        let r = open(other)
            .recv_timeout(BUSY_TIMEOUT * 6)
            .expect("a lock never released was waited for without end");
        match r {
            Err(StoreError::Database { source, .. }) => {
                assert_eq!(source.kind(), StoreErrorKind::Busy)
            }
            other => panic!("a lock never released: {other:?}"),
        }
    }
}
