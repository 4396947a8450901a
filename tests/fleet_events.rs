//! What a console of the fleet hears and asks, against a real PostgreSQL: a process's
//! committed history writes are announced on `omniflow_events` (one notification a batch,
//! naming its runs), a listener skips its own process's announcements, and requests to a
//! run's driver (cancel, priority) are recorded, announced and taken. Each test has its own
//! scratch database and skips (saying so) without a PostgreSQL server.

use omniflow::blueprint::Priority;
use omniflow::events::RunStatus;
use omniflow::store::pg::events::Live;
use omniflow::store::pg::fleet_view::{Request, Requested};
use omniflow::store::pg::testing::ScratchDb;
use omniflow::store::{NewRun, RunEnd, Store};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

fn new_run(id: &str) -> NewRun {
    NewRun {
        id: id.into(),
        blueprint_name: "fan".into(),
        priority: Priority::Normal,
        trigger: "cli".into(),
        sandbox: false,
        seed: None,
        simulate_failures: 0.0,
        variables: json!({}),
        blueprint: json!({"name": "fan", "nodes": []}),
        parent_run_id: None,
        queued_at: SystemTime::now(),
    }
}

/// A listener thread as a console runs it, for process `me`; what it hears comes out of the
/// receiver. Stops when the returned flag is set.
fn listen(db: &ScratchDb, me: &str) -> (mpsc::Receiver<Live>, Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let (target, me, s) = (db.target().clone(), me.to_string(), stop.clone());
    std::thread::spawn(move || {
        omniflow::store::pg::events::follow(&target, &me, &|| s.load(Ordering::Relaxed), &mut |l| {
            let _ = tx.send(l);
        })
    });
    (rx, stop)
}

/// Waits (generously) for the next announcement of runs, skipping connection news.
fn next_runs(rx: &mpsc::Receiver<Live>) -> (Vec<String>, bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Live::Runs { runs, more }) => return (runs, more),
            Ok(_) => continue,
            Err(e) => panic!("no announcement: {e}"),
        }
    }
}

fn wait_connected(rx: &mpsc::Receiver<Live>) {
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Live::Connected) => {}
        Ok(other) => panic!("before connecting: {other:?}"),
        Err(e) => panic!("the listener did not connect: {e}"),
    }
}

#[test]
fn a_batch_of_history_writes_is_announced_once_naming_its_runs_and_never_to_its_own_process() {
    let Some(db) = ScratchDb::new("events_announce") else {
        return;
    };
    let a = Store::open_postgres_as(db.target(), "host-a:1:1".into()).unwrap();
    let b = Store::open_postgres_as(db.target(), "host-b:2:2".into()).unwrap();
    // A console on host A (same process as store `a`): hears B, never A.
    let (rx, stop) = listen(&db, "host-a:1:1");
    wait_connected(&rx);

    // One batch of A's: two runs, many writes. Then one of B's.
    a.insert_run(new_run("run-a1"));
    a.insert_run(new_run("run-a2"));
    for i in 0..50 {
        a.step_started("run-a1", &format!("s{i}"), 1, SystemTime::now());
    }
    a.flush_blocking();
    b.insert_run(new_run("run-b1"));
    b.run_started("run-b1", SystemTime::now(), 1);
    b.flush_blocking();
    // Notifications come in commit order: had A's been delivered, it would come first.
    let (runs, more) = next_runs(&rx);
    assert_eq!(runs, vec!["run-b1".to_string()]);
    assert!(!more);

    // Another console (a process of its own) hears both, and each of A's runs once.
    let (rx2, stop2) = listen(&db, "host-c:3:3");
    wait_connected(&rx2);
    a.step_started("run-a2", "x", 1, SystemTime::now());
    a.step_started("run-a1", "y", 1, SystemTime::now());
    a.step_started("run-a2", "z", 1, SystemTime::now());
    a.flush_blocking();
    // However the writer cut those into batches, each announcement names a run once.
    let mut heard = std::collections::BTreeSet::new();
    while heard.len() < 2 {
        let (runs, _) = next_runs(&rx2);
        let distinct: std::collections::BTreeSet<&String> = runs.iter().collect();
        assert_eq!(distinct.len(), runs.len(), "{runs:?}");
        heard.extend(runs);
    }
    assert_eq!(
        heard.into_iter().collect::<Vec<_>>(),
        vec!["run-a1".to_string(), "run-a2".to_string()]
    );
    // A run's end is announced too (the History row's status).
    b.run_finished(RunEnd {
        run_id: "run-b1".into(),
        status: RunStatus::Success,
        finished_at: SystemTime::now(),
        total_time_ms: 5,
        tokens_used: 0,
        steps_done: 1,
        error: None,
        error_kind: None,
        failed_step: None,
    });
    b.flush_blocking();
    assert_eq!(next_runs(&rx2).0, vec!["run-b1".to_string()]);
    let rows = a.runs_by_id(vec!["run-b1".into(), "nope".into()]).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, RunStatus::Success);
    stop.store(true, Ordering::Relaxed);
    stop2.store(true, Ordering::Relaxed);
}

