//! The store's conformance suite: a run's whole life, the original's monitoring queries
//! verbatim, visibility to other connections, paging, lookups, batching, leases and claims,
//! each on both backends (`NAME::sqlite` on a temporary file, `NAME::postgres` on a scratch
//! PostgreSQL database, skipped with a "skipped: no PostgreSQL at …" line when no server
//! answers and `OMNIFLOW_TEST_PG` is unset). Then what only one backend has: SQLite's backup,
//! PostgreSQL's migrations lock, reconnects and use from async code.

mod common;

use omniflow::blueprint::Priority;
use omniflow::error::ErrorKind;
use omniflow::events::{RunStatus, StepStatus};
use omniflow::store::pg::testing::ScratchDb;
use omniflow::store::pg::PgTarget;
use omniflow::store::{
    AttemptRecord, NewRun, NewStep, RunEnd, RunFilter, StepEnd, Store, StoreError,
};
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_795_772_678_000 + ms)
}

fn new_run(id: &str, blueprint: &str, queued_ms: u64) -> NewRun {
    NewRun {
        id: id.into(),
        blueprint_name: blueprint.into(),
        priority: Priority::High,
        trigger: "cli".into(),
        sandbox: true,
        seed: Some(42),
        simulate_failures: 0.3,
        variables: json!({"TOPICS": ["rust", "wasm"]}),
        blueprint: json!({"name": blueprint, "nodes": []}),
        parent_run_id: None,
        queued_at: at(queued_ms),
    }
}

fn run_end(id: &str, status: RunStatus, ms: u64) -> RunEnd {
    let failed = status == RunStatus::Error;
    RunEnd {
        run_id: id.into(),
        status,
        finished_at: at(ms),
        total_time_ms: ms,
        tokens_used: 0,
        steps_done: 0,
        error: failed.then(|| "summarize[1]: server: 500".to_string()),
        error_kind: failed.then_some(ErrorKind::Server),
        failed_step: failed.then(|| "summarize[1]".to_string()),
    }
}

/// Step `key` of run `id` (its node of the same name) ended as `status` after `attempts`,
/// at `finished_ms`, having taken `took_ms`; no output, tokens or model.
fn step_end(
    id: &str,
    key: &str,
    status: StepStatus,
    attempts: u32,
    finished_ms: u64,
    took_ms: u64,
) -> StepEnd {
    StepEnd {
        run_id: id.into(),
        step_key: key.into(),
        node_id: key.into(),
        item_index: None,
        status,
        attempts,
        output: None,
        error_kind: None,
        error: None,
        tokens_used: 0,
        provider: None,
        model: None,
        cached: false,
        reply_model: None,
        finish_reason: None,
        finished_at: at(finished_ms),
        duration_ms: took_ms,
    }
}

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("automation_runner.db")).unwrap();
    (dir, store)
}

/// The database a conformance test runs on, and a way to look at it as another client would.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(Box<ScratchDb>),
}

/// Rows as another client sees them: column names, then every value as text.
type Raw = (Vec<String>, Vec<Vec<Option<String>>>);

impl Db {
    fn sqlite() -> Db {
        Db::Sqlite(tempfile::tempdir().unwrap())
    }

    fn postgres(test: &str) -> Option<Db> {
        ScratchDb::new(test).map(|db| Db::Postgres(Box::new(db)))
    }

    fn open_as(&self, owner: &str) -> Store {
        match self {
            Db::Sqlite(dir) => {
                Store::open_as(&dir.path().join("automation_runner.db"), owner.into()).unwrap()
            }
            Db::Postgres(db) => Store::open_postgres_as(db.target(), owner.into()).unwrap(),
        }
    }

    fn open(&self) -> Store {
        self.open_as(&format!("{}:{}:0", "test-host", std::process::id()))
    }

    /// Runs `sql` verbatim on a connection of its own (`psql` or `sqlite3` would do the same).
    fn raw(&self, sql: &str) -> Raw {
        match self {
            Db::Sqlite(dir) => {
                let c =
                    rusqlite::Connection::open(dir.path().join("automation_runner.db")).unwrap();
                let mut q = c.prepare(sql).unwrap();
                let names: Vec<String> = q.column_names().into_iter().map(String::from).collect();
                let n = names.len();
                let rows = q
                    .query_map([], |r| {
                        (0..n)
                            .map(|i| {
                                Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                                    rusqlite::types::Value::Null => None,
                                    rusqlite::types::Value::Integer(v) => Some(v.to_string()),
                                    rusqlite::types::Value::Real(v) => Some(v.to_string()),
                                    rusqlite::types::Value::Text(v) => Some(v),
                                    rusqlite::types::Value::Blob(_) => Some("<blob>".into()),
                                })
                            })
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .unwrap()
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .unwrap();
                (names, rows)
            }
            Db::Postgres(db) => {
                let mut c = db.target().connect().unwrap();
                let mut names = Vec::new();
                let mut rows = Vec::new();
                for m in c.simple_query(sql).unwrap() {
                    if let postgres::SimpleQueryMessage::Row(r) = m {
                        if names.is_empty() {
                            names = r.columns().iter().map(|c| c.name().to_string()).collect();
                        }
                        rows.push((0..r.len()).map(|i| r.get(i).map(String::from)).collect());
                    }
                }
                (names, rows)
            }
        }
    }
}

/// `NAME::sqlite` and `NAME::postgres`: one test body, both backends.
macro_rules! on_both {
    ($(#[$attr:meta])* fn $name:ident($db:ident, $store:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[allow(unused_variables)]
            fn body($db: &Db, $store: Store) $body

            #[test]
            fn sqlite() {
                let db = Db::sqlite();
                let store = db.open();
                body(&db, store);
            }

            #[test]
            fn postgres() {
                let Some(db) = Db::postgres(stringify!($name)) else {
                    return;
                };
                let store = db.open();
                body(&db, store);
            }
        }
    };
}

fn is_iso_utc(s: &str) -> bool {
    // 2026-11-27T09:44:38.123Z
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && humantime::parse_rfc3339(s).is_ok()
}

