//! One module per command, each a function returning its exit code or a [`Failure`]; here
//! what several commands share: configuration, the store, the runtime, blueprints, signals,
//! exit codes and how a run's end is reported.

mod database;
mod doctor;
mod export;
mod history;
mod resume;
mod run;
mod tui;
mod validate;

pub use database::{backup, migrate, schema};
pub use doctor::doctor;
pub use export::export;
pub use history::{runs, show};
pub use resume::resume;
pub use run::run;
pub use tui::tui;
pub use validate::validate;

use super::progress::Progress;
use super::{
    BackupArgs, DoctorArgs, ExportArgs, Failure, ResumeArgs, RunArgs, RunsArgs, ShowArgs, Source,
    TuiArgs, ValidateArgs,
};
use crate::blueprint::{self, Blueprint, Priority};
use crate::config::Config;
use crate::engine::{parse_var_arg, Engine, RunOutcome, RunRequest};
use crate::events::{EventBus, RunStatus};
use crate::logging;
use crate::store::{RunFilter, Store};
use serde_json::{json, Map, Value};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

pub(super) fn load_config() -> Result<Config, Failure> {
    Config::load().map_err(|e| Failure::input(format!("{e} (check your environment or .env)")))
}

/// Opens the history every command shares: PostgreSQL when `DATABASE_URL` is set, else the
/// SQLite file at `DB_FILE`. A bad or unreachable database is bad input (exit 2) with its fix.
pub(super) fn open_store(config: &Config) -> Result<Store, Failure> {
    let at = config.database().map_err(Failure::input)?;
    Store::open_at(&at).map_err(|e| Failure::input(e.to_string()))
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot start the async runtime: {e}"),
        })
}

/// A blueprint by file or name, refused before parsing when larger than `MAX_BLUEPRINT_BYTES`.
fn load_blueprint(name: &str, dir: &Path, config: &Config) -> Result<Blueprint, Failure> {
    let max = config.limits.max_blueprint_bytes;
    let path = blueprint::resolve(name, dir, max).map_err(|e| Failure::input(e.to_string()))?;
    blueprint::load_file(&path, max).map_err(|e| Failure::input(e.to_string()))
}

/// Prints "disk full: free space at PATH" when the history database's disk fills up during
/// a run (the pool then holds new work), and again when there is room.
fn watch_disk(store: crate::store::Store) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut was = None;
        loop {
            let now = store.disk_full();
            if now != was {
                match &now {
                    Some(dir) => say(&format!(
                        "disk full: free space at {} — the run waits (no new steps, no messages) until its history can be saved",
                        dir.display()
                    )),
                    None => say("the disk has room again: the run continues"),
                }
                was = now;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    })
}

/// A run is reported as it is saved: waits for room on a full disk (until a signal), then
/// compares each outcome with the history. A run whose end is not saved is reported as
/// unfinished, for `omniflow resume` (exit 3), never as a success.
async fn settle(
    store: &crate::store::Store,
    outcomes: &mut [RunOutcome],
    interrupted: &std::sync::atomic::AtomicBool,
) {
    store.flush().await;
    if let Some(dir) = store.disk_full() {
        say(&format!(
            "disk full: free space at {}: the history of this run is not saved yet; waiting for room (SIGTERM leaves it for `omniflow resume`)",
            dir.display()
        ));
        tokio::select! {
            _ = store.flush_durable() => {}
            _ = async {
                while !interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            } => {}
        }
    }
    for o in outcomes.iter_mut() {
        if matches!(o.status, RunStatus::Queued | RunStatus::Running) {
            continue;
        }
        let (s, id) = (store.clone(), o.run_id.clone());
        let saved = tokio::task::spawn_blocking(move || s.find_run(&id))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|row| row.status);
        if saved != Some(o.status) {
            let why = match store.disk_full() {
                Some(dir) => format!("disk full: free space at {}", dir.display()),
                None => store
                    .take_write_error()
                    .unwrap_or_else(|| "the history database did not record it".into()),
            };
            o.error = Some(format!(
                "the run ended {} but its history is not saved ({why}); `omniflow resume {}` finishes it once the database can be written",
                o.status.as_str(),
                o.run_id
            ));
            o.status = saved.unwrap_or(RunStatus::Running);
        }
    }
}

/// Exit code 3: the run was interrupted or handed over (DESIGN.md's contract).
pub(super) const EXIT_INTERRUPTED: u8 = 3;

/// The exit code of `run` and `resume`: 3 when a signal interrupted them or a run was handed
/// over unfinished (scripts and systemd must tell "done" from "resume later"), else 1 when a
/// run failed, else 0.
fn exit_code(outcomes: &[RunOutcome], interrupted: bool) -> ExitCode {
    let handed_over = outcomes
        .iter()
        .any(|o| matches!(o.status, RunStatus::Running | RunStatus::Queued));
    if interrupted || handed_over {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if outcomes.iter().any(|o| o.status != RunStatus::Success) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// SIGINT, SIGTERM and SIGHUP, listened for from the start of a command: a signal that
/// comes while runs are being set up waits for [`watch_signals`] instead of killing the
/// process with the default action.
pub(super) struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Call on the runtime.
    pub(super) fn listen() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}");
                None
            }
        };
        Signals {
            int: listen(SignalKind::interrupt(), "SIGINT"),
            term: listen(SignalKind::terminate(), "SIGTERM"),
            hup: listen(SignalKind::hangup(), "SIGHUP"),
        }
    }
}

