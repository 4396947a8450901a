//! The worker's side: claim rows into the local pool's free workers, run them with this
//! host's providers, keep their leases, record their results (fenced), and sweep the leases
//! of hosts that died.

use super::dispatch::Work;
use super::{blocking, lock, Fleet, Held};
use crate::blueprint::Priority;
use crate::engine::nodes::AttemptEnv;
use crate::engine::step::{self, AttemptDone};
use crate::engine::Inner;
use crate::error::{ErrorKind, StepError};
use crate::pool::JobMeta;
use crate::retry::Doubling;
use crate::store::pg::queue::{ClaimedJob, NewJob, Outcome};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Fills the local pool's free workers from the queue, whenever rows may be claimable (a
/// `NOTIFY`), a local worker frees up, or the slow poll comes.
pub(crate) async fn claimer(fleet: Arc<Fleet>, engine: Weak<Inner>) {
    let first_backoff = || Doubling::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut backoff = first_backoff();
    let mut hint = ClaimHint::new();
    loop {
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let claiming = fleet.claiming.lock().await;
        let free = free_workers(&inner, &fleet);
        let mut again = false;
        if free == 0 {
            hint.claimed(0, 0);
        } else {
            let (q, worker, tags, lease) = (
                fleet.queue.clone(),
                fleet.worker_id.clone(),
                fleet.tags.clone(),
                fleet.lease,
            );
            match blocking(move || q.claim(&worker, &tags, free, lease)).await {
                Ok(jobs) => {
                    backoff = first_backoff();
                    again = hint.claimed(free, jobs.len());
                    fleet
                        .counters
                        .claimed
                        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                    for job in jobs {
                        start(&inner, &fleet, job);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: cannot claim steps; retrying");
                    drop(claiming);
                    drop(inner);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                        _ = fleet.stop.cancelled() => return,
                    }
                    continue;
                }
            }
        }
        drop(claiming);
        drop(inner);
        if again {
            continue; // there may be more: look again while workers are free
        }
        let poll = tokio::time::sleep(super::POLL);
        tokio::pin!(poll);
        loop {
            tokio::select! {
                _ = fleet.jobs_wake.notified() => {}
                _ = fleet.slot_freed.notified() => {
                    if !hint.claim_for_freed_worker() {
                        continue;
                    }
                }
                _ = &mut poll => {}
                _ = fleet.stop.cancelled() => return,
            }
            break;
        }
        hint.woken();
    }
}

/// Whether claimable rows may be waiting, as the claimer knows it: set by a notice, a poll, a
/// claim that took all it asked for, or no claim at all (no worker was free to look), and
/// cleared by a claim that took less. A worker freeing up claims only then: otherwise every
/// finished step would cost an empty claim, and hold up an enqueue that waits for the
/// claimer.
#[derive(Debug)]
struct ClaimHint {
    maybe_rows: bool,
}

impl ClaimHint {
    fn new() -> ClaimHint {
        ClaimHint { maybe_rows: true }
    }

    /// A claim for `free` workers took `got` rows (`free` 0: none was free, nothing was
    /// asked). Returns whether to claim again at once: it took all it asked for, so there
    /// may be more.
    fn claimed(&mut self, free: usize, got: usize) -> bool {
        if free == 0 {
            self.maybe_rows = true;
            return false;
        }
        self.maybe_rows = got >= free;
        self.maybe_rows
    }

    /// Whether a worker that freed up should claim.
    fn claim_for_freed_worker(&self) -> bool {
        self.maybe_rows
    }

    /// A notice or the poll: rows may be there.
    fn woken(&mut self) {
        self.maybe_rows = true;
    }
}

/// How many rows this process may claim now: its pool's free workers, none while it stops
/// or before the queue's tables exist. Read with [`Fleet::claiming`] held, and the rows
/// claimed started before it is let go, so two claims never count the same worker.
pub(super) fn free_workers(inner: &Inner, fleet: &Fleet) -> usize {
    if inner.draining.load(Ordering::Relaxed)
        || fleet.closing.load(Ordering::SeqCst)
        || !fleet.ready.load(Ordering::Relaxed)
    {
        0
    } else {
        inner.pool.free_workers()
    }
}