/// One run through its whole life: two forEach items (one retried), then success.
fn record_lifecycle(store: &Store, id: &str) {
    store.insert_run(new_run(id, "tech-digest", 0));
    store.run_started(id, at(10), 3);
    for (i, key) in ["summarize[0]", "summarize[1]"].iter().enumerate() {
        store.step_queued(NewStep {
            run_id: id.into(),
            step_key: (*key).into(),
            node_id: "summarize".into(),
            item_index: Some(i as u32),
            input: Some(json!({"item": i})),
            queued_at: at(11),
        });
    }
    let attempt = |key: &str, n: u32, ok: bool, start: u64| AttemptRecord {
        run_id: id.into(),
        step_key: key.into(),
        attempt: n,
        ok,
        error_kind: (!ok).then_some(ErrorKind::ModelLoading),
        error: (!ok).then(|| "model loading, waiting 1s".to_string()),
        wait_ms: (!ok).then_some(1000),
        started_at: at(start),
        finished_at: at(start + 40),
        tokens_used: if ok { 12 } else { 0 },
        provider: Some("huggingface".into()),
        model: Some("mistralai/Mistral-7B-Instruct-v0.2".into()),
        cached: false,
    };
    store.step_started(id, "summarize[0]", 1, at(20));
    store.attempt_finished(attempt("summarize[0]", 1, true, 20));
    store.step_started(id, "summarize[1]", 1, at(20));
    store.attempt_finished(attempt("summarize[1]", 1, false, 20));
    store.step_retrying(id, "summarize[1]");
    store.step_started(id, "summarize[1]", 2, at(1060));
    store.attempt_finished(attempt("summarize[1]", 2, true, 1060));
    for (i, key) in ["summarize[0]", "summarize[1]"].iter().enumerate() {
        store.step_finished(StepEnd {
            node_id: "summarize".into(),
            item_index: Some(i as u32),
            output: Some(json!(format!("summary {i}"))),
            tokens_used: 12,
            provider: Some("huggingface".into()),
            model: Some("mistralai/Mistral-7B-Instruct-v0.2".into()),
            ..step_end(id, key, StepStatus::Success, i as u32 + 1, 1100, 1080)
        });
    }
    store.run_progress(id, 2, 24);
    store.step_finished(step_end(id, "post", StepStatus::Skipped, 0, 1100, 0));
    store.run_finished(RunEnd {
        tokens_used: 24,
        steps_done: 3,
        ..run_end(id, RunStatus::Success, 1200)
    });
}

on_both! {
fn a_runs_whole_life_reads_back(db, store) {
    record_lifecycle(&store, "run-1");
    store.flush_blocking();
    assert_eq!(store.take_write_error(), None);

    let run = store.find_run("run-1").unwrap();
    assert_eq!(run.status, RunStatus::Success);
    assert_eq!(run.blueprint_name, "tech-digest");
    assert_eq!(run.priority, Priority::High);
    assert!(run.sandbox);
    assert_eq!(run.seed, Some(42));
    assert_eq!(run.simulate_failures, 0.3);
    assert_eq!(run.variables, json!({"TOPICS": ["rust", "wasm"]}));
    assert_eq!(
        run.blueprint,
        Some(json!({"name": "tech-digest", "nodes": []}))
    );
    assert_eq!((run.steps_total, run.steps_done), (Some(3), Some(3)));
    assert_eq!((run.total_time_ms, run.tokens_used), (Some(1200), 24));
    assert_eq!(run.queued_at, at(0));
    assert_eq!(run.started_at, Some(at(10)));
    assert_eq!(run.finished_at, Some(at(1200)));
    // `--json` output shows times as ISO-8601 UTC with milliseconds, as it always has.
    let shown = serde_json::to_value(&run).unwrap();
    assert_eq!(shown["queued_at"], "2026-11-27T09:44:38.000Z");
    assert_eq!(shown["started_at"], "2026-11-27T09:44:38.010Z");
    assert_eq!(shown["finished_at"], "2026-11-27T09:44:39.200Z");
    for t in [&shown["queued_at"], &shown["started_at"]] {
        assert!(is_iso_utc(t.as_str().unwrap()), "{t}");
    }
    assert_eq!(store.list_runs(&RunFilter::default()).unwrap(), vec![run]);

    let steps = store.run_steps("run-1").unwrap();
    let keys: Vec<_> = steps.iter().map(|s| s.step_key.as_str()).collect();
    assert_eq!(keys, ["summarize[0]", "summarize[1]", "post"]);
    let s1 = &steps[1];
    assert_eq!(s1.status, StepStatus::Success);
    assert_eq!((s1.attempts, s1.item_index), (2, Some(1)));
    assert_eq!(s1.started_at, Some(at(20)), "first attempt's start");
    assert_eq!(s1.output, Some(json!("summary 1")));
    assert_eq!(s1.input, Some(json!({"item": 1})));
    assert_eq!(
        s1.model.as_deref(),
        Some("mistralai/Mistral-7B-Instruct-v0.2")
    );
    assert_eq!(s1.finished_at, Some(at(1100)));
    assert_eq!(steps[2].status, StepStatus::Skipped);

    let attempts = store.run_attempts("run-1").unwrap();
    let order: Vec<_> = attempts
        .iter()
        .map(|a| (a.step_key.as_str(), a.attempt, a.ok))
        .collect();
    assert_eq!(
        order,
        [
            ("summarize[0]", 1, true),
            ("summarize[1]", 1, false),
            ("summarize[1]", 2, true)
        ]
    );
    let failed = &attempts[1];
    assert_eq!(failed.error_kind.map(|k| k.as_str()), Some("model_loading"));
    assert_eq!((failed.wait_ms, failed.duration_ms), (Some(1000), 40));
    assert_eq!((failed.started_at, failed.finished_at), (at(20), at(60)));
    assert_eq!(attempts[2].wait_ms, None);
}
}

on_both! {
fn a_step_that_ran_without_a_recorded_start_gets_one_from_its_duration(db, store) {
    store.insert_run(new_run("r", "alpha", 0));
    let end = |key: &str, status, attempts, finished, took| {
        step_end("r", key, status, attempts, finished, took)
    };
    // Finished with no row before it, and queued then finished in one go: both ran, so
    // `show` gives them a start (the end less the time they took) rather than none.
    store.step_finished(end("alone", StepStatus::Success, 1, 1000, 300));
    store.step_queued(NewStep {
        run_id: "r".into(),
        step_key: "queued".into(),
        node_id: "queued".into(),
        item_index: None,
        input: None,
        queued_at: at(100),
    });
    store.step_finished(end("queued", StepStatus::Error, 2, 2000, 500));
    // Never ran: skipped, or failed before a first attempt (a dependency failed).
    store.step_finished(end("skipped", StepStatus::Skipped, 0, 3000, 0));
    store.step_finished(end("never-ran", StepStatus::Error, 0, 3000, 0));
    store.flush_blocking();
    assert_eq!(store.take_write_error(), None);
    let starts: Vec<_> = store
        .run_steps("r")
        .unwrap()
        .into_iter()
        .map(|s| (s.step_key, s.started_at))
        .collect();
    assert_eq!(
        starts,
        [
            ("alone".to_string(), Some(at(700))),
            ("queued".to_string(), Some(at(1500))),
            ("skipped".to_string(), None),
            ("never-ran".to_string(), None),
        ]
    );
}
}