/// Ctrl-C (SIGINT) cancels the runs (recorded `cancelled`); SIGTERM (systemd, Docker,
/// `kill`) and SIGHUP (a dropped SSH session) are a graceful shutdown: steps in flight get
/// `SHUTDOWN_GRACE` to finish, the rest is handed over for `omniflow resume`. A second signal
/// of any kind exits at once. Either way the command exits 3; the returned flag says a signal
/// came.
fn watch_signals(
    engine: Engine,
    tokens: Vec<tokio_util::sync::CancellationToken>,
    signals: Signals,
) -> Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = Arc::new(AtomicBool::new(false));
    let interrupted = flag.clone();
    let Signals {
        mut int,
        mut term,
        mut hup,
    } = signals;
    tokio::spawn(async move {
        tokio::select! {
            _ = next_signal(&mut int) => {
                interrupted.store(true, Ordering::SeqCst);
                say("\ncancelling… (press Ctrl-C again to quit at once)");
                for t in &tokens {
                    t.cancel();
                }
            }
            name = async {
                tokio::select! {
                    _ = next_signal(&mut term) => "SIGTERM",
                    _ = next_signal(&mut hup) => "SIGHUP",
                }
            } => {
                interrupted.store(true, Ordering::SeqCst);
                let grace = engine.config().shutdown_grace;
                say(&format!("\n{name}: finishing steps in flight (up to {}s), then handing the rest over; send it again to quit at once", grace.as_secs()));
                tokio::spawn(async move { engine.shutdown(grace).await });
            }
        }
        tokio::select! {
            _ = next_signal(&mut int) => {}
            _ = next_signal(&mut term) => {}
            _ = next_signal(&mut hup) => {}
        }
        std::process::exit(i32::from(EXIT_INTERRUPTED));
    });
    flag
}

/// A line on stderr that cannot panic when the terminal is gone (after SIGHUP it usually is).
fn say(line: &str) {
    say_err!("{line}");
}

async fn next_signal(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// `--json` of several runs: `{"runs": [...], "failed": N}`.
#[derive(serde::Serialize)]
struct AllRuns<'a> {
    runs: &'a [RunOutcome],
    failed: usize,
}

/// Writes `v` as one line of JSON on stdout, serialized straight into the output: a run of
/// 10,000 steps is not first built as a JSON tree (about 1 KB per step) and then as a string.
fn print_json<T: serde::Serialize>(v: &T) {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // As `say_out!`: a closed stdout (a pipe whose reader left) is not an error worth a panic.
    if serde_json::to_writer(&mut out, v).is_ok() {
        let _ = writeln!(out);
    }
    let _ = out.flush();
}

/// The active blueprints of `source` and the problems of those that cannot run (row ids for
/// Supabase, paths for files). `require_some`: no blueprint at all is bad input.
pub(super) fn gather_blueprints(
    dir: &Path,
    source: Source,
    config: &Config,
    rt: &tokio::runtime::Runtime,
    require_some: bool,
) -> Result<(Vec<Blueprint>, Vec<String>), Failure> {
    let supabase_set = config.supabase_url.is_some() && config.supabase_key.is_some();
    let (from_dir, from_supabase) = match source {
        Source::Auto => (!supabase_set, supabase_set),
        Source::Dir => (true, false),
        Source::Supabase => (false, true),
        Source::Both => (true, true),
    };
    let mut out = Vec::new();
    let mut bad = Vec::new();
    if from_dir {
        let entries = blueprint::load_dir(dir, config.limits.max_blueprint_bytes).map_err(|e| {
            Failure::input(format!(
                "cannot read blueprints from {}: {e}",
                dir.display()
            ))
        })?;
        for (path, r) in entries {
            match r {
                Ok(bp) if bp.active => out.push(bp),
                Ok(_) => {}
                // An oversized file's message already begins with its path.
                Err(e @ blueprint::LoadError::TooLarge { .. }) => bad.push(e.to_string()),
                Err(e) => bad.push(format!("{} — {e}", path.display())),
            }
        }
    }
    if from_supabase {
        let http = reqwest::Client::new();
        let rows = rt
            .block_on(crate::supabase::active_blueprints(&http, config))
            .map_err(|e| Failure::input(e.to_string()))?;
        for row in rows {
            match row.blueprint {
                // With --source both, a file wins over a row of the same name.
                Ok(bp) if out.iter().any(|b: &Blueprint| b.name == bp.name) => bad.push(format!(
                    "Supabase row {}: a blueprint named {:?} was already loaded from {}",
                    row.id,
                    bp.name,
                    dir.display()
                )),
                Ok(bp) if bp.active => out.push(bp),
                Ok(_) => {}
                Err(e) => bad.push(e),
            }
        }
    }
    if out.is_empty() && require_some {
        let place = if from_supabase && !from_dir {
            format!("the Supabase table {}", crate::supabase::TABLE)
        } else {
            dir.display().to_string()
        };
        let mut msg =
            format!("no active blueprints in {place} (set \"active\": true in one, or see README)");
        for b in &bad {
            msg.push_str(&format!("\n  skipped: {b}"));
        }
        return Err(Failure::input(msg));
    }
    Ok((out, bad))
}

fn status_icon(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Success => "✓",
        RunStatus::Error => "✗",
        RunStatus::Cancelled => "■",
        RunStatus::Queued | RunStatus::Running => "…",
    }
}
