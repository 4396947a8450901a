//! The real binary in a real pseudo-terminal (tmux): open the console, sandbox-test a bundled
//! blueprint with failures, watch the workers fill and drain and the runs land in history,
//! retry a failed run by keys, quit, and check that the terminal was restored and the rows
//! are in SQLite. Every wait polls the screen with a timeout; nothing sleeps as an assertion.
//!
//! Needs tmux (CI's .ci/run installs it); without it this test fails and says so.

mod common;

use omniflow::events::{RunStatus, StepStatus};
use omniflow::store::{RunFilter, Store};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let out = self.cmd(&["send-keys", "-t", &self.session, k]);
            assert!(out.status.success(), "send-keys {k}: {out:?}");
            // Keys are separate writes, so a lone Esc is never read as Alt-<next key>.
            std::thread::sleep(Duration::from_millis(60));
        }
    }

    fn literal(&self, text: &str) {
        let out = self.cmd(&["send-keys", "-t", &self.session, "-l", text]);
        assert!(out.status.success());
        std::thread::sleep(Duration::from_millis(60));
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(
            &self
                .cmd(&["capture-pane", "-p", "-t", &self.session])
                .stdout,
        )
        .to_string()
    }

    /// Polls the screen until `pred` holds; fails with the last screen after `secs`.
    fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out after {secs}s waiting for {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_text(&self, text: &str, secs: u64) -> String {
        self.wait_for(&format!("{text:?}"), secs, |s| s.contains(text))
    }
}

