//! A long notification killed between its parts, with the real binary: a fake Telegram that
//! counts every message it gets holds its answer to part 1 or part 2, the process is killed
//! with SIGKILL right then, and `omniflow resume` finishes the run. Each part must reach the
//! fake exactly once: the parts already delivered are not sent again, the part the kill
//! interrupted (its intent recorded, its outcome not) is not sent again, and the parts never
//! started are sent. On SQLite, and on PostgreSQL when `OMNIFLOW_TEST_PG` is set.

mod common;

use omniflow::store::pg::testing::ScratchDb;
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A Telegram `sendMessage` fake: records every text it receives (in order of arrival) and
/// answers at once, except the `hold`-th message of the first process (1-based), whose
/// arrival it reports on `arrived` and whose answer waits until the test lets go.
struct FakeTelegram {
    url: String,
    texts: Arc<Mutex<Vec<String>>>,
    arrived: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

fn fake_telegram(hold: usize) -> FakeTelegram {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let texts = Arc::new(Mutex::new(Vec::new()));
    let (arrived_tx, arrived) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(Some(release_rx)));
    let t = texts.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (texts, arrived_tx, release_rx) =
                (t.clone(), arrived_tx.clone(), release_rx.clone());
            std::thread::spawn(move || {
                let Some(req) = common::http::read_request_blocking(&mut stream) else {
                    return;
                };
                let text = serde_json::from_str::<Value>(&req.body)
                    .ok()
                    .and_then(|v| v["text"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let n = {
                    let mut texts = texts.lock().unwrap();
                    texts.push(text);
                    texts.len()
                };
                if n == hold {
                    let rx = release_rx.lock().unwrap().take();
                    let _ = arrived_tx.send(());
                    if let Some(rx) = rx {
                        let _ = rx.recv();
                    }
                }
                let body = format!(r#"{{"ok":true,"result":{{"message_id":{n}}}}}"#);
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    FakeTelegram {
        url,
        texts,
        arrived,
        release,
    }
}

fn cmd(dir: &Path, fake: &str, database_url: Option<&str>, args: &[&str]) -> Command {
    let mut vars = vec![
        ("DB_FILE", dir.join("h.db").display().to_string()),
        ("LOG_DIR", dir.join("logs").display().to_string()),
        ("TELEGRAM_API_URL", fake.to_string()),
        ("TELEGRAM_BOT_TOKEN", "123456:TESTtoken".to_string()),
        ("TELEGRAM_CHAT_ID", "42".to_string()),
        ("LEASE_TIMEOUT", "2".to_string()),
        ("OMNIFLOW_TIME_SCALE", "0.1".to_string()),
    ];
    if let Some(u) = database_url {
        vars.push(("DATABASE_URL", u.to_string()));
    }
    common::bin::omniflow(dir, args, vars)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Kills `omniflow run` while part `hold` of a 3-part message is at the fake, resumes, and
/// checks that each part arrived exactly once. Returns the notify step's recorded output.
fn kill_while_sending_part(hold: usize, database_url: Option<&str>) -> Value {
    let fake = fake_telegram(hold);
    let dir = tempfile::tempdir().unwrap();
    // About 10,000 characters of words: three Telegram messages (4096 each).
    let words: Vec<String> = (0..1600).map(|i| format!("w{i:04}")).collect();
    let bp = dir.path().join("long.json");
    std::fs::write(
        &bp,
        serde_json::to_string(&json!({
            "name": "long",
            "variables": { "BODY": words.join(" ") },
            "nodes": [
                { "id": "post", "type": "notify", "channel": "telegram",
                  "text": "run {{ run.id }}: {{ vars.BODY }}" }
            ]
        }))
        .unwrap(),
    )
    .unwrap();
    let bp = bp.to_str().unwrap().to_string();

    let mut child = cmd(dir.path(), &fake.url, database_url, &["run", &bp])
        .spawn()
        .unwrap();
    // The fake holds part `hold`: the first process is inside that part's send.
    fake.arrived
        .recv_timeout(Duration::from_secs(120))
        .expect("the held part reached the fake");
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let _ = fake.release.send(());
    let texts_before = fake.texts.lock().unwrap().clone();
    assert_eq!(texts_before.len(), hold, "parts sent before the kill");
    let run_id = texts_before[0]
        .strip_prefix("run ")
        .and_then(|t| t.split(':').next())
        .expect("part 1 names the run")
        .to_string();

    let o = cmd(dir.path(), &fake.url, database_url, &["resume", &run_id])
        .output()
        .unwrap();
    assert!(o.status.success(), "resume: {}", text(&o));

    let o = cmd(
        dir.path(),
        &fake.url,
        database_url,
        &["show", &run_id, "--json"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "show: {}", text(&o));
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["run"]["status"], "success", "{shown}");
    let post = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stepKey"] == "post" || s["step_key"] == "post")
        .cloned()
        .unwrap_or_else(|| panic!("no post step in {shown}"));
    let output = post["output"].clone();

    let texts = fake.texts.lock().unwrap().clone();
    assert_eq!(output["parts"], 3, "a 3-part message: {output}");
    let mut distinct = texts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        texts.len(),
        "a part reached Telegram twice (hold {hold}): {} messages",
        texts.len()
    );
    assert_eq!(
        texts.len(),
        3,
        "every part reaches Telegram exactly once (held part {hold}, {} arrived)",
        texts.len()
    );
    // The parts arrived in order and together are the whole text.
    let joined = texts.join(" ");
    assert!(joined.contains("w0000") && joined.contains("w1599"));
    assert!(texts[2].ends_with("w1599"), "the last part came last");
    output
}

#[test]
fn a_long_notification_killed_between_parts_sends_each_part_once_on_resume() {
    for hold in [1, 2] {
        let out = kill_while_sending_part(hold, None);
        // The held part's outcome is unknown to the store: the step says so.
        assert_eq!(out["delivered"], Value::Null, "{out}");
        assert_eq!(out["unknownParts"], json!([hold]), "{out}");
        assert_eq!(out["alreadySent"], json!(hold - 1), "{out}");
    }
}

#[test]
fn a_long_notification_killed_between_parts_sends_each_part_once_on_postgres() {
    let Some(db) = ScratchDb::new("notify_parts_kill") else {
        eprintln!("OMNIFLOW_TEST_PG not set: skipped");
        return;
    };
    for hold in [1, 2] {
        let out = kill_while_sending_part(hold, Some(db.url()));
        assert_eq!(out["unknownParts"], json!([hold]), "{out}");
    }
}
