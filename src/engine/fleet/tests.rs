//! The fleet's own paths on a real PostgreSQL, without an engine: results handed to drivers
//! in this process, and completions written side by side.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{lock, worker, Fleet, Outcome};
use crate::store::pg::queue::{ClaimedJob, NewJob, Queue};
use crate::store::pg::testing::{held_transaction, ScratchDb};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const WORKER: &str = "test-host:1:0";

fn lease() -> Duration {
    Duration::from_secs(30)
}

/// The blocking client runs its own runtime: never on a tokio worker thread.
async fn off<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A fleet of this process on a fresh database, with `connections` pooled; none of its tasks
/// runs (no collector: a result reaches a driver here only if the path under test hands it).
async fn fleet(db: &ScratchDb, connections: u32) -> Arc<Fleet> {
    fleet_leased(db, connections, lease()).await
}

/// [`fleet`] with its own lease (its heartbeats and sweeps come every half of it).
async fn fleet_leased(db: &ScratchDb, connections: u32, lease: Duration) -> Arc<Fleet> {
    let target = db.target().clone();
    let queue = off(move || {
        let q = Queue::new(&target, connections).unwrap();
        q.ensure_schema().unwrap();
        q
    })
    .await;
    Fleet::on_queue(queue, WORKER.into(), Vec::new(), lease, 3)
}

/// Enqueues one row per step and claims them all for this process.
async fn claimed(fleet: &Arc<Fleet>, steps: &[&str]) -> HashMap<String, ClaimedJob> {
    let q = fleet.queue.clone();
    let jobs: Vec<NewJob> = steps
        .iter()
        .map(|s| NewJob {
            run_id: "run".into(),
            step_key: (*s).into(),
            attempt: 1,
            priority: 1,
            tags: Vec::new(),
            payload: json!({}),
        })
        .collect();
    let n = jobs.len();
    off(move || {
        q.enqueue(&jobs).unwrap();
        q.claim(WORKER, &[], n, lease()).unwrap()
    })
    .await
    .into_iter()
    .map(|j| (j.step_key.clone(), j))
    .collect()
}

/// A queue row for step `step` of run `run`, attempt 1, for any host: what a driver enqueues.
fn job(run: &str, step: &str, prepared: crate::engine::nodes::Prepared) -> NewJob {
    NewJob {
        run_id: run.into(),
        step_key: step.into(),
        attempt: 1,
        priority: 1,
        tags: Vec::new(),
        payload: json!({ "prepared": prepared, "timeout_ms": 600_000 }),
    }
}

/// An HTTP node's call: `GET url`, the answer taken by its content type.
fn get(url: String) -> crate::engine::nodes::Prepared {
    crate::engine::nodes::Prepared::Http {
        method: "GET".into(),
        url,
        headers: Vec::new(),
        body: None,
        response: "auto".into(),
    }
}

/// A driver of this process waiting for row `id`.
fn wait_here(fleet: &Fleet, id: i64) -> oneshot::Receiver<Outcome> {
    let (tx, rx) = oneshot::channel();
    lock(&fleet.waiters).insert(id, tx);
    rx
}

/// Until the rows taken are deleted (counted as pending until then).
async fn settled(fleet: &Fleet) {
    let until = Instant::now() + Duration::from_secs(20);
    while fleet.pending.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < until, "taken rows were never deleted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Until a completion of `db` waits on a row lock (false after 20 s without one).
/// Watched from a plain thread: a client is never dropped on the runtime, even when an
/// assertion fails.
async fn stuck_on_lock(db: &ScratchDb) -> bool {
    let (name, target) = (db.name().to_string(), db.target().clone());
    off(move || {
        let mut watch = target.connect().unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 = watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1
                       AND wait_event_type = 'Lock' AND query LIKE '%UPDATE runner_queue%'",
                    &[&name],
                )
                .unwrap()
                .get(0);
            if n > 0 || Instant::now() > until {
                return n > 0;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
}

/// Another transaction holds a row lock on `id` until told (or dropped): a completion of
/// that row waits for it.
fn lock_row(
    target: crate::store::pg::PgTarget,
    id: i64,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    held_transaction(target, move |tx| {
        tx.execute(
            "SELECT 1 FROM runner_queue WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .unwrap();
    })
}

use crate::engine::testing::fleet_engine as engine_on;

/// A web server on a thread of its own that answers `ok` to every request but, with
/// `hold_first`, the first, which it reads and never answers. Says the number of each
/// request (from 0) as it arrives.
fn http_server(hold_first: bool) -> (String, std::sync::mpsc::Receiver<usize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/call", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (n, sock) in listener.incoming().enumerate() {
            let Ok(mut sock) = sock else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => head.extend_from_slice(&buf[..k]),
                }
            }
            let _ = tx.send(n);
            if hold_first && n == 0 {
                held.push(sock);
                continue;
            }
            let _ = sock.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            );
        }
    });
    (url, rx)
}

/// Until the fleet's tables are there and it inserts what its drivers enqueue.
async fn until_ready(fleet: &Fleet) {
    let until = Instant::now() + Duration::from_secs(60);
    while !fleet.ready.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < until,
            "the fleet's queue never became ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn finished(fleet: &Fleet, ids: Vec<i64>) -> HashMap<i64, Outcome> {
    let q = fleet.queue.clone();
    off(move || q.finished(&ids).unwrap())
        .await
        .into_iter()
        .collect()
}

/// Each channel the fleet listens to wakes its own waiter: a finished row the results'
/// collector, a console's request the requests' watcher, a history batch the console, and
/// claimable rows (or anything else heard) the claimer. Mixed up, a claim would wait for
/// the slow poll, or a console would hear of runs it never asked about.
#[test]
fn each_channel_heard_goes_to_its_own_waiter() {
    use super::Channel;
    use crate::store::pg::events::{EVENTS_CHANNEL, REQUESTS_CHANNEL};
    use crate::store::pg::queue::{DONE_CHANNEL, JOBS_CHANNEL};
    for (channel, to) in [
        (DONE_CHANNEL, Channel::Done),
        (REQUESTS_CHANNEL, Channel::Requests),
        (EVENTS_CHANNEL, Channel::Events),
        (JOBS_CHANNEL, Channel::Jobs),
        ("omniflow_something_new", Channel::Jobs),
    ] {
        assert_eq!(Channel::of(channel), to, "{channel}");
    }
}

