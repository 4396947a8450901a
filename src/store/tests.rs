//! Unit tests of the guards, the opening checks and the writer's failure handling. The guards
//! and the writer's handling run on both backends (`NAME::sqlite` on a real SQLite file,
//! `NAME::postgres` on a scratch PostgreSQL database, skipped with a line when no server
//! answers); the file checks are SQLite's own.

use super::*;
use crate::blueprint::Priority;
use crate::error::ErrorKind;
use crate::events::{RunStatus, StepStatus};
use serde_json::json;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_780_000_000_000 + ms)
}

fn new_run(id: &str, queued_ms: u64) -> NewRun {
    NewRun {
        id: id.into(),
        blueprint_name: "tech-digest".into(),
        priority: Priority::Normal,
        trigger: "cli".into(),
        sandbox: false,
        seed: Some(u64::MAX - 1),
        simulate_failures: 0.0,
        variables: json!({"TOPICS": ["a"]}),
        blueprint: serde_json::Value::Null,
        parent_run_id: None,
        queued_at: at(queued_ms),
    }
}

fn end(id: &str, status: RunStatus, ms: u64) -> RunEnd {
    RunEnd {
        run_id: id.into(),
        status,
        finished_at: at(ms),
        total_time_ms: ms,
        tokens_used: 7,
        steps_done: 1,
        error: (status == RunStatus::Error).then(|| "boom".to_string()),
        error_kind: (status == RunStatus::Error).then_some(ErrorKind::Server),
        failed_step: None,
    }
}

fn step_end(run: &str, key: &str, status: StepStatus) -> StepEnd {
    StepEnd {
        run_id: run.into(),
        step_key: key.into(),
        node_id: key.into(),
        item_index: None,
        status,
        attempts: 1,
        output: Some(json!("out")),
        error_kind: None,
        error: None,
        tokens_used: 3,
        provider: None,
        model: None,
        cached: false,
        reply_model: None,
        finish_reason: None,
        finished_at: at(500),
        duration_ms: 100,
    }
}

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("history.db")).unwrap();
    (dir, store)
}

/// Where a conformance test's store lives.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(Box<pg::testing::ScratchDb>),
}

impl Db {
    fn open(&self) -> Store {
        match self {
            Db::Sqlite(dir) => Store::open(&dir.path().join("history.db")).unwrap(),
            Db::Postgres(db) => Store::open_postgres(db.target()).unwrap(),
        }
    }

    /// Makes the database refuse to insert the run `id` (a trigger), as a row the writer
    /// cannot write.
    fn refuse_run(&self, id: &str) {
        self.exec(
            &format!(
                "CREATE TRIGGER boom BEFORE INSERT ON runner_executions WHEN NEW.id = '{id}'
                 BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END;"
            ),
            &insert_trigger(
                "",
                &format!(
                    "IF NEW.id = '{id}' THEN RAISE EXCEPTION 'refused by test trigger'; END IF;"
                ),
            ),
        );
    }

    /// Runs statements as another client would; `sqlite` and `postgres` are the same change
    /// in each dialect.
    fn exec(&self, sqlite: &str, postgres: &str) {
        match self {
            Db::Sqlite(dir) => rusqlite::Connection::open(dir.path().join("history.db"))
                .unwrap()
                .execute_batch(sqlite)
                .unwrap(),
            Db::Postgres(db) => {
                let target = db.target().clone();
                let sql = postgres.to_string();
                // The driver must not run on a test's async runtime.
                std::thread::spawn(move || target.connect().unwrap().batch_execute(&sql).unwrap())
                    .join()
                    .unwrap();
            }
        }
    }
}

/// One test body, both backends.
macro_rules! on_both {
    (fn $name:ident($db:ident, $store:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[allow(unused_variables)]
            fn body($db: &Db, $store: Store) $body

            #[test]
            fn sqlite() {
                let db = Db::Sqlite(tempfile::tempdir().unwrap());
                let store = db.open();
                body(&db, store);
            }

            #[test]
            fn postgres() {
                let Some(db) = pg::testing::ScratchDb::new(stringify!($name)) else {
                    return;
                };
                let db = Db::Postgres(Box::new(db));
                let store = db.open();
                body(&db, store);
            }
        }
    };
}

#[test]
fn a_store_can_be_shared_across_threads_and_tasks() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    send_sync::<Store>();
    // Errors can be boxed and carried across threads at the binary's edge.
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    error::<StoreError>();
}

on_both! {
fn a_row_this_build_cannot_read_is_reported_as_corrupt(db, store) {
    store.insert_run(new_run("r1", 0));
    store.flush_blocking();
    let sql = "UPDATE runner_executions SET priority = 'urgent'";
    db.exec(sql, sql);
    let err = store.find_run("r1").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert_eq!(err.kind(), StoreErrorKind::Corrupt);
    assert!(err.to_string().contains("\"urgent\""), "{err}");
}
}

#[test]
fn timestamps_are_iso8601_utc_with_millis_and_clamped() {
    assert_eq!(
        iso8601(UNIX_EPOCH + Duration::from_millis(1_795_772_678_123)),
        "2026-11-27T09:44:38.123Z"
    );
    assert_eq!(
        iso8601(UNIX_EPOCH - Duration::from_secs(5)),
        "1970-01-01T00:00:00.000Z"
    );
    let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
    assert_eq!(iso8601(far), "9999-12-31T23:59:59.999Z");
}

on_both! {
fn a_finished_run_keeps_its_first_end_and_cannot_restart(db, store) {
    store.insert_run(new_run("r1", 0));
    store.run_started("r1", at(10), 2);
    store.run_finished(end("r1", RunStatus::Success, 100));
    store.run_finished(end("r1", RunStatus::Error, 200));
    store.run_started("r1", at(300), 9);
    store.run_progress("r1", 99, 99);
    store.flush_blocking();

    let run = store.find_run("r1").unwrap();
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(run.finished_at, Some(at(100)));
    assert_eq!(run.started_at, Some(at(10)));
    assert_eq!(run.steps_total, Some(2));
    assert_eq!(run.tokens_used, 7);
    assert_eq!(run.error, None);
    assert_eq!(run.seed, Some(u64::MAX - 1), "u64 seeds round-trip");
    assert_eq!(
        store.take_write_error(),
        None,
        "guarded no-ops are not errors"
    );
}
}

on_both! {
fn a_queued_run_sorts_by_queue_time_until_it_starts(db, store) {
    store.insert_run(new_run("r1", 5));
    store.flush_blocking();
    let run = store.find_run("r1").unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.started_at, Some(run.queued_at));
    // A non-final "end" is refused.
    store.run_finished(end("r1", RunStatus::Running, 9));
    store.flush_blocking();
    assert_eq!(store.find_run("r1").unwrap().status, RunStatus::Queued);
    // A queued run can be cancelled directly.
    store.run_finished(end("r1", RunStatus::Cancelled, 9));
    store.flush_blocking();
    assert_eq!(store.find_run("r1").unwrap().status, RunStatus::Cancelled);
}
}

on_both! {
fn step_transitions_are_guarded(db, store) {
    store.insert_run(new_run("r1", 0));
    // Unknown run: no row, no error.
    store.step_queued(NewStep {
        run_id: "nope".into(),
        step_key: "a".into(),
        node_id: "a".into(),
        item_index: None,
        input: None,
        queued_at: at(1),
    });
    store.step_queued(NewStep {
        run_id: "r1".into(),
        step_key: "a".into(),
        node_id: "a".into(),
        item_index: None,
        input: Some(json!({"x": 1})),
        queued_at: at(1),
    });
    store.step_retrying("r1", "a"); // pending, not running: ignored
    store.step_started("r1", "a", 1, at(2));
    store.step_retrying("r1", "a");
    store.step_started("r1", "a", 2, at(3));
    store.step_finished(step_end("r1", "a", StepStatus::Success));
    store.step_finished(step_end("r1", "a", StepStatus::Error));
    store.step_started("r1", "a", 3, at(4));
    // Never queued: the final record creates it, after `a` in display order.
    store.step_finished(StepEnd {
        attempts: 0,
        output: None,
        ..step_end("r1", "b", StepStatus::Skipped)
    });
    // Failed before any attempt (its prompt did not render): it never started either.
    store.step_finished(StepEnd {
        attempts: 0,
        output: None,
        ..step_end("r1", "c", StepStatus::Error)
    });
    store.flush_blocking();

    let steps = store.run_steps("r1").unwrap();
    assert_eq!(steps.len(), 3);
    let c = &steps[2];
    assert_eq!((c.step_key.as_str(), c.status), ("c", StepStatus::Error));
    assert_eq!(c.started_at, None, "no attempt, no start");
    let a = &steps[0];
    assert_eq!((a.step_key.as_str(), a.status), ("a", StepStatus::Success));
    assert_eq!(
        a.attempts, 1,
        "the final record's count wins over the started one"
    );
    assert_eq!(a.started_at, Some(at(2)));
    assert_eq!(a.input, Some(json!({"x": 1})));
    assert_eq!(a.output, Some(json!("out")));
    let b = &steps[1];
    assert_eq!((b.step_key.as_str(), b.status), ("b", StepStatus::Skipped));
    assert_eq!(b.started_at, None);
    assert!(store.run_steps("nope").unwrap().is_empty());
    assert_eq!(store.take_write_error(), None);
}
}

