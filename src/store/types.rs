//! The values that go into the store (one struct per state transition that needs more than a
//! couple of arguments) and the rows that come out of it.

use crate::blueprint::Priority;
use crate::error::ErrorKind;
use crate::events::{RunStatus, StepStatus};
use serde::Serialize;
use serde_json::Value;
use std::time::SystemTime;

/// A run that has just been queued (`runner_executions` row in status `queued`).
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: String,
    pub blueprint_name: String,
    pub priority: Priority,
    /// What started it: `cli`, `console`, `schedule`, `all-active`, `retry`, `resume` or `api`.
    pub trigger: String,
    pub sandbox: bool,
    pub seed: Option<u64>,
    /// Probability of an injected failure per attempt (sandbox runs); 0 for real runs.
    pub simulate_failures: f64,
    /// The variables the run was started with (after `--var` overrides).
    pub variables: Value,
    /// A snapshot of the blueprint as run, so a retry or resume runs the same graph even if the
    /// file changed since. `Value::Null` stores SQL NULL.
    pub blueprint: Value,
    /// The run this one retries or resumes.
    pub parent_run_id: Option<String>,
    pub queued_at: SystemTime,
}

/// The end of a run. Only a run that is not final yet is changed.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub run_id: String,
    /// Must be final (`success`, `error`, `cancelled`); anything else is ignored with a warning.
    pub status: RunStatus,
    pub finished_at: SystemTime,
    pub total_time_ms: u64,
    pub tokens_used: u64,
    pub steps_done: u32,
    pub error: Option<String>,
    pub error_kind: Option<ErrorKind>,
    /// The step key whose failure ended the run.
    pub failed_step: Option<String>,
}

/// A step that became ready to run (or was planned); recorded as `pending`.
#[derive(Debug, Clone)]
pub struct NewStep {
    pub run_id: String,
    /// `node` or `node[3]` for item 3 of a `forEach` node; unique within a run.
    pub step_key: String,
    pub node_id: String,
    pub item_index: Option<u32>,
    pub input: Option<Value>,
    pub queued_at: SystemTime,
}

/// One finished attempt of a step.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub run_id: String,
    pub step_key: String,
    /// 1 for the first try.
    pub attempt: u32,
    pub ok: bool,
    pub error_kind: Option<ErrorKind>,
    pub error: Option<String>,
    /// The wait before the next attempt; `None` when there is none.
    pub wait_ms: Option<u64>,
    pub started_at: SystemTime,
    pub finished_at: SystemTime,
    pub tokens_used: u64,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub cached: bool,
}

/// The final state of a step. Creates the step row when it was never queued (skipped steps).
#[derive(Debug, Clone)]
pub struct StepEnd {
    pub run_id: String,
    pub step_key: String,
    pub node_id: String,
    pub item_index: Option<u32>,
    /// Must be final (`success`, `error`, `skipped`, `cancelled`); anything else is ignored with
    /// a warning.
    pub status: StepStatus,
    pub attempts: u32,
    pub output: Option<Value>,
    pub error_kind: Option<ErrorKind>,
    pub error: Option<String>,
    pub tokens_used: u64,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub cached: bool,
    /// The model the server says answered, when it differs from what was asked or is known.
    pub reply_model: Option<String>,
    /// Why the model stopped (`stop`, `length` = cut off), when the server says.
    pub finish_reason: Option<String>,
    pub finished_at: SystemTime,
    pub duration_ms: u64,
}

impl StepEnd {
    /// The start recorded for a step that ran but was never reported as started (its end
    /// less the time it took); `None` for a step that never ran.
    pub(crate) fn implied_start(&self) -> Option<SystemTime> {
        if self.attempts == 0 || self.status == StepStatus::Skipped {
            return None;
        }
        self.finished_at
            .checked_sub(std::time::Duration::from_millis(self.duration_ms))
    }
}

/// Which runs [`Store::list_runs`](super::Store::list_runs) and
/// [`Store::count_runs`](super::Store::count_runs) return.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    /// Exact blueprint name.
    pub blueprint: Option<String>,
    /// Part of the blueprint name, any case (`tri` finds `triage`).
    pub name_contains: Option<String>,
    /// Page size (0 returns nothing). Ignored by `count_runs`.
    pub limit: usize,
    /// Keyset cursor: only runs strictly older than the last row of the previous page
    /// ([`RunFilter::cursor_after`]). Ignored by `count_runs`.
    pub before: Option<RunCursor>,
}