on_both! {
fn the_original_monitoring_queries_work_verbatim(db, store) {
    store.insert_run(new_run("a", "alpha", 0));
    store.run_started("a", at(100), 1);
    store.run_finished(run_end("a", RunStatus::Success, 300));
    store.insert_run(new_run("b", "beta", 50));
    store.run_started("b", at(200), 1);
    store.run_finished(run_end("b", RunStatus::Error, 400));
    store.insert_run(new_run("c", "gamma", 500)); // still queued: sorts by its queue time
    store.flush_blocking();

    let (_, rows) = db.raw(
        "SELECT blueprint_name, status, total_time_ms FROM runner_executions ORDER BY started_at DESC LIMIT 10;",
    );
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        rows,
        [
            vec![s("gamma"), s("queued"), None],
            vec![s("beta"), s("error"), s("400")],
            vec![s("alpha"), s("success"), s("300")],
        ]
    );

    for query in [
        "SELECT * FROM runner_executions WHERE status='error';",
        "SELECT * FROM runner_executions WHERE status = 'error';",
    ] {
        let (names, rows) = db.raw(query);
        let col = |name: &str| names.iter().position(|n| n == name).unwrap();
        assert_eq!(rows.len(), 1, "{query}");
        assert_eq!(rows[0][col("id")], s("b"));
        assert_eq!(rows[0][col("error")], s("summarize[1]: server: 500"));
        for c in [
            "id",
            "blueprint_name",
            "status",
            "total_time_ms",
            "started_at",
            "finished_at",
            "error",
        ] {
            assert!(names.iter().any(|n| n == c), "missing {c}");
        }
    }
}
}

on_both! {
fn another_connection_sees_a_run_in_progress(db, store) {
    store.insert_run(new_run("live", "alpha", 0));
    store.run_started("live", at(5), 4);
    store.run_progress("live", 1, 10);
    store.flush_blocking();
    let (_, rows) = db.raw("SELECT status, steps_done FROM runner_executions WHERE id = 'live'");
    assert_eq!(rows, [vec![Some("running".to_string()), Some("1".to_string())]]);
    store.run_finished(run_end("live", RunStatus::Success, 50));
    store.flush_blocking();
    assert_eq!(store.find_run("live").unwrap().status, RunStatus::Success);
}
}

on_both! {
fn keyset_paging_returns_every_run_once_newest_first(db, store) {
    let total = 1_200u64;
    for i in 0..total {
        let id = format!("run-{i:05}");
        let bp = if i % 3 == 0 { "alpha" } else { "beta" };
        // Groups of four share a timestamp: ties are broken by id.
        store.insert_run(new_run(&id, bp, i / 4));
        if i % 5 == 0 {
            store.run_finished(run_end(&id, RunStatus::Error, i));
        }
    }
    store.flush_blocking();

    let page_all = |f: RunFilter| {
        let mut f = RunFilter { limit: 97, ..f };
        let mut seen = Vec::new();
        loop {
            let page = store.list_runs(&f).unwrap();
            let Some(last) = page.last() else { break };
            f.before = RunFilter::cursor_after(last);
            seen.extend(
                page.into_iter()
                    .map(|r| (r.started_at.unwrap(), r.id, r.status, r.blueprint_name)),
            );
        }
        seen
    };

    let all = page_all(RunFilter::default());
    assert_eq!(all.len() as u64, total);
    let unique: HashSet<_> = all.iter().map(|r| r.1.clone()).collect();
    assert_eq!(unique.len() as u64, total);
    let keys: Vec<_> = all.iter().map(|r| (r.0, r.1.clone())).collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(keys, sorted, "newest first, then id descending");
    assert_eq!(all[0].1, "run-01199");

    let errors = page_all(RunFilter {
        status: Some(RunStatus::Error),
        ..RunFilter::default()
    });
    assert_eq!(errors.len(), 240);
    assert!(errors.iter().all(|r| r.2 == RunStatus::Error));

    let alpha_errors = RunFilter {
        status: Some(RunStatus::Error),
        blueprint: Some("alpha".into()),
        ..RunFilter::default()
    };
    let got = page_all(alpha_errors.clone());
    assert_eq!(got.len(), 80, "i % 15 == 0");
    assert!(got
        .iter()
        .all(|r| r.3 == "alpha" && r.2 == RunStatus::Error));

    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), total);
    assert_eq!(store.count_runs(&alpha_errors).unwrap(), 80);
    let oldest = store.find_run(&all.last().unwrap().1).unwrap();
    let beta = RunFilter {
        blueprint: Some("beta".into()),
        limit: 1,
        before: RunFilter::cursor_after(&oldest),
        ..RunFilter::default()
    };
    assert_eq!(
        store.count_runs(&beta).unwrap(),
        800,
        "limit and cursor are ignored"
    );
    assert!(
        store.list_runs(&beta).unwrap().is_empty(),
        "nothing is older than the cursor"
    );
    assert!(store
        .list_runs(&RunFilter {
            limit: 0,
            ..RunFilter::default()
        })
        .unwrap()
        .is_empty());
}
}

on_both! {
fn runs_are_found_by_id_or_unique_prefix(db, store) {
    for id in ["abc123", "abc124", "abd999", "abc", "x*y", "xzy"] {
        store.insert_run(new_run(id, "alpha", 0));
    }
    store.flush_blocking();
    assert_eq!(
        store.find_run("abc").unwrap().id,
        "abc",
        "an exact id wins over prefixes"
    );
    assert_eq!(store.find_run("abd").unwrap().id, "abd999");
    assert_eq!(
        store.find_run("x*").unwrap().id,
        "x*y",
        "glob characters match literally"
    );

    match store.find_run("ab") {
        Err(e @ StoreError::Ambiguous { .. }) => {
            let StoreError::Ambiguous { ref ids, .. } = e else {
                unreachable!()
            };
            assert_eq!(ids, &["abc", "abc123", "abc124", "abd999"]);
            assert!(e.to_string().contains("abc123, abc124"), "{e}");
        }
        other => panic!("expected ambiguous, got {other:?}"),
    }
    let err = store.find_run("zzz").unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)));
    assert_eq!(err.to_string(), "no run with id zzz — see `omniflow runs`");
    assert!(matches!(store.find_run(""), Err(StoreError::NotFound(_))));

    for i in 0..8 {
        store.insert_run(new_run(&format!("many-{i}"), "alpha", 0));
    }
    store.flush_blocking();
    let Err(StoreError::Ambiguous { ids, .. }) = store.find_run("many") else {
        panic!("ambiguous expected")
    };
    assert_eq!(ids.len(), 5, "at most five ids are listed");
}
}