impl Tmux {
    /// A detached `w`×`h` session on a private server named after `name`, running `shell`
    /// in `cwd`. Fails with what to install when tmux is missing.
    fn start(name: &str, cwd: &Path, w: u16, h: u16, shell: &str) -> Tmux {
        let have_tmux = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            have_tmux,
            "tmux is not installed: the console's end-to-end tests drive the real binary in \
             tmux. Install it (apt-get install tmux); CI's .ci/run does."
        );
        let t = Tmux {
            socket: format!("omniflow-e2e-{name}-{}", std::process::id()),
            session: "console".into(),
        };
        let out = t.cmd(&[
            "new-session",
            "-d",
            "-s",
            &t.session,
            "-x",
            &w.to_string(),
            "-y",
            &h.to_string(),
            "-c",
            &cwd.display().to_string(),
            shell,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        t
    }

    /// `"<alternate screen on> <cursor shown>"`, e.g. `"0 1"` for a restored terminal.
    fn screen_modes(&self) -> String {
        let out = self.cmd(&[
            "display",
            "-p",
            "-t",
            &self.session,
            "#{alternate_on} #{cursor_flag}",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The pid of the pane's own process (the shell, or the console when `exec`ed).
    fn pane_pid(&self) -> String {
        String::from_utf8_lossy(
            &self
                .cmd(&["display", "-p", "-t", &self.session, "#{pane_pid}"])
                .stdout,
        )
        .trim()
        .to_string()
    }

    /// The terminal goes away under the pane's process (a dropped SSH session: SIGHUP and a
    /// dead tty at once); waits until that process has exited and returns its pid.
    fn vanish(&self) -> String {
        let pid = self.pane_pid();
        let _ = self.cmd(&["kill-server"]);
        let proc_dir = Path::new("/proc").join(&pid);
        let deadline = Instant::now() + Duration::from_secs(30);
        while proc_dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !proc_dir.exists(),
            "the console exits when its terminal is gone"
        );
        pid
    }

    /// The pid of the program the pane's shell started (the console).
    fn program_pid(&self) -> String {
        let pid = child_of(&self.pane_pid());
        assert!(!pid.is_empty(), "the console's pid");
        pid
    }

    /// Sends `signal` (`TERM`, `HUP`) to the console.
    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([format!("-{signal}"), self.program_pid()])
            .status()
            .expect("kill");
        assert!(sent.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

fn history_rows(db: &Path) -> Vec<omniflow::store::RunRow> {
    let store = Store::open(db).expect("open the console's database");
    store
        .list_runs(&RunFilter {
            limit: 100,
            ..RunFilter::default()
        })
        .expect("list runs")
}

#[test]
fn the_console_runs_a_sandbox_test_retries_a_failure_and_restores_the_terminal() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let db = tmp.path().join("history.db");
    let logs = tmp.path().join("logs");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    // Model calls take 1 s (20 s × 0.05) so the workers pane can be seen busy.
    let shell = format!(
        "env DB_FILE='{}' LOG_DIR='{}' OMNIFLOW_TIME_SCALE=0.05 SANDBOX_LATENCY_MS=20000 \
         CONCURRENCY=8 TERM=xterm-256color '{bin}' tui --dir '{}'; echo CONSOLE-EXITED $?; sleep 60",
        db.display(),
        logs.display(),
        blueprints.display()
    );
    let t = Tmux::start("console", tmp.path(), 120, 40, &shell);

    t.wait_text("tech-digest", 30);
    t.wait_text("no runs yet", 10);

    // Select tech-digest through the filter, then sandbox-test it with its testConfig (30 %).
    t.keys(&["/"]);
    t.literal("tech");
    t.keys(&["Enter", "t"]);
    t.wait_text("Sandbox test: tech-digest", 10);
    t.keys(&["C-s"]);
    t.wait_for("busy workers", 20, |s| s.contains("▶ summarize["));
    t.wait_for("the workers to drain", 60, |s| {
        s.contains("0/8 busy") && s.contains("tech-digest") && !s.contains("▶ summarize[")
    });
    t.wait_for("the run in history", 30, |s| {
        s.contains("success") || s.contains("error")
    });

    // A run that fails for sure: 100 % simulated failures. (The first run, at 30 %, may have
    // failed too: the one to retry is the new one.)
    let before: Vec<String> = history_rows(&db).into_iter().map(|r| r.id).collect();
    t.keys(&["t"]);
    t.wait_text("Sandbox test: tech-digest", 10);
    t.keys(&["Tab", "BSpace", "BSpace", "BSpace"]);
    t.literal("100");
    t.keys(&["Enter"]);
    let new_failure = || {
        history_rows(&db)
            .into_iter()
            .find(|r| r.status == RunStatus::Error && !before.contains(&r.id))
    };
    t.wait_for("the 100 % run to fail", 60, |_| new_failure().is_some());
    let failed = new_failure().expect("a failed run");

    // Retry it from History once the pane shows it: the newest row is the failed one.
    let short = &failed.id[..10];
    // The History row itself (id, blueprint, status in that order), not a log line that
    // merely names the run next to "error=".
    t.wait_for("the failed run's row in History", 30, |s| {
        s.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(3)
                .any(|x| x[0].ends_with(short) && x[1] == "tech-digest" && x[2] == "error")
        })
    });
    t.keys(&["Tab", "Tab", "g"]);
    // History focused (heavy border) with the failed run selected, before `r`.
    t.wait_for("the failed run selected in History", 10, |s| {
        s.contains("┏ History")
            && s.lines()
                .any(|l| l.contains(&format!("▸{short}")) && l.contains("error"))
    });
    t.keys(&["r"]);
    t.wait_text("Retry run", 10);
    t.keys(&["w"]);
    t.wait_for("the retry in history", 60, |_| {
        history_rows(&db)
            .iter()
            .any(|r| r.parent_run_id.as_deref() == Some(failed.id.as_str()) && r.status.is_final())
    });

    // Quit (answering the question if a run is still in flight) and check the terminal.
    t.keys(&["q"]);
    let s = t.wait_for("exit or the quit question", 10, |s| {
        s.contains("CONSOLE-EXITED") || s.contains("Quit?")
    });
    if s.contains("Quit?") {
        t.keys(&["c"]);
    }
    let s = t.wait_text("CONSOLE-EXITED 0", 20);
    assert!(
        !s.contains("Blueprints"),
        "the console's screen is gone:\n{s}"
    );
    assert_eq!(
        t.screen_modes(),
        "0 1",
        "alternate screen left and cursor shown"
    );

    let rows = history_rows(&db);
    assert!(rows.len() >= 3, "{rows:#?}");
    let retry = rows
        .iter()
        .find(|r| r.parent_run_id.as_deref() == Some(failed.id.as_str()))
        .expect("the retry run is recorded");
    assert_eq!(retry.trigger, "retry");
    assert_eq!(retry.blueprint_name, "tech-digest");
    assert!(rows.iter().all(|r| r.status.is_final()), "{rows:#?}");
}

#[test]
fn sigterm_restores_the_terminal() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let shell = format!(
        "env DB_FILE='{}' LOG_DIR='{}' '{bin}' --dir '{}'; echo CONSOLE-EXITED $?; sleep 60",
        tmp.path().join("h.db").display(),
        tmp.path().join("logs").display(),
        tmp.path().join("no-such-dir").display(),
    );
    let t = Tmux::start("term", tmp.path(), 80, 24, &shell);
    // A missing blueprints directory is a message in its pane, not a crash.
    t.wait_text("cannot read", 30);
    t.signal("TERM");
    t.wait_text("CONSOLE-EXITED", 20);
    assert_eq!(t.screen_modes(), "0 1");
}

/// A panic while the console holds the terminal: the panic hook (the console's own, installed
/// by `Terminal::enter`) must hand back a cooked tty on the normal screen with the cursor shown,
/// and the panic message must stay readable there — not printed into the alternate screen, not
/// overwritten afterwards. The panicking program is `examples/console_panic.rs`, so the
/// binary itself has no way to be made to panic.
#[test]
fn a_panic_restores_the_terminal_and_leaves_the_message_readable() {
    // Examples are built next to the binary's directory by `cargo test` (all targets), not by
    // `cargo test --test console_e2e` alone.
    let example = Path::new(env!("CARGO_BIN_EXE_omniflow"))
        .parent()
        .expect("the binary's directory")
        .join("examples")
        .join(format!("console_panic{}", std::env::consts::EXE_SUFFIX));
    assert!(
        example.is_file(),
        "{} is missing: run `cargo test` (which builds the examples) or \
         `cargo build --example console_panic` first",
        example.display()
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    // A non-interactive shell does not reset the tty itself, so what it reports after the
    // example is what the panic left behind. No backtrace: the message must fit the screen.
    let shell = format!(
        "printf 'BEFORE-PANIC\\n'; env RUST_BACKTRACE=0 '{}'; echo EXITED $?; \
         if stty -a | grep -Eq '(^| )-(icanon|echo|isig|opost)( |;|$)'; \
         then echo TTY-RAW; else echo TTY-COOKED; fi; \
         printf 'TYPE: '; read -r line; echo \"READ <$line>\"; sleep 60",
        example.display()
    );
    let t = Tmux::start("panic", tmp.path(), 100, 30, &shell);

    // The console's frame, on the alternate screen.
    let s = t.wait_text("PANIC-EXAMPLE-DRAWN", 30);
    assert!(s.contains("Blueprints"), "a console frame:\n{s}");
    let alt = t.cmd(&["display", "-p", "-t", &t.session, "#{alternate_on}"]);
    assert_eq!(String::from_utf8_lossy(&alt.stdout).trim(), "1");

    // A panic on another thread (a step, a background task) is caught there: the console
    // keeps its screen, and the message does not land on it.
    t.keys(&["b"]);
    let s = t.wait_text("BACKGROUND-PANIC-SURVIVED", 20);
    assert!(
        s.contains("caught=true counted=1"),
        "the panic was caught and counted:\n{s}"
    );
    assert!(
        !s.contains("BACKGROUND-PANIC-TEXT") && s.contains("Blueprints"),
        "the console's frame is intact:\n{s}"
    );
    let alt = t.cmd(&["display", "-p", "-t", &t.session, "#{alternate_on}"]);
    assert_eq!(String::from_utf8_lossy(&alt.stdout).trim(), "1");

    // Any other key panics on the console's own thread.
    t.keys(&["x"]);
    let s = t.wait_text("TTY-", 20);
    assert_eq!(
        t.screen_modes(),
        "0 1",
        "alternate screen left and cursor shown; screen:\n{s}"
    );
    assert!(
        !s.contains("Blueprints"),
        "the console's frame is gone:\n{s}"
    );
    // In order on the normal screen, each line whole: nothing was printed into the alternate
    // screen or overwritten by what the shell printed next.
    let lines: Vec<&str> = s.lines().collect();
    let at = |what: &str, pred: &dyn Fn(&str) -> bool| {
        lines
            .iter()
            .position(|l| pred(l))
            .unwrap_or_else(|| panic!("no {what} on the screen:\n{s}"))
    };
    let before = at("line printed before", &|l| l.trim_end() == "BEFORE-PANIC");
    let where_ = at("panic location", &|l| {
        l.starts_with("thread 'main'") && l.contains("panicked at examples/console_panic.rs")
    });
    let message = at("panic message", &|l| {
        l.starts_with("console_panic: deliberate panic with the terminal held")
    });
    let exited = at("exit status", &|l| l.trim_end() == "EXITED 101");
    assert!(
        before < where_ && where_ < message && message < exited,
        "out of order:\n{s}"
    );
    assert!(
        s.lines().any(|l| l.trim_end() == "TTY-COOKED"),
        "the tty is still in raw mode after the panic:\n{s}"
    );

    // And the user sees what they type, and Enter ends the line: a cooked tty.
    t.literal("cooked");
    t.keys(&["Enter"]);
    let s = t.wait_text("READ <cooked>", 20);
    assert!(s.contains("TYPE: cooked"), "typed text is echoed:\n{s}");
}

/// How a session drops.
enum HangUp {
    /// SIGHUP with the terminal still there.
    Signal,
    /// The terminal itself goes away (tmux kill-server: SIGHUP and a dead pty at once), so
    /// every write to it fails.
    TerminalGone,
}

/// A dropped SSH session: the console hands its runs over (unfinished, no owner, for a
/// daemon or the next console) and records itself stopped, instead of dying on the spot or
/// cancelling work nobody asked to stop.
fn hang_up_hands_the_runs_over(how: HangUp) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let db = tmp.path().join("h.db");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    // Model calls take 60 s: the run is surely in flight when the hang-up comes. Steps in
    // flight get 1 s of grace, then are handed over. stderr stays on the terminal, as it
    // does over SSH.
    let console = format!(
        "env DB_FILE='{}' LOG_DIR='{}' SANDBOX_LATENCY_MS=60000 SHUTDOWN_GRACE=1 \
         TERM=xterm-256color '{bin}' tui --dir '{}'",
        db.display(),
        tmp.path().join("logs").display(),
        blueprints.display()
    );
    let (name, shell) = match how {
        HangUp::Signal => (
            "hup",
            format!("{console}; echo CONSOLE-EXITED $?; sleep 60"),
        ),
        // The console is the pane's process itself, as a login shell's child is over SSH.
        HangUp::TerminalGone => ("gone", format!("exec {console}")),
    };
    let t = Tmux::start(name, tmp.path(), 120, 40, &shell);
    t.wait_text("tech-digest", 30);
    t.keys(&["/"]);
    t.literal("tech");
    t.keys(&["Enter", "t"]);
    t.wait_text("Sandbox test: tech-digest", 10);
    t.keys(&["C-s"]);
    t.wait_for("busy workers", 20, |s| s.contains("▶ summarize["));
    match how {
        HangUp::Signal => {
            t.signal("HUP");
            let s = t.wait_text("CONSOLE-EXITED", 30);
            assert!(s.contains("CONSOLE-EXITED 0"), "a clean exit:\n{s}");
        }
        HangUp::TerminalGone => {
            t.vanish();
        }
    }

    let rows = history_rows(&db);
    let run = rows
        .iter()
        .find(|r| r.blueprint_name == "tech-digest")
        .expect("the run is recorded");
    assert!(
        !run.status.is_final(),
        "handed over unfinished, not cancelled: {run:#?}"
    );
    let c = rusqlite::Connection::open(&db).expect("open the database");
    let owner: Option<String> = c
        .query_row(
            "SELECT owner FROM runner_executions WHERE id = ?1",
            [&run.id],
            |r| r.get(0),
        )
        .expect("the run's owner");
    assert_eq!(owner, None, "released for adoption at once");
    let stopped: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM runner_processes WHERE role = 'console' AND stopped_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .expect("the console's process row");
    assert_eq!(stopped, 1, "the console recorded itself stopped");
}

#[test]
fn sighup_hands_the_runs_in_flight_over() {
    hang_up_hands_the_runs_over(HangUp::Signal);
}

#[test]
fn a_vanished_terminal_hands_the_runs_in_flight_over() {
    hang_up_hands_the_runs_over(HangUp::TerminalGone);
}

/// With nothing in flight the console's exit is short, and the last thing it does is what
/// broke: ratatui's drop reported a failure to show the cursor with `eprintln!`, which panics
/// on a dead terminal, so the console died before recording itself stopped.
#[test]
fn an_idle_console_whose_terminal_vanishes_records_itself_stopped() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let db = tmp.path().join("h.db");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    let shell = format!(
        "exec env DB_FILE='{}' LOG_DIR='{}' TERM=xterm-256color '{bin}' tui --dir '{}'",
        db.display(),
        tmp.path().join("logs").display(),
        blueprints.display()
    );
    let t = Tmux::start("idle", tmp.path(), 100, 30, &shell);
    t.wait_text("tech-digest", 30);
    let pid = t.vanish();
    let c = rusqlite::Connection::open(&db).expect("open the database");
    let stopped: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM runner_processes WHERE pid = ?1 AND stopped_at IS NOT NULL",
            [pid.parse::<i64>().expect("a pid")],
            |r| r.get(0),
        )
        .expect("the console's process row");
    assert_eq!(stopped, 1, "the console recorded itself stopped");
}

