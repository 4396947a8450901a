//! The history queries of `store/read.rs` in PostgreSQL's dialect, run on the reader threads.
//! Rows decode into the same types; a value this build cannot decode is reported as
//! `StoreError::Corrupt`, as on SQLite.

use super::backend::{Fail, PgBackend, PgResult};
use super::ops::ms_time;
use crate::blueprint::Priority;
use crate::events::{RunStatus, StepStatus};
use crate::store::error::StoreError;
use crate::store::providers::CachedAnswer;
use crate::store::types::{AttemptRow, RunFilter, RunRow, StepRow};
use postgres::types::ToSql;
use postgres::Row;
use serde_json::Value;
use std::time::SystemTime;

pub(super) const RUN_COLUMNS: &str = "id, blueprint_name, status, priority, trigger, sandbox, seed,
    simulate_failures, variables, blueprint, parent_run_id, queued_at, started_at, finished_at,
    total_time_ms, tokens_used, steps_total, steps_done, error, error_kind, failed_step";

const STEP_COLUMNS: &str = "run_id, step_key, node_id, item_index, status, attempts, input,
    output, error_kind, error, tokens_used, cached, provider, model, queued_at, started_at,
    finished_at, duration_ms, reply_model, finish_reason";

fn u64_at(row: &Row, col: usize) -> PgResult<Option<u64>> {
    Ok(row
        .try_get::<_, Option<i64>>(col)?
        .map(|v| u64::try_from(v).unwrap_or(0)))
}

fn u32_at(row: &Row, col: usize) -> PgResult<Option<u32>> {
    Ok(u64_at(row, col)?.map(|v| u32::try_from(v).unwrap_or(u32::MAX)))
}

/// JSON columns; text that is not JSON (a hand edit) is shown as the string it is.
fn json_at(row: &Row, col: usize) -> PgResult<Option<Value>> {
    Ok(row
        .try_get::<_, Option<String>>(col)?
        .map(|text| serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

pub(crate) fn run_row(row: &Row) -> PgResult<RunRow> {
    let status: String = row.try_get(2)?;
    let priority: String = row.try_get(3)?;
    Ok(RunRow {
        id: row.try_get(0)?,
        blueprint_name: row.try_get(1)?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| Fail::Corrupt(format!("run status {status:?}")))?,
        priority: Priority::parse(&priority)
            .ok_or_else(|| Fail::Corrupt(format!("run priority {priority:?}")))?,
        trigger: row.try_get(4)?,
        sandbox: row.try_get(5)?,
        seed: row.try_get::<_, Option<i64>>(6)?.map(|s| s as u64),
        simulate_failures: row.try_get::<_, Option<f64>>(7)?.unwrap_or(0.0),
        variables: json_at(row, 8)?.unwrap_or(Value::Null),
        blueprint: json_at(row, 9)?,
        parent_run_id: row.try_get(10)?,
        queued_at: row.try_get(11)?,
        started_at: row.try_get(12)?,
        finished_at: row.try_get(13)?,
        total_time_ms: u64_at(row, 14)?,
        tokens_used: u64_at(row, 15)?.unwrap_or(0),
        steps_total: u32_at(row, 16)?,
        steps_done: u32_at(row, 17)?,
        error: row.try_get(18)?,
        error_kind: crate::store::types::error_kind(row.try_get(19)?),
        failed_step: row.try_get(20)?,
    })
}

fn step_row(row: &Row) -> PgResult<StepRow> {
    let status: String = row.try_get(4)?;
    Ok(StepRow {
        run_id: row.try_get(0)?,
        step_key: row.try_get(1)?,
        node_id: row.try_get(2)?,
        item_index: u32_at(row, 3)?,
        status: StepStatus::parse(&status)
            .ok_or_else(|| Fail::Corrupt(format!("step status {status:?}")))?,
        attempts: u32_at(row, 5)?.unwrap_or(0),
        input: json_at(row, 6)?,
        output: json_at(row, 7)?,
        error_kind: crate::store::types::error_kind(row.try_get(8)?),
        error: row.try_get(9)?,
        tokens_used: u64_at(row, 10)?.unwrap_or(0),
        cached: row.try_get(11)?,
        provider: row.try_get(12)?,
        model: row.try_get(13)?,
        queued_at: row.try_get(14)?,
        started_at: row.try_get(15)?,
        finished_at: row.try_get(16)?,
        duration_ms: u64_at(row, 17)?,
        reply_model: row.try_get(18)?,
        finish_reason: row.try_get(19)?,
    })
}

fn attempt_row(row: &Row) -> PgResult<AttemptRow> {
    let status: String = row.try_get(2)?;
    Ok(AttemptRow {
        step_key: row.try_get(0)?,
        attempt: u32_at(row, 1)?.unwrap_or(0),
        ok: status == "success",
        error_kind: crate::store::types::error_kind(row.try_get(3)?),
        error: row.try_get(4)?,
        wait_ms: u64_at(row, 5)?,
        started_at: row.try_get(6)?,
        finished_at: row.try_get(7)?,
        duration_ms: u64_at(row, 8)?.unwrap_or(0),
        tokens_used: u64_at(row, 9)?.unwrap_or(0),
        provider: row.try_get(10)?,
        model: row.try_get(11)?,
        cached: row.try_get(12)?,
    })
}

/// A query parameter owned by a closure that runs on another thread.
enum Param {
    Text(String),
    Time(SystemTime),
    Int(i64),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(s) => s,
            Param::Time(t) => t,
            Param::Int(i) => i,
        }
    }
}

