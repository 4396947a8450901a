//! Every transition of `store/transitions.rs` in PostgreSQL's dialect, with the same guard
//! (the same `WHERE` on the state it expects). The guard's row count goes back to the shared
//! [`Op::verdict`], so "applied" and "ignored" mean the same on both backends.
//!
//! Parameters carry explicit casts: in `INSERT … SELECT $1, …` PostgreSQL cannot infer a
//! parameter's type from the target column.

use crate::store::transitions::{Op, ProcessInfo, StepRecord};
use crate::store::types::{AttemptRecord, NewRun, NewStep, RunEnd, StepEnd};
use crate::store::{from_unix_ms, unix_ms};
use postgres::types::ToSql;
use postgres::{Statement, Transaction};
use std::collections::HashMap;
use std::time::SystemTime;

type Applied = Result<u64, postgres::Error>;

/// The writer's prepared statements, by their SQL: each transition's statement is parsed once
/// per connection instead of once per write (a round trip saved on every write). Cleared when
/// the connection is replaced: a statement belongs to the connection that prepared it.
pub(crate) type Statements = HashMap<&'static str, Statement>;

/// `sql` prepared on this connection, once.
pub(crate) fn prepared(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    sql: &'static str,
) -> Result<Statement, postgres::Error> {
    if let Some(s) = st.get(sql) {
        return Ok(s.clone());
    }
    let s = tx.prepare(sql)?;
    st.insert(sql, s.clone());
    Ok(s)
}

/// Runs `sql` as a prepared statement of this connection.
fn exec(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Applied {
    let stmt = prepared(tx, st, sql)?;
    tx.execute(&stmt, params)
}

/// Times are kept to the millisecond on both backends, so a history cursor taken from a row
/// matches that row exactly.
pub(crate) fn ms_time(t: SystemTime) -> SystemTime {
    from_unix_ms(unix_ms(t))
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn json(v: &serde_json::Value) -> Option<String> {
    (!v.is_null()).then(|| v.to_string())
}

/// Applies `ops` in order; for each, `Some(reason)` when it was a guarded no-op. A run of
/// consecutive step queuings, or of starts of distinct steps, goes as one statement over
/// arrays, with each write's own guard and verdict: a fan-out's writes are one round trip to
/// the server instead of one each, and a process waiting for its history to be committed
/// (a fleet orders its queue after it) waits for one statement, not hundreds.
pub(crate) fn apply_all(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    ops: &[Op],
    proc: &ProcessInfo,
) -> Result<Vec<Option<String>>, postgres::Error> {
    let mut out = Vec::with_capacity(ops.len());
    let mut i = 0;
    while i < ops.len() {
        let queued = group(&ops[i..], |op| matches!(op, Op::StepQueued(_)), |_| None);
        if queued > 1 {
            out.extend(steps_queued(tx, st, &ops[i..i + queued])?);
            i += queued;
            continue;
        }
        let started = group(
            &ops[i..],
            |op| matches!(op, Op::StepStarted { .. }),
            |op| match op {
                Op::StepStarted {
                    run_id, step_key, ..
                } => Some((run_id.as_str(), step_key.as_str())),
                _ => None,
            },
        );
        if started > 1 {
            out.extend(steps_started(tx, st, &ops[i..i + started])?);
            i += started;
            continue;
        }
        out.push(apply(tx, st, &ops[i], proc)?);
        i += 1;
    }
    Ok(out)
}

/// How many ops from the start of `ops` are of one kind (`kind`), none refused before it is
/// sent, and, where `key` names one, each about a different row (an `UPDATE` over arrays
/// changes a row once, however many array entries match it).
fn group<'a>(
    ops: &'a [Op],
    kind: impl Fn(&Op) -> bool,
    key: impl Fn(&'a Op) -> Option<(&'a str, &'a str)>,
) -> usize {
    let mut seen = std::collections::HashSet::new();
    ops.iter()
        .take_while(|op| {
            kind(op) && op.refused().is_none() && key(op).is_none_or(|k| seen.insert(k))
        })
        .count()
}

/// Step queuings, as `step_queued` each: a step already queued stays as it is (a resumed run
/// plans again); only a step of an unknown run is refused.
fn steps_queued(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    ops: &[Op],
) -> Result<Vec<Option<String>>, postgres::Error> {
    let steps: Vec<&NewStep> = ops
        .iter()
        .filter_map(|op| match op {
            Op::StepQueued(s) => Some(&**s),
            _ => None,
        })
        .collect();
    let runs: Vec<&str> = steps.iter().map(|s| s.run_id.as_str()).collect();
    let keys: Vec<&str> = steps.iter().map(|s| s.step_key.as_str()).collect();
    let nodes: Vec<&str> = steps.iter().map(|s| s.node_id.as_str()).collect();
    let items: Vec<Option<i64>> = steps.iter().map(|s| s.item_index.map(i64::from)).collect();
    let inputs: Vec<Option<String>> = steps
        .iter()
        .map(|s| s.input.as_ref().and_then(json))
        .collect();
    let queued: Vec<SystemTime> = steps.iter().map(|s| ms_time(s.queued_at)).collect();
    let known: std::collections::HashSet<String> = {
        let sql = "WITH ins AS (
                 INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status,
                                           attempts, input, queued_at)
                 -- A step queued twice in the batch: its first queuing, as in turn.
                 SELECT DISTINCT ON (u.r, u.k) u.r, u.k, u.n, u.i, 'pending', 0, u.inp, u.q
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                             $6::timestamptz[]) WITH ORDINALITY AS u(r, k, n, i, inp, q, o)
                 WHERE EXISTS (SELECT 1 FROM runner_executions e WHERE e.id = u.r)
                 ORDER BY u.r, u.k, u.o
                 ON CONFLICT (run_id, step_key) DO NOTHING
                 RETURNING 1
             )
             SELECT e.id FROM runner_executions e
             WHERE e.id = ANY($1) AND (SELECT count(*) FROM ins) >= 0";
        let stmt = prepared(tx, st, sql)?;
        tx.query(&stmt, &[&runs, &keys, &nodes, &items, &inputs, &queued])?
            .into_iter()
            .map(|r| r.get(0))
            .collect()
    };
    Ok(ops
        .iter()
        .zip(&runs)
        .map(|(op, run)| op.verdict(u64::from(known.contains(*run))))
        .collect())
}

