//! The driver's side: a step attempt becomes a queue row, and its result comes back.

use super::{blocking, lock, Enqueue, Fleet};
use crate::blueprint::Node;
use crate::engine::nodes::Prepared;
use crate::engine::run::RunCtx;
use crate::engine::step::AttemptDone;
use crate::engine::Inner;
use crate::error::{ErrorKind, StepError};
use crate::pool::{JobMeta, PoolError};
use crate::retry::Doubling;
use crate::store::pg::queue::{new_token, Claimer, NewJob, Outcome};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What a queue row carries for the host that runs it: everything an attempt needs that
/// the worker's own engine does not have.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Work {
    pub prepared: Prepared,
    /// The attempt's timeout (unscaled; the worker scales it by its own time scale).
    pub timeout_ms: u64,
    /// The run this one retries or resumes: notifications dedupe on the chain's root.
    #[serde(default)]
    pub parent_run_id: Option<String>,
}

/// Sends one step's attempts through the fleet's queue.
pub(crate) struct Dispatcher {
    fleet: Arc<Fleet>,
    run_id: String,
    step: String,
    tags: Vec<String>,
    payload: serde_json::Value,
}

/// The dispatcher of a step when its run goes through the fleet's queue: a fleet is on, the
/// run is not a sandbox (its simulated model is the run's own) and the step is not replayed.
pub(crate) fn dispatcher(
    ctx: &RunCtx,
    step: &str,
    node: &Node,
    prepared: &Prepared,
    timeout: Duration,
) -> Option<Dispatcher> {
    let fleet = ctx.inner.fleet.as_ref()?.0.clone();
    if ctx.is_sandbox || ctx.replay.contains_key(step) {
        return None;
    }
    let work = serde_json::json!({
        "prepared": prepared,
        "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        "parent_run_id": ctx.parent_run_id,
    });
    let mut tags: Vec<String> = ctx
        .blueprint
        .tags
        .iter()
        .chain(node.tags.iter())
        .map(|t| t.to_ascii_lowercase())
        .collect();
    tags.sort();
    tags.dedup();
    Some(Dispatcher {
        fleet,
        run_id: ctx.run_id.to_string(),
        step: step.to_string(),
        tags,
        payload: work,
    })
}

impl Dispatcher {
    /// Enqueues attempt `meta.attempt` and waits for its result. `Err` when `abort` fired
    /// first (the row is withdrawn; a worker running it stops at its next heartbeat). A queue
    /// that cannot be reached fails the attempt with a `network` error, which the retry policy
    /// treats like any other network failure.
    pub(crate) async fn dispatch(
        &self,
        meta: JobMeta,
        abort: &CancellationToken,
    ) -> Result<AttemptDone, PoolError> {
        let job = NewJob {
            run_id: self.run_id.clone(),
            step_key: self.step.clone(),
            attempt: meta.attempt,
            priority: u8::try_from(meta.priority.index()).unwrap_or(1),
            tags: self.tags.clone(),
            payload: self.payload.clone(),
        };
        // A row that vanishes before its result is taken is enqueued again (a few times).
        for round in 0.. {
            match self.enqueue_and_wait(job.clone(), abort).await? {
                Some(done) => return Ok(done),
                None if round < 3 => {
                    tracing::warn!(run_id = %self.run_id, step = %self.step, attempt = job.attempt, "fleet: the step's row left the queue before its result was taken (another driver of the run took or withdrew it); queueing it again");
                }
                None => break,
            }
        }
        Ok(AttemptDone::failed_now(StepError::new(
            ErrorKind::Interrupted,
            "the step's row kept leaving the fleet's queue before its result was taken (another \
             process drives this run too?)",
        )))
    }