#[test]
fn a_backup_taken_while_writing_opens_and_holds_the_runs() {
    let (dir, store) = temp_store();
    for i in 0..300 {
        store.insert_run(new_run(&format!("r{i:04}"), "alpha", i));
    }
    store.flush_blocking();
    // Keep the writer busy while the backup copies.
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 300..3_000 {
                store.insert_run(new_run(&format!("r{i:04}"), "beta", i));
            }
            store.flush_blocking();
        })
    };
    let dest = dir.path().join("backups/copy.db");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    store.backup(&dest).unwrap();
    writer.join().unwrap();
    assert!(!dir.path().join("backups/copy.db.partial").exists());

    let copy = Store::open(&dest).unwrap();
    let n = copy.count_runs(&RunFilter::default()).unwrap();
    assert!((300..=3_000).contains(&n), "{n}");
    let alpha = RunFilter {
        blueprint: Some("alpha".into()),
        ..RunFilter::default()
    };
    assert_eq!(
        copy.count_runs(&alpha).unwrap(),
        300,
        "everything committed before is in"
    );
    // The copy is a snapshot: ids are contiguous from the start.
    let last = copy
        .list_runs(&RunFilter {
            limit: 1,
            ..RunFilter::default()
        })
        .unwrap();
    assert_eq!(last[0].id, format!("r{:04}", n - 1));

    // A second backup after a flush holds everything, and replaces the first.
    store.flush_blocking();
    drop(copy);
    store.backup(&dest).unwrap();
    let copy = Store::open(&dest).unwrap();
    assert_eq!(copy.count_runs(&RunFilter::default()).unwrap(), 3_000);

    let err = store.backup(store.path().unwrap()).unwrap_err();
    assert!(matches!(err, StoreError::Backup { .. }), "{err:?}");
    let err = store
        .backup(&dir.path().join("missing-dir/x.db"))
        .unwrap_err();
    assert!(err.to_string().contains("cannot back up"), "{err}");
}

on_both! {
fn ten_thousand_writes_then_flush_are_all_there(db, store) {
    let batches = || omniflow::telemetry::get().store_batch_seconds.count();
    let batches_before = batches();
    store.insert_run(new_run("big", "alpha", 0));
    store.run_started("big", at(1), 3_333);
    let mut writes = 2;
    let mut i = 0u32;
    while writes < 10_000 {
        let key = format!("fan[{i}]");
        store.step_queued(NewStep {
            run_id: "big".into(),
            step_key: key.clone(),
            node_id: "fan".into(),
            item_index: Some(i),
            input: None,
            queued_at: at(2),
        });
        store.step_started("big", &key, 1, at(3));
        store.step_finished(StepEnd {
            run_id: "big".into(),
            step_key: key,
            node_id: "fan".into(),
            item_index: Some(i),
            status: StepStatus::Success,
            attempts: 1,
            output: Some(json!(i)),
            error_kind: None,
            error: None,
            tokens_used: 1,
            provider: None,
            model: None,
            cached: true,
            reply_model: None,
            finish_reason: None,
            finished_at: at(4),
            duration_ms: 1,
        });
        writes += 3;
        i += 1;
    }
    let started = std::time::Instant::now();
    store.flush_blocking();
    let took = started.elapsed();
    let steps = store.run_steps("big").unwrap();
    assert_eq!(steps.len(), i as usize);
    assert!(steps
        .iter()
        .all(|s| s.status == StepStatus::Success && s.cached));
    assert!(
        steps
            .iter()
            .enumerate()
            .all(|(n, s)| s.item_index == Some(n as u32)),
        "seq keeps insertion order"
    );
    assert_eq!(store.take_write_error(), None);
    // Writes queued together go in one transaction each batch, not one each: a commit waits
    // for the disk, and 10,000 of them would leave the history minutes behind the runs.
    // (The metric is the process's, so other tests' batches count too; they are few.)
    let committed_in = batches() - batches_before;
    assert!(
        committed_in < 2_000,
        "{writes} writes took {committed_in} batches"
    );
    eprintln!("{writes} writes committed in {took:?}, {committed_in} batches");
}
}

/// Many processes (played here by threads with their own connections) creating one new
/// database at the same moment: every open succeeds and every run each writes is there.
#[test]
fn many_openers_of_a_new_database_all_succeed() {
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh").join("h.db");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(12));
        let threads: Vec<_> = (0..12)
            .map(|i| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let store = Store::open_as(&path, format!("test:{i}:0"))
                        .map_err(|e| format!("open failed: {e}"))?;
                    store.insert_run(new_run(&format!("r{round}-{i}"), "race", i));
                    store.flush_blocking();
                    match store.take_write_error() {
                        Some(e) => Err(format!("write failed: {e}")),
                        None => Ok(()),
                    }
                })
            })
            .collect();
        for t in threads {
            if let Err(e) = t.join().unwrap() {
                panic!("round {round}: an opener failed: {e}");
            }
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.count_runs(&RunFilter::default()).unwrap(),
            12,
            "round {round}"
        );
    }
}

// ---- leases, claims and the provider cache, on both backends ------------------------------

