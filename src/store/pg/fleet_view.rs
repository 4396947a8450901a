//! What a console reads and asks of the fleet beyond its own process: runs by id (re-read
//! when another process announces them, see `events.rs`), the attempts running on every
//! host (the queue's claimed rows), and requests to the process driving a run (cancel,
//! priority) that a console cannot carry out itself.
//!
//! Requests are columns of the run's row (`cancel_requested_at`, `priority_requested`,
//! migration 4), set with a `NOTIFY omniflow_requests` in the same transaction. The driver
//! looks at them when told and on a slow poll (`engine/fleet/requests.rs`), so a request
//! is not lost when the notification is, and a run adopted by another host after its driver
//! died is cancelled by its new driver.
//!
//! On SQLite there is no fleet: the reads answer with nothing and requests with
//! [`Requested::NotShared`].

use super::backend::{PgBackend, PgResult};
use super::read::{run_row, RUN_COLUMNS};
use crate::blueprint::Priority;
use crate::store::error::StoreError;
use crate::store::types::RunRow;
use crate::store::Store;
use postgres::error::SqlState;
use std::time::SystemTime;

/// An attempt a process of the fleet has claimed from the shared queue and is running.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningAttempt {
    /// The process running it (`runner_processes.id`: `host:pid:start`).
    pub worker: String,
    pub run_id: String,
    pub step_key: String,
    pub attempt: u32,
    pub claimed_at: Option<SystemTime>,
}

/// What a console asks of the process driving a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Cancel,
    Priority(Priority),
}

/// How a request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// Recorded and announced; the run's driver (this process, when it has a live one) acts
    /// on it within a second, or at its next poll.
    Sent { owner: Option<String> },
    /// The run is not queued or running.
    NotActive,
    /// The history is an SQLite file: there is no fleet to ask.
    NotShared,
}

/// The store's migration that adds the request columns (set by any console, read by the
/// run's driver).
pub(crate) const MIGRATION: &str = r#"
ALTER TABLE runner_executions ADD COLUMN cancel_requested_at timestamptz;
ALTER TABLE runner_executions ADD COLUMN priority_requested text;
"#;

/// Most running attempts a console reads (a pane shows far fewer).
pub const RUNNING_LIMIT: i64 = 500;

impl Store {
    /// These runs' rows, in no particular order (ids not found are left out).
    pub fn runs_by_id(&self, ids: Vec<String>) -> Result<Vec<RunRow>, StoreError> {
        match self.pg() {
            Some(pg) => pg.runs_by_id(ids),
            None => Ok(ids.iter().filter_map(|id| self.find_run(id).ok()).collect()),
        }
    }

    /// The attempts running on every process of the fleet, oldest claim first (at most
    /// [`RUNNING_LIMIT`]); nothing on SQLite, or before the queue exists.
    pub fn running_attempts(&self) -> Result<Vec<RunningAttempt>, StoreError> {
        match self.pg() {
            Some(pg) => pg.running_attempts(),
            None => Ok(Vec::new()),
        }
    }

    /// Asks the process driving `run_id` to cancel it or change its priority.
    pub fn request(&self, run_id: &str, request: Request) -> Result<Requested, StoreError> {
        match self.pg() {
            Some(pg) => pg.request(run_id.to_string(), request),
            None => Ok(Requested::NotShared),
        }
    }

    /// Requests waiting for the runs `ids` (the ones this process drives); a priority request
    /// is taken (cleared), a cancel request stays until the run ends.
    pub fn take_requests(&self, ids: Vec<String>) -> Result<Vec<(String, Request)>, StoreError> {
        match self.pg() {
            Some(pg) if !ids.is_empty() => pg.take_requests(ids),
            _ => Ok(Vec::new()),
        }
    }
}

impl PgBackend {
    fn runs_by_id(&self, ids: Vec<String>) -> Result<Vec<RunRow>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.read("reading runs", move |c| {
            let sql = format!("SELECT {RUN_COLUMNS} FROM runner_executions WHERE id = ANY($1)");
            c.query(&sql, &[&ids])?.iter().map(run_row).collect()
        })
    }

    fn running_attempts(&self) -> Result<Vec<RunningAttempt>, StoreError> {
        self.read("reading the fleet's running steps", |c| {
            let rows = match c.query(
                "SELECT locked_by, run_id, step_key, attempt, claimed_at FROM runner_queue
                 WHERE state = 'running' AND locked_by IS NOT NULL
                 ORDER BY claimed_at, id LIMIT $1",
                &[&RUNNING_LIMIT],
            ) {
                Ok(rows) => rows,
                // The queue's table comes with the first process of the fleet: none yet.
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            rows.iter()
                .map(|r| -> PgResult<RunningAttempt> {
                    Ok(RunningAttempt {
                        worker: r.try_get(0)?,
                        run_id: r.try_get(1)?,
                        step_key: r.try_get(2)?,
                        attempt: u32::try_from(r.try_get::<_, i32>(3)?).unwrap_or(0),
                        claimed_at: r.try_get(4)?,
                    })
                })
                .collect()
        })
    }

    fn request(&self, run_id: String, request: Request) -> Result<Requested, StoreError> {
        self.read("sending a request to a run's driver", move |c| {
            let mut tx = c.transaction()?;
            let row = match request {
                Request::Cancel => tx.query_opt(
                    "UPDATE runner_executions SET cancel_requested_at = now()
                     WHERE id = $1 AND status IN ('queued', 'running') RETURNING owner",
                    &[&run_id],
                )?,
                // The row shows the new priority at once; the driver takes the request and
                // moves the run's steps (queued ones and later ones).
                Request::Priority(p) => tx.query_opt(
                    "UPDATE runner_executions SET priority = $2, priority_requested = $2
                     WHERE id = $1 AND status IN ('queued', 'running') RETURNING owner",
                    &[&run_id, &p.as_str()],
                )?,
            };
            let Some(row) = row else {
                return Ok(Requested::NotActive);
            };
            let owner: Option<String> = row.try_get(0)?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&super::events::REQUESTS_CHANNEL, &run_id],
            )?;
            tx.commit()?;
            Ok(Requested::Sent { owner })
        })
    }

    fn take_requests(&self, ids: Vec<String>) -> Result<Vec<(String, Request)>, StoreError> {
        self.read("reading requests for this process's runs", move |c| {
            let mut tx = c.transaction()?;
            // Runs ended meanwhile are left alone: there is nothing to do for them.
            let rows = tx.query(
                "SELECT id, cancel_requested_at IS NOT NULL, priority_requested
                 FROM runner_executions
                 WHERE id = ANY($1) AND status IN ('queued', 'running')
                   AND (cancel_requested_at IS NOT NULL OR priority_requested IS NOT NULL)
                 FOR UPDATE",
                &[&ids],
            )?;
            let mut out = Vec::new();
            let mut taken: Vec<String> = Vec::new();
            for r in &rows {
                let id: String = r.try_get(0)?;
                if r.try_get::<_, bool>(1)? {
                    out.push((id.clone(), Request::Cancel));
                }
                let p: Option<String> = r.try_get(2)?;
                if let Some(p) = p.as_deref().and_then(Priority::parse) {
                    out.push((id.clone(), Request::Priority(p)));
                }
                if p.is_some() {
                    taken.push(id);
                }
            }
            if !taken.is_empty() {
                tx.execute(
                    "UPDATE runner_executions SET priority_requested = NULL WHERE id = ANY($1)",
                    &[&taken],
                )?;
            }
            tx.commit()?;
            Ok(out)
        })
    }
}