#[test]
fn results_that_came_together_are_recorded_together_a_thousand_at_most() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 1..=2500 {
        tx.send(i).unwrap();
    }
    // A burst from a whole pool: full batches in the order the results came, then the rest.
    let first = super::batch_from(0, &mut rx, 1000);
    assert_eq!(first, (0..1000).collect::<Vec<_>>());
    let second = super::batch_from(-1, &mut rx, 1000);
    assert_eq!(second.len(), 1000);
    assert_eq!((second[0], second[1], second[999]), (-1, 1000, 1998));
    let third = super::batch_from(-2, &mut rx, 1000);
    assert_eq!(
        third.len(),
        503,
        "the 502 left, after the one that woke the writer"
    );
    assert_eq!(third.last(), Some(&2500));
    // A result alone is written alone, at once: nothing waits for more to come.
    assert_eq!(super::batch_from(7, &mut rx, 1000), vec![7]);
    tx.send(8).unwrap();
    assert_eq!(super::batch_from(7, &mut rx, 1000), vec![7, 8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_recorded_here_reaches_its_driver_here_when_its_completion_commits() {
    let Some(db) = ScratchDb::new("fleet_local_results") else {
        return;
    };
    let fleet = fleet(&db, 2).await;
    let rows = claimed(&fleet, &["mine", "lost", "theirs"]).await;
    let (mine, lost, theirs) = (&rows["mine"], &rows["lost"], &rows["theirs"]);
    let mut to_mine = wait_here(&fleet, mine.id);
    // Its lease was taken over: the worker's token no longer matches.
    let mut to_lost = wait_here(&fleet, lost.id);
    // `theirs` is driven by another process: nobody here waits for it.
    worker::record(
        &fleet,
        vec![
            (mine.id, mine.token.clone(), json!({ "out": "mine" })),
            (
                lost.id,
                "a token taken over".into(),
                json!({ "out": "lost" }),
            ),
            (theirs.id, theirs.token.clone(), json!({ "out": "theirs" })),
        ],
    )
    .await;
    // No collector runs: the completion itself handed the result over, as it committed.
    assert_eq!(
        to_mine.try_recv().expect("the driver here has its result"),
        Outcome::Done(json!({ "out": "mine" }))
    );
    assert!(
        to_lost.try_recv().is_err(),
        "a fenced result reaches no one"
    );
    assert!(!lock(&fleet.waiters).contains_key(&mine.id));
    assert!(lock(&fleet.waiters).contains_key(&lost.id));
    settled(&fleet).await;
    let now = finished(&fleet, vec![mine.id, lost.id, theirs.id]).await;
    // The taken row is deleted; the fenced one still runs under its new owner; the other
    // driver's result waits in the queue for it.
    assert_eq!(now.get(&mine.id), Some(&Outcome::Vanished));
    assert_eq!(now.get(&lost.id), None);
    assert_eq!(
        now.get(&theirs.id),
        Some(&Outcome::Done(json!({ "out": "theirs" })))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_results_go_to_their_waiters_and_only_taken_rows_are_deleted() {
    let Some(db) = ScratchDb::new("fleet_deliver") else {
        return;
    };
    let fleet = fleet(&db, 2).await;
    let rows = claimed(&fleet, &["a", "b", "other"]).await;
    let (a, b, other) = (rows["a"].clone(), rows["b"].clone(), rows["other"].clone());
    let q = fleet.queue.clone();
    let done: Vec<(i64, String, serde_json::Value)> = [&a, &b, &other]
        .iter()
        .map(|j| (j.id, j.token.clone(), json!(j.step_key)))
        .collect();
    off(move || q.complete(&done).unwrap()).await;
    let to_a = wait_here(&fleet, a.id);
    let to_b = wait_here(&fleet, b.id);
    let gone = 999_999;
    let to_gone = wait_here(&fleet, gone);
    super::dispatch::deliver(
        &fleet,
        vec![
            (a.id, Outcome::Done(json!("a"))),
            (other.id, Outcome::Done(json!("other"))),
            (gone, Outcome::Vanished),
        ],
    );
    assert_eq!(to_a.await.unwrap(), Outcome::Done(json!("a")));
    assert_eq!(to_gone.await.unwrap(), Outcome::Vanished);
    // `b` was not among the outcomes: its driver still waits.
    assert!(lock(&fleet.waiters).contains_key(&b.id));
    assert_eq!(lock(&fleet.waiters).len(), 1);
    drop(to_b);
    settled(&fleet).await;
    let now = finished(&fleet, vec![a.id, b.id, other.id]).await;
    assert_eq!(now.get(&a.id), Some(&Outcome::Vanished), "taken: deleted");
    assert_eq!(now.get(&b.id), Some(&Outcome::Done(json!("b"))));
    assert_eq!(
        now.get(&other.id),
        Some(&Outcome::Done(json!("other"))),
        "nobody here waited for it: left for its driver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_does_not_wait_for_another_one_being_written() {
    let Some(db) = ScratchDb::new("fleet_side_by_side") else {
        return;
    };
    // Three pooled connections: two batches of completions at once, one left for the rest.
    let fleet = fleet(&db, 3).await;
    let rows = claimed(&fleet, &["slow", "fast"]).await;
    let (slow, fast) = (rows["slow"].clone(), rows["fast"].clone());
    let rx = lock(&fleet.receivers).take().unwrap().complete;
    tokio::spawn(worker::completer(fleet.clone(), std::sync::Weak::new(), rx));
    // Another transaction locks the slow row: its completion waits until that one ends.
    let (target, slow_id) = (db.target().clone(), slow.id);
    let (release, locker) = off(move || lock_row(target, slow_id)).await;
    let to_slow = wait_here(&fleet, slow.id);
    let to_fast = wait_here(&fleet, fast.id);
    let send = |j: &ClaimedJob| {
        fleet.pending.fetch_add(1, Ordering::SeqCst);
        fleet
            .complete_tx
            .send((j.id, j.token.clone(), json!(j.step_key)))
            .unwrap();
    };
    // The slow completion is sent first, and is stuck on the lock before the fast one is.
    // Watched from a plain thread: a client is never dropped on the runtime, even when an
    // assertion fails.
    send(&slow);
    assert!(
        stuck_on_lock(&db).await,
        "the slow completion never reached the lock"
    );
    send(&fast);
    let fast_outcome = tokio::time::timeout(Duration::from_secs(30), to_fast)
        .await
        .expect("the second completion waited for the first one's commit")
        .unwrap();
    assert_eq!(fast_outcome, Outcome::Done(json!("fast")));
    release.send(()).unwrap();
    locker.join().unwrap();
    assert_eq!(to_slow.await.unwrap(), Outcome::Done(json!("slow")));
    settled(&fleet).await;
    fleet.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_written_here_wakes_no_collector_here() {
    // No database is reached: the pool connects only when used.
    let target = crate::store::pg::PgTarget::parse("postgres://nobody@127.0.0.1:1/none").unwrap();
    let queue = off(move || Queue::new(&target, 1).unwrap()).await;
    let fleet = Fleet::on_queue(queue, WORKER.into(), Vec::new(), lease(), 3);
    let (_awaited, _completing_here) = (wait_here(&fleet, 1), wait_here(&fleet, 2));
    lock(&fleet.completing).insert(2);
    // Another process finished row 1: the collector reads it.
    assert!(fleet.awaits_elsewhere("1"));
    // This process's completer hands row 2 over itself.
    assert!(!fleet.awaits_elsewhere("2"));
    // Nobody here waits for row 3.
    assert!(!fleet.awaits_elsewhere("3"));
    // Not an id: looked at, as before.
    assert!(fleet.awaits_elsewhere(""));
    off(move || drop(fleet)).await;
}

/// A fan-out this process takes whole starts its attempts before their rows are inserted.
/// One whose row turns out to be this process's runs for it (its result is recorded under
/// the token chosen before the insert and reaches its driver here); one whose row is not
/// (rows were ahead of it, another driver had queued it, the insert failed) is stopped, and
/// nothing of it reaches the queue.
#[test]
fn an_attempt_started_before_its_insert_runs_for_its_row_or_is_stopped() {
    use crate::engine::nodes::Prepared;
    use crate::engine::step::AttemptDone;
    use crate::store::pg::queue::{new_token, Claimer};
    let Some(db) = ScratchDb::new("fleet_early") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 4);
    let inner = engine.inner.clone();
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        let quick = job("run", "quick", Prepared::Value(json!("done")));
        let slow = job("run", "slow", Prepared::Delay(Duration::from_secs(600)));
        let free = inner.pool.free_workers();
        assert_eq!(free, 4);
        let events = inner.bus.subscribe();
        let early_quick = worker::start_early(&inner, &fleet, &quick, new_token()).unwrap();
        let early_slow = worker::start_early(&inner, &fleet, &slow, new_token()).unwrap();
        // Only `quick` is inserted for this process, under its token.
        let (q, me, token) = (
            fleet.queue.clone(),
            fleet.worker_id.clone(),
            early_quick.token.clone(),
        );
        let rows = off(move || {
            let tokens = [Some(token)];
            let claimer = Claimer {
                worker: &me,
                tags: &[],
                free: 1,
                lease: lease(),
                hold_rest: None,
                tokens: Some(&tokens),
            };
            q.enqueue_claiming(&[quick], Some(&claimer)).unwrap()
        })
        .await;
        let (id, claim) = rows[0].clone();
        assert_eq!(claim.unwrap().token, early_quick.token);
        let to_driver = wait_here(&fleet, id);
        early_quick.claimed(&fleet, id);
        let outcome = tokio::time::timeout(Duration::from_secs(30), to_driver)
            .await
            .expect("the early attempt's result reaches its driver")
            .unwrap();
        let Outcome::Done(v) = outcome else {
            panic!("not a result: {outcome:?}");
        };
        let done: AttemptDone = serde_json::from_value(v).unwrap();
        assert_eq!(done.result.unwrap().value, json!("done"));
        // `slow` is not this process's: its 10-minute attempt stops and frees its worker.
        early_slow.not_ours();
        let until = Instant::now() + Duration::from_secs(30);
        while inner.pool.free_workers() < free {
            assert!(
                Instant::now() < until,
                "the attempt whose row is not ours still runs"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fleet.counters.completed.load(Ordering::Relaxed), 1);
        assert_eq!(fleet.counters.fenced.load(Ordering::Relaxed), 0);
        assert!(lock(&fleet.held).is_empty());
        let q = fleet.queue.clone();
        let left = off(move || q.attempts_of("run").unwrap()).await;
        assert!(
            left.iter().all(|(step, _)| step != "slow"),
            "nothing of the stopped attempt is in the queue: {left:?}"
        );
        // Only the attempt whose row was ours says it started: a step whose row went to
        // another process is not shown running here (the history keeps a step's first start).
        let mut started = Vec::new();
        while let Some(ev) = events.try_recv() {
            if let crate::events::Event::StepStarted { step, .. } = ev {
                started.push(step);
            }
        }
        assert_eq!(started, vec!["quick".to_string()]);
    });
    drop(engine);
    drop(rt);
}

/// A process that stops writes the results it already has before it goes: `finish` waits
/// for a completion still being written (here held on a row lock that is let go while it
/// waits), so the step's result is recorded, not run again by another host after its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_process_writes_the_results_it_has_before_it_goes() {
    let Some(db) = ScratchDb::new("fleet_finish_writes") else {
        return;
    };
    let fleet = fleet(&db, 3).await;
    let job = claimed(&fleet, &["held"]).await["held"].clone();
    let rx = lock(&fleet.receivers).take().unwrap().complete;
    tokio::spawn(worker::completer(fleet.clone(), std::sync::Weak::new(), rx));
    let target = db.target().clone();
    let (release, locker) = off(move || lock_row(target, job.id)).await;
    fleet.pending.fetch_add(1, Ordering::SeqCst);
    fleet
        .complete_tx
        .send((job.id, job.token.clone(), json!("kept")))
        .unwrap();
    assert!(
        stuck_on_lock(&db).await,
        "the completion never reached the lock"
    );
    let finishing = tokio::spawn({
        let fleet = fleet.clone();
        async move { fleet.finish().await }
    });
    while !fleet.closing.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // `finish` waits while the completion cannot be written (a process that went now
    // would leave the step to be run again elsewhere); the lock goes, the completion
    // commits, and then it returns.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !finishing.is_finished(),
        "finish returned with a result still unwritten"
    );
    release.send(()).unwrap();
    finishing.await.unwrap();
    assert_eq!(
        fleet.pending.load(Ordering::SeqCst),
        0,
        "finish gave up waiting instead of seeing the completion written"
    );
    let now = finished(&fleet, vec![job.id]).await;
    assert_eq!(now.get(&job.id), Some(&Outcome::Done(json!("kept"))));
    off(move || locker.join().unwrap()).await;
    fleet.stop.cancel();
}

/// Another transaction inserts a row for `step` of run `run`, attempt 1, and holds it
/// uncommitted until told (or dropped): an insert of the same step waits for it, and goes
/// ahead once it is rolled back.
fn hold_step(
    target: crate::store::pg::PgTarget,
    run: &'static str,
    step: &'static str,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    held_transaction(target, move |tx| {
        tx.execute(
            "INSERT INTO runner_queue (run_id, step_key, attempt, priority, payload)
             VALUES ($1, $2, 1, 1, '{}')",
            &[&run, &step],
        )
        .unwrap();
    })
}

