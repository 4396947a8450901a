//! Hostile blueprints through the real binary: each fails its own run with the budget's
//! name (or is refused by validation, or succeeds), under an address-space limit, without
//! an abort (134), a panic (101) or a hang.
//!
//! The corpus is `tests/hostile/*.json`; each file's `description` says what must happen:
//! `exit N: text` — the exit code, and a text the output must contain. Inputs too large to
//! keep in the repository are generated here.

use serde_json::{json, Value};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address space of each run: a template that tried to build gigabytes would abort here.
const ADDRESS_SPACE: u64 = 4 << 30;
/// A hang guard, far above what any case takes on a loaded machine.
const HANG: Duration = Duration::from_secs(240);

struct Outcome {
    code: Option<i32>,
    text: String,
}

/// The binary in `dir` with a clean environment, under the address-space limit.
fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_omniflow"));
    c.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DB_FILE", dir.join("history.db"))
        .env("LOG_DIR", dir.join("logs"))
        .env("OMNIFLOW_TIME_SCALE", "0.01")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

fn omniflow(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut child = command(dir, args, env).spawn().expect("start omniflow");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("omniflow {args:?} hung (killed after {HANG:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!("{}\n{}", reader.join().unwrap(), err_reader.join().unwrap());
    Outcome {
        code: status.code(),
        text,
    }
}

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// `exit 1: TEMPLATE_MAX_VALUE` → (1, "TEMPLATE_MAX_VALUE").
fn expectation(file: &Path) -> (i32, String) {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let desc = doc["description"].as_str().expect("a description");
    let (code, text) = desc
        .strip_prefix("exit ")
        .and_then(|r| r.split_once(": "))
        .unwrap_or_else(|| panic!("{}: description must read `exit N: text`", file.display()));
    (code.parse().unwrap(), text.to_string())
}

fn assert_clean(what: &str, o: &Outcome, code: i32, text: &str) {
    assert!(
        !o.text.contains("panicked"),
        "{what}: a panic reached the user:\n{}",
        o.text
    );
    assert_eq!(
        o.code,
        Some(code),
        "{what}: expected exit {code} (134 = abort, 101 = panic, None = killed by a signal):\n{}",
        o.text
    );
    assert!(
        o.text.contains(text),
        "{what}: expected {text:?} in the output:\n{}",
        o.text
    );
}

#[test]
fn every_hostile_blueprint_fails_its_own_run_cleanly() {
    let files = corpus();
    assert!(files.len() >= 20, "the corpus went missing");
    for file in files {
        let dir = tempfile::tempdir().unwrap();
        let (code, text) = expectation(&file);
        let path = file.to_str().unwrap();
        let o = omniflow(dir.path(), &["run", path, "--sandbox", "--json"], &[]);
        assert_clean(path, &o, code, &text);
    }
}

fn write(dir: &Path, name: &str, doc: &Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(doc).unwrap()).unwrap();
    p.to_str().unwrap().to_string()
}

fn transform(id: &str, template: &str, needs: &[&str]) -> Value {
    json!({ "id": id, "type": "transform", "template": template, "needs": needs })
}