fn health(role: &str) -> omniflow::store::Health {
    omniflow::store::Health {
        role: role.into(),
        at: SystemTime::now(),
        rss_mb: Some(42.0),
        pool: omniflow::events::PoolStats {
            concurrency: 40,
            ..Default::default()
        },
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

on_both! {
fn a_run_whose_owner_went_silent_past_its_lease_is_orphaned(db, store) {
    use omniflow::store::Claim;
    // An owner on another host: only its heartbeats say whether it lives.
    let a = db.open_as("host-a:101:0");
    a.heartbeat(health("daemon"));
    a.insert_run(new_run("r1", "alpha", 0));
    a.flush_blocking();
    assert_eq!(
        block_on(a.claim_run("r1", Duration::from_secs(60), 3)).unwrap(),
        Claim::Mine
    );
    assert!(
        store.orphaned_runs(Duration::from_secs(60)).unwrap().is_empty(),
        "its heartbeat is within a minute's lease"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        store.orphaned_runs(Duration::from_millis(10)).unwrap(),
        ["r1"],
        "silent for longer than a 10 ms lease"
    );
}
}

on_both! {
fn a_run_belongs_to_its_live_owner_and_moves_on_when_it_stops(db, store) {
    use omniflow::store::Claim;
    let lease = Duration::from_secs(60);
    // Owners on another host: only their heartbeats (the lease) say whether they live.
    let a = db.open_as("host-a:101:0");
    let b = db.open_as("host-b:202:0");
    a.heartbeat(health("daemon"));
    b.heartbeat(health("console"));
    a.insert_run(new_run("r1", "alpha", 0));
    a.flush_blocking();
    b.flush_blocking();

    match block_on(b.claim_run("r1", lease, 3)).unwrap() {
        Claim::Live { owner, role, expires_in } => {
            assert_eq!(owner, "host-a:101:0");
            assert_eq!(role.as_deref(), Some("daemon"));
            assert!(expires_in <= lease);
        }
        other => panic!("expected a live owner, got {other:?}"),
    }
    assert_eq!(block_on(a.claim_run("r1", lease, 3)).unwrap(), Claim::Mine);
    assert!(b.orphaned_runs(lease).unwrap().is_empty());

    a.process_stopped();
    a.flush_blocking();
    // A heartbeat that lands after the stop (on PostgreSQL one also goes at once on a
    // reader's connection, and may arrive late) does not bring the process back.
    a.heartbeat(health("daemon"));
    a.flush_blocking();
    assert_eq!(b.orphaned_runs(lease).unwrap(), ["r1"]);
    assert_eq!(
        block_on(b.claim_run("r1", lease, 3)).unwrap(),
        Claim::Claimed { takeovers: 1 }
    );
    match block_on(a.claim_run("r1", lease, 3)).unwrap() {
        Claim::Live { owner, role, .. } => {
            assert_eq!((owner.as_str(), role.as_deref()), ("host-b:202:0", Some("console")));
        }
        other => panic!("expected b to hold it, got {other:?}"),
    }
    assert_eq!(block_on(b.claim_run("nope", lease, 3)).unwrap(), Claim::NotFound);
    // The process that lost the run learns it (and stops driving it); its new owner is told
    // nothing of the kind.
    assert_eq!(
        a.runs_taken_over(vec!["r1".into(), "nope".into()]).unwrap(),
        [("r1".to_string(), "host-b:202:0".to_string())]
    );
    assert!(b.runs_taken_over(vec!["r1".into()]).unwrap().is_empty());

    let procs = b.processes(lease).unwrap();
    let state = |id: &str| procs.iter().find(|p| p.id == id).map(|p| p.state());
    assert_eq!(state("host-a:101:0"), Some("stopped"));
    assert_eq!(state("host-b:202:0"), Some("alive"));
    let pa = procs.iter().find(|p| p.id == "host-a:101:0").unwrap();
    assert_eq!((pa.role.as_str(), pa.concurrency, pa.rss_mb), ("daemon", Some(40), Some(42.0)));
    assert!(pa.stopped_at.is_some_and(|s| s >= pa.started_at));

    // A silent owner loses its runs once its lease runs out.
    b.insert_run(new_run("r2", "alpha", 1));
    b.flush_blocking();
    std::thread::sleep(Duration::from_millis(300));
    let short = Duration::from_millis(100);
    // `MAX_TAKEOVERS` is how many takeovers a run may have: with one allowed, the first is
    // claimed, and the second (below) fails the run.
    assert_eq!(
        block_on(a.claim_run("r2", short, 1)).unwrap(),
        Claim::Claimed { takeovers: 1 }
    );

    // A run whose owners keep dying is failed instead of claimed again.
    b.heartbeat(health("daemon"));
    b.flush_blocking();
    std::thread::sleep(Duration::from_millis(300));
    // Silent for longer than the lease: gone, though it never said it stopped.
    let b_state = |lease| {
        let procs = a.processes(lease).unwrap();
        procs.iter().find(|p| p.id == "host-b:202:0").map(|p| p.state())
    };
    assert_eq!(b_state(short), Some("gone"));
    assert_eq!(b_state(lease), Some("alive"));
    assert_eq!(
        block_on(b.claim_run("r2", short, 1)).unwrap(),
        Claim::Exhausted { takeovers: 2 }
    );
    let r2 = store.find_run("r2").unwrap();
    assert_eq!(r2.status, RunStatus::Error);
    assert_eq!(r2.error_kind.map(|k| k.as_str()), Some("interrupted"));
    assert_eq!(block_on(b.claim_run("r2", short, 1)).unwrap(), Claim::Finished);
}
}

on_both! {
/// Which host and process wrote a run, and claimed a slot, is in the history for whoever
/// looks (`omniflow show`, or SQL when several hosts share one database).
fn runs_and_slots_name_the_host_and_process_that_wrote_them(db, store) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let pid = std::process::id().to_string();
    store.insert_run(new_run("hosted", "alpha", 0));
    store.flush_blocking();
    let (_, rows) = db.raw("SELECT host, pid FROM runner_executions WHERE id = 'hosted'");
    assert_eq!(rows, [[Some(host.clone()), Some(pid.clone())]]);
    store.run_started("hosted", at(1), 1);
    store.flush_blocking();
    let (_, rows) = db.raw("SELECT host, pid FROM runner_executions WHERE id = 'hosted'");
    assert_eq!(rows, [[Some(host.clone()), Some(pid.clone())]]);
    let slot = UNIX_EPOCH + Duration::from_secs(1_795_773_600);
    assert!(store.claim_slot("hourly", slot).unwrap());
    let (_, rows) = db.raw("SELECT host, pid FROM schedule_slots WHERE blueprint_name = 'hourly'");
    assert_eq!(rows, [[Some(host), Some(pid)]]);
}
}

on_both! {
fn a_schedule_slot_fires_once_among_processes_and_a_message_is_sent_once(db, store) {
    use omniflow::store::NotificationRecord;
    let slot = UNIX_EPOCH + Duration::from_secs(1_795_773_600);
    let stores: Vec<Store> = (0..3).map(|i| db.open_as(&format!("host-{i}:{i}:0"))).collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
    let wins: usize = std::thread::scope(|s| {
        let handles: Vec<_> = stores
            .iter()
            .map(|st| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    usize::from(st.claim_slot("nightly", slot).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(wins, 1, "exactly one process fires the slot");
    assert!(!store.claim_slot("nightly", slot).unwrap());
    store.slot_run("nightly", slot, "run-9").unwrap();
    assert_eq!(store.last_slot("nightly").unwrap(), Some(slot));
    assert_eq!(store.last_slot("other").unwrap(), None);
    let slots = store.slots_of("nightly").unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!((slots[0].slot, slots[0].run_id.as_deref()), (slot, Some("run-9")));

    store.insert_run(new_run("first", "alpha", 0));
    store.insert_run(NewRun {
        parent_run_id: Some("first".into()),
        ..new_run("retry", "alpha", 1)
    });
    store.flush_blocking();
    assert_eq!(store.root_run_id("retry").unwrap(), "first");
    assert_eq!(store.root_run_id("unknown").unwrap(), "unknown");

    assert_eq!(store.notification_sent("k1").unwrap(), None);
    for (key, part) in [("k1", 1), ("k2", 2), ("k1", 1)] {
        store
            .record_notification(&NotificationRecord {
                dedupe_key: key.into(),
                run_id: "first".into(),
                step_key: "post".into(),
                channel: "telegram".into(),
                part,
                message_ids: json!([part]),
            })
            .unwrap();
    }
    assert_eq!(store.notification_sent("k1").unwrap(), Some(json!([1])));
    assert_eq!(
        store.notifications_of("first").unwrap(),
        [
            ("post".to_string(), "telegram".to_string(), 1),
            ("post".to_string(), "telegram".to_string(), 2)
        ]
    );
}
}

on_both! {
/// A message part is sent at most once: its intent is recorded before it is sent, and a
/// second attempt finds it and does not send it; a part the service refused has its intent
/// removed and is sent by the next attempt; a part recorded as sent stays so.
fn a_message_part_s_intent_is_recorded_once_and_cleared_only_until_it_is_sent(db, store) {
    use omniflow::store::{NotificationRecord, PartState};
    let part = |key: &str| NotificationRecord {
        dedupe_key: key.into(),
        run_id: "run".into(),
        step_key: "post".into(),
        channel: "telegram".into(),
        part: 1,
        message_ids: json!([7]),
    };
    assert!(store.record_notification_intent(&part("k1")).unwrap(), "first intent");
    assert_eq!(store.notification_part("k1").unwrap(), Some(PartState::Sending));
    // Another attempt (another process) must not send it again.
    let other = db.open_as("host-b:202:0");
    assert!(!other.record_notification_intent(&part("k1")).unwrap());
    // The service refused it: the next attempt sends it.
    store.clear_notification_intent("k1").unwrap();
    assert_eq!(store.notification_part("k1").unwrap(), None);
    assert!(other.record_notification_intent(&part("k1")).unwrap());
    other.record_notification(&part("k1")).unwrap();
    // A clear that comes after the part was sent leaves it sent.
    store.clear_notification_intent("k1").unwrap();
    assert_eq!(
        store.notification_part("k1").unwrap(),
        Some(PartState::Sent(json!([7])))
    );
    assert!(!store.record_notification_intent(&part("k1")).unwrap());
    // Other parts are their own.
    assert!(store.record_notification_intent(&part("k2")).unwrap());
}
}

on_both! {
/// What a console reads and asks of the fleet: runs by id (the ones announced as changed),
/// the attempts running on every host, and requests to a run's driver. On an SQLite file
/// there is no fleet: nothing runs elsewhere, and nobody can be asked.
fn a_console_reads_runs_and_running_steps_and_asks_a_run_s_driver(db, store) {
    use omniflow::store::pg::fleet_view::{Request, Requested, RunningAttempt};
    store.insert_run(new_run("r1", "alpha", 0));
    store.insert_run(new_run("r2", "alpha", 1));
    store.insert_run(new_run("done", "alpha", 2));
    store.run_finished(run_end("done", RunStatus::Success, 5));
    store.flush_blocking();
    let mut found: Vec<String> = store
        .runs_by_id(vec!["r2".into(), "nope".into(), "done".into()])
        .unwrap()
        .into_iter()
        .map(|r| format!("{} {:?}", r.id, r.status))
        .collect();
    found.sort();
    assert_eq!(found, ["done Success", "r2 Queued"]);
    assert!(store.runs_by_id(Vec::new()).unwrap().is_empty());
    let Db::Postgres(pg) = db else {
        assert!(store.running_attempts().unwrap().is_empty());
        assert_eq!(store.request("r1", Request::Cancel).unwrap(), Requested::NotShared);
        return;
    };
    // A step claimed by another host of the fleet, and one still queued.
    let q = omniflow::store::pg::queue::Queue::new(pg.target(), 1).unwrap();
    let job = |step: &str| omniflow::store::pg::queue::NewJob {
        run_id: "r1".into(),
        step_key: step.into(),
        attempt: 2,
        priority: 1,
        tags: Vec::new(),
        payload: json!({}),
    };
    q.enqueue(&[job("running")]).unwrap();
    q.claim("host-b:202:0", &[], 1, Duration::from_secs(30)).unwrap();
    q.enqueue(&[job("waiting")]).unwrap();
    let running = store.running_attempts().unwrap();
    assert_eq!(running.len(), 1, "{running:?}");
    assert!(running[0].claimed_at.is_some());
    assert_eq!(
        running[0],
        RunningAttempt {
            worker: "host-b:202:0".into(),
            run_id: "r1".into(),
            step_key: "running".into(),
            attempt: 2,
            claimed_at: running[0].claimed_at,
        }
    );
    assert_eq!(
        store.request("r1", Request::Priority(Priority::Low)).unwrap(),
        Requested::Sent { owner: Some(format!("test-host:{}:0", std::process::id())) }
    );
    assert_eq!(store.find_run("r1").unwrap().priority, Priority::Low);
    assert_eq!(store.request("done", Request::Cancel).unwrap(), Requested::NotActive);
    assert_eq!(store.request("nope", Request::Cancel).unwrap(), Requested::NotActive);
    // A queue this build cannot read is an error to report, not an idle fleet.
    db.raw("ALTER TABLE runner_queue RENAME COLUMN locked_by TO held_by");
    let err = store.running_attempts().unwrap_err().to_string();
    assert!(err.contains("held_by") || err.contains("locked_by"), "{err}");
    // No queue yet (no process of the fleet has created it): nothing runs.
    db.raw("DROP TABLE runner_queue");
    assert!(store.running_attempts().unwrap().is_empty());
}
}

on_both! {
fn cached_answers_expire_and_fallbacks_are_kept_per_attempt(db, store) {
    use omniflow::store::CachedAnswer;
    let t0 = at(0);
    store.cache_put(CachedAnswer {
        key: "k".into(),
        provider: "ollama".into(),
        model: "llama3".into(),
        output: "hello".into(),
        tokens_used: 5,
        created_at: t0,
        expires_at: t0 + Duration::from_secs(60),
    });
    record_lifecycle(&store, "run-1");
    store.attempt_fallback("run-1", "summarize[1]", 2, "huggingface: rate limited");
    store.attempt_fallback("run-1", "nope", 1, "ignored: no such attempt");
    store.flush_blocking();
    let hit = store.cache_get("k", t0 + Duration::from_secs(1)).unwrap().unwrap();
    assert_eq!((hit.output.as_str(), hit.tokens_used), ("hello", 5));
    assert_eq!((hit.created_at, hit.expires_at), (t0, t0 + Duration::from_secs(60)));
    assert_eq!(store.cache_get("k", t0 + Duration::from_secs(61)).unwrap(), None);
    assert_eq!(store.cache_get("other", t0).unwrap(), None);
    assert_eq!(
        store.run_fallbacks("run-1").unwrap(),
        [("summarize[1]".to_string(), 2, "huggingface: rate limited".to_string())]
    );
    assert!(store.schema_version().unwrap() >= 1);
    assert_eq!(store.take_write_error(), None, "guarded no-ops are not errors");
}
}

// ---- from async code: never "Cannot start a runtime from within a runtime" ------------------

async fn reads_and_writes_from_async_code(store: Store) {
    store.heartbeat(health("console"));
    store.insert_run(new_run("async-1", "alpha", 0));
    store.run_started("async-1", at(1), 1);
    store.flush().await;
    // Blocking reads, called straight from a task (as careless code would).
    assert_eq!(
        store.find_run("async-1").unwrap().status,
        RunStatus::Running
    );
    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), 1);
    assert!(store.claim_slot("bp", at(0)).unwrap());
    assert_eq!(
        store
            .claim_run("async-1", Duration::from_secs(60), 3)
            .await
            .unwrap(),
        omniflow::store::Claim::Mine
    );
    store.run_finished(run_end("async-1", RunStatus::Success, 5));
    store.flush_durable().await;
    let s = store.clone();
    let status = tokio::task::spawn_blocking(move || s.find_run("async-1").unwrap().status)
        .await
        .unwrap();
    assert_eq!(status, RunStatus::Success);
    // The last clone dropped on the runtime: the writer finishes on its own thread.
    drop(store);
}

#[tokio::test(flavor = "current_thread")]
async fn postgres_from_a_current_thread_runtime() {
    let Some(db) = ScratchDb::new("async_current_thread") else {
        return;
    };
    // Opening connects on a thread of the store's, not on this runtime.
    let store = Store::open_postgres(db.target()).unwrap();
    reads_and_writes_from_async_code(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_from_a_multi_thread_runtime() {
    let Some(db) = ScratchDb::new("async_multi_thread") else {
        return;
    };
    let store = Store::open_postgres(db.target()).unwrap();
    reads_and_writes_from_async_code(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_a_multi_thread_runtime() {
    let (_dir, store) = temp_store();
    reads_and_writes_from_async_code(store).await;
}

// ---- what only PostgreSQL has ----------------------------------------------------------------

/// Ends every other session on the scratch database, as a server restart or an operator's
/// `pg_terminate_backend` would.
fn terminate_sessions(db: &ScratchDb) -> u64 {
    let mut c = db.target().connect().unwrap();
    let rows = c
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db.name()],
        )
        .unwrap();
    rows.len() as u64
}

#[test]
fn a_dropped_connection_is_reconnected_and_no_write_is_lost() {
    let Some(db) = ScratchDb::new("reconnect") else {
        return;
    };
    let store = Store::open_postgres(db.target()).unwrap();
    for i in 0..100 {
        store.insert_run(new_run(&format!("a{i:04}"), "alpha", i));
    }
    store.flush_blocking();
    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), 100);
    assert!(
        terminate_sessions(&db) >= 1,
        "the writer's session was ended"
    );
    // Writes and reads after the cut go through new connections.
    for i in 0..100 {
        store.insert_run(new_run(&format!("b{i:04}"), "beta", i));
    }
    store.flush_blocking();
    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), 200);

    // Cut while a stream of writes is in flight, several times.
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..3_000u64 {
                store.insert_run(new_run(&format!("c{i:05}"), "gamma", i));
                if i % 500 == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            store.flush_blocking();
        })
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(30));
        terminate_sessions(&db);
    }
    writer.join().unwrap();
    store.flush_blocking();
    let gamma = RunFilter {
        blueprint: Some("gamma".into()),
        ..RunFilter::default()
    };
    assert_eq!(
        store.count_runs(&gamma).unwrap(),
        3_000,
        "nothing lost ({:?})",
        store.take_write_error()
    );
    assert_eq!(store.take_write_error(), None);
    assert_eq!(store.write_problem(), None);
}