on_both! {
fn one_bad_write_does_not_take_its_batch_down(db, store) {
    db.refuse_run("bad");
    for id in ["ok1", "bad", "ok2"] {
        store.insert_run(new_run(id, 0));
    }
    store.flush_blocking();
    assert!(store.find_run("ok1").is_ok());
    assert!(store.find_run("ok2").is_ok());
    assert!(matches!(
        store.find_run("bad"),
        Err(StoreError::NotFound(_))
    ));
    let err = store.take_write_error().expect("the failure is reported");
    assert!(err.contains("insert_run bad"), "{err}");
    assert_eq!(store.take_write_error(), None, "reported once");
    // The writer keeps serving.
    store.insert_run(new_run("ok3", 0));
    store.flush_blocking();
    assert!(store.find_run("ok3").is_ok());
}
}

/// On PostgreSQL a batch that fails as a conflict (serialization failure, deadlock) is
/// applied again, a few times. A write that conflicts on every try is then given up like any
/// refused row: reported, and the rest of its batch saved, instead of the writer trying it
/// forever while every later write waits behind it.
#[test]
fn a_write_that_conflicts_on_every_try_is_given_up_after_a_few() {
    let Some(db) = pg::testing::ScratchDb::new("conflicting_write") else {
        return;
    };
    let target = db.target().clone();
    let db = Db::Postgres(Box::new(db));
    let store = db.open();
    // The conflict is made by a trigger, 50 times at most: a writer that never gives up
    // still ends, having saved the row.
    db.exec(
        "",
        &insert_trigger(
            "CREATE SEQUENCE boom_tries;",
            "IF NEW.id = 'bad' THEN
                 IF nextval('boom_tries') <= 50 THEN
                     RAISE EXCEPTION 'conflict made by a test trigger'
                         USING ERRCODE = 'serialization_failure';
                 END IF;
             END IF;",
        ),
    );
    for id in ["ok1", "bad", "ok2"] {
        store.insert_run(new_run(id, 0));
    }
    store.flush_blocking();
    assert!(store.find_run("ok1").is_ok());
    assert!(store.find_run("ok2").is_ok());
    assert!(
        matches!(store.find_run("bad"), Err(StoreError::NotFound(_))),
        "the write that kept conflicting was given up"
    );
    let err = store.take_write_error().expect("the failure is reported");
    assert!(
        err.contains("insert_run bad") && err.contains("conflict made by a test trigger"),
        "{err}"
    );
    // Its batch's first try and five more, then the write alone (when its batch had others).
    let tries: i64 = std::thread::spawn(move || {
        let mut c = target.connect().unwrap();
        c.query_one("SELECT last_value FROM boom_tries", &[])
            .unwrap()
            .get(0)
    })
    .join()
    .unwrap();
    assert!((6..=7).contains(&tries), "tried {tries} times");
}

/// The server ends the writer's session while it applies a refused batch's writes one by one
/// (here on the write after the refused one): the writer reconnects and goes on from that
/// write, so a plain flush sees it saved, only the refused write is lost, and it is tried
/// (and reported) once alone, not again with its whole batch.
#[test]
fn a_session_ended_while_writes_go_one_by_one_goes_on_from_the_write_it_was_on() {
    let Some(db) = pg::testing::ScratchDb::new("one_by_one_cut") else {
        return;
    };
    let target = db.target().clone();
    let db = Db::Postgres(Box::new(db));
    let store = db.open();
    // Sequences are not rolled back with a refused transaction: they count the tries.
    db.exec(
        "",
        &insert_trigger(
            "CREATE SEQUENCE cuts; CREATE SEQUENCE bad_tries;",
            "IF NEW.id = 'bad' THEN
                 PERFORM nextval('bad_tries');
                 RAISE EXCEPTION 'refused by test trigger';
             END IF;
             -- The first time `cut` is written the session ends, as a server restart ends it.
             IF NEW.id = 'cut' AND nextval('cuts') = 1 THEN
                 PERFORM pg_terminate_backend(pg_backend_pid());
             END IF;",
        ),
    );
    // `bad` and `cut` must go in one batch (which stops at `bad`, then goes one by one): the
    // writer is held on a first write while they are queued behind it.
    let (release, holder) = writer_held_on_a_first_insert(&target, &store);
    store.insert_run(new_run("bad", 0));
    store.insert_run(new_run("cut", 0));
    release.send(()).unwrap();
    holder.join().unwrap();
    store.flush_blocking();

    assert!(store.find_run("first").is_ok());
    assert!(
        store.find_run("cut").is_ok(),
        "the write after the cut is saved before the flush returns"
    );
    assert!(matches!(
        store.find_run("bad"),
        Err(StoreError::NotFound(_))
    ));
    let err = store
        .take_write_error()
        .expect("the refused write is reported");
    assert!(err.contains("refused by test trigger"), "{err}");
    let (cuts, bad_tries) = std::thread::spawn(move || {
        let mut c = target.connect().unwrap();
        let row = c
            .query_one(
                "SELECT (SELECT last_value FROM cuts), (SELECT last_value FROM bad_tries)",
                &[],
            )
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    })
    .join()
    .unwrap();
    assert_eq!(
        cuts, 2,
        "the session ended once, and `cut` went in on the next try"
    );
    assert_eq!(
        bad_tries, 2,
        "the refused write was tried with its batch, then alone, and not again"
    );
}