/// A step this process takes whole starts its call while its row's insert is on its way,
/// not after its round trip: here the insert waits on another transaction, and the model
/// server has the call meanwhile. Once the insert goes through, the call's result reaches
/// its driver, and the row claimed at its insert is that call's: it is not called again.
#[test]
fn a_step_taken_here_starts_its_call_before_its_row_is_inserted() {
    use crate::engine::step::AttemptDone;
    let Some(db) = ScratchDb::new("fleet_call_first") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 4);
    let inner = engine.inner.clone();
    let (url, calls) = http_server(false);
    let target = db.target().clone();
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        let (release, holder) = off(move || hold_step(target, "run", "call")).await;
        let job = job("run", "call", get(url));
        let (reply, queued) = oneshot::channel();
        fleet
            .enqueue_tx
            .send(super::Enqueue { job, reply })
            .map_err(|_| "the enqueuer is gone")
            .unwrap();
        // The insert cannot finish while the other transaction holds the step's key.
        let (called, calls) = off(move || {
            let called = calls.recv_timeout(Duration::from_secs(30));
            (called, calls)
        })
        .await;
        assert_eq!(
            called,
            Ok(0),
            "the step's call waited for its row's insert to come back"
        );
        release.send(()).unwrap();
        off(move || holder.join().unwrap()).await;
        let (_, outcome) = tokio::time::timeout(Duration::from_secs(30), queued)
            .await
            .expect("the insert went ahead")
            .unwrap()
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(30), outcome)
            .await
            .expect("the call's result reaches its driver")
            .unwrap();
        let Outcome::Done(v) = outcome else {
            panic!("not a result: {outcome:?}");
        };
        let done: AttemptDone = serde_json::from_value(v).unwrap();
        assert_eq!(done.result.unwrap().value, json!("ok"));
        assert_eq!(
            calls.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty),
            "the row claimed at its insert ran the early call's attempt, not a second call"
        );
    });
    drop(engine);
    drop(rt);
}