/// The network goes away right after the server committed a batch of history, before the
/// writer heard so, and stays away longer than the writer keeps reconnecting: the writer holds
/// that batch back, and the writes that come in meanwhile after it. When the server is back
/// the writer finds the batch committed and does not apply it again, but every write held
/// after it is saved: nothing is lost, nothing is there twice.
#[test]
fn writes_held_through_an_outage_after_a_lost_commit_reply_are_all_saved() {
    let Some(db) = ScratchDb::new("held_after_lost_commit") else {
        return;
    };
    // The run's id is sent with its first write: the cut is of the batch that holds it.
    let proxy = common::pgcut::start_then_down(&common::pgcut::upstream(db.url()), "held-first");
    let url = proxy.url_for(db.url());
    let store = Store::open_postgres(&PgTarget::parse(&url).unwrap()).unwrap();

    record_lifecycle(&store, "held-first");
    // Answered once the writer has stopped reconnecting and holds the writes back.
    store.flush_blocking();
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        store.write_problem().is_some(),
        "the outage is reported while it lasts"
    );
    assert!(store.take_write_error().is_some());

    // Still away: these join the held writes, after the batch whose commit went unheard.
    record_lifecycle(&store, "held-second");
    store.flush_blocking();
    assert!(store.write_problem().is_some());

    proxy.reachable_again();
    block_on(store.flush_durable());
    assert_eq!(store.write_problem(), None);
    assert_eq!(store.take_write_error(), None, "nothing failed once back");
    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), 2);
    for id in ["held-first", "held-second"] {
        let run = store.find_run(id).unwrap();
        assert_eq!(run.status, RunStatus::Success, "{id}");
        let steps = store.run_steps(id).unwrap();
        assert_eq!(steps.len(), 3, "{id}: {steps:?}");
        assert_eq!(store.run_attempts(id).unwrap().len(), 3, "{id}");
    }
    // Once each, as another client of the database sees it.
    let mut c = db.target().connect().unwrap();
    for (table, rows) in [
        ("runner_executions", 2),
        ("runner_steps", 6),
        ("runner_attempts", 6),
    ] {
        assert_eq!(row_count(&mut c, table), rows, "{table}");
    }
}

