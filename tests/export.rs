//! `omniflow export`: the generated files are checked (py_compile, node --check, the workflow
//! YAML, the Dockerfile), and the exported Python and Node programs are *run* against the same
//! fake servers as `omniflow run`, with the same scripted failures: same outputs, same steps,
//! same number of calls at the fakes, same `runner_executions` rows.
//!
//! Node's history needs `better-sqlite3`; it is installed once into
//! `target/export-node-deps` (from the npm registry). When that fails the node runs still
//! compare outputs and calls, and say clearly that rows were not checked.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_omniflow");

// ---------------------------------------------------------------------------------------------
// A scripted fake HTTP server (threads, std only)

#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.into(),
    }
}

fn text_reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: body.into(),
    }
}

fn with_header(mut r: Reply, k: &str, v: &str) -> Reply {
    r.headers.push((k.into(), v.into()));
    r
}

/// Route prefix → replies in order (the last one repeats). `ECHO` answers a chat completion
/// about the request's last message.
type Script = Vec<(&'static str, Vec<Reply>)>;

struct Fake {
    url: String,
    calls: Arc<Mutex<Vec<(String, String)>>>,
}

impl Fake {
    fn start(script: Script) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let script = Arc::new(script);
        let c = calls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let calls = c.clone();
                let script = script.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let head_end = loop {
                        let n = stream.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let n = stream.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (route, nth) = {
                        let mut calls = calls.lock().unwrap();
                        calls.push((path.clone(), body.clone()));
                        let route = script
                            .iter()
                            .filter(|(p, _)| path.starts_with(p))
                            .max_by_key(|(p, _)| p.len())
                            .map(|(p, _)| *p);
                        let nth = calls
                            .iter()
                            .filter(|(p, _)| route.is_some_and(|r| p.starts_with(r)))
                            .count()
                            - 1;
                        (route, nth)
                    };
                    let r = match route.and_then(|r| script.iter().find(|(p, _)| *p == r)) {
                        Some((_, replies)) => replies[nth.min(replies.len() - 1)].clone(),
                        None => text_reply(404, "no route"),
                    };
                    let body_out = if r.body == "ECHO" {
                        let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let last = req["messages"]
                            .as_array()
                            .and_then(|m| m.last())
                            .and_then(|m| m["content"].as_str())
                            .unwrap_or("")
                            .to_string();
                        let words: Vec<&str> = last.split_whitespace().collect();
                        let answer = format!(
                            "About {} words: {}",
                            words.len(),
                            words.last().unwrap_or(&"")
                        );
                        json!({"id": "x", "object": "chat.completion", "model": req["model"],
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
                        .to_string()
                    } else {
                        r.body.clone()
                    };
                    let mut out = format!(
                        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                        r.status,
                        body_out.len()
                    );
                    for (k, v) in &r.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    out.push_str(&body_out);
                    let _ = stream.write_all(out.as_bytes());
                    let _ = stream.flush();
                });
            }
        });
        Fake { url, calls }
    }

    /// Calls per route prefix.
    fn counts(&self) -> Vec<(String, usize)> {
        let calls = self.calls.lock().unwrap();
        let mut m: HashMap<String, usize> = HashMap::new();
        for (p, _) in calls.iter() {
            let key = p.split('?').next().unwrap_or(p).to_string();
            *m.entry(key).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort();
        v
    }

    fn bodies(&self, prefix: &str) -> Vec<Value> {
        let mut v: Vec<Value> = self
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::String(b.clone())))
            .collect();
        v.sort_by_key(|b| b.to_string());
        v
    }
}

