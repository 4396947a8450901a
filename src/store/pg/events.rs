//! Live run events for every console on a fleet's database: the history writer tells which
//! runs a committed batch touched (`NOTIFY omniflow_events`), and a console `LISTEN`s and
//! re-reads those runs. Also the requests a console sends to the process driving a run it
//! does not drive itself (cancel, priority; `NOTIFY omniflow_requests`).
//!
//! - **One notification per batch, not per row.** The writer already folds up to 8,192
//!   writes into one transaction; the notification names the distinct runs those writes
//!   touched, so a step costs the same with or without consoles listening (one hash-set insert),
//!   and a fan-out at thousands of steps a second is a few notifications a second per process.
//! - **Sent at commit.** `pg_notify` inside the batch's transaction is delivered when it
//!   commits, and never for a batch rolled back: a console re-reading a named run sees what
//!   the notification announced.
//! - **Small, bounded payloads.** PostgreSQL refuses payloads of 8,000 bytes or more. A payload
//!   carries the sending process and run ids up to [`MAX_PAYLOAD`] bytes; past that it says
//!   `more` and the console re-reads its page instead of single rows.
//! - **Ids, never data.** What changed is read from the tables, with the reader's own access.

use super::super::transitions::Op;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The channel told, at each committed batch of history writes, which runs changed.
pub const EVENTS_CHANNEL: &str = "omniflow_events";
/// The channel told (payload: the run id) when a console asks a run's driver to cancel it or
/// to change its priority.
pub const REQUESTS_CHANNEL: &str = "omniflow_requests";

/// Most bytes of an events payload (PostgreSQL's limit is 8,000; this leaves room for a long
/// host name and keeps every notification small).
pub const MAX_PAYLOAD: usize = 4000;

/// What one notification on [`EVENTS_CHANNEL`] says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEvents {
    /// The process whose writes these were (`runner_processes.id`): a console skips its own,
    /// which it has from its event bus already.
    pub from: String,
    /// Runs whose rows changed (runs, steps or attempts), each once.
    pub runs: Vec<String>,
    /// More runs changed than the payload names: re-read the page, not single rows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

impl RunEvents {
    /// Reads a payload; `None` for text that is not one (another program on the channel).
    pub fn parse(payload: &str) -> Option<RunEvents> {
        serde_json::from_str(payload).ok()
    }
}

/// The run a write is about, if any.
fn run_of(op: &Op) -> Option<&str> {
    Some(match op {
        Op::InsertRun(r) => &r.id,
        Op::RunStarted { run_id, .. }
        | Op::StepStarted { run_id, .. }
        | Op::StepRetrying { run_id, .. }
        | Op::RunProgress { run_id, .. }
        | Op::AttemptFallback { run_id, .. } => run_id,
        Op::RunFinished(e) => &e.run_id,
        Op::StepQueued(s) => &s.run_id,
        Op::AttemptFinished(a) => &a.run_id,
        Op::StepFinished(s) => &s.run_id,
        Op::StepRecorded(r) => &r.queued.run_id,
        Op::StepRan { end, .. } => &end.run_id,
        Op::Heartbeat(_) | Op::ProcessStopped { .. } | Op::ReleaseRuns | Op::CachePut(_) => {
            return None
        }
    })
}

/// The payload announcing `ops` from process `from`, or `None` when they touch no run
/// (heartbeats, cache entries). One pass over the batch.
pub(crate) fn payload(from: &str, ops: &[Op]) -> Option<String> {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut runs: Vec<String> = Vec::new();
    // The JSON around the ids, and each id's quotes and comma.
    let mut size = from.len() + 40;
    let mut more = false;
    for run in ops.iter().filter_map(run_of) {
        if !seen.insert(run) {
            continue;
        }
        if more {
            continue;
        }
        let cost = run.len() + 3;
        if size + cost > MAX_PAYLOAD {
            more = true;
            continue;
        }
        size += cost;
        runs.push(run.to_string());
    }
    if runs.is_empty() && !more {
        return None;
    }
    let text = serde_json::to_string(&RunEvents {
        from: from.to_string(),
        runs,
        more,
    })
    .ok()?;
    // Ids or a host name full of characters JSON escapes could still pass the estimate.
    if text.len() < 8000 {
        Some(text)
    } else {
        serde_json::to_string(&RunEvents {
            from: String::new(),
            runs: Vec::new(),
            more: true,
        })
        .ok()
    }
}

/// Inside the batch's transaction: announces the runs `ops` touched (delivered at commit).
pub(crate) fn announce(
    tx: &mut postgres::Transaction<'_>,
    from: &str,
    ops: &[Op],
) -> Result<(), postgres::Error> {
    if let Some(p) = payload(from, ops) {
        tx.execute("SELECT pg_notify($1, $2)", &[&EVENTS_CHANNEL, &p])?;
    }
    Ok(())
}

/// What a console's listener tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Rows of these runs changed in another process.
    Runs { runs: Vec<String>, more: bool },
    /// Listening (again): changes made while the connection was down were not announced, so
    /// re-read once.
    Connected,
    /// The connection dropped (why); the console refreshes on its clock until it is back.
    Lost(String),
}