/// A step whose row leaves the queue before its result is taken (another driver of the run
/// withdrew it) is queued again, and the run goes on: it does not fail the step.
#[test]
fn a_step_whose_row_was_withdrawn_is_queued_again_and_its_run_succeeds() {
    use crate::events::RunStatus;
    let Some(db) = ScratchDb::new("fleet_requeue") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 2);
    let inner = engine.inner.clone();
    // The first call is never answered: its row is withdrawn while it runs.
    let (url, calls) = http_server(true);
    let target = db.target().clone();
    let bp: crate::blueprint::Blueprint = serde_json::from_value(json!({
        "name": "withdrawn",
        "nodes": [ { "id": "call", "type": "http", "url": url } ]
    }))
    .unwrap();
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        let h = engine
            .start(Arc::new(bp), crate::engine::RunRequest::default())
            .unwrap();
        let calls = Arc::new(std::sync::Mutex::new(calls));
        let next_call = || {
            let calls = calls.clone();
            off(move || calls.lock().unwrap().recv_timeout(Duration::from_secs(30)))
        };
        assert_eq!(next_call().await, Ok(0), "the step's first call");
        // Its row is withdrawn once it is in (the call may start before its insert is back).
        let run = h.run_id.clone();
        off(move || {
            let mut c = target.connect().unwrap();
            let until = Instant::now() + Duration::from_secs(30);
            while c
                .execute("DELETE FROM runner_queue WHERE run_id = $1", &[&run])
                .unwrap()
                == 0
            {
                assert!(Instant::now() < until, "the step's row never came");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .await;
        // The driver looks now rather than at its next poll.
        fleet.results_wake.notify_one();
        let o = tokio::time::timeout(Duration::from_secs(60), h.wait())
            .await
            .expect("the run ends");
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        assert_eq!(o.outputs["call"], json!("ok"));
        assert_eq!(next_call().await, Ok(1), "the step was queued again");
        drop(engine);
    });
    drop(rt);
}

/// A fan-out wider than this process's free workers: its insert claims as many rows as
/// there are free workers, and those start at once; the rest are claimed as workers free up.
/// None is left claimed and not started, to be taken again only when its lease runs out (an
/// hour here).
#[test]
fn a_fan_out_wider_than_the_free_workers_runs_every_item_without_a_lease_running_out() {
    use crate::events::RunStatus;
    let Some(db) = ScratchDb::new("fleet_wide_fan_out") else {
        return;
    };
    let (rt, engine, _dir) =
        crate::engine::testing::fleet_engine_with(&db, 2, &[("LEASE_TIMEOUT", "3600")]);
    let bp: crate::blueprint::Blueprint = serde_json::from_value(json!({
        "name": "wide",
        "nodes": [ { "id": "each", "type": "transform", "forEach": "{{ [1, 2, 3, 4, 5, 6, 7] }}",
                     "template": "{{ item * 10 }}" } ]
    }))
    .unwrap();
    rt.block_on(async move {
        let h = engine
            .start(Arc::new(bp), crate::engine::RunRequest::default())
            .unwrap();
        let o = tokio::time::timeout(Duration::from_secs(120), h.wait())
            .await
            .expect("the run ends without waiting for a lease to run out");
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        assert_eq!(
            o.outputs["each"],
            json!(["10", "20", "30", "40", "50", "60", "70"])
        );
        drop(engine);
    });
    drop(rt);
}

/// The warning that results were dropped (their lease was taken over) comes only when some
/// were, and counts them: a batch whose results all land says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_results_are_warned_about_only_when_some_were_dropped() {
    let Some(db) = ScratchDb::new("fleet_dropped_warning") else {
        return;
    };
    let fleet = fleet(&db, 2).await;
    let rows = claimed(&fleet, &["kept", "also", "lost"]).await;
    let (kept, also, lost) = (
        rows["kept"].clone(),
        rows["also"].clone(),
        rows["lost"].clone(),
    );
    // `record` logs on the thread that awaits it: this one.
    let warnings = crate::logging::capture::Captured::start(tracing::Level::WARN);
    worker::record(&fleet, vec![(kept.id, kept.token.clone(), json!("kept"))]).await;
    assert_eq!(
        warnings.lines(),
        Vec::<String>::new(),
        "nothing was dropped"
    );
    worker::record(
        &fleet,
        vec![
            (also.id, also.token.clone(), json!("also")),
            (lost.id, "a token taken over".into(), json!("lost")),
        ],
    )
    .await;
    let lines = warnings.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("were dropped") && lines[0].contains("lost=1"),
        "{lines:?}"
    );
}

/// A process of the fleet with nothing left to write or give back stops at once: its stop
/// (a daemon's SIGTERM, the end of `omniflow run`) does not wait out the few seconds it
/// would give a completion still being written. (Paused clock: any wait moves it.)
#[tokio::test(start_paused = true)]
async fn a_process_with_nothing_left_to_write_stops_at_once() {
    let Some(db) = ScratchDb::new("fleet_finish_at_once") else {
        return;
    };
    let fleet = fleet(&db, 1).await;
    let start = tokio::time::Instant::now();
    fleet.finish().await;
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the stop waited with nothing pending"
    );
}

/// The sweep warns that steps of silent workers went back to the queue when it moved some,
/// and counts them; a sweep that found nothing expired says nothing (it runs every half
/// lease, so a false warning would fill the logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_warns_only_when_it_moved_steps() {
    let Some(db) = ScratchDb::new("fleet_sweep_warning") else {
        return;
    };
    // A short lease: a sweep every 200 ms.
    let fleet = fleet_leased(&db, 2, Duration::from_millis(400)).await;
    fleet.ready.store(true, Ordering::Relaxed);
    let sql = |statement: &'static str| {
        let target = db.target().clone();
        off(move || target.connect().unwrap().execute(statement, &[]).unwrap())
    };
    // A finished row nobody took for two days: the first sweep deletes it, which shows
    // that a sweep ran with no lease expired.
    sql("INSERT INTO runner_queue (run_id, step_key, attempt, priority, payload, state, finished_at)
         VALUES ('old', 'left', 1, 1, '{}', 'done', now() - interval '2 days')")
    .await;
    // The sweeper runs here, on this thread, where its warnings are captured.
    let warnings = crate::logging::capture::Captured::start(tracing::Level::WARN);
    let sweeper = worker::sweeper(fleet.clone());
    tokio::pin!(sweeper);
    let until = Instant::now() + Duration::from_secs(30);
    let mut swept_once = false;
    loop {
        tokio::select! {
            _ = &mut sweeper => panic!("the sweeper stopped"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        assert!(Instant::now() < until, "no sweep moved the step");
        if !swept_once {
            let left = sql("SELECT 1 FROM runner_queue WHERE run_id = 'old'").await;
            if left == 0 {
                swept_once = true;
                // A worker that claimed a step and went silent: its lease is over at once.
                let q = fleet.queue.clone();
                off(move || {
                    q.enqueue(&[NewJob {
                        run_id: "run".into(),
                        step_key: "silent".into(),
                        attempt: 1,
                        priority: 1,
                        tags: Vec::new(),
                        payload: json!({}),
                    }])
                    .unwrap();
                    q.claim("gone-host:1:0", &[], 1, Duration::ZERO).unwrap()
                })
                .await;
            }
        } else if !warnings.lines().is_empty() {
            break;
        }
    }
    let lines = warnings.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("went back to the queue") && lines[0].contains("requeued=1"),
        "{lines:?}"
    );
    fleet.stop.cancel();
}

/// A step another process queued is claimed and run here: the claimer takes rows this
/// process did not insert, and the result lands in the queue for their driver.
#[test]
fn a_step_another_process_queued_is_run_here() {
    use crate::engine::step::AttemptDone;
    let Some(db) = ScratchDb::new("fleet_claims_theirs") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 2);
    let inner = engine.inner.clone();
    let (url, calls) = http_server(false);
    // The queue the engine hands out (the console reads its depth there) is the fleet's.
    let q = engine
        .fleet_queue()
        .expect("an engine on PostgreSQL is in a fleet");
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        // Queued for anyone, as another process's driver queues it.
        let id = off(move || q.enqueue(&[job("theirs", "call", get(url))]).unwrap()[0]).await;
        let until = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            if let Some(o) = finished(&fleet, vec![id]).await.remove(&id) {
                break o;
            }
            assert!(Instant::now() < until, "nobody here claimed the step");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let Outcome::Done(v) = outcome else {
            panic!("not a result: {outcome:?}");
        };
        let done: AttemptDone = serde_json::from_value(v).unwrap();
        assert_eq!(done.result.unwrap().value, json!("ok"));
        assert_eq!(calls.try_recv(), Ok(0), "the call was made here");
    });
    drop(engine);
    drop(rt);
}