fn filter_sql(f: &RunFilter, with_cursor: bool) -> (String, Vec<Param>) {
    let mut sql = String::from(" WHERE TRUE");
    let mut args = Vec::new();
    let next = |args: &mut Vec<Param>, p: Param| {
        args.push(p);
        format!("${}", args.len())
    };
    if let Some(status) = f.status {
        let n = next(&mut args, Param::Text(status.as_str().into()));
        sql.push_str(&format!(" AND status = {n}"));
    }
    if let Some(bp) = &f.blueprint {
        let n = next(&mut args, Param::Text(bp.clone()));
        sql.push_str(&format!(" AND blueprint_name = {n}"));
    }
    if let Some(part) = &f.name_contains {
        // A literal substring (no wildcards to escape), any case.
        let n = next(&mut args, Param::Text(part.clone()));
        sql.push_str(&format!(
            " AND strpos(lower(blueprint_name), lower({n})) > 0"
        ));
    }
    if let (true, Some(cursor)) = (with_cursor, &f.before) {
        let a = next(&mut args, Param::Time(ms_time(cursor.started())));
        let b = next(&mut args, Param::Text(cursor.id.clone()));
        sql.push_str(&format!(" AND (started_at, id) < ({a}, {b})"));
    }
    (sql, args)
}

