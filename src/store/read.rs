//! Queries for the history panes and commands, and the online backup. Each runs on a
//! read-only connection taken from a small pool, never on the writer's connection, so reads
//! never wait behind a batch (WAL readers see the last committed state).

use super::error::{BackupFailure, StoreError};
use super::schema::open_reader;
use super::types::{AttemptRow, RunFilter, RunRow, StepRow};
use super::Store;
use crate::blueprint::Priority;
use crate::events::{RunStatus, StepStatus};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::types::{Type, Value as SqlValue};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Idle read connections kept for reuse.
const POOL_KEEP: usize = 4;
/// How many times a backup waits 100 ms for a lock before giving up.
const BACKUP_TRIES: u32 = 50;

const RUN_COLUMNS: &str = "id, blueprint_name, status, priority, trigger, sandbox, seed,
    simulate_failures, variables, blueprint, parent_run_id, queued_at, started_at, finished_at,
    total_time_ms, tokens_used, steps_total, steps_done, error, error_kind, failed_step";

const STEP_COLUMNS: &str = "run_id, step_key, node_id, item_index, status, attempts, input,
    output, error_kind, error, tokens_used, cached, provider, model, queued_at, started_at,
    finished_at, duration_ms, reply_model, finish_reason";

/// A value the row holds that this build cannot decode.
#[derive(Debug)]
struct BadValue(String);

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadValue {}

fn bad(col: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, Type::Text, Box::new(BadValue(what)))
}

/// Non-negative integers are stored as i64; a negative one can only come from a hand edit.
fn u64_at(row: &Row<'_>, col: usize) -> rusqlite::Result<Option<u64>> {
    Ok(row
        .get::<_, Option<i64>>(col)?
        .map(|v| u64::try_from(v).unwrap_or(0)))
}

fn u32_at(row: &Row<'_>, col: usize) -> rusqlite::Result<Option<u32>> {
    Ok(u64_at(row, col)?.map(|v| u32::try_from(v).unwrap_or(u32::MAX)))
}