/// The session ends while a refused batch goes one by one, and no new connection is had in
/// time (here none is waited for): the writes before the cut are settled (saved, or refused
/// and reported) and the kept ones start at the write that was cut off, so that once the
/// server answers each is applied, and the refused one is not tried again.
#[test]
fn writes_kept_from_a_refused_batch_start_at_the_one_cut_off() {
    let Some(db) = pg::testing::ScratchDb::new("one_by_one_kept") else {
        return;
    };
    let target = db.target().clone();
    let db = Db::Postgres(Box::new(db));
    drop(db.open());
    db.exec(
        "",
        &insert_trigger(
            "CREATE SEQUENCE cuts;",
            "IF NEW.id = 'bad' THEN RAISE EXCEPTION 'refused by test trigger'; END IF;
             IF NEW.id = 'cut' AND nextval('cuts') = 1 THEN
                 PERFORM pg_terminate_backend(pg_backend_pid());
             END IF;",
        ),
    );
    let ops: Vec<Op> = ["ok", "bad", "cut", "after"]
        .into_iter()
        .map(|id| Op::InsertRun(Box::new(new_run(id, 0))))
        .collect();
    let shared = writer::Shared::default();
    let proc = transitions::ProcessInfo::current("test".into());
    let mut conn = pg::backend::Conn::new(target.clone());
    conn.reconnect_for = Duration::ZERO;
    let ids = || {
        let target = target.clone();
        std::thread::spawn(move || {
            let mut c = target.connect().unwrap();
            c.query("SELECT id FROM runner_executions ORDER BY id", &[])
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    };

    let done = pg::backend::apply_batch(&mut conn, &ops, &shared, &proc, "test");
    assert_eq!(done, 2, "settled: `ok` saved, `bad` refused");
    assert_eq!(ids(), ["ok"]);
    let err = shared.write_error.lock().unwrap().take().unwrap();
    assert!(
        err.contains("insert_run bad") && err.contains("refused by test trigger"),
        "{err}"
    );
    assert!(
        shared.failing.lock().unwrap().is_some(),
        "the store reads as failing while writes are kept"
    );

    let done = pg::backend::apply_batch(&mut conn, &ops[done..], &shared, &proc, "test");
    assert_eq!(done, 2, "the kept writes are all settled");
    assert_eq!(ids(), ["after", "cut", "ok"]);
    assert_eq!(
        shared.write_error.lock().unwrap().take(),
        None,
        "nothing more refused"
    );
    assert_eq!(*shared.failing.lock().unwrap(), None, "and failing no more");
}

/// The writer's result for one batch.
type Applied = (Option<u64>, Option<String>);

/// Applies `ops` on `conn` as the writer applies a batch: how many writes were lost (`None`
/// for a full disk, which is held, not lost), and the failure the user is told, if any.
fn apply_as_writer(conn: &mut Connection, ops: &[Op]) -> Applied {
    let shared = writer::Shared::default();
    let proc = transitions::ProcessInfo::current("test".into());
    let lost = writer::apply_ops(conn, ops, &shared, &proc, "history.db").ok();
    let err = shared.write_error.lock().unwrap().take();
    (lost, err)
}

/// A batch the database refuses as a whole (here the table it writes to is gone) is one
/// failure: the user reads how many changes were lost in one line, and the writes are not
/// tried one by one (each would fail the same way, and be reported as one change).
#[test]
fn a_batch_refused_as_a_whole_is_reported_once_with_its_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    drop(Store::open(&path).unwrap());
    let mut conn = Connection::open(&path).unwrap();
    conn.execute_batch("ALTER TABLE runner_executions RENAME TO elsewhere")
        .unwrap();
    let ops: Vec<Op> = ["a", "b", "c"]
        .into_iter()
        .map(|id| Op::InsertRun(Box::new(new_run(id, 0))))
        .collect();
    let (lost, err) = apply_as_writer(&mut conn, &ops);
    assert_eq!(lost, Some(3));
    let err = err.expect("the loss is reported");
    assert!(
        err.starts_with("could not save 3 change(s) to history.db (first: insert_run a)"),
        "{err}"
    );
    assert!(err.contains("no such table"), "{err}");
}

on_both! {
fn a_lost_write_makes_the_store_unready_until_a_batch_commits(db, store) {
    // What `/readyz` reports: a write lost in the last batch, cleared by the next batch
    // that commits whole.
    db.refuse_run("bad");
    assert_eq!(store.write_problem(), None);
    // The bad write last, so whichever batch holds it is the last one before the flush.
    for id in ["ok1", "ok2", "bad"] {
        store.insert_run(new_run(id, 0));
    }
    store.flush_blocking();
    assert!(store.find_run("ok2").is_ok());
    let problem = store.write_problem().expect("the lost write makes the store unready");
    assert!(problem.contains("refused by test trigger"), "{problem}");
    // Nothing was saved since: a flush with nothing to write commits no batch, and the store
    // stays unready (`/readyz` does not turn ready because a console or a run's end waited).
    store.flush_blocking();
    assert_eq!(
        store.write_problem().as_deref(),
        Some(problem.as_str()),
        "a flush with nothing to write does not clear it"
    );
    store.insert_run(new_run("ok3", 0));
    store.flush_blocking();
    assert_eq!(store.write_problem(), None, "a batch that commits clears it");
}
}

on_both! {
fn dropping_the_last_clone_applies_pending_writes(db, store) {
    {
        let clone = store.clone();
        for i in 0..500 {
            clone.insert_run(new_run(&format!("r{i:04}"), i));
        }
        drop(store);
        // `clone` still alive: the writer must still be serving.
        clone.insert_run(new_run("last", 0));
    }
    let store = db.open();
    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), 501);
}
}

/// A driver asking for room goes on at once while the writer is behind by less than the bound,
/// waits while it is far behind, and goes on once the writer has taken the writes; nothing
/// queued meanwhile is lost.
#[tokio::test]
async fn room_waits_while_the_writer_is_behind_and_nothing_is_lost() {
    use futures_util::FutureExt;
    let (dir, store) = open_temp();
    store.insert_run(new_run("r1", 0));
    store.flush().await;
    assert!(
        store.room().now_or_never().is_some(),
        "an idle writer has room"
    );
    // Another process holds the write lock: the writer waits in its busy handler with
    // whatever it took into its batch, and what is sent after that stays queued.
    let other = rusqlite::Connection::open(dir.path().join("history.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    // One write taken into a batch: from then on the writer waits for the lock, and the
    // queue holds exactly what is sent next.
    let shared = &store.inner.shared;
    store.run_progress("r1", 0, 0);
    loop {
        let drained = shared.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if shared.queued.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            break;
        }
        drained.await;
    }
    // Behind, but under the bound: a driver goes on at once (waiting for the writer to take
    // the queue down to half would slow every step start of a busy fan-out).
    let under = super::ROOM * 3 / 4;
    for i in 0..under {
        store.run_progress("r1", i as u32, 0);
    }
    assert!(
        store.room().now_or_never().is_some(),
        "{under} writes queued is under the bound of {}: room at once",
        super::ROOM
    );
    // Over the bound (half again as many): the driver waits for the writer to take the
    // queue down to half the bound, not only back under it.
    for i in 0..under {
        store.run_progress("r1", i as u32, 0);
    }
    assert!(
        store.room().now_or_never().is_none(),
        "{} writes queued is over the bound of {}: room must wait",
        2 * under,
        super::ROOM
    );
    // More than one batch can take, plus the bound, so the queue is over it whatever the
    // writer took before the lock stopped it.
    let n = 8192 + 2 * super::ROOM + 1;
    for i in 0..n {
        store.run_progress("r1", i as u32, 0);
    }
    assert!(
        store.room().now_or_never().is_none(),
        "room must wait while {n} writes are queued behind a held lock"
    );
    other.execute_batch("COMMIT").unwrap();
    store.room().await;
    store.flush().await;
    let s = store.clone();
    let run = tokio::task::spawn_blocking(move || s.find_run("r1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        run.steps_done,
        Some((n - 1) as u32),
        "the last counters written win"
    );
}

#[tokio::test]
async fn async_flush_waits_for_the_commit() {
    let (_dir, store) = open_temp();
    store.insert_run(new_run("r1", 0));
    store.flush().await;
    let s = store.clone();
    let run = tokio::task::spawn_blocking(move || s.find_run("r1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.id, "r1");
}

/// A file that is not SQLite's is refused and left as it was: a page of notes, and a file
/// of one byte too (SQLite alone would take that one for an empty database and write over
/// it).
#[test]
fn a_file_that_is_not_sqlite_is_refused_untouched() {
    for bytes in [
        b"these are my notes, not a database\n".repeat(100),
        b"x".to_vec(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.db");
        std::fs::write(&path, &bytes).unwrap();
        let err = Store::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        assert!(
            msg.contains("is not an SQLite database (file is not a database)")
                && msg.contains("point DB_FILE at another file or move it away"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(!dir.path().join("notes.db-wal").exists());
    }
}

/// A history file cut short (a torn copy, a full disk during a copy): SQLite finds it
/// malformed while it opens, and the user is told it is damaged and how to rescue what is in
/// it, with the file left as it was.
#[test]
fn a_truncated_file_is_refused_as_damaged_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    {
        let store = Store::open(&path).unwrap();
        for i in 0..200 {
            store.insert_run(new_run(&format!("run-{i}"), i));
        }
        store.flush_blocking();
    }
    // Checkpointed into the main file by the close; keep its first half.
    let whole = std::fs::read(&path).unwrap();
    assert!(whole.len() >= 8 * 4096, "{} bytes", whole.len());
    let half = whole[..whole.len() / 2].to_vec();
    std::fs::write(&path, &half).unwrap();
    let err = Store::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Malformed { .. }), "{err:?}");
    assert!(
        msg.contains("is damaged") && msg.contains("omniflow backup rescued.db"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), half);
}

#[test]
fn a_newer_schema_is_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 99;")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerSchema {
                found: 99,
                known: SCHEMA_VERSION,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            // Not a literal version: other branches append migrations.
            .contains(&format!("schema version 99, this omniflow knows up to {SCHEMA_VERSION}: upgrade omniflow or use another DB_FILE")),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "not even switched to WAL"
    );
}

#[test]
fn reopening_is_idempotent_and_records_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c/history.db");
    drop(Store::open(&path).unwrap());
    let store = Store::open(&path).unwrap();
    let c = rusqlite::Connection::open(store.path().unwrap()).unwrap();
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_directory_that_cannot_be_created_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let err = Store::open(&blocker.join("sub/history.db")).unwrap_err();
    assert!(matches!(err, StoreError::CreateDir { .. }), "{err:?}");
    assert!(err.to_string().contains("point DB_FILE elsewhere"), "{err}");
}

#[test]
fn a_directory_as_db_file_is_unwritable() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Unwritable { .. }), "{err:?}");
}

