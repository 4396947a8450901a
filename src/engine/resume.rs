//! Resuming a run from the store after its process stopped (crash, SIGKILL, power loss, or a
//! graceful handover). The store is the truth:
//! - steps recorded `success` are reused, never run again (their outputs feed what follows);
//! - steps recorded as started but unfinished run again, their attempt numbers (and retry
//!   budget) continuing from the record;
//! - a notification step that was being sent runs again, and its parts follow their records
//!   (`notify/mod.rs`): parts delivered are skipped, parts never started are sent, and the one
//!   part whose intent is recorded without an outcome (the process may have died after
//!   Telegram or Discord accepted it) is NOT sent again, since no message may arrive twice. The
//!   step then says `"delivered": null` with a note; the log says why.

use super::{Engine, RunHandle, RunRequest};
use crate::blueprint::Blueprint;
use crate::events::StepStatus;
use crate::store::{Claim, StoreError};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Why a run cannot be resumed here.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{}", live_message(run_id, owner, role.as_deref(), *expires_in))]
    Live {
        run_id: String,
        /// The holder's process id (`host:pid:start`), or "this process".
        owner: String,
        role: Option<String>,
        /// How long its lease lasts if it stops heartbeating now; `None` for this process.
        expires_in: Option<std::time::Duration>,
    },
    #[error("run {run_id} is already running in this process")]
    Here { run_id: String },
    #[error("run {run_id} already ended ({status}); nothing to resume — `omniflow show {run_id}`")]
    Finished { run_id: String, status: String },
    #[error("no run with id {0} — see `omniflow runs`")]
    NotFound(String),
    #[error("run {run_id} was interrupted {takeovers} times and has been failed instead of resumed again (`omniflow show {run_id}` names the steps that were in flight)")]
    Exhausted { run_id: String, takeovers: u32 },
    #[error("run {run_id} cannot be resumed: its recorded blueprint does not load ({reason})")]
    BadSnapshot { run_id: String, reason: String },
    #[error("this process is shutting down and resumes nothing")]
    ShuttingDown,
    /// The blocking read of the run panicked or was stopped: never a reason to say the run
    /// does not exist.
    #[error("reading run {run_id} from the database did not finish ({reason}); this is a bug in OmniFlow — please report it")]
    ReadFailed { run_id: String, reason: String },
}

/// Who holds a run, for how long, and what to do about it.
fn live_message(
    run_id: &str,
    owner: &str,
    role: Option<&str>,
    expires_in: Option<std::time::Duration>,
) -> String {
    let mut parts = owner.rsplitn(3, ':');
    let (_, pid, host) = (parts.next(), parts.next(), parts.next());
    let who = match (host, pid) {
        (Some(host), Some(pid)) => format!(
            "{}process {pid} on {host}",
            role.map(|r| format!("`omniflow {r}` ")).unwrap_or_default()
        ),
        _ => format!("process {owner}"),
    };
    let here = crate::store::process_id()
        .rsplitn(3, ':')
        .nth(2)
        .map(str::to_string);
    let stop = match (host, pid) {
        (Some(h), Some(pid)) if here.as_deref() == Some(h) => {
            format!("stop it with `kill {pid}` (it hands the run over) and resume")
        }
        (Some(h), Some(pid)) => {
            format!("stop it on {h} with `kill {pid}` (it hands the run over) and resume")
        }
        _ => "stop that process and resume".to_string(),
    };
    let lease = expires_in
        .map(|d| {
            format!(
                "; its lease expires in {} s unless it heartbeats again",
                d.as_secs_f64().ceil() as u64
            )
        })
        .unwrap_or_default();
    format!(
        "run {run_id} is held by {who} ({owner}), which is alive{lease}. It continues the run \
         there; to take it over here, {stop}: `omniflow resume {run_id}`"
    )
}