/// Puts one claimed row on the local pool.
pub(super) fn start(inner: &Arc<Inner>, fleet: &Arc<Fleet>, job: ClaimedJob) {
    let ClaimedJob {
        id,
        token,
        run_id,
        step_key,
        attempt,
        priority,
        payload,
        ..
    } = job;
    let work: Work = match serde_json::from_value(payload) {
        Ok(w) => w,
        Err(e) => {
            // Written by another version of OmniFlow: the attempt fails with the reason
            // rather than bouncing between hosts.
            let done = AttemptDone::failed_now(StepError::new(
                ErrorKind::Internal,
                format!(
                    "host {} cannot read this queued step ({e}); are all hosts on the same \
                     OmniFlow version?",
                    fleet.worker_id
                ),
            ));
            fleet.pending.fetch_add(1, Ordering::SeqCst);
            if fleet.complete_tx.send((id, token, to_json(&done))).is_err() {
                fleet.pending.fetch_sub(1, Ordering::SeqCst);
            }
            return;
        }
    };
    let cancel = CancellationToken::new();
    lock(&fleet.held).insert(
        id,
        Held {
            token: token.clone(),
            cancel: cancel.clone(),
        },
    );
    let meta = JobMeta {
        run_id: run_id.as_str().into(),
        step: step_key.as_str().into(),
        attempt,
        priority: Priority::from_index(usize::from(priority)),
    };
    launch(inner, fleet, Row::Known(id), token, cancel, meta, work);
}

/// An attempt started while the insert of its row, claimed for this process with `token`,
/// is still on its way: the enqueuer says which row it became ([`Early::claimed`]) or that
/// it is not this process's to run after all ([`Early::not_ours`]: its attempt is stopped,
/// its result dropped). A fan-out so starts its calls without waiting for the insert's
/// round trip; the result still goes to the queue only once the row exists.
pub(super) struct Early {
    pub(super) token: String,
    row: tokio::sync::watch::Sender<Option<Option<i64>>>,
    cancel: CancellationToken,
    /// Told claimed or not ours; an `Early` dropped untold (its enqueuer stopped midway)
    /// stops its attempt, which could otherwise run to its timeout for nobody.
    told: bool,
}

impl Early {
    /// The row is this process's, under [`Early::token`]: the attempt's result goes to it.
    pub(super) fn claimed(mut self, fleet: &Fleet, id: i64) {
        self.told = true;
        fleet.counters.claimed.fetch_add(1, Ordering::Relaxed);
        lock(&fleet.held).insert(
            id,
            Held {
                token: std::mem::take(&mut self.token),
                cancel: self.cancel.clone(),
            },
        );
        let _ = self.row.send(Some(Some(id)));
    }

    /// The insert failed, or its row is not this process's to run (claimable rows were
    /// ahead of it, or another driver had queued it already): the attempt stops.
    pub(super) fn not_ours(mut self) {
        self.told = true;
        self.cancel.cancel();
        let _ = self.row.send(Some(None));
    }
}

impl Drop for Early {
    fn drop(&mut self) {
        if !self.told {
            // The row's sender goes with it: the attempt's wait for its row ends with none.
            self.cancel.cancel();
        }
    }
}

/// Starts `job` on the local pool before its row is inserted (see [`Early`]); `None` when
/// its payload cannot be read here (the claim after the insert reports that).
pub(super) fn start_early(
    inner: &Arc<Inner>,
    fleet: &Arc<Fleet>,
    job: &NewJob,
    token: String,
) -> Option<Early> {
    let work: Work = serde_json::from_value(job.payload.clone()).ok()?;
    let (row, watch) = tokio::sync::watch::channel(None);
    let cancel = CancellationToken::new();
    let meta = JobMeta {
        run_id: job.run_id.as_str().into(),
        step: job.step_key.as_str().into(),
        attempt: job.attempt,
        priority: Priority::from_index(usize::from(job.priority)),
    };
    launch(
        inner,
        fleet,
        Row::Early(watch),
        token.clone(),
        cancel.clone(),
        meta,
        work,
    );
    Some(Early {
        token,
        row,
        cancel,
        told: false,
    })
}