impl PgBackend {
    pub(crate) fn list_runs(&self, f: &RunFilter) -> Result<Vec<RunRow>, StoreError> {
        if f.limit == 0 {
            return Ok(Vec::new());
        }
        let (filter, mut args) = filter_sql(f, true);
        args.push(Param::Int(i64::try_from(f.limit).unwrap_or(i64::MAX)));
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runner_executions{filter}
             ORDER BY started_at DESC, id DESC LIMIT ${}",
            args.len()
        );
        self.read("listing runs", move |c| {
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(Param::as_sql).collect();
            c.query(&sql, &params)?.iter().map(run_row).collect()
        })
    }

    pub(crate) fn count_runs(&self, f: &RunFilter) -> Result<u64, StoreError> {
        let (filter, args) = filter_sql(f, false);
        let sql = format!("SELECT COUNT(*) FROM runner_executions{filter}");
        let n: i64 = self.read("counting runs", move |c| {
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(Param::as_sql).collect();
            Ok(c.query_one(&sql, &params)?.try_get(0)?)
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The run with this exact id, then up to six whose id starts with it.
    pub(crate) fn find_runs(&self, id_or_prefix: &str) -> Result<Vec<RunRow>, StoreError> {
        let id = id_or_prefix.to_string();
        self.read("looking up a run", move |c| {
            let exact = format!("SELECT {RUN_COLUMNS} FROM runner_executions WHERE id = $1");
            if let Some(row) = c.query_opt(&exact, &[&id])? {
                return Ok(vec![run_row(&row)?]);
            }
            if id.is_empty() {
                return Ok(Vec::new());
            }
            let by_prefix = format!(
                "SELECT {RUN_COLUMNS} FROM runner_executions WHERE starts_with(id, $1)
                 ORDER BY id LIMIT 6"
            );
            c.query(&by_prefix, &[&id])?.iter().map(run_row).collect()
        })
    }

    pub(crate) fn run_steps(&self, run_id: &str) -> Result<Vec<StepRow>, StoreError> {
        let id = run_id.to_string();
        self.read("reading a run's steps", move |c| {
            let sql =
                format!("SELECT {STEP_COLUMNS} FROM runner_steps WHERE run_id = $1 ORDER BY seq");
            c.query(&sql, &[&id])?.iter().map(step_row).collect()
        })
    }

    pub(crate) fn run_attempts(&self, run_id: &str) -> Result<Vec<AttemptRow>, StoreError> {
        let id = run_id.to_string();
        self.read("reading a run's attempts", move |c| {
            c.query(
                "SELECT a.step_key, a.attempt, a.status, a.error_kind, a.error, a.wait_ms,
                        a.started_at, a.finished_at, a.duration_ms, a.tokens_used, a.provider,
                        a.model, a.cached
                 FROM runner_attempts a
                 LEFT JOIN runner_steps s ON s.run_id = a.run_id AND s.step_key = a.step_key
                 WHERE a.run_id = $1
                 ORDER BY s.seq, a.step_key, a.attempt",
                &[&id],
            )?
            .iter()
            .map(attempt_row)
            .collect()
        })
    }

    pub(crate) fn run_fallbacks(
        &self,
        run_id: &str,
    ) -> Result<Vec<(String, u32, String)>, StoreError> {
        let id = run_id.to_string();
        self.read("reading a run's provider fallbacks", move |c| {
            c.query(
                "SELECT step_key, attempt, fallback FROM runner_attempts
                 WHERE run_id = $1 AND fallback IS NOT NULL ORDER BY step_key, attempt",
                &[&id],
            )?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, String>(0)?,
                    u32::try_from(r.try_get::<_, i64>(1)?).unwrap_or(0),
                    r.try_get::<_, String>(2)?,
                ))
            })
            .collect()
        })
    }

    pub(crate) fn cache_get(
        &self,
        key: &str,
        now: SystemTime,
    ) -> Result<Option<CachedAnswer>, StoreError> {
        let key = key.to_string();
        let now = ms_time(now);
        self.read("reading the response cache", move |c| {
            let Some(r) = c.query_opt(
                "SELECT provider, model, output, tokens_used, created_at, expires_at
                 FROM provider_cache WHERE key = $1 AND expires_at > $2",
                &[&key, &now],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(CachedAnswer {
                key: key.clone(),
                provider: r.try_get(0)?,
                model: r.try_get(1)?,
                output: r.try_get(2)?,
                tokens_used: u64::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0),
                created_at: r.try_get(4)?,
                expires_at: r.try_get(5)?,
            }))
        })
    }

    /// The newest migration applied to the database.
    pub(crate) fn schema_version(&self) -> Result<i64, StoreError> {
        self.read("reading the schema version", |c| {
            Ok(super::schema::applied(c)?)
        })
    }
}
