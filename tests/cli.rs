//! The real `omniflow` binary: exit codes, `--json`, history, logs, and bad input.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("history.db")
    }

    fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// The binary with a private DB_FILE and LOG_DIR, fast waits, and no .env of ours.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = common::bin::omniflow(
            self.dir.path(),
            args,
            common::bin::private_files(self.dir.path(), "history.db"),
        );
        c.env("OMNIFLOW_TIME_SCALE", "0.01");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn one_json(o: &Output) -> Value {
    let text = stdout(o);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {text}"));
    assert!(v.is_object());
    v
}

#[test]
fn sandbox_run_with_failures_succeeds_and_is_recorded() {
    let s = Sandbox::new();
    let dir = bundled();
    let o = s.run(&[
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
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = one_json(&o);
    for key in [
        "runId",
        "blueprint",
        "status",
        "totalTimeMs",
        "outputs",
        "steps",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["status"], "success");
    assert_eq!(v["blueprint"], "tech-digest");
    assert_eq!(v["outputs"]["summarize"].as_array().unwrap().len(), 40);
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 42);
    for st in steps {
        for key in [
            "node",
            "status",
            "attempts",
            "durationMs",
            "tokensUsed",
            "cached",
            "error",
        ] {
            assert!(st.get(key).is_some(), "step lacks {key}: {st}");
        }
    }
    let retried = steps
        .iter()
        .filter(|s| s["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(retried > 0, "30 % injected failures cause retries");
    // The notification was recorded, not sent.
    assert_eq!(v["outputs"]["post"]["delivered"], false);

    // History: the row, its steps, and the original's monitoring query.
    let id = v["runId"].as_str().unwrap();
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    let (name, status): (String, String) = conn
        .query_row(
            "SELECT blueprint_name, status FROM runner_executions ORDER BY started_at DESC LIMIT 10;",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((name.as_str(), status.as_str()), ("tech-digest", "success"));
    let failed_attempts: i64 = conn
        .query_row(
            "SELECT count(*) FROM runner_attempts WHERE run_id = ?1 AND status = 'error'",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        failed_attempts as usize,
        steps
            .iter()
            .map(|s| s["attempts"].as_u64().unwrap() as usize - 1)
            .sum::<usize>()
    );

    // Logs: JSON lines carrying the run id.
    let files = omniflow::logging::log_files(&s.logs());
    assert!(!files.is_empty(), "a log file in LOG_DIR");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("attempt failed, retrying"))
        .expect("retries are logged");
    let parsed: Value = serde_json::from_str(line).unwrap();
    assert_eq!(parsed["run_id"], id);
    assert!(parsed["step"].as_str().unwrap().starts_with("summarize["));
    // A fan-out is one info line when it ends, not one per item (its items' successes are
    // debug lines, below the default level); other steps say each.
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let said =
        |msg: &str| -> Vec<&Value> { lines.iter().filter(|l| l["message"] == msg).collect() };
    let fan = said("fan-out finished");
    assert_eq!(fan.len(), 1, "{text}");
    assert_eq!(fan[0]["step"], "summarize");
    assert_eq!(fan[0]["items"], 40);
    assert_eq!(fan[0]["status"], "succeeded");
    let succeeded = said("step succeeded");
    assert!(
        succeeded
            .iter()
            .all(|l| !l["step"].as_str().unwrap().contains('[')),
        "{succeeded:?}"
    );
    assert!(
        succeeded.iter().any(|l| l["step"] == "digest"),
        "{succeeded:?}"
    );

    // `show` and `runs` read it back.
    let shown = s.run(&["show", &id[..8], "--json"]);
    assert_eq!(shown.status.code(), Some(0), "{}", stderr(&shown));
    let sv = one_json(&shown);
    assert_eq!(sv["run"]["id"], id);
    assert_eq!(sv["steps"].as_array().unwrap().len(), 42);
    let runs = s.run(&["runs", "--json"]);
    assert_eq!(one_json(&runs)["runs"][0]["id"], id);
    let human = s.run(&["show", id]);
    assert!(
        stdout(&human).contains("failed attempts:"),
        "{}",
        stdout(&human)
    );
}

#[test]
fn every_bundled_blueprint_runs_in_the_sandbox() {
    let s = Sandbox::new();
    let dir = bundled();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let o = s.run(&["run", path.to_str().unwrap(), "--sandbox", "--json"]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            stderr(&o)
        );
        assert_eq!(one_json(&o)["status"], "success");
    }
}

#[test]
fn a_failed_run_exits_1_and_names_the_step() {
    let s = Sandbox::new();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bp = s.write(
        "down.json",
        &format!(
            r#"{{ "name": "down", "nodes": [
                {{ "id": "fetch", "type": "http", "url": "http://127.0.0.1:{port}/", "retry": {{ "attempts": 2 }} }}
            ] }}"#
        ),
    );
    let o = s.run(&["run", bp.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = one_json(&o);
    assert_eq!(v["status"], "error");
    assert_eq!(v["failedStep"], "fetch");
    assert_eq!(v["steps"][0]["attempts"], 2);
    assert_eq!(v["errorKind"], "network");
    let errors = s.run(&["runs", "--status", "error", "--json"]);
    assert_eq!(one_json(&errors)["runs"].as_array().unwrap().len(), 1);
}

#[test]
fn validate_reports_every_problem_with_its_path() {
    let s = Sandbox::new();
    let bad = s.write(
        "bad.json",
        r#"{ "name": "x", "schedule": "61 * * * *",
             "nodes": [
               { "id": "summarize", "type": "llm", "promt": "hi" },
               { "id": "digest", "type": "transform", "needs": ["sumarize"], "template": "{{ vars.NOPE }}" },
               { "id": "digest", "type": "delay", "duration": "300" }
             ] }"#,
    );
    let o = s.run(&["validate", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let out = stdout(&o);
    for needle in [
        "nodes[0].promt",
        "did you mean \"prompt\"",
        "nodes[1].needs[0]",
        "unknown node \"sumarize\"",
        "nodes[2].id",
        "duplicate",
        "schedule",
        "unknown variable \"NOPE\"",
        "300s",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let good = bundled().join("tech-digest.json");
    let o = s.run(&["validate", good.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn bad_input_exits_2_with_a_message_naming_the_fix() {
    let s = Sandbox::new();
    let dir = bundled();
    let dir = dir.to_str().unwrap();
    let wrong_ext = bundled().join("triage.json");
    let wrong_ext = wrong_ext.to_str().unwrap();
    let nowhere = s.db().with_file_name("no-such-folder");
    let nowhere = nowhere.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "tech-digst", "--dir", dir, "--sandbox"],
            "did you mean",
        ),
        // triage is TOML: the other extension is suggested.
        (vec!["run", wrong_ext, "--sandbox"], "triage.toml?"),
        (
            vec!["run", "triage", "--dir", nowhere, "--sandbox"],
            "there is no directory",
        ),
        (
            vec![
                "run",
                "tech-digest",
                "--dir",
                dir,
                "--sandbox",
                "--var",
                "nope",
            ],
            "KEY=VALUE",
        ),
        (
            vec![
                "run",
                "tech-digest",
                "--dir",
                dir,
                "--sandbox",
                "--var",
                "TOPIX=1",
            ],
            "declared: TOPICS",
        ),
        (
            vec![
                "run",
                "tech-digest",
                "--dir",
                dir,
                "--simulate-failures",
                "0.3",
            ],
            "--sandbox",
        ),
        (
            vec![
                "run",
                "tech-digest",
                "--dir",
                dir,
                "--sandbox",
                "--simulate-failures",
                "3",
            ],
            "from 0 to 1",
        ),
        (vec!["runs", "--status", "done"], "expected queued"),
        (vec!["show", "zzzzzz"], "omniflow runs"),
    ];
    for (args, needle) in cases {
        let o = s.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }
    // Malformed JSON names the line.
    let broken = s.write("broken.json", "{ \"name\": \"x\",\n  \"nodes\": [ }");
    let o = s.run(&["run", broken.to_str().unwrap(), "--sandbox"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stdout(&o).contains("line 2") || stderr(&o).contains("line 2"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_db_file_that_is_not_sqlite_is_refused_and_left_alone() {
    let s = Sandbox::new();
    let text = "these are my notes, not a database\n".repeat(200);
    std::fs::write(s.db(), &text).unwrap();
    let dir = bundled();
    let o = s.run(&["run", "triage", "--dir", dir.to_str().unwrap(), "--sandbox"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not an SQLite database"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("DB_FILE"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(s.db()).unwrap(), text);
}

#[test]
fn an_unwritable_log_dir_is_refused_before_anything_runs() {
    let s = Sandbox::new();
    let file = s.write("not-a-dir", "x");
    let dir = bundled();
    let o = s
        .cmd(&["run", "triage", "--dir", dir.to_str().unwrap(), "--sandbox"])
        .env("LOG_DIR", file.join("logs"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("LOG_DIR"), "{}", stderr(&o));
}

#[test]
fn a_log_dir_that_is_a_file_is_named_with_its_fix_by_every_command() {
    let s = Sandbox::new();
    let file = s.write("not-a-dir", "x");
    for args in [&["resume", "0abc"][..], &["daemon"][..]] {
        let o = s.cmd(args).env("LOG_DIR", &file).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("set LOG_DIR to a writable directory"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // doctor reports it as a problem, not as a directory that does not exist yet.
    let o = s.cmd(&["doctor"]).env("LOG_DIR", &file).output().unwrap();
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("is not writable (it is a file, not a directory); set LOG_DIR"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "x",
        "left untouched"
    );
}

#[test]
fn secrets_never_reach_logs_or_history() {
    let s = Sandbox::new();
    let token = "hf_SuperSecretToken1234567890";
    let dir = bundled();
    let o = s
        .cmd(&[
            "run",
            "tech-digest",
            "--dir",
            dir.to_str().unwrap(),
            "--sandbox",
            "--json",
        ])
        .env("HUGGINGFACE_TOKEN", token)
        .env("TELEGRAM_BOT_TOKEN", "123456:ABCdefSecretBotToken")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut everything = stdout(&o) + &stderr(&o);
    for f in omniflow::logging::log_files(&s.logs()) {
        everything.push_str(&std::fs::read_to_string(f).unwrap());
    }
    everything.push_str(&String::from_utf8_lossy(&std::fs::read(s.db()).unwrap()));
    assert!(!everything.contains(token));
    assert!(!everything.contains("ABCdefSecretBotToken"));
}

#[test]
fn schema_and_backup() {
    let s = Sandbox::new();
    let o = s.run(&["schema"]);
    assert_eq!(o.status.code(), Some(0));
    let schema = one_json(&o);
    assert!(schema["$schema"]
        .as_str()
        .unwrap()
        .contains("json-schema.org"));
    assert!(schema["properties"]["nodes"].is_object());

    let dir = bundled();
    let r = s.run(&[
        "run",
        "triage",
        "--dir",
        dir.to_str().unwrap(),
        "--sandbox",
        "--json",
    ]);
    assert_eq!(r.status.code(), Some(0), "{}", stderr(&r));
    let copy = s.dir.path().join("copy.db");
    let b = s.run(&["backup", copy.to_str().unwrap()]);
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM runner_executions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn doctor_lists_the_processes_on_the_database_and_runs_left_by_dead_ones() {
    use omniflow::events::PoolStats;
    use omniflow::store::{Health, Store};
    let s = Sandbox::new();
    let store = Store::open(&s.db()).unwrap();
    // This test process heartbeats as a daemon would.
    store.heartbeat(Health {
        role: "daemon".into(),
        at: std::time::SystemTime::now(),
        rss_mb: Some(42.0),
        pool: PoolStats {
            running: 3,
            concurrency: 32,
            queued: [0, 5, 0, 0],
            ..PoolStats::default()
        },
    });
    store.flush_blocking();
    // A console that died an hour ago with a run in flight.
    let c = rusqlite::Connection::open(s.db()).unwrap();
    c.execute(
        "INSERT INTO runner_processes (id, host, pid, role, version, started_at, heartbeat_at, heartbeat_ms)
         VALUES ('web1:77:1', 'web1', 77, 'console', '0.1.0', '2026-01-01T00:00:00.000Z',
                 '2026-01-01T01:00:00.000Z', 1767229200000)",
        [],
    )
    .unwrap();
    c.execute(
        "INSERT INTO runner_executions (id, blueprint_name, status, priority, trigger, sandbox,
             variables, blueprint, queued_at, started_at, owner)
         VALUES ('orphan0000042', 't', 'running', 'normal', 'console', 0, '{}', '{}',
                 '2026-01-01T00:30:00.000Z', '2026-01-01T00:30:00.000Z', 'web1:77:1')",
        [],
    )
    .unwrap();
    // Real lease timing (30 s), so this process's fresh heartbeat counts as alive.
    let o = s
        .cmd(&["doctor", "--json"])
        .env("OMNIFLOW_TIME_SCALE", "1")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let procs = v["processes"].as_array().unwrap();
    let me = procs
        .iter()
        .find(|p| p["pid"] == std::process::id())
        .expect("this process");
    assert_eq!(me["state"], "alive");
    assert_eq!(
        (me["running"].as_u64(), me["queued"].as_u64()),
        (Some(3), Some(5))
    );
    let dead = procs
        .iter()
        .find(|p| p["pid"] == 77)
        .expect("the dead console");
    assert_eq!(dead["state"], "gone");
    assert_eq!(v["orphanedRuns"], serde_json::json!(["orphan0000042"]));

    let o = s
        .cmd(&["doctor"])
        .env("OMNIFLOW_TIME_SCALE", "1")
        .output()
        .unwrap();
    let text = stdout(&o);
    assert!(
        text.contains("processes on this database: 1 alive")
            && text.contains("● daemon")
            && text.contains("3/32 busy, 5 queued · 42 MB")
            && text.contains("✗ console web1:77  silent since 01:00:00 UTC")
            && text.contains("1 unfinished run(s) whose process is gone"),
        "{text}"
    );
}