/// Inputs that were quadratic, recursive or evaluating in `validate`: each gets its verdict
/// (the hang guard is the only clock here).
#[test]
fn validate_gives_a_verdict_on_huge_and_odd_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut chain = vec![transform("n0", "x", &[])];
    for i in 1..4000 {
        let prev = format!("n{}", i - 1);
        chain.push(transform(
            &format!("n{i}"),
            "{{ nodes.n0.output }}{{ nodes.%P.output }}"
                .replace("%P", &prev)
                .as_str(),
            &[prev.as_str()],
        ));
    }
    let cases: Vec<(String, i32, &str)> = vec![
        (
            write(d, "chain.json", &json!({ "name": "chain", "nodes": chain })),
            0,
            "ok (4000 nodes)",
        ),
        (
            write(
                d,
                "tags.json",
                &json!({ "name": "tags", "variables": { "A": 1 },
                         "nodes": [transform("a", &"{{ vars }}".repeat(100_000), &[])] }),
            ),
            0,
            "ok (1 nodes)",
        ),
        (
            write(
                d,
                "cycles.json",
                &json!({ "name": "cycles", "nodes": (0..1000).map(|i| json!({
                    "id": format!("n{i}"), "type": "transform", "template": "x",
                    "needs": [format!("n{i}")] })).collect::<Vec<_>>() }),
            ),
            2,
            "needs itself",
        ),
        (
            write(
                d,
                "big.json",
                &json!({ "name": "big", "variables": { "A": 1 },
                         "nodes": (0..2000).map(|i| transform(&format!("n{i}"),
                             &"lorem ipsum {{ vars.A }} ".repeat(80), &[])).collect::<Vec<_>>() }),
            ),
            0,
            "ok (2000 nodes)",
        ),
        (
            write(
                d,
                "fold.json",
                &json!({ "name": "fold", "nodes": [transform("a", "{{ 'a' ~ ([1] * 2**31) }}", &[])] }),
            ),
            0,
            "ok (1 nodes)",
        ),
        (
            write(
                d,
                "parens.json",
                &json!({ "name": "parens", "nodes": [transform("a",
                    &format!("{{{{ {}1{} }}}}", "(".repeat(10_000), ")".repeat(10_000)), &[])] }),
            ),
            2,
            "split it",
        ),
        (
            write(
                d,
                "huge_template.json",
                &json!({ "name": "huge", "nodes": [transform("a", &"x".repeat(2 << 20), &[])] }),
            ),
            2,
            "limit of 1 MiB",
        ),
    ];
    for (path, code, text) in cases {
        let o = omniflow(d, &["validate", &path], &[]);
        assert_clean(&path, &o, code, text);
    }
    // Deep nesting of the document itself.
    let deep = d.join("deep.json");
    std::fs::write(
        &deep,
        format!(
            "{{\"name\":\"deep\",\"variables\":{{\"A\":{}{}}},\"nodes\":[]}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
    )
    .unwrap();
    let o = omniflow(d, &["validate", deep.to_str().unwrap()], &[]);
    assert_clean("deep.json", &o, 2, "recursion limit");
}

/// A fan-out next to a large variable: every item's step must not pay for the variable
/// (this used to finish its items and then stall for a long time while the history was
/// written). The hang guard bounds it; the run must succeed with every item.
#[test]
fn a_fan_out_next_to_a_large_variable_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u32> = (0..200_000).collect();
    let path = write(
        dir.path(),
        "bigvar.json",
        &json!({ "name": "bigvar", "variables": { "BIG": big },
                 "nodes": [{ "id": "fan", "type": "transform",
                             "forEach": "{{ range(2000) | list }}", "template": "{{ item }}" }] }),
    );
    let o = omniflow(dir.path(), &["run", &path, "--sandbox", "--json"], &[]);
    assert_clean(&path, &o, 0, "\"status\":\"success\"");
    let out: Value = serde_json::from_str(
        o.text
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON outcome"),
    )
    .unwrap();
    assert_eq!(out["outputs"]["fan"].as_array().map(Vec::len), Some(2000));
}

/// A server that answers every request with a body that claims 2 GB and never ends.
fn endless_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                // Read the request head (small; one read is enough for these clients).
                let _ = stream.read(&mut buf);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            content-length: 2147483648\r\n\r\n";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b' '; 64 * 1024];
                while stream.write_all(&chunk).is_ok() {
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (url, sent)
}

