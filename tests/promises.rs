//! What the README promises, through the real binary, read as a user reads it: the whole-run
//! timeout, `--priority`, `runs --blueprint/--status/--limit`, `daemon --sandbox`,
//! `SCHEDULE_MISSED`, `--source`, and the memory hold. Every command's exit status is checked.

mod common;
mod fakes;

use omniflow::store::{RunFilter, Store};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        let d = Dir {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(d.bps()).unwrap();
        d
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("history.db")
    }

    fn bps(&self) -> PathBuf {
        self.dir.path().join("bps")
    }

    fn blueprint(&self, bp: Value) -> PathBuf {
        let p = self
            .bps()
            .join(format!("{}.json", bp["name"].as_str().unwrap()));
        std::fs::write(&p, bp.to_string()).unwrap();
        p
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = common::bin::omniflow(self.dir.path(), args, [("DB_FILE", self.db())]);
        c.env("LOG_DIR", self.dir.path().join("logs"))
            .env("OMNIFLOW_TIME_SCALE", "0.001");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed and print one JSON object.
    fn json(&self, args: &[&str]) -> Value {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o.stderr));
        serde_json::from_str(text(&o.stdout).trim())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&o.stdout)))
    }

    fn daemon(&self, extra_args: &[&str], env: &[(&str, &str)]) -> Child {
        let bps = self.bps();
        let mut args = vec!["daemon", "--dir", bps.to_str().unwrap()];
        args.extend(extra_args);
        let mut c = self.cmd(&args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn all_runs() -> RunFilter {
    RunFilter {
        limit: 1000,
        ..Default::default()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Waits (generously: the machine is shared) until `f` holds.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: signals a child process this test started and still owns.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
}

fn runs(d: &Dir, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["runs", "--json"];
    all.extend(args);
    d.json(&all)["runs"].as_array().unwrap().clone()
}

/// A missed slot of `name` two hours ago, as if the last firing was then.
fn missed_slot(db: &Path, name: &str) {
    let store = Store::open(db).unwrap();
    let past = SystemTime::now() - Duration::from_secs(7200);
    assert!(store.claim_slot(name, past).unwrap());
}

#[test]
fn a_run_longer_than_its_timeout_is_stopped_and_says_which_setting_to_raise() {
    let d = Dir::new();
    // Scaled ×0.001: the run may take 0.1 s, its delay wants 60 s.
    let f = d.blueprint(json!({
        "name": "slow", "timeout": "100s",
        "nodes": [
            { "id": "wait", "type": "delay", "duration": "60000s" },
            { "id": "after", "type": "transform", "needs": ["wait"], "template": "never" }
        ]
    }));
    let o = d.run(&["run", f.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("exceeded its timeout"), "{err}");
    assert!(err.contains("\"timeout\""), "names the setting: {err}");
    let run = &runs(&d, &[])[0];
    assert_eq!(run["status"], "error", "{run}");
    let shown = d.json(&["show", run["id"].as_str().unwrap(), "--json"]);
    let steps = shown["steps"].as_array().unwrap();
    let wait = steps.iter().find(|s| s["step_key"] == "wait").unwrap();
    assert_ne!(wait["status"], "success", "{wait}");
    assert!(
        steps
            .iter()
            .all(|s| s["step_key"] != "after" || s["status"] != "success"),
        "{steps:?}"
    );
}

#[test]
fn priority_is_recorded_and_history_filters_by_blueprint_status_and_limit() {
    let d = Dir::new();
    let ok = d.blueprint(
        json!({ "name": "ok", "nodes": [{ "id": "a", "type": "transform", "template": "x" }] }),
    );
    // Nothing listens on port 1: the fetch fails, once (no retry).
    let bad = d.blueprint(json!({ "name": "bad", "nodes": [
        { "id": "a", "type": "http", "url": "http://127.0.0.1:1/", "retry": { "attempts": 1 } }] }));
    let o = d.run(&["run", ok.to_str().unwrap(), "--priority", "high"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // The run's id comes last, after its outputs, where a person's eye ends up.
    let last = text(&o.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("details: omniflow show "), "{last}");
    for _ in 0..2 {
        let o = d.run(&["run", ok.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
    let o = d.run(&["run", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));

    let o = d.run(&["run", ok.to_str().unwrap(), "--priority", "urgent"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("critical, high, normal or low"));

    let all = runs(&d, &[]);
    assert_eq!(all.len(), 4, "{all:?}");
    let oldest = all.last().unwrap();
    assert_eq!(oldest["priority"], "high", "{oldest}");
    assert!(all[..3].iter().all(|r| r["priority"] == "normal"));

    let two = runs(&d, &["--blueprint", "ok", "--limit", "2"]);
    assert_eq!(two.len(), 2);
    assert!(two.iter().all(|r| r["blueprint_name"] == "ok"));
    assert_eq!(two[0]["id"], all[1]["id"], "newest first");

    let errors = runs(&d, &["--status", "error"]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["blueprint_name"], "bad");

    // The human table says the same.
    let o = d.run(&["runs", "--blueprint", "bad"]);
    assert_eq!(o.status.code(), Some(0));
    let table = text(&o.stdout);
    assert!(table.contains("bad") && table.contains("error"), "{table}");
    let said = text(&o.stderr);
    assert!(
        said.contains(&format!("history: {}", d.db().display())),
        "runs says which database it read: {said}"
    );
    assert!(!table.contains(" ok "), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_daemon_fires_schedules_with_the_simulated_model_and_sends_nothing() {
    let tg = fakes::telegram("1:tok").await;
    let d = Dir::new();
    d.blueprint(json!({
        "name": "tick", "schedule": "* * * * *", "missedSlots": "runOnce",
        "nodes": [
            { "id": "ask", "type": "llm", "prompt": "One line on rust." },
            { "id": "post", "type": "notify", "needs": ["ask"], "channel": "telegram",
              "text": "{{ nodes.ask.output }}" }
        ]
    }));
    missed_slot(&d.db(), "tick");
    let tg_url = tg.url.clone();
    let db = d.db();
    let child = tokio::task::spawn_blocking(move || {
        let child = d.daemon(
            &["--sandbox"],
            &[
                ("TELEGRAM_BOT_TOKEN", "1:tok"),
                ("TELEGRAM_CHAT_ID", "7"),
                ("TELEGRAM_API_URL", &tg_url),
            ],
        );
        let store = Store::open(&db).unwrap();
        wait_for("the missed slot's run to finish", || {
            let r = store.list_runs(&all_runs()).unwrap();
            r.iter().any(|r| r.status.is_final())
        });
        sigterm(&child);
        (d, child.wait_with_output().unwrap())
    })
    .await
    .unwrap();
    let (d, out) = child;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let all = runs(&d, &[]);
    // The missed slot's run; a second one only when the test crossed a minute's edge (the
    // next slot fired, and may still have been under way when the daemon stopped).
    assert!(!all.is_empty() && all.len() <= 2, "{all:?}");
    let run = all
        .iter()
        .min_by_key(|r| r["queued_at"].as_str().unwrap_or_default().to_string())
        .unwrap();
    assert_eq!(run["status"], "success", "{run}");
    assert_eq!(run["trigger"], "schedule");
    assert_eq!(run["sandbox"], true);
    let shown = d.json(&["show", run["id"].as_str().unwrap(), "--json"]);
    let post = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step_key"] == "post")
        .unwrap()
        .clone();
    assert_eq!(post["output"]["delivered"], false, "{post}");
    assert!(tg.requests().is_empty(), "a sandbox daemon sent a message");
}

#[test]
fn schedule_missed_sets_the_default_for_blueprints_that_say_nothing() {
    let d = Dir::new();
    // No "missedSlots": SCHEDULE_MISSED decides.
    d.blueprint(json!({
        "name": "nightly", "schedule": "* * * * *",
        "nodes": [{ "id": "a", "type": "transform", "template": "ran" }]
    }));
    missed_slot(&d.db(), "nightly");
    let child = d.daemon(&[], &[("SCHEDULE_MISSED", "runOnce")]);
    let store = Store::open(&d.db()).unwrap();
    wait_for("the missed slot's run", || {
        store
            .list_runs(&Default::default())
            .unwrap()
            .iter()
            .any(|r| r.status.is_final())
    });
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let all = runs(&d, &[]);
    assert_eq!(all.len(), 1, "one run for everything missed: {all:?}");
    assert_eq!(all[0]["status"], "success");

    // A bad value is refused with the accepted ones named, before anything runs.
    let o = d
        .cmd(&["daemon", "--dir", d.bps().to_str().unwrap()])
        .env("SCHEDULE_MISSED", "sometimes")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("SCHEDULE_MISSED"),
        "{}",
        text(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_active_reads_the_source_it_is_told() {
    let row = json!({
        "id": 1, "name": "from-supabase", "active": true,
        "blueprint": { "name": "from-supabase",
                       "nodes": [{ "id": "a", "type": "transform", "template": "cloud" }] }
    });
    let sb = fakes::supabase("sb-key", "blueprints", vec![row]).await;
    let d = Dir::new();
    d.blueprint(json!({ "name": "from-dir", "nodes": [{ "id": "a", "type": "transform", "template": "disk" }] }));
    let bps = d.bps();
    let sb_url = sb.url.clone();
    let d = tokio::task::spawn_blocking(move || {
        let names = |source: &str| -> Vec<String> {
            let o = d
                .cmd(&[
                    "run",
                    "--all-active",
                    "--dir",
                    bps.to_str().unwrap(),
                    "--source",
                    source,
                ])
                .env("SUPABASE_URL", &sb_url)
                .env("SUPABASE_KEY", "sb-key")
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(0), "{source}: {}", text(&o.stderr));
            let mut n: Vec<String> = runs(&d, &["--limit", "1"])
                .iter()
                .map(|r| r["blueprint_name"].as_str().unwrap().to_string())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names("dir"), ["from-dir"]);
        assert_eq!(names("supabase"), ["from-supabase"]);
        d
    })
    .await
    .unwrap();
    let before = runs(&d, &[]).len();
    let o = d
        .cmd(&[
            "run",
            "--all-active",
            "--dir",
            d.bps().to_str().unwrap(),
            "--source",
            "both",
        ])
        .env("SUPABASE_URL", &sb.url)
        .env("SUPABASE_KEY", "sb-key")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut latest: Vec<String> = runs(&d, &[])[..runs(&d, &[]).len() - before]
        .iter()
        .map(|r| r["blueprint_name"].as_str().unwrap().to_string())
        .collect();
    latest.sort();
    assert_eq!(latest, ["from-dir", "from-supabase"]);
}

/// Steps' [start, end] in ms from their ISO-8601 UTC times, by start.
fn spans(steps: &[Value]) -> Vec<(i64, i64)> {
    let ms = |v: &Value| -> i64 {
        let t = humantime::parse_rfc3339(v.as_str().unwrap()).unwrap();
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
    };
    let mut s: Vec<(i64, i64)> = steps
        .iter()
        .map(|s| (ms(&s["started_at"]), ms(&s["finished_at"])))
        .collect();
    s.sort();
    s
}

/// Above `MEMORY_THRESHOLD_MB` a daemon's pool starts no step while another runs: a fan-out
/// goes one step at a time (never none, so the process keeps moving while memory is high).
#[test]
fn above_the_memory_threshold_a_daemon_runs_one_step_at_a_time() {
    let fan = |d: &Dir, name: &str| {
        d.blueprint(json!({
            "name": name, "schedule": "* * * * *", "missedSlots": "runOnce",
            "variables": { "T": ["a", "b", "c", "d", "e", "f"] },
            "nodes": [{ "id": "ask", "type": "llm", "forEach": "{{ vars.T }}", "prompt": "On {{ item }}." }]
        }));
        missed_slot(&d.db(), name);
    };
    // 150 s of simulated latency ×0.001: each call takes 150 ms.
    let latency = ("SANDBOX_LATENCY_MS", "150000");
    let finish = |d: &Dir, threshold: &str| -> (Vec<(i64, i64)>, bool) {
        let child = d.daemon(
            &["--sandbox"],
            &[("MEMORY_THRESHOLD_MB", threshold), latency],
        );
        let store = Store::open(&d.db()).unwrap();
        let mut held = false;
        wait_for("the slot's run to finish", || {
            held |= store
                .processes(Duration::from_secs(30))
                .unwrap()
                .iter()
                .any(|p| p.role == "daemon" && p.memory_hold);
            store
                .list_runs(&all_runs())
                .unwrap()
                .iter()
                .any(|r| r.status.is_final())
        });
        sigterm(&child);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        // The missed slot's run, the first queued: when the test crosses a minute's edge the
        // schedule fires its next slot too, and that run is still under way when the daemon
        // stops.
        let all = runs(d, &[]);
        let run = all
            .iter()
            .min_by_key(|r| r["queued_at"].as_str().unwrap_or_default().to_string())
            .unwrap();
        assert_eq!(run["status"], "success", "{run}");
        let shown = d.json(&["show", run["id"].as_str().unwrap(), "--json"]);
        (spans(shown["steps"].as_array().unwrap()), held)
    };

    // 1 MB: every process is above it, from the first reading on.
    let d = Dir::new();
    fan(&d, "held");
    let (steps, held) = finish(&d, "1");
    assert!(held, "the heartbeat reported the memory hold");
    assert_eq!(steps.len(), 6);
    // A step's end is recorded just after its call leaves the pool, so the next one may start
    // a few ms before that record; calls running side by side would overlap by ~150 ms.
    const SLACK_MS: i64 = 50;
    for w in steps.windows(2) {
        assert!(
            w[1].0 >= w[0].1 - SLACK_MS,
            "two steps ran at once under the hold: {steps:?}"
        );
    }
    let log = std::fs::read_dir(d.dir.path().join("logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect::<String>();
    // Once, when the hold begins: not again at every reading while it lasts.
    assert_eq!(
        log.matches("memory above MEMORY_THRESHOLD_MB").count(),
        1,
        "the log says why, once: {log}"
    );

    // The same fan-out under the default threshold runs its steps side by side.
    let d = Dir::new();
    fan(&d, "free");
    let (steps, held) = finish(&d, "500");
    assert!(!held);
    assert!(
        steps.windows(2).any(|w| w[1].0 < w[0].1 - SLACK_MS),
        "without the hold the calls overlap: {steps:?}"
    );
}

fn log_text(d: &Dir) -> String {
    std::fs::read_dir(d.dir.path().join("logs"))
        .map(|r| {
            r.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// A run with retries writes every state change once and cleanly: the log has no "ignored"
/// store write (each one would be a transition that found the row in an unexpected state), and
/// the rows name this host.
#[test]
fn a_run_with_retries_records_every_transition_without_a_warning() {
    let d = Dir::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    let o = d.run(&[
        "run",
        "tech-digest",
        "--dir",
        dir.to_str().unwrap(),
        "--sandbox",
        "--simulate-failures",
        "0.3",
        "--seed",
        "7",
        "--json",
    ]);
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "{}",
        text(&o.stderr)
    );
    let report: Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    let retried = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["attempts"].as_u64().unwrap_or(0) > 1)
        .count();
    assert!(retried > 0, "seed 7 at 30 % retries some steps");
    let log = log_text(&d);
    assert!(log.contains("attempt failed"), "the retries are logged");
    assert!(
        !log.contains("store: ignored"),
        "a normal run's writes were refused: {}",
        log.lines()
            .filter(|l| l.contains("store: ignored"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let db = rusqlite::Connection::open(d.db()).unwrap();
    let recorded: String = db
        .query_row("SELECT host FROM runner_executions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(recorded, host);
    let proc_host: String = db
        .query_row("SELECT host FROM runner_processes LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(proc_host, host);
}

/// While a step waits for its next attempt, `show` says `retrying`, not `running`.
#[test]
fn show_says_retrying_during_a_backoff() {
    let d = Dir::new();
    // Nothing listens on port 1; the backoff is a real 60 s (time scale 1), so the step sits
    // in `retrying` until the test kills the run.
    let f = d.blueprint(json!({ "name": "backoff", "nodes": [
        { "id": "fetch", "type": "http", "url": "http://127.0.0.1:1/",
          "retry": { "attempts": 3, "backoff": "60s" } }] }));
    let mut child = d
        .cmd(&["run", f.to_str().unwrap()])
        .env("OMNIFLOW_TIME_SCALE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = String::new();
    wait_for("the step to be recorded as retrying", || {
        let Some(run) = runs(&d, &[]).first().cloned() else {
            return false;
        };
        let shown = d.json(&["show", run["id"].as_str().unwrap(), "--json"]);
        status = shown["steps"][0]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        status == "retrying"
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status, "retrying");
    let run = &runs(&d, &[])[0];
    let o = d.run(&["show", run["id"].as_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o.stdout).contains("retrying"), "{}", text(&o.stdout));
}

/// A running daemon adopts a run whose process was killed, by itself (no `resume` typed), and
/// finishes it without running again the steps recorded as done.
#[test]
fn a_live_daemon_adopts_a_killed_run_by_itself() {
    let d = Dir::new();
    let f = d.blueprint(json!({
        "name": "long",
        "variables": { "T": (0..12).map(|i| format!("t{i}")).collect::<Vec<_>>() },
        "nodes": [
            { "id": "ask", "type": "llm", "forEach": "{{ vars.T }}", "prompt": "On {{ item }}." },
            { "id": "join", "type": "transform", "needs": ["ask"], "template": "{{ nodes.ask.output | length }}" }
        ]
    }));
    // One call at a time, 300 ms each (scaled): the kill lands mid-fan-out.
    let mut run = d
        .cmd(&["run", f.to_str().unwrap(), "--sandbox"])
        .env("CONCURRENCY", "1")
        .env("SANDBOX_LATENCY_MS", "300000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = Store::open(&d.db()).unwrap();
    let done_before = |store: &Store| -> Vec<(String, Option<std::time::SystemTime>)> {
        let Some(r) = store.list_runs(&all_runs()).unwrap().first().cloned() else {
            return Vec::new();
        };
        store
            .run_steps(&r.id)
            .unwrap()
            .into_iter()
            .filter(|s| s.status == omniflow::events::StepStatus::Success)
            .map(|s| (s.step_key, s.started_at))
            .collect()
    };
    wait_for("two steps done", || done_before(&store).len() >= 2);
    run.kill().unwrap();
    run.wait().unwrap();
    let before = done_before(&store);
    assert!(before.len() < 13, "the run was killed before its end");

    // An idle daemon with no schedule: all it can do is adopt.
    let daemon = d.daemon(&[], &[("SANDBOX_LATENCY_MS", "1000")]);
    wait_for("the daemon to finish the killed run", || {
        store
            .list_runs(&all_runs())
            .unwrap()
            .first()
            .is_some_and(|r| r.status.is_final())
    });
    sigterm(&daemon);
    let out = daemon.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r = &store.list_runs(&all_runs()).unwrap()[0];
    assert_eq!(r.status, omniflow::events::RunStatus::Success, "{r:?}");
    let steps = store.run_steps(&r.id).unwrap();
    assert_eq!(steps.len(), 13);
    for (key, started) in &before {
        let s = steps.iter().find(|s| &s.step_key == key).unwrap();
        assert_eq!(&s.started_at, started, "{key} ran again after the takeover");
        assert_eq!(s.attempts, 1, "{key}");
    }
    let shown = d.json(&["show", &r.id, "--json"]);
    assert_eq!(shown["steps"].as_array().unwrap().len(), 13);
    // The steps reused from before the kill are not written again (the store would refuse
    // each one and log a warning for it).
    let log = log_text(&d);
    assert!(
        !log.contains("store: ignored"),
        "the adoption rewrote finished steps: {}",
        log.lines()
            .filter(|l| l.contains("store: ignored"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
