//! A fleet of real `omniflow` processes on one PostgreSQL database (`DATABASE_URL`): the
//! steps of runs driven by one process are claimed and run by all of them, each with its own
//! provider (its own path at the counting fake, as each host would have its own Ollama), and a
//! killed process's attempts run elsewhere once its lease expires. Each test has its own
//! scratch database and skips (saying so) without a PostgreSQL server.

mod common;

use omniflow::store::pg::testing::ScratchDb;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const ANSWER: &str = r#"{"choices":[{"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

struct Fleet {
    dir: tempfile::TempDir,
    db: ScratchDb,
    fake: common::counting::CountingFake,
    children: Vec<Child>,
    /// Every process's `LEASE_TIMEOUT`: short, so the tests that kill a process wait little.
    lease: &'static str,
}

impl Fleet {
    fn new(name: &str, latency: Duration) -> Option<Fleet> {
        let db = ScratchDb::new(name)?;
        Some(Fleet {
            dir: tempfile::tempdir().unwrap(),
            db,
            fake: common::counting::start(latency, ANSWER.to_string()),
            children: Vec::new(),
            lease: "2",
        })
    }

    /// A process of the fleet; `host` names its history file, its log directory and its
    /// provider's path at the fake.
    fn cmd(&self, host: &str, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let d = self.dir.path();
        let mut c = common::bin::omniflow(d, args, [("DATABASE_URL", self.db.url())]);
        c.env("DB_FILE", d.join(format!("{host}.db")))
            .env("LOG_DIR", d.join(format!("logs-{host}")))
            .env("OPENAI_BASE_URL", format!("{}/{host}/v1", self.fake.url))
            // No question to the fake about its slots, no cached answers.
            .env("OPENAI_CONCURRENCY", "0")
            .env("CACHE_TTL", "0")
            .env("LEASE_TIMEOUT", self.lease)
            .env("MAX_RETRIES", "0");
        for (k, v) in extra {
            c.env(k, v);
        }
        c
    }

    fn daemon(&mut self, host: &str, concurrency: &str) {
        let empty = self.dir.path().join("none");
        std::fs::create_dir_all(&empty).unwrap();
        let child = self
            .cmd(
                host,
                &["daemon", "--dir", empty.to_str().unwrap()],
                &[("CONCURRENCY", concurrency)],
            )
            // Logs go to LOG_DIR: a pipe nobody reads would stop a chatty daemon once full.
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Writes `runs` blueprints of `items` model calls each, with prompts unique in the
    /// fleet, into a directory of their own.
    fn blueprints(&self, runs: usize, items: usize) -> PathBuf {
        let dir = self.dir.path().join("bps");
        std::fs::create_dir_all(&dir).unwrap();
        for r in 0..runs {
            let list: Vec<String> = (0..items).map(|i| format!("r{r}i{i}")).collect();
            let bp = json!({
                "name": format!("fan{r}"),
                "variables": { "ITEMS": list },
                "nodes": [{
                    "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                    "forEach": "{{ vars.ITEMS }}", "prompt": "say {{ item }}"
                }]
            });
            std::fs::write(dir.join(format!("fan{r}.json")), bp.to_string()).unwrap();
        }
        dir
    }

    /// Answers per host (the path prefix at the fake).
    fn calls_by_host(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for ((path, _), n) in self.fake.prompts.lock().unwrap().iter() {
            let host = path.trim_start_matches('/').split('/').next().unwrap_or("");
            *out.entry(host.to_string()).or_insert(0) += n;
        }
        out
    }

    /// Answers per prompt, wherever they came from.
    fn calls_by_prompt(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for ((path, prompt), n) in self.fake.prompts.lock().unwrap().iter() {
            let host = path.trim_start_matches('/').split('/').next().unwrap_or("");
            for _ in 0..*n {
                out.entry(prompt.clone())
                    .or_default()
                    .push(host.to_string());
            }
        }
        out
    }

    /// Everything `host` logged so far (its LOG_DIR).
    fn log(&self, host: &str) -> String {
        std::fs::read_dir(self.dir.path().join(format!("logs-{host}")))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    /// The fleet's one history, in its PostgreSQL database.
    fn history(&self) -> postgres::Client {
        self.db.target().connect().unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(child: Child, timeout: Duration) -> (bool, String, String) {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(o)) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        ),
        _ => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the driving process did not finish within {timeout:?}");
        }
    }
}

fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn three_daemons_share_two_thousand_steps_and_run_each_exactly_once() {
    let Some(mut fleet) = Fleet::new("share", Duration::from_millis(5)) else {
        return;
    };
    // Nobody dies here: a lease long enough that a process starved of CPU by a loaded
    // machine (2 s of no heartbeat) is not taken for dead, which would rerun its steps.
    fleet.lease = "30";
    for host in ["d1", "d2", "d3"] {
        fleet.daemon(host, "8");
    }
    let bps = fleet.blueprints(20, 100);
    // The driver takes little work itself: the daemons do most of it.
    let driver = fleet
        .cmd(
            "driver",
            &["run", "--all-active", "--dir", bps.to_str().unwrap()],
            &[("CONCURRENCY", "2")],
        )
        .spawn()
        .unwrap();
    let (ok, out, err) = finish(driver, Duration::from_secs(600));
    assert!(ok, "{out}\n{err}");

    // Every step ran exactly once, in the whole fleet.
    let by_prompt = fleet.calls_by_prompt();
    assert_eq!(by_prompt.len(), 2000, "every step was answered");
    let twice: Vec<(&String, &Vec<String>)> = by_prompt
        .iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .collect();
    assert!(twice.is_empty(), "steps answered more than once: {twice:?}");

    // Each daemon ran a share, with its own provider.
    let by_host = fleet.calls_by_host();
    for host in ["d1", "d2", "d3"] {
        assert!(by_host.get(host).copied().unwrap_or(0) > 0, "{by_host:?}");
    }

    // The driver's history holds every run and step as done.
    let mut h = fleet.history();
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_executions WHERE status = 'success'"
        ),
        20
    );
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        2000
    );
    assert_eq!(
        count(&mut h, "SELECT count(*) FROM runner_attempts"),
        2000,
        "one attempt per step"
    );
    // Nothing is left in the queue.
    let mut c = fleet.db.target().connect().unwrap();
    let left: i64 = c
        .query_one("SELECT count(*) FROM runner_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[test]
fn a_killed_daemons_steps_run_elsewhere_after_its_lease_and_done_steps_do_not_rerun() {
    // Calls take long enough that the daemon dies with attempts in flight.
    let Some(mut fleet) = Fleet::new("sigkill", Duration::from_millis(400)) else {
        return;
    };
    for host in ["d1", "d2", "d3"] {
        fleet.daemon(host, "4");
    }
    let bps = fleet.blueprints(1, 60);
    let driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &[("CONCURRENCY", "1")],
        )
        .spawn()
        .unwrap();
    // d1 has answered some calls: it is mid-fan-out, holding more.
    wait_for("d1 to run steps", Duration::from_secs(120), || {
        fleet.calls_by_host().get("d1").copied().unwrap_or(0) >= 4
    });
    let d1 = &mut fleet.children[0];
    d1.kill().unwrap(); // SIGKILL: no goodbye, its leases just stop being renewed
    d1.wait().unwrap();
    // Calls d1 sent before it died may still be answered (into a closed socket) and counted:
    // wait out the fake's latency before taking d1's count.
    std::thread::sleep(Duration::from_secs(1));
    let answered_by_d1 = fleet.calls_by_host().get("d1").copied().unwrap_or(0);

    let (ok, out, err) = finish(driver, Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");

    let by_prompt = fleet.calls_by_prompt();
    assert_eq!(by_prompt.len(), 60, "every step was answered");
    // A prompt answered twice was first answered to d1 (which died before recording it);
    // no step another host recorded reran.
    for (prompt, hosts) in &by_prompt {
        if hosts.len() > 1 {
            assert!(
                hosts.iter().filter(|h| *h != "d1").count() == 1,
                "{prompt} ran on {hosts:?}"
            );
        }
    }
    assert_eq!(
        fleet.calls_by_host().get("d1").copied().unwrap_or(0),
        answered_by_d1,
        "nothing reached d1 after it died"
    );
    let mut h = fleet.history();
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        60
    );
    assert_eq!(
        count(&mut h, "SELECT count(*) FROM runner_attempts"),
        60,
        "a rescued attempt is the same attempt, not a retry"
    );
    // The fleet said it took the dead host's steps back (whichever process swept); the
    // survivors stop first, so their logs are complete.
    for c in &mut fleet.children[1..] {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    let logs: String = ["d2", "d3", "driver"]
        .iter()
        .flat_map(|h| {
            std::fs::read_dir(fleet.dir.path().join(format!("logs-{h}")))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        })
        .collect();
    assert!(
        logs.contains("went back to the queue"),
        "no rescue logged by d2, d3 or the driver"
    );
}

/// The processes' tags decide who runs a tagged step.
#[test]
fn a_tagged_node_runs_only_on_a_process_with_its_tags() {
    let Some(mut fleet) = Fleet::new("tags", Duration::from_millis(5)) else {
        return;
    };
    let empty = fleet.dir.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    let gpu = fleet
        .cmd(
            "gpu",
            &["daemon", "--dir", empty.to_str().unwrap()],
            &[("OMNIFLOW_TAGS", "gpu"), ("CONCURRENCY", "4")],
        )
        .spawn()
        .unwrap();
    fleet.children.push(gpu);
    let dir = fleet.dir.path().join("bps");
    std::fs::create_dir_all(&dir).unwrap();
    let bp: Value = json!({
        "name": "tagged",
        "variables": { "ITEMS": (0..10).map(|i| format!("t{i}")).collect::<Vec<_>>() },
        "nodes": [
            { "id": "big", "type": "llm", "provider": "openai", "model": "m", "tags": ["gpu"],
              "forEach": "{{ vars.ITEMS }}", "prompt": "big {{ item }}" },
            { "id": "small", "type": "llm", "provider": "openai", "model": "m",
              "forEach": "{{ vars.ITEMS }}", "prompt": "small {{ item }}" }
        ]
    });
    let path = dir.join("tagged.json");
    std::fs::write(&path, bp.to_string()).unwrap();
    // The driver has no tags: it may run the untagged steps, never the gpu ones.
    let driver = fleet
        .cmd(
            "driver",
            &["run", path.to_str().unwrap()],
            &[("CONCURRENCY", "4")],
        )
        .spawn()
        .unwrap();
    let (ok, out, err) = finish(driver, Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    for (prompt, hosts) in fleet.calls_by_prompt() {
        assert_eq!(hosts.len(), 1, "{prompt}: {hosts:?}");
        if prompt.starts_with("big") {
            assert_eq!(hosts, ["gpu"], "{prompt}");
        }
    }
}

#[test]
fn a_daemon_stopped_with_sigterm_gives_its_steps_back_at_once() {
    let Some(mut fleet) = Fleet::new("sigterm", Duration::from_millis(400)) else {
        return;
    };
    let empty = fleet.dir.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    // A lease far longer than the test: only a handover can move d1's steps in time.
    for host in ["d1", "d2"] {
        let child = fleet
            .cmd(
                host,
                &["daemon", "--dir", empty.to_str().unwrap()],
                &[
                    ("CONCURRENCY", "4"),
                    ("LEASE_TIMEOUT", "600"),
                    ("SHUTDOWN_GRACE", "0"),
                ],
            )
            .spawn()
            .unwrap();
        fleet.children.push(child);
    }
    let bps = fleet.blueprints(1, 40);
    let driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &[("CONCURRENCY", "1"), ("LEASE_TIMEOUT", "600")],
        )
        .spawn()
        .unwrap();
    wait_for("d1 to run steps", Duration::from_secs(120), || {
        fleet.calls_by_host().get("d1").copied().unwrap_or(0) >= 2
    });
    let d1 = fleet.children[0].id();
    assert!(Command::new("kill")
        .args(["-TERM", &d1.to_string()])
        .status()
        .unwrap()
        .success());
    let (ok, out, err) = finish(driver, Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    let mut h = fleet.history();
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        40
    );
    let log = |host: &str| -> String {
        std::fs::read_dir(fleet.dir.path().join(format!("logs-{host}")))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    };
    assert!(
        log("d1").contains("gave a step back to the queue"),
        "{}",
        log("d1")
    );
    assert!(
        !log("d2").contains("went back to the queue"),
        "no lease expired"
    );
}

#[test]
fn a_rate_limit_is_one_budget_for_the_whole_fleet() {
    let Some(mut fleet) = Fleet::new("rates", Duration::from_millis(5)) else {
        return;
    };
    // 4 calls an hour for the whole fleet: per process, the three processes would make 12.
    let limit = [("OPENAI_RATE_LIMIT", "4/h"), ("CONCURRENCY", "4")];
    // The budget is counted in fixed windows on the clock's hours, and a window's edge lets
    // up to 4 more through (documented in store/pg/limits.rs). The test lasts well under a
    // minute: started in the last minute of an hour, it waits for the next one.
    let into_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 3600;
    if into_hour >= 3600 - 60 {
        std::thread::sleep(Duration::from_secs(3600 - into_hour + 1));
    }
    let empty = fleet.dir.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    for host in ["d1", "d2"] {
        let child = fleet
            .cmd(host, &["daemon", "--dir", empty.to_str().unwrap()], &limit)
            .spawn()
            .unwrap();
        fleet.children.push(child);
    }
    let dir = fleet.dir.path().join("bps");
    std::fs::create_dir_all(&dir).unwrap();
    let bp = json!({
        "name": "limited",
        // The run stops at its deadline, with the calls past the budget still waiting.
        "timeout": "8s",
        "variables": { "ITEMS": (0..20).map(|i| format!("q{i}")).collect::<Vec<_>>() },
        "nodes": [{ "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                    "forEach": "{{ vars.ITEMS }}", "prompt": "say {{ item }}" }]
    });
    let path = dir.join("limited.json");
    std::fs::write(&path, bp.to_string()).unwrap();
    let driver = fleet
        .cmd("driver", &["run", path.to_str().unwrap()], &limit)
        .spawn()
        .unwrap();
    let (ok, _, err) = finish(driver, Duration::from_secs(300));
    assert!(!ok, "the run cannot finish within the budget: {err}");
    let calls: usize = fleet.calls_by_host().values().sum();
    assert_eq!(calls, 4, "{:?}", fleet.calls_by_host());
}

/// The driver of a run is leased too: when the process that started a run dies, a daemon of
/// the fleet adopts the run from the shared history and finishes it, and no step the history
/// already recorded as done is asked again.
#[test]
fn a_dead_drivers_run_is_finished_by_a_daemon_without_repeating_done_steps() {
    let Some(mut fleet) = Fleet::new("driver_dies", Duration::from_millis(300)) else {
        return;
    };
    for host in ["d1", "d2"] {
        fleet.daemon(host, "4");
    }
    let bps = fleet.blueprints(1, 40);
    let mut driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &[("CONCURRENCY", "2")],
        )
        .spawn()
        .unwrap();
    let mut h = fleet.history();
    // The tables appear when the first process has migrated the database.
    wait_for(
        "some steps to be recorded done",
        Duration::from_secs(120),
        || {
            h.query_one(
                "SELECT count(*) FROM runner_steps WHERE status = 'success'",
                &[],
            )
            .is_ok_and(|r| r.get::<_, i64>(0) >= 5)
        },
    );
    driver.kill().unwrap(); // SIGKILL: the run is left `running`, owned by a dead process
    driver.wait().unwrap();
    let done_before: Vec<String> = h
        .query(
            "SELECT step_key FROM runner_steps WHERE status = 'success'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(done_before.len() >= 5);

    wait_for(
        "a daemon to finish the run",
        Duration::from_secs(180),
        || {
            count(
                &mut h,
                "SELECT count(*) FROM runner_executions WHERE status = 'success'",
            ) == 1
        },
    );
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        40
    );
    let owner: String = h
        .query_one("SELECT owner FROM runner_executions", &[])
        .unwrap()
        .get(0);
    assert!(!owner.is_empty());
    // A step recorded done before the driver died was not asked again; a step in flight when
    // it died may have been (at least once, never lost).
    let by_prompt = fleet.calls_by_prompt();
    assert_eq!(by_prompt.len(), 40, "every step was answered");
    let keys: Vec<(String, String)> = h
        .query("SELECT step_key, output FROM runner_steps", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect();
    assert_eq!(keys.len(), 40);
    for key in &done_before {
        // The prompt of item i is "say r0i{i}"; the step key names the item.
        let item: usize = key
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("an item index in {key}"));
        let asked = by_prompt
            .get(&format!("say r0i{item}"))
            .map(Vec::len)
            .unwrap_or(0);
        assert_eq!(asked, 1, "{key} was recorded done and then asked again");
    }
    // What the dead driver left in the queue goes once the run has ended (the sweep runs
    // every half lease).
    wait_for(
        "the dead driver's rows to be pruned",
        Duration::from_secs(30),
        || {
            count(
                &mut h,
                "SELECT count(*) FROM runner_queue WHERE state IN ('done', 'failed')",
            ) == 0
        },
    );
}

/// A driver that was paused past its lease comes back to find its run taken over: it stops
/// driving it (and says so) instead of racing the new owner, and the run still ends once.
#[test]
fn a_driver_paused_past_its_lease_lets_go_of_its_run() {
    let Some(mut fleet) = Fleet::new("driver_paused", Duration::from_millis(300)) else {
        return;
    };
    for host in ["d1", "d2"] {
        fleet.daemon(host, "4");
    }
    let bps = fleet.blueprints(1, 40);
    let driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &[("CONCURRENCY", "2")],
        )
        .spawn()
        .unwrap();
    let pid = driver.id().to_string();
    let mut h = fleet.history();
    wait_for(
        "some steps to be recorded done",
        Duration::from_secs(120),
        || {
            h.query_one(
                "SELECT count(*) FROM runner_steps WHERE status = 'success'",
                &[],
            )
            .is_ok_and(|r| r.get::<_, i64>(0) >= 3)
        },
    );
    let first_owner: String = h
        .query_one("SELECT owner FROM runner_executions", &[])
        .unwrap()
        .get(0);
    // Paused, alive: only its lease (2 s, by the database's clock) can say it is gone.
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    wait_for(
        "a daemon to take the run over",
        Duration::from_secs(60),
        || {
            h.query_one("SELECT owner FROM runner_executions", &[])
                .is_ok_and(|r| {
                    r.get::<_, Option<String>>(0)
                        .is_some_and(|o| o != first_owner)
                })
        },
    );
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let (_, out, err) = finish(driver, Duration::from_secs(120));
    wait_for("the run to end", Duration::from_secs(180), || {
        count(
            &mut h,
            "SELECT count(*) FROM runner_executions WHERE status = 'success'",
        ) == 1
    });
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        40
    );
    let logged = || {
        std::fs::read_dir(fleet.dir.path().join("logs-driver"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .contains("another process took this run over")
            })
    };
    assert!(logged(), "the driver did not say it let go\n{out}\n{err}");
}