/// A batch's commit goes unheard in an outage, and by the time the server is back the writer's
/// bookkeeping table (`runner_writer_batches`, where it looks the batch up) has been dropped by
/// hand: the writer cannot tell whether the batch landed. It applies it again, the writes fail
/// and are reported with the missing table named, and a flush returns: the writer does not ask
/// again for ever.
#[test]
fn a_writer_that_cannot_tell_whether_a_batch_landed_reports_instead_of_asking_for_ever() {
    let Some(db) = ScratchDb::new("unsure_without_table") else {
        return;
    };
    let proxy = common::pgcut::start_then_down(&common::pgcut::upstream(db.url()), "unsure-one");
    let url = proxy.url_for(db.url());
    let store = Store::open_postgres(&PgTarget::parse(&url).unwrap()).unwrap();
    record_lifecycle(&store, "unsure-one");
    // Answered once the writer has stopped reconnecting and holds the batch back.
    store.flush_blocking();
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(store.write_problem().is_some(), "the outage is reported");
    let _ = store.take_write_error();

    db.target()
        .connect()
        .unwrap()
        .batch_execute("DROP TABLE runner_writer_batches")
        .unwrap();
    proxy.reachable_again();
    let (done, flushed) = std::sync::mpsc::channel();
    let writer = store.clone();
    std::thread::spawn(move || {
        block_on(writer.flush_durable());
        let _ = done.send(());
    });
    // Generous: the held writes are tried again after a pause, then row by row.
    flushed
        .recv_timeout(Duration::from_secs(120))
        .expect("a flush never returned: the writer kept asking whether the batch landed");
    let error = store
        .take_write_error()
        .expect("the lost writes are reported");
    assert!(error.contains("runner_writer_batches"), "{error}");
}

/// The rows of `table`, counted over a connection of the test's own.
fn row_count(c: &mut postgres::Client, table: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .unwrap()
        .get(0)
}