/// The state of each of `db`'s queue rows, by step: `(step, state)`.
async fn row_states(db: &ScratchDb) -> Vec<(String, String)> {
    let target = db.target().clone();
    off(move || {
        target
            .connect()
            .unwrap()
            .query(
                "SELECT step_key, state FROM runner_queue ORDER BY step_key",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    })
    .await
}

/// For longer than the slow poll (so the claimer looks at least once, notice or not): every
/// row of `db` stays queued, and this process's claims stay at `claims`.
async fn nothing_claimed(db: &ScratchDb, fleet: &Fleet, claims: u64, why: &str) {
    let until = Instant::now() + super::POLL + Duration::from_millis(500);
    while Instant::now() < until {
        let rows = row_states(db).await;
        assert!(
            rows.iter().all(|(_, state)| state == "queued"),
            "{why}: a row was claimed: {rows:?}"
        );
        assert_eq!(
            fleet.counters.claimed.load(Ordering::Relaxed),
            claims,
            "{why}: a row was claimed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A step this process's runs queue but cannot run here (tagged for hosts this one is not)
/// waits in the queue for such a host, and nothing of it starts here: its call is not made
/// here, not even while its row's insert is on its way (here held by another transaction).
#[test]
fn a_step_tagged_for_other_hosts_is_not_called_here() {
    let Some(db) = ScratchDb::new("fleet_tagged_elsewhere") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 2);
    let inner = engine.inner.clone();
    let (url, calls) = http_server(false);
    let target = db.target().clone();
    rt.block_on(async {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        let (release, holder) = off(move || hold_step(target, "run", "gpu-only")).await;
        let mut tagged = job("run", "gpu-only", get(url));
        tagged.tags = vec!["gpu".into()];
        let (reply, queued) = oneshot::channel();
        fleet
            .enqueue_tx
            .send(super::Enqueue { job: tagged, reply })
            .map_err(|_| "the enqueuer is gone")
            .unwrap();
        // A call started early has all this time to arrive while the insert waits.
        let called = off(move || {
            let called = calls.recv_timeout(Duration::from_secs(2));
            (called, calls)
        })
        .await;
        let (called, calls) = called;
        assert!(called.is_err(), "its call was made here: {called:?}");
        release.send(()).unwrap();
        off(move || holder.join().unwrap()).await;
        tokio::time::timeout(Duration::from_secs(30), queued)
            .await
            .expect("the insert went ahead")
            .unwrap()
            .unwrap();
        nothing_claimed(&db, &fleet, 0, "a step for gpu hosts").await;
        assert_eq!(
            calls.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty),
            "its call was made here"
        );
    });
    drop(engine);
    drop(rt);
}

/// A process claims only for the workers it has free: with its one worker busy, a step
/// another process queued stays in the queue for a host that can run it (claimed here, it
/// would wait behind the busy worker). A process that stops claims nothing, not even the
/// step it gave back as it stopped.
#[test]
fn a_busy_or_stopping_process_leaves_queued_steps_to_others() {
    let Some(db) = ScratchDb::new("fleet_claims_free_only") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 1);
    let inner = engine.inner.clone();
    // The first call is never answered: it keeps the one worker busy.
    let (url, calls) = http_server(true);
    let q = engine
        .fleet_queue()
        .expect("an engine on PostgreSQL is in a fleet");
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        let enqueue = |step: &'static str| {
            let (q, url) = (q.clone(), url.clone());
            off(move || q.enqueue(&[job("theirs", step, get(url))]).unwrap()[0])
        };
        enqueue("busy").await;
        let called = off(move || calls.recv_timeout(Duration::from_secs(30))).await;
        assert_eq!(called, Ok(0), "the first step was claimed and called here");
        assert_eq!(fleet.counters.claimed.load(Ordering::Relaxed), 1);
        assert_eq!(inner.pool.free_workers(), 0);
        // Queued now, while the one worker is busy: left in the queue.
        let waiting = enqueue("waiting").await;
        let until = Instant::now() + super::POLL + Duration::from_millis(500);
        while Instant::now() < until {
            let rows = row_states(&db).await;
            assert_eq!(
                rows,
                vec![
                    ("busy".to_string(), "running".to_string()),
                    ("waiting".to_string(), "queued".to_string()),
                ],
                "a process with no worker free claimed a step"
            );
            assert_eq!(fleet.counters.claimed.load(Ordering::Relaxed), 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Stopping: the busy step goes back to the queue and its worker is free, but a
        // process that stops takes neither.
        fleet.finish().await;
        assert!(lock(&fleet.held).is_empty());
        nothing_claimed(&db, &fleet, 1, "a stopping process").await;
        assert!(finished(&fleet, vec![waiting]).await.is_empty());
    });
    drop(engine);
    drop(rt);
}