/// The pid of a child process of `parent` (from /proc: no pgrep needed).
fn child_of(parent: &str) -> String {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return String::new();
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(parent) {
            return name;
        }
    }
    String::new()
}

/// A blueprint due at once: every minute, running once for missed slots, with a claimed slot
/// ten minutes ago in `db`. It makes no network call (one transform step).
fn due_schedule(dir: &Path, db: &Path) {
    std::fs::create_dir_all(dir).expect("blueprints dir");
    std::fs::write(
        dir.join("every-minute.json"),
        r#"{"name": "every-minute", "active": true, "schedule": "* * * * *",
            "missedSlots": "runOnce",
            "nodes": [{"id": "t", "type": "transform", "template": "tick"}]}"#,
    )
    .expect("write the blueprint");
    let store = Store::open(db).expect("open the database");
    let ago = std::time::SystemTime::now() - Duration::from_secs(600);
    assert!(store.claim_slot("every-minute", ago).expect("claim a slot"));
}

/// Opening the console fires no schedule: schedules belong to the daemon, and to a console
/// only when it is started with `--schedules`. The header says which.
#[test]
fn a_console_fires_schedules_only_when_started_with_schedules() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let db = tmp.path().join("h.db");
    let dir = tmp.path().join("blueprints");
    due_schedule(&dir, &db);
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let console = |flag: &str| {
        format!(
            "env DB_FILE='{}' LOG_DIR='{}' TERM=xterm-256color '{bin}' tui --dir '{}' {flag}; \
             echo CONSOLE-EXITED $?; sleep 60",
            db.display(),
            tmp.path().join("logs").display(),
            dir.display()
        )
    };

    // Without the flag: the header says so, and the due slot does not fire.
    let t = Tmux::start("nosched", tmp.path(), 80, 24, &console(""));
    t.wait_text("every-minute", 30);
    let s = t.wait_text("schedules: off", 10);
    assert!(!s.contains("this console"), "{s}");
    // The same wait that sees the run start below, with `--schedules`.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        history_rows(&db).is_empty(),
        "a console without --schedules started a run"
    );
    t.keys(&["q"]);
    t.wait_text("CONSOLE-EXITED 0", 20);
    drop(t);

    // With it: the header says this console fires them, and the missed slot runs.
    let t = Tmux::start("sched", tmp.path(), 80, 24, &console("--schedules"));
    t.wait_text("schedules: this console", 30);
    let deadline = Instant::now() + Duration::from_secs(30);
    while history_rows(&db).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rows = history_rows(&db);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0].trigger, "schedule");
    t.keys(&["q"]);
    let s = t.wait_for("exit or the quit question", 20, |s| {
        s.contains("CONSOLE-EXITED") || s.contains("Quit?")
    });
    if s.contains("Quit?") {
        t.keys(&["w"]);
    }
    t.wait_text("CONSOLE-EXITED 0", 20);
}

