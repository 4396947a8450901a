//! Schedules with an injected clock, slots claimed once across store handles and real daemon
//! processes, Supabase rows (one invalid), and `run --all-active` with its digest.

mod common;
mod fakes;

use omniflow::blueprint::{Blueprint, MissedSlots};
use omniflow::schedule::{self, ManualClock, Scheduler};
use omniflow::store::{RunFilter, Store};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn at(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}

fn bp(name: &str, schedule: &str, extra: Value) -> Arc<Blueprint> {
    let mut v = json!({
        "name": name, "schedule": schedule,
        "nodes": [{ "id": "a", "type": "transform", "template": "done at {{ run.id }}" }]
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    common::blueprint(v)
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("h.db")).unwrap();
    (dir, s)
}

#[test]
fn each_slot_fires_once_as_the_injected_clock_moves() {
    let (_d, store) = store();
    let t0 = at("2026-03-01T10:02:00Z");
    let bps = vec![
        bp("every5", "*/5 * * * *", json!({})),
        bp("off", "* * * * *", json!({ "active": false })),
    ];
    let (mut s, problems) = Scheduler::new(&bps, store.clone(), MissedSlots::Skip, t0);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(s.scheduled(), ["every5"]);
    assert_eq!(s.next_due(t0), Some(at("2026-03-01T10:05:00Z")));
    assert!(s.tick(at("2026-03-01T10:04:59Z")).is_empty());
    let fires = s.tick(at("2026-03-01T10:05:01Z"));
    assert_eq!(fires.len(), 1);
    assert_eq!(fires[0].slot, at("2026-03-01T10:05:00Z"));
    assert!(!fires[0].caught_up);
    assert!(
        s.tick(at("2026-03-01T10:05:30Z")).is_empty(),
        "the same slot never fires twice"
    );
    assert_eq!(
        s.tick(at("2026-03-01T10:10:00Z")).len(),
        1,
        "a slot exactly now fires"
    );
    // The console's view.
    assert_eq!(
        schedule::next_fire_time(&bps[0], at("2026-03-01T10:10:00Z")).unwrap(),
        Some(at("2026-03-01T10:15:00Z"))
    );
    assert_eq!(store.slots_of("every5").unwrap().len(), 2);
}

#[test]
fn missed_slots_are_skipped_or_run_once() {
    let (_d, store) = store();
    // Some process fired 06:00; nothing ran until 10:02.
    assert!(store
        .claim_slot("hourly", at("2026-03-01T06:00:00Z"))
        .unwrap());
    assert!(store
        .claim_slot("hourly-once", at("2026-03-01T06:00:00Z"))
        .unwrap());
    let now = at("2026-03-01T10:02:00Z");
    let bps = vec![
        bp("hourly", "0 * * * *", json!({})),
        bp(
            "hourly-once",
            "0 * * * *",
            json!({ "missedSlots": "runOnce" }),
        ),
    ];
    let (mut s, _) = Scheduler::new(&bps, store.clone(), MissedSlots::Skip, now);
    // A second process starting at the same time.
    let (mut other, _) = Scheduler::new(&bps, store.clone(), MissedSlots::Skip, now);
    let fires = s.tick(now);
    assert_eq!(
        fires.len(),
        1,
        "only the runOnce blueprint catches up, and only once"
    );
    assert_eq!(fires[0].blueprint.name, "hourly-once");
    assert_eq!(fires[0].slot, at("2026-03-01T10:00:00Z"));
    assert!(fires[0].caught_up);
    assert!(s.tick(now + Duration::from_secs(5)).is_empty());

    // The second process finds the catch-up slot already claimed.
    assert!(other.tick(now).is_empty());

    // A tick that comes far too late (suspend) counts as missed for `skip`.
    let (mut s, _) = Scheduler::new(&bps[..1], store, MissedSlots::Skip, now);
    assert!(s.tick(at("2026-03-01T11:05:00Z")).is_empty());
    assert_eq!(s.tick(at("2026-03-01T12:00:10Z")).len(), 1);
}

#[test]
fn a_slot_fires_once_across_many_store_handles_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    drop(Store::open(&path).unwrap());
    let t0 = at("2026-03-01T10:02:00Z");
    let now = at("2026-03-01T10:05:00Z");
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                let store = Store::open(&path).unwrap();
                let bps = vec![bp("every5", "*/5 * * * *", json!({}))];
                let (mut s, _) = Scheduler::new(&bps, store, MissedSlots::Skip, t0);
                barrier.wait();
                s.tick(now).len()
            })
        })
        .collect();
    let fired: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(fired, 1);
}

