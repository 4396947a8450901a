//! `omniflow migrate --to postgres://…`: copies an SQLite history (runs, steps, attempts, sent
//! notifications, schedule slots, the provider cache) into PostgreSQL.
//!
//! Idempotent and resumable: every row is inserted under its primary key, so a second copy
//! adds only what is missing, and an interrupted copy (each chunk of rows is its own
//! transaction) goes on where it stopped when run again. A run or step that was still in
//! flight when it was copied is brought up to date by the next copy, with the transitions'
//! guard: only a row that is not final yet is overwritten. Processes are not copied: they are
//! each host's own, and a copied unfinished run whose owner never heartbeats in PostgreSQL is
//! adoptable there at once.

use super::backend::pg_error;
use super::connect::PgTarget;
use crate::store::error::StoreError;
use crate::store::Store;
use postgres::types::ToSql;
use rusqlite::types::Value;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Rows per PostgreSQL transaction.
const CHUNK: usize = 1000;

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Int,
    Real,
    Bool,
    /// ISO-8601 text in SQLite.
    Time,
    /// Unix milliseconds in SQLite.
    TimeMs,
}

struct Table {
    name: &'static str,
    /// Shown in the summary.
    label: &'static str,
    key: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// `None`: rows already there are kept. `Some(guard)`: they are brought up to date while
    /// the guard holds (a row not final yet).
    update_while: Option<&'static str>,
}

use Kind::*;

const TABLES: &[Table] = &[
    Table {
        name: "runner_executions",
        label: "runs",
        key: "id",
        columns: &[
            ("id", Text),
            ("blueprint_name", Text),
            ("status", Text),
            ("priority", Text),
            ("trigger", Text),
            ("sandbox", Bool),
            ("seed", Int),
            ("simulate_failures", Real),
            ("variables", Text),
            ("blueprint", Text),
            ("parent_run_id", Text),
            ("queued_at", Time),
            ("started_at", Time),
            ("finished_at", Time),
            ("total_time_ms", Int),
            ("tokens_used", Int),
            ("steps_total", Int),
            ("steps_done", Int),
            ("error", Text),
            ("error_kind", Text),
            ("failed_step", Text),
            ("host", Text),
            ("pid", Int),
            ("owner", Text),
            ("takeovers", Int),
        ],
        update_while: Some("runner_executions.status IN ('queued', 'running')"),
    },
    Table {
        name: "runner_steps",
        label: "steps",
        key: "run_id, step_key",
        columns: &[
            ("run_id", Text),
            ("step_key", Text),
            ("node_id", Text),
            ("item_index", Int),
            ("status", Text),
            ("attempts", Int),
            ("input", Text),
            ("output", Text),
            ("error_kind", Text),
            ("error", Text),
            ("tokens_used", Int),
            ("cached", Bool),
            ("provider", Text),
            ("model", Text),
            ("queued_at", Time),
            ("started_at", Time),
            ("finished_at", Time),
            ("duration_ms", Int),
            ("seq", Int),
            ("reply_model", Text),
            ("finish_reason", Text),
        ],
        update_while: Some("runner_steps.status IN ('pending', 'running', 'retrying')"),
    },
    Table {
        name: "runner_attempts",
        label: "attempts",
        key: "run_id, step_key, attempt",
        columns: &[
            ("run_id", Text),
            ("step_key", Text),
            ("attempt", Int),
            ("status", Text),
            ("error_kind", Text),
            ("error", Text),
            ("wait_ms", Int),
            ("started_at", Time),
            ("finished_at", Time),
            ("duration_ms", Int),
            ("tokens_used", Int),
            ("provider", Text),
            ("model", Text),
            ("cached", Bool),
            ("fallback", Text),
        ],
        update_while: None,
    },
    Table {
        name: "notifications_sent",
        label: "sent notifications",
        key: "dedupe_key",
        columns: &[
            ("dedupe_key", Text),
            ("run_id", Text),
            ("step_key", Text),
            ("channel", Text),
            ("part", Int),
            ("sent_at", Time),
            ("message_ids", Text),
            ("state", Text),
        ],
        update_while: None,
    },
    Table {
        name: "schedule_slots",
        label: "schedule slots",
        key: "blueprint_name, slot_ms",
        columns: &[
            ("blueprint_name", Text),
            ("slot_ms", Int),
            ("slot", Time),
            ("claimed_at", Time),
            ("run_id", Text),
            ("host", Text),
            ("pid", Int),
        ],
        update_while: None,
    },
    Table {
        name: "provider_cache",
        label: "cached answers",
        key: "key",
        columns: &[
            ("key", Text),
            ("provider", Text),
            ("model", Text),
            ("output", Text),
            ("tokens_used", Int),
            ("created_at", Time),
            ("expires_at", TimeMs),
        ],
        update_while: None,
    },
];

/// What one table's copy did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Copied {
    pub table: &'static str,
    pub label: &'static str,
    /// Rows in the SQLite file.
    pub read: u64,
    /// Rows written (new, or brought up to date); the rest were already there.
    pub written: u64,
}

/// A row value, owned, for the driver.
enum Param {
    Text(Option<String>),
    Int(Option<i64>),
    Real(Option<f64>),
    Bool(Option<bool>),
    Time(Option<SystemTime>),
}

impl Param {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(v) => v,
            Param::Int(v) => v,
            Param::Real(v) => v,
            Param::Bool(v) => v,
            Param::Time(v) => v,
        }
    }
}