/// Step starts of distinct steps, as [`STEP_STARTED`] each.
fn steps_started(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    ops: &[Op],
) -> Result<Vec<Option<String>>, postgres::Error> {
    let mut runs = Vec::new();
    let mut keys = Vec::new();
    let mut attempts = Vec::new();
    let mut ats = Vec::new();
    for op in ops {
        if let Op::StepStarted {
            run_id,
            step_key,
            attempt,
            at,
        } = op
        {
            runs.push(run_id.as_str());
            keys.push(step_key.as_str());
            attempts.push(i64::from(*attempt));
            ats.push(ms_time(*at));
        }
    }
    let sql = "UPDATE runner_steps s
         SET status = 'running', attempts = u.a, started_at = COALESCE(s.started_at, u.at)
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[])
             AS u(r, k, a, at)
         WHERE s.run_id = u.r AND s.step_key = u.k
           AND s.status IN ('pending', 'retrying', 'running')
         RETURNING s.run_id, s.step_key";
    let stmt = prepared(tx, st, sql)?;
    let changed: std::collections::HashSet<(String, String)> = tx
        .query(&stmt, &[&runs, &keys, &attempts, &ats])?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(ops
        .iter()
        .zip(runs.iter().zip(&keys))
        .map(|(op, (r, k))| {
            op.verdict(u64::from(changed.contains(&(r.to_string(), k.to_string()))))
        })
        .collect())
}