#[test]
fn requests_to_a_run_s_driver_are_recorded_announced_and_taken() {
    let Some(db) = ScratchDb::new("events_requests") else {
        return;
    };
    let driver = Store::open_postgres_as(db.target(), "host-a:1:1".into()).unwrap();
    let console = Store::open_postgres_as(db.target(), "host-b:2:2".into()).unwrap();
    driver.insert_run(new_run("r1"));
    driver.insert_run(new_run("done"));
    driver.run_finished(RunEnd {
        run_id: "done".into(),
        status: RunStatus::Success,
        finished_at: SystemTime::now(),
        total_time_ms: 5,
        tokens_used: 0,
        steps_done: 0,
        error: None,
        error_kind: None,
        failed_step: None,
    });
    driver.flush_blocking();

    // The driver's side listens on the requests channel (as the fleet's listener does).
    let mut listener = db.target().connect().unwrap();
    listener.batch_execute("LISTEN omniflow_requests").unwrap();

    assert_eq!(
        console
            .request("r1", Request::Priority(Priority::High))
            .unwrap(),
        Requested::Sent {
            owner: Some("host-a:1:1".into())
        }
    );
    assert_eq!(
        console.request("r1", Request::Cancel).unwrap(),
        Requested::Sent {
            owner: Some("host-a:1:1".into())
        }
    );
    assert_eq!(
        console.request("done", Request::Cancel).unwrap(),
        Requested::NotActive
    );
    assert_eq!(
        console.request("unknown", Request::Cancel).unwrap(),
        Requested::NotActive
    );
    use postgres::fallible_iterator::FallibleIterator;
    let heard = listener
        .notifications()
        .timeout_iter(Duration::from_secs(60))
        .next()
        .unwrap()
        .expect("a notification on omniflow_requests");
    assert_eq!(heard.payload(), "r1");
    // The row shows the new priority at once.
    assert_eq!(console.find_run("r1").unwrap().priority, Priority::High);

    let mut taken = driver
        .take_requests(vec!["r1".into(), "done".into()])
        .unwrap();
    taken.sort_by_key(|(_, r)| format!("{r:?}"));
    assert_eq!(
        taken,
        vec![
            ("r1".to_string(), Request::Cancel),
            ("r1".to_string(), Request::Priority(Priority::High)),
        ]
    );
    // A priority is taken once; a cancel stays until the run ends.
    assert_eq!(
        driver.take_requests(vec!["r1".into()]).unwrap(),
        vec![("r1".to_string(), Request::Cancel)]
    );
    assert!(driver.running_attempts().unwrap().is_empty());
}

#[test]
fn on_sqlite_there_is_no_fleet_to_ask() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("h.db")).unwrap();
    store.insert_run(new_run("r1"));
    store.flush_blocking();
    assert_eq!(
        store.request("r1", Request::Cancel).unwrap(),
        Requested::NotShared
    );
    assert!(store.take_requests(vec!["r1".into()]).unwrap().is_empty());
    assert!(store.running_attempts().unwrap().is_empty());
    assert_eq!(store.runs_by_id(vec!["r1".into()]).unwrap().len(), 1);
}

/// A console in a fleet hears the announcements on its engine's one `LISTEN` connection (the
/// one that wakes its claims), not on a connection of its own: other processes' runs come
/// through, its own do not, and the process holds no extra connection for them.
#[test]
fn a_fleet_engine_hears_announcements_on_its_one_listening_connection() {
    let Some(db) = ScratchDb::new("events_engine") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vars: std::collections::HashMap<String, String> = [
        ("DATABASE_URL", db.url().to_string()),
        ("LOG_DIR", dir.path().join("logs").display().to_string()),
        ("CONCURRENCY", "4".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = omniflow::config::Config::from_vars(&vars).unwrap();
    let store = Store::open_postgres(db.target()).unwrap();
    let engine = {
        let _in = rt.enter();
        omniflow::engine::Engine::new(
            std::sync::Arc::new(config),
            store.clone(),
            omniflow::events::EventBus::new(),
        )
    };
    let heard = engine.follow_fleet_events().expect("a fleet");
    let deadline = Instant::now() + Duration::from_secs(60);
    let next = |what: &str| -> Live {
        let left = deadline.saturating_duration_since(Instant::now());
        heard
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    assert_eq!(next("listening"), Live::Connected);
    // This process's own writes are not announced to it; another process's are.
    store.insert_run(new_run("run-own"));
    store.flush_blocking();
    let other = Store::open_postgres_as(db.target(), "far-host:9:9".into()).unwrap();
    other.insert_run(new_run("run-far"));
    other.flush_blocking();
    loop {
        match next("the other process's run") {
            Live::Runs { runs, .. } => {
                assert_eq!(runs, vec!["run-far".to_string()]);
                break;
            }
            Live::Connected => continue,
            Live::Lost(e) => panic!("lost: {e}"),
        }
    }
    // One LISTEN connection in this process: the fleet's, now on the events channel too.
    let mut c = db.target().connect().unwrap();
    let listening: Vec<String> = c
        .query(
            "SELECT query FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'",
            &[&db.name()],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(listening.len(), 1, "{listening:?}");
    drop(engine);
    drop(rt);
}