/// A 2 GB reply is refused while it streams, for the http node and a model call alike: the
/// run fails with the cap's message, in an address space far smaller than the reply.
#[test]
fn a_two_gigabyte_reply_is_refused_while_streaming() {
    let (url, sent) = endless_server();
    let dir = tempfile::tempdir().unwrap();
    let http = write(
        dir.path(),
        "http.json",
        &json!({ "name": "big-reply", "nodes": [{ "id": "get", "type": "http", "url": url,
                  "retry": { "attempts": 1 } }] }),
    );
    let o = omniflow(dir.path(), &["run", &http, "--json"], &[]);
    assert_clean(&http, &o, 1, "MiB; refused");
    let llm = write(
        dir.path(),
        "llm.json",
        &json!({ "name": "big-model-reply", "nodes": [{ "id": "ask", "type": "llm",
                  "provider": "openai", "model": "m", "prompt": "hi",
                  "retry": { "attempts": 1 } }] }),
    );
    let base = format!("{url}/v1");
    let o = omniflow(
        dir.path(),
        &["run", &llm, "--json"],
        &[("OPENAI_BASE_URL", base.as_str()), ("OPENAI_API_KEY", "k")],
    );
    assert_clean(&llm, &o, 1, "refused");
    // Both stopped reading early: far less than the 2 GB offered went out.
    assert!(
        sent.load(std::sync::atomic::Ordering::Relaxed) < 1 << 30,
        "the clients read on"
    );
}

/// A render that keeps what it builds (a list of 8 MB strings, 320 MB in all, within budgets
/// raised on purpose) while the process is above a low MEMORY_THRESHOLD_MB: that step fails
/// with the setting's name, long before it holds it all, and nothing else does (with
/// `continueOnError`, its sibling and the run succeed).
#[test]
fn the_step_growing_past_the_memory_threshold_is_failed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "grow.json",
        &json!({ "name": "grow", "nodes": [
            transform("small", "fine", &[]),
            { "id": "big", "type": "transform", "continueOnError": true,
              "template": "{% set ns = namespace(l=[]) %}{% for i in range(40) %}\
                 {% set ns.l = ns.l + [('x' * 8000000) ~ i] %}{% endfor %}{{ ns.l | length }}" },
        ] }),
    );
    let gib = (1u64 << 30).to_string();
    let o = omniflow(
        dir.path(),
        &["run", &path, "--sandbox", "--json"],
        &[
            ("MEMORY_THRESHOLD_MB", "64"),
            ("TEMPLATE_MAX_VALUE", &gib),
            ("TEMPLATE_MAX_OUTPUT", &gib),
            ("TEMPLATE_FUEL", "100000000"),
        ],
    );
    assert_clean(&path, &o, 0, "MEMORY_THRESHOLD_MB=64");
    let out: Value = serde_json::from_str(
        o.text
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON outcome"),
    )
    .unwrap();
    let step = |id: &str| {
        out["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["node"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(step("small")["status"], "success", "{out}");
    assert_eq!(step("big")["status"], "error", "{out}");
    let err = step("big")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("memory emergency"), "{err}");
}

