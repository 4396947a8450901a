//! Every state transition the store knows, one function each, each guarded by the state it
//! expects: a late or repeated event is a no-op reported as a warning, never a step backwards
//! (a finished run stays finished, a final step keeps its result). All writing SQL lives here.

use super::types::{AttemptRecord, NewRun, NewStep, RunEnd, StepEnd};
use super::{iso8601, saturating_i64};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use rusqlite::{params, OptionalExtension, Transaction};
use std::time::{Duration, SystemTime};

/// A step queued, started and (maybe) finished within one batch: its row is written once, in
/// the state the separate transitions would have left it in.
pub(crate) struct StepRecord {
    pub(crate) queued: NewStep,
    /// The first attempt's start and the last attempt number seen.
    pub(crate) started: Option<(SystemTime, u32)>,
    pub(crate) end: Option<StepEnd>,
}

/// One state transition.
pub(crate) enum Op {
    InsertRun(Box<NewRun>),
    RunStarted {
        run_id: String,
        at: SystemTime,
        steps_total: u32,
    },
    RunFinished(Box<RunEnd>),
    StepQueued(Box<NewStep>),
    StepStarted {
        run_id: String,
        step_key: String,
        attempt: u32,
        at: SystemTime,
    },
    StepRetrying {
        run_id: String,
        step_key: String,
    },
    AttemptFinished(Box<AttemptRecord>),
    StepFinished(Box<StepEnd>),
    /// Several transitions of one step that arrived in the same batch, written as one row
    /// (see [`coalesce`]); never queued by the store itself.
    StepRecorded(Box<StepRecord>),
    /// A step's start and end that arrived in one batch after its queuing had been written by
    /// an earlier one: one write instead of two (see [`coalesce`]); never queued by the store
    /// itself.
    StepRan {
        /// The first start in the batch, and the last attempt number seen.
        started: (SystemTime, u32),
        end: Box<StepEnd>,
    },
    RunProgress {
        run_id: String,
        steps_done: u32,
        tokens_used: u64,
    },
    Heartbeat(Box<super::lease::Health>),
    ProcessStopped {
        at: SystemTime,
    },
    ReleaseRuns,
    // Providers: see `store/providers.rs`.
    CachePut(Box<super::providers::CachedAnswer>),
    AttemptFallback {
        run_id: String,
        step_key: String,
        attempt: u32,
        note: String,
    },
}

impl Op {
    /// For logs: which transition of which run/step.
    pub(crate) fn describe(&self) -> String {
        match self {
            Op::InsertRun(r) => format!("insert_run {}", r.id),
            Op::RunStarted { run_id, .. } => format!("run_started {run_id}"),
            Op::RunFinished(e) => format!("run_finished {}", e.run_id),
            Op::StepQueued(s) => format!("step_queued {} {}", s.run_id, s.step_key),
            Op::StepStarted {
                run_id, step_key, ..
            } => format!("step_started {run_id} {step_key}"),
            Op::StepRetrying { run_id, step_key } => format!("step_retrying {run_id} {step_key}"),
            Op::AttemptFinished(a) => {
                format!(
                    "attempt_finished {} {} #{}",
                    a.run_id, a.step_key, a.attempt
                )
            }
            Op::StepFinished(s) => format!("step_finished {} {}", s.run_id, s.step_key),
            Op::StepRecorded(r) => {
                format!("step_recorded {} {}", r.queued.run_id, r.queued.step_key)
            }
            Op::StepRan { end, .. } => format!("step_ran {} {}", end.run_id, end.step_key),
            Op::RunProgress { run_id, .. } => format!("run_progress {run_id}"),
            Op::Heartbeat(_) => "heartbeat".into(),
            Op::ProcessStopped { .. } => "process_stopped".into(),
            Op::ReleaseRuns => "release_runs".into(),
            Op::CachePut(_) => "cache_put".to_string(),
            Op::AttemptFallback {
                run_id,
                step_key,
                attempt,
                ..
            } => format!("attempt_fallback {run_id} {step_key} #{attempt}"),
        }
    }