/// Applies `op`; `Ok(Some(reason))` is a guarded no-op.
pub(crate) fn apply(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    op: &Op,
    proc: &ProcessInfo,
) -> Result<Option<String>, postgres::Error> {
    if let Some(reason) = op.refused() {
        return Ok(Some(reason));
    }
    let changed = match op {
        Op::InsertRun(r) => insert_run(tx, st, r, proc),
        Op::RunStarted {
            run_id,
            at,
            steps_total,
        } => exec(
            tx,
            st,
            "UPDATE runner_executions
             SET status = 'running', started_at = $2, steps_total = $3,
                 steps_done = COALESCE(steps_done, 0), host = $4, pid = $5
             WHERE id = $1 AND status = 'queued'",
            &[
                run_id,
                &ms_time(*at),
                &i64::from(*steps_total),
                &proc.host,
                &i64::from(proc.pid),
            ],
        ),
        Op::RunFinished(e) => run_finished(tx, st, e),
        Op::StepQueued(s) => step_queued(tx, st, s),
        Op::StepStarted {
            run_id,
            step_key,
            attempt,
            at,
        } => exec(
            tx,
            st,
            STEP_STARTED,
            &[run_id, step_key, &i64::from(*attempt), &ms_time(*at)],
        ),
        Op::StepRetrying { run_id, step_key } => exec(
            tx,
            st,
            "UPDATE runner_steps SET status = 'retrying'
             WHERE run_id = $1 AND step_key = $2 AND status = 'running'",
            &[run_id, step_key],
        ),
        Op::AttemptFinished(a) => attempt_finished(tx, st, a),
        Op::StepFinished(s) => step_finished(tx, st, s),
        // The SQLite writer folds these into one UPDATE; here the start and the end are
        // applied in turn, with the same guards.
        Op::StepRan {
            started: (at, attempt),
            end,
        } => {
            exec(
                tx,
                st,
                STEP_STARTED,
                &[
                    &end.run_id,
                    &end.step_key,
                    &i64::from(*attempt),
                    &ms_time(*at),
                ],
            )?;
            step_finished(tx, st, end)
        }
        Op::StepRecorded(r) => step_recorded(tx, st, r),
        Op::RunProgress {
            run_id,
            steps_done,
            tokens_used,
        } => exec(
            tx,
            st,
            "UPDATE runner_executions SET steps_done = $2, tokens_used = $3
             WHERE id = $1 AND status IN ('queued', 'running')",
            &[run_id, &i64::from(*steps_done), &i(*tokens_used)],
        ),
        Op::Heartbeat(h) => exec(tx, st, HEARTBEAT, &HeartbeatRow::new(h, proc).params()),
        Op::ProcessStopped { .. } => exec(
            tx,
            st,
            "UPDATE runner_processes SET stopped_at = now() WHERE id = $1 AND stopped_at IS NULL",
            &[&proc.id],
        ),
        Op::ReleaseRuns => exec(
            tx,
            st,
            "UPDATE runner_executions SET owner = NULL
             WHERE owner = $1 AND status IN ('queued', 'running')",
            &[&proc.id],
        ),
        Op::CachePut(c) => {
            exec(
                tx,
                st,
                "DELETE FROM provider_cache WHERE expires_at <= $1",
                &[&ms_time(c.created_at)],
            )?;
            exec(
                tx,
                st,
                "INSERT INTO provider_cache
                     (key, provider, model, output, tokens_used, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (key) DO UPDATE SET provider = excluded.provider,
                     model = excluded.model, output = excluded.output,
                     tokens_used = excluded.tokens_used, created_at = excluded.created_at,
                     expires_at = excluded.expires_at",
                &[
                    &c.key,
                    &c.provider,
                    &c.model,
                    &c.output,
                    &i(c.tokens_used),
                    &ms_time(c.created_at),
                    &ms_time(c.expires_at),
                ],
            )
        }
        Op::AttemptFallback {
            run_id,
            step_key,
            attempt,
            note,
        } => exec(
            tx,
            st,
            "UPDATE runner_attempts SET fallback = $4
             WHERE run_id = $1 AND step_key = $2 AND attempt = $3",
            &[run_id, step_key, &i64::from(*attempt), note],
        ),
    }?;
    Ok(op.verdict(changed))
}

fn insert_run(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    r: &NewRun,
    proc: &ProcessInfo,
) -> Applied {
    // Heartbeats go on a reader's connection, beside this writer: the run's owner must
    // exist (alive now) by the time the run does, or another process would take the run for
    // an orphan before the first heartbeat lands.
    exec(
        tx,
        st,
        "INSERT INTO runner_processes (id, host, pid, role, version, started_at, heartbeat_at,
             heartbeat_ms)
         VALUES ($1, $2, $3, 'api', $4, now(), now(), (extract(epoch FROM now()) * 1000)::bigint)
         ON CONFLICT (id) DO NOTHING",
        &[
            &proc.id,
            &proc.host,
            &i64::from(proc.pid),
            &env!("CARGO_PKG_VERSION"),
        ],
    )?;
    // Seeds are u64; BIGINT is i64. The same 64 bits, so a seed round-trips.
    let seed = r.seed.map(|s| s as i64);
    exec(
        tx,
        st,
        "INSERT INTO runner_executions (id, blueprint_name, status, priority, trigger, sandbox,
             seed, simulate_failures, variables, blueprint, parent_run_id, queued_at,
             started_at, tokens_used, host, pid, owner)
         VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, 0, $12, $13, $14)
         ON CONFLICT (id) DO NOTHING",
        &[
            &r.id,
            &r.blueprint_name,
            &r.priority.as_str(),
            &r.trigger,
            &r.sandbox,
            &seed,
            &r.simulate_failures,
            &r.variables.to_string(),
            &json(&r.blueprint),
            &r.parent_run_id,
            &ms_time(r.queued_at),
            &proc.host,
            &i64::from(proc.pid),
            &proc.id,
        ],
    )
}