#[test]
fn bad_schedules_are_reported_and_the_others_still_scheduled() {
    let (_d, store) = store();
    let bps = vec![
        bp("feb30", "0 0 30 2 *", json!({})),
        bp("paris", "0 9 * * *", json!({ "timezone": "Europe/Pariss" })),
        bp("good", "0 9 * * *", json!({ "timezone": "+01:00" })),
        bp(
            "berlin",
            "0 9 * * *",
            json!({ "timezone": "Europe/Berlin" }),
        ),
    ];
    let (s, problems) = Scheduler::new(&bps, store, MissedSlots::Skip, SystemTime::now());
    assert_eq!(s.scheduled(), ["good", "berlin"]);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].starts_with("feb30: ") && problems[0].contains("never fires"),
        "{problems:?}"
    );
    assert!(
        problems[1].starts_with("paris: ")
            && problems[1].contains("did you mean \"Europe/Paris\"?")
            && problems[1].contains("fixed offset"),
        "{problems:?}"
    );
}

/// Ticks `s` every 30 s from `from` to `until`; the slots it fired.
fn fired_every_half_minute(s: &mut Scheduler, from: &str, until: &str) -> Vec<SystemTime> {
    let (mut t, end) = (at(from), at(until));
    let mut slots = Vec::new();
    while t <= end {
        slots.extend(s.tick(t).into_iter().map(|f| {
            assert!(!f.caught_up);
            f.slot
        }));
        t += Duration::from_secs(30);
    }
    slots
}