/// A blueprint of `mb` MB of bare numbers (`[1,1,…]`), about 200 bytes each once parsed: at
/// 70 MB parsing it would take some 5 GB, past the address-space limit.
fn numbers_blueprint(dir: &Path, file: &str, mb: usize) -> String {
    let path = dir.join(file);
    let mut text = String::with_capacity(mb * 1_000_000 + 200);
    text.push_str(r#"{"name":"numbers","schedule":"* * * * *","variables":{"BIG":["#);
    text.push_str(&"1,".repeat(mb * 500_000));
    text.push_str(r#"1]},"nodes":[{"id":"a","type":"transform","template":"x"}]}"#);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const FIX: &str = "over MAX_BLUEPRINT_BYTES (16 MiB): split its data out of the blueprint, or raise MAX_BLUEPRINT_BYTES";

/// A blueprint larger than `MAX_BLUEPRINT_BYTES` is refused before it is parsed, by `run`
/// and `validate` (exit 2, bad input), with the file, its size, the setting and the fix; one
/// under the byte limit but holding millions of values is refused by their count.
#[test]
fn an_oversized_blueprint_is_refused_before_it_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let big = numbers_blueprint(d, "big.json", 70);
    let said = format!("{big} is 70.0 MB, {FIX}");
    for args in [vec!["run", &big, "--sandbox"], vec!["validate", &big]] {
        let o = omniflow(d, &args, &[]);
        assert_clean(&format!("{args:?}"), &o, 2, &said);
    }
    // 10 MB of text, but five million values: parsed, about 1 GB. (The numbers and the
    // blueprint's own ten lists and entries.)
    let many = numbers_blueprint(d, "many.json", 10);
    let o = omniflow(d, &["validate", &many], &[]);
    assert_clean(
        "many.json",
        &o,
        2,
        &format!(
            "{many} is 10.0 MB holding 5000010 values, 90.0 MB counting 16 bytes for each, {FIX}"
        ),
    );
}

/// `MAX_BLUEPRINT_BYTES` is a setting: lowered, a 100 kB blueprint is refused; raised, it
/// validates and runs.
#[test]
fn max_blueprint_bytes_is_a_setting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = write(
        d,
        "long.json",
        &json!({ "name": "long", "description": "words ".repeat(20_000),
                 "nodes": [transform("a", "done", &[])] }),
    );
    let small = [("MAX_BLUEPRINT_BYTES", "65536")];
    for args in [vec!["validate", &path], vec!["run", &path, "--sandbox"]] {
        let o = omniflow(d, &args, &small);
        assert_clean(
            &format!("{args:?}"),
            &o,
            2,
            "is 120.1 kB, over MAX_BLUEPRINT_BYTES (64 KiB)",
        );
    }
    let raised = [("MAX_BLUEPRINT_BYTES", "1048576")];
    let o = omniflow(d, &["validate", &path], &raised);
    assert_clean("validate, raised", &o, 0, "ok (1 nodes)");
    let o = omniflow(d, &["run", &path, "--sandbox", "--json"], &raised);
    assert_clean("run, raised", &o, 0, "\"status\":\"success\"");
}

/// A daemon whose blueprints folder holds a 70 MB blueprint and a normal one: the big one is
/// reported with its path and not parsed (it would take the daemon past its address space),
/// and the normal one's schedule still runs.
#[test]
fn a_daemon_skips_an_oversized_blueprint_and_runs_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bps = d.join("bps");
    std::fs::create_dir(&bps).unwrap();
    let big = numbers_blueprint(&bps, "big.json", 70);
    write(
        &bps,
        "small.json",
        &json!({ "name": "small", "schedule": "* * * * *",
                 "nodes": [transform("a", "ran", &[])] }),
    );
    // A slot missed two hours ago: with SCHEDULE_MISSED=runOnce the daemon runs it at start.
    let store = omniflow::store::Store::open(&d.join("history.db")).unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(7200);
    assert!(store.claim_slot("small", past).unwrap());
    let mut child = command(
        d,
        &["daemon", "--dir", bps.to_str().unwrap()],
        &[("SCHEDULE_MISSED", "runOnce")],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let ran = loop {
        let done = store
            .list_runs(&Default::default())
            .unwrap()
            .into_iter()
            .find(|r| r.status.is_final());
        if done.is_some() || started.elapsed() > HANG {
            break done;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "the daemon exited ({st}) before running anything:\n{}",
                err_reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: signals a child process this test started and still owns.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let text = err_reader.join().unwrap();
    let ran = ran.unwrap_or_else(|| panic!("the normal blueprint never ran:\n{text}"));
    assert_eq!(ran.blueprint_name, "small");
    assert_eq!(ran.status.as_str(), "success", "{text}");
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(
        text.contains(&big) && text.contains(&format!("is 70.0 MB, {FIX}")),
        "the oversized file is not reported with its path and the setting:\n{text}"
    );
}