/// Every row of the history tables, as text, in a stable order.
fn dump(conn: &Connection) -> Vec<String> {
    let mut out = Vec::new();
    for (table, order) in [
        ("runner_executions", "id"),
        ("runner_steps", "run_id, step_key"),
        ("runner_attempts", "run_id, step_key, attempt"),
    ] {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY {order}"))
            .unwrap();
        let cols = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                let mut line = table.to_string();
                for i in 0..cols {
                    let v: rusqlite::types::Value = r.get(i)?;
                    line.push_str(&format!(" | {v:?}"));
                }
                Ok(line)
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

#[test]
fn a_coalesced_batch_leaves_the_same_rows_as_its_transitions_one_by_one() {
    use super::transitions::{coalesce, Op, ProcessInfo};
    let queued = |key: &str, ms: u64| {
        Op::StepQueued(Box::new(NewStep {
            run_id: "r".into(),
            step_key: key.into(),
            node_id: key.into(),
            item_index: None,
            input: Some(json!({ "prompt": key })),
            queued_at: at(ms),
        }))
    };
    let started = |key: &str, attempt: u32, ms: u64| Op::StepStarted {
        run_id: "r".into(),
        step_key: key.into(),
        attempt,
        at: at(ms),
    };
    let attempt = |key: &str, n: u32, ok: bool| {
        Op::AttemptFinished(Box::new(AttemptRecord {
            run_id: "r".into(),
            step_key: key.into(),
            attempt: n,
            ok,
            error_kind: (!ok).then_some(ErrorKind::Server),
            error: (!ok).then(|| "503".to_string()),
            wait_ms: (!ok).then_some(10),
            started_at: at(110),
            finished_at: at(190),
            tokens_used: 3,
            provider: None,
            model: None,
            cached: false,
        }))
    };
    let finished = |key: &str, status: StepStatus, out: &str| {
        let mut e = step_end("r", key, status);
        e.output = Some(json!(out));
        e.reply_model = Some(format!("model-{key}"));
        e.finish_reason = Some("stop".into());
        Op::StepFinished(Box::new(e))
    };
    let progress = |n: u32| Op::RunProgress {
        run_id: "r".into(),
        steps_done: n,
        tokens_used: u64::from(n) * 3,
    };
    // Before the batch: the run, and a step a crashed run already finished (resume re-plans
    // it; its row must not change).
    let setup = || {
        vec![
            Op::InsertRun(Box::new(new_run("r", 0))),
            Op::RunStarted {
                run_id: "r".into(),
                at: at(50),
                steps_total: 5,
            },
            queued("done", 60),
            finished("done", StepStatus::Success, "first"),
            // Queued by an earlier batch, as a fan-out queues all its items first.
            queued("e", 61),
            queued("f", 62),
            queued("g", 63),
        ]
    };
    let batch = || {
        vec![
            // A step's whole life.
            queued("a", 100),
            started("a", 1, 110),
            attempt("a", 1, true),
            progress(1),
            finished("a", StepStatus::Success, "A"),
            // Still running at the end of the batch.
            queued("b", 120),
            started("b", 1, 130),
            // One that retried: left as it is.
            queued("c", 140),
            started("c", 1, 150),
            attempt("c", 1, false),
            Op::StepRetrying {
                run_id: "r".into(),
                step_key: "c".into(),
            },
            started("c", 2, 160),
            attempt("c", 2, true),
            progress(2),
            finished("c", StepStatus::Success, "C"),
            // Skipped: only its end.
            finished("d", StepStatus::Skipped, ""),
            // Re-planned after a crash: its final row wins.
            queued("done", 170),
            started("done", 1, 175),
            finished("done", StepStatus::Success, "second"),
            // Queued before: its start and end become one write, its attempt stays.
            started("e", 1, 180),
            attempt("e", 1, true),
            finished("e", StepStatus::Error, "E"),
            // Queued and started before: only its end.
            finished("f", StepStatus::Success, "F"),
            // Queued before, still running.
            started("g", 1, 185),
            // Ended, then queued again in the same batch (an unusual order): left as it is,
            // so each write keeps its own guard.
            finished("h", StepStatus::Skipped, ""),
            queued("h", 186),
            progress(3),
            Op::RunFinished(Box::new(end("r", RunStatus::Success, 900))),
        ]
    };
    let dir = tempfile::tempdir().unwrap();
    let proc = ProcessInfo::current("p".into());
    let apply = |conn: &mut Connection, ops: &[Op]| {
        let tx = conn.transaction().unwrap();
        for op in ops {
            op.apply(&tx, &proc).unwrap();
        }
        tx.commit().unwrap();
    };
    let mut one_by_one = schema::open_writer(&dir.path().join("a.db")).unwrap();
    let mut coalesced = schema::open_writer(&dir.path().join("b.db")).unwrap();
    for op in setup().into_iter().chain(batch()) {
        apply(&mut one_by_one, std::slice::from_ref(&op));
    }
    apply(&mut coalesced, &setup());
    let folded = coalesce(batch());
    // a: 3 writes → 1; b: 2 → 1; done: 3 → 1; e: 2 → 1; progress: 3 → 0.
    assert_eq!(folded.len(), batch().len() - 2 - 1 - 2 - 1 - 3, "{}", {
        folded
            .iter()
            .map(Op::describe)
            .collect::<Vec<_>>()
            .join(", ")
    });
    apply(&mut coalesced, &folded);
    let (want, got) = (dump(&one_by_one), dump(&coalesced));
    assert_eq!(want, got);
    assert!(want.iter().any(|l| l.contains("first")), "{want:#?}");
    assert!(
        want.iter()
            .any(|l| l.contains("model-a") && l.contains("\"stop\"")),
        "a coalesced step keeps what the server said about its answer: {want:#?}"
    );
    assert!(want
        .iter()
        .any(|l| l.starts_with("runner_steps") && l.contains("\"running\"")));

    // A batch with only one kind of fold in it still gets it: each row is written once, as
    // the database counts its writes (SQLite rewrites a run's whole row, its blueprint and
    // variables included, at each write).
    let mut counted = schema::open_writer(&dir.path().join("c.db")).unwrap();
    counted
        .execute_batch(
            "CREATE TABLE writes (tbl text);
             CREATE TRIGGER runs_updated AFTER UPDATE ON runner_executions
                 BEGIN INSERT INTO writes VALUES ('runner_executions'); END;
             CREATE TRIGGER steps_inserted AFTER INSERT ON runner_steps
                 BEGIN INSERT INTO writes VALUES ('runner_steps'); END;
             CREATE TRIGGER steps_updated AFTER UPDATE ON runner_steps
                 BEGIN INSERT INTO writes VALUES ('runner_steps'); END;",
        )
        .unwrap();
    apply(&mut counted, &setup()[..2]);
    let writes = |conn: &mut Connection, ops: Vec<Op>| -> Vec<(String, i64)> {
        conn.execute_batch("DELETE FROM writes").unwrap();
        apply(conn, &coalesce(ops));
        let mut stmt = conn
            .prepare("SELECT tbl, count(*) FROM writes GROUP BY tbl ORDER BY tbl")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // A step's whole life and no run counters.
    assert_eq!(
        writes(
            &mut counted,
            vec![
                queued("x", 200),
                started("x", 1, 210),
                finished("x", StepStatus::Success, "X"),
            ]
        ),
        vec![("runner_steps".to_string(), 1)],
        "a step queued, started and ended in one batch is written once"
    );
    // Run counters then the run's end, and no step.
    assert_eq!(
        writes(
            &mut counted,
            vec![
                progress(4),
                progress(5),
                Op::RunFinished(Box::new(end("r", RunStatus::Success, 900))),
            ]
        ),
        vec![("runner_executions".to_string(), 1)],
        "a run's counters followed by its end are written once"
    );

    // Started, then queued in the same batch (an unusual order: a start is only sent for a
    // queued step): left as it is, so the start, finding no row, is refused as it would be
    // alone, and `show` lists the step as pending, not as running from a refused start.
    let order = || vec![started("i", 1, 220), queued("i", 230)];
    let step_i = |conn: &Connection| -> (String, Option<String>) {
        conn.query_row(
            "SELECT status, started_at FROM runner_steps WHERE run_id = 'r' AND step_key = 'i'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let mut alone = schema::open_writer(&dir.path().join("d.db")).unwrap();
    let mut folded = schema::open_writer(&dir.path().join("e.db")).unwrap();
    apply(&mut alone, &setup()[..2]);
    apply(&mut folded, &setup()[..2]);
    for op in order() {
        apply(&mut alone, std::slice::from_ref(&op));
    }
    apply(&mut folded, &coalesce(order()));
    assert_eq!(step_i(&alone), ("pending".to_string(), None));
    assert_eq!(step_i(&folded), step_i(&alone));
}

#[test]
fn shown_times_agree_with_the_iso_text() {
    for ms in [
        0u64,
        951_782_400_000,     // 2000-02-29
        1_795_772_678_123,   // 2026-11-27T09:44:38.123Z
        4_107_542_399_999,   // 2100-02-28T23:59:59.999Z
        253_402_300_799_999, // 9999-12-31T23:59:59.999Z
    ] {
        let t = UNIX_EPOCH + Duration::from_millis(ms);
        let iso = iso8601(t);
        assert_eq!(utc_date_time(t), format!("{} {}", &iso[..10], &iso[11..19]));
        assert_eq!(
            utc_month_day_time(t),
            format!("{} {}", &iso[5..10], &iso[11..19])
        );
        assert_eq!(utc_clock(t, true), iso[11..23]);
    }
    // Every day from 1970 to 2100, leap days and era ends (2000-03-01) included: the shown
    // date is the calendar's (humantime's, in `iso8601`), wherever a day falls in its year.
    for day in 0..47_500u64 {
        let t = UNIX_EPOCH + Duration::from_millis(day * 86_400_000 + 45_296_789);
        let iso = iso8601(t);
        assert_eq!(utc_date_time(t), format!("{} {}", &iso[..10], &iso[11..19]));
    }
}

/// A store whose writer is gone, as after a panic of its thread: its queue is read by a
/// stand-in that takes each message and drops it unanswered (or by nobody at all).
fn with_stopped_writer(path: &Path, reads_then_drops: bool) -> Store {
    let (tx, rx) = mpsc::channel::<Msg>();
    if reads_then_drops {
        std::thread::spawn(move || while rx.recv().is_ok() {});
    } else {
        drop(rx);
    }
    Store {
        inner: Arc::new(Inner {
            backend: Backend::Sqlite(SqliteBackend {
                path: path.to_path_buf(),
                tx: Some(tx),
                readers: Mutex::new(Vec::new()),
            }),
            writer: None,
            shared: Arc::new(Shared::default()),
            owner: "me".into(),
        }),
    }
}

#[test]
fn an_answered_write_without_its_writer_says_the_writer_stopped() {
    let (_dir, store) = open_temp();
    let path = store.path().unwrap().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for reads_then_drops in [false, true] {
        let gone = with_stopped_writer(&path, reads_then_drops);
        let errors = [
            gone.claim_slot("nightly", at(0)).unwrap_err(),
            gone.slot_run("nightly", at(0), "r1").unwrap_err(),
            rt.block_on(gone.claim_run("r1", Duration::from_secs(30), 3))
                .unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}");
            let text = e.to_string();
            assert!(
                text.contains("writer thread has stopped") && text.contains("restart omniflow"),
                "{text}"
            );
            assert!(text.contains(&path.display().to_string()), "{text}");
        }
    }
}

/// Every warning logged in this test binary, from any thread (the writer has its own), as
/// the text a log line carries.
fn warnings() -> &'static std::sync::Mutex<Vec<String>> {
    use std::sync::{Mutex, OnceLock};
    static LINES: OnceLock<&'static Mutex<Vec<String>>> = OnceLock::new();
    LINES.get_or_init(|| {
        let lines: &'static Mutex<Vec<String>> = Box::leak(Box::default());
        struct Line(&'static Mutex<Vec<String>>);
        impl std::io::Write for Line {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let text = String::from_utf8_lossy(buf).trim_end().to_string();
                self.0.lock().unwrap_or_else(|e| e.into_inner()).push(text);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .without_time()
            .with_writer(move || Line(lines))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the unit tests");
        lines
    })
}

/// The warnings that name `id`, from the words "store: …" on (the level and the module
/// before them differ between backends).
fn warnings_about(id: &str) -> Vec<String> {
    warnings()
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(id))
        .map(|l| {
            l.find("store: ")
                .map_or(l.as_str(), |i| &l[i..])
                .to_string()
        })
        .collect()
}

on_both! {
fn a_write_that_lands_logs_nothing_and_one_held_back_says_why(db, store) {
    // What an operator reads in the log: a warning is a write the store held back, never a
    // write that did its job.
    let id = match db {
        Db::Sqlite(_) => "quiet-sqlite",
        Db::Postgres(_) => "quiet-postgres",
    };
    let _ = warnings();
    store.insert_run(new_run(id, 0));
    store.flush_blocking();
    store.run_started(id, at(1), 2);
    store.flush_blocking();
    // Each transition in a batch of its own, then a batch that folds a step's whole life.
    store.step_queued(NewStep {
        run_id: id.into(),
        step_key: "a".into(),
        node_id: "a".into(),
        item_index: None,
        input: None,
        queued_at: at(2),
    });
    store.flush_blocking();
    store.step_started(id, "a", 1, at(3));
    store.flush_blocking();
    store.attempt_finished(AttemptRecord {
        run_id: id.into(),
        step_key: "a".into(),
        attempt: 1,
        ok: false,
        error_kind: Some(ErrorKind::Server),
        error: Some("503".into()),
        wait_ms: Some(10),
        started_at: at(3),
        finished_at: at(4),
        tokens_used: 0,
        provider: None,
        model: None,
        cached: false,
    });
    store.step_retrying(id, "a");
    store.flush_blocking();
    store.step_started(id, "a", 2, at(5));
    store.flush_blocking();
    store.step_finished(StepEnd {
        attempts: 2,
        ..step_end(id, "a", StepStatus::Success)
    });
    store.run_progress(id, 1, 3);
    store.flush_blocking();
    store.step_queued(NewStep {
        run_id: id.into(),
        step_key: "b".into(),
        node_id: "b".into(),
        item_index: None,
        input: None,
        queued_at: at(6),
    });
    store.step_started(id, "b", 1, at(7));
    store.step_finished(step_end(id, "b", StepStatus::Success));
    store.flush_blocking();
    // Queued in one batch, started and finished in the next (how a fan-out's steps end).
    store.step_queued(NewStep {
        run_id: id.into(),
        step_key: "c".into(),
        node_id: "c".into(),
        item_index: None,
        input: None,
        queued_at: at(8),
    });
    store.flush_blocking();
    store.step_started(id, "c", 1, at(9));
    store.step_finished(step_end(id, "c", StepStatus::Success));
    store.flush_blocking();
    // A resumed run plans its steps again: queuing a recorded step is no news.
    store.step_queued(NewStep {
        run_id: id.into(),
        step_key: "a".into(),
        node_id: "a".into(),
        item_index: None,
        input: None,
        queued_at: at(10),
    });
    store.flush_blocking();
    store.run_finished(end(id, RunStatus::Success, 900));
    store.flush_blocking();
    assert_eq!(warnings_about(id), Vec::<String>::new());
    let steps = store.run_steps(id).unwrap();
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|s| s.status == StepStatus::Success), "{steps:?}");

    // Late and repeated events: each is held back, and the warning names it and says why.
    store.run_finished(end(id, RunStatus::Error, 950));
    store.flush_blocking();
    store.step_finished(step_end(id, "a", StepStatus::Error));
    store.flush_blocking();
    store.step_retrying(id, "b");
    store.flush_blocking();
    // An "end" that is not final is a caller's mistake: held back before the database.
    store.step_finished(step_end(id, "c", StepStatus::Running));
    store.flush_blocking();
    let ghost = format!("{id}-gone");
    store.step_queued(NewStep {
        run_id: ghost.clone(),
        step_key: "a".into(),
        node_id: "a".into(),
        item_index: None,
        input: None,
        queued_at: at(11),
    });
    store.flush_blocking();
    assert_eq!(
        warnings_about(id),
        [
            format!("store: ignored run_finished {id}: the run is unknown or already finished"),
            format!(
                "store: ignored step_finished {id} a: the run is unknown or the step already \
                 finished"
            ),
            format!("store: ignored step_retrying {id} b: the step is not running"),
            format!("store: ignored step_finished {id} c: running is not a final status"),
            format!("store: ignored step_queued {ghost} a: unknown run"),
        ]
    );
    let run = store.find_run(id).unwrap();
    assert_eq!(run.status, RunStatus::Success, "the first end stays");
}
}

on_both! {
fn a_fan_out_s_queuings_and_starts_in_one_batch_keep_each_write_s_guard(db, store) {
    // A fan-out's writes reach the writer together; the PostgreSQL writer sends a run of
    // queuings, or of starts of different steps, as one statement. Each write keeps its own
    // guard and its own warning.
    let id = match db {
        Db::Sqlite(_) => "batch-sqlite",
        Db::Postgres(_) => "batch-postgres",
    };
    let _ = warnings();
    let ghost = format!("{id}-gone");
    store.insert_run(new_run(id, 0));
    store.run_started(id, at(1), 4);
    store.flush_blocking();
    let queue = |run: &str, key: &str, item: u32, ms: u64| NewStep {
        run_id: run.into(),
        step_key: key.into(),
        node_id: "each".into(),
        item_index: Some(item),
        input: Some(serde_json::json!({ "item": item })),
        queued_at: at(ms),
    };
    store.step_queued(queue(id, "each[0]", 0, 10));
    store.step_queued(queue(id, "each[1]", 1, 11));
    store.step_queued(queue(&ghost, "each[0]", 0, 12));
    store.step_queued(queue(id, "each[2]", 2, 13));
    // Queued twice in one batch (a resumed run plans again): the first stays.
    store.step_queued(queue(id, "each[0]", 0, 14));
    store.flush_blocking();
    store.step_started(id, "each[0]", 1, at(20));
    store.step_started(id, "each[1]", 1, at(21));
    // The same step twice among the starts (a retry's second attempt): both apply, in order.
    store.step_started(id, "each[0]", 2, at(22));
    store.step_started(id, "each[9]", 1, at(23));
    store.flush_blocking();
    let steps = store.run_steps(id).unwrap();
    let step = |key: &str| steps.iter().find(|s| s.step_key == key).unwrap();
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(step("each[0]").status, StepStatus::Running);
    assert_eq!(step("each[0]").attempts, 2);
    assert_eq!(step("each[0]").started_at, Some(at(20)));
    assert_eq!(step("each[0]").queued_at, Some(at(10)));
    assert_eq!(step("each[0]").input, Some(serde_json::json!({ "item": 0 })));
    assert_eq!(step("each[1]").status, StepStatus::Running);
    assert_eq!(step("each[1]").item_index, Some(1));
    assert_eq!(step("each[2]").status, StepStatus::Pending);
    assert_eq!(step("each[2]").started_at, None);
    assert!(store.run_steps(&ghost).unwrap().is_empty());
    assert_eq!(
        warnings_about(id),
        [
            format!("store: ignored step_queued {ghost} each[0]: unknown run"),
            format!(
                "store: ignored step_started {id} each[9]: the step is unknown or already finished"
            ),
        ]
    );
}
}

/// A caller tells what to do about an SQLite failure from its kind alone (wait and try
/// again, free space, restore, fix the path), the same kinds PostgreSQL's errors get.
#[test]
fn sqlite_failures_get_the_kind_a_caller_acts_on() {
    use rusqlite::ffi;
    let kind = |code: i32| {
        DbError::from(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)).kind()
    };
    assert_eq!(kind(ffi::SQLITE_BUSY), StoreErrorKind::Busy);
    assert_eq!(kind(ffi::SQLITE_LOCKED), StoreErrorKind::Busy);
    assert_eq!(kind(ffi::SQLITE_FULL), StoreErrorKind::Full);
    assert_eq!(kind(ffi::SQLITE_CORRUPT), StoreErrorKind::Corrupt);
    assert_eq!(kind(ffi::SQLITE_NOTADB), StoreErrorKind::Corrupt);
    assert_eq!(kind(ffi::SQLITE_CANTOPEN), StoreErrorKind::Unavailable);
    assert_eq!(kind(ffi::SQLITE_READONLY), StoreErrorKind::Unavailable);
    assert_eq!(kind(ffi::SQLITE_PERM), StoreErrorKind::Unavailable);
    assert_eq!(kind(ffi::SQLITE_CONSTRAINT), StoreErrorKind::Other);
}

/// Process ages in `omniflow doctor`/the console, and the time until a schedule fires.
#[test]
fn spans_read_as_people_say_them() {
    let span = |s: u64| short_span(Duration::from_secs(s));
    assert_eq!(span(0), "0s");
    assert_eq!(span(59), "59s");
    assert_eq!(span(60), "1m");
    assert_eq!(span(3599), "59m");
    assert_eq!(span(3600), "1h00m");
    assert_eq!(span(5 * 3600 + 12 * 60 + 7), "5h12m");
    assert_eq!(span(86_399), "23h59m");
    assert_eq!(span(86_400), "1d0h");
    assert_eq!(span(3 * 86_400 + 4 * 3600 + 59), "3d4h");
}

/// A backup that meets the database locked by a writer past its connection's busy wait
/// (possible where SQLite could not use WAL, on some network file systems) waits longer for
/// the lock to go and then copies every row, instead of failing.
#[test]
fn a_backup_waits_for_a_writer_s_lock_and_copies_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.db");
    let setup = Connection::open(&path).unwrap();
    setup
        .execute_batch(
            "PRAGMA journal_mode = DELETE; CREATE TABLE t (x INTEGER);
             INSERT INTO t VALUES (1), (2), (3);",
        )
        .unwrap();
    drop(setup);
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let holder = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut c = Connection::open(&path).unwrap();
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
                .unwrap();
            tx.execute("INSERT INTO t VALUES (4)", []).unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            tx.commit().unwrap();
        })
    };
    locked.recv().unwrap();
    let src = Connection::open(&path).unwrap();
    // As if the lock had outlasted the connection's own busy wait: the copy's waiting is
    // what is tested.
    src.busy_timeout(Duration::ZERO).unwrap();
    let copy = dir.path().join("copy.db");
    read::copy_into(&src, &copy).expect("the backup waited for the lock");
    holder.join().unwrap();
    let n: i64 = Connection::open(&copy)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 4, "the copy holds the writer's row too");
}