/// `q` then `h`: the steps in flight get the grace period the words promise (they finish and
/// are recorded), the rest is handed over unfinished, and the next console takes the run over
/// and finishes it without a single warning about writes it refused.
#[test]
fn hand_over_lets_steps_in_flight_finish_and_the_next_console_takes_over_cleanly() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let db = tmp.path().join("h.db");
    let logs = tmp.path().join("logs");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    // Model calls take 2 s; 8 at once; 30 s of grace.
    let shell = format!(
        "env DB_FILE='{}' LOG_DIR='{}' SANDBOX_LATENCY_MS=2000 CONCURRENCY=8 SHUTDOWN_GRACE=30 \
         TERM=xterm-256color '{bin}' tui --dir '{}'; echo CONSOLE-EXITED $?; sleep 60",
        db.display(),
        logs.display(),
        blueprints.display()
    );
    let t = Tmux::start("handover", tmp.path(), 120, 40, &shell);
    t.wait_text("tech-digest", 30);
    t.keys(&["/"]);
    t.literal("tech");
    t.keys(&["Enter", "t"]);
    t.wait_text("Sandbox test: tech-digest", 10);
    // All 40 topics (the test variables cleared), no injected failures.
    t.keys(&["C-k", "Tab", "C-k"]);
    t.literal("0");
    t.keys(&["C-s"]);
    let s = t.wait_for("busy workers", 20, |s| s.contains("▶ summarize["));
    let in_flight: Vec<String> = s
        .lines()
        .filter_map(|l| l.split("▶ ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(!in_flight.is_empty(), "{s}");
    t.keys(&["q"]);
    let s = t.wait_text("Quit?", 10);
    assert!(s.contains("h hand over"), "{s}");
    // Enter is no answer: the question stays and nothing is cancelled.
    t.keys(&["Enter"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        t.screen().contains("Quit?"),
        "Enter answered the quit question"
    );
    t.keys(&["h"]);
    let s = t.wait_text("CONSOLE-EXITED", 60);
    assert!(s.contains("steps in flight get up to 30s"), "{s}");
    assert!(s.contains("CONSOLE-EXITED 0"), "{s}");

    let run = history_rows(&db)
        .into_iter()
        .find(|r| r.blueprint_name == "tech-digest")
        .expect("the run");
    assert!(!run.status.is_final(), "handed over unfinished: {run:#?}");
    let c = rusqlite::Connection::open(&db).expect("open the database");
    for step in &in_flight {
        let status: String = c
            .query_row(
                "SELECT status FROM runner_steps WHERE run_id = ?1 AND step_key = ?2",
                [&run.id, step],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("{step}: {e}"));
        assert_eq!(
            status, "success",
            "{step} was in flight at the hand-over and had the grace period to finish"
        );
    }
    drop(c);
    drop(t);

    // The next console adopts the run and finishes it, and refuses no write on the way.
    let t = Tmux::start("takeover", tmp.path(), 120, 40, &shell);
    t.wait_text("tech-digest", 30);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let done = history_rows(&db)
            .iter()
            .any(|r| r.id == run.id && r.status.is_final());
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = history_rows(&db)
        .into_iter()
        .find(|r| r.id == run.id)
        .expect("the run");
    assert_eq!(run.status, RunStatus::Success, "{run:#?}");
    t.keys(&["q"]);
    t.wait_text("CONSOLE-EXITED 0", 20);
    let mut text = String::new();
    for e in std::fs::read_dir(&logs).expect("log dir").flatten() {
        text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("store: ignored"))
        .collect();
    assert!(
        refused.is_empty(),
        "refused writes:\n{}",
        refused.join("\n")
    );
    assert!(
        text.contains("resumed a run whose process had stopped"),
        "the second console took the run over"
    );
}

/// A console left open adopts, by itself, a run whose `omniflow run` was SIGKILLed mid-run on
/// the same database, and finishes it: the screen shows the run done, the history has every
/// step once, and the model server answered each step once (the call in flight at the kill
/// may have been answered to the dead process too, and is asked again).
#[test]
fn a_live_console_adopts_a_killed_run_by_itself_and_finishes_it() {
    const ANSWER: &str = r#"{"choices":[{"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    const ITEMS: usize = 8;
    let tmp = tempfile::tempdir().expect("temp dir");
    let db = tmp.path().join("h.db");
    let logs = tmp.path().join("logs");
    let bps = tmp.path().join("bps");
    std::fs::create_dir_all(&bps).unwrap();
    let topics: Vec<String> = (0..ITEMS).map(|i| format!("t{i}")).collect();
    let bp = serde_json::json!({
        "name": "orphan",
        "variables": { "T": topics },
        "nodes": [{ "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                    "forEach": "{{ vars.T }}", "prompt": "say {{ item }}" }]
    });
    let file = bps.join("orphan.json");
    std::fs::write(&file, bp.to_string()).unwrap();
    // Every answer takes 300 ms: the kill lands mid-fan-out.
    let fake = common::counting::start(Duration::from_millis(300), ANSWER.to_string());
    let settings = [
        ("DB_FILE", db.display().to_string()),
        ("LOG_DIR", logs.display().to_string()),
        ("OPENAI_BASE_URL", format!("{}/v1", fake.url)),
        ("OPENAI_CONCURRENCY", "0".into()),
        ("CACHE_TTL", "0".into()),
        ("MAX_RETRIES", "0".into()),
        ("CONCURRENCY", "1".into()),
    ];
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let env: String = settings
        .iter()
        .map(|(k, v)| format!("{k}='{v}' "))
        .collect();
    let shell = format!(
        "env {env}TERM=xterm-256color '{bin}' tui --dir '{}'; echo CONSOLE-EXITED $?; sleep 60",
        bps.display()
    );
    let t = Tmux::start("adopt", tmp.path(), 120, 40, &shell);
    t.wait_text("no runs yet", 30);

    let mut run = common::bin::omniflow(tmp.path(), &["run", file.to_str().unwrap()], settings)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start omniflow run");
    let store = Store::open(&db).expect("open the database");
    let done = |store: &Store| -> Vec<(String, Option<std::time::SystemTime>)> {
        let Some(r) = history_rows(&db).into_iter().next() else {
            return Vec::new();
        };
        store
            .run_steps(&r.id)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.status == StepStatus::Success)
            .map(|s| (s.step_key, s.started_at))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while done(&store).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "two steps of the run never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run.kill().expect("SIGKILL the run");
    run.wait().expect("reap the run");
    let before = done(&store);
    assert!(before.len() < ITEMS, "the run was killed before its end");
    let id = history_rows(&db)[0].id.clone();
    assert!(
        !history_rows(&db)[0].status.is_final(),
        "the killed run is left unfinished"
    );

    // Nobody types anything: the console notices the dead process and finishes its run.
    let short = id[..10].to_string();
    let s = t.wait_for("the adopted run done in History", 60, |s| {
        s.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(3)
                .any(|x| x[0].ends_with(&short) && x[1] == "orphan" && x[2] == "success")
        })
    });
    let r = history_rows(&db).into_iter().find(|r| r.id == id).unwrap();
    assert_eq!(r.status, RunStatus::Success, "{r:#?}\n{s}");
    let steps = store.run_steps(&id).unwrap();
    assert_eq!(steps.len(), ITEMS, "{steps:#?}");
    for s in &steps {
        assert_eq!(s.status, StepStatus::Success, "{s:#?}");
    }
    for (key, started) in &before {
        let s = steps.iter().find(|s| &s.step_key == key).unwrap();
        assert_eq!(&s.started_at, started, "{key} ran again after the adoption");
        assert_eq!(s.attempts, 1, "{key}");
    }
    // At the model server: every step answered, the ones done before the kill once, and at
    // most one (the call in flight at the kill) twice.
    let prompts = fake.prompts.lock().unwrap().clone();
    let answered = |i: usize| -> usize {
        prompts
            .iter()
            .filter(|((_, p), _)| p == &format!("say t{i}"))
            .map(|(_, n)| n)
            .sum()
    };
    let counts: Vec<usize> = (0..ITEMS).map(answered).collect();
    assert!(counts.iter().all(|&n| n >= 1), "{counts:?}");
    assert!(counts.iter().sum::<usize>() <= ITEMS + 1, "{counts:?}");
    for (key, _) in &before {
        let s = steps.iter().find(|s| &s.step_key == key).unwrap();
        let i = s.item_index.expect("a fan-out step") as usize;
        assert_eq!(counts[i], 1, "{key} was answered again: {counts:?}");
    }

    t.keys(&["q"]);
    t.wait_text("CONSOLE-EXITED 0", 20);
    let mut text = String::new();
    for e in std::fs::read_dir(&logs).expect("log dir").flatten() {
        text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    assert!(
        text.contains("resumed a run whose process had stopped"),
        "the console says it took the run over"
    );
}

/// `--theme` picks the console's theme, with or without the `tui` word; an unknown name says
/// so on the status line and the console goes on in the dark theme.
#[test]
fn the_theme_flag_picks_the_theme_and_an_unknown_one_is_named() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    let console = |name: &str, args: &str| {
        let shell = format!(
            "env DB_FILE='{}' LOG_DIR='{}' TERM=xterm-256color '{bin}' {args} --dir '{}'; \
             echo CONSOLE-EXITED $?; sleep 60",
            tmp.path().join("h.db").display(),
            tmp.path().join("logs").display(),
            blueprints.display()
        );
        Tmux::start(name, tmp.path(), 160, 48, &shell)
    };
    for (name, args, theme) in [
        ("theme-light", "--theme light", "theme light"),
        (
            "theme-hc",
            "tui --theme high-contrast",
            "theme high-contrast",
        ),
    ] {
        let t = console(name, args);
        t.wait_text("tech-digest", 30);
        t.wait_text(theme, 10);
        t.keys(&["q"]);
        t.wait_text("CONSOLE-EXITED 0", 20);
    }
    let t = console("theme-unknown", "tui --theme nosuch");
    let s = t.wait_text("no theme \"nosuch\"", 30);
    assert!(s.contains("using dark"), "{s}");
    t.wait_text("theme dark", 10);
    t.keys(&["q"]);
    t.wait_text("CONSOLE-EXITED 0", 20);
}

/// The terminal grows while the console runs (80×24 → 160×48), then `q`: the shell's screen
/// comes back clean, with nothing of the console's borders above the prompt.
#[test]
fn quitting_after_the_terminal_grew_leaves_no_borders_behind() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    let shell = format!(
        "printf 'BEFORE-CONSOLE\\n'; env DB_FILE='{}' LOG_DIR='{}' TERM=xterm-256color '{bin}' tui --dir '{}'; \
         echo CONSOLE-EXITED $?; sleep 60",
        tmp.path().join("h.db").display(),
        tmp.path().join("logs").display(),
        blueprints.display()
    );
    let t = Tmux::start("resize", tmp.path(), 80, 24, &shell);
    t.wait_text("tech-digest", 30);
    let out = t.cmd(&["resize-window", "-t", &t.session, "-x", "160", "-y", "48"]);
    assert!(out.status.success(), "{out:?}");
    // The console redraws at the new size (the wide layout's theme part appears).
    t.wait_text("theme dark", 10);
    t.keys(&["q"]);
    let s = t.wait_text("CONSOLE-EXITED 0", 20);
    let first = s.lines().next().unwrap_or_default();
    assert_eq!(first.trim_end(), "BEFORE-CONSOLE", "the screen:\n{s}");
    assert!(
        !s.contains('┃') && !s.contains('│') && !s.contains("Blueprints"),
        "borders left behind:\n{s}"
    );
    assert_eq!(t.screen_modes(), "0 1");
}

/// A database that cannot be opened sends the session to a temporary one, which the console
/// removes on its way out when no run was recorded in it.
#[test]
fn an_unused_temporary_database_is_removed_on_quit() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    // A database path under a file: it cannot be created.
    std::fs::write(tmp.path().join("a-file"), "x").unwrap();
    let shell = format!(
        "env DB_FILE='{}' LOG_DIR='{}' TERM=xterm-256color '{bin}' tui --dir '{}'; \
         echo CONSOLE-EXITED $?; sleep 60",
        tmp.path().join("a-file").join("h.db").display(),
        tmp.path().join("logs").display(),
        blueprints.display()
    );
    let t = Tmux::start("fallback", tmp.path(), 160, 48, &shell);
    let s = t.wait_text("temporary database", 30);
    let pid = t.program_pid();
    let db = std::env::temp_dir().join(format!("omniflow-console-{pid}.db"));
    assert!(db.exists(), "the console runs on {}:\n{s}", db.display());
    t.keys(&["q"]);
    t.wait_text("CONSOLE-EXITED 0", 20);
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", db.display());
        assert!(!Path::new(&p).exists(), "{p} is left behind");
    }
}