/// The rows waiting in `db`'s queue: `(run, priority)`, by run.
async fn queued_rows(db: &ScratchDb) -> Vec<(String, i16)> {
    let target = db.target().clone();
    off(move || {
        target
            .connect()
            .unwrap()
            .query(
                "SELECT run_id, priority FROM runner_queue WHERE state = 'queued' ORDER BY run_id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    })
    .await
}

/// Until `check` holds of the queued rows (it panics with `what` after 30 s).
async fn until_rows(db: &ScratchDb, what: &str, check: impl Fn(&[(String, i16)]) -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = queued_rows(db).await;
        if check(&rows) {
            return;
        }
        assert!(Instant::now() < until, "{what}: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A run whose step waits in the shared queue (tagged for a host that is not here) is moved
/// by a priority change and withdrawn by a cancel: from this process's console (its keys
/// call the engine) and from a console on another host (a request on the run's row, which
/// the run's driver here carries out). Runs that are not active here are refused.
#[test]
fn a_run_waiting_in_the_queue_is_moved_and_cancelled_from_here_and_from_another_console() {
    use crate::blueprint::Priority;
    use crate::events::RunStatus;
    use crate::store::pg::events::REQUESTS_CHANNEL;
    let Some(db) = ScratchDb::new("fleet_requests") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 2);
    let bp: Arc<crate::blueprint::Blueprint> = Arc::new(
        serde_json::from_value(json!({
            "name": "waits",
            "nodes": [ { "id": "gpu", "type": "http", "url": "http://127.0.0.1:1/never",
                         "tags": ["gpu"] } ]
        }))
        .unwrap(),
    );
    rt.block_on(async {
        let a = engine
            .start(bp.clone(), crate::engine::RunRequest::default())
            .unwrap();
        let b = engine
            .start(bp.clone(), crate::engine::RunRequest::default())
            .unwrap();
        let (ra, rb) = (a.run_id.clone(), b.run_id.clone());
        until_rows(&db, "both steps are queued", |rows| rows.len() == 2).await;
        let normal = Priority::Normal.index() as i16;
        assert!(queued_rows(&db).await.iter().all(|(_, p)| *p == normal));

        assert!(!engine.set_priority("not-here", Priority::Critical));
        assert!(engine.set_priority(&ra, Priority::Critical));
        let critical = Priority::Critical.index() as i16;
        until_rows(&db, "the queued step moves with its run", |rows| {
            rows.iter().any(|(r, p)| *r == ra && *p == critical)
        })
        .await;
        assert!(
            queued_rows(&db).await.contains(&(rb.clone(), normal)),
            "only that run's"
        );

        // Another host's console asks this process, the driver, to cancel run b and to move
        // it (one transaction, one announcement, as `Store::request` makes each).
        let (target, rb2) = (db.target().clone(), rb.clone());
        off(move || {
            let mut c = target.connect().unwrap();
            let mut tx = c.transaction().unwrap();
            tx.execute(
                "UPDATE runner_executions SET cancel_requested_at = now(),
                     priority_requested = 'high' WHERE id = $1",
                &[&rb2],
            )
            .unwrap();
            tx.execute("SELECT pg_notify($1, $2)", &[&REQUESTS_CHANNEL, &rb2])
                .unwrap();
            tx.commit().unwrap();
        })
        .await;
        // Once the driver took the requests (it clears a priority request as it takes it),
        // the cancel request is taken off the row: the look that took it carries it out, not
        // a later one (which would keep the console's user waiting for the next poll).
        let (target, rb2) = (db.target().clone(), rb.clone());
        off(move || {
            let mut c = target.connect().unwrap();
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                let taken: bool = c
                    .query_one(
                        "SELECT priority_requested IS NULL FROM runner_executions WHERE id = $1",
                        &[&rb2],
                    )
                    .unwrap()
                    .get(0);
                if taken {
                    break;
                }
                assert!(Instant::now() < until, "the driver never took the requests");
                std::thread::sleep(Duration::from_millis(5));
            }
            c.execute(
                "UPDATE runner_executions SET cancel_requested_at = NULL WHERE id = $1",
                &[&rb2],
            )
            .unwrap();
        })
        .await;
        let o = tokio::time::timeout(Duration::from_secs(60), b.wait())
            .await
            .expect("the run asked to cancel ends");
        assert_eq!(o.status, RunStatus::Cancelled);
        until_rows(&db, "the cancelled run's step is withdrawn", |rows| {
            rows.iter().all(|(r, _)| *r != rb)
        })
        .await;

        assert!(!engine.cancel("not-here"));
        assert!(engine.cancel(&ra));
        let o = tokio::time::timeout(Duration::from_secs(60), a.wait())
            .await
            .expect("the cancelled run ends");
        assert_eq!(o.status, RunStatus::Cancelled);
        until_rows(&db, "the cancelled run's step is withdrawn", |rows| {
            rows.is_empty()
        })
        .await;
        assert!(!engine.cancel(&ra), "no longer active");
    });
    drop(engine);
    drop(rt);
}

/// A row this process runs whose claim is no longer its own (another host's sweep took it
/// over, or its driver withdrew it) has its attempt stopped at the next heartbeat; the rows
/// still its own run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_claim_was_taken_is_stopped_at_the_next_heartbeat() {
    let Some(db) = ScratchDb::new("fleet_heartbeat_lost") else {
        return;
    };
    // A heartbeat every 100 ms.
    let fleet = fleet_leased(&db, 2, Duration::from_millis(300)).await;
    let rows = claimed(&fleet, &["kept", "taken"]).await;
    let (kept, taken) = (rows["kept"].clone(), rows["taken"].clone());
    let hold = |j: &ClaimedJob| {
        let cancel = tokio_util::sync::CancellationToken::new();
        lock(&fleet.held).insert(
            j.id,
            super::Held {
                token: j.token.clone(),
                cancel: cancel.clone(),
            },
        );
        cancel
    };
    let (kept_cancel, taken_cancel) = (hold(&kept), hold(&taken));
    let (target, id) = (db.target().clone(), taken.id);
    off(move || {
        target
            .connect()
            .unwrap()
            .execute(
                "UPDATE runner_queue SET locked_by = 'other-host:2:0', claim_token = 'theirs',
                     lease_until = now() + interval '1 minute'
                 WHERE id = $1",
                &[&id],
            )
            .unwrap()
    })
    .await;
    tokio::spawn(worker::heartbeats(fleet.clone()));
    tokio::time::timeout(Duration::from_secs(30), taken_cancel.cancelled())
        .await
        .expect("the attempt whose claim was taken still runs");
    assert!(!lock(&fleet.held).contains_key(&taken.id));
    assert!(
        !kept_cancel.is_cancelled(),
        "an attempt still ours was stopped"
    );
    assert!(lock(&fleet.held).contains_key(&kept.id));
    fleet.stop.cancel();
}

/// A step that runs longer than `LEASE_TIMEOUT` keeps its claim: the heartbeats extend its
/// lease in time, so another host's sweep never takes it over (it would run the step a
/// second time) while it runs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_running_longer_than_its_lease_is_not_taken_over() {
    let Some(db) = ScratchDb::new("fleet_heartbeat_kept") else {
        return;
    };
    // A heartbeat every second: a beat late by up to two still keeps the lease.
    let lease = Duration::from_secs(3);
    let fleet = fleet_leased(&db, 2, lease).await;
    let q = fleet.queue.clone();
    let job = off(move || {
        q.enqueue(&[NewJob {
            run_id: "run".into(),
            step_key: "long".into(),
            attempt: 1,
            priority: 1,
            tags: Vec::new(),
            payload: json!({}),
        }])
        .unwrap();
        q.claim(WORKER, &[], 1, lease).unwrap().remove(0)
    })
    .await;
    let claimed_at = Instant::now();
    let cancel = tokio_util::sync::CancellationToken::new();
    lock(&fleet.held).insert(
        job.id,
        super::Held {
            token: job.token.clone(),
            cancel: cancel.clone(),
        },
    );
    tokio::spawn(worker::heartbeats(fleet.clone()));
    // Another host sweeps over and over, for half a lease more than the lease.
    let other = {
        let target = db.target().clone();
        off(move || Queue::new(&target, 1).unwrap()).await
    };
    while claimed_at.elapsed() < lease + lease / 2 {
        let o = other.clone();
        let swept = off(move || o.rescue_expired(3).unwrap()).await;
        assert!(
            swept.requeued.is_empty() && swept.failed.is_empty(),
            "a step still running here was taken over after {:?}",
            claimed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!cancel.is_cancelled(), "the step was stopped");
    assert!(lock(&fleet.held).contains_key(&job.id));
    fleet.stop.cancel();
    off(move || drop(other)).await;
}

/// Results that cannot be written are tried again for a while (the lease covers the rows
/// meanwhile), 21 tries with waits growing to 2 s, and then given up (the rows run again when
/// their leases expire) rather than tried for ever. (Paused clock: the waits take no time.)
#[tokio::test(start_paused = true)]
async fn results_that_cannot_be_written_are_tried_again_for_a_while_then_given_up() {
    let Some(db) = ScratchDb::new("fleet_record_gives_up") else {
        return;
    };
    let fleet = fleet(&db, 1).await;
    let job = claimed(&fleet, &["refused"]).await["refused"].clone();
    let sql = |statement: &'static str| {
        let target = db.target().clone();
        off(move || {
            let mut c = target.connect().unwrap();
            c.batch_execute(statement).unwrap();
            c.query_one(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM tries",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
        })
    };
    // The server refuses every completion, counting the tries (a sequence is not rolled
    // back).
    sql("CREATE SEQUENCE tries;
         CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM nextval('tries'); RAISE EXCEPTION 'disk full'; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON runner_queue
             FOR EACH ROW EXECUTE FUNCTION refuse();")
    .await;
    let mut to_driver = wait_here(&fleet, job.id);
    tokio::time::timeout(
        Duration::from_secs(3600),
        worker::record(&fleet, vec![(job.id, job.token.clone(), json!("lost"))]),
    )
    .await
    .expect("the results were tried for ever");
    assert_eq!(sql("SELECT 1").await, 21, "tries before giving up");
    assert!(
        to_driver.try_recv().is_err(),
        "an unwritten result reached its driver"
    );
    assert_eq!(fleet.counters.completed.load(Ordering::Relaxed), 0);
}

/// A fleet run resumed after its driver died takes the result of an attempt that is still in
/// the queue (another host ran it) instead of asking again; an older attempt left in the
/// queue is not taken for the newest one, which runs again.
#[test]
fn a_resumed_run_takes_the_result_of_its_attempt_still_in_the_queue() {
    use crate::engine::nodes::StepOutput;
    use crate::engine::step::AttemptDone;
    use crate::events::RunStatus;
    let Some(db) = ScratchDb::new("fleet_resume_queued") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 2);
    let (url, _calls) = http_server(false);
    let node =
        |id: &str| json!({ "id": id, "type": "http", "url": url, "retry": { "attempts": 5 } });
    let bp = json!({ "name": "resumed", "nodes": [ node("queued"), node("older") ] });
    let store = engine.inner.store.clone();
    let now = std::time::SystemTime::now();
    store.insert_run(crate::store::NewRun {
        id: "resumed".into(),
        blueprint_name: "resumed".into(),
        priority: crate::blueprint::Priority::Normal,
        trigger: "cli".into(),
        sandbox: false,
        seed: None,
        simulate_failures: 0.0,
        variables: json!({}),
        blueprint: bp,
        parent_run_id: None,
        queued_at: now,
    });
    store.run_started("resumed", now, 2);
    // The dead driver had started attempt 1 of `queued`, and attempts 1 and 2 of `older`.
    for step in ["queued", "older"] {
        store.step_queued(crate::store::NewStep {
            run_id: "resumed".into(),
            step_key: step.into(),
            node_id: step.into(),
            item_index: None,
            input: None,
            queued_at: now,
        });
    }
    store.step_started("resumed", "queued", 1, now);
    store.step_started("resumed", "older", 1, now);
    store.step_started("resumed", "older", 2, now);
    store.flush_blocking();
    let done = |value: &str| {
        serde_json::to_value(AttemptDone {
            result: Ok(StepOutput {
                value: json!(value),
                ..StepOutput::default()
            }),
            started_at: now,
            finished_at: now,
        })
        .unwrap()
    };
    let inner = engine.inner.clone();
    let outcome = rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        // Another host ran `queued`'s attempt 1 and `older`'s attempt 1; their results were
        // never taken.
        let q = fleet.queue.clone();
        let results = [done("from the queue"), done("stale")];
        off(move || {
            let jobs: Vec<NewJob> = ["queued", "older"]
                .iter()
                .map(|s| NewJob {
                    run_id: "resumed".into(),
                    step_key: (*s).into(),
                    attempt: 1,
                    priority: 1,
                    // Not for this process's claimer: the host that ran them had the tag.
                    tags: vec!["elsewhere".into()],
                    payload: json!({}),
                })
                .collect();
            q.enqueue(&jobs).unwrap();
            let rows = q
                .claim("gone-host:1:0", &["elsewhere".into()], 2, lease())
                .unwrap();
            let done: Vec<_> = rows
                .iter()
                .map(|j| {
                    let i = usize::from(j.step_key == "older");
                    (j.id, j.token.clone(), results[i].clone())
                })
                .collect();
            assert_eq!(q.complete(&done).unwrap().len(), 2);
        })
        .await;
        let h = engine.resume("resumed").await.unwrap();
        let o = tokio::time::timeout(Duration::from_secs(60), h.wait())
            .await
            .expect("the resumed run ends");
        drop(engine);
        o
    });
    assert_eq!(outcome.status, RunStatus::Success, "{:?}", outcome.error);
    assert_eq!(outcome.outputs["queued"], json!("from the queue"));
    assert_eq!(outcome.outputs["older"], json!("ok"));
    drop(rt);
}