/// A leftover `<dest>.partial` from an earlier backup is replaced; one that cannot be removed
/// (here a directory of that name) fails the backup naming that, rather than a database that
/// cannot be opened, and is left as it was.
#[test]
fn a_backup_replaces_a_leftover_partial_and_names_one_in_its_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    let store = Store::open(&path).unwrap();
    store.insert_run(new_run("r", 0));
    store.flush_blocking();
    let dest = dir.path().join("copy.db");
    let partial = dir.path().join("copy.db.partial");
    std::fs::write(&partial, b"half a copy").unwrap();
    store.backup(&dest).unwrap();
    assert!(!partial.exists(), "the leftover is gone");
    assert!(Store::open(&dest).unwrap().find_run("r").is_ok());

    let dest = dir.path().join("other.db");
    let partial = dir.path().join("other.db.partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("keep"), b"mine").unwrap();
    let err = store.backup(&dest).expect_err("a directory in the way");
    let StoreError::Backup {
        source: BackupFailure::Io(e),
        ..
    } = &err
    else {
        panic!("not the file system's refusal: {err}");
    };
    assert_eq!(e.kind(), std::io::ErrorKind::IsADirectory, "{err}");
    assert!(partial.join("keep").exists());
    assert!(!dest.exists());
}

/// Another transaction holds the runs table of `target` (until told, or dropped) and a first
/// run is inserted through `store`: once this returns the writer waits on that insert, so
/// what is queued next goes in one batch behind it.
fn writer_held_on_a_first_insert(
    target: &pg::PgTarget,
    store: &Store,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (release, holder) = pg::testing::held_transaction(target.clone(), |tx| {
        tx.batch_execute("LOCK TABLE runner_executions IN SHARE MODE")
            .unwrap();
    });
    store.insert_run(new_run("first", 0));
    let t = target.clone();
    let waiting = std::thread::spawn(move || {
        let mut c = t.connect().unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0);
            if n > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    })
    .join()
    .unwrap();
    assert!(waiting, "the writer waits on the held table");
    (release, holder)
}