    /// A transition refused before it reaches the database: an "end" whose status is not
    /// final. The same on every backend.
    pub(crate) fn refused(&self) -> Option<String> {
        match self {
            Op::RunFinished(e) if !e.status.is_final() => {
                Some(format!("{} is not a final status", e.status.as_str()))
            }
            Op::StepFinished(s) if !s.status.is_final() => {
                Some(format!("{} is not a final status", s.status.as_str()))
            }
            _ => None,
        }
    }

    /// The guard's verdict, shared by every backend: `changed` is how many rows the
    /// transition's guarded statement changed; none means the row was not in the state the
    /// transition expects, a no-op worth a warning (`Some(reason)`), never an error.
    pub(crate) fn verdict(&self, changed: u64) -> Option<String> {
        if changed > 0 {
            return None;
        }
        let reason = match self {
            Op::InsertRun(_) => "a run with this id is already recorded",
            Op::RunStarted { .. } => "the run is not queued (unknown, or already started)",
            Op::RunFinished(_) | Op::RunProgress { .. } => "the run is unknown or already finished",
            Op::StepQueued(_) => "unknown run",
            Op::StepStarted { .. } => "the step is unknown or already finished",
            Op::StepRetrying { .. } => "the step is not running",
            Op::AttemptFinished(_) => "the step is unknown, or this attempt is already recorded",
            Op::StepFinished(_) | Op::StepRecorded(_) | Op::StepRan { .. } => {
                "the run is unknown or the step already finished"
            }
            Op::ProcessStopped { .. } => "this process was not recorded as running",
            Op::AttemptFallback { .. } => "no such attempt",
            // Unguarded: upserts and bulk releases that may rightly touch nothing.
            Op::Heartbeat(_) | Op::ReleaseRuns | Op::CachePut(_) => return None,
        };
        Some(reason.to_string())
    }

    /// Applies the transition on SQLite. `Ok(Some(reason))` is a guarded no-op: the row was
    /// not in the expected state. Never an error, only worth a warning.
    pub(crate) fn apply(
        &self,
        tx: &Transaction<'_>,
        proc: &ProcessInfo,
    ) -> rusqlite::Result<Option<String>> {
        if let Some(reason) = self.refused() {
            return Ok(Some(reason));
        }
        let changed = match self {
            Op::InsertRun(r) => insert_run(tx, r, proc),
            Op::RunStarted {
                run_id,
                at,
                steps_total,
            } => run_started(tx, run_id, *at, *steps_total, proc),
            Op::RunFinished(e) => run_finished(tx, e),
            Op::StepQueued(s) => step_queued(tx, s),
            Op::StepStarted {
                run_id,
                step_key,
                attempt,
                at,
            } => step_started(tx, run_id, step_key, *attempt, *at),
            Op::StepRetrying { run_id, step_key } => step_retrying(tx, run_id, step_key),
            Op::AttemptFinished(a) => attempt_finished(tx, a),
            Op::StepFinished(s) => step_finished(tx, s),
            Op::StepRecorded(r) => step_recorded(tx, r),
            Op::StepRan { started, end } => step_ran(tx, *started, end),
            Op::RunProgress {
                run_id,
                steps_done,
                tokens_used,
            } => run_progress(tx, run_id, *steps_done, *tokens_used),
            Op::Heartbeat(h) => super::lease::heartbeat(tx, h, proc),
            Op::ProcessStopped { at } => super::lease::process_stopped(tx, *at, proc),
            Op::ReleaseRuns => super::lease::release_runs(tx, proc),
            Op::CachePut(c) => super::providers::cache_put(tx, c),
            Op::AttemptFallback {
                run_id,
                step_key,
                attempt,
                note,
            } => super::providers::attempt_fallback(tx, run_id, step_key, *attempt, note),
        }?;
        Ok(self.verdict(changed as u64))
    }
}

/// Which process wrote a run (shown by `omniflow show`, useful when cron and the console
/// share one database).
pub(crate) struct ProcessInfo {
    pub(crate) host: Option<String>,
    pub(crate) pid: u32,
    /// The `runner_processes.id` that owns the runs this store inserts (see `lease.rs`).
    pub(crate) id: String,
}

impl ProcessInfo {
    // Read by the schedule-slot claims (claims.rs).
    pub(crate) fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn current(id: String) -> Self {
        ProcessInfo {
            host: hostname(),
            pid: std::process::id(),
            id,
        }
    }
}