/// JSON columns. Text that is not JSON (a hand edit) is shown as the string it is rather than
/// failing a whole history page.
fn json_at(row: &Row<'_>, col: usize) -> rusqlite::Result<Option<Value>> {
    Ok(row
        .get::<_, Option<String>>(col)?
        .map(|text| serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// Timestamps are ISO-8601 text in SQLite; a value that is not one (a hand edit) is reported
/// as a value this build does not understand.
pub(crate) fn time_at(row: &Row<'_>, col: usize) -> rusqlite::Result<Option<SystemTime>> {
    match row.get::<_, Option<String>>(col)? {
        None => Ok(None),
        Some(text) => humantime::parse_rfc3339_weak(text.trim_end_matches('Z'))
            .map(Some)
            .map_err(|_| bad(col, format!("timestamp {text:?}"))),
    }
}

pub(crate) fn time_req(row: &Row<'_>, col: usize) -> rusqlite::Result<SystemTime> {
    time_at(row, col)?.ok_or_else(|| bad(col, "a missing timestamp".into()))
}

fn run_row(row: &Row<'_>) -> rusqlite::Result<RunRow> {
    let status: String = row.get(2)?;
    let priority: String = row.get(3)?;
    Ok(RunRow {
        id: row.get(0)?,
        blueprint_name: row.get(1)?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| bad(2, format!("run status {status:?}")))?,
        priority: Priority::parse(&priority)
            .ok_or_else(|| bad(3, format!("run priority {priority:?}")))?,
        trigger: row.get(4)?,
        sandbox: row.get(5)?,
        // Stored as the same 64 bits (see the writer's insert_run).
        seed: row.get::<_, Option<i64>>(6)?.map(|s| s as u64),
        simulate_failures: row.get::<_, Option<f64>>(7)?.unwrap_or(0.0),
        variables: json_at(row, 8)?.unwrap_or(Value::Null),
        blueprint: json_at(row, 9)?,
        parent_run_id: row.get(10)?,
        queued_at: time_req(row, 11)?,
        started_at: time_at(row, 12)?,
        finished_at: time_at(row, 13)?,
        total_time_ms: u64_at(row, 14)?,
        tokens_used: u64_at(row, 15)?.unwrap_or(0),
        steps_total: u32_at(row, 16)?,
        steps_done: u32_at(row, 17)?,
        error: row.get(18)?,
        error_kind: super::types::error_kind(row.get(19)?),
        failed_step: row.get(20)?,
    })
}

fn step_row(row: &Row<'_>) -> rusqlite::Result<StepRow> {
    let status: String = row.get(4)?;
    Ok(StepRow {
        run_id: row.get(0)?,
        step_key: row.get(1)?,
        node_id: row.get(2)?,
        item_index: u32_at(row, 3)?,
        status: StepStatus::parse(&status)
            .ok_or_else(|| bad(4, format!("step status {status:?}")))?,
        attempts: u32_at(row, 5)?.unwrap_or(0),
        input: json_at(row, 6)?,
        output: json_at(row, 7)?,
        error_kind: super::types::error_kind(row.get(8)?),
        error: row.get(9)?,
        tokens_used: u64_at(row, 10)?.unwrap_or(0),
        cached: row.get(11)?,
        provider: row.get(12)?,
        model: row.get(13)?,
        queued_at: time_at(row, 14)?,
        started_at: time_at(row, 15)?,
        finished_at: time_at(row, 16)?,
        duration_ms: u64_at(row, 17)?,
        reply_model: row.get(18)?,
        finish_reason: row.get(19)?,
    })
}

fn attempt_row(row: &Row<'_>) -> rusqlite::Result<AttemptRow> {
    let status: String = row.get(2)?;
    Ok(AttemptRow {
        step_key: row.get(0)?,
        attempt: u32_at(row, 1)?.unwrap_or(0),
        ok: status == "success",
        error_kind: super::types::error_kind(row.get(3)?),
        error: row.get(4)?,
        wait_ms: u64_at(row, 5)?,
        started_at: time_req(row, 6)?,
        finished_at: time_req(row, 7)?,
        duration_ms: u64_at(row, 8)?.unwrap_or(0),
        tokens_used: u64_at(row, 9)?.unwrap_or(0),
        provider: row.get(10)?,
        model: row.get(11)?,
        cached: row.get(12)?,
    })
}

/// `WHERE` clause and parameters shared by `list_runs` and `count_runs`.
fn filter_sql(f: &RunFilter, with_cursor: bool) -> (String, Vec<SqlValue>) {
    let mut sql = String::from(" WHERE 1 = 1");
    let mut args = Vec::new();
    if let Some(status) = f.status {
        sql.push_str(" AND status = ?");
        args.push(SqlValue::Text(status.as_str().into()));
    }
    if let Some(bp) = &f.blueprint {
        sql.push_str(" AND blueprint_name = ?");
        args.push(SqlValue::Text(bp.clone()));
    }
    if let Some(part) = &f.name_contains {
        // A literal substring (no wildcards to escape), any case.
        sql.push_str(" AND instr(lower(blueprint_name), lower(?)) > 0");
        args.push(SqlValue::Text(part.clone()));
    }
    if let (true, Some(cursor)) = (with_cursor, &f.before) {
        // Row-value comparison: SQLite turns it into a range on the (…, started_at, id) index.
        sql.push_str(" AND (started_at, id) < (?, ?)");
        args.push(SqlValue::Text(super::iso8601(cursor.started())));
        args.push(SqlValue::Text(cursor.id.clone()));
    }
    (sql, args)
}

/// Escapes GLOB's special characters so a prefix matches literally.
fn glob_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        match c {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    out.push('*');
    out
}

impl Store {
    /// Runs `f` on a pooled read-only connection.
    pub(super) fn read<T>(
        &self,
        doing: &'static str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let pooled = self.readers().pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_reader(self.sqlite_path())?,
        };
        let result = f(&conn);
        {
            let mut pool = self.readers();
            if pool.len() < POOL_KEEP {
                pool.push(conn);
            }
        }
        result.map_err(|e| self.read_error(doing, e))
    }

    fn read_error(&self, doing: &'static str, e: rusqlite::Error) -> StoreError {
        match e {
            rusqlite::Error::FromSqlConversionFailure(_, _, inner) => StoreError::Corrupt {
                place: self.place(),
                setting: "DB_FILE",
                detail: inner.to_string(),
            },
            e => StoreError::Database {
                place: self.place(),
                doing,
                source: e.into(),
            },
        }
    }

    /// Runs newest first (`started_at DESC, id DESC`), at most `f.limit`, strictly older than
    /// `f.before` when set. Pass [`RunFilter::cursor_after`] of the last row to get the next
    /// page: every run appears exactly once across pages, even while new runs arrive.
    pub fn list_runs(&self, f: &RunFilter) -> Result<Vec<RunRow>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.list_runs(f);
        }
        if f.limit == 0 {
            return Ok(Vec::new());
        }
        let (filter, mut args) = filter_sql(f, true);
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runner_executions{filter}
             ORDER BY started_at DESC, id DESC LIMIT ?"
        );
        args.push(SqlValue::Integer(
            i64::try_from(f.limit).unwrap_or(i64::MAX),
        ));
        self.read("listing runs", |c| {
            c.prepare_cached(&sql)?
                .query_map(params_from_iter(args), run_row)?
                .collect()
        })
    }

    /// How many runs match `f.status` and `f.blueprint` (`limit` and `before` are ignored).
    pub fn count_runs(&self, f: &RunFilter) -> Result<u64, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.count_runs(f);
        }
        let (filter, args) = filter_sql(f, false);
        let sql = format!("SELECT COUNT(*) FROM runner_executions{filter}");
        let n: i64 = self.read("counting runs", |c| {
            c.prepare_cached(&sql)?
                .query_row(params_from_iter(args), |r| r.get(0))
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The run with this exact id, else the only run whose id starts with it.
    pub fn find_run(&self, id_or_prefix: &str) -> Result<RunRow, StoreError> {
        let exact = format!("SELECT {RUN_COLUMNS} FROM runner_executions WHERE id = ?1");
        let by_prefix = format!(
            "SELECT {RUN_COLUMNS} FROM runner_executions WHERE id GLOB ?1 ORDER BY id LIMIT 6"
        );
        let pattern = glob_prefix(id_or_prefix);
        let found = if let Some(pg) = self.pg() {
            pg.find_runs(id_or_prefix)?
        } else {
            self.read("looking up a run", |c| {
                if let Some(run) = c
                    .prepare_cached(&exact)?
                    .query_row([id_or_prefix], run_row)
                    .optional()?
                {
                    return Ok(vec![run]);
                }
                if id_or_prefix.is_empty() {
                    return Ok(Vec::new());
                }
                c.prepare_cached(&by_prefix)?
                    .query_map([pattern], run_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })?
        };
        let mut found = found.into_iter();
        match (found.next(), found.next()) {
            (None, _) => Err(StoreError::NotFound(id_or_prefix.to_string())),
            (Some(run), None) => Ok(run),
            (Some(a), Some(b)) => Err(StoreError::Ambiguous {
                prefix: id_or_prefix.to_string(),
                ids: [a, b]
                    .into_iter()
                    .chain(found)
                    .take(5)
                    .map(|r| r.id)
                    .collect(),
            }),
        }
    }

    /// A run's steps in the order they were recorded (graph order). Empty for an unknown run.
    pub fn run_steps(&self, run_id: &str) -> Result<Vec<StepRow>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.run_steps(run_id);
        }
        let sql = format!("SELECT {STEP_COLUMNS} FROM runner_steps WHERE run_id = ?1 ORDER BY seq");
        self.read("reading a run's steps", |c| {
            c.prepare_cached(&sql)?
                .query_map([run_id], step_row)?
                .collect()
        })
    }

    /// A run's attempts, grouped by step in step order, then by attempt number.
    pub fn run_attempts(&self, run_id: &str) -> Result<Vec<AttemptRow>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.run_attempts(run_id);
        }
        self.read("reading a run's attempts", |c| {
            c.prepare_cached(
                "SELECT a.step_key, a.attempt, a.status, a.error_kind, a.error, a.wait_ms,
                        a.started_at, a.finished_at, a.duration_ms, a.tokens_used, a.provider,
                        a.model, a.cached
                 FROM runner_attempts a
                 LEFT JOIN runner_steps s ON s.run_id = a.run_id AND s.step_key = a.step_key
                 WHERE a.run_id = ?1
                 ORDER BY s.seq, a.step_key, a.attempt",
            )?
            .query_map(params![run_id], attempt_row)?
            .collect()
        })
    }

    /// A consistent copy of the database at `dest` while it is in use, through SQLite's
    /// online backup (a plain `cp` of a WAL database can miss recent writes).
    ///
    /// The copy is written to `<dest>.partial` and renamed into place, so `dest` is either the
    /// old file or a complete backup, never half of one. An existing `dest` is replaced.
    /// Writes queued but not yet committed are not in the copy: `flush` first to include them.
    pub fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        if self.pg().is_some() {
            return Err(StoreError::NotOnPostgres {
                what: "omniflow backup",
                instead: "copy the database with `pg_dump -Fc -f omniflow.dump \"$DATABASE_URL\"` (and `pg_restore` to bring it back)",
            });
        }
        backup_with(self.sqlite_path(), dest, |copy| {
            self.read("reading for a backup", |src| Ok(copy(src)))
        })
    }
}