/// PostgreSQL statements that make every insert of a run go first through `body`, a
/// PL/pgSQL trigger's statements (its `RETURN NEW` added), after `setup` (the sequences it
/// counts with, which a refused transaction does not roll back).
fn insert_trigger(setup: &str, body: &str) -> String {
    format!(
        "{setup}
         CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             {body}
             RETURN NEW;
         END $$;
         CREATE TRIGGER boom BEFORE INSERT ON runner_executions
             FOR EACH ROW EXECUTE FUNCTION boom();"
    )
}

/// A history database in `dir` whose write lock another connection holds (the returned one:
/// `ROLLBACK` lets go), and a writer applying one run's insert to it on a thread of its own,
/// its connection first set up by `prepare`. The receiver gets the writer's result.
fn apply_behind_a_held_lock(
    dir: &Path,
    run: &'static str,
    prepare: fn(&Connection),
) -> (Connection, std::sync::mpsc::Receiver<Applied>) {
    let path = dir.join("history.db");
    drop(Store::open(&path).unwrap());
    let holder = Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut conn = Connection::open(&path).unwrap();
        prepare(&conn);
        let ops = [Op::InsertRun(Box::new(new_run(run, 0)))];
        let _ = done_tx.send(apply_as_writer(&mut conn, &ops));
    });
    (holder, done)
}

