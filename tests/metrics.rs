//! `/metrics`, `/healthz` and `/readyz` of a real `omniflow daemon --listen`: scraped over HTTP
//! during a sandbox run with failure injection, parsed with a Prometheus text parser, and
//! checked against the run's rows in the SQLite history; readiness under the memory hold;
//! hostile clients; secrets.

mod common;

use omniflow::events::StepStatus;
use omniflow::store::{RunFilter, Store};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Generous: the machine is shared and loaded.
const PATIENCE: Duration = Duration::from_secs(60);

const HF_SECRET: &str = "hf_metricsTestSecretValue0123456789";
const TELEGRAM_SECRET: &str = "123456:metrics-test-telegram-secret-AAAA";
const SCRAPE_TOKEN: &str = "scrape-token-for-tests-9f8e7d";

struct Daemon {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `omniflow daemon --sandbox --listen 127.0.0.1:0` in `dir` and reads the bound
    /// address from its log on stderr.
    fn start(dir: &Path, bps: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_omniflow"));
        cmd.args(["daemon", "--sandbox", "--listen", "127.0.0.1:0", "--dir"])
            .arg(bps)
            .args(extra_args)
            .current_dir(dir)
            .env("DB_FILE", dir.join("h.db"))
            .env("LOG_DIR", dir.join("logs"))
            .env("OMNIFLOW_TIME_SCALE", "0.001")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let pipe = child.stderr.take().unwrap();
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send(addr.to_string());
                    }
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(PATIENCE) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the daemon never said where it listens:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Daemon {
            child,
            addr,
            stderr,
        }
    }

    /// SIGTERM, then the exit code and everything it logged.
    fn stop(mut self) -> (Option<i32>, String) {
        // SAFETY: signals a child process this test started and still owns.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + PATIENCE;
        let code = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(100));
        let log = self.stderr.lock().unwrap().clone();
        (code, log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request on its own connection: (status, body). `None` when the server
/// closed the connection without an answer.
fn request(addr: SocketAddr, raw: &[u8]) -> Option<(u16, String)> {
    common::http::exchange(addr, raw, PATIENCE)
}

fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let raw = format!("GET {path} HTTP/1.1\r\nHost: omniflow\r\n{auth}Connection: close\r\n\r\n");
    request(addr, raw.as_bytes()).unwrap_or_else(|| panic!("no answer to GET {path}"))
}

fn scrape(addr: SocketAddr) -> (String, prometheus_parse::Scrape) {
    let (status, body) = get(addr, "/metrics", Some(SCRAPE_TOKEN));
    assert_eq!(status, 200, "{body}");
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    (body, parsed)
}

fn value(v: &prometheus_parse::Value) -> f64 {
    use prometheus_parse::Value::*;
    match v {
        Counter(x) | Gauge(x) | Untyped(x) => *x,
        Histogram(_) | Summary(_) => 0.0,
    }
}

/// Sum of `metric`'s samples whose labels include all of `want`.
fn sum(s: &prometheus_parse::Scrape, metric: &str, want: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| value(&x.value))
        .sum()
}

/// A blueprint that fans out 40 model calls and joins them, scheduled so that exactly one
/// (missed) slot fires at start-up and the next one is about twelve hours away.
fn fan_out_blueprint(bps: &Path, db: &Path) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hour = (now / 3600 + 12) % 24;
    let topics: Vec<String> = (0..40).map(|i| format!("topic {i}")).collect();
    std::fs::write(
        bps.join("fan.json"),
        json!({
            "name": "fan",
            "schedule": format!("0 {hour} * * *"),
            "missedSlots": "runOnce",
            "variables": { "TOPICS": topics },
            // A sandbox run records its notifications instead of sending them.
            "notify": { "onSuccess": ["telegram"], "onFailure": ["telegram"] },
            "nodes": [
                { "id": "ask", "type": "llm", "forEach": "{{ vars.TOPICS }}",
                  "model": "mistralai/Mistral-7B-Instruct-v0.2",
                  "prompt": "Two sentences on {{ item }}." },
                { "id": "join", "type": "transform", "needs": ["ask"],
                  "template": "{{ nodes.ask.output | join('\n') }}" }
            ]
        })
        .to_string(),
    )
    .unwrap();
    // The last slot that fired was three days ago: one run catches up at start-up.
    let store = Store::open(db).unwrap();
    let past = SystemTime::now() - Duration::from_secs(3 * 24 * 3600);
    assert!(store.claim_slot("fan", past).unwrap());
}