/// Ctrl-C leaves at once and says so in the exit status: 3, interrupted (not 0).
#[test]
fn ctrl_c_exits_with_the_interrupted_status() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    let shell = format!(
        "env DB_FILE='{}' LOG_DIR='{}' TERM=xterm-256color '{bin}' tui --dir '{}'; \
         echo CONSOLE-EXITED $?; sleep 60",
        tmp.path().join("h.db").display(),
        tmp.path().join("logs").display(),
        blueprints.display()
    );
    let t = Tmux::start("ctrlc", tmp.path(), 80, 24, &shell);
    t.wait_text("tech-digest", 30);
    t.keys(&["C-c"]);
    t.wait_text("CONSOLE-EXITED 3", 20);
    assert_eq!(t.screen_modes(), "0 1");
}

/// The disk under `LOG_DIR` fills while the console is open: the console says so on its
/// status line (log lines are being lost, and the log pane cannot show what was never
/// written), at 80×24, and keeps running.
#[test]
fn the_console_says_when_its_logs_stop_being_written() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let logs = tmp.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&logs)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        // SAFETY: geteuid has no preconditions.
        assert_ne!(
            unsafe { libc::geteuid() },
            0,
            "root must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(logs.clone());
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    let shell = format!(
        "env DB_FILE='{}' LOG_DIR='{}' OMNIFLOW_TIME_SCALE=0.05 TERM=xterm-256color '{bin}' \
         tui --dir '{}'; echo CONSOLE-EXITED $?; sleep 60",
        tmp.path().join("history.db").display(),
        logs.display(),
        blueprints.display()
    );
    let t = Tmux::start("logsfull", tmp.path(), 80, 24, &shell);
    t.wait_text("tech-digest", 30);
    // Fill the disk to the last byte, then give the console something to log.
    let _ = std::fs::write(logs.join("filler"), vec![0u8; 2 << 20]);
    // (The last page of the log file is already allocated: a run's lines may still fit, so
    // runs are started until lines are lost, at most five.)
    t.keys(&["/"]);
    t.literal("tech");
    t.keys(&["Enter"]);
    let mut told = None;
    for n in 1..=5 {
        t.keys(&["t"]);
        t.wait_text("Sandbox test: tech-digest", 10);
        t.keys(&["C-s"]);
        let s = t.wait_for("the run to end or the loss to show", 60, |s| {
            s.contains("could not write logs") || s.contains(&format!("1–{n} of {n}"))
        });
        if s.contains("could not write logs") {
            told = Some(s);
            break;
        }
    }
    // A sandbox run may fail after the loss was told: its failure takes the status line
    // for 12 s, and then the loss, kept until dismissed, is back.
    let s = told.unwrap_or_else(|| t.wait_text("could not write logs", 30));
    assert!(!s.contains("CONSOLE-EXITED"), "{s}");
    t.keys(&["q"]);
}