/// Another process holding the write lock past the busy wait: the writer tries the batch a
/// few more times, then gives up and reports the writes as lost (it does not spin on the
/// lock for ever, holding every later write behind it).
#[test]
fn a_batch_that_stays_locked_is_given_up_after_a_few_tries() {
    let dir = tempfile::tempdir().unwrap();
    // As if each try had waited out its busy timeout already.
    let (holder, done) = apply_behind_a_held_lock(dir.path(), "locked", |c| {
        c.busy_timeout(Duration::ZERO).unwrap()
    });
    let (lost, err) = done
        .recv_timeout(Duration::from_secs(30))
        .expect("the writer gave up on the locked database");
    holder.execute_batch("ROLLBACK").unwrap();
    assert_eq!(lost, Some(1));
    let err = err.expect("the loss is reported");
    assert!(err.contains("database is locked"), "{err}");
}

static FIRST_WAIT_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The first busy wait gives up at once, as if it had waited out its timeout; later ones wait
/// (for the holder, which lets go once the first is over).
fn one_busy_wait_then_patience(waited: i32) -> bool {
    if !FIRST_WAIT_OVER.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return false;
    }
    std::thread::sleep(Duration::from_millis(5));
    waited < 6000
}

/// Another process holding the write lock through one busy wait and letting go before the
/// next: the writer tries the batch again and it lands, nothing lost or reported.
#[test]
fn a_batch_locked_through_one_busy_wait_lands_on_the_next_try() {
    let dir = tempfile::tempdir().unwrap();
    let (holder, done) = apply_behind_a_held_lock(dir.path(), "waited", |c| {
        c.busy_handler(Some(one_busy_wait_then_patience)).unwrap()
    });
    while !FIRST_WAIT_OVER.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    holder.execute_batch("ROLLBACK").unwrap();
    let applied = done
        .recv_timeout(Duration::from_secs(60))
        .expect("the writer finished once the lock was let go");
    assert_eq!(applied, (Some(0), None));
    let store = Store::open(&dir.path().join("history.db")).unwrap();
    assert!(store.find_run("waited").is_ok());
}

/// A question to the writer (here claiming a run) is answered after every write queued
/// before it, even when both wait in the writer's queue together: the run just inserted is
/// found, and is this process's own.
#[test]
fn a_question_to_the_writer_sees_the_writes_queued_before_it() {
    let (dir, store) = open_temp();
    // Another connection holds the write lock, so the writer waits on a first write while
    // the insert and the question queue up behind it.
    let holder = Connection::open(dir.path().join("history.db")).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    store.insert_run(new_run("first", 0));
    std::thread::sleep(Duration::from_millis(100));
    store.insert_run(new_run("r1", 0));
    let claim = claim_on_a_thread(&store, "r1");
    holder.execute_batch("ROLLBACK").unwrap();
    assert_eq!(claim.join().unwrap().unwrap(), Claim::Mine);
}

/// Claims run `id` for this process on a thread of its own, and gives the claim time to
/// queue behind the writes sent before it (if it comes later, it is asked alone).
fn claim_on_a_thread(
    store: &Store,
    id: &'static str,
) -> std::thread::JoinHandle<Result<Claim, StoreError>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = store.clone();
    let claim =
        std::thread::spawn(move || rt.block_on(store.claim_run(id, Duration::from_secs(30), 3)));
    std::thread::sleep(Duration::from_millis(100));
    claim
}

/// The same on PostgreSQL: the insert and the claim queue up while the writer waits on a
/// first insert, and the claim finds the run, this process's own.
#[test]
fn a_question_to_the_postgres_writer_sees_the_writes_queued_before_it() {
    let Some(db) = pg::testing::ScratchDb::new("ask_after_write") else {
        return;
    };
    let target = db.target().clone();
    let db = Db::Postgres(Box::new(db));
    let store = db.open();
    let (release, holder) = writer_held_on_a_first_insert(&target, &store);
    store.insert_run(new_run("r1", 0));
    let claim = claim_on_a_thread(&store, "r1");
    release.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(claim.join().unwrap().unwrap(), Claim::Mine);
}

/// A run's root is found through its parents; a parent that is empty or the run itself
/// (written by hand, or by an older build) ends the walk at the run, not at an empty id.
#[test]
fn a_runs_root_is_found_through_its_parents() {
    let (dir, store) = open_temp();
    for (id, parent) in [
        ("root", None),
        ("child", Some("root")),
        ("grandchild", Some("child")),
    ] {
        store.insert_run(NewRun {
            parent_run_id: parent.map(str::to_string),
            ..new_run(id, 0)
        });
    }
    store.insert_run(new_run("blank", 0));
    store.insert_run(new_run("own", 0));
    store.flush_blocking();
    Connection::open(dir.path().join("history.db"))
        .unwrap()
        .execute_batch(
            "UPDATE runner_executions SET parent_run_id = '' WHERE id = 'blank';
             UPDATE runner_executions SET parent_run_id = 'own' WHERE id = 'own';",
        )
        .unwrap();
    assert_eq!(store.root_run_id("grandchild").unwrap(), "root");
    assert_eq!(store.root_run_id("root").unwrap(), "root");
    assert_eq!(store.root_run_id("blank").unwrap(), "blank");
    assert_eq!(store.root_run_id("own").unwrap(), "own");
}

/// A step's row tells `show` and the console when the server answered with another model
/// than the one asked for, and not for the same model under Ollama's `:latest` tag.
#[test]
fn a_step_row_names_another_answering_model_only() {
    let (_dir, store) = open_temp();
    store.insert_run(new_run("r1", 0));
    for (key, replied) in [
        ("other", Some("llama-3.2-1b-q4")),
        ("tagged", Some("mistral:latest")),
        ("unsaid", None),
    ] {
        store.step_queued(NewStep {
            run_id: "r1".into(),
            step_key: key.into(),
            node_id: key.into(),
            item_index: None,
            input: None,
            queued_at: at(1),
        });
        store.step_finished(StepEnd {
            model: Some("mistral".into()),
            reply_model: replied.map(str::to_string),
            ..step_end("r1", key, StepStatus::Success)
        });
    }
    store.flush_blocking();
    let steps = store.run_steps("r1").unwrap();
    let other = |key: &str| {
        let s = steps.iter().find(|s| s.step_key == key).unwrap();
        s.other_reply_model().map(str::to_string)
    };
    assert_eq!(other("other").as_deref(), Some("llama-3.2-1b-q4"));
    assert_eq!(other("tagged"), None);
    assert_eq!(other("unsaid"), None);
}