/// Which queue row an attempt runs for.
#[derive(Clone)]
enum Row {
    Known(i64),
    /// Told by the enqueuer once the insert returns: `Some(id)`, or `None` (not ours).
    Early(tokio::sync::watch::Receiver<Option<Option<i64>>>),
}

impl Row {
    /// The row's id, once known; `None` when the attempt is not this process's after all.
    async fn id(self) -> Option<i64> {
        match self {
            Row::Known(id) => Some(id),
            Row::Early(mut rx) => rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.flatten()),
        }
    }
}

/// Runs one attempt of `row` on the local pool and sends its result to the completer.
fn launch(
    inner: &Arc<Inner>,
    fleet: &Arc<Fleet>,
    row: Row,
    token: String,
    cancel: CancellationToken,
    meta: JobMeta,
    work: Work,
) {
    let (run_id, step_key, attempt) =
        (meta.run_id.to_string(), meta.step.to_string(), meta.attempt);
    let (inner2, fleet2, cancel2, row2) =
        (inner.clone(), fleet.clone(), cancel.clone(), row.clone());
    let job = async move {
        let env = AttemptEnv {
            inner: &inner2,
            run_id: &run_id,
            parent_run_id: work.parent_run_id.as_deref(),
            sandbox: None,
            is_sandbox: false,
            replay: None,
            budget: None,
        };
        let timeout = Duration::from_millis(work.timeout_ms);
        // An attempt started before its row was confirmed records its start only once the
        // row is this process's: a row that is not (claimable rows were ahead of it, the
        // insert failed) must not leave its step shown running here, since the history keeps
        // a step's first start.
        let early = matches!(row2, Row::Early(_));
        // This host's providers admit the call: its in-flight caps, its rate limits.
        // A shutdown waits for the attempt until its result is on its way back.
        let (done, _in_flight) = match step::admit(&env, &cancel2, &work.prepared, &step_key).await
        {
            Ok(admission) => {
                let started_at = std::time::SystemTime::now();
                let confirm = async {
                    if early && row2.clone().id().await.is_some() {
                        step::announce_start(&inner2, &run_id, &step_key, attempt, started_at);
                    }
                };
                // The start is queued to the history before the result can go anywhere.
                let (done, ()) = tokio::join!(
                    step::run_attempt(
                        &env,
                        &cancel2,
                        &step_key,
                        &work.prepared,
                        attempt,
                        timeout,
                        admission,
                        !early,
                    ),
                    confirm
                );
                done
            }
            Err(e) => (AttemptDone::failed_now(e), None),
        };
        // Still ours? A lost lease (rescued, or the driver withdrew the row) drops the
        // result, as does a row that never became ours.
        match row2.id().await {
            Some(id) if lock(&fleet2.held).remove(&id).is_some() => {
                fleet2.pending.fetch_add(1, Ordering::SeqCst);
                if fleet2
                    .complete_tx
                    .send((id, token, to_json(&done)))
                    .is_err()
                {
                    fleet2.pending.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Some(_) => {
                fleet2.counters.fenced.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        fleet2.slot_freed.notify_one();
    };
    let submitted = inner.pool.submit(meta, cancel, job);
    let fleet = fleet.clone();
    tokio::spawn(async move {
        if submitted.await.is_err() {
            // Dropped unstarted (shutdown) or the attempt panicked: give the row back at
            // once rather than when its lease runs out.
            let held = match row.id().await {
                Some(id) => lock(&fleet.held).remove(&id).map(|h| (id, h)),
                None => None,
            };
            if let Some((id, h)) = held {
                let q = fleet.queue.clone();
                if let Err(e) = blocking(move || q.release(id, &h.token)).await {
                    tracing::warn!(error = %e, row = id, "fleet: cannot give a step back; it returns to the queue when its lease expires");
                }
            }
            fleet.slot_freed.notify_one();
        }
    });
}

fn to_json(done: &AttemptDone) -> serde_json::Value {
    serde_json::to_value(done).unwrap_or_else(|e| {
        serde_json::to_value(AttemptDone::failed_now(StepError::new(
            ErrorKind::Internal,
            format!("the attempt's result cannot be written to the queue ({e})"),
        )))
        .unwrap_or_default()
    })
}

/// Records results in batches, each fenced by its claim token; retries while the database
/// does not answer (the lease still covers the row meanwhile).
pub(crate) async fn completer(
    fleet: Arc<Fleet>,
    engine: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<(i64, String, serde_json::Value)>,
) {
    // Batches are written side by side, on the pool's connections but one (left for
    // enqueues and claims): results that come while a batch is being written do not wait for
    // its commit.
    let writers = Arc::new(tokio::sync::Semaphore::new(
        (fleet.queue.connections() as usize)
            .saturating_sub(1)
            .max(1),
    ));
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(x) => x, None => return },
            _ = fleet.stop.cancelled() => return,
        };
        let permit = tokio::select! {
            p = writers.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = fleet.stop.cancelled() => return,
        };
        tokio::task::yield_now().await;
        let batch = super::batch_from(first, &mut rx, super::MAX_BATCH);
        let (fleet, engine) = (fleet.clone(), engine.clone());
        tokio::spawn(async move {
            let n_batch = batch.len();
            // Each attempt's `running` was queued to this process's writer when it started:
            // committed before its result is visible to another process's driver, so that
            // driver's `finished` lands after it. A driver in this process records through
            // the same writer, after: no wait.
            let all_local = {
                let waiters = lock(&fleet.waiters);
                batch.iter().all(|(id, ..)| waiters.contains_key(id))
            };
            if !all_local {
                super::history_committed(&engine).await;
            }
            let ids: Vec<i64> = batch.iter().map(|(id, ..)| *id).collect();
            lock(&fleet.completing).extend(ids.iter().copied());
            record(&fleet, batch).await;
            let idle = {
                let mut completing = lock(&fleet.completing);
                for id in &ids {
                    completing.remove(id);
                }
                completing.is_empty()
            };
            // The results taken meanwhile: their rows go now, off the completions' way.
            if idle {
                fleet.forget_taken();
            }
            fleet.pending.fetch_sub(n_batch, Ordering::SeqCst);
            drop(permit);
        });
    }
}

/// Writes one batch of results, retrying while the database does not answer (the lease
/// still covers the rows meanwhile), and hands this process's drivers theirs.
pub(super) async fn record(fleet: &Arc<Fleet>, batch: Vec<(i64, String, serde_json::Value)>) {
    let mut wait = Doubling::new(Duration::from_millis(100), Duration::from_secs(2));
    for round in 0.. {
        let (q, b) = (fleet.queue.clone(), batch.clone());
        match blocking(move || q.complete(&b)).await {
            Ok(recorded) => {
                let n = recorded.len();
                fleet
                    .counters
                    .completed
                    .fetch_add(n as u64, Ordering::Relaxed);
                if n < batch.len() {
                    let lost = batch.len() - n;
                    fleet
                        .counters
                        .fenced
                        .fetch_add(lost as u64, Ordering::Relaxed);
                    tracing::warn!(lost, "fleet: results of steps whose lease was taken over were dropped (another host runs them)");
                }
                // A driver in this process gets its result from here, now that it is
                // recorded: no notification's round trip, no read of the row.
                let recorded: HashSet<i64> = recorded.into_iter().collect();
                let local: Vec<(i64, Outcome)> = {
                    let waiters = lock(&fleet.waiters);
                    batch
                        .into_iter()
                        .filter(|(id, ..)| recorded.contains(id) && waiters.contains_key(id))
                        .map(|(id, _, result)| (id, Outcome::Done(result)))
                        .collect()
                };
                if !local.is_empty() {
                    super::dispatch::deliver(fleet, local);
                }
                return;
            }
            Err(e) if round < 20 => {
                tracing::warn!(error = %e, "fleet: cannot record step results; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait.next_wait()) => {}
                    _ = fleet.stop.cancelled() => return,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, steps = batch.len(), "fleet: giving up recording step results; they rerun when their leases expire");
                return;
            }
        }
    }
}

/// Extends the leases of the rows this process runs, every third of `LEASE_TIMEOUT`; a row
/// no longer ours (rescued, withdrawn) has its attempt stopped.
pub(crate) async fn heartbeats(fleet: Arc<Fleet>) {
    let every = (fleet.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = fleet.stop.cancelled() => return,
        }
        let held: Vec<(i64, String)> = lock(&fleet.held)
            .iter()
            .map(|(id, h)| (*id, h.token.clone()))
            .collect();
        if held.is_empty() {
            continue;
        }
        let (q, worker, lease, asked) = (
            fleet.queue.clone(),
            fleet.worker_id.clone(),
            fleet.lease,
            held.clone(),
        );
        match blocking(move || q.heartbeat(&worker, &asked, lease)).await {
            Ok(alive) => {
                let alive: HashSet<i64> = alive.into_iter().collect();
                let mut h = lock(&fleet.held);
                for (id, token) in held {
                    if alive.contains(&id) {
                        continue;
                    }
                    // Only the claim we asked about: a finished attempt left already.
                    if h.get(&id).is_some_and(|x| x.token == token) {
                        if let Some(lost) = h.remove(&id) {
                            lost.cancel.cancel();
                            tracing::warn!(row = id, "fleet: lost a step's lease (taken over or withdrawn); stopping it here");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "fleet: cannot extend leases; retrying");
            }
        }
    }
}

/// Every half `LEASE_TIMEOUT`, puts the rows of workers whose lease expired back in the queue
/// (one process of the fleet sweeps at a time), and prunes spent rate-limit windows.
pub(crate) async fn sweeper(fleet: Arc<Fleet>) {
    let every = (fleet.lease / 2).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = fleet.stop.cancelled() => return,
        }
        if !fleet.ready.load(Ordering::Relaxed) {
            continue;
        }
        let (q, max) = (fleet.queue.clone(), fleet.max_rescues);
        match blocking(move || q.rescue_expired(max)).await {
            Ok(r) => {
                if r.swept {
                    // The sweeping process also drops the rate-limit windows that are over
                    // (and the places taken in them: one row per call).
                    let q = fleet.queue.clone();
                    if let Err(e) = blocking(move || q.prune_rates()).await {
                        tracing::debug!(error = %e, "fleet: cannot prune rate-limit windows; the next sweep does");
                    }
                }
                if !r.requeued.is_empty() || !r.failed.is_empty() {
                    tracing::warn!(
                        requeued = r.requeued.len(),
                        given_up = r.failed.len(),
                        "fleet: steps of workers that stopped answering went back to the queue"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "fleet: cannot sweep expired leases"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimHint;

    #[test]
    fn a_freed_worker_claims_only_when_rows_may_be_waiting() {
        let mut hint = ClaimHint::new();
        // Nothing known yet: look.
        assert!(hint.claim_for_freed_worker());
        // A claim that took less than it asked for emptied the queue of what this process
        // may take: a worker freeing up does not ask again, and the claimer waits.
        assert!(!hint.claimed(4, 2));
        assert!(!hint.claim_for_freed_worker());
        assert!(!hint.claimed(4, 0));
        assert!(!hint.claim_for_freed_worker());
        // A notice or the poll: rows may have come.
        hint.woken();
        assert!(hint.claim_for_freed_worker());
        // A claim that took all it asked for: claim again at once, and a freed worker looks.
        assert!(hint.claimed(4, 4));
        assert!(hint.claim_for_freed_worker());
        assert!(!hint.claimed(4, 1));
        // No worker was free, so nothing was asked: rows may be waiting for the next one.
        assert!(!hint.claimed(0, 0));
        assert!(hint.claim_for_freed_worker());
    }
}