/// Where a history page ends: a run's `(started_at, id)`, opaque to callers. Times are kept
/// to the millisecond, as both backends store them, so a cursor matches its row exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCursor {
    pub(crate) started_ms: i64,
    pub(crate) id: String,
}

impl RunCursor {
    pub(crate) fn started(&self) -> SystemTime {
        super::from_unix_ms(self.started_ms)
    }
}

impl Default for RunFilter {
    fn default() -> Self {
        RunFilter {
            status: None,
            blueprint: None,
            name_contains: None,
            limit: 50,
            before: None,
        }
    }
}

impl RunFilter {
    /// The cursor that continues after `row` (pass it as `before` for the next page).
    pub fn cursor_after(row: &RunRow) -> Option<RunCursor> {
        row.started_at.map(|t| RunCursor {
            started_ms: super::unix_ms(t),
            id: row.id.clone(),
        })
    }
}

/// One `runner_executions` row. Times are kept to the millisecond; as JSON they are ISO-8601
/// UTC with milliseconds (`2026-11-27T09:44:38.123Z`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    pub id: String,
    pub blueprint_name: String,
    pub status: RunStatus,
    pub priority: Priority,
    pub trigger: String,
    pub sandbox: bool,
    pub seed: Option<u64>,
    pub simulate_failures: f64,
    pub variables: Value,
    pub blueprint: Option<Value>,
    pub parent_run_id: Option<String>,
    #[serde(serialize_with = "iso")]
    pub queued_at: SystemTime,
    /// The queue time until the run starts, then the start time.
    #[serde(serialize_with = "iso_opt")]
    pub started_at: Option<SystemTime>,
    #[serde(serialize_with = "iso_opt")]
    pub finished_at: Option<SystemTime>,
    pub total_time_ms: Option<u64>,
    pub tokens_used: u64,
    pub steps_total: Option<u32>,
    pub steps_done: Option<u32>,
    pub error: Option<String>,
    pub error_kind: Option<ErrorKind>,
    pub failed_step: Option<String>,
}

/// One `runner_steps` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRow {
    pub run_id: String,
    pub step_key: String,
    pub node_id: String,
    pub item_index: Option<u32>,
    pub status: StepStatus,
    pub attempts: u32,
    pub input: Option<Value>,
    pub output: Option<Value>,
    pub error_kind: Option<ErrorKind>,
    pub error: Option<String>,
    pub tokens_used: u64,
    pub cached: bool,
    pub provider: Option<String>,
    /// The model asked for.
    pub model: Option<String>,
    #[serde(serialize_with = "iso_opt")]
    pub queued_at: Option<SystemTime>,
    #[serde(serialize_with = "iso_opt")]
    pub started_at: Option<SystemTime>,
    #[serde(serialize_with = "iso_opt")]
    pub finished_at: Option<SystemTime>,
    pub duration_ms: Option<u64>,
    /// The model the server says answered (`None` when it did not say).
    pub reply_model: Option<String>,
    /// Why the model stopped: `stop`, or `length` when the answer was cut off.
    pub finish_reason: Option<String>,
}

impl StepRow {
    /// True when the answer was cut off (at maxTokens or the server's context size).
    pub fn truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }

    /// The answering model when the server named another one than was asked for.
    pub fn other_reply_model(&self) -> Option<&str> {
        let asked = self.model.as_deref()?;
        self.reply_model
            .as_deref()
            .filter(|m| !crate::models::same_model(asked, m))
    }
}

/// One `runner_attempts` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRow {
    pub step_key: String,
    pub attempt: u32,
    pub ok: bool,
    pub error_kind: Option<ErrorKind>,
    pub error: Option<String>,
    pub wait_ms: Option<u64>,
    #[serde(serialize_with = "iso")]
    pub started_at: SystemTime,
    #[serde(serialize_with = "iso")]
    pub finished_at: SystemTime,
    pub duration_ms: u64,
    pub tokens_used: u64,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub cached: bool,
}

/// Times serialise as the store's ISO-8601 text, as they always have in `--json` output.
pub(crate) fn iso<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&super::iso8601(*t))
}

pub(crate) fn iso_opt<S: serde::Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&super::iso8601(*t)),
        None => s.serialize_none(),
    }
}

/// A recorded error kind. A name this build does not know (written by a newer OmniFlow, or by
/// hand) reads as none rather than failing the whole row.
pub(crate) fn error_kind(name: Option<String>) -> Option<ErrorKind> {
    name.as_deref().and_then(ErrorKind::parse)
}