/// A 2 MiB tmpfs mounted on `dir`, unmounted when the guard goes; `None` (after saying
/// so) when this process may not mount (not root). CI runs as root, where a failed mount
/// fails the test.
fn small_tmpfs(dir: &Path) -> Option<Unmount> {
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        // SAFETY: geteuid has no preconditions.
        assert_ne!(
            unsafe { libc::geteuid() },
            0,
            "root must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return None;
    }
    Some(Unmount(dir.to_path_buf()))
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system under `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
    filler
}

/// Fills the file system under `store`'s `dir` and records runs (`full-0000`, …) with
/// outputs too big for any page left until a batch fails for lack of room and is held back.
/// Returns the filler file (remove it to make room) and how many runs were recorded.
fn fill_until_held(store: &Store, dir: &Path) -> (PathBuf, u64) {
    let filler = fill(dir);
    let big = "x".repeat(64 << 10);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while store.disk_full().is_none() {
        assert!(
            std::time::Instant::now() < until,
            "the full disk was never noticed"
        );
        let mut run = new_run(&format!("full-{n:04}"), n);
        run.variables = json!({ "BIG": big });
        store.insert_run(run);
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    (filler, n)
}

/// A history opened on a full disk: SQLite cannot create its shared-memory file there
/// (for a new file it cannot write at all). With almost no room left, either failure is
/// named as a full disk, with the directory to free space in; how much room the store sees
/// is what the file system says.
#[test]
fn a_store_opened_on_a_full_disk_names_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_unmount) = small_tmpfs(dir.path()) else {
        return;
    };
    assert_eq!(schema::free_bytes(dir.path()), Some(2 << 20));
    assert_eq!(schema::free_bytes(&dir.path().join("missing")), None);
    // Closed cleanly: its `-wal` and `-shm` files are gone.
    let existing = dir.path().join("history.db");
    drop(Store::open(&existing).unwrap());
    assert!(!dir.path().join("history.db-shm").exists());
    let filler = fill(dir.path());
    assert_eq!(schema::free_bytes(dir.path()), Some(0));

    for file in [&existing, &dir.path().join("new.db")] {
        match Store::open(file) {
            Err(StoreError::DiskFull { dir: full, .. }) => assert_eq!(full, dir.path()),
            other => panic!("{} on a full disk: {other:?}", file.display()),
        }
    }
    std::fs::remove_file(&filler).unwrap();
    assert!(Store::open(&existing).is_ok());
}

/// The disk under a SQLite history fills: the store says which directory to free space in
/// (the pool holds new work and the console shows it), keeps the writes, and once there is
/// room writes them and says so no more. Needs a small tmpfs (CI runs as root).
#[test]
fn a_full_disk_is_named_until_there_is_room_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_unmount) = small_tmpfs(dir.path()) else {
        return;
    };
    let store = Store::open(&dir.path().join("history.db")).unwrap();
    store.insert_run(new_run("before", 0));
    store.flush_blocking();
    assert_eq!(store.disk_full(), None);

    let (filler, n) = fill_until_held(&store, dir.path());
    assert_eq!(store.disk_full().as_deref(), Some(dir.path()));

    std::fs::remove_file(&filler).unwrap();
    // Resolves once the held writes are committed (a plain flush does not wait for them).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(store.flush_durable());
    assert_eq!(
        store.disk_full(),
        None,
        "room again, and it still says full"
    );
    for i in 0..n {
        let id = format!("full-{i:04}");
        let run = store.find_run(&id);
        assert!(run.is_ok(), "{id} was held back and then lost: {run:?}");
    }
}

/// The disk fills, and the last store of the process is closed while writes are held back:
/// room came back meanwhile, so the last try on the way out saves them, with no error on the
/// way (before the next periodic try; should that come first, the close has nothing held).
#[test]
fn a_store_closed_while_its_writes_are_held_saves_them_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_unmount) = small_tmpfs(dir.path()) else {
        return;
    };
    let path = dir.path().join("history.db");
    let store = Store::open(&path).unwrap();
    store.insert_run(new_run("before", 0));
    store.flush_blocking();
    let (filler, n) = fill_until_held(&store, dir.path());
    std::fs::remove_file(&filler).unwrap();
    let logged = crate::logging::capture::Captured::start(tracing::Level::WARN);
    drop(store);
    let logged = logged.text();
    assert!(
        !logged.contains("panicked"),
        "closing with the held writes: {logged}"
    );
    let store = Store::open(&path).unwrap();
    for i in 0..n {
        let id = format!("full-{i:04}");
        let run = store.find_run(&id);
        assert!(run.is_ok(), "{id} was held back and then lost: {run:?}");
    }
}

/// `omniflow backup` of a file the store refuses to open (here one a newer omniflow
/// migrated) copies it as it is, without migrating or otherwise writing to it.
#[test]
fn a_file_the_store_refuses_can_still_be_backed_up() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("history.db");
    let store = Store::open(&src).unwrap();
    store.insert_run(new_run("r1", 0));
    store.flush_blocking();
    drop(store);
    rusqlite::Connection::open(&src)
        .unwrap()
        .pragma_update(None, "user_version", 9999)
        .unwrap();
    assert!(matches!(
        Store::open(&src),
        Err(StoreError::NewerSchema { .. })
    ));
    let dest = dir.path().join("copy.db");
    backup_file(&src, &dest).unwrap();
    let copy = rusqlite::Connection::open(&dest).unwrap();
    let version: i64 = copy
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 9999);
    let ids: Vec<String> = copy
        .prepare("SELECT id FROM runner_executions")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, ["r1"]);
}

/// Where the b-tree `name` (a table or an index) of the SQLite file at `path` starts: its
/// root page's offset in the file, and the page size.
fn root_page(path: &std::path::Path, name: &str) -> (usize, usize) {
    let c = rusqlite::Connection::open(path).unwrap();
    let size: i64 = c
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    let root: i64 = c
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .unwrap();
    let size = usize::try_from(size).unwrap();
    (usize::try_from(root - 1).unwrap() * size, size)
}

/// A history file with a damaged page that opening it would not read (an index of sent
/// notifications): the check on open finds it, and the file is refused as damaged, left as
/// it was, before anything writes into it.
#[test]
fn a_damaged_page_the_open_would_not_read_is_found_by_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    {
        let store = Store::open(&path).unwrap();
        store.insert_run(new_run("run-1", 1));
        store.flush_blocking();
    }
    let (at, _) = root_page(&path, "notifications_sent_run");
    let mut bytes = std::fs::read(&path).unwrap();
    // The page's type: no b-tree page has type 0.
    bytes[at] = 0;
    std::fs::write(&path, &bytes).unwrap();
    match Store::open(&path).map(drop) {
        Err(err @ StoreError::Malformed { .. }) => {
            let msg = err.to_string();
            assert!(
                msg.contains("quick_check: ") && msg.contains("is damaged"),
                "{msg}"
            );
        }
        other => panic!("a damaged page was not found on open: {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

/// `doctor`'s deep check finds what the quick one on open does not: an index whose entries
/// no longer match its table's rows (here a row's value changed in place under it).
#[test]
fn the_deep_check_finds_an_index_out_of_step_with_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    {
        let store = Store::open(&path).unwrap();
        store.insert_run(new_run("run-1", 1));
        store.flush_blocking();
        assert_eq!(store.integrity_problems().unwrap(), Vec::<String>::new());
    }
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE probe (x TEXT);
             CREATE INDEX probe_x ON probe (x);
             INSERT INTO probe VALUES ('integrity-probe-aaaa');",
        )
        .unwrap();
    let (at, size) = root_page(&path, "probe");
    let mut bytes = std::fs::read(&path).unwrap();
    let page = &mut bytes[at..at + size];
    let value = b"integrity-probe-aaaa";
    let i = page
        .windows(value.len())
        .position(|w| w == value)
        .expect("the row is on its table's page");
    page[i + value.len() - 1] = b'b';
    std::fs::write(&path, &bytes).unwrap();
    // Every page is still sound: the file opens.
    let store = Store::open(&path).unwrap();
    let problems = store.integrity_problems().unwrap();
    assert!(
        !problems.is_empty() && problems.iter().any(|p| p.contains("probe_x")),
        "{problems:?}"
    );
}
