//! Several processes on one SQLite file, with the real binary:
//! - throughput with 1, 2 and 3 `omniflow run` processes at once, each running a forEach of
//!   1,000 no-op steps (every state change persisted), against one process alone;
//! - recovery time after a SIGKILL: from starting `omniflow resume` (once the dead owner's
//!   lease has expired) to the first resumed step starting.
//!
//! `cargo bench --bench processes`

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 1000;

fn omniflow(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_omniflow"));
    c.args(args)
        .current_dir(dir)
        .env("DB_FILE", dir.join("h.db"))
        .env("LOG_DIR", dir.join("logs"))
        .env("LEASE_TIMEOUT", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items: Vec<usize> = (0..STEPS).collect();
    let wide = dir.path().join("wide.json");
    std::fs::write(
        &wide,
        serde_json::json!({
            "name": "wide",
            "variables": { "ITEMS": items },
            "nodes": [ { "id": "each", "type": "transform", "forEach": "{{ vars.ITEMS }}", "template": "{{ item }}" } ]
        })
        .to_string(),
    )
    .expect("write blueprint");
    let wide = wide.to_str().unwrap_or_default().to_string();
    println!(
        "omniflow processes bench — real binary, one SQLite file, {STEPS} no-op steps per process"
    );
    // Warm up: creates and migrates the database.
    let _ = omniflow(dir.path(), &["run", &wide]).status();
    let mut alone = 0.0;
    for n in 1..=3 {
        let t = Instant::now();
        let children: Vec<_> = (0..n)
            .filter_map(|_| omniflow(dir.path(), &["run", &wide]).spawn().ok())
            .collect();
        let mut ok = true;
        for mut c in children {
            ok &= c.wait().map(|s| s.success()).unwrap_or(false);
        }
        let secs = t.elapsed().as_secs_f64();
        let rate = (n * STEPS) as f64 / secs;
        if n == 1 {
            alone = rate;
        }
        println!(
            "{n} process{}: {} steps in {secs:.2} s = {rate:.0} steps/s ({:.2}× one process alone){}",
            if n == 1 { "" } else { "es" },
            n * STEPS,
            rate / alone,
            if ok { "" } else { "  (a process failed!)" }
        );
    }

    // Recovery: a run with a slow first node is killed, then resumed.
    let slow = dir.path().join("slow.json");
    std::fs::write(
        &slow,
        serde_json::json!({
            "name": "slow",
            "nodes": [
                { "id": "wait", "type": "delay", "duration": "600ms" },
                { "id": "after", "type": "transform", "needs": ["wait"], "template": "x" }
            ]
        })
        .to_string(),
    )
    .expect("write blueprint");
    let slow = slow.to_str().unwrap_or_default().to_string();
    let db = dir.path().join("h.db");
    let mut samples = Vec::new();
    for _ in 0..5 {
        let Ok(mut child) = omniflow(dir.path(), &["run", &slow]).spawn() else {
            continue;
        };
        std::thread::sleep(Duration::from_millis(300));
        let _ = child.kill();
        let _ = child.wait();
        let Some(run) = latest(&db) else { continue };
        // Past the lease (1 s), so the measurement is the restart itself.
        std::thread::sleep(Duration::from_millis(1200));
        let t = Instant::now();
        let Ok(mut resumer) = omniflow(dir.path(), &["resume", &run]).spawn() else {
            continue;
        };
        let first = loop {
            if started_again(&db, &run) {
                break Some(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(20) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let _ = resumer.wait();
        if let Some(d) = first {
            samples.push(d.as_secs_f64() * 1000.0);
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    if let Some(median) = samples.get(samples.len() / 2) {
        println!(
            "recovery after SIGKILL: {median:.0} ms from `omniflow resume` to the first resumed step (median of {}; the 1 s lease had expired)",
            samples.len()
        );
    }
}

fn latest(db: &Path) -> Option<String> {
    let c = rusqlite::Connection::open(db).ok()?;
    c.query_row(
        "SELECT id FROM runner_executions ORDER BY queued_at DESC LIMIT 1",
        [],
        |r| r.get(0),
    )
    .ok()
}

/// The killed run's interrupted step has a second attempt under way.
fn started_again(db: &Path, run: &str) -> bool {
    let Ok(c) = rusqlite::Connection::open(db) else {
        return false;
    };
    c.query_row(
        "SELECT attempts FROM runner_steps WHERE run_id = ?1 AND step_key = 'wait'",
        [run],
        |r| r.get::<_, i64>(0),
    )
    .map(|a| a >= 2)
    .unwrap_or(false)
}