/// Three daemons, each with the same schedule, on one database: every slot (the missed one
/// each daemon finds at start, and the live ones after) starts one run in the whole fleet, and
/// its model call is made once.
#[test]
fn a_schedule_slot_with_three_daemons_up_fires_once() {
    let Some(mut fleet) = Fleet::new("schedule", Duration::from_millis(5)) else {
        return;
    };
    let bps = fleet.dir.path().join("bps");
    std::fs::create_dir_all(&bps).unwrap();
    let bp = json!({
        "name": "tick", "schedule": "* * * * *", "missedSlots": "runOnce",
        "nodes": [{ "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                    "prompt": "tick {{ run.id }}" }]
    });
    std::fs::write(bps.join("tick.json"), bp.to_string()).unwrap();
    {
        // The last slot fired two hours ago: every daemon finds the slots since missed, and
        // each tries to run them once, at the same time as the others.
        let store = omniflow::store::Store::open_postgres(fleet.db.target()).unwrap();
        let past = std::time::SystemTime::now() - Duration::from_secs(7200);
        assert!(store.claim_slot("tick", past).unwrap());
    }
    for host in ["d1", "d2", "d3"] {
        let child = fleet
            .cmd(
                host,
                &["daemon", "--dir", bps.to_str().unwrap()],
                // A daemon that finds a slot taken says so (at debug level).
                &[
                    ("CONCURRENCY", "2"),
                    ("RUST_LOG", "info,omniflow::schedule=debug"),
                ],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        fleet.children.push(child);
    }
    let mut h = fleet.history();
    // Slots fired since `after` (the database's time), as the daemons log them.
    let slots = |h: &mut postgres::Client, after: &str| -> Vec<String> {
        h.query(
            "SELECT to_char(slot AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
             FROM schedule_slots WHERE slot > $1::text::timestamptz ORDER BY slot",
            &[&after],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let started = Instant::now();
    // The missed slot: each daemon finds it at start (one started late finds it taken and
    // passes it by).
    wait_for("the missed slot", Duration::from_secs(60), || {
        !slots(&mut h, "-infinity").is_empty()
    });
    // A live slot: the next minute, which the three daemons, all up, reach at once.
    wait_for(
        "the three daemons to start",
        Duration::from_secs(60),
        || {
            ["d1", "d2", "d3"]
                .iter()
                .all(|d| fleet.log(d).contains("daemon started"))
        },
    );
    let up: String = h.query_one("SELECT now()::text", &[]).unwrap().get(0);
    wait_for("a live slot", Duration::from_secs(90), || {
        !slots(&mut h, &up).is_empty()
    });
    let live = slots(&mut h, &up).remove(0);
    // Every daemon tried it: one ran it, the two others found it taken.
    wait_for(
        "the two other daemons to find the live slot taken",
        Duration::from_secs(60),
        || {
            ["d1", "d2", "d3"]
                .iter()
                .map(|d| {
                    fleet
                        .log(d)
                        .lines()
                        .filter(|l| {
                            l.contains("slot already claimed by another process")
                                && l.contains(&live)
                        })
                        .count()
                })
                .sum::<usize>()
                == 2
        },
    );
    wait_for("the runs to end", Duration::from_secs(60), || {
        count(
            &mut h,
            "SELECT count(*) FROM runner_executions WHERE status IN ('queued', 'running')",
        ) == 0
    });
    // Stopped, so no next minute's slot fires while the counts are taken.
    for c in &mut fleet.children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    let fired = slots(&mut h, "-infinity");
    assert!(
        fired.len() >= 3,
        "the seeded, the missed and the live slot: {fired:?}"
    );
    // One run per slot: a slot fired twice would leave a run no slot names.
    let runs: Vec<(String, String)> = h
        .query(
            "SELECT id, status FROM runner_executions WHERE trigger = 'schedule'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let named = count(
        &mut h,
        "SELECT count(DISTINCT run_id) FROM schedule_slots WHERE run_id IS NOT NULL",
    );
    assert!(runs.len() >= 2, "{runs:?}");
    assert_eq!(
        runs.len() as i64,
        named,
        "runs {runs:?} for slots {fired:?}"
    );
    // One model call per run that ended, wherever it ran (a run a stopping daemon started
    // last may have been handed over before its call).
    let by_prompt = fleet.calls_by_prompt();
    for (id, status) in &runs {
        let hosts = by_prompt
            .get(&format!("tick {id}"))
            .cloned()
            .unwrap_or_default();
        let want = usize::from(status == "success");
        assert!(
            hosts.len() <= 1 && hosts.len() >= want,
            "run {id} ({status}) asked {hosts:?}"
        );
    }
    assert!(by_prompt.len() <= runs.len(), "{by_prompt:?}");
    eprintln!(
        "{} slots fired once each with 3 daemons up ({:?})",
        fired.len(),
        started.elapsed()
    );
}

/// The server drops every connection of the fleet, several times, while 3 daemons and a
/// driver run four fan-outs that end with a notification: every process reconnects, every
/// step runs once, every run ends, and each notification is sent once.
#[test]
fn the_fleet_survives_its_database_connections_being_killed_mid_run() {
    let Some(mut fleet) = Fleet::new("pg_terminate", Duration::from_millis(150)) else {
        return;
    };
    // Every process can send the notification: its step runs wherever it is claimed.
    let telegram = [
        ("TELEGRAM_API_URL", fleet.fake.url.clone()),
        ("TELEGRAM_BOT_TOKEN", "123456:TESTtoken".to_string()),
        ("TELEGRAM_CHAT_ID", "42".to_string()),
    ];
    let with = |concurrency: &'static str| -> Vec<(&str, String)> {
        let mut v: Vec<(&str, String)> = telegram.to_vec();
        v.push(("CONCURRENCY", concurrency.to_string()));
        v
    };
    let empty = fleet.dir.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    for host in ["d1", "d2", "d3"] {
        let env = with("3");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let child = fleet
            .cmd(host, &["daemon", "--dir", empty.to_str().unwrap()], &env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        fleet.children.push(child);
    }
    let dir = fleet.dir.path().join("bps");
    std::fs::create_dir_all(&dir).unwrap();
    const RUNS: usize = 4;
    const ITEMS: usize = 50;
    for r in 0..RUNS {
        let bp = json!({
            "name": format!("cut{r}"),
            "variables": { "ITEMS": (0..ITEMS).map(|i| format!("r{r}i{i}")).collect::<Vec<_>>() },
            "nodes": [
                { "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                  "forEach": "{{ vars.ITEMS }}", "prompt": "say {{ item }}" },
                { "id": "post", "type": "notify", "needs": ["ask"], "channel": "telegram",
                  "text": "run {{ run.id }}: {{ nodes.ask.output | length }} answers" }
            ]
        });
        std::fs::write(dir.join(format!("cut{r}.json")), bp.to_string()).unwrap();
    }
    let env = with("1");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let driver = fleet
        .cmd(
            "driver",
            &["run", "--all-active", "--dir", dir.to_str().unwrap()],
            &env,
        )
        .spawn()
        .unwrap();
    let mut h = fleet.history();
    let total = RUNS * ITEMS;
    let mut cuts = 0;
    // At three points of the work (answers given so far), with calls in flight each time.
    for at in [total / 8, total * 3 / 8, total * 5 / 8] {
        wait_for("steps to be answered", Duration::from_secs(180), || {
            fleet.calls_by_host().values().sum::<usize>() >= at
        });
        // Every connection to the fleet's database but this one: the store's writer and
        // readers, the queue's pool and the LISTEN connection of each process.
        let killed: i64 = h
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()) AS t",
                &[&fleet.db.name()],
            )
            .unwrap()
            .get(0);
        assert!(killed > 0);
        cuts += 1;
    }
    let by_host_after_cuts = fleet.calls_by_host();
    let (ok, out, err) = finish(driver, Duration::from_secs(300));
    assert!(ok, "the driver failed after {cuts} cuts:\n{out}\n{err}");

    // Every run ended well, with every step recorded once.
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_executions WHERE status = 'success'"
        ),
        RUNS as i64
    );
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        (total + RUNS) as i64
    );
    // Every step was asked once in the whole fleet: none lost, none asked twice.
    let by_prompt = fleet.calls_by_prompt();
    assert_eq!(by_prompt.len(), RUNS * ITEMS, "every step was answered");
    let twice: Vec<_> = by_prompt.iter().filter(|(_, h)| h.len() > 1).collect();
    assert!(twice.is_empty(), "steps asked more than once: {twice:?}");
    // Each run's notification went out once.
    let runs: Vec<String> = h
        .query("SELECT id FROM runner_executions", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let calls = fleet.fake.calls.lock().unwrap().clone();
    for run in &runs {
        let sent: usize = calls
            .iter()
            .filter(|(path, _)| path.ends_with(&format!("/sendMessage/{run}")))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(sent, 1, "notifications of {run}: {calls:?}");
    }
    // Each daemon came back after the last cut and took more work.
    let by_host = fleet.calls_by_host();
    for d in ["d1", "d2", "d3"] {
        assert!(
            by_host.get(d).copied().unwrap_or(0) > by_host_after_cuts.get(d).copied().unwrap_or(0),
            "{d} did no work after the last cut: {by_host_after_cuts:?} then {by_host:?}"
        );
    }
    // Nothing is left in the queue.
    assert_eq!(count(&mut h, "SELECT count(*) FROM runner_queue"), 0);
}

/// A driver that dies after some of its queued steps finished, before it took their results:
/// the daemon that adopts the run takes those results from the queue instead of asking the
/// provider again.
#[test]
fn an_adopted_run_uses_the_results_its_dead_driver_left_in_the_queue() {
    let Some(mut fleet) = Fleet::new("driver_left_results", Duration::from_millis(300)) else {
        return;
    };
    for host in ["d1", "d2"] {
        fleet.daemon(host, "4");
    }
    let bps = fleet.blueprints(1, 40);
    let mut driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &[("CONCURRENCY", "1")],
        )
        .spawn()
        .unwrap();
    let pid = driver.id().to_string();
    let mut h = fleet.history();
    wait_for("the run to be under way", Duration::from_secs(120), || {
        h.query_one(
            "SELECT count(*) FROM runner_steps WHERE status = 'success'",
            &[],
        )
        .is_ok_and(|r| r.get::<_, i64>(0) >= 2)
    });
    // Frozen: the daemons finish the steps they hold, and nobody takes their results.
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let left = |h: &mut postgres::Client| -> Vec<String> {
        h.query(
            "SELECT step_key FROM runner_queue WHERE state = 'done' ORDER BY step_key",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    wait_for(
        "finished results in the queue",
        Duration::from_secs(60),
        || left(&mut h).len() >= 4,
    );
    driver.kill().unwrap(); // SIGKILL (a stopped process dies too)
    driver.wait().unwrap();
    let finished_unrecorded = left(&mut h);
    // What was asked before the run changed hands (a step may have been asked twice already if
    // a loaded machine delayed a worker's heartbeats past its lease: not the adoption's doing).
    let asked_before = fleet.calls_by_prompt();
    assert!(
        !finished_unrecorded.is_empty(),
        "the steps were finished in the queue, not recorded"
    );

    wait_for(
        "a daemon to finish the run",
        Duration::from_secs(180),
        || {
            count(
                &mut h,
                "SELECT count(*) FROM runner_executions WHERE status = 'success'",
            ) == 1
        },
    );
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        40
    );
    let by_prompt = fleet.calls_by_prompt();
    assert_eq!(by_prompt.len(), 40, "every step was answered");
    for key in &finished_unrecorded {
        let item: usize = key
            .trim_start_matches("ask[")
            .trim_end_matches(']')
            .parse()
            .unwrap_or_else(|_| panic!("an item index in {key}"));
        let prompt = format!("say r0i{item}");
        let asked = by_prompt.get(&prompt).cloned().unwrap_or_default();
        let before = asked_before.get(&prompt).cloned().unwrap_or_default();
        assert!(!before.is_empty(), "{key} was answered before the kill");
        assert_eq!(
            asked, before,
            "{key} had its result in the queue when its driver died, and was asked again"
        );
        // Recorded as the attempt that ran, not as a second one.
        let attempts = count(
            &mut h,
            &format!(
                "SELECT count(*) FROM runner_attempts WHERE step_key = '{key}' AND attempt = 1"
            ),
        );
        assert_eq!(attempts, 1, "{key}");
    }
    // The adopting driver took the rows it used: none is left for the sweep.
    wait_for("the queue to be empty", Duration::from_secs(30), || {
        count(&mut h, "SELECT count(*) FROM runner_queue") == 0
    });
}

/// The warnings `host` logged (JSON lines in its LOG_DIR), as their messages.
fn warnings(fleet: &Fleet, host: &str) -> Vec<String> {
    fleet
        .log(host)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "WARN")
        .map(|v| v["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A worker on another host marks a step running as soon as it claims its row; the driver
/// recorded the step `pending` just before. In an ordinary fan-out over three processes every
/// history write finds its step in the state it expects: none is ignored (logged as
/// "store: ignored …"), and each step's start is the one its worker recorded.
#[test]
fn a_fan_out_over_three_processes_writes_every_step_in_order() {
    let Some(mut fleet) = Fleet::new("in_order", Duration::from_millis(20)) else {
        return;
    };
    fleet.lease = "30";
    for host in ["d1", "d2"] {
        fleet.daemon(host, "8");
    }
    let bps = fleet.blueprints(1, 200);
    let driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &[("CONCURRENCY", "8")],
        )
        .spawn()
        .unwrap();
    let (ok, out, err) = finish(driver, Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    // The daemons' last writes are in before their logs are read.
    for c in &mut fleet.children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    let by_host = fleet.calls_by_host();
    assert!(
        ["d1", "d2"]
            .iter()
            .all(|d| by_host.get(*d).copied().unwrap_or(0) > 0),
        "the daemons ran steps: {by_host:?}"
    );
    for host in ["d1", "d2", "driver"] {
        let ignored: Vec<String> = warnings(&fleet, host)
            .into_iter()
            .filter(|m| m.contains("ignored"))
            .collect();
        assert!(
            ignored.is_empty(),
            "{host} logged {} ignored writes, first: {:?}",
            ignored.len(),
            ignored.first()
        );
    }
    let mut h = fleet.history();
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success' AND attempts = 1"
        ),
        200
    );
}

/// Terminates every backend of the fleet's database but the caller's own, every `every`,
/// until `stop` is set; returns how many it terminated.
fn keep_cutting(
    db: &ScratchDb,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<i64> {
    let (target, name) = (db.target().clone(), db.name().to_string());
    std::thread::spawn(move || {
        let mut c = target.connect().unwrap();
        let mut killed = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(every);
            killed += c
                .query_one(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()) AS t",
                    &[&name],
                )
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0);
        }
        killed
    })
}