#[test]
fn a_named_zone_fires_a_repeated_local_time_once_and_a_skipped_one_after_the_gap() {
    let (_d, store) = store();
    // Berlin goes back from 03:00 CEST to 02:00 CET at 01:00Z on 2026-10-25: 02:30 happens
    // at 00:30Z and at 01:30Z. Two processes tick through the night on one database.
    let bps = vec![
        bp(
            "half-two",
            "30 2 * * *",
            json!({ "timezone": "Europe/Berlin" }),
        ),
        bp(
            "hourly",
            "0 * * * *",
            json!({ "timezone": "Europe/Berlin" }),
        ),
    ];
    let t0 = at("2026-10-24T22:00:00Z");
    let (mut a, problems) = Scheduler::new(&bps, store.clone(), MissedSlots::Skip, t0);
    assert!(problems.is_empty(), "{problems:?}");
    let (mut b, _) = Scheduler::new(&bps, store.clone(), MissedSlots::Skip, t0);
    let mut fired = fired_every_half_minute(&mut a, "2026-10-24T22:00:30Z", "2026-10-25T23:00:00Z");
    fired.extend(fired_every_half_minute(
        &mut b,
        "2026-10-24T22:00:30Z",
        "2026-10-25T23:00:00Z",
    ));
    let slots = |name: &str| -> Vec<SystemTime> {
        store
            .slots_of(name)
            .unwrap()
            .iter()
            .map(|s| s.slot)
            .collect()
    };
    assert_eq!(slots("half-two"), [at("2026-10-25T00:30:00Z")]);
    // The local day has 25 hours and 24 wall-clock hours: 02:00 fires at its first occurrence.
    let hourly = slots("hourly");
    assert_eq!(hourly.len(), 24, "{hourly:?}");
    assert!(
        hourly.contains(&at("2026-10-25T00:00:00Z"))
            && !hourly.contains(&at("2026-10-25T01:00:00Z"))
    );
    assert_eq!(
        fired.len(),
        25,
        "each slot fired by exactly one of the two processes"
    );

    // Spring forward, 2026-03-29 at 01:00Z (02:00 CET → 03:00 CEST): 02:30 fires at 03:00.
    let (mut s, _) = Scheduler::new(
        &bps[..1],
        store.clone(),
        MissedSlots::Skip,
        at("2026-03-28T22:00:00Z"),
    );
    let fired = fired_every_half_minute(&mut s, "2026-03-28T22:00:30Z", "2026-03-29T22:00:00Z");
    assert_eq!(fired, [at("2026-03-29T01:00:00Z")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_runs_claimed_slots_on_the_engine_and_stops_cleanly() {
    let env = common::engine(&[], 4);
    let t0 = at("2026-03-01T10:02:00Z");
    let clock = Arc::new(ManualClock::new(t0));
    let bps = vec![bp("every5", "*/5 * * * *", json!({}))];
    let (s, _) = Scheduler::new(&bps, env.store.clone(), MissedSlots::Skip, t0);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = schedule::spawn(
        env.engine.clone(),
        s,
        clock.clone(),
        stop.clone(),
        Duration::from_millis(5),
        Default::default(),
    );
    clock.set(at("2026-03-01T10:05:00Z"));
    wait_for(|| env.store.count_runs(&RunFilter::default()).unwrap() == 1).await;
    clock.set(at("2026-03-01T10:10:00Z"));
    wait_for(|| env.store.count_runs(&RunFilter::default()).unwrap() == 2).await;
    stop.cancel();
    assert_eq!(task.await.unwrap(), 2);
    env.store.flush().await;
    let runs = env
        .store
        .list_runs(&RunFilter {
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert!(runs.iter().all(|r| r.trigger == "schedule"));
    let slots = env.store.slots_of("every5").unwrap();
    assert_eq!(slots.len(), 2);
    assert!(slots.iter().all(|s| s.run_id.is_some()));
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 10 s");
}

/// The Supabase reader's error for these settings, as the user reads it.
async fn supabase_refusal(
    http: &reqwest::Client,
    vars: &std::collections::HashMap<String, String>,
) -> String {
    let config = omniflow::config::Config::from_vars(vars).unwrap();
    omniflow::supabase::active_blueprints(http, &config)
        .await
        .unwrap_err()
        .to_string()
}

fn supabase_rows() -> Vec<Value> {
    let good = |name: &str, prio: &str| {
        json!({ "name": name, "priority": prio,
                "nodes": [{ "id": "a", "type": "transform", "template": "hello from {{ run.blueprint }}" }] })
    };
    vec![
        json!({ "id": 1, "name": "low-one", "active": true, "blueprint": good("low-one", "low") }),
        json!({ "id": 2, "name": "broken", "active": true,
                "blueprint": { "name": "broken", "nodes": [{ "id": "a", "type": "transfrom" }] } }),
        json!({ "id": 3, "name": "crit", "active": true, "blueprint": good("crit", "critical").to_string() }),
        json!({ "id": 4, "name": "off", "active": false, "blueprint": good("off", "normal") }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_rows_are_read_and_an_invalid_one_is_reported_with_its_id() {
    let fake = fakes::supabase("sb-key-123", "blueprints", supabase_rows()).await;
    let mut vars = std::collections::HashMap::new();
    vars.insert("SUPABASE_URL".to_string(), fake.url.clone());
    vars.insert("SUPABASE_KEY".to_string(), "sb-key-123".to_string());
    let config = omniflow::config::Config::from_vars(&vars).unwrap();
    let http = reqwest::Client::new();
    let rows = omniflow::supabase::active_blueprints(&http, &config)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "the inactive row is filtered by the server");
    assert_eq!(rows[0].blueprint.as_ref().unwrap().name, "low-one");
    let err = rows[1].blueprint.as_ref().unwrap_err();
    assert!(
        err.starts_with("Supabase row 2: ") && err.contains("transfrom"),
        "{err}"
    );
    assert_eq!(rows[2].blueprint.as_ref().unwrap().name, "crit");
    let req = &fake.requests()[0];
    assert_eq!(req.method, "GET");
    assert!(
        req.target.starts_with("/rest/v1/blueprints?") && req.target.contains("active=eq.true")
    );
    assert_eq!(req.header("apikey"), Some("sb-key-123"));
    assert_eq!(req.header("authorization"), Some("Bearer sb-key-123"));

    // A wrong key: a clear error that names the variable and never the key.
    vars.insert("SUPABASE_KEY".to_string(), "wrong-key-456".to_string());
    let e = supabase_refusal(&http, &vars).await;
    assert!(
        e.contains("401") && e.contains("SUPABASE_KEY") && !e.contains("wrong-key-456"),
        "{e}"
    );
}

/// A row larger than `MAX_BLUEPRINT_BYTES` is reported with its id, unparsed, and the others
/// still load; a reply larger than the reader buffers is refused with the setting named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supabase_row_over_max_blueprint_bytes_is_reported_with_its_id() {
    let good =
        json!({ "name": "small", "nodes": [{ "id": "a", "type": "transform", "template": "x" }] });
    // 20,000 numbers: 40 kB of text, 360 kB counting 16 bytes for each value.
    let numbers = vec![json!(1); 20_000];
    let big = json!({ "name": "big", "variables": { "L": numbers },
                      "nodes": [{ "id": "a", "type": "transform", "template": "x" }] });
    let rows = vec![
        json!({ "id": 7, "name": "big", "active": true, "blueprint": big }),
        json!({ "id": 8, "name": "small", "active": true, "blueprint": good }),
        json!({ "id": 9, "name": "big-text", "active": true, "blueprint": big.to_string() }),
    ];
    let fake = fakes::supabase("sb-key-123", "blueprints", rows).await;
    let mut vars = std::collections::HashMap::new();
    vars.insert("SUPABASE_URL".to_string(), fake.url.clone());
    vars.insert("SUPABASE_KEY".to_string(), "sb-key-123".to_string());
    vars.insert("MAX_BLUEPRINT_BYTES".to_string(), "65536".to_string());
    let config = omniflow::config::Config::from_vars(&vars).unwrap();
    let http = reqwest::Client::new();
    let rows = omniflow::supabase::active_blueprints(&http, &config)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for (row, id) in [(&rows[0], "7"), (&rows[2], "9")] {
        assert_eq!(row.id, id);
        let err = row.blueprint.as_ref().unwrap_err();
        assert!(
            err.starts_with(&format!("Supabase row {id}: "))
                && err.contains("over MAX_BLUEPRINT_BYTES (64 KiB)")
                && err.contains("raise MAX_BLUEPRINT_BYTES"),
            "{err}"
        );
    }
    assert_eq!(rows[1].blueprint.as_ref().unwrap().name, "small");

    // Raised, the same rows load.
    vars.insert("MAX_BLUEPRINT_BYTES".to_string(), "1048576".to_string());
    let config = omniflow::config::Config::from_vars(&vars).unwrap();
    let rows = omniflow::supabase::active_blueprints(&http, &config)
        .await
        .unwrap();
    assert!(rows.iter().all(|r| r.blueprint.is_ok()), "{rows:?}");

    // A reply of more than 4 × MAX_BLUEPRINT_BYTES is refused before it is buffered whole.
    vars.insert("MAX_BLUEPRINT_BYTES".to_string(), "16384".to_string());
    let e = supabase_refusal(&http, &vars).await;
    assert!(
        e.contains("larger than 64 KiB") && e.contains("MAX_BLUEPRINT_BYTES"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_active_from_supabase_with_one_digest() {
    let sb = fakes::supabase("sb-key-123", "blueprints", supabase_rows()).await;
    let dc = fakes::discord().await;
    let dir = tempfile::tempdir().unwrap();
    let hook = format!("{}/api/webhooks/1/tok-abcdefghijklmnopqrstuvwxyz", dc.url);
    let (d, url) = (dir.path().to_path_buf(), sb.url.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_omniflow"))
            .args(["run", "--all-active", "--json"])
            .current_dir(&d)
            .env("SUPABASE_URL", url)
            .env("SUPABASE_KEY", "sb-key-123")
            .env("DISCORD_WEBHOOK", hook)
            .env("NOTIFY_DIGEST", "discord")
            .env("DB_FILE", d.join("h.db"))
            .env("LOG_DIR", d.join("logs"))
            .env("OMNIFLOW_TIME_SCALE", "0.001")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Supabase row 2"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["blueprint"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["crit", "low-one"], "priority order");
    assert_eq!(v["failed"], 0);
    let digest = dc.requests();
    assert_eq!(digest.len(), 1, "one digest for the batch");
    let e = &digest[0].json()["embeds"][0];
    assert_eq!(e["title"], "OmniFlow: 2 blueprints ran, 0 failed");
    // Recorded in history like any run.
    let store = Store::open(&dir.path().join("h.db")).unwrap();
    assert_eq!(store.count_runs(&RunFilter::default()).unwrap(), 2);
}

/// Two real `omniflow daemon` processes on one database: a missed slot (runOnce) is claimed
/// by exactly one of them, and both stop cleanly on SIGTERM.
#[test]
fn two_daemons_on_one_database_fire_a_slot_once() {
    let dir = tempfile::tempdir().unwrap();
    let bps = dir.path().join("bps");
    std::fs::create_dir(&bps).unwrap();
    std::fs::write(
        bps.join("tick.json"),
        json!({ "name": "tick", "schedule": "* * * * *", "missedSlots": "runOnce",
                "nodes": [{ "id": "a", "type": "transform", "template": "tick" }] })
        .to_string(),
    )
    .unwrap();
    let db = dir.path().join("h.db");
    {
        // The last slot that fired was two hours ago: the slots since are missed.
        let store = Store::open(&db).unwrap();
        let past = SystemTime::now() - Duration::from_secs(7200);
        assert!(store.claim_slot("tick", past).unwrap());
    }
    let spawn = |n: u32| {
        std::process::Command::new(env!("CARGO_BIN_EXE_omniflow"))
            .args(["daemon", "--dir"])
            .arg(&bps)
            .current_dir(dir.path())
            .env("DB_FILE", &db)
            .env("LOG_DIR", dir.path().join(format!("logs{n}")))
            .env("OMNIFLOW_TIME_SCALE", "0.001")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(1);
    let b = spawn(2);
    let store = Store::open(&db).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let done = |store: &Store| {
        store
            .list_runs(&RunFilter {
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .iter()
            .any(|r| r.status == omniflow::events::RunStatus::Success)
    };
    while !done(&store) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Give the later daemon time to start and try the same slot.
    let log_ready = |n: u32| {
        omniflow::logging::log_files(&dir.path().join(format!("logs{n}")))
            .iter()
            .any(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .contains("daemon started")
            })
    };
    while !(log_ready(1) && log_ready(2)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for child in [&a, &b] {
        // SAFETY: sends a signal to a child process this test started and still owns.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
    }
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("daemon stopped"), "{stderr}");
    }
    let slots = store.slots_of("tick").unwrap();
    let runs = store
        .list_runs(&RunFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    // One run per claimed slot (the seeded one had none): never two for a slot.
    assert!(!runs.is_empty());
    assert_eq!(runs.len(), slots.len() - 1, "{runs:?} {slots:?}");
    assert!(runs.iter().all(|r| r.trigger == "schedule"));
    let mut ids: Vec<_> = slots.iter().filter_map(|s| s.run_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), runs.len());
}

#[test]
fn the_validator_rejects_a_zone_it_cannot_use_and_a_cron_that_never_fires() {
    let doc = json!({
        "name": "x", "schedule": "0 0 30 2 *", "timezone": "Mars/Olympus", "missedSlots": "sometimes",
        "nodes": [{ "id": "a", "type": "transform", "template": "x" }]
    });
    let problems: Vec<String> = omniflow::blueprint::validate(&doc)
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("schedule: ") && p.contains("never fires")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("timezone: ") && p.contains("fixed offset")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("missedSlots: ")),
        "{problems:?}"
    );
    for tz in ["+05:30", "Europe/Berlin", "Asia/Kolkata", "utc"] {
        let ok = json!({
            "name": "x", "schedule": "17 */6 * * *", "timezone": tz, "missedSlots": "runOnce",
            "nodes": [{ "id": "a", "type": "transform", "template": "x" }]
        });
        assert!(omniflow::blueprint::validate(&ok).is_empty(), "{tz}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_active_from_a_dir_exits_1_when_one_fails_and_the_digest_says_so() {
    let tg = fakes::telegram("1234:digest-token-abcdefghijklmnop").await;
    let dir = tempfile::tempdir().unwrap();
    let bps = dir.path().join("bps");
    std::fs::create_dir(&bps).unwrap();
    let node =
        |t: &str| json!([{ "id": "a", "type": "transform", "parse": "json", "template": t }]);
    std::fs::write(
        bps.join("ok.json"),
        json!({ "name": "ok", "nodes": node("{\"x\": 1}") }).to_string(),
    )
    .unwrap();
    std::fs::write(
        bps.join("bad.json"),
        json!({ "name": "bad", "priority": "high", "nodes": node("not json") }).to_string(),
    )
    .unwrap();
    std::fs::write(
        bps.join("off.json"),
        json!({ "name": "off", "active": false, "nodes": node("1") }).to_string(),
    )
    .unwrap();
    std::fs::write(bps.join("broken.json"), "{ \"name\": ").unwrap();
    let (d, url) = (dir.path().to_path_buf(), tg.url.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_omniflow"))
            .args(["run", "--all-active", "--dir", "bps"])
            .current_dir(&d)
            .env("TELEGRAM_BOT_TOKEN", "1234:digest-token-abcdefghijklmnop")
            .env("TELEGRAM_CHAT_ID", "-100123")
            .env("TELEGRAM_API_URL", url)
            .env("NOTIFY_DIGEST", "telegram")
            .env("DB_FILE", d.join("h.db"))
            .env("LOG_DIR", d.join("logs"))
            .env("OMNIFLOW_TIME_SCALE", "0.001")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("broken.json"),
        "an invalid file is reported: {stderr}"
    );
    assert!(stderr.contains("2 blueprints ran, 1 failed"), "{stderr}");
    let sent = tg.requests();
    assert_eq!(sent.len(), 1);
    let body = sent[0].json();
    assert_eq!(body["parse_mode"], "HTML");
    let text = body["text"].as_str().unwrap();
    assert!(
        text.starts_with("<b>OmniFlow: 2 blueprints ran, 1 failed</b>"),
        "{text}"
    );
    assert!(
        text.contains("❌ <b>bad</b> error") && text.contains("✅ <b>ok</b> success"),
        "{text}"
    );
    assert!(fakes::html_balanced(text));
}
