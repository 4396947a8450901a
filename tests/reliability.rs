//! What the user is told must be true, through the real binary: every node type's real
//! output is printed (no panic, exit 0), signals exit 3 and hand the run over, a killed run
//! is resumed at once, several processes create one new database, damaged or unusable
//! database files are refused untouched, and a full disk is called a full disk.

mod common;
mod fake_provider;
mod fakes;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const TOKEN: &str = "7012345678:AAHsEcReTtOkEnVaLuE0123456789abcdefXYZ";
const HOOK_TOKEN: &str = "wEbHoOkToKeN-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ";

struct Env {
    dir: tempfile::TempDir,
    vars: Vec<(String, String)>,
}

impl Env {
    fn new(extra: &[(&str, String)]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut vars = vec![
            (
                "DB_FILE".to_string(),
                dir.path().join("h.db").display().to_string(),
            ),
            (
                "LOG_DIR".to_string(),
                dir.path().join("logs").display().to_string(),
            ),
        ];
        for (k, v) in extra {
            vars.retain(|(key, _)| key != k);
            vars.push((k.to_string(), v.clone()));
        }
        Env { dir, vars }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn db(&self) -> PathBuf {
        let v = self.vars.iter().find(|(k, _)| k == "DB_FILE").unwrap();
        PathBuf::from(&v.1)
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

    fn write(&self, name: &str, v: &Value) -> String {
        let p = self.path(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
        p.display().to_string()
    }

    fn sql(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.db()).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    /// Waits until the run's step `key` is recorded with `status`; returns the run id.
    fn wait_step(&self, key: &str, status: &str) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = rusqlite::Connection::open(self.db()) {
                let found: Option<String> = c
                    .query_row(
                        "SELECT run_id FROM runner_steps WHERE step_key = ?1 AND status = ?2
                         ORDER BY rowid DESC LIMIT 1",
                        [key, status],
                        |r| r.get(0),
                    )
                    .ok();
                if let Some(run) = found {
                    return run;
                }
            }
            assert!(Instant::now() < until, "step {key} never became {status}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status(&self, run: &str) -> (String, Option<String>) {
        self.sql()
            .query_row(
                "SELECT status, owner FROM runner_executions WHERE id = ?1",
                [run],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn kill(child: &Child, signal: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

fn no_panic(o: &Output) {
    let err = stderr(o);
    assert!(
        !err.contains("panicked") && o.status.code() != Some(101),
        "a panic: {err}"
    );
}

/// A blueprint whose one slow step (`wait`, a 60 s delay) gives time to send signals.
fn slow_blueprint(env: &Env) -> String {
    env.write(
        "slow.json",
        &json!({ "name": "slow", "nodes": [
            { "id": "wait", "type": "delay", "duration": "60s" },
            { "id": "after", "type": "transform", "needs": ["wait"], "template": "done" }
        ] }),
    )
}

// ---- what is printed ---------------------------------------------------------------------

/// A real (not sandboxed) run whose final steps are one of every node type: a model call,
/// an HTTP call, a transform, a condition, a delay, and real Telegram and Discord messages.
/// Before, printing a real notification's record panicked after the run had succeeded
/// (exit 101), so cron and systemd counted a success as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_prints_every_node_types_output_and_exits_0() {
    let tg = fakes::telegram(TOKEN).await;
    let dc = fakes::discord().await;
    let model = fake_provider::start(|req, _| {
        if req.path.contains("chat/completions") {
            fake_provider::Reply::completion("Rust compiles to fast code.", 12)
        } else {
            fake_provider::Reply::json(200, json!({ "page": "fetched from the fake" }))
        }
    })
    .await;
    let env = Env::new(&[
        ("TELEGRAM_BOT_TOKEN", TOKEN.into()),
        ("TELEGRAM_CHAT_ID", "42".into()),
        ("TELEGRAM_API_URL", tg.url.clone()),
        (
            "DISCORD_WEBHOOK",
            format!("{}/api/webhooks/123456789/{HOOK_TOKEN}", dc.url),
        ),
        ("OPENAI_BASE_URL", model.url.clone()),
        ("OPENAI_API_KEY", "sk-test-key".into()),
    ]);
    let bp = env.write(
        "every.json",
        &json!({ "name": "every", "nodes": [
            { "id": "ask", "type": "llm", "provider": "openai", "model": "m",
              "prompt": "Say something about Rust." },
            { "id": "fetch", "type": "http", "url": format!("{}/page", model.url) },
            { "id": "shape", "type": "transform", "template": "shaped" },
            { "id": "check", "type": "condition", "expression": "1 == 1" },
            { "id": "pause", "type": "delay", "duration": "10ms" },
            { "id": "tell", "type": "notify", "channel": "telegram", "text": "to Telegram" },
            { "id": "hook", "type": "notify", "channel": "discord", "text": "to Discord" }
        ] }),
    );
    let o = {
        let cmd = env.cmd(&["run", &bp]);
        tokio::task::spawn_blocking(move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        })
        .await
        .unwrap()
    };
    no_panic(&o);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("every succeeded"), "{err}");
    for id in ["ask", "fetch", "shape", "check", "pause", "tell", "hook"] {
        assert!(
            err.contains(&format!("── output of {id} ──")),
            "{id}: {err}"
        );
    }
    assert!(out.contains("Rust compiles to fast code."), "{out}");
    assert!(out.contains("fetched from the fake"), "{out}");
    assert!(out.contains("shaped"), "{out}");
    assert!(out.contains("sent on telegram (1 message)"), "{out}");
    assert!(out.contains("sent on discord (1 message)"), "{out}");
    // The messages did go out, once each.
    assert_eq!(tg.requests().len(), 1);
    assert_eq!(dc.requests().len(), 1);

    // The same through `--json`: one object, the notification records as they are.
    let o = {
        let cmd = env.cmd(&["run", &bp, "--json"]);
        tokio::task::spawn_blocking(move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        })
        .await
        .unwrap()
    };
    no_panic(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["status"], "success");
    assert_eq!(v["outputs"]["tell"]["delivered"], true);
    // `show` prints the run, human and JSON, without a panic either.
    let run = v["runId"].as_str().unwrap().to_string();
    for args in [vec!["show", &run], vec!["show", &run, "--json"]] {
        let o = env.output(&args);
        no_panic(&o);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
}

// ---- signals and exit codes ----------------------------------------------------------------

/// SIGTERM (systemd, `kill`) and SIGHUP (a dropped SSH session) hand a foreground run over
/// and exit 3; the run is intact and `omniflow resume` finishes it at once.
#[test]
fn sigterm_and_sighup_hand_the_run_over_and_exit_3() {
    for signal in ["TERM", "HUP"] {
        let env = Env::new(&[("SHUTDOWN_GRACE", "0".into())]);
        let bp = slow_blueprint(&env);
        let child = env.spawn(&["run", &bp]);
        let run = env.wait_step("wait", "running");
        kill(&child, signal);
        let o = child.wait_with_output().unwrap();
        no_panic(&o);
        assert_eq!(o.status.code(), Some(3), "SIG{signal}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("SIG{signal}: finishing steps in flight")),
            "{}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains("`omniflow resume`") || stderr(&o).contains("omniflow resume"),
            "{}",
            stderr(&o)
        );
        assert_eq!(
            env.status(&run),
            ("running".to_string(), None),
            "SIG{signal}: handed over"
        );
        // Resuming it is interrupted the same way: exit 3 again.
        let child = env.spawn(&["resume", &run]);
        let until = Instant::now() + Duration::from_secs(60);
        while env.status(&run).1.is_none() {
            assert!(Instant::now() < until, "the resume never claimed the run");
            std::thread::sleep(Duration::from_millis(20));
        }
        env.wait_step("wait", "running");
        std::thread::sleep(Duration::from_millis(200));
        kill(&child, signal);
        let o = child.wait_with_output().unwrap();
        no_panic(&o);
        assert_eq!(
            o.status.code(),
            Some(3),
            "resume, SIG{signal}: {}",
            stderr(&o)
        );
        assert_eq!(env.status(&run), ("running".to_string(), None));
    }
}

/// Ctrl-C cancels a run (recorded `cancelled`), and says so with exit 3, never 0.
#[test]
fn sigint_cancels_and_exits_3() {
    let env = Env::new(&[]);
    let bp = slow_blueprint(&env);
    let child = env.spawn(&["run", &bp]);
    let run = env.wait_step("wait", "running");
    kill(&child, "INT");
    let o = child.wait_with_output().unwrap();
    no_panic(&o);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("cancelling"), "{}", stderr(&o));
    assert_eq!(env.status(&run).0, "cancelled");
}

/// A second signal quits at once: after SIGTERM the run waits for its step in flight (a
/// server that never answers, with ten minutes of grace), and a Ctrl-C then ends the process
/// with 3 (interrupted), leaving the run unfinished for `omniflow resume`.
#[test]
fn a_second_signal_quits_at_once() {
    use std::io::BufRead;
    // Connections queue in the backlog and are never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow", silent.local_addr().unwrap());
    let env = Env::new(&[
        ("SHUTDOWN_GRACE", "600".into()),
        ("REQUEST_TIMEOUT", "600".into()),
        ("MAX_RETRIES", "0".into()),
    ]);
    let bp = env.write(
        "hang.json",
        &json!({ "name": "hang", "nodes": [ { "id": "fetch", "type": "http", "url": url } ] }),
    );
    let mut child = env.spawn(&["run", &bp]);
    let err = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let run = env.wait_step("fetch", "running");
    kill(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the first signal is answered on stderr");
        if line.contains("send it again to quit at once") {
            break;
        }
    }
    kill(&child, "INT");
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("still running a minute after the second signal (its step had ten minutes)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = reader.join().unwrap();
    assert_eq!(status.code(), Some(3), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    let (status, _) = env.status(&run);
    assert!(
        status == "running" || status == "queued",
        "left unfinished for resume: {status}"
    );
    drop(silent);
}

/// A daemon stops gracefully on SIGHUP as on SIGTERM (before, SIGHUP killed it outright):
/// exit 0 and recorded as stopped.
#[test]
fn a_daemon_stops_gracefully_on_sighup() {
    let env = Env::new(&[]);
    std::fs::create_dir(env.path("blueprints")).unwrap();
    let child = env.spawn(&["daemon"]);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let up: i64 = rusqlite::Connection::open(env.db())
            .and_then(|c| {
                c.query_row(
                    "SELECT count(*) FROM runner_processes WHERE role = 'daemon'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap_or(0);
        if up > 0 {
            break;
        }
        assert!(Instant::now() < until, "the daemon never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past start-up: its signal handlers are installed before it records itself.
    kill(&child, "HUP");
    let o = child.wait_with_output().unwrap();
    no_panic(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let stopped: Option<String> = env
        .sql()
        .query_row(
            "SELECT stopped_at FROM runner_processes WHERE role = 'daemon'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(stopped.is_some(), "the daemon recorded its stop");
}

// ---- a crash costs seconds -----------------------------------------------------------------

/// After SIGKILL, with the default 30 s lease: `doctor` does not call the dead process
/// alive, `resume --all` finds the run, and resuming it starts at once.
#[test]
fn a_killed_run_is_resumed_at_once_and_the_messages_are_true() {
    let env = Env::new(&[("LEASE_TIMEOUT", "30".into())]);
    let bp = env.write(
        "short.json",
        &json!({ "name": "short", "nodes": [
            { "id": "wait", "type": "delay", "duration": "2s" },
            { "id": "after", "type": "transform", "needs": ["wait"], "template": "done" }
        ] }),
    );
    let mut child = env.spawn(&["run", &bp]);
    let run = env.wait_step("wait", "running");
    let pid = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let o = env.output(&["doctor"]);
    no_panic(&o);
    let report = stdout(&o);
    assert!(
        report.contains("0 alive"),
        "the killed process is not alive: {report}"
    );
    assert!(
        report.contains(&format!(":{pid}  silent since")) && report.contains("killed or crashed"),
        "{report}"
    );
    assert!(
        report.contains("1 unfinished run(s) whose process is gone"),
        "{report}"
    );

    // Well within the 30 s lease, `resume --all` finds it and finishes it.
    let o = env.output(&["resume", "--all"]);
    no_panic(&o);
    let err = stderr(&o);
    assert!(!err.contains("no interrupted runs"), "{err}");
    assert!(err.contains(&format!("resuming run {run}")), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(env.status(&run).0, "success");
}

/// A run held by a live process is refused with who holds it, how long its lease lasts,
/// and what to do; once that process is killed, the same command takes the run over.
#[test]
fn a_live_holder_is_named_and_a_dead_one_is_taken_over() {
    let env = Env::new(&[
        ("LEASE_TIMEOUT", "30".into()),
        ("SHUTDOWN_GRACE", "0".into()),
    ]);
    let bp = env.write(
        "slow.json",
        &json!({ "name": "slow", "nodes": [
            { "id": "wait", "type": "delay", "duration": "2s" },
            { "id": "after", "type": "transform", "needs": ["wait"], "template": "done" }
        ] }),
    );
    let mut child = env.spawn(&["run", &bp]);
    let run = env.wait_step("wait", "running");
    let o = env.output(&["resume", &run]);
    no_panic(&o);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let pid = child.id();
    assert!(
        err.contains(&format!("held by `omniflow run` process {pid} on ")),
        "{err}"
    );
    assert!(
        err.contains("which is alive; its lease expires in "),
        "{err}"
    );
    assert!(err.contains(&format!("`kill {pid}`")), "{err}");
    assert!(err.contains(&format!("`omniflow resume {run}`")), "{err}");

    child.kill().unwrap();
    child.wait().unwrap();
    let o = env.output(&["resume", &run]);
    no_panic(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(env.status(&run).0, "success");
}

/// Two `omniflow resume` of one interrupted run at the same moment: exactly one runs it,
/// the other says who has it.
#[test]
fn two_simultaneous_resumes_one_runs_the_other_says_who() {
    let env = Env::new(&[
        ("LEASE_TIMEOUT", "30".into()),
        ("SHUTDOWN_GRACE", "0".into()),
    ]);
    // Long enough that the loser looks while the winner still runs it.
    let bp = env.write(
        "slow.json",
        &json!({ "name": "slow", "nodes": [
            { "id": "wait", "type": "delay", "duration": "6s" },
            { "id": "after", "type": "transform", "needs": ["wait"], "template": "done" }
        ] }),
    );
    let (mut ran, mut told) = (0, 0);
    for round in 0..3 {
        let child = env.spawn(&["run", &bp]);
        let run = env.wait_step("wait", "running");
        kill(&child, "TERM");
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        let a = env.spawn(&["resume", &run]);
        let b = env.spawn(&["resume", &run]);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        for o in [&a, &b] {
            no_panic(o);
            match o.status.code() {
                Some(0) => ran += 1,
                Some(2)
                    if stderr(o).contains("process") && stderr(o).contains("which is alive") =>
                {
                    told += 1
                }
                other => panic!("round {round}: exit {other:?}: {}", stderr(o)),
            }
        }
        assert_eq!(env.status(&run).0, "success", "round {round}");
        let after: i64 = env
            .sql()
            .query_row(
                "SELECT count(*) FROM runner_attempts WHERE run_id = ?1 AND step_key = 'after'",
                [&run],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(after, 1, "round {round}: the run was continued once");
    }
    assert_eq!((ran, told), (3, 3));
}

// ---- the database ------------------------------------------------------------------------

/// Five `omniflow run` at once on a database that does not exist yet (two cron jobs in the
/// same minute on a fresh install): all five run, no busy/locked error, no row lost.
#[test]
fn five_runs_create_one_new_database_together() {
    for round in 0..3 {
        let env = Env::new(&[(
            "DB_FILE",
            tempfile::tempdir()
                .unwrap()
                .keep()
                .join("new/h.db")
                .display()
                .to_string(),
        )]);
        let bp = env.write(
            "quick.json",
            &json!({ "name": "quick", "variables": { "ITEMS": [1, 2, 3] }, "nodes": [
                { "id": "a", "type": "transform", "forEach": "{{ vars.ITEMS }}", "template": "{{ item }}" },
                { "id": "b", "type": "transform", "needs": ["a"], "template": "ok" }
            ] }),
        );
        let children: Vec<Child> = (0..5).map(|_| env.spawn(&["run", &bp])).collect();
        for c in children {
            let o = c.wait_with_output().unwrap();
            no_panic(&o);
            let err = stderr(&o).to_lowercase();
            assert_eq!(o.status.code(), Some(0), "round {round}: {err}");
            assert!(
                !err.contains("locked") && !err.contains("busy"),
                "round {round}: {err}"
            );
        }
        let c = env.sql();
        let runs: i64 = c
            .query_row(
                "SELECT count(*) FROM runner_executions WHERE status = 'success'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let steps: i64 = c
            .query_row(
                "SELECT count(*) FROM runner_steps WHERE status = 'success'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!((runs, steps), (5, 5 * 4), "round {round}");
        let _ = std::fs::remove_dir_all(env.db().parent().unwrap().parent().unwrap());
    }
}

/// A real database with some history, its WAL folded in.
fn real_database(env: &Env) -> Vec<u8> {
    let bp = env.write(
        "quick.json",
        &json!({ "name": "quick", "nodes": [
            { "id": "a", "type": "transform", "template": "{{ 'x' * 300 }}" }
        ] }),
    );
    for _ in 0..20 {
        let o = env.output(&["run", &bp]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let c = env.sql();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    drop(c);
    std::fs::read(env.db()).unwrap()
}

/// Damaged and wrong database files: a clear error naming the fix, a non-zero exit, no
/// panic, and the file byte for byte as it was (not even switched to WAL).
#[test]
fn damaged_or_wrong_database_files_are_refused_untouched() {
    let env = Env::new(&[]);
    let good = real_database(&env);
    let pages = good.len() / 4096;
    assert!(pages > 8, "{pages} pages");
    let mut mid = good.clone();
    // A whole page in the middle overwritten (a bad sector, a torn copy).
    let page = 2;
    for (i, b) in mid[page * 4096..(page + 1) * 4096].iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("mid-file", mid, "is damaged"),
        ("truncated", good[..good.len() / 2].to_vec(), "is damaged"),
        (
            "random",
            (0..50_000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
            "is not an SQLite database",
        ),
    ];
    let bp = env.write(
        "t.json",
        &json!({ "name": "t", "nodes": [ { "id": "a", "type": "transform", "template": "x" } ] }),
    );
    for (name, bytes, says) in cases {
        let path = env.path(&format!("{name}.db"));
        std::fs::write(&path, &bytes).unwrap();
        let e = Env::new(&[("DB_FILE", path.display().to_string())]);
        for args in [
            vec!["run", bp.as_str()],
            vec!["runs"],
            vec!["resume", "--all"],
        ] {
            let o = e.output(&args);
            no_panic(&o);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{name} {args:?}: {err}");
            assert!(err.contains(says), "{name}: {err}");
            assert!(err.contains("DB_FILE"), "{name}: the fix is named: {err}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}: untouched");
            assert!(
                !Path::new(&format!("{}-wal", path.display())).exists(),
                "{name}: not switched to WAL"
            );
        }
        if says == "is damaged" {
            assert!(
                stderr(&e.output(&["run", bp.as_str()])).contains("omniflow backup"),
                "{name}: points at backup"
            );
            // doctor says the same, and a backup copies what is there without touching it.
            let o = e.output(&["doctor"]);
            no_panic(&o);
            assert!(stdout(&o).contains("is damaged"), "{}", stdout(&o));
            assert_ne!(o.status.code(), Some(0));
            let copy = env.path(&format!("{name}-rescued.db"));
            let o = e.output(&["backup", copy.to_str().unwrap()]);
            no_panic(&o);
            if name == "mid-file" {
                assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
            } else {
                // Missing pages cannot be copied: SQLite's own recovery is named instead.
                assert!(
                    o.status.code() == Some(0) || stderr(&o).contains(".recover > rescued.sql"),
                    "{name}: {}",
                    stderr(&o)
                );
            }
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}: untouched");
        }
    }

    // A directory where the file should be.
    let dir = env.path("a-directory.db");
    std::fs::create_dir(&dir).unwrap();
    let e = Env::new(&[("DB_FILE", dir.display().to_string())]);
    let o = e.output(&["run", bp.as_str()]);
    no_panic(&o);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("DB_FILE"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // A zero-length file is a new database (it is what a creating process leaves for a
    // moment, so another process must not refuse it): it is set up and used.
    let empty = env.path("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let e = Env::new(&[("DB_FILE", empty.display().to_string())]);
    let o = e.output(&["run", bp.as_str()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Runs `f` with a small tmpfs mounted at a fresh directory (CI runs as root); `None` when
/// this machine cannot mount one (not root).
fn with_tmpfs<T>(size: &str, f: impl FnOnce(&Path) -> T) -> Option<T> {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        // SAFETY: geteuid has no preconditions.
        assert_ne!(
            unsafe { libc::geteuid() },
            0,
            "root must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return None;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let guard = Unmount(dir.path().to_path_buf());
    let r = f(dir.path());
    drop(guard);
    Some(r)
}

/// A database on a read-only file system, and an existing database on a full disk: each is
/// named for what it is, with a non-zero exit and the file untouched.
#[test]
fn read_only_and_full_file_systems_are_named() {
    let env = Env::new(&[]);
    let good = real_database(&env);
    let bp = env.write(
        "t.json",
        &json!({ "name": "t", "nodes": [ { "id": "a", "type": "transform", "template": "x" } ] }),
    );
    with_tmpfs("3m", |mnt| {
        let db = mnt.join("h.db");
        std::fs::write(&db, &good).unwrap();
        assert!(Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(mnt)
            .status()
            .unwrap()
            .success());
        let e = Env::new(&[("DB_FILE", db.display().to_string())]);
        let o = e.output(&["run", bp.as_str()]);
        no_panic(&o);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("cannot open") && stderr(&o).contains("point DB_FILE elsewhere"),
            "{}",
            stderr(&o)
        );
        assert_eq!(std::fs::read(&db).unwrap(), good);
        assert!(Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(mnt)
            .status()
            .unwrap()
            .success());

        // Fill the disk to the last byte.
        let _ = std::fs::write(mnt.join("filler"), vec![0u8; 4 << 20]);
        let o = e.output(&["run", bp.as_str()]);
        no_panic(&o);
        let err = stderr(&o);
        assert_ne!(o.status.code(), Some(0), "{err}");
        assert!(
            err.contains(&format!("disk full: free space at {}", mnt.display())),
            "{err}"
        );
        assert!(!err.contains("disk I/O error:"), "{err}");
        assert_eq!(std::fs::read(&db).unwrap(), good);
    });
}

// ---- a full disk in the middle of a run ----------------------------------------------------

/// The shared counting fake, slow enough (50 ms a call) that the run is still going when the
/// disk fills and the pool holds (the hold follows within a second); each fetched item gets a
/// small JSON body.
fn counting_fake() -> (
    String,
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
) {
    let f = common::counting::start(
        Duration::from_millis(50),
        json!({ "text": "y".repeat(200) }).to_string(),
    );
    (f.url, f.calls)
}

/// Collects a child's stderr lines as they come.
fn collect_stderr(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::Read;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut err = child.stderr.take().unwrap();
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

/// The disk holding the history fills up in the middle of a fan-out that ends in a Telegram
/// message: the run says "disk full: free space at DIR", the pool holds (no new calls, no
/// message), and once space is freed the same run finishes: every item called once, exactly
/// one message, the database intact, the run recorded as a success.
#[test]
fn a_full_disk_mid_run_holds_the_run_until_there_is_room() {
    let (url, calls) = counting_fake();
    // Room for the run's whole history (its WAL grows to about 4 MB before a checkpoint),
    // so the run only fills the disk because of the filler.
    with_tmpfs("16m", |mnt| {
        let env = Env::new(&[
            ("DB_FILE", mnt.join("h.db").display().to_string()),
            ("TELEGRAM_API_URL", url.clone()),
            ("TELEGRAM_BOT_TOKEN", "123456:FULLtoken".into()),
            ("TELEGRAM_CHAT_ID", "42".into()),
            ("CONCURRENCY", "4".into()),
        ]);
        let items: Vec<u32> = (0..200).collect();
        let bp = env.write(
            "fan.json",
            &json!({ "name": "fan", "variables": { "ITEMS": items }, "nodes": [
                { "id": "fetch", "type": "http", "forEach": "{{ vars.ITEMS }}",
                  "url": format!("{url}/item/{{{{ item }}}}") },
                { "id": "post", "type": "notify", "needs": ["fetch"], "channel": "telegram",
                  "text": "{{ nodes.fetch.output | length }} fetched" }
            ] }),
        );
        let mut child = env.spawn(&["run", &bp]);
        // A failed assertion must not leave the run waiting for room forever.
        struct KillOnDrop(u32);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    // SAFETY: kill has no memory preconditions; the pid is our child's.
                    unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
                }
            }
        }
        let _guard = KillOnDrop(child.id());
        let err = collect_stderr(&mut child);
        let fetched = || -> usize {
            calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _)| p.starts_with("/item/"))
                .map(|(_, n)| *n)
                .sum()
        };
        let until = Instant::now() + Duration::from_secs(60);
        while fetched() < 40 {
            assert!(Instant::now() < until, "the run never got going");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Fill the disk to the last byte.
        let filler = mnt.join("filler");
        let _ = std::fs::write(&filler, vec![0u8; 32 << 20]);
        let until = Instant::now() + Duration::from_secs(60);
        while !err
            .lock()
            .unwrap()
            .contains(&format!("disk full: free space at {}", mnt.display()))
        {
            assert!(
                Instant::now() < until,
                "never told the disk is full: {}",
                err.lock().unwrap()
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "{}",
                err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The pool holds: once the steps in flight are done, nothing new starts.
        std::thread::sleep(Duration::from_secs(3));
        let held_at = fetched();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(fetched(), held_at, "new calls while the disk is full");
        assert!(held_at < 200, "the disk filled too late to test anything");
        let sent = |calls: &std::collections::HashMap<String, usize>| {
            calls
                .iter()
                .filter(|(p, _)| p.contains("/sendMessage"))
                .map(|(_, n)| *n)
                .sum::<usize>()
        };
        assert_eq!(sent(&calls.lock().unwrap()), 0, "no message while full");
        assert!(child.try_wait().unwrap().is_none(), "the run waits");

        // Room again: the same run goes on and finishes.
        std::fs::remove_file(&filler).unwrap();
        let until = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!(
                    "the run did not finish once there was room: {}",
                    err.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = err.lock().unwrap().clone();
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(err.contains("fan succeeded"), "{err}");
        let calls = calls.lock().unwrap();
        for i in 0..200 {
            assert_eq!(
                calls.get(&format!("/item/{i}")),
                Some(&1),
                "item {i} called once"
            );
        }
        assert_eq!(sent(&calls), 1, "exactly one message");
        let c = env.sql();
        let check: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let (status, done): (String, i64) = c
            .query_row(
                "SELECT r.status, (SELECT count(*) FROM runner_steps s
                                   WHERE s.run_id = r.id AND s.status = 'success')
                 FROM runner_executions r",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((status.as_str(), done), ("success", 201));
        eprintln!("full disk: held at {held_at} of 200 calls; finished 200, 1 message");
    });
}

// ---- secrets under failure -----------------------------------------------------------------

/// Every configured secret, with providers and services that fail in the ways that tempt a
/// program to print what it sent: 401 and 403, HTML error pages, and bodies that echo the
/// request's headers and path back. No secret's value may appear in the database (and its
/// WAL), the log files, the output of any command, or an export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_everything_when_providers_fail() {
    const HF: &str = "hf_SeCrEtHuGgInGfAcEtOkEn0123456789";
    const OPENAI: &str = "sk-SeCrEtOpEnAiKeY0123456789abcdef";
    const TG: &str = "5550001111:AAsEcReTtElEgRaMtOkEn0123456789xyz";
    const HOOK: &str = "sEcReTwEbHoOkToKeN0123456789abcdefghijklmnop";
    // Echoes the request back: its path, and every header (the Authorization header too).
    fn echo(req: &fake_provider::Seen) -> String {
        let headers: Vec<String> = req
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!("{} {}\n{}", req.method, req.path, headers.join("\n"))
    }
    let hf = fake_provider::start(|req, _| {
        fake_provider::Reply::json(401, json!({ "error": format!("Invalid credentials in Authorization header; you sent: {}", echo(req)) }))
    })
    .await;
    let openai = fake_provider::start(|req, _| {
        fake_provider::Reply::raw(
            403,
            "text/html",
            &format!(
                "<html><head><title>403 Forbidden</title></head><body><pre>{}</pre></body></html>",
                echo(req)
            ),
        )
    })
    .await;
    let services = fake_provider::start(|req, _| {
        if req.path.contains("/bot") {
            fake_provider::Reply::json(
                401,
                json!({ "ok": false, "error_code": 401, "description": format!("Unauthorized: {}", echo(req)) }),
            )
        } else {
            fake_provider::Reply::raw(
                403,
                "text/html",
                &format!("<html><body><h1>Forbidden</h1><pre>{}</pre></body></html>", echo(req)),
            )
        }
    })
    .await;
    let env = Env::new(&[
        ("HUGGINGFACE_TOKEN", HF.into()),
        ("HF_INFERENCE_URL", hf.url.clone()),
        ("OPENAI_BASE_URL", openai.url.clone()),
        ("OPENAI_API_KEY", OPENAI.into()),
        ("TELEGRAM_BOT_TOKEN", TG.into()),
        ("TELEGRAM_CHAT_ID", "42".into()),
        ("TELEGRAM_API_URL", services.url.clone()),
        (
            "DISCORD_WEBHOOK",
            format!("{}/api/webhooks/123456789/{HOOK}", services.url),
        ),
        ("MAX_RETRIES", "0".into()),
    ]);
    std::fs::create_dir(env.path("blueprints")).unwrap();
    let bp = json!({ "name": "leaky", "nodes": [
        { "id": "hf", "type": "llm", "provider": "huggingface", "model": "m", "prompt": "hi",
          "continueOnError": true, "retry": { "attempts": 1 } },
        { "id": "oa", "type": "llm", "provider": "openai", "model": "m", "prompt": "hi",
          "continueOnError": true, "retry": { "attempts": 1 } },
        { "id": "tg", "type": "notify", "channel": "telegram", "text": "hi",
          "continueOnError": true, "retry": { "attempts": 1 } },
        { "id": "dc", "type": "notify", "channel": "discord", "text": "hi",
          "continueOnError": true, "retry": { "attempts": 1 } }
    ] });
    std::fs::write(
        env.path("blueprints/leaky.json"),
        serde_json::to_string_pretty(&bp).unwrap(),
    )
    .unwrap();
    let run_cmd = |args: Vec<String>| {
        let cmd = env.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
        tokio::task::spawn_blocking(move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        })
    };
    let mut outputs: Vec<(String, Output)> = Vec::new();
    let o = run_cmd(vec!["run".into(), "leaky".into(), "--json".into()])
        .await
        .unwrap();
    no_panic(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let run = v["runId"].as_str().unwrap().to_string();
    // Every call failed: the fakes really were asked (and answered with the secrets).
    assert!(hf.count() >= 1 && openai.count() >= 1 && services.count() >= 2);
    for step in v["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "error", "{step}");
    }
    outputs.push(("run --json".into(), o));
    for args in [
        vec!["run", "leaky"],
        vec!["show", &run],
        vec!["show", &run, "--json"],
        vec!["runs"],
        vec!["runs", "--json"],
        vec!["doctor"],
        vec!["doctor", "--json"],
        vec!["resume", "--all"],
        vec!["validate", "blueprints/leaky.json"],
    ] {
        let o = run_cmd(args.iter().map(|s| s.to_string()).collect())
            .await
            .unwrap();
        no_panic(&o);
        outputs.push((args.join(" "), o));
    }
    for target in ["python", "node", "github-action", "docker"] {
        let out = format!("export-{target}");
        let o = run_cmd(vec![
            "export".into(),
            "leaky".into(),
            "--target".into(),
            target.into(),
            "--out".into(),
            out,
        ])
        .await
        .unwrap();
        no_panic(&o);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        outputs.push((format!("export {target}"), o));
    }
    let backup = env.path("backup.db");
    let o = run_cmd(vec!["backup".into(), backup.display().to_string()])
        .await
        .unwrap();
    outputs.push(("backup".into(), o));

    // Every file under the test's directory: the database, its WAL, the logs, the
    // exports, the backup.
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(env.dir.path(), &mut all);
    assert!(
        all.iter().any(|p| p.to_string_lossy().contains("logs")),
        "{all:?}"
    );
    assert!(all
        .iter()
        .any(|p| p.to_string_lossy().contains("export-python")));
    let secrets = [HF, OPENAI, TG, HOOK];
    let mut hits = Vec::new();
    for p in &all {
        if p.ends_with("leaky.json") {
            continue; // the blueprint holds no secret, but is ours
        }
        let bytes = std::fs::read(p).unwrap();
        for s in secrets {
            if bytes.windows(s.len()).any(|w| w == s.as_bytes()) {
                hits.push(format!("{}: {s}", p.display()));
            }
        }
    }
    for (what, o) in &outputs {
        for s in secrets {
            if stdout(o).contains(s) || stderr(o).contains(s) {
                hits.push(format!("`omniflow {what}`: {s}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets found:\n{}", hits.join("\n"));
    eprintln!(
        "secrets: 0 hits for 4 secrets in {} files and {} command outputs",
        all.len(),
        outputs.len()
    );
}

/// A daemon adopts a run whose process was SIGKILLed on this host without waiting out its
/// lease: the run is finished by the daemon long before the lease could have expired.
#[test]
fn a_daemon_adopts_a_killed_run_before_its_lease_expires() {
    // An hour-long lease: only the dead pid can explain a takeover.
    let env = Env::new(&[("LEASE_TIMEOUT", "3600".into())]);
    std::fs::create_dir(env.path("blueprints")).unwrap();
    let bp = env.write(
        "short.json",
        &json!({ "name": "short", "nodes": [
            { "id": "wait", "type": "delay", "duration": "2s" },
            { "id": "after", "type": "transform", "needs": ["wait"], "template": "done" }
        ] }),
    );
    let mut daemon = env.spawn(&["daemon"]);
    let mut child = env.spawn(&["run", &bp]);
    let run = env.wait_step("wait", "running");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_at = Instant::now();
    // The lease would keep the run from anyone else for an hour; the daemon sees the process
    // is gone and takes it over (a generous bound for a loaded machine, not a timing).
    let adopted = loop {
        let (status, _) = env.status(&run);
        if status == "success" {
            break true;
        }
        if killed_at.elapsed() > Duration::from_secs(120) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill(&daemon, "TERM");
    let _ = daemon.wait();
    let _ = daemon.stdout.take();
    assert!(
        adopted,
        "the daemon did not take the run over before its lease expired"
    );
    let takeovers: i64 = env
        .sql()
        .query_row(
            "SELECT takeovers FROM runner_executions WHERE id = ?1",
            [&run],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(takeovers, 1);
}

/// The log files stop being written after the daemon started (its `LOG_DIR` fills up): the
/// daemon says so once on stderr, where systemd and Docker collect it, and `/readyz` shows it
/// under `checks.logs`, while the daemon goes on working (it adopts and finishes a run).
#[test]
fn a_daemon_says_once_when_its_logs_stop_being_written() {
    with_tmpfs("1m", |mnt| {
        let env = Env::new(&[("LEASE_TIMEOUT", "3600".into())]);
        std::fs::create_dir(env.path("blueprints")).unwrap();
        // After the wait, 100 steps: more log lines than the last page of the log file
        // (already allocated on the tmpfs) can hold. Nodes of their own, each with its info
        // line (a fan-out's items log at debug level).
        let mut nodes = vec![json!({ "id": "wait", "type": "delay", "duration": "2s" })];
        nodes.extend((0..100).map(|i| {
            json!({ "id": format!("after{i}"), "type": "transform", "needs": ["wait"],
                    "template": format!("done {i}") })
        }));
        let bp = env.write("short.json", &json!({ "name": "short", "nodes": nodes }));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut daemon = env
            .cmd(&["daemon", "--listen", &listen])
            .env("LOG_DIR", mnt)
            .spawn()
            .unwrap();
        let seen = collect_stderr(&mut daemon);
        let until = Instant::now() + Duration::from_secs(120);
        while !seen.lock().unwrap().contains("daemon started") {
            assert!(Instant::now() < until, "the daemon never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The disk under LOG_DIR fills to the last byte.
        let _ = std::fs::write(mnt.join("filler"), vec![0u8; 2 << 20]);
        // Work for the daemon, so it has lines to log: a run whose process was killed.
        let mut child = env.spawn(&["run", &bp]);
        let run = env.wait_step("wait", "running");
        child.kill().unwrap();
        child.wait().unwrap();
        let told = loop {
            let s = seen.lock().unwrap().clone();
            if s.contains("could not write logs to") {
                break s;
            }
            assert!(
                Instant::now() < until,
                "the daemon never said its logs are lost:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(told.contains(&mnt.display().to_string()), "{told}");
        // It keeps working: the run is adopted and finished.
        while env.status(&run).0 != "success" {
            assert!(Instant::now() < until, "the daemon stopped working");
            std::thread::sleep(Duration::from_millis(50));
        }
        let raw = "GET /readyz HTTP/1.1\r\nHost: omniflow\r\nConnection: close\r\n\r\n";
        let mut s = std::net::TcpStream::connect(&listen).unwrap();
        use std::io::{Read, Write};
        s.write_all(raw.as_bytes()).unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        assert!(body.contains("could not write logs to"), "/readyz: {body}");
        kill(&daemon, "TERM");
        let _ = daemon.wait();
        let all = seen.lock().unwrap().clone();
        assert_eq!(
            all.matches("could not write logs to").count(),
            1,
            "said once, not per line:\n{all}"
        );
    });
}