pub(crate) fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// How many rows a transition's guarded statement changed (0: the guard held it back).
type Applied = rusqlite::Result<usize>;

fn run_exists(tx: &Transaction<'_>, run_id: &str) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM runner_executions WHERE id = ?1")?
        .query_row([run_id], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
}

fn json(v: &serde_json::Value) -> Option<String> {
    (!v.is_null()).then(|| v.to_string())
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A new run, `queued`. `started_at` starts as the queue time (see the schema).
fn insert_run(tx: &Transaction<'_>, r: &NewRun, proc: &ProcessInfo) -> Applied {
    let queued = iso8601(r.queued_at);
    // Seeds are u64; SQLite integers are i64. Store the same 64 bits so a seed round-trips.
    let seed = r.seed.map(|s| s as i64);
    let n = tx
        .prepare_cached(
            "INSERT INTO runner_executions (id, blueprint_name, status, priority, trigger, sandbox,
                 seed, simulate_failures, variables, blueprint, parent_run_id, queued_at,
                 started_at, tokens_used, host, pid, owner)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, 0, ?12, ?13, ?14)
             ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            r.id,
            r.blueprint_name,
            r.priority.as_str(),
            r.trigger,
            r.sandbox,
            seed,
            r.simulate_failures,
            r.variables.to_string(),
            json(&r.blueprint),
            r.parent_run_id,
            queued,
            proc.host,
            proc.pid,
            proc.id,
        ])?;
    Ok(n)
}

/// `queued` → `running`.
fn run_started(
    tx: &Transaction<'_>,
    run_id: &str,
    at: SystemTime,
    steps_total: u32,
    proc: &ProcessInfo,
) -> Applied {
    let n = tx
        .prepare_cached(
            "UPDATE runner_executions
             SET status = 'running', started_at = ?2, steps_total = ?3,
                 steps_done = COALESCE(steps_done, 0), host = ?4, pid = ?5
             WHERE id = ?1 AND status = 'queued'",
        )?
        .execute(params![
            run_id,
            iso8601(at),
            steps_total,
            proc.host,
            proc.pid
        ])?;
    Ok(n)
}

/// `queued`/`running` → a final status. The first end wins.
fn run_finished(tx: &Transaction<'_>, e: &RunEnd) -> Applied {
    let n = tx
        .prepare_cached(
            "UPDATE runner_executions
             SET status = ?2, finished_at = ?3, total_time_ms = ?4, tokens_used = ?5,
                 steps_done = ?6, error = ?7, error_kind = ?8, failed_step = ?9
             WHERE id = ?1 AND status IN ('queued', 'running')",
        )?
        .execute(params![
            e.run_id,
            e.status.as_str(),
            iso8601(e.finished_at),
            saturating_i64(e.total_time_ms),
            saturating_i64(e.tokens_used),
            e.steps_done,
            e.error,
            e.error_kind.map(|k| k.as_str()),
            e.failed_step,
        ])?;
    Ok(n)
}

/// A new step, `pending`. Queuing a step that exists already is a no-op (resume re-plans).
fn step_queued(tx: &Transaction<'_>, s: &NewStep) -> Applied {
    let n = tx
        .prepare_cached(
            "INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status, attempts,
                 input, queued_at, seq)
             SELECT ?1, ?2, ?3, ?4, 'pending', 0, ?5, ?6,
                    COALESCE((SELECT MAX(seq) FROM runner_steps WHERE run_id = ?1), 0) + 1
             WHERE EXISTS (SELECT 1 FROM runner_executions WHERE id = ?1)
             ON CONFLICT (run_id, step_key) DO NOTHING",
        )?
        .execute(params![
            s.run_id,
            s.step_key,
            s.node_id,
            s.item_index,
            s.input.as_ref().and_then(json),
            iso8601(s.queued_at),
        ])?;
    // Already queued (a resumed run re-plans) is fine; only an unknown run is refused.
    if n == 0 && run_exists(tx, &s.run_id)? {
        return Ok(1);
    }
    Ok(n)
}