    /// One enqueue of `job` and the wait for its outcome; `None` when its row vanished.
    async fn enqueue_and_wait(
        &self,
        job: NewJob,
        abort: &CancellationToken,
    ) -> Result<Option<AttemptDone>, PoolError> {
        let fleet = &self.fleet;
        let (reply, queued) = oneshot::channel();
        if fleet.enqueue_tx.send(Enqueue { job, reply }).is_err() {
            return Err(PoolError::Dropped);
        }
        let mut queued = queued;
        let (id, outcome) = tokio::select! {
            r = &mut queued => match r {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    return Ok(Some(AttemptDone::failed_now(StepError::new(
                        ErrorKind::Network,
                        format!("the step could not be queued in the fleet database: {e}"),
                    ))))
                }
                Err(_) => return Err(PoolError::Dropped),
            },
            _ = abort.cancelled() => {
                // The row may be inserted after all: withdraw it once its id is known.
                let fleet = fleet.clone();
                tokio::spawn(async move {
                    if let Ok(Ok((id, _))) = queued.await {
                        fleet.withdraw(id).await;
                    }
                });
                return Err(PoolError::Dropped);
            }
        };
        tokio::select! {
            o = outcome => match o {
                Ok(Outcome::Done(v)) => Ok(Some(serde_json::from_value(v).unwrap_or_else(|e| {
                    AttemptDone::failed_now(StepError::new(
                        ErrorKind::Internal,
                        format!("the attempt's result in the queue cannot be read ({e}); are all \
                                 hosts on the same OmniFlow version?"),
                    ))
                }))),
                Ok(Outcome::Failed(why)) => Ok(Some(AttemptDone::failed_now(StepError::new(
                    ErrorKind::Interrupted,
                    why,
                )))),
                Ok(Outcome::Vanished) => Ok(None),
                Err(_) => Err(PoolError::Dropped),
            },
            _ = abort.cancelled() => {
                fleet.withdraw(id).await;
                Err(PoolError::Dropped)
            }
        }
    }
}

impl Fleet {
    /// Stops waiting for row `id` and takes it out of the queue.
    async fn withdraw(self: &Arc<Self>, id: i64) {
        lock(&self.waiters).remove(&id);
        let q = self.queue.clone();
        if let Err(e) = blocking(move || q.cancel(&[id])).await {
            tracing::warn!(error = %e, row = id, "fleet: cannot withdraw a cancelled step; a worker may still run it, its result is ignored");
        }
    }
}