/// What a notification on [`EVENTS_CHANNEL`] tells process `me`: `None` for its own
/// announcements (its event bus has them) and for text that is not an announcement.
pub fn heard_runs(payload: &str, me: &str) -> Option<Live> {
    let ev = RunEvents::parse(payload)?;
    (ev.from != me).then_some(Live::Runs {
        runs: ev.runs,
        more: ev.more,
    })
}

/// Listens on [`EVENTS_CHANNEL`] over one dedicated connection until `stop`, skipping the
/// notifications of process `me`. Blocking: run it on a plain thread of its own. (A process
/// in a fleet listens on the fleet's connection instead: `Engine::follow_fleet_events`.)
pub fn follow(
    target: &super::PgTarget,
    me: &str,
    stop: &dyn Fn() -> bool,
    heard: &mut dyn FnMut(Live),
) {
    super::listen::listen(
        target,
        &[EVENTS_CHANNEL],
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(1),
        stop,
        &mut |h| match h {
            super::listen::Heard::Notice(n) => {
                if let Some(live) = heard_runs(&n.payload, me) {
                    heard(live);
                }
            }
            super::listen::Heard::Connected => heard(Live::Connected),
            super::listen::Heard::Lost(e) => heard(Live::Lost(e)),
        },
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;

    fn started(run: &str, step: &str) -> Op {
        Op::StepStarted {
            run_id: run.into(),
            step_key: step.into(),
            attempt: 1,
            at: SystemTime::now(),
        }
    }

    #[test]
    fn a_batch_names_each_run_once_in_first_seen_order() {
        let mut ops = Vec::new();
        for i in 0..6000 {
            ops.push(started(if i % 2 == 0 { "run-b" } else { "run-a" }, "s"));
        }
        ops.push(Op::ReleaseRuns);
        let p = payload("host:1:2", &ops).unwrap();
        let ev = RunEvents::parse(&p).unwrap();
        assert_eq!(ev.from, "host:1:2");
        assert_eq!(ev.runs, vec!["run-b".to_string(), "run-a".to_string()]);
        assert!(!ev.more);
        assert!(!p.contains("more"), "{p}");
    }

    /// A console hears the runs another process changed, and not its own (its event bus
    /// has those), nor text some other program sent on the channel.
    #[test]
    fn a_console_hears_other_processes_runs_not_its_own() {
        let p = payload("host:7:1", &[started("run-a", "s")]).unwrap();
        assert_eq!(
            heard_runs(&p, "host:9:1"),
            Some(Live::Runs {
                runs: vec!["run-a".to_string()],
                more: false
            })
        );
        assert_eq!(heard_runs(&p, "host:7:1"), None);
        assert_eq!(heard_runs("reindex done", "host:9:1"), None);
    }

    #[test]
    fn writes_about_no_run_announce_nothing() {
        assert_eq!(payload("h:1:2", &[Op::ReleaseRuns]), None);
        assert_eq!(payload("h:1:2", &[]), None);
    }

    /// A batch touching a hundred runs at once (a fan-out's steps, each its own run's) still
    /// names them all: a console updates those rows rather than re-reading its page.
    #[test]
    fn a_batch_touching_a_hundred_runs_names_them_all() {
        let ids: Vec<String> = (0..100).map(|i| format!("01JEXAMPLE{i:016}")).collect();
        let ops: Vec<Op> = ids.iter().map(|id| started(id, "s")).collect();
        let p = payload("some-long-host-name:123456:1700000000000", &ops).unwrap();
        let ev = RunEvents::parse(&p).unwrap();
        assert_eq!(ev.runs, ids);
        assert!(!ev.more, "{} bytes", p.len());
    }

    #[test]
    fn a_batch_touching_too_many_runs_stays_under_the_limit_and_says_more() {
        let ops: Vec<Op> = (0..2000)
            .map(|i| started(&format!("run{i:09}xyzw"), "s"))
            .collect();
        let p = payload("some-long-host-name:123456:1700000000000", &ops).unwrap();
        assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
        let ev = RunEvents::parse(&p).unwrap();
        assert!(ev.more);
        assert!(!ev.runs.is_empty() && ev.runs.len() < 2000);
        assert_eq!(ev.runs[0], "run000000000xyzw");
    }

    #[test]
    fn a_payload_that_escapes_past_the_limit_falls_back_to_more() {
        // Quotes are escaped in JSON, doubling their size beyond the estimate.
        let id = "\"".repeat(300);
        let ops: Vec<Op> = (0..40).map(|i| started(&format!("{id}{i}"), "s")).collect();
        let p = payload("h", &ops).unwrap();
        assert!(p.len() < 8000);
        assert!(RunEvents::parse(&p).unwrap().more);
    }

    #[test]
    fn text_that_is_not_a_payload_is_ignored() {
        assert_eq!(RunEvents::parse("42"), None);
        assert_eq!(RunEvents::parse(""), None);
    }
}