fn telegram_ok() -> Reply {
    reply(200, r#"{"ok":true,"result":{"message_id":7}}"#)
}

fn discord_ok() -> Reply {
    Reply {
        status: 204,
        headers: vec![],
        body: String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Running the three implementations

#[derive(Clone, Copy, Debug, PartialEq)]
enum Runner {
    Rust,
    Python,
    Node,
}

struct Outcome {
    code: i32,
    json: Value,
    stderr: String,
    row: Option<Value>,
    counts: Vec<(String, usize)>,
    fake: Fake,
}

/// `better-sqlite3` for the node runs, installed once per machine into
/// `target/export-node-deps`. Tests run in parallel: one thread installs while the others
/// wait (a half-installed native module crashes node outright), the install goes to a
/// temporary folder renamed into place only once the module loads, and a marker says so.
fn node_deps() -> Option<PathBuf> {
    static DEPS: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DEPS.get_or_init(install_node_deps).clone()
}

fn loads(dir: &Path) -> bool {
    Command::new("node")
        .args([
            "-e",
            "const D = require('better-sqlite3'); new D(':memory:').prepare('select 1').get()",
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn install_node_deps() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/export-node-deps");
    let marker = dir.join(".installed");
    if marker.exists() && loads(&dir) {
        return Some(dir.join("node_modules"));
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).ok()?;
    std::fs::write(
        tmp.join("package.json"),
        r#"{"name":"deps","version":"1.0.0"}"#,
    )
    .ok()?;
    let installed = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "better-sqlite3@12"])
        .current_dir(&tmp)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if installed && loads(&tmp) {
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::rename(&tmp, &dir).is_ok() && std::fs::write(&marker, "ok").is_ok() {
            return Some(dir.join("node_modules"));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "NOTE: `npm install better-sqlite3@12` failed or its native module does not load: the node runs' runner_executions rows are NOT checked"
    );
    None
}

fn export_to(bp_file: &Path, target: &str, out: &Path) {
    let o = Command::new(BIN)
        .args(["export"])
        .arg(bp_file)
        .args(["--target", target, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs the blueprint `bp` with `runner` against a fresh fake with `script`.
fn run(
    runner: Runner,
    bp: &Value,
    script: Script,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> Outcome {
    let fake = Fake::start(script);
    let dir = tempfile::tempdir().unwrap();
    let bp_text = bp.to_string().replace("FAKE", &fake.url);
    let bp_file = dir.path().join("bp.json");
    std::fs::write(&bp_file, &bp_text).unwrap();
    let db = dir.path().join("history.db");
    let mut cmd = match runner {
        Runner::Rust => {
            let mut c = Command::new(BIN);
            c.arg("run").arg(&bp_file).arg("--json");
            c
        }
        Runner::Python => {
            let out = dir.path().join("py");
            export_to(&bp_file, "python", &out);
            let mut c = Command::new("python3");
            c.arg(out.join("main.py")).arg("--json");
            c
        }
        Runner::Node => {
            let out = dir.path().join("js");
            export_to(&bp_file, "node", &out);
            if let Some(deps) = node_deps() {
                #[cfg(unix)]
                std::os::unix::fs::symlink(deps, out.join("node_modules")).unwrap();
            }
            let mut c = Command::new("node");
            c.arg(out.join("main.js")).arg("--json");
            c
        }
    };
    cmd.args(args).current_dir(dir.path()).env_clear();
    for k in ["PATH", "HOME", "HOSTNAME"] {
        if let Ok(v) = std::env::var(k) {
            cmd.env(k, v);
        }
    }
    cmd.env("DB_FILE", &db)
        .env("LOG_DIR", dir.path().join("logs"))
        .env("OMNIFLOW_TIME_SCALE", "0.001")
        // 3,600 s ×0.001: a call on a loaded machine is not cut at 300 ms; the retries these
        // tests compare come from the fakes' scripted replies, never from timeouts.
        .env("REQUEST_TIMEOUT", "3600")
        .env("TELEGRAM_API_URL", &fake.url)
        .env("TELEGRAM_BOT_TOKEN", "123:secret")
        .env("TELEGRAM_CHAT_ID", "42")
        .env("DISCORD_WEBHOOK", format!("{}/webhooks/1/tok", fake.url));
    for (k, v) in extra_env {
        cmd.env(k, v.replace("FAKE", &fake.url));
    }
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    // The fake's port differs per run: name it FAKE everywhere.
    let norm = |v: Value| -> Value {
        serde_json::from_str(&v.to_string().replace(&fake.url, "FAKE")).unwrap_or(Value::Null)
    };
    let json = norm(serde_json::from_str(stdout.trim()).unwrap_or(Value::Null));
    let row = read_row(&db).map(norm);
    let counts = fake.counts();
    Outcome {
        code: o.status.code().unwrap_or(-1),
        json,
        stderr,
        row,
        counts,
        fake,
    }
}

/// The run's row, without the columns that differ by nature (ids, times, process).
fn read_row(db: &Path) -> Option<Value> {
    if !db.exists() {
        return None;
    }
    let conn = rusqlite::Connection::open(db).ok()?;
    let mut stmt = conn
        .prepare(
            "SELECT blueprint_name, status, priority, trigger, sandbox, seed, simulate_failures,
                    variables, blueprint, parent_run_id, tokens_used, steps_total, steps_done,
                    error, error_kind, failed_step, host,
                    typeof(total_time_ms), typeof(queued_at), typeof(started_at), typeof(finished_at), typeof(pid)
             FROM runner_executions",
        )
        .ok()?;
    let n = stmt.column_count();
    let names: Vec<String> = (0..n)
        .map(|i| stmt.column_name(i).unwrap_or("").to_string())
        .collect();
    let rows: Vec<Value> = stmt
        .query_map([], |r| {
            let mut m = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let v: rusqlite::types::Value = r.get(i)?;
                let j = match v {
                    rusqlite::types::Value::Null => Value::Null,
                    rusqlite::types::Value::Integer(x) => json!(x),
                    rusqlite::types::Value::Real(x) => json!(x),
                    rusqlite::types::Value::Text(t) => json!(t),
                    rusqlite::types::Value::Blob(_) => json!("blob"),
                };
                m.insert(name.clone(), j);
            }
            Ok(Value::Object(m))
        })
        .ok()?
        .filter_map(Result::ok)
        .collect();
    assert!(rows.len() <= 1, "one run, one row: {rows:?}");
    rows.into_iter().next()
}

/// The comparable part of `--json`: steps sorted by key, without durations.
fn comparable(v: &Value) -> Value {
    let mut steps: Vec<Value> = v["steps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut s| {
            if let Value::Object(m) = &mut s {
                m.remove("durationMs");
            }
            s
        })
        .collect();
    steps.sort_by_key(|s| s["step"].as_str().unwrap_or("").to_string());
    // Which item of a concurrent fan-out meets a scripted failure depends on arrival order:
    // compare the node's total attempts, not each item's.
    let mut fan_out_attempts = serde_json::Map::new();
    for s in steps.iter_mut() {
        if s.get("item").is_some_and(|i| !i.is_null()) {
            let node = s["node"].as_str().unwrap_or("").to_string();
            let n = s["attempts"].as_u64().unwrap_or(0);
            let total = fan_out_attempts
                .get(&node)
                .and_then(Value::as_u64)
                .unwrap_or(0);
            fan_out_attempts.insert(node, json!(total + n));
            if let Value::Object(m) = s {
                m.remove("attempts");
            }
        }
    }
    json!({
        "blueprint": v["blueprint"], "status": v["status"], "outputs": v["outputs"],
        "steps": steps, "error": v["error"], "errorKind": v["errorKind"],
        "failedStep": v["failedStep"], "tokensUsed": v["tokensUsed"],
        "fanOutAttempts": fan_out_attempts,
    })
}

/// Runs Rust, Python and Node on the same scenario and compares everything.
fn parity(
    name: &str,
    bp: Value,
    script: impl Fn() -> Script,
    args: &[&str],
    expect_code: i32,
) -> Value {
    let rust = run(Runner::Rust, &bp, script(), args, &[]);
    assert_eq!(
        rust.code, expect_code,
        "{name}: omniflow run exit code; stderr: {}\nstdout: {}",
        rust.stderr, rust.json
    );
    let want = comparable(&rust.json);
    let want_row = rust.row.clone().expect("omniflow run wrote a row");
    let node_has_db = node_deps().is_some();
    for runner in [Runner::Python, Runner::Node] {
        let got = run(runner, &bp, script(), args, &[]);
        assert_eq!(
            got.code, expect_code,
            "{name} {runner:?}: exit code; stderr: {}",
            got.stderr
        );
        assert_eq!(
            comparable(&got.json),
            want,
            "{name} {runner:?}: --json differs; stderr: {}",
            got.stderr
        );
        assert_eq!(
            got.counts, rust.counts,
            "{name} {runner:?}: calls at the fakes"
        );
        for route in ["/bot", "/webhook"] {
            assert_eq!(
                got.fake.bodies(route),
                rust.fake.bodies(route),
                "{name} {runner:?}: what was sent to {route}"
            );
        }
        if runner == Runner::Python || node_has_db {
            assert_eq!(
                got.row.as_ref(),
                Some(&want_row),
                "{name} {runner:?}: runner_executions row; stderr: {}",
                got.stderr
            );
        }
    }
    rust.json
}

// ---------------------------------------------------------------------------------------------
// Parity scenarios (no model: http, transform, condition, notify, delay, forEach)

fn pipeline_bp() -> Value {
    json!({
        "name": "pipeline",
        "priority": "high",
        "variables": { "TOPICS": ["rust", "wasm", "zig"], "LIMIT": 2, "TITLE": "Daily <news> & 'notes'" },
        "defaults": { "retry": { "attempts": 3, "backoff": "1s", "factor": 2 }, "timeout": "900s" },
        "nodes": [
            { "id": "fetch", "type": "http", "url": "FAKE/api/items?limit={{ vars.LIMIT }}",
              "headers": { "Accept": "application/json", "X-Count": "3" } },
            { "id": "pages", "type": "http", "forEach": "{{ vars.TOPICS }}", "url": "FAKE/page/{{ item }}",
              "response": "text" },
            { "id": "shape", "type": "transform", "needs": ["fetch", "pages"], "parse": "json",
              "template": "{\"n\": {{ nodes.fetch.output['items'] | length }}, \"first\": {{ nodes.fetch.output.items[0].title | tojson }}, \"pages\": {{ nodes.pages.output | tojson }}}" },
            { "id": "digest", "type": "transform", "needs": ["fetch", "shape"],
              "template": "{% for it in nodes.fetch.output.items %}{{ loop.index }}. {{ it.title | upper }}{% if it.tags %} [{{ it.tags | join(', ') }}]{% else %} (untagged){% endif %}{% if not loop.last %}\n{% endif %}{% endfor %}\n{{ vars.TITLE | tojson }} {{ vars.TITLE | truncate(12) }} {{ vars.TOPICS }} {{ 'x' if false else nodes.shape.output.n }}" },
            { "id": "misc", "type": "transform", "needs": ["fetch"],
              "template": "{{ nodes.fetch.output.missing_key | default('none here') }}|{{ nodes.fetch.output.none_field }}|{{ nodes.fetch.output.flag }}|{{ nodes.fetch.output.ratio }}|{{ 'ab' ~ 3 }}|{{ (nodes.fetch.output.items | first).title }}|{{ nodes.fetch.output.items | last | tojson }}|{{ '  x  ' | trim | replace('x', 'y') }}|{{ 'A\\nB\\n' | lines | length }}|{{ 'rust' in vars.TOPICS }}|{{ nodes.fetch.output.items[-1].title[:3] }}|{{ vars.LIMIT + 1 }}|{% set k = vars.LIMIT %}{{ k is defined }}{{ nodes.fetch.output.nope is defined }}" },
            { "id": "many", "type": "condition", "needs": ["shape"], "expression": "nodes.shape.output.n >= 2 and 'wasm' in vars.TOPICS" },
            { "id": "few", "type": "condition", "needs": ["shape"], "expression": "not (nodes.shape.output.n >= 2)" },
            { "id": "wait", "type": "delay", "needs": ["many"], "duration": "1500ms" },
            { "id": "post", "type": "notify", "needs": ["digest", "wait"], "channel": "telegram",
              "text": "{{ vars.TITLE }}\n{{ nodes.digest.output }}" },
            { "id": "alert", "type": "notify", "needs": ["few"], "channel": "discord", "text": "few items" },
            { "id": "after_alert", "type": "transform", "needs": ["alert"], "template": "x" }
        ]
    })
}

fn pipeline_script() -> Script {
    vec![
        (
            "/api/items",
            vec![reply(
                200,
                r#"{"items":[{"title":"First","tags":["a","b"]},{"title":"Second","tags":[]},{"title":"Third"}],"none_field":null,"flag":true,"ratio":0.5}"#,
            )],
        ),
        ("/page/", vec![text_reply(200, "<html>page</html>")]),
        ("/bot", vec![telegram_ok()]),
        ("/webhook", vec![discord_ok()]),
    ]
}

#[test]
fn pipeline_with_fanout_templates_conditions_delay_and_notify() {
    let out = parity("pipeline", pipeline_bp(), pipeline_script, &[], 0);
    // The scenario really exercised what it claims.
    assert_eq!(out["outputs"]["post"]["delivered"], json!(true));
    assert!(out["steps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["step"] == "alert" && s["status"] == "skipped"));
    assert!(out["steps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["step"] == "after_alert" && s["status"] == "skipped"));
}

#[test]
fn variables_from_the_command_line() {
    parity(
        "vars",
        pipeline_bp(),
        pipeline_script,
        &["--var", "TOPICS=[\"go\"]", "--var", "TITLE=plain text"],
        0,
    );
}

fn flaky_bp(attempts: u32) -> Value {
    json!({
        "name": "flaky",
        "variables": {},
        "defaults": { "retry": { "attempts": attempts, "backoff": "1s", "factor": 2, "maxDelay": "4s" } },
        "nodes": [
            { "id": "get", "type": "http", "url": "FAKE/flaky", "response": "json" },
            { "id": "post", "type": "notify", "needs": ["get"], "channel": "discord", "text": "got {{ nodes.get.output.value }}" }
        ]
    })
}

#[test]
fn retries_503_429_500_then_success() {
    let script = || -> Script {
        vec![
            (
                "/flaky",
                vec![
                    text_reply(503, "unavailable"),
                    with_header(reply(429, r#"{"error":"slow down"}"#), "Retry-After", "2"),
                    reply(500, r#"{"error":"boom"}"#),
                    reply(200, r#"{"value":42}"#),
                ],
            ),
            (
                "/webhook",
                vec![
                    with_header(
                        reply(
                            429,
                            r#"{"message":"You are being rate limited.","retry_after":0.5,"global":false}"#,
                        ),
                        "Retry-After",
                        "1",
                    ),
                    discord_ok(),
                ],
            ),
        ]
    };
    let out = parity("retries", flaky_bp(4), script, &[], 0);
    let get = out["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "get")
        .unwrap()
        .clone();
    assert_eq!(get["attempts"], 4);
}

#[test]
fn retries_exhausted_fail_the_run() {
    let script = || -> Script { vec![("/flaky", vec![reply(502, r#"{"error":"bad gateway"}"#)])] };
    let out = parity("exhausted", flaky_bp(3), script, &[], 1);
    assert_eq!(out["failedStep"], "get");
    assert!(out["error"]
        .as_str()
        .unwrap()
        .contains("gave up after 3 attempts"));
}

#[test]
fn auth_errors_are_never_retried() {
    let script = || -> Script { vec![("/flaky", vec![reply(401, r#"{"error":"bad token"}"#)])] };
    let out = parity("auth", flaky_bp(4), script, &[], 1);
    assert_eq!(out["errorKind"], "auth");
}

#[test]
fn telegram_refusal_and_continue_on_error() {
    let bp = json!({
        "name": "continue",
        "nodes": [
            { "id": "a", "type": "http", "url": "FAKE/down", "continueOnError": true, "retry": { "attempts": 2 } },
            { "id": "b", "type": "transform", "needs": ["a"], "template": "a said [{{ nodes.a.output }}] status {{ nodes.a.status }}" },
            { "id": "c", "type": "notify", "needs": ["b"], "channel": "telegram", "text": "{{ nodes.b.output }}" }
        ]
    });
    let script = || -> Script {
        vec![
            ("/down", vec![reply(500, r#"{"error":"down"}"#)]),
            (
                "/bot",
                vec![reply(
                    400,
                    r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
                )],
            ),
        ]
    };
    let out = parity("continue", bp, script, &[], 1);
    assert_eq!(out["errorKind"], "invalid_request");
    assert_eq!(out["outputs"]["b"], "a said [] status error");
}

#[test]
fn template_errors_and_bad_for_each() {
    let bp = json!({
        "name": "template-errors",
        "variables": { "NOT_A_LIST": "plain" },
        "nodes": [
            { "id": "items", "type": "transform", "forEach": "{{ vars.NOT_A_LIST }}", "template": "{{ item }}", "continueOnError": true },
            { "id": "fine", "type": "transform", "needs": ["items"], "template": "ok" }
        ]
    });
    parity("template-errors", bp, Vec::new, &[], 0);
}

#[test]
fn bad_variable_is_exit_2() {
    let bp = flaky_bp(2);
    for runner in [Runner::Rust, Runner::Python, Runner::Node] {
        let o = run(runner, &bp, Vec::new(), &["--var", "NOPE=1"], &[]);
        assert_eq!(o.code, 2, "{runner:?}: {}", o.stderr);
        assert!(o.stderr.contains("NOPE"), "{runner:?}: {}", o.stderr);
    }
}

// ---------------------------------------------------------------------------------------------
// Models: the exported programs against a fake HF router (OpenAI chat completions)

fn digest_bp() -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints/tech-digest.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn router_script() -> Script {
    vec![
        (
            "/v1/chat/completions",
            vec![
                reply(
                    503,
                    r#"{"error":"Model is currently loading","estimated_time":1.5}"#,
                ),
                with_header(
                    reply(429, r#"{"error":"rate limited"}"#),
                    "Retry-After",
                    "3",
                ),
                reply(200, "ECHO"),
            ],
        ),
        ("/bot", vec![telegram_ok()]),
    ]
}

const ROUTER_ENV: [(&str, &str); 2] = [
    ("HUGGINGFACE_TOKEN", "hf_test"),
    ("HF_INFERENCE_URL", "FAKE"),
];

#[test]
fn exported_programs_call_the_hf_router_with_retries() {
    let args = ["--var", "TOPICS=[\"rust\",\"wasm\",\"zig\"]"];
    let mut seen = Vec::new();
    for runner in [Runner::Python, Runner::Node] {
        let o = run(runner, &digest_bp(), router_script(), &args, &ROUTER_ENV);
        assert_eq!(o.code, 0, "{runner:?}: {}", o.stderr);
        // 3 items; the first two calls fail (503 loading, 429) and are retried.
        assert_eq!(
            o.counts
                .iter()
                .find(|(p, _)| p == "/v1/chat/completions")
                .map(|c| c.1),
            Some(5)
        );
        assert_eq!(o.json["tokensUsed"], 36);
        let digest = o.json["outputs"]["digest"].as_str().unwrap().to_string();
        assert!(digest.starts_with("▪ rust\nAbout"), "{digest}");
        let bodies = o.fake.bodies("/v1/chat/completions");
        assert!(bodies
            .iter()
            .all(|b| b["model"] == "mistralai/Mistral-7B-Instruct-v0.2" && b["max_tokens"] == 120));
        // Which items met the scripted failures depends on timing; the total does not.
        let mut c = comparable(&o.json);
        let attempts: u64 = c["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["attempts"].as_u64())
            .sum::<u64>()
            + c["fanOutAttempts"]
                .as_object()
                .unwrap()
                .values()
                .filter_map(Value::as_u64)
                .sum::<u64>();
        assert_eq!(attempts, 5 + 2, "3 model steps (5 calls), digest, post");
        for s in c["steps"].as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("attempts");
        }
        seen.push(c);
        if runner == Runner::Python {
            assert_eq!(o.row.unwrap()["status"], "success");
        }
    }
    assert_eq!(seen[0], seen[1], "python and node agree");
}

#[test]
fn model_parity_with_omniflow_run() {
    let bp = digest_bp();
    let args = ["--var", "TOPICS=[\"rust\",\"wasm\",\"zig\"]"];
    let rust = run(Runner::Rust, &bp, router_script(), &args, &ROUTER_ENV);
    assert_eq!(rust.code, 0, "{}", rust.stderr);
    for runner in [Runner::Python, Runner::Node] {
        let got = run(runner, &bp, router_script(), &args, &ROUTER_ENV);
        assert_eq!(comparable(&got.json), comparable(&rust.json), "{runner:?}");
        assert_eq!(got.counts, rust.counts, "{runner:?}");
        if runner == Runner::Python {
            assert_eq!(got.row, rust.row);
        }
    }
}

/// A bundled blueprint as JSON (TOML files converted through the same loader as `omniflow`).
fn bundled_bp(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("blueprints")
        .join(file);
    let bp = omniflow::blueprint::load_file(&path, omniflow::limits::DEFAULT_MAX_BLUEPRINT_BYTES)
        .unwrap();
    serde_json::to_value(bp).unwrap()
}

/// Rust, Python and Node on one bundled blueprint against the same fakes: same outputs,
/// steps, calls and `runner_executions` row.
fn bundled_parity(bp: &Value, script: impl Fn() -> Script, args: &[&str]) {
    // Waits are scaled ×0.001 here: a bundled node's "30s" would be 30 ms, which a loaded
    // machine can miss, turning a parity check into a count of timeouts. The retries under test
    // come from the fakes' scripted replies, not from timeouts.
    let mut bp = bp.clone();
    bp["defaults"]["timeout"] = json!("3600s");
    for node in bp["nodes"].as_array_mut().unwrap() {
        node.as_object_mut().unwrap().remove("timeout");
    }
    let bp = &bp;
    let rust = run(Runner::Rust, bp, script(), args, &ROUTER_ENV);
    assert_eq!(rust.code, 0, "{}", rust.stderr);
    for runner in [Runner::Python, Runner::Node] {
        let got = run(runner, bp, script(), args, &ROUTER_ENV);
        assert_eq!(got.code, 0, "{runner:?}: {}", got.stderr);
        assert_eq!(comparable(&got.json), comparable(&rust.json), "{runner:?}");
        assert_eq!(got.counts, rust.counts, "{runner:?}");
        if runner == Runner::Python {
            assert_eq!(got.row, rust.row);
        }
    }
}

#[test]
fn bundled_triage_parity() {
    // The fake model's answer routes the message through the conditions the same way for all.
    bundled_parity(
        &bundled_bp("triage.toml"),
        || {
            vec![
                ("/v1/chat/completions", vec![reply(200, "ECHO")]),
                ("/bot", vec![telegram_ok()]),
            ]
        },
        &[],
    );
}

#[test]
fn bundled_page_summary_parity() {
    let mut bp = bundled_bp("page-summary.toml");
    bp["variables"]["URL"] = json!("FAKE/page");
    bundled_parity(
        &bp,
        || {
            vec![
                (
                    "/page",
                    vec![
                        text_reply(503, "busy"),
                        text_reply(
                            200,
                            "<html><body><h1>News</h1><p>Rust 2.0 ships.</p></body></html>",
                        ),
                    ],
                ),
                ("/v1/chat/completions", vec![reply(200, "ECHO")]),
                ("/webhooks", vec![discord_ok()]),
            ]
        },
        &[],
    );
}

#[test]
fn bundled_release_notes_parity() {
    let mut bp = bundled_bp("release-notes.json");
    bp["variables"]["GITHUB_API"] = json!("FAKE");
    bundled_parity(
        &bp,
        || {
            vec![
                (
                    "/repos/",
                    vec![reply(
                        200,
                        r#"[{"tag_name":"v1.2.0","name":"v1.2.0","html_url":"https://example.org/r","published_at":"2026-11-01T00:00:00Z","body":"- faster\n- fixes"}]"#,
                    )],
                ),
                ("/v1/chat/completions", vec![reply(200, "ECHO")]),
                ("/bot", vec![telegram_ok()]),
            ]
        },
        &[],
    );
}

// ---------------------------------------------------------------------------------------------
// Generated files

fn bundled() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
    v.sort();
    v
}

#[test]
fn every_bundled_blueprint_exports_to_every_target_and_the_files_check() {
    let dir = tempfile::tempdir().unwrap();
    for bp in bundled() {
        let name = bp.file_stem().unwrap().to_string_lossy().to_string();
        for target in ["python", "node", "github-action", "docker"] {
            let out = dir.path().join(format!("{name}-{target}"));
            export_to(&bp, target, &out);
            for f in walk(&out) {
                let text = std::fs::read_to_string(&f).unwrap();
                assert!(
                    !text.contains("123:secret") && !text.contains("hf_test"),
                    "{}",
                    f.display()
                );
                if f.file_name().unwrap() == ".env.example" {
                    for line in text
                        .lines()
                        .filter(|l| !l.starts_with('#') && l.contains('='))
                    {
                        assert!(line.ends_with('='), "no value in .env.example: {line}");
                    }
                }
            }
            match target {
                "node" => {
                    let o = Command::new("node")
                        .arg("--check")
                        .arg(out.join("main.js"))
                        .output()
                        .unwrap();
                    assert!(
                        o.status.success(),
                        "{name}: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    let pkg: Value = serde_json::from_str(
                        &std::fs::read_to_string(out.join("package.json")).unwrap(),
                    )
                    .unwrap();
                    assert_eq!(pkg["dependencies"], json!({"better-sqlite3": "^12.0.0"}));
                }
                _ => {
                    let o = Command::new("python3")
                        .args(["-m", "py_compile"])
                        .arg(out.join("main.py"))
                        .output()
                        .unwrap();
                    assert!(
                        o.status.success(),
                        "{name}: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    assert!(out.join("requirements.txt").exists());
                }
            }
            if target == "github-action" {
                let wf = out.join(format!(".github/workflows/{name}.yml"));
                let check = r#"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
on = doc.get("on", doc.get(True))
assert "workflow_dispatch" in on, on
assert ("schedule" in on) == (sys.argv[2] == "1"), on
for job in doc["jobs"].values():
    assert job["runs-on"]
    steps = job["steps"]
    assert any("setup-python" in s.get("uses", "") for s in steps)
    assert any("main.py" in s.get("run", "") for s in steps)
    envs = {k: v for s in steps for k, v in (s.get("env") or {}).items()}
    assert all("${{" in v for k, v in envs.items() if "TOKEN" in k or "WEBHOOK" in k), envs
print("ok")
"#;
                let scheduled = bp.file_stem().unwrap() != "triage";
                let o = Command::new("python3")
                    .args(["-c", check])
                    .arg(&wf)
                    .arg(if scheduled { "1" } else { "0" })
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            if target == "docker" {
                let df = std::fs::read_to_string(out.join("Dockerfile")).unwrap();
                let instr: Vec<&str> = df
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.starts_with(' '))
                    .map(|l| l.split_whitespace().next().unwrap())
                    .collect();
                assert_eq!(instr.first(), Some(&"FROM"));
                for k in ["USER", "CMD", "ENTRYPOINT", "COPY"] {
                    assert!(instr.contains(&k), "{k} in Dockerfile");
                }
                assert!(df.contains("FROM python:3.12-slim"));
                let check = "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); assert 'automation' in d['services'] and d['services']['ollama']['profiles'] == ['ollama']";
                let o = Command::new("python3")
                    .args(["-c", check])
                    .arg(out.join("docker-compose.yml"))
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                assert!(out.join(".dockerignore").exists());
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn an_untranslatable_template_is_an_error_naming_node_field_and_construct() {
    let dir = tempfile::tempdir().unwrap();
    let bp = json!({ "name": "bad", "nodes": [
        { "id": "a", "type": "transform", "template": "ok" },
        { "id": "b", "type": "transform", "needs": ["a"], "template": "{{ nodes.a.output | wordcount }}" }
    ]});
    let file = dir.path().join("bad.json");
    std::fs::write(&file, bp.to_string()).unwrap();
    let out = dir.path().join("out");
    for target in ["python", "node", "docker", "github-action"] {
        let o = Command::new(BIN)
            .arg("export")
            .arg(&file)
            .args(["--target", target, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("nodes[1].template: the filter `wordcount` cannot be exported to"),
            "{err}"
        );
        assert!(!out.exists(), "no output directory");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "no temporary directory left: {leftovers:?}"
        );
    }
}

#[test]
fn a_non_empty_out_is_refused_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let bp = &bundled()[0];
    let o = Command::new(BIN)
        .arg("export")
        .arg(bp)
        .args(["--target", "python", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(out.join("keep.txt").exists());
    let o = Command::new(BIN)
        .arg("export")
        .arg(bp)
        .args(["--target", "python", "--force", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(out.join("main.py").exists() && !out.join("keep.txt").exists());
}

/// The exported programs read `Retry-After` as seconds or as an HTTP-date, like `omniflow run`.
#[test]
fn exported_retry_after_reads_seconds_and_http_dates() {
    let dir = tempfile::tempdir().unwrap();
    let bp_file = dir.path().join("flaky.json");
    std::fs::write(&bp_file, flaky_bp(2).to_string()).unwrap();
    let (py, js) = (dir.path().join("py"), dir.path().join("js"));
    export_to(&bp_file, "python", &py);
    export_to(&bp_file, "node", &js);
    let date = (chrono::Utc::now() + chrono::Duration::seconds(40))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let cases = [
        ("7", Some((7.0, 7.0))),
        ("1.5", Some((1.5, 1.5))),
        (date.as_str(), Some((25.0, 40.0))),
        ("Wed, 21 Oct 2015 07:28:00 GMT", Some((0.0, 0.0))),
        ("soon", None),
        ("-1", None),
    ];
    // Python: main.py is importable (it runs only as __main__).
    let py_src = format!(
        "import sys, json; sys.path.insert(0, {:?}); import main\n\
         print(json.dumps([main.retry_after_header({{'Retry-After': v}}) for v in json.loads(sys.argv[1])]))",
        py.display().to_string()
    );
    // Node: main.js runs at once when loaded, so evaluate its retryAfterHeader alone.
    let js_text = std::fs::read_to_string(js.join("main.js")).unwrap();
    let start = js_text
        .find("function retryAfterHeader(")
        .expect("main.js defines retryAfterHeader");
    let end = start + js_text[start..].find("\n}\n").expect("its end") + 2;
    let js_src = format!(
        "{}\nconst vs = JSON.parse(process.argv[1]);\n\
         console.log(JSON.stringify(vs.map((v) => retryAfterHeader(new Headers({{'retry-after': v}})))));",
        &js_text[start..end]
    );
    let values = serde_json::to_string(&cases.iter().map(|c| c.0).collect::<Vec<_>>()).unwrap();
    for (label, mut cmd) in [
        ("python", {
            let mut c = Command::new("python3");
            c.args(["-c", &py_src, &values]);
            c
        }),
        ("node", {
            let mut c = Command::new("node");
            c.args(["-e", &js_src, &values]);
            c
        }),
    ] {
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got: Vec<Option<f64>> = serde_json::from_slice(&o.stdout).unwrap();
        for ((value, want), got) in cases.iter().zip(&got) {
            match (want, got) {
                (Some((lo, hi)), Some(g)) => {
                    assert!(*g >= *lo && *g <= *hi, "{label}: {value:?} gave {g}")
                }
                (None, None) => {}
                _ => panic!("{label}: {value:?} gave {got:?}, wanted {want:?}"),
            }
        }
    }
}