fn finished_runs(store: &Store) -> Vec<omniflow::store::RunRow> {
    store
        .list_runs(&RunFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .filter(|r| r.status.is_final())
        .collect()
}

/// Metric names the dashboard's queries use.
fn dashboard_metrics() -> Vec<String> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/omniflow.json"),
    )
    .unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut names = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("omniflow_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.push(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn counters_match_the_history_of_a_run_with_injected_failures() {
    let dir = tempfile::tempdir().unwrap();
    let bps = dir.path().join("bps");
    std::fs::create_dir(&bps).unwrap();
    let db = dir.path().join("h.db");
    fan_out_blueprint(&bps, &db);
    let d = Daemon::start(
        dir.path(),
        &bps,
        &["--simulate-failures", "0.3"],
        &[
            ("HUGGINGFACE_TOKEN", HF_SECRET),
            ("TELEGRAM_BOT_TOKEN", TELEGRAM_SECRET),
            ("TELEGRAM_CHAT_ID", "42"),
            ("OMNIFLOW_METRICS_TOKEN", SCRAPE_TOKEN),
            ("SANDBOX_LATENCY_MS", "20"),
        ],
    );
    // The token guards /metrics; the health paths stay open for probes.
    assert_eq!(get(d.addr, "/metrics", None).0, 401);
    assert_eq!(get(d.addr, "/metrics", Some("wrong-token")).0, 401);

    // Scrape while the run is in flight (at least once: on a fast machine the
    // caught-up slot can finish before the first scrape), until it is recorded
    // as finished. Each scrape must parse, which `scrape` checks.
    let store = Store::open(&db).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        scrape(d.addr);
        if !finished_runs(&store).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no run finished:\n{}",
            d.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let runs = finished_runs(&store);
    assert_eq!(runs.len(), 1, "one caught-up slot, one run: {runs:?}");
    let run = &runs[0];
    // The recorder follows the bus; wait until it has seen the run's end.
    let (text, m) = loop {
        let (text, m) = scrape(d.addr);
        if sum(&m, "omniflow_runs_finished_total", &[]) >= 1.0 {
            break (text, m);
        }
        assert!(
            Instant::now() < deadline,
            "the run's end never reached /metrics:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    // Runs.
    assert_eq!(
        sum(&m, "omniflow_runs_started_total", &[("blueprint", "fan")]),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "omniflow_runs_finished_total",
            &[("blueprint", "fan"), ("status", run.status.as_str())]
        ),
        1.0,
        "{text}"
    );
    // Steps, by status, as recorded.
    let steps = store.run_steps(&run.id).unwrap();
    // The 40 items always; the join only when no item gave up (the seed is the daemon's).
    assert!(steps.len() >= 40, "{steps:?}");
    for status in [StepStatus::Success, StepStatus::Error, StepStatus::Skipped] {
        let rows = steps.iter().filter(|s| s.status == status).count() as f64;
        let counted = sum(&m, "omniflow_steps_total", &[("status", status.as_str())]);
        assert_eq!(counted, rows, "steps {status:?}\n{text}");
    }
    let llm_rows = steps.iter().filter(|s| s.node_id == "ask").count() as f64;
    assert_eq!(
        sum(&m, "omniflow_steps_total", &[("node_type", "llm")]),
        llm_rows
    );
    // Attempts, failed attempts by kind, and retries, as recorded.
    let attempts = store.run_attempts(&run.id).unwrap();
    assert_eq!(
        sum(&m, "omniflow_attempts_total", &[]),
        attempts.len() as f64
    );
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(!failed.is_empty(), "30 % injected failures over 40 calls");
    let mut by_kind: HashMap<&str, f64> = HashMap::new();
    for a in &failed {
        *by_kind
            .entry(a.error_kind.map(|k| k.as_str()).unwrap())
            .or_default() += 1.0;
    }
    for (kind, n) in &by_kind {
        assert_eq!(
            sum(&m, "omniflow_attempts_total", &[("error_kind", kind)]),
            *n,
            "attempts of kind {kind}\n{text}"
        );
    }
    let retried = attempts.iter().filter(|a| a.wait_ms.is_some()).count() as f64;
    assert!(retried > 0.0);
    assert_eq!(sum(&m, "omniflow_retries_total", &[]), retried);
    let waits = m.samples.iter().find(|x| {
        x.metric == "omniflow_retry_wait_seconds_count" || x.metric == "omniflow_retry_wait_seconds"
    });
    assert!(waits.is_some(), "{text}");
    // Tokens and model-call latency by provider, as recorded.
    let tokens: u64 = steps.iter().map(|s| s.tokens_used).sum();
    assert!(tokens > 0);
    assert_eq!(
        sum(
            &m,
            "omniflow_model_tokens_total",
            &[("provider", "sandbox")]
        ),
        tokens as f64,
        "{text}"
    );
    assert!(text.contains("omniflow_model_call_duration_seconds_bucket{"));
    // The schedule slot that fired, the pool, the store writer.
    assert_eq!(
        sum(
            &m,
            "omniflow_schedule_slots_total",
            &[("blueprint", "fan"), ("outcome", "fired")]
        ),
        1.0
    );
    // CONCURRENCY's default.
    assert_eq!(sum(&m, "omniflow_workers", &[("state", "total")]), 40.0);
    assert_eq!(sum(&m, "omniflow_pool_state", &[("state", "running")]), 1.0);
    assert!(sum(&m, "omniflow_memory_rss_bytes", &[]) > 0.0);
    assert!(text.contains("omniflow_store_write_batch_duration_seconds_count{"));
    // The writer's queue has drained: the run's history was read back above (a queue that
    // only grew would count several writes per step by now).
    let queued = sum(&m, "omniflow_store_write_queue", &[]);
    assert!(
        (0.0..steps.len() as f64).contains(&queued),
        "{queued} writes still queued after the run was read back\n{text}"
    );

    // Every series carries host and role; no label value is a run id.
    for s in &m.samples {
        assert_eq!(s.labels.get("role"), Some("daemon"), "{s:?}");
        assert!(s.labels.get("host").is_some_and(|h| !h.is_empty()), "{s:?}");
        for v in s.labels.values() {
            assert_ne!(v, &run.id, "a run id as a label: {s:?}");
        }
    }
    assert!(!text.contains(&run.id));
    // No secret in any answer (the list the log redaction uses).
    let config = omniflow::config::Config::from_vars(
        &[
            ("HUGGINGFACE_TOKEN", HF_SECRET),
            ("TELEGRAM_BOT_TOKEN", TELEGRAM_SECRET),
            ("OMNIFLOW_METRICS_TOKEN", SCRAPE_TOKEN),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    )
    .unwrap();
    let (_, ready) = get(d.addr, "/readyz", None);
    let (_, live) = get(d.addr, "/healthz", None);
    let (_, unauthorized) = get(d.addr, "/metrics", None);
    for secret in config.secrets() {
        for body in [&text, &ready, &live, &unauthorized] {
            assert!(!body.contains(&secret), "a secret in an answer: {body}");
        }
    }
    // No prompt, item value or output either.
    assert!(!text.contains("topic 1") && !text.contains("Two sentences"));

    assert_eq!(
        sum(
            &m,
            "omniflow_notifications_total",
            &[("channel", "telegram"), ("outcome", "sandbox")]
        ),
        1.0,
        "{text}"
    );

    // The dashboard's queries name metrics this exposition has (the sandbox is never
    // rate-limited, and this daemon keeps its history in SQLite, outside any fleet, so those
    // series stay empty here; the unit tests render them).
    let have: Vec<String> = m.samples.iter().map(|s| s.metric.clone()).collect();
    for name in dashboard_metrics()
        .into_iter()
        .filter(|n| !n.contains("rate_limit") && !n.starts_with("omniflow_fleet_"))
    {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        assert!(
            have.iter().any(|h| h == &name || h.starts_with(base)),
            "the dashboard queries {name}, which /metrics does not have"
        );
    }

    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    for secret in config.secrets() {
        assert!(!log.contains(&secret), "a secret in the log");
    }
}

#[test]
fn readyz_says_not_ready_while_memory_holds_the_pool_and_healthz_stays_alive() {
    let dir = tempfile::tempdir().unwrap();
    let bps = dir.path().join("bps");
    std::fs::create_dir(&bps).unwrap();
    // 1 MB: every process is above it, so the maintenance loop holds the pool at once.
    let d = Daemon::start(dir.path(), &bps, &[], &[("MEMORY_THRESHOLD_MB", "1")]);
    let deadline = Instant::now() + PATIENCE;
    let body = loop {
        let (status, body) = get(d.addr, "/readyz", None);
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "never held: {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "not ready");
    assert!(
        v["checks"]["pool"]
            .as_str()
            .unwrap()
            .contains("MEMORY_THRESHOLD_MB=1"),
        "{v}"
    );
    assert_eq!(v["checks"]["store"], "ok");
    assert_eq!(v["checks"]["providers"], "ok", "the sandbox is a provider");
    // The hold can be set before the maintenance loop records its first turn, when
    // `/healthz` still says "starting": alive is what it says once the loop has turned, while
    // the pool is still held.
    let live = loop {
        let (status, live) = get(d.addr, "/healthz", None);
        if status == 200 {
            break live;
        }
        assert!(
            live.contains("has not turned yet") && Instant::now() < deadline,
            "held is not dead: {live}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(live.contains("\"status\":\"ok\""), "{live}");
    let (status, _) = get(d.addr, "/readyz", None);
    assert_eq!(status, 503, "still held while alive");
    let (_, m) = scrape_open(d.addr);
    assert_eq!(
        sum(&m, "omniflow_pool_state", &[("state", "memory_hold")]),
        1.0
    );
    assert_eq!(sum(&m, "omniflow_memory_threshold_bytes", &[]), 1_048_576.0);
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
}

fn scrape_open(addr: SocketAddr) -> (String, prometheus_parse::Scrape) {
    let (status, body) = get(addr, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    (body, parsed)
}

/// In one process: the pool held and released flips `/readyz` 503 → 200; a process without a
/// provider is not ready and says what to set.
#[test]
fn readyz_flips_with_the_memory_hold_and_names_a_missing_provider() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let env = common::engine(&[], 4);
        env.engine.set_role(omniflow::engine::Role::Daemon);
        let m = omniflow::metrics::serve(
            &env.engine,
            omniflow::metrics::Options {
                listen: "127.0.0.1:0".parse().unwrap(),
                token: None,
                sandbox: true,
            },
        )
        .await
        .unwrap();
        let addr = m.addr();
        let probe =
            move |path: &'static str| tokio::task::spawn_blocking(move || get(addr, path, None));
        assert_eq!(probe("/readyz").await.unwrap().0, 200);
        env.engine.pool().set_memory_hold(true);
        let (status, body) = probe("/readyz").await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("memory"), "{body}");
        env.engine.pool().set_memory_hold(false);
        assert_eq!(probe("/readyz").await.unwrap().0, 200);
        env.engine.pool().pause();
        let (status, body) = probe("/readyz").await.unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("paused"), "{body}");
        env.engine.pool().resume();
        // Without the maintenance loop, nothing proves the process's loops turn.
        let (status, body) = probe("/healthz").await.unwrap();
        assert_eq!(status, 503, "{body}");
        let maintenance = env.engine.start_maintenance(false);
        let deadline = Instant::now() + PATIENCE;
        while probe("/healthz").await.unwrap().0 != 200 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        maintenance.stop().await;
        m.stop().await;

        // No provider configured, not a sandbox: not ready, and it says what to set.
        let m = omniflow::metrics::serve(
            &env.engine,
            omniflow::metrics::Options {
                listen: "127.0.0.1:0".parse().unwrap(),
                token: None,
                sandbox: false,
            },
        )
        .await
        .unwrap();
        let addr = m.addr();
        let (status, body) = tokio::task::spawn_blocking(move || get(addr, "/readyz", None))
            .await
            .unwrap();
        assert_eq!(status, 503);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["checks"]["providers"]
            .as_str()
            .unwrap()
            .contains("HUGGINGFACE_TOKEN"));
        m.stop().await;
    });
}