fn run_finished(tx: &mut Transaction<'_>, st: &mut Statements, e: &RunEnd) -> Applied {
    exec(
        tx,
        st,
        "UPDATE runner_executions
         SET status = $2, finished_at = $3, total_time_ms = $4, tokens_used = $5,
             steps_done = $6, error = $7, error_kind = $8, failed_step = $9
         WHERE id = $1 AND status IN ('queued', 'running')",
        &[
            &e.run_id,
            &e.status.as_str(),
            &ms_time(e.finished_at),
            &i(e.total_time_ms),
            &i(e.tokens_used),
            &i64::from(e.steps_done),
            &e.error,
            &e.error_kind.map(|k| k.as_str()),
            &e.failed_step,
        ],
    )
}

fn step_queued(tx: &mut Transaction<'_>, st: &mut Statements, s: &NewStep) -> Applied {
    let n = exec(
        tx,
        st,
        "INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status, attempts,
             input, queued_at)
         SELECT $1::text, $2::text, $3::text, $4::bigint, 'pending', 0, $5::text,
                $6::timestamptz
         WHERE EXISTS (SELECT 1 FROM runner_executions WHERE id = $1::text)
         ON CONFLICT (run_id, step_key) DO NOTHING",
        &[
            &s.run_id,
            &s.step_key,
            &s.node_id,
            &s.item_index.map(i64::from),
            &s.input.as_ref().and_then(json),
            &ms_time(s.queued_at),
        ],
    )?;
    // Already queued (a resumed run re-plans) is fine; only an unknown run is refused.
    if n == 0
        && tx
            .query_opt(
                "SELECT 1 FROM runner_executions WHERE id = $1",
                &[&s.run_id],
            )?
            .is_some()
    {
        return Ok(1);
    }
    Ok(n)
}