/// Creates the queue's tables (retrying until the database answers), then inserts what the
/// drivers enqueue, in batches: everything waiting when a batch starts goes in one
/// transaction.
pub(crate) async fn schema_then_enqueue(
    fleet: Arc<Fleet>,
    engine: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<Enqueue>,
) {
    let mut wait = Doubling::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let q = fleet.queue.clone();
        match blocking(move || q.ensure_schema()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "fleet: the queue's database does not answer yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait.next_wait()) => {}
                    _ = fleet.stop.cancelled() => return,
                }
            }
        }
    }
    // Claimers wait for the tables.
    fleet.ready.store(true, Ordering::Relaxed);
    fleet.jobs_wake.notify_one();
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(e) => e, None => return },
            _ = fleet.stop.cancelled() => return,
        };
        // A fan-out's steps are sent in one turn of their driver, which may run on another
        // thread: let it finish sending, so they share one transaction.
        tokio::task::yield_now().await;
        let batch = super::batch_from(first, &mut rx, super::MAX_BATCH);
        let jobs: Vec<NewJob> = batch.iter().map(|e| e.job.clone()).collect();
        // The steps' `pending` rows (and a retried step's `retrying`) were queued to this
        // process's writer before their attempts came here. Another host that claims a row
        // must find its step recorded when it marks it running, so a row another host may
        // take is inserted only once they are committed. A row this process claims itself
        // needs no wait: its own writer records the step's start after its queuing. So when
        // this process can take the whole batch (its tags, its free workers), the insert
        // goes first, holding back what it could not claim after all (claimable rows ahead
        // of the batch), which is revealed once the history is committed.
        let mine = |free: usize| {
            free >= jobs.len()
                && jobs
                    .iter()
                    .all(|j| j.tags.iter().all(|t| fleet.tags.contains(t)))
        };
        let inner = engine.upgrade();
        let free_now = inner
            .as_ref()
            .map_or(0, |inner| super::worker::free_workers(inner, &fleet));
        if !mine(free_now) {
            super::history_committed(&engine).await;
        }
        // This process's free workers take what a claim right after the insert would give
        // them, in the insert itself. The claimer waits meanwhile, so no worker is counted
        // twice; the claimed rows are started before it goes on.
        let claiming = fleet.claiming.lock().await;
        let free = inner
            .as_ref()
            .map_or(0, |inner| super::worker::free_workers(inner, &fleet));
        // Decided again under the lock (a claim may have taken workers meanwhile); a batch
        // that no longer fits waits for the history here.
        let hold = mine(free_now) && mine(free);
        if mine(free_now) && !hold {
            super::history_committed(&engine).await;
        }
        // A batch this process takes whole starts its attempts now, under tokens chosen here,
        // while its insert is on its way: the insert's round trip is off the calls' path. A
        // result waits for its row; an attempt whose row is not this process's after all
        // (claimable rows were ahead of it, or the insert failed) is stopped, its result
        // dropped. The insert is sent first, so the database works while the calls start.
        let chosen: Vec<String> = match &inner {
            Some(_) if hold => jobs.iter().map(|_| new_token()).collect(),
            _ => Vec::new(),
        };
        let tokens: Option<Vec<Option<String>>> =
            (!chosen.is_empty()).then(|| chosen.iter().cloned().map(Some).collect());
        let (q, worker, tags, lease) = (
            fleet.queue.clone(),
            fleet.worker_id.clone(),
            fleet.tags.clone(),
            fleet.lease,
        );
        let insert = tokio::spawn(blocking(move || {
            let me = Claimer {
                worker: &worker,
                tags: &tags,
                free,
                lease,
                hold_rest: hold.then_some(lease),
                tokens: tokens.as_deref(),
            };
            q.enqueue_claiming(&jobs, (free > 0).then_some(&me))
        }));
        // An attempt whose payload cannot be read here is not started: its row, claimed
        // under its token all the same, is started after the insert like any claimed row,
        // and fails with the reason.
        let mut early: Vec<Option<super::worker::Early>> = match &inner {
            Some(inner) => batch
                .iter()
                .zip(chosen)
                .map(|(e, token)| super::worker::start_early(inner, &fleet, &e.job, token))
                .collect(),
            None => Vec::new(),
        };
        let inserted = insert
            .await
            .unwrap_or_else(|e| Err(format!("a queue operation stopped abnormally ({e})")));
        match inserted {
            Ok(rows) => {
                let held: Vec<i64> = if hold {
                    rows.iter()
                        .filter(|(_, claim)| claim.is_none())
                        .map(|(id, _)| *id)
                        .collect()
                } else {
                    Vec::new()
                };
                fleet
                    .counters
                    .enqueued
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                let mut claimed = Vec::new();
                let left_queued = rows.iter().any(|(_, claim)| claim.is_none());
                for (i, (e, (id, claim))) in batch.into_iter().zip(rows).enumerate() {
                    let started = early.get_mut(i).and_then(Option::take);
                    let (tx, rx) = oneshot::channel();
                    lock(&fleet.waiters).insert(id, tx);
                    if e.reply.send(Ok((id, rx))).is_err() {
                        // Its driver stopped waiting meanwhile (a row claimed here is
                        // withdrawn unstarted).
                        if let Some(started) = started {
                            started.not_ours();
                        }
                        fleet.withdraw(id).await;
                        continue;
                    }
                    match (started, claim) {
                        // Its waiter is in place before its result can go anywhere.
                        (Some(started), Some(c)) if c.token == started.token => {
                            started.claimed(&fleet, id);
                        }
                        (started, claim) => {
                            if let Some(started) = started {
                                started.not_ours();
                            }
                            claimed.extend(claim);
                        }
                    }
                }
                // The waiters are in place before any claimed row runs.
                if let Some(inner) = &inner {
                    // A row the claimer holds already (a retried insert found it) is not
                    // started twice.
                    claimed.retain(|c| !lock(&fleet.held).contains_key(&c.id));
                    fleet
                        .counters
                        .claimed
                        .fetch_add(claimed.len() as u64, Ordering::Relaxed);
                    for job in claimed {
                        super::worker::start(inner, &fleet, job);
                    }
                }
                drop(claiming);
                // A result may have come before its waiter was registered.
                fleet.results_wake.notify_one();
                if !held.is_empty() {
                    super::history_committed(&engine).await;
                    let q = fleet.queue.clone();
                    if let Err(e) = blocking(move || q.reveal(&held)).await {
                        tracing::warn!(error = %e, "fleet: cannot release held steps; they become claimable when their hold runs out");
                    }
                }
                // Rows left queued (no free worker here, or rows ahead of them): this
                // process's own claimer need not wait for the notification's round trip.
                if left_queued {
                    fleet.jobs_wake.notify_one();
                }
            }
            Err(e) => {
                for started in early.into_iter().flatten() {
                    started.not_ours();
                }
                for en in batch {
                    let _ = en.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Hands finished rows to their drivers: woken by `NOTIFY omniflow_done` or a local
/// completion, and every [`super::POLL`] in case a notification was missed.
pub(crate) async fn collector(fleet: Arc<Fleet>) {
    loop {
        tokio::select! {
            _ = fleet.results_wake.notified() => {}
            _ = tokio::time::sleep(super::POLL) => {}
            _ = fleet.stop.cancelled() => return,
        }
        let ids: Vec<i64> = lock(&fleet.waiters).keys().copied().collect();
        if ids.is_empty() {
            continue;
        }
        let q = fleet.queue.clone();
        match blocking(move || q.finished(&ids)).await {
            Ok(done) => deliver(&fleet, done),
            Err(e) => {
                tracing::warn!(error = %e, "fleet: cannot read step results; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = fleet.stop.cancelled() => return,
                }
            }
        }
    }
}

/// Hands finished rows' outcomes to the drivers awaiting them, then deletes the rows taken,
/// off the drivers' path. (A row nobody here awaits is left for its driver.)
pub(super) fn deliver(fleet: &Arc<Fleet>, done: Vec<(i64, Outcome)>) {
    let mut taken = Vec::new();
    {
        let mut waiters = lock(&fleet.waiters);
        for (id, outcome) in done {
            if let Some(tx) = waiters.remove(&id) {
                if outcome != Outcome::Vanished {
                    taken.push(id);
                }
                let _ = tx.send(outcome);
            }
        }
    }
    // The next look asks only for rows still awaited, so these are not read again.
    if taken.is_empty() {
        return;
    }
    // Deleted once no completion is being written (a burst of them, each holding one of the
    // few pooled connections, does not wait for these deletes), or once many are waiting.
    let now = {
        let mut later = lock(&fleet.to_forget);
        later.extend(taken);
        later.len() >= 1000 || lock(&fleet.completing).is_empty()
    };
    if now {
        fleet.forget_taken();
    }
}

impl Fleet {
    /// Deletes the rows whose results their drivers here have taken (see [`deliver`]).
    pub(super) fn forget_taken(self: &Arc<Self>) {
        let taken = std::mem::take(&mut *lock(&self.to_forget));
        if taken.is_empty() {
            return;
        }
        // Counted as pending: a process stopping deletes them before it goes.
        self.pending.fetch_add(1, Ordering::SeqCst);
        let f = self.clone();
        tokio::spawn(async move {
            let q = f.queue.clone();
            if let Err(e) = blocking(move || q.forget(&taken)).await {
                tracing::debug!(error = %e, "fleet: finished steps stay in the queue until their run ends");
            }
            f.pending.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