#[test]
fn hostile_requests_get_bounded_answers_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bps = dir.path().join("bps");
    std::fs::create_dir(&bps).unwrap();
    let d = Daemon::start(dir.path(), &bps, &[], &[]);
    let a = d.addr;
    // Unknown paths, traversal, methods.
    for path in [
        "/",
        "/metrics/../etc/passwd",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/metricsx",
        "/healthz/",
    ] {
        let (status, body) = get(a, path, None);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("root:"), "{body}");
    }
    let (status, _) = request(
        a,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .unwrap();
    assert_eq!(status, 405);
    // A 100 KB header: refused, not buffered.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    if let Some((status, _)) = request(a, huge.as_bytes()) {
        assert_eq!(status, 431);
    }
    // Thousands of tiny headers.
    let many: String = (0..2000).map(|i| format!("X-{i}: y\r\n")).collect();
    let raw = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    if let Some((status, _)) = request(a, raw.as_bytes()) {
        assert!(status == 431 || status == 400, "{status}");
    }
    // Garbage.
    if let Some((status, _)) = request(a, b"\x00\x01\x02 not http at all\r\n\r\n") {
        assert_eq!(status, 400);
    }
    // Slowloris: more connections than the listener serves, each sending a header byte now
    // and then. The server closes them (header timeout) instead of waiting forever.
    let mut slow: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(a).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    let mut closed = vec![false; slow.len()];
    while closed.iter().any(|c| !c) {
        assert!(Instant::now() < deadline, "slow clients were never cut off");
        for (i, s) in slow.iter_mut().enumerate() {
            if closed[i] {
                continue;
            }
            let _ = s.write_all(b"a");
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Ok(0) => closed[i] = true,
                Ok(_) => closed[i] = true, // an error answer (408/400) then close
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => closed[i] = true,
            }
        }
    }
    drop(slow);
    // Still alive and answering.
    assert_eq!(get(a, "/healthz", None).0, 200);
    assert_eq!(get(a, "/metrics", None).0, 200);
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// `omniflow health` (the Dockerfile's HEALTHCHECK): exit 0 against a live daemon, 1 when
/// nothing answers, 2 when it does not know where to ask.
#[test]
fn the_health_probe_command_follows_the_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let bps = dir.path().join("bps");
    std::fs::create_dir(&bps).unwrap();
    let d = Daemon::start(dir.path(), &bps, &[], &[]);
    let probe = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_omniflow"));
        c.arg("health")
            .args(args)
            .current_dir(dir.path())
            .env_remove("OMNIFLOW_LISTEN");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let url = format!("http://{}/healthz", d.addr);
    let out = probe(&["--url", &url], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\""));
    let listen = d.addr.to_string();
    let out = probe(&["--ready"], &[("OMNIFLOW_LISTEN", &listen)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    let out = probe(&["--url", &url, "--timeout", "2"], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));
    let out = probe(&[], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("OMNIFLOW_LISTEN"));
}

#[test]
fn a_listener_address_that_cannot_be_bound_fails_the_daemon_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bps = dir.path().join("bps");
    std::fs::create_dir(&bps).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_omniflow"))
        .args(["daemon", "--listen", &addr, "--dir"])
        .arg(&bps)
        .current_dir(dir.path())
        .env("DB_FILE", dir.path().join("h.db"))
        .env("LOG_DIR", dir.path().join("logs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("OMNIFLOW_LISTEN"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_omniflow"))
        .args(["daemon", "--listen", "everywhere", "--dir"])
        .arg(&bps)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