fn attempt_finished(tx: &mut Transaction<'_>, st: &mut Statements, a: &AttemptRecord) -> Applied {
    let duration = a
        .finished_at
        .duration_since(a.started_at)
        .unwrap_or_default();
    exec(
        tx,
        st,
        "INSERT INTO runner_attempts (run_id, step_key, attempt, status, error_kind, error,
             wait_ms, started_at, finished_at, duration_ms, tokens_used, provider, model, cached)
         SELECT $1::text, $2::text, $3::bigint, $4::text, $5::text, $6::text, $7::bigint,
                $8::timestamptz, $9::timestamptz, $10::bigint, $11::bigint, $12::text,
                $13::text, $14::boolean
         WHERE EXISTS (SELECT 1 FROM runner_steps WHERE run_id = $1::text AND step_key = $2::text)
         ON CONFLICT (run_id, step_key, attempt) DO NOTHING",
        &[
            &a.run_id,
            &a.step_key,
            &i64::from(a.attempt),
            &if a.ok { "success" } else { "error" },
            &a.error_kind.map(|k| k.as_str()),
            &a.error,
            &a.wait_ms.map(i),
            &ms_time(a.started_at),
            &ms_time(a.finished_at),
            &i(duration.as_millis() as u64),
            &i(a.tokens_used),
            &a.provider,
            &a.model,
            &a.cached,
        ],
    )
}

fn step_finished(tx: &mut Transaction<'_>, st: &mut Statements, s: &StepEnd) -> Applied {
    exec(
        tx,
        st,
        "INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status, attempts,
             output, error_kind, error, tokens_used, cached, provider, model, queued_at,
             started_at, finished_at, duration_ms, reply_model, finish_reason)
         SELECT $1::text, $2::text, $3::text, $4::bigint, $5::text, $6::bigint, $7::text,
                $8::text, $9::text, $10::bigint, $11::boolean, $12::text, $13::text,
                $14::timestamptz, $15::timestamptz, $14::timestamptz, $16::bigint, $17::text,
                $18::text
         WHERE EXISTS (SELECT 1 FROM runner_executions WHERE id = $1::text)
         ON CONFLICT (run_id, step_key) DO UPDATE SET
             status = excluded.status, attempts = excluded.attempts,
             output = excluded.output, error_kind = excluded.error_kind,
             error = excluded.error, tokens_used = excluded.tokens_used,
             cached = excluded.cached, provider = excluded.provider,
             model = excluded.model, reply_model = excluded.reply_model,
             finish_reason = excluded.finish_reason,
             started_at = COALESCE(runner_steps.started_at, excluded.started_at),
             finished_at = excluded.finished_at, duration_ms = excluded.duration_ms
         WHERE runner_steps.status IN ('pending', 'running', 'retrying')",
        &[
            &s.run_id,
            &s.step_key,
            &s.node_id,
            &s.item_index.map(i64::from),
            &s.status.as_str(),
            &i64::from(s.attempts),
            &s.output.as_ref().and_then(json),
            &s.error_kind.map(|k| k.as_str()),
            &s.error,
            &i(s.tokens_used),
            &s.cached,
            &s.provider,
            &s.model,
            &ms_time(s.finished_at),
            &s.implied_start().map(ms_time),
            &i(s.duration_ms),
            &s.reply_model,
            &s.finish_reason,
        ],
    )
}