/// The fleet-wide rate limit keeps its budget while the server keeps dropping the fleet's
/// connections: a place is taken on another connection when its own was dropped, never
/// skipped ("calling anyway") and never counted twice, and no step fails for it.
#[test]
fn a_rate_limited_fan_out_keeps_its_budget_while_connections_are_killed() {
    // The harness's short lease: a claim whose reply was lost with its connection leaves
    // its rows to be rescued when their lease expires.
    let Some(mut fleet) = Fleet::new("rates_cut", Duration::from_millis(20)) else {
        return;
    };
    let limit = [("OPENAI_RATE_LIMIT", "10/s"), ("CONCURRENCY", "4")];
    let empty = fleet.dir.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    for host in ["d1", "d2"] {
        let child = fleet
            .cmd(host, &["daemon", "--dir", empty.to_str().unwrap()], &limit)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        fleet.children.push(child);
    }
    const ITEMS: usize = 60;
    let bps = fleet.blueprints(1, ITEMS);
    let driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &limit,
        )
        .spawn()
        .unwrap();
    wait_for("the first calls", Duration::from_secs(120), || {
        fleet.calls_by_host().values().sum::<usize>() >= 5
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutter = keep_cutting(&fleet.db, Duration::from_millis(300), stop.clone());
    let (ok, out, err) = finish(driver, Duration::from_secs(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let killed = cutter.join().unwrap();
    assert!(killed > 0);
    assert!(
        ok,
        "a step failed while connections were cut:\n{out}\n{err}"
    );
    for c in &mut fleet.children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    // Every call the fake answered took one place, and no window gave more than 10.
    let mut h = fleet.history();
    let calls: usize = fleet.calls_by_host().values().sum();
    assert!(calls >= ITEMS, "{calls}");
    let (places, fullest): (i64, i32) = h
        .query_one(
            "SELECT COALESCE(sum(used), 0)::bigint, COALESCE(max(used), 0)
             FROM runner_rate_windows WHERE provider = 'openai'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        places, calls as i64,
        "calls made without a place, or places counted twice ({killed} backends killed)"
    );
    assert!(fullest <= 10, "a window gave {fullest} places");
    for host in ["d1", "d2", "driver"] {
        let skipped: Vec<String> = warnings(&fleet, host)
            .into_iter()
            .filter(|m| m.contains("rate limit"))
            .collect();
        assert!(skipped.is_empty(), "{host}: {skipped:?}");
    }
}

/// The writer's connection drops right after the server committed a batch, before the
/// writer heard so: the writer finds the batch committed (its number is recorded in the same
/// transaction) and says so once, at debug level, instead of applying it again and warning
/// that each of its writes was "already recorded".
#[test]
fn a_batch_whose_commit_reply_was_lost_is_not_applied_again() {
    let Some(db) = ScratchDb::new("commit_lost") else {
        return;
    };
    // The first transaction that records an attempt: the writer's batch.
    let proxy = common::pgcut::start(
        &common::pgcut::upstream(db.url()),
        "INSERT INTO runner_attempts",
    );
    let url = proxy.url_for(db.url());
    let dir = tempfile::tempdir().unwrap();
    let bp = json!({
        "name": "cut-commit",
        "variables": { "ITEMS": (0..40).map(|i| format!("i{i}")).collect::<Vec<_>>() },
        "nodes": [
            { "id": "each", "type": "transform", "forEach": "{{ vars.ITEMS }}",
              "template": "{{ item }}!" },
            { "id": "all", "type": "transform", "needs": ["each"],
              "template": "{{ nodes.each.output | join(',') }}" }
        ]
    });
    let path = dir.path().join("cut.json");
    std::fs::write(&path, bp.to_string()).unwrap();
    let logs = dir.path().join("logs");
    let run = common::bin::omniflow(
        dir.path(),
        &["run", path.to_str().unwrap(), "--sandbox", "--json"],
        [
            ("DATABASE_URL", url),
            ("LOG_DIR", logs.display().to_string()),
            ("RUST_LOG", "info,omniflow::store=debug".to_string()),
        ],
    )
    .spawn()
    .unwrap();
    let (ok, out, err) = finish(run, Duration::from_secs(120));
    assert!(ok, "{out}\n{err}");
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    let lines: Vec<Value> = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    let said = |level: &str, text: &str| -> usize {
        lines
            .iter()
            .filter(|v| v["level"] == level && v["message"].as_str().unwrap_or("").contains(text))
            .count()
    };
    let warned: Vec<&Value> = lines.iter().filter(|v| v["level"] == "WARN").collect();
    assert_eq!(
        said("WARN", "ignored"),
        0,
        "{} warnings, first: {:?}",
        warned.len(),
        warned.first()
    );
    assert_eq!(
        said("DEBUG", "committed before its connection dropped"),
        1,
        "{warned:?}"
    );
    // Everything is there, once.
    let mut h = db.target().connect().unwrap();
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_steps WHERE status = 'success'"
        ),
        41
    );
    assert_eq!(count(&mut h, "SELECT count(*) FROM runner_attempts"), 41);
    assert_eq!(
        count(
            &mut h,
            "SELECT count(*) FROM runner_executions WHERE status = 'success'"
        ),
        1
    );
}

/// Each process names its connections (`omniflow <command> <host>:<pid>`), and holds no more
/// than the history writer, the `LISTEN` connection and its shared pool (sized from
/// `CONCURRENCY`), idle or in the middle of a 200-item fan-out spread over three processes.
#[test]
fn each_process_holds_a_few_named_connections() {
    let Some(mut fleet) = Fleet::new("connections", Duration::from_millis(50)) else {
        return;
    };
    fleet.lease = "30";
    for host in ["d1", "d2"] {
        fleet.daemon(host, "40");
    }
    let pids: Vec<u32> = fleet.children.iter().map(Child::id).collect();
    let name = fleet.db.name().to_string();
    let per_name = |c: &mut postgres::Client| -> HashMap<String, i64> {
        c.query(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = $1
             AND pid <> pg_backend_pid() GROUP BY 1",
            &[&name],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    let mut h = fleet.history();
    wait_for("the daemons to start", Duration::from_secs(60), || {
        ["d1", "d2"]
            .iter()
            .all(|d| fleet.log(d).contains("daemon started"))
    });
    let idle = per_name(&mut h);
    let bps = fleet.blueprints(1, 200);
    let driver = fleet
        .cmd(
            "driver",
            &["run", bps.join("fan0.json").to_str().unwrap()],
            &[("CONCURRENCY", "40")],
        )
        .spawn()
        .unwrap();
    let driver_pid = driver.id();
    // The most connections each name held at once while the fan-out ran.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (target, stop, name) = (fleet.db.target().clone(), stop.clone(), name.clone());
        std::thread::spawn(move || {
            let mut c = target.connect().unwrap();
            let mut peak: HashMap<String, i64> = HashMap::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for r in c
                    .query(
                        "SELECT application_name, count(*) FROM pg_stat_activity
                         WHERE datname = $1 AND pid <> pg_backend_pid() GROUP BY 1",
                        &[&name],
                    )
                    .unwrap()
                {
                    let n: i64 = r.get(1);
                    let e = peak.entry(r.get(0)).or_insert(0);
                    *e = (*e).max(n);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let (ok, out, err) = finish(driver, Duration::from_secs(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert!(ok, "{out}\n{err}");
    let by_host = fleet.calls_by_host();
    assert!(
        ["d1", "d2", "driver"]
            .iter()
            .all(|d| by_host.get(*d).copied().unwrap_or(0) > 0),
        "every process ran steps: {by_host:?}"
    );
    // The writer, the LISTEN connection and the pool.
    let bound = i64::from(omniflow::store::pg::connect::pool_size(40)) + 2;
    let named = |pid: u32, command: &str| -> Vec<(String, i64)> {
        let suffix = format!(":{pid}");
        peak.iter()
            .filter(|(n, _)| n.starts_with(&format!("omniflow {command} ")) && n.ends_with(&suffix))
            .map(|(n, c)| (n.clone(), *c))
            .collect()
    };
    for (pid, command) in [
        (pids[0], "daemon"),
        (pids[1], "daemon"),
        (driver_pid, "run"),
    ] {
        let held = named(pid, command);
        assert_eq!(
            held.len(),
            1,
            "{command} {pid}'s connections by name: {peak:?}"
        );
        assert!(
            held[0].1 >= 2 && held[0].1 <= bound,
            "{command} {pid} held {} connections during the fan-out (at most {bound}): {peak:?}",
            held[0].1
        );
    }
    for (n, c) in &idle {
        assert!(*c <= bound, "{n} held {c} connections idle: {idle:?}");
    }
    eprintln!("connections: idle {idle:?}; peak during a 200-item fan-out {peak:?}");
}