/// A step this process meant to take whole, left unclaimed by its own insert (a claimable
/// row was ahead of it and took the free worker), is held back only until the history is
/// committed, then shown to the other hosts: one of them takes it at once, not when the
/// hold (a lease) runs out.
#[test]
fn a_step_held_back_for_this_process_is_shown_to_others_once_its_history_is_in() {
    let Some(db) = ScratchDb::new("fleet_reveal") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 1);
    let inner = engine.inner.clone();
    // The row ahead keeps the one worker busy (its call is never answered), so this process
    // does not claim the step itself once it is shown.
    let (busy_url, busy_calls) = http_server(true);
    let (url, _calls) = http_server(false);
    let target = db.target().clone();
    let q = engine
        .fleet_queue()
        .expect("an engine on PostgreSQL is in a fleet");
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        assert_eq!(inner.pool.free_workers(), 1);
        // Inserted as a crashed enqueuer would leave it, with no notice: this process's
        // claimer sees it only at its next poll, by which time the step's insert has taken
        // it (were the claimer first, the step would simply be queued for anyone).
        let ahead = job("ahead", "call", get(busy_url)).payload;
        off(move || {
            target
                .connect()
                .unwrap()
                .execute(
                    "INSERT INTO runner_queue (run_id, step_key, attempt, priority, payload)
                     VALUES ('ahead', 'call', 1, 5, $1)",
                    &[&ahead],
                )
                .unwrap()
        })
        .await;
        let (reply, queued) = oneshot::channel();
        fleet
            .enqueue_tx
            .send(super::Enqueue {
                job: job("run", "call", get(url)),
                reply,
            })
            .map_err(|_| "the enqueuer is gone")
            .unwrap();
        let (id, _outcome) = tokio::time::timeout(Duration::from_secs(30), queued)
            .await
            .expect("the insert went ahead")
            .unwrap()
            .unwrap();
        let busy = off(move || busy_calls.recv_timeout(Duration::from_secs(30))).await;
        assert_eq!(busy, Ok(0), "the row ahead runs here");
        // Another host: half the hold (the lease) is far longer than showing a committed
        // step takes, so only a step never shown makes it wait this long.
        let until = Instant::now() + fleet.lease / 2;
        let taken = loop {
            let q = q.clone();
            let got = off(move || q.claim("other-host:2:0", &[], 1, lease()).unwrap()).await;
            if let Some(j) = got.into_iter().next() {
                break j;
            }
            assert!(
                Instant::now() < until,
                "the step held back for this process was never shown to the others"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!((taken.id, taken.run_id.as_str()), (id, "run"));
    });
    drop(engine);
    drop(rt);
}