fn step_recorded(tx: &mut Transaction<'_>, st: &mut Statements, r: &StepRecord) -> Applied {
    let q = &r.queued;
    let input = q.input.as_ref().and_then(json);
    let Some(s) = &r.end else {
        let (at, attempt) = r.started.unwrap_or((q.queued_at, 0));
        return exec(
            tx,
            st,
            "INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status,
                 attempts, input, queued_at, started_at)
             SELECT $1::text, $2::text, $3::text, $4::bigint, 'running', $5::bigint, $6::text,
                    $7::timestamptz, $8::timestamptz
             WHERE EXISTS (SELECT 1 FROM runner_executions WHERE id = $1::text)
             ON CONFLICT (run_id, step_key) DO UPDATE SET
                 status = 'running', attempts = excluded.attempts,
                 started_at = COALESCE(runner_steps.started_at, excluded.started_at)
             WHERE runner_steps.status IN ('pending', 'retrying', 'running')",
            &[
                &q.run_id,
                &q.step_key,
                &q.node_id,
                &q.item_index.map(i64::from),
                &i64::from(attempt),
                &input,
                &ms_time(q.queued_at),
                &ms_time(at),
            ],
        );
    };
    let started = match r.started {
        Some((at, _)) => Some(ms_time(at)),
        None => s.implied_start().map(ms_time),
    };
    exec(
        tx,
        st,
        "INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status, attempts,
             input, output, error_kind, error, tokens_used, cached, provider, model,
             queued_at, started_at, finished_at, duration_ms, reply_model, finish_reason)
         SELECT $1::text, $2::text, $3::text, $4::bigint, $5::text, $6::bigint, $7::text,
                $8::text, $9::text, $10::text, $11::bigint, $12::boolean, $13::text, $14::text,
                $15::timestamptz, $16::timestamptz, $17::timestamptz, $18::bigint, $19::text,
                $20::text
         WHERE EXISTS (SELECT 1 FROM runner_executions WHERE id = $1::text)
         ON CONFLICT (run_id, step_key) DO UPDATE SET
             status = excluded.status, attempts = excluded.attempts,
             output = excluded.output, error_kind = excluded.error_kind,
             error = excluded.error, tokens_used = excluded.tokens_used,
             cached = excluded.cached, provider = excluded.provider,
             model = excluded.model, reply_model = excluded.reply_model,
             finish_reason = excluded.finish_reason,
             started_at = COALESCE(runner_steps.started_at, excluded.started_at),
             finished_at = excluded.finished_at, duration_ms = excluded.duration_ms
         WHERE runner_steps.status IN ('pending', 'running', 'retrying')",
        &[
            &q.run_id,
            &q.step_key,
            &q.node_id,
            &q.item_index.map(i64::from),
            &s.status.as_str(),
            &i64::from(s.attempts),
            &input,
            &s.output.as_ref().and_then(json),
            &s.error_kind.map(|k| k.as_str()),
            &s.error,
            &i(s.tokens_used),
            &s.cached,
            &s.provider,
            &s.model,
            &ms_time(q.queued_at),
            &started,
            &ms_time(s.finished_at),
            &i(s.duration_ms),
            &s.reply_model,
            &s.finish_reason,
        ],
    )
}

/// A process's heartbeat: the database's clock, never this host's, since leases are compared
/// across hosts.
pub(crate) const HEARTBEAT: &str =
    "INSERT INTO runner_processes (id, host, pid, role, version, started_at, heartbeat_at,
         heartbeat_ms, rss_mb, memory_hold, paused, queued, running, completed, failed,
         concurrency)
     VALUES ($1, $2, $3, $4, $5, now(), now(),
             (extract(epoch FROM now()) * 1000)::bigint, $6, $7, $8, $9, $10, $11, $12, $13)
     ON CONFLICT (id) DO UPDATE SET role = excluded.role,
         heartbeat_at = excluded.heartbeat_at, heartbeat_ms = excluded.heartbeat_ms,
         rss_mb = excluded.rss_mb, memory_hold = excluded.memory_hold,
         paused = excluded.paused, queued = excluded.queued, running = excluded.running,
         completed = excluded.completed, failed = excluded.failed,
         concurrency = excluded.concurrency
     WHERE runner_processes.stopped_at IS NULL";

/// A heartbeat's parameters, owned, so a reader thread can send one as well as the writer.
pub(crate) struct HeartbeatRow {
    id: String,
    host: Option<String>,
    pid: i64,
    role: String,
    rss_mb: Option<f64>,
    memory_hold: bool,
    paused: bool,
    counts: [i64; 5],
}