/// The process stops (its last `Store` dropped) while PostgreSQL cannot be reached and the
/// writer holds writes back, and the server answers again a moment later: closing tries the
/// held writes once more, reconnecting for a while, and they are saved, each once.
#[test]
fn nothing_is_lost_when_a_process_stops_while_the_server_is_briefly_away() {
    let Some(db) = ScratchDb::new("closed_while_away") else {
        return;
    };
    let proxy = common::pgcut::start_plain(&common::pgcut::upstream(db.url()));
    let url = proxy.url_for(db.url());
    let store = Store::open_postgres(&PgTarget::parse(&url).unwrap()).unwrap();

    record_lifecycle(&store, "before-outage");
    store.flush_blocking();
    assert_eq!(store.write_problem(), None);

    proxy.go_down();
    record_lifecycle(&store, "during-outage");
    // Reported when the writer gives up reconnecting and holds the writes; it then pauses
    // before trying them again. The close has to begin in that pause: a retry already under
    // way when the server comes back would save the writes without the close's last try.
    let patience = std::time::Instant::now();
    while store.write_problem().is_none() {
        assert!(
            patience.elapsed() < Duration::from_secs(300),
            "the outage was never reported"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            // Back while the close's last try is still reconnecting.
            std::thread::sleep(Duration::from_secs(1));
            proxy.reachable_again();
        });
        // Returns once the writer thread has ended.
        drop(store);
    });

    // As another client of the database sees it: both runs whole, each row once.
    let mut c = db.target().connect().unwrap();
    let runs: Vec<(String, String)> = c
        .query("SELECT id, status FROM runner_executions ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        runs,
        [
            ("before-outage".to_string(), "success".to_string()),
            ("during-outage".to_string(), "success".to_string())
        ]
    );
    for (table, rows) in [("runner_steps", 6), ("runner_attempts", 6)] {
        assert_eq!(row_count(&mut c, table), rows, "{table}");
    }
}

#[test]
fn a_postgres_database_migrated_by_a_newer_omniflow_is_refused() {
    let Some(db) = ScratchDb::new("newer") else {
        return;
    };
    drop(Store::open_postgres(db.target()).unwrap());
    let mut c = db.target().connect().unwrap();
    c.execute(
        "INSERT INTO omniflow_migrations (version, description) VALUES (999, 'from the future')",
        &[],
    )
    .unwrap();
    let err = Store::open_postgres(db.target()).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerMigrations { found: 999, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), omniflow::store::StoreErrorKind::Newer);
    assert!(err.to_string().contains("upgrade omniflow"), "{err}");
}

#[test]
fn processes_starting_together_on_a_new_postgres_database_all_succeed() {
    let Some(db) = ScratchDb::new("openers") else {
        return;
    };
    let target = db.target().clone();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let (target, barrier) = (target.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let store = Store::open_postgres_as(&target, format!("host-{i}:{i}:0"))
                    .map_err(|e| format!("open failed: {e}"))?;
                store.insert_run(new_run(&format!("r{i}"), "race", i));
                store.flush_blocking();
                store.take_write_error().map_or(Ok(()), Err)
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let store = Store::open_postgres(&target).unwrap();
    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), 6);
    let mut c = target.connect().unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM omniflow_migrations", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        n,
        omniflow::store::pg::schema::LATEST,
        "each migration applied once"
    );
}

#[test]
fn backup_on_postgres_says_to_use_pg_dump() {
    let Some(db) = ScratchDb::new("backup") else {
        return;
    };
    let store = Store::open_postgres(db.target()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = store.backup(&dir.path().join("copy.db")).unwrap_err();
    assert!(err.to_string().contains("pg_dump"), "{err}");
    assert_eq!(store.path(), None);
    assert_eq!(
        store.postgres().map(|t| t.shown()),
        Some(db.target().shown())
    );
}

#[test]
fn on_postgres_a_host_whose_clock_is_wrong_still_holds_its_runs() {
    use omniflow::store::Claim;
    let Some(db) = ScratchDb::new("db_clock") else {
        return;
    };
    let lease = Duration::from_secs(60);
    let a = Store::open_postgres_as(db.target(), "skewed-host:7:0".into()).unwrap();
    let b = Store::open_postgres_as(db.target(), "other-host:8:0".into()).unwrap();
    // A's clock says 1970: the heartbeat's time is the database's, not A's.
    a.heartbeat(omniflow::store::Health {
        at: UNIX_EPOCH,
        ..health("daemon")
    });
    a.insert_run(new_run("r1", "alpha", 0));
    a.flush_blocking();
    let procs = b.processes(lease).unwrap();
    assert!(
        procs.iter().any(|p| p.id == "skewed-host:7:0" && p.alive),
        "{procs:?}"
    );
    assert!(b.orphaned_runs(lease).unwrap().is_empty());
    assert!(matches!(
        block_on(b.claim_run("r1", lease, 3)).unwrap(),
        Claim::Live { .. }
    ));
}

/// Whether a run's owner on this host is certainly gone, from its id (`host:pid:start_ms`):
/// its pid is free, or taken by a process that started well after the owner did (the pid
/// was reused). Anything it cannot be sure of is left to the lease.
#[test]
fn an_owner_whose_pid_was_reused_is_gone() {
    use omniflow::store::owner_is_gone;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    // Past the 30 s the owner's recorded start may trail its real one.
    let minute = 60_000;

    // The process recorded as the owner is the one running with that pid.
    assert!(!owner_is_gone(&format!("{host}:{pid}:{now_ms}")));
    // The pid is running, but the process holding it started a minute after the owner did.
    assert!(owner_is_gone(&format!("{host}:{pid}:{}", now_ms - minute)));
    // Another host's processes are not ours to look at; a malformed id says nothing.
    assert!(!owner_is_gone(&format!(
        "{host}-elsewhere:{pid}:{}",
        now_ms - minute
    )));
    assert!(!owner_is_gone("no-pid-here"));

    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing runs with that pid any more.
    assert!(owner_is_gone(&format!("{host}:{pid}:{now_ms}")));
}

/// `omniflow database import`: a cached answer moves to PostgreSQL with its expiry (SQLite
/// keeps it in milliseconds), so it is served there until then and not after.
#[test]
fn an_imported_cached_answer_keeps_its_expiry() {
    let Some(db) = ScratchDb::new("import_cache") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("history.db");
    let created = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let expires = created + Duration::from_millis(3_600_123);
    let sqlite = Store::open(&file).unwrap();
    sqlite.cache_put(omniflow::store::CachedAnswer {
        key: "k1".into(),
        provider: "ollama".into(),
        model: "llama3".into(),
        output: "cached text".into(),
        tokens_used: 12,
        created_at: created,
        expires_at: expires,
    });
    sqlite.flush_blocking();
    drop(sqlite);
    omniflow::store::pg::import::import_sqlite(&file, db.target()).unwrap();
    let pg = Store::open_postgres(db.target()).unwrap();
    let before = pg
        .cache_get("k1", expires - Duration::from_millis(1))
        .unwrap()
        .expect("the imported answer, before it expires");
    assert_eq!(before.output, "cached text");
    assert_eq!(before.expires_at, expires);
    assert_eq!(pg.cache_get("k1", expires).unwrap(), None);
}