/// `pending`/`retrying`/`running` → `running` with the attempt number.
fn step_started(
    tx: &Transaction<'_>,
    run_id: &str,
    step_key: &str,
    attempt: u32,
    at: SystemTime,
) -> Applied {
    let n = tx
        .prepare_cached(
            "UPDATE runner_steps
             SET status = 'running', attempts = ?3, started_at = COALESCE(started_at, ?4)
             WHERE run_id = ?1 AND step_key = ?2
               AND status IN ('pending', 'retrying', 'running')",
        )?
        .execute(params![run_id, step_key, attempt, iso8601(at)])?;
    Ok(n)
}

/// `running` → `retrying` (waiting for the backoff).
fn step_retrying(tx: &Transaction<'_>, run_id: &str, step_key: &str) -> Applied {
    let n = tx
        .prepare_cached(
            "UPDATE runner_steps SET status = 'retrying'
             WHERE run_id = ?1 AND step_key = ?2 AND status = 'running'",
        )?
        .execute(params![run_id, step_key])?;
    Ok(n)
}

/// One attempt's record, once, for a known step.
fn attempt_finished(tx: &Transaction<'_>, a: &AttemptRecord) -> Applied {
    let duration = a
        .finished_at
        .duration_since(a.started_at)
        .unwrap_or_default();
    let n = tx
        .prepare_cached(
            "INSERT INTO runner_attempts (run_id, step_key, attempt, status, error_kind, error,
                 wait_ms, started_at, finished_at, duration_ms, tokens_used, provider, model,
                 cached)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14
             WHERE EXISTS (SELECT 1 FROM runner_steps WHERE run_id = ?1 AND step_key = ?2)
             ON CONFLICT (run_id, step_key, attempt) DO NOTHING",
        )?
        .execute(params![
            a.run_id,
            a.step_key,
            a.attempt,
            if a.ok { "success" } else { "error" },
            a.error_kind.map(|k| k.as_str()),
            a.error,
            a.wait_ms.map(saturating_i64),
            iso8601(a.started_at),
            iso8601(a.finished_at),
            ms(duration),
            saturating_i64(a.tokens_used),
            a.provider,
            a.model,
            a.cached,
        ])?;
    Ok(n)
}

/// A non-final step (or none yet) → its final status. Creating the row covers steps that
/// never ran (skipped because a condition was false or a dependency failed).
fn step_finished(tx: &Transaction<'_>, s: &StepEnd) -> Applied {
    let finished = iso8601(s.finished_at);
    let started = s.implied_start().map(iso8601);
    // The usual case, a step recorded before and not final yet, is one update by key.
    let n = finish_existing(tx, s, started.as_deref())?;
    if n > 0 {
        return Ok(n);
    }
    // No row yet (a step that never ran: skipped, or failed before it started), or a final
    // one, which the upsert's guard leaves alone. The SELECT needs its WHERE for SQLite to
    // parse the upsert clause unambiguously.
    upsert_final_step(tx, s, None, &finished, started.as_deref())
}

/// A step that is recorded and not final yet → its final state, `started_at` kept when set,
/// else `started`. The number of rows changed: 0 when the row is missing or final.
fn finish_existing(
    tx: &Transaction<'_>,
    s: &StepEnd,
    started: Option<&str>,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "UPDATE runner_steps
         SET status = ?3, attempts = ?4, output = ?5, error_kind = ?6, error = ?7,
             tokens_used = ?8, cached = ?9, provider = ?10, model = ?11, reply_model = ?12,
             finish_reason = ?13, started_at = COALESCE(started_at, ?14), finished_at = ?15,
             duration_ms = ?16
         WHERE run_id = ?1 AND step_key = ?2 AND status IN ('pending', 'running', 'retrying')",
    )?
    .execute(params![
        s.run_id,
        s.step_key,
        s.status.as_str(),
        s.attempts,
        s.output.as_ref().and_then(json),
        s.error_kind.map(|k| k.as_str()),
        s.error,
        saturating_i64(s.tokens_used),
        s.cached,
        s.provider,
        s.model,
        s.reply_model,
        s.finish_reason,
        started,
        iso8601(s.finished_at),
        saturating_i64(s.duration_ms),
    ])
}