/// [`Store::backup`] without opening the store: for a file the store refuses to open (a
/// damaged one), whose pages are copied as they are, without writing to the file itself.
pub fn backup_file(src: &Path, dest: &Path) -> Result<(), StoreError> {
    backup_with(src, dest, |copy| {
        let conn = open_reader(src)?;
        Ok(copy(&conn))
    })
}

fn backup_with(
    src: &Path,
    dest: &Path,
    with_source: impl FnOnce(
        &dyn Fn(&Connection) -> Result<(), BackupFailure>,
    ) -> Result<Result<(), BackupFailure>, StoreError>,
) -> Result<(), StoreError> {
    {
        let fail = |source: BackupFailure| StoreError::Backup {
            from: src.to_path_buf(),
            dest: dest.to_path_buf(),
            source,
        };
        if same_file(src, dest) {
            return Err(fail(BackupFailure::SameFile));
        }
        let mut partial = dest.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        match std::fs::remove_file(&partial) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.into())),
        }
        let copied = with_source(&|conn: &Connection| copy_into(conn, &partial))?;
        if let Err(e) = copied.and_then(|()| Ok(std::fs::rename(&partial, dest)?)) {
            // Best effort: a leftover .partial is harmless and replaced next time.
            let _ = std::fs::remove_file(&partial);
            return Err(fail(e));
        }
        Ok(())
    }
}

/// Copies every page in one step: one read transaction sees one snapshot, and concurrent
/// commits by the writer cannot restart the copy (they would, page batch by page batch).
pub(super) fn copy_into(src: &Connection, partial: &Path) -> Result<(), BackupFailure> {
    let mut dst = Connection::open(partial)?;
    {
        let backup = Backup::new(src, &mut dst)?;
        let mut tries = 0;
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                // Busy/Locked copy nothing; the lock holder is usually done within moments.
                other if tries < BACKUP_TRIES => {
                    tries += 1;
                    tracing::debug!(?other, tries, "backup step must wait");
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => {
                    return Err(BackupFailure::from(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some(format!("the backup did not finish ({other:?})")),
                    )))
                }
            }
        }
    }
    dst.close().map_err(|(_, e)| BackupFailure::from(e))?;
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