impl Engine {
    /// Claims `run_id` (or a unique prefix of it) from a stopped process and continues it.
    pub async fn resume(&self, run_id: &str) -> Result<RunHandle, ResumeError> {
        if self
            .inner
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(ResumeError::ShuttingDown);
        }
        let store = self.inner.store.clone();
        let wanted = run_id.to_string();
        let row = tokio::task::spawn_blocking(move || store.find_run(&wanted))
            .await
            .map_err(|e| ResumeError::ReadFailed {
                run_id: run_id.to_string(),
                reason: e.to_string(),
            })?
            .map_err(|e| match e {
                StoreError::NotFound(_) => ResumeError::NotFound(run_id.to_string()),
                other => ResumeError::Store(other),
            })?;
        let id = row.id.clone();
        if self.active_runs().contains(&id) {
            return Err(ResumeError::Here { run_id: id });
        }
        let config = &self.inner.config;
        match self
            .inner
            .store
            .claim_run(
                &id,
                config.scaled(config.lease_timeout),
                config.max_takeovers,
            )
            .await?
        {
            Claim::Claimed { .. } | Claim::Mine => {}
            Claim::Live {
                owner,
                role,
                expires_in,
            } => {
                return Err(ResumeError::Live {
                    run_id: id,
                    owner,
                    role,
                    expires_in: Some(expires_in),
                })
            }
            Claim::Finished => {
                return Err(ResumeError::Finished {
                    run_id: id,
                    status: row.status.as_str().into(),
                })
            }
            Claim::NotFound => return Err(ResumeError::NotFound(id)),
            Claim::Exhausted { takeovers } => {
                return Err(ResumeError::Exhausted {
                    run_id: id,
                    takeovers,
                })
            }
        }
        let blueprint: Blueprint =
            super::replay::recorded_blueprint(&row).map_err(|reason| ResumeError::BadSnapshot {
                run_id: id.clone(),
                reason,
            })?;
        let store = self.inner.store.clone();
        let sid = id.clone();
        let steps = tokio::task::spawn_blocking(move || store.run_steps(&sid))
            .await
            .map_err(|e| ResumeError::ReadFailed {
                run_id: id.clone(),
                reason: e.to_string(),
            })??;

        let mut reuse = HashMap::new();
        let mut already_done = std::collections::HashSet::new();
        let mut attempts_before = HashMap::new();
        for s in &steps {
            match s.status {
                StepStatus::Success => {
                    reuse.insert(s.step_key.clone(), s.output.clone().unwrap_or(Value::Null));
                    already_done.insert(s.step_key.clone());
                }
                _ => {
                    if s.attempts > 0 {
                        attempts_before.insert(s.step_key.clone(), s.attempts);
                    }
                }
            }
        }
        // In a fleet, a step whose attempt the history shows started but not finished may
        // have its row still in the queue: queued, running on a live host, or done with its
        // result never taken because the driver died first. That attempt is the one to wait
        // for (its result is used, the provider is not asked again).
        if let Some(fleet) = &self.inner.fleet {
            if !attempts_before.is_empty() && !row.sandbox {
                let q = fleet.0.queue().clone();
                let rid = id.clone();
                match crate::store::pg::queue::blocking(move || q.attempts_of(&rid)).await {
                    Ok(left) => {
                        for (step, attempt) in left {
                            if let Some(n) = attempts_before.get_mut(&step) {
                                if attempt >= *n && attempt > 0 {
                                    *n = attempt - 1;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(run_id = %id, error = %e, "cannot read the run's steps left in the fleet's queue; the steps in flight are asked again");
                    }
                }
            }
        }
        let variables: Map<String, Value> = match &row.variables {
            Value::Object(m) => m.clone(),
            _ => blueprint.variables.clone(),
        };
        tracing::info!(run_id = %id, reused = reuse.len(), "resuming run");
        let req = RunRequest {
            variables: Map::new(),
            sandbox: row.sandbox,
            simulate_failures: row.simulate_failures,
            seed: row.seed,
            priority: Some(row.priority),
            trigger: super::Trigger::Resume,
            parent_run_id: None,
            reuse,
            attempts_before,
            replay: HashMap::new(),
            already_done,
            already_started: row.status == crate::events::RunStatus::Running,
        };
        Ok(self.launch(
            id,
            Arc::new(blueprint),
            variables,
            req,
            row.seed,
            row.priority,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::live_message;

    /// Told that a live process holds the run, the user gets the command to stop it: a bare
    /// `kill` when it runs on this host, and the host to run it on when it does not.
    #[test]
    fn a_live_holder_is_stopped_here_or_on_its_own_host() {
        let here = crate::store::process_id().rsplitn(3, ':').nth(2).unwrap();
        let local = live_message("r1", &format!("{here}:4242:1"), Some("daemon"), None);
        assert!(
            local.contains(&format!(
                "held by `omniflow daemon` process 4242 on {here} ({here}:4242:1), which is alive."
            )),
            "{local}"
        );
        assert!(
            local.contains("stop it with `kill 4242` (it hands the run over) and resume"),
            "{local}"
        );
        let remote = live_message(
            "r1",
            "other-host:4242:1",
            None,
            Some(std::time::Duration::from_millis(2_500)),
        );
        assert!(
            remote.contains(
                "stop it on other-host with `kill 4242` (it hands the run over) and resume"
            ),
            "{remote}"
        );
        assert!(
            remote.contains("its lease expires in 3 s unless it heartbeats again"),
            "{remote}"
        );
    }
}