/// A step's start and its end, written as one: where the step's row exists and is not
/// final, what `step_started` and then `step_finished` leave. Where it is missing or final,
/// the start alone would have changed nothing, so this is `step_finished` exactly.
fn step_ran(tx: &Transaction<'_>, (started, attempt): (SystemTime, u32), s: &StepEnd) -> Applied {
    if !s.status.is_final() {
        // Never built so by `coalesce`; kept correct anyway.
        step_started(tx, &s.run_id, &s.step_key, attempt, started)?;
        return step_finished(tx, s);
    }
    let n = finish_existing(tx, s, Some(&iso8601(started)))?;
    if n > 0 {
        return Ok(n);
    }
    step_finished(tx, s)
}

/// Counters of a run in flight.
fn run_progress(tx: &Transaction<'_>, run_id: &str, steps_done: u32, tokens_used: u64) -> Applied {
    let n = tx
        .prepare_cached(
            "UPDATE runner_executions SET steps_done = ?2, tokens_used = ?3
             WHERE id = ?1 AND status IN ('queued', 'running')",
        )?
        .execute(params![run_id, steps_done, saturating_i64(tokens_used)])?;
    Ok(n)
}

/// Folds a batch's transitions so that each row is written once:
/// - a run's progress counters are written only by its last `RunProgress`, and not at all
///   when the run's end (which carries the same counters) follows in the batch;
/// - a step queued in this batch whose later transitions (start, end) are in the batch too
///   becomes one [`Op::StepRecorded`] at the place of its queuing, so the attempts that
///   follow still find their step;
/// - a step queued by an earlier batch whose start and end are both in this one becomes one
///   [`Op::StepRan`] at the place of its end (a fan-out queues all its steps first, so this
///   is how most of its steps end).
///
/// A step that retried, or whose transitions arrive in an unusual order, is left alone.
///
/// The batch is one transaction, so nobody can see the states in between: the database ends
/// in the same state either way. Linear in the batch.
pub(crate) fn coalesce(ops: Vec<Op>) -> Vec<Op> {
    #[derive(Default)]
    struct StepOps {
        queued: Option<usize>,
        started: Vec<usize>,
        finished: Option<usize>,
        mixed: bool,
    }
    let mut drop = vec![false; ops.len()];
    let mut steps: HashMap<(&str, &str), StepOps> = HashMap::new();
    {
        let mut ended_later: HashSet<&str> = HashSet::new();
        for (i, op) in ops.iter().enumerate().rev() {
            match op {
                Op::RunProgress { run_id, .. } if !ended_later.insert(run_id) => {
                    drop[i] = true;
                }
                Op::RunFinished(e) => {
                    ended_later.insert(&e.run_id);
                }
                _ => {}
            }
        }
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::StepQueued(s) => {
                    let e = steps.entry((&s.run_id, &s.step_key)).or_default();
                    if e.queued.is_some() || !e.started.is_empty() || e.finished.is_some() {
                        e.mixed = true;
                    }
                    e.queued = Some(i);
                }
                Op::StepStarted {
                    run_id, step_key, ..
                } => {
                    let e = steps.entry((run_id, step_key)).or_default();
                    if e.finished.is_some() {
                        e.mixed = true;
                    }
                    e.started.push(i);
                }
                Op::StepRetrying { run_id, step_key } => {
                    steps.entry((run_id, step_key)).or_default().mixed = true;
                }
                Op::StepFinished(s) => {
                    let e = steps.entry((&s.run_id, &s.step_key)).or_default();
                    if e.finished.is_some() || !s.status.is_final() {
                        e.mixed = true;
                    }
                    e.finished = Some(i);
                }
                _ => {}
            }
        }
    }
    let mut merge: Vec<StepOps> = steps
        .into_values()
        .filter(|e| {
            !e.mixed
                && match e.queued {
                    Some(_) => !e.started.is_empty() || e.finished.is_some(),
                    None => !e.started.is_empty() && e.finished.is_some(),
                }
        })
        .collect();
    if merge.is_empty() && !drop.contains(&true) {
        return ops;
    }
    let mut slots: Vec<Option<Op>> = ops.into_iter().map(Some).collect();
    for e in merge.drain(..) {
        let mut first: Option<(SystemTime, u32)> = None;
        for i in e.started {
            if let Some(Op::StepStarted { attempt, at, .. }) = slots[i].take() {
                first = Some(match first {
                    Some((t, _)) => (t, attempt),
                    None => (at, attempt),
                });
            }
        }
        let end = e.finished.and_then(|i| match slots[i].take() {
            Some(Op::StepFinished(end)) => Some(end),
            _ => None,
        });
        match (e.queued, e.finished) {
            (Some(q), _) => {
                let Some(Op::StepQueued(queued)) = slots[q].take() else {
                    continue;
                };
                slots[q] = Some(Op::StepRecorded(Box::new(StepRecord {
                    queued: *queued,
                    started: first,
                    end: end.map(|e| *e),
                })));
            }
            (None, Some(f)) => {
                if let (Some(started), Some(end)) = (first, end) {
                    slots[f] = Some(Op::StepRan { started, end });
                }
            }
            (None, None) => {}
        }
    }
    slots
        .into_iter()
        .zip(drop)
        .filter_map(|(op, dropped)| if dropped { None } else { op })
        .collect()
}

