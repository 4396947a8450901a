//! Crash safety with real processes: SIGKILL at random moments, SIGTERM drains, three
//! processes on one database, leases taken over only when expired.

mod common;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The counting fake every crash test talks to (`tests/common/counting.rs`).
fn fake(latency: Duration) -> common::counting::CountingFake {
    common::counting::start(latency, r#"{"ok":true}"#.to_string())
}

struct Env {
    dir: tempfile::TempDir,
    vars: Vec<(String, String)>,
}

impl Env {
    fn new(extra: &[(&str, String)]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut vars = vec![
            (
                "DB_FILE".into(),
                dir.path().join("h.db").display().to_string(),
            ),
            (
                "LOG_DIR".into(),
                dir.path().join("logs").display().to_string(),
            ),
            // Lease 2 s × 0.1 = 200 ms; heartbeats every ~67 ms.
            ("LEASE_TIMEOUT".into(), "2".into()),
            ("OMNIFLOW_TIME_SCALE".into(), "0.1".into()),
        ];
        for (k, v) in extra {
            vars.push((k.to_string(), v.clone()));
        }
        Env { dir, vars }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("h.db")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        common::bin::omniflow(self.dir.path(), args, self.vars.iter().cloned())
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args).spawn().unwrap()
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn write(&self, name: &str, v: &Value) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
        p
    }

    /// Everything the processes logged (the JSON lines in LOG_DIR).
    fn log(&self) -> String {
        std::fs::read_dir(self.dir.path().join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    fn sql(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.db()).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn latest_run(db: &Path) -> Option<String> {
    let c = rusqlite::Connection::open(db).ok()?;
    c.query_row(
        "SELECT id FROM runner_executions ORDER BY queued_at DESC LIMIT 1",
        [],
        |r| r.get(0),
    )
    .ok()
}

fn succeeded_steps(env: &Env, run: &str) -> Vec<String> {
    let c = env.sql();
    let mut st = c
        .prepare("SELECT step_key FROM runner_steps WHERE run_id = ?1 AND status = 'success'")
        .unwrap();
    st.query_map([run], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// How far a run got: steps recorded done, or `None` before the run is recorded.
fn progress(db: &Path) -> Option<(String, usize)> {
    let run = latest_run(db)?;
    let c = rusqlite::Connection::open(db).ok()?;
    let done: i64 = c
        .query_row(
            "SELECT count(*) FROM runner_steps WHERE run_id = ?1 AND status = 'success'",
            [&run],
            |r| r.get(0),
        )
        .ok()?;
    Some((run, done as usize))
}

#[test]
fn runs_killed_at_random_moments_resume_without_repeating_work_or_notifications() {
    // Each call takes 60 ms at the fake, so every stage of a run (the eight fetches, the
    // notification) is in flight long enough to be caught: kills land at the chosen stage
    // however fast or loaded the machine is.
    let server = fake(Duration::from_millis(60));
    let env = Env::new(&[
        ("TELEGRAM_API_URL", server.url.clone()),
        ("TELEGRAM_BOT_TOKEN", "123456:TESTtoken".into()),
        ("TELEGRAM_CHAT_ID", "42".into()),
        ("CONCURRENCY", "3".into()),
    ]);
    let bp = env.write(
        "crashy.json",
        &json!({
            "name": "crashy",
            "variables": { "ITEMS": [0, 1, 2, 3, 4, 5, 6, 7] },
            "nodes": [
                { "id": "fetch", "type": "http", "forEach": "{{ vars.ITEMS }}",
                  "url": format!("{}/item/{{{{ run.id }}}}/{{{{ item }}}}", server.url) },
                { "id": "sum", "type": "transform", "needs": ["fetch"],
                  "template": "{{ nodes.fetch.output | length }} fetched" },
                { "id": "post", "type": "notify", "needs": ["sum"], "channel": "telegram",
                  "text": "run {{ run.id }}: {{ nodes.sum.output }}" }
            ]
        }),
    );
    let bp = bp.to_str().unwrap().to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut kills, mut refused, mut repeated) = (0, 0, 0);
    let mut runs = Vec::new();
    for _ in 0..50 {
        // Kill once the run has this many steps recorded done (0: as soon as it is recorded;
        // 9: the eight fetches and the sum, so the notification is being sent).
        let target = rng.gen_range(0..=9usize);
        let before_run = latest_run(&env.db());
        let mut child = env.spawn(&["run", &bp]);
        let until = Instant::now() + Duration::from_secs(60);
        let killed = loop {
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            if let Some((run, done)) = progress(&env.db()) {
                if Some(&run) != before_run.as_ref() && done >= target {
                    child.kill().unwrap(); // SIGKILL
                    break true;
                }
            }
            assert!(Instant::now() < until, "run never reached stage {target}");
            std::thread::sleep(Duration::from_millis(3));
        };
        // Reaped: the killed process is gone, as after a real crash.
        let _ = child.wait();
        let run = latest_run(&env.db()).expect("the run was recorded");
        assert_ne!(Some(&run), before_run.as_ref(), "a new run was recorded");
        runs.push(run.clone());
        if killed {
            kills += 1;
            // What the store says is done must never be done again.
            let done = succeeded_steps(&env, &run);
            let before: HashMap<String, usize> = server.calls.lock().unwrap().clone();
            // Right away: the killed process is gone from this host, so no lease to wait for.
            let o = env.output(&["resume", &run]);
            if stderr(&o).contains("which is alive") {
                refused += 1;
            }
            assert!(
                o.status.success() || stderr(&o).contains("already ended"),
                "resume {run}: {}",
                stderr(&o)
            );
            let after = server.calls.lock().unwrap().clone();
            for step in done.iter().filter(|s| s.starts_with("fetch[")) {
                let item = &step[6..step.len() - 1];
                let path = format!("/item/{run}/{item}");
                if after.get(&path) != before.get(&path) {
                    repeated += 1;
                }
            }
        }
        let status: String = env
            .sql()
            .query_row(
                "SELECT status FROM runner_executions WHERE id = ?1",
                [&run],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(status, "success", "run {run} ends in success");
    }
    // Every run but those that finished before their stage was reached was killed.
    assert!(
        kills >= 40,
        "only {kills} of 50 runs were killed at their stage"
    );
    assert_eq!(refused, 0, "a resume right after a kill was refused");
    assert_eq!(repeated, 0, "steps recorded done were called again");
    // No message twice; a message is missing only where the kill hit its sending, and then
    // the run's record says so (it is not sent again, so it cannot arrive twice).
    let calls = server.calls.lock().unwrap();
    let (mut sent_once, mut lost) = (0, 0);
    for run in &runs {
        match calls.get(&format!("/bot123456:TESTtoken/sendMessage/{run}")) {
            Some(1) => sent_once += 1,
            None => {
                let output: String = env
                    .sql()
                    .query_row(
                        "SELECT output FROM runner_steps WHERE run_id = ?1 AND step_key = 'post'",
                        [run],
                        |r| r.get(0),
                    )
                    .unwrap();
                assert!(
                    output.contains("\"delivered\":null"),
                    "run {run}: no message and no record of why: {output}"
                );
                lost += 1;
            }
            Some(n) => panic!("run {run}: its message was sent {n} times"),
        }
    }
    eprintln!(
        "crash loop: 50 runs, {kills} killed, {refused} resumes refused, {repeated} done steps \
         repeated, {sent_once} messages sent once, {lost} lost to a kill mid-send, 0 sent twice"
    );
}

#[test]
fn sigterm_drains_steps_in_flight_and_hands_the_run_over() {
    let server = fake(Duration::from_millis(1500));
    let env = Env::new(&[("OMNIFLOW_TIME_SCALE", "1".into())]);
    let bp = env.write(
        "slow.json",
        &json!({
            "name": "slow",
            "variables": { "ITEMS": [0, 1, 2, 3] },
            "nodes": [
                { "id": "fetch", "type": "http", "forEach": "{{ vars.ITEMS }}",
                  "url": format!("{}/slow/{{{{ run.id }}}}/{{{{ item }}}}", server.url) },
                { "id": "after", "type": "http", "needs": ["fetch"],
                  "url": format!("{}/after/{{{{ run.id }}}}", server.url) }
            ]
        }),
    );
    let child = env.spawn(&["run", bp.to_str().unwrap()]);
    // Wait until the four calls are in flight.
    let until = Instant::now() + Duration::from_secs(20);
    let run = loop {
        if let Some(run) = latest_run(&env.db()) {
            let running: i64 = env
                .sql()
                .query_row(
                    "SELECT count(*) FROM runner_steps WHERE run_id = ?1 AND status = 'running'",
                    [&run],
                    |r| r.get(0),
                )
                .unwrap_or(0);
            if running == 4 {
                break run;
            }
        }
        assert!(Instant::now() < until, "the steps never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    // 3: interrupted, the run is intact and `omniflow resume` finishes it.
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("omniflow resume"), "{}", stderr(&out));
    // The four calls in flight finished and were recorded; nothing after them started.
    assert_eq!(succeeded_steps(&env, &run).len(), 4);
    // …within the grace, and the log does not say otherwise.
    let log = env.log();
    assert!(log.contains("handed unfinished runs over"), "{log}");
    assert!(!log.contains("grace period ended"), "{log}");
    let after_path = format!("/after/{run}");
    assert!(!server.calls.lock().unwrap().contains_key(&after_path));
    let (status, owner): (String, Option<String>) = env
        .sql()
        .query_row(
            "SELECT status, owner FROM runner_executions WHERE id = ?1",
            [&run],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (status.as_str(), owner),
        ("running", None),
        "handed over, not lost"
    );
    // The next process continues it at once (released: no lease to wait for).
    let o = env.output(&["resume", &run]);
    assert!(o.status.success(), "{}", stderr(&o));
    let calls = server.calls.lock().unwrap();
    for i in 0..4 {
        assert_eq!(
            calls.get(&format!("/slow/{run}/{i}")),
            Some(&1),
            "item {i} ran once"
        );
    }
    assert_eq!(calls.get(&after_path), Some(&1));
}

#[test]
fn three_processes_share_one_database_without_lock_errors() {
    let env = Env::new(&[]);
    let items: Vec<u32> = (0..334).collect();
    let bp = env.write(
        "wide.json",
        &json!({
            "name": "wide",
            "variables": { "ITEMS": items },
            "nodes": [ { "id": "each", "type": "transform", "forEach": "{{ vars.ITEMS }}", "template": "{{ item * 2 }}" } ]
        }),
    );
    let children: Vec<Child> = (0..3)
        .map(|_| env.spawn(&["run", bp.to_str().unwrap(), "--json"]))
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!stderr(&o).contains("locked"), "{}", stderr(&o));
        assert!(!stderr(&o).contains("could not save"), "{}", stderr(&o));
    }
    let c = env.sql();
    let (runs, steps, once): (i64, i64, i64) = c
        .query_row(
            "SELECT (SELECT count(*) FROM runner_executions WHERE status = 'success'),
                    (SELECT count(*) FROM runner_steps WHERE status = 'success'),
                    (SELECT count(*) FROM runner_attempts)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (runs, steps, once),
        (3, 1002, 1002),
        "every step exactly once"
    );
    let processes: i64 = c
        .query_row(
            "SELECT count(*) FROM runner_processes WHERE stopped_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        processes, 3,
        "each process recorded its health and its clean stop"
    );
}

#[test]
fn an_expired_lease_is_taken_over_and_a_live_one_is_not() {
    let env = Env::new(&[
        ("LEASE_TIMEOUT", "30".into()),
        ("OMNIFLOW_TIME_SCALE", "1".into()),
    ]);
    // Create the schema.
    let bp = env.write(
        "t.json",
        &json!({ "name": "t", "nodes": [ { "id": "a", "type": "transform", "template": "done" } ] }),
    );
    let o = env.output(&["run", bp.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let snapshot =
        json!({ "name": "t", "nodes": [ { "id": "a", "type": "transform", "template": "done" } ] });
    let c = env.sql();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for (proc_id, beat) in [("dead:1:1", now_ms - 120_000), ("live:2:2", now_ms)] {
        c.execute(
            "INSERT INTO runner_processes (id, pid, role, version, started_at, heartbeat_at, heartbeat_ms)
             VALUES (?1, 1, 'daemon', 'x', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', ?2)",
            rusqlite::params![proc_id, beat],
        )
        .unwrap();
    }
    for (run, owner) in [("orphan0000001", "dead:1:1"), ("owned00000001", "live:2:2")] {
        c.execute(
            "INSERT INTO runner_executions (id, blueprint_name, status, priority, trigger, sandbox,
                 variables, blueprint, queued_at, started_at, owner)
             VALUES (?1, 't', 'running', 'normal', 'cli', 0, '{}', ?2, '2026-01-01T00:00:00.000Z',
                     '2026-01-01T00:00:00.000Z', ?3)",
            rusqlite::params![run, snapshot.to_string(), owner],
        )
        .unwrap();
    }
    let o = env.output(&["resume", "owned00000001"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("process 2 on live (live:2:2), which is alive"),
        "{}",
        stderr(&o)
    );
    let o = env.output(&["resume", "orphan0000001"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, takeovers): (String, i64) = c
        .query_row(
            "SELECT status, takeovers FROM runner_executions WHERE id = 'orphan0000001'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((status.as_str(), takeovers), ("success", 1));
    // `resume --all` finds nothing else to take: the live one stays with its owner.
    let o = env.output(&["resume", "--all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let status: String = c
        .query_row(
            "SELECT status FROM runner_executions WHERE id = 'owned00000001'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(status, "running");
}

#[test]
fn a_run_that_keeps_killing_its_process_is_failed_after_the_takeover_limit() {
    let env = Env::new(&[
        ("MAX_TAKEOVERS", "2".into()),
        ("OMNIFLOW_TIME_SCALE", "1".into()),
    ]);
    let bp = env.write(
        "t.json",
        &json!({ "name": "t", "nodes": [ { "id": "a", "type": "transform", "template": "x" } ] }),
    );
    assert!(env.output(&["run", bp.to_str().unwrap()]).status.success());
    let c = env.sql();
    c.execute(
        "INSERT INTO runner_processes (id, pid, role, version, started_at, heartbeat_at, heartbeat_ms)
         VALUES ('dead:1:1', 1, 'daemon', 'x', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', 0)",
        [],
    )
    .unwrap();
    c.execute(
        "INSERT INTO runner_executions (id, blueprint_name, status, priority, trigger, sandbox,
             variables, blueprint, queued_at, started_at, owner, takeovers)
         VALUES ('poison0000001', 't', 'running', 'normal', 'cli', 0, '{}', '{}',
                 '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', 'dead:1:1', 2)",
        [],
    )
    .unwrap();
    // The step it was on when its process died.
    c.execute(
        "INSERT INTO runner_steps (run_id, step_key, node_id, status, attempts, seq)
         VALUES ('poison0000001', 'a', 'a', 'running', 1, 1)",
        [],
    )
    .unwrap();
    let o = env.output(&["resume", "poison0000001"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted 3 times"), "{}", stderr(&o));
    let (status, kind, error, failed_step): (String, String, String, String) = c
        .query_row(
            "SELECT status, error_kind, error, failed_step FROM runner_executions
             WHERE id = 'poison0000001'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!((status.as_str(), kind.as_str()), ("error", "interrupted"));
    assert_eq!(failed_step, "a");
    assert!(
        error.contains("stopped 3 times") && error.contains("in flight when it last stopped: a"),
        "{error}"
    );
    let (step_status, step_kind): (String, String) = c
        .query_row(
            "SELECT status, error_kind FROM runner_steps WHERE run_id = 'poison0000001'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (step_status.as_str(), step_kind.as_str()),
        ("error", "interrupted")
    );
}