/// A fake OpenAI-compatible reply.
const ANSWER: &str = r#"{"choices":[{"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

/// A console on a shared PostgreSQL database, and another `omniflow` process on it (`run`,
/// as on another host: its steps are tagged so the console's own pool takes none). The
/// console shows that process's steps as they run (Workers, by host), the run in History,
/// its steps in the run detail, and cancels another run of that process (`c`), which ends
/// `cancelled` in the database. Skips (saying so) without a PostgreSQL server.
#[test]
fn a_console_on_postgres_shows_another_process_s_steps_live_and_cancels_its_run() {
    let Some(db) = omniflow::store::pg::testing::ScratchDb::new("console_fleet") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let fake = common::counting::start(Duration::from_millis(1500), ANSWER.to_string());
    let bps = tmp.path().join("bps");
    std::fs::create_dir_all(&bps).unwrap();
    for (name, items) in [("far-fan", 4), ("long-fan", 60)] {
        let list: Vec<String> = (0..items).map(|i| format!("{name}{i}")).collect();
        let bp = serde_json::json!({
            "name": name,
            "tags": ["far"],
            "variables": { "ITEMS": list },
            "nodes": [{
                "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                "forEach": "{{ vars.ITEMS }}", "prompt": "say {{ item }}"
            }]
        });
        std::fs::write(bps.join(format!("{name}.json")), bp.to_string()).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let shell = format!(
        "env DATABASE_URL='{}' LOG_DIR='{}' DB_FILE='{}' OPENAI_BASE_URL='{}/console/v1' \
         LEASE_TIMEOUT=2 CONCURRENCY=4 TERM=xterm-256color '{bin}' tui --dir '{}'; \
         echo CONSOLE-EXITED $?; sleep 60",
        db.url(),
        tmp.path().join("logs-console").display(),
        tmp.path().join("console.db").display(),
        fake.url,
        bps.display()
    );
    let t = Tmux::start("fleet", tmp.path(), 160, 48, &shell);
    t.wait_text("far-fan", 30);
    t.wait_text("queued in the fleet", 30);

    // The other process: it drives the run and takes its tagged steps, two at a time.
    let remote = |file: &str| {
        common::bin::omniflow(
            tmp.path(),
            &["run", bps.join(file).to_str().unwrap()],
            [
                ("DATABASE_URL", db.url().to_string()),
                ("OMNIFLOW_TAGS", "far".into()),
                ("CONCURRENCY", "2".into()),
                ("OPENAI_BASE_URL", format!("{}/remote/v1", fake.url)),
                ("OPENAI_CONCURRENCY", "0".into()),
                ("CACHE_TTL", "0".into()),
                ("MAX_RETRIES", "0".into()),
                ("LEASE_TIMEOUT", "2".into()),
                (
                    "LOG_DIR",
                    tmp.path().join("logs-remote").display().to_string(),
                ),
            ],
        )
        .spawn()
        .expect("start the other process")
    };
    let mut first = remote("far-fan.json");
    let pid = first.id().to_string();
    // Its steps, live, under its host in Workers: `p<pid> ▶ ask[…]`.
    t.wait_for("the other process's steps in Workers", 60, |s| {
        s.lines()
            .any(|l| l.contains(&format!("p{pid}")) && l.contains("▶ ask["))
    });
    t.wait_for("the other process in its host's line", 10, |s| {
        s.contains(&format!("run {pid} "))
    });
    let mut pg = db.target().connect().expect("connect");
    let run_of = |pg: &mut postgres::Client, name: &str| -> Option<(String, String)> {
        pg.query_opt(
            "SELECT id, status FROM runner_executions WHERE blueprint_name = $1",
            &[&name],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
    };
    let (far, _) = run_of(&mut pg, "far-fan").expect("the run is recorded");
    let short = far[..10].to_string();
    let row = |s: &str, status: &str| {
        s.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(3)
                .any(|x| x[0].ends_with(&short) && x[1] == "far-fan" && x[2] == status)
        })
    };
    t.wait_for("the run in History, running", 30, |s| row(s, "running"));
    let status = first.wait().expect("the other process ends");
    assert!(status.success(), "{status:?}");
    t.wait_for("the run in History, done", 30, |s| row(s, "success"));
    // The console names its connections and holds its writer's, one listening (for the
    // fleet's wake-ups and the announcements it shows alike) and its pool's.
    let held: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name LIKE 'omniflow tui %'",
            &[&db.name()],
        )
        .unwrap()
        .get(0);
    let bound = i64::from(omniflow::store::pg::connect::pool_size(4)) + 2;
    assert!(
        (2..=bound).contains(&held),
        "the console holds {held} connections (at most {bound})"
    );
    // Its steps, from the database, in the run's detail.
    t.keys(&["Tab", "Tab", "g"]);
    t.wait_for("the run selected", 10, |s| {
        s.lines().any(|l| l.contains(&format!("▸{short}")))
    });
    t.keys(&["Enter"]);
    t.wait_for("the remote steps in the detail", 20, |s| {
        (0..4).all(|i| s.contains(&format!("ask[{i}]")))
    });
    t.keys(&["Escape"]);

    // Another run of that process, cancelled from this console.
    let mut second = remote("long-fan.json");
    let long = loop {
        if let Some((id, _)) = run_of(&mut pg, "long-fan") {
            break id;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let long_short = long[..10].to_string();
    t.wait_for("the long run in History", 30, |s| {
        s.lines()
            .any(|l| l.contains(&long_short) && l.contains("long-fan") && l.contains("running"))
    });
    t.keys(&["g"]);
    t.wait_for("the long run selected", 10, |s| {
        s.lines().any(|l| l.contains(&format!("▸{long_short}")))
    });
    t.keys(&["c"]);
    t.wait_text("Another process drives it", 10);
    t.keys(&["y"]);
    t.wait_text("for cancel of run", 20);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = run_of(&mut pg, "long-fan").unwrap();
        if status == "cancelled" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run is still {status}; screen:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = second.wait().expect("the other process ends");
    assert!(!done.success(), "a cancelled run does not exit 0: {done:?}");
    t.wait_for("the cancelled run in History", 30, |s| {
        s.lines()
            .any(|l| l.contains(&long_short) && l.contains("cancelled"))
    });
    t.keys(&["q"]);
    t.wait_text("CONSOLE-EXITED 0", 20);
}

/// One plain HTTP/1.1 GET on its own connection, as a scraper or a probe sends it: (status,
/// body). `None` when nothing answers.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: omniflow\r\nConnection: close\r\n\r\n");
    common::http::exchange(addr, req.as_bytes(), Duration::from_secs(20))
}