/// A step's queuing, first start and (if any) end, as one row. Where the row exists already
/// (a resumed run re-plans its steps), the same guards as the separate transitions hold: the
/// queued fields stay, and only a step that is not final yet moves on.
fn step_recorded(tx: &Transaction<'_>, r: &StepRecord) -> Applied {
    let q = &r.queued;
    let queued_at = iso8601(q.queued_at);
    let input = q.input.as_ref().and_then(json);
    let Some(s) = &r.end else {
        let (at, attempt) = r.started.unwrap_or((q.queued_at, 0));
        let n = tx
            .prepare_cached(
                "INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status,
                     attempts, input, queued_at, started_at, seq)
                 SELECT ?1, ?2, ?3, ?4, 'running', ?5, ?6, ?7, ?8,
                        COALESCE((SELECT MAX(seq) FROM runner_steps WHERE run_id = ?1), 0) + 1
                 WHERE EXISTS (SELECT 1 FROM runner_executions WHERE id = ?1)
                 ON CONFLICT (run_id, step_key) DO UPDATE SET
                     status = 'running', attempts = excluded.attempts,
                     started_at = COALESCE(runner_steps.started_at, excluded.started_at)
                 WHERE runner_steps.status IN ('pending', 'retrying', 'running')",
            )?
            .execute(params![
                q.run_id,
                q.step_key,
                q.node_id,
                q.item_index,
                attempt,
                input,
                queued_at,
                iso8601(at),
            ])?;
        return Ok(n);
    };
    let started = match r.started {
        Some((at, _)) => Some(iso8601(at)),
        None => s.implied_start().map(iso8601),
    };
    upsert_final_step(tx, s, input.as_deref(), &queued_at, started.as_deref())
}

/// Inserts a step in its final state (the run's next `seq`), or brings a recorded step that is
/// not final yet to it, keeping its `started_at` when set. A final row is left alone (the
/// guard). The number of rows changed.
fn upsert_final_step(
    tx: &Transaction<'_>,
    s: &StepEnd,
    input: Option<&str>,
    queued_at: &str,
    started: Option<&str>,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT INTO runner_steps (run_id, step_key, node_id, item_index, status, attempts,
             input, output, error_kind, error, tokens_used, cached, provider, model,
             queued_at, started_at, finished_at, duration_ms, reply_model, finish_reason,
             seq)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19, ?20,
                COALESCE((SELECT MAX(seq) FROM runner_steps WHERE run_id = ?1), 0) + 1
         WHERE EXISTS (SELECT 1 FROM runner_executions WHERE id = ?1)
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
    )?
    .execute(params![
        s.run_id,
        s.step_key,
        s.node_id,
        s.item_index,
        s.status.as_str(),
        s.attempts,
        input,
        s.output.as_ref().and_then(json),
        s.error_kind.map(|k| k.as_str()),
        s.error,
        saturating_i64(s.tokens_used),
        s.cached,
        s.provider,
        s.model,
        queued_at,
        started,
        iso8601(s.finished_at),
        saturating_i64(s.duration_ms),
        s.reply_model,
        s.finish_reason,
    ])
}