fn convert(v: Value, kind: Kind, col: &str) -> Result<Param, String> {
    let bad = |what: &str| format!("column {col} holds {what}");
    Ok(match (kind, v) {
        (Text, Value::Null) => Param::Text(None),
        (Text, Value::Text(s)) => Param::Text(Some(s)),
        (Text, Value::Integer(i)) => Param::Text(Some(i.to_string())),
        (Text, Value::Real(r)) => Param::Text(Some(r.to_string())),
        (Int, Value::Null) => Param::Int(None),
        (Int, Value::Integer(i)) => Param::Int(Some(i)),
        (Real, Value::Null) => Param::Real(None),
        (Real, Value::Real(r)) => Param::Real(Some(r)),
        (Real, Value::Integer(i)) => Param::Real(Some(i as f64)),
        (Bool, Value::Null) => Param::Bool(None),
        (Bool, Value::Integer(i)) => Param::Bool(Some(i != 0)),
        (Time, Value::Null) | (TimeMs, Value::Null) => Param::Time(None),
        (Time, Value::Text(s)) => Param::Time(Some(
            humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
                .map_err(|_| bad(&format!("the timestamp {s:?}")))?,
        )),
        (TimeMs, Value::Integer(ms)) => Param::Time(Some(
            UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
        )),
        (_, other) => return Err(bad(&format!("an unexpected {:?}", other.data_type()))),
    })
}

/// Copies the SQLite history at `src` into `target` (migrating both first) and says, per
/// table, how many rows it read and wrote. Blocking: run it off any async runtime.
pub fn import_sqlite(src: &Path, target: &PgTarget) -> Result<Vec<Copied>, StoreError> {
    // Both sides at this build's schema (the SQLite file may be older).
    drop(Store::open(src)?);
    drop(Store::open_postgres(target)?);
    let sqlite = crate::store::schema::open_reader(src)?;
    let t = target.clone();
    // The driver runs on a thread of its own; SQLite rows are sent to it in chunks.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<Vec<Param>>)>(2);
    let writer = std::thread::spawn(move || -> Result<Vec<u64>, StoreError> {
        let mut client = t
            .connect()
            .map_err(|message| StoreError::Unavailable { message })?;
        let mut written = vec![0u64; TABLES.len()];
        let statements: Vec<String> = TABLES.iter().map(insert_sql).collect();
        for (table, rows) in rx {
            let mut txn = client
                .transaction()
                .map_err(|e| pg_error(&t, "copying rows", e))?;
            let stmt = txn
                .prepare(&statements[table])
                .map_err(|e| pg_error(&t, "copying rows", e))?;
            for row in &rows {
                let params: Vec<&(dyn ToSql + Sync)> = row.iter().map(Param::sql).collect();
                written[table] += txn
                    .execute(&stmt, &params)
                    .map_err(|e| pg_error(&t, "copying rows", e))?;
            }
            txn.commit().map_err(|e| pg_error(&t, "copying rows", e))?;
        }
        // Steps recorded from now on sort after the copied ones.
        client
            .batch_execute(
                "SELECT setval(pg_get_serial_sequence('runner_steps', 'seq'),
                               GREATEST((SELECT MAX(seq) FROM runner_steps), 1))",
            )
            .map_err(|e| pg_error(&t, "copying rows", e))?;
        drop(client);
        Ok(written)
    });
    let mut read = vec![0u64; TABLES.len()];
    let sent = (|| -> Result<(), StoreError> {
        for (i, table) in TABLES.iter().enumerate() {
            let cols: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
            let sql = format!(
                "SELECT {} FROM {} ORDER BY rowid",
                cols.join(", "),
                table.name
            );
            let fail = |e: rusqlite::Error| StoreError::Database {
                place: src.display().to_string(),
                doing: "reading for the copy",
                source: e.into(),
            };
            let mut stmt = sqlite.prepare(&sql).map_err(fail)?;
            let mut rows = stmt.query([]).map_err(fail)?;
            let mut chunk = Vec::with_capacity(CHUNK);
            while let Some(r) = rows.next().map_err(fail)? {
                let mut row = Vec::with_capacity(cols.len());
                for (n, (col, kind)) in table.columns.iter().enumerate() {
                    let v: Value = r.get(n).map_err(fail)?;
                    row.push(
                        convert(v, *kind, col).map_err(|detail| StoreError::Corrupt {
                            place: src.display().to_string(),
                            setting: "DB_FILE",
                            detail: format!("{}: {detail}", table.name),
                        })?,
                    );
                }
                chunk.push(row);
                read[i] += 1;
                if chunk.len() == CHUNK && tx.send((i, std::mem::take(&mut chunk))).is_err() {
                    return Ok(());
                }
            }
            if !chunk.is_empty() && tx.send((i, chunk)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    })();
    drop(tx);
    let written = writer.join().map_err(|_| StoreError::Unavailable {
        message: format!("copying into {} panicked", target.shown()),
    })??;
    sent?;
    Ok(TABLES
        .iter()
        .enumerate()
        .map(|(i, t)| Copied {
            table: t.name,
            label: t.label,
            read: read[i],
            written: written[i],
        })
        .collect())
}

fn insert_sql(t: &Table) -> String {
    let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let on_conflict = match t.update_while {
        None => "DO NOTHING".to_string(),
        Some(guard) => format!(
            "DO UPDATE SET {} WHERE {guard}",
            cols.iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
        t.name,
        cols.join(", "),
        params.join(", "),
        t.key
    )
}