/// A result another host writes for a row a driver here waits on wakes this process's
/// collector through its notice, without waiting for the collector's next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_hosts_result_for_a_row_awaited_here_wakes_the_collector() {
    let Some(db) = ScratchDb::new("fleet_done_notice") else {
        return;
    };
    let fleet = fleet(&db, 2).await;
    // The console's subscription says when the listening connection is up.
    let live = fleet.follow_events();
    fleet.spawn_listener();
    let connected = off(move || live.recv_timeout(Duration::from_secs(30))).await;
    assert!(
        matches!(connected, Ok(super::Live::Connected)),
        "{connected:?}"
    );
    // Connecting wakes the collector once, for what it may have missed.
    tokio::time::timeout(Duration::from_secs(5), fleet.results_wake.notified())
        .await
        .expect("a new connection wakes the collector");
    let q = fleet.queue.clone();
    let row = off(move || {
        q.enqueue(&[job("run", "call", get("http://127.0.0.1:9/".into()))])
            .unwrap();
        q.claim("other-host:2:0", &[], 1, lease())
            .unwrap()
            .remove(0)
    })
    .await;
    let _waiting = wait_here(&fleet, row.id);
    let q = fleet.queue.clone();
    let (id, token) = (row.id, row.token.clone());
    off(move || q.complete(&[(id, token, json!({ "done": true }))]).unwrap()).await;
    tokio::time::timeout(Duration::from_secs(30), fleet.results_wake.notified())
        .await
        .expect("the result's notice never woke the collector");
    fleet.listener_stop.store(true, Ordering::Relaxed);
}

/// A step another host may take (here: tagged for a host that is not this one) goes into the
/// shared queue only once its `pending` row is committed, so whoever claims it finds the step
/// recorded. Here the history's step table is locked by another transaction: the queue
/// stays empty until the lock goes, then the step comes.
#[test]
fn a_step_for_other_hosts_is_queued_only_once_its_history_is_committed() {
    let Some(db) = ScratchDb::new("fleet_history_first") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 2);
    let inner = engine.inner.clone();
    let bp: Arc<crate::blueprint::Blueprint> = Arc::new(
        serde_json::from_value(json!({
            "name": "elsewhere",
            "nodes": [ { "id": "gpu", "type": "http", "url": "http://127.0.0.1:1/never",
                         "tags": ["gpu"] } ]
        }))
        .unwrap(),
    );
    let target = db.target().clone();
    rt.block_on(async {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        let (release, locker) = off(move || lock_steps(target)).await;
        let h = engine
            .start(bp.clone(), crate::engine::RunRequest::default())
            .unwrap();
        // Longer than an insert takes (were it not waiting for the history).
        let until = Instant::now() + super::POLL;
        while Instant::now() < until {
            let rows = queued_rows(&db).await;
            assert!(
                rows.is_empty(),
                "the step was queued before its history was committed: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        release.send(()).unwrap();
        off(move || locker.join().unwrap()).await;
        until_rows(&db, "the step is queued once its history is in", |rows| {
            rows.iter().any(|(r, _)| *r == h.run_id)
        })
        .await;
        assert!(engine.cancel(&h.run_id));
    });
    drop(engine);
    drop(rt);
}

/// Another transaction holds the history's step table (no step can be written) until told
/// (or dropped).
fn lock_steps(
    target: crate::store::pg::PgTarget,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    held_transaction(target, |tx| {
        tx.batch_execute("LOCK TABLE runner_steps IN SHARE MODE")
            .unwrap();
    })
}

/// The result of a step another process queued is written to the queue only once this
/// process's record of the attempt (its `running`) is committed, so the driver that takes the
/// result records the step's end after its start. Here the history's step table is locked:
/// the call is made, but its result waits until the lock goes.
#[test]
fn a_result_for_another_process_waits_for_this_ones_history() {
    let Some(db) = ScratchDb::new("fleet_result_after_history") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 2);
    let inner = engine.inner.clone();
    let (url, calls) = http_server(false);
    let q = engine
        .fleet_queue()
        .expect("an engine on PostgreSQL is in a fleet");
    let target = db.target().clone();
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        let (release, locker) = off(move || lock_steps(target)).await;
        let id = off(move || q.enqueue(&[job("theirs", "call", get(url))]).unwrap()[0]).await;
        let called = off(move || calls.recv_timeout(Duration::from_secs(30))).await;
        assert_eq!(called, Ok(0), "the step was claimed and called here");
        // Longer than writing a result takes (were it not waiting for the history).
        let until = Instant::now() + super::POLL;
        while Instant::now() < until {
            assert!(
                finished(&fleet, vec![id]).await.is_empty(),
                "the result was written before this process's record of the attempt"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        release.send(()).unwrap();
        off(move || locker.join().unwrap()).await;
        let until = Instant::now() + Duration::from_secs(30);
        while finished(&fleet, vec![id]).await.is_empty() {
            assert!(Instant::now() < until, "the result was never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    drop(engine);
    drop(rt);
}

/// A step this process takes whole does not wait for the history: its own writer records
/// the step's start after its queuing anyway. Here the history's step table is locked (the
/// run's steps cannot be written), and the step's call is made all the same.
#[test]
fn a_step_taken_here_starts_while_the_history_is_being_written() {
    use crate::events::RunStatus;
    let Some(db) = ScratchDb::new("fleet_mine_no_wait") else {
        return;
    };
    let (rt, engine, _dir) = engine_on(&db, 4);
    let inner = engine.inner.clone();
    let (url, calls) = http_server(false);
    let target = db.target().clone();
    let bp: Arc<crate::blueprint::Blueprint> = Arc::new(
        serde_json::from_value(json!({
            "name": "here",
            "nodes": [ { "id": "call", "type": "http", "url": url } ]
        }))
        .unwrap(),
    );
    rt.block_on(async move {
        let fleet = inner.fleet.as_ref().unwrap().0.clone();
        until_ready(&fleet).await;
        let (release, locker) = off(move || lock_steps(target)).await;
        let h = engine
            .start(bp, crate::engine::RunRequest::default())
            .unwrap();
        let called = off(move || calls.recv_timeout(Duration::from_secs(30))).await;
        release.send(()).unwrap();
        off(move || locker.join().unwrap()).await;
        assert_eq!(
            called,
            Ok(0),
            "the step's call waited for the history to be written"
        );
        let o = tokio::time::timeout(Duration::from_secs(60), h.wait())
            .await
            .expect("the run ends");
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        drop(engine);
    });
    drop(rt);
}