/// The sum of `metric`'s samples carrying every label of `want`.
fn metric_sum(s: &prometheus_parse::Scrape, metric: &str, want: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value::*;
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            Counter(v) | Gauge(v) | Untyped(v) => v,
            Histogram(_) | Summary(_) => 0.0,
        })
        .sum()
}

/// `omniflow tui --listen`: while the console runs a sandbox test, a scraper reads the same
/// pool the console shows (busy and total workers, queue depth, labelled `role="console"`),
/// `/healthz` says the process is alive; quitting with the key restores the terminal and
/// releases the port.
#[test]
fn the_console_serves_metrics_and_health_that_agree_with_its_screen() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_omniflow");
    let blueprints = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    // A free port, given back for the console to take.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    // Two workers and model calls of two minutes: the sandbox test's three items hold both
    // workers and leave one queued for as long as the test looks.
    let shell = format!(
        "env DB_FILE='{}' LOG_DIR='{}' SANDBOX_LATENCY_MS=120000 CONCURRENCY=2 \
         TERM=xterm-256color '{bin}' tui --dir '{}' --listen {addr}; \
         echo CONSOLE-EXITED $?; sleep 60",
        tmp.path().join("h.db").display(),
        tmp.path().join("logs").display(),
        blueprints.display()
    );
    let t = Tmux::start("listen", tmp.path(), 140, 40, &shell);
    t.wait_text("tech-digest", 30);

    // Before any run: alive, and an idle pool of two.
    let (status, body) = http_get(addr, "/healthz").expect("the console listens");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["status"],
        "ok",
        "{body}"
    );

    // Sandbox-test tech-digest (three topics) without injected failures.
    t.keys(&["/"]);
    t.literal("tech");
    t.keys(&["Enter", "t"]);
    t.wait_text("Sandbox test: tech-digest", 10);
    t.keys(&["Tab", "BSpace", "BSpace", "BSpace"]);
    t.literal("0");
    t.keys(&["Enter"]);
    let screen = t.wait_for("both workers busy and one step queued", 30, |s| {
        s.contains("2/2 busy") && s.contains("· 1 queued")
    });

    let (status, body) = http_get(addr, "/metrics").expect("an answer to /metrics");
    assert_eq!(status, 200, "{body}");
    let m = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    let console = [("role", "console")];
    let busy = metric_sum(&m, "omniflow_workers", &[("state", "busy"), console[0]]);
    let total = metric_sum(&m, "omniflow_workers", &[("state", "total"), console[0]]);
    let idle = metric_sum(&m, "omniflow_workers", &[("state", "idle"), console[0]]);
    let queued = metric_sum(&m, "omniflow_queue_depth", &console);
    assert_eq!(
        (busy, total, idle, queued),
        (2.0, 2.0, 0.0, 1.0),
        "the scrape says {busy}/{total} busy, {idle} idle, {queued} queued; the console \
         showed:\n{screen}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "omniflow_runs_started_total",
            &[("blueprint", "tech-digest")]
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        metric_sum(&m, "omniflow_pool_state", &[("state", "running")]),
        1.0
    );
    let (status, _) = http_get(addr, "/healthz").expect("an answer to /healthz");
    assert_eq!(status, 200);

    // Quit with the key, cancelling the run in flight.
    t.keys(&["q"]);
    t.wait_text("Quit?", 10);
    t.keys(&["c"]);
    let s = t.wait_text("CONSOLE-EXITED 0", 30);
    assert!(
        !s.contains("Blueprints"),
        "the console's screen is gone:\n{s}"
    );
    assert_eq!(
        t.screen_modes(),
        "0 1",
        "alternate screen left and cursor shown"
    );
    // The port is released: nothing answers there, and it can be bound again.
    assert!(
        http_get(addr, "/healthz").is_none(),
        "still answering on {addr}"
    );
    std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} is still held: {e}"));
}