impl HeartbeatRow {
    pub(crate) fn new(h: &crate::store::Health, proc: &ProcessInfo) -> HeartbeatRow {
        HeartbeatRow {
            id: proc.id.clone(),
            host: proc.host.clone(),
            pid: i64::from(proc.pid),
            role: h.role.clone(),
            rss_mb: h.rss_mb,
            memory_hold: h.pool.memory_hold,
            paused: h.pool.paused,
            counts: [
                h.pool.queued_total() as i64,
                h.pool.running as i64,
                h.pool.completed as i64,
                h.pool.failed as i64,
                h.pool.concurrency as i64,
            ],
        }
    }

    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.id,
            &self.host,
            &self.pid,
            &self.role,
            &env!("CARGO_PKG_VERSION"),
            &self.rss_mb,
            &self.memory_hold,
            &self.paused,
            &self.counts[0],
            &self.counts[1],
            &self.counts[2],
            &self.counts[3],
            &self.counts[4],
        ]
    }
}

/// A non-final step → `running`; its first start is kept.
const STEP_STARTED: &str = "UPDATE runner_steps
     SET status = 'running', attempts = $3, started_at = COALESCE(started_at, $4)
     WHERE run_id = $1 AND step_key = $2 AND status IN ('pending', 'retrying', 'running')";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::blueprint::Priority;
    use crate::store::pg::testing::ScratchDb;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
    }

    fn queued(run: &str, step: &str, ms: u64) -> Op {
        Op::StepQueued(Box::new(NewStep {
            run_id: run.into(),
            step_key: step.into(),
            node_id: step.split('[').next().unwrap_or(step).into(),
            item_index: None,
            input: Some(serde_json::json!({ "step": step, "ms": ms })),
            queued_at: at(ms),
        }))
    }

    fn started(run: &str, step: &str, attempt: u32, ms: u64) -> Op {
        Op::StepStarted {
            run_id: run.into(),
            step_key: step.into(),
            attempt,
            at: at(ms),
        }
    }

    fn start_key(op: &Op) -> Option<(&str, &str)> {
        match op {
            Op::StepStarted {
                run_id, step_key, ..
            } => Some((run_id.as_str(), step_key.as_str())),
            _ => None,
        }
    }

    /// Every step as a test compares it.
    type StepRow = (
        String,
        String,
        String,
        i64,
        Option<String>,
        Option<SystemTime>,
        SystemTime,
    );

    fn steps(tx: &mut Transaction<'_>) -> Vec<StepRow> {
        tx.query(
            "SELECT run_id, step_key, status, attempts, input, started_at, queued_at
             FROM runner_steps ORDER BY run_id, step_key",
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect()
    }

    /// The writer sends a run of step queuings, or of starts of distinct steps, as one
    /// statement over arrays. Whether a batch takes that path depends on how the writes fall
    /// into batches, so here a known batch goes through it directly: each write must get the
    /// verdict and leave the rows that applying it alone gives.
    #[test]
    fn grouped_writes_keep_each_writes_guard_and_verdict() {
        let Some(db) = ScratchDb::new("ops_grouped") else {
            return;
        };
        let mut c = db.target().connect().unwrap();
        crate::store::pg::schema::migrate(&mut c, db.target()).unwrap();
        let proc = ProcessInfo {
            host: Some("h".into()),
            pid: 1,
            id: "h:1:0".into(),
        };
        let mut st = Statements::new();
        {
            let mut tx = c.transaction().unwrap();
            let run = NewRun {
                id: "r1".into(),
                blueprint_name: "b".into(),
                priority: Priority::Normal,
                trigger: "cli".into(),
                sandbox: false,
                seed: None,
                simulate_failures: 0.0,
                variables: serde_json::json!({}),
                blueprint: serde_json::Value::Null,
                parent_run_id: None,
                queued_at: at(0),
            };
            for op in [
                Op::InsertRun(Box::new(run)),
                queued("r1", "old", 1),
                queued("r1", "ended", 1),
            ] {
                assert_eq!(apply(&mut tx, &mut st, &op, &proc).unwrap(), None);
            }
            tx.execute(
                "UPDATE runner_steps SET status = 'success', attempts = 1
                 WHERE step_key = 'ended'",
                &[],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        // What the server runs is counted as a statement log shows it: one row a statement.
        c.batch_execute(
            "CREATE TABLE statements (op text);
             CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO statements VALUES (TG_OP); RETURN NULL; END $$;
             CREATE TRIGGER count_statement AFTER INSERT OR UPDATE ON runner_steps
                 FOR EACH STATEMENT EXECUTE FUNCTION count_statement();",
        )
        .unwrap();
        let statements = |tx: &mut Transaction<'_>, op: &str| -> i64 {
            tx.query_one("SELECT count(*) FROM statements WHERE op = $1", &[&op])
                .unwrap()
                .get(0)
        };
        let batch = vec![
            // One statement: new steps, a step of an unknown run, a step queued twice in the
            // batch (its first queuing counts), a step an earlier batch queued (kept as is).
            queued("r1", "ask[0]", 10),
            queued("r1", "ask[1]", 11),
            queued("gone", "ask[0]", 12),
            queued("r1", "ask[0]", 13),
            queued("r1", "old", 14),
            // One statement: starts of distinct steps, one of them already ended, one
            // unknown, one of an unknown run.
            started("r1", "ask[0]", 1, 20),
            started("r1", "ask[1]", 1, 21),
            started("r1", "ended", 2, 22),
            started("r1", "nope", 1, 23),
            started("gone", "ask[0]", 1, 24),
            // The same step again: a statement of its own (an UPDATE over arrays changes a
            // row once), whose start keeps the first one's time.
            started("r1", "ask[0]", 2, 30),
            started("r1", "old", 1, 31),
        ];
        // The batch is what the grouped path takes: 5 queuings, 5 starts, 2 starts.
        let is_queued = |op: &Op| matches!(op, Op::StepQueued(_));
        let is_started = |op: &Op| matches!(op, Op::StepStarted { .. });
        assert_eq!(group(&batch, is_queued, |_| None), 5);
        assert_eq!(group(&batch[5..], is_started, start_key), 5);
        assert_eq!(group(&batch[10..], is_started, start_key), 2);

        let mut tx = c.transaction().unwrap();
        let grouped = apply_all(&mut tx, &mut st, &batch, &proc).unwrap();
        let grouped_rows = steps(&mut tx);
        // A fan-out's writes are one round trip each run of them, not one each write.
        assert_eq!(
            (statements(&mut tx, "INSERT"), statements(&mut tx, "UPDATE")),
            (1, 2),
            "the 5 queuings as one statement, the starts as two"
        );
        tx.rollback().unwrap();
        let mut tx = c.transaction().unwrap();
        let one_by_one: Vec<Option<String>> = batch
            .iter()
            .map(|op| apply(&mut tx, &mut st, op, &proc).unwrap())
            .collect();
        let one_by_one_rows = steps(&mut tx);
        tx.rollback().unwrap();

        let unknown_run = Some("unknown run".to_string());
        let no_step = Some("the step is unknown or already finished".to_string());
        assert_eq!(
            grouped,
            vec![
                None,
                None,
                unknown_run,
                None,
                None,
                None,
                None,
                no_step.clone(),
                no_step.clone(),
                no_step,
                None,
                None,
            ]
        );
        assert_eq!(grouped, one_by_one);
        assert_eq!(grouped_rows, one_by_one_rows);
        let ask0 = grouped_rows.iter().find(|r| r.1 == "ask[0]").unwrap();
        assert_eq!(
            (ask0.2.as_str(), ask0.3, ask0.5, ask0.6),
            ("running", 2, Some(at(20)), at(10)),
            "ask[0]: running as attempt 2, first started at 20, queued by its first queuing"
        );
        let ended = grouped_rows.iter().find(|r| r.1 == "ended").unwrap();
        assert_eq!((ended.2.as_str(), ended.3), ("success", 1));
        let old = grouped_rows.iter().find(|r| r.1 == "old").unwrap();
        assert_eq!((old.2.as_str(), old.6), ("running", at(1)));
    }
}
