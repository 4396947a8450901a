//! One function per command. Each returns its exit code or a [`Failure`].

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

fn load_blueprint(name: &str, dir: &Path) -> Result<Blueprint, Failure> {
    let path = blueprint::resolve(name, dir).map_err(|e| Failure::input(e.to_string()))?;
    blueprint::load_file(&path).map_err(|e| Failure::input(e.to_string()))
}

pub fn tui(args: TuiArgs) -> Result<ExitCode, Failure> {
    let mut config = load_config()?;
    if args.listen.is_some() {
        config.listen = args.listen;
    }
    if !std::io::stdout().is_terminal() {
        return Err(Failure::input(
            "the console needs a terminal (stdout is not one); for scripts use `omniflow run`, \
             `omniflow runs` and `omniflow show`",
        ));
    }
    // A shared PostgreSQL database is opened here, so that a bad or unreachable one ends the
    // start with exit 2 and its fix, before the terminal is taken over (the console's
    // temporary-database fallback is for a local file only: never for a fleet's database).
    let shared = match config.database().map_err(Failure::input)? {
        crate::store::Location::Postgres(_) => Some(open_store(&config)?),
        crate::store::Location::Sqlite(_) => None,
    };
    let interrupted = crate::tui::run(
        config,
        crate::tui::Options {
            theme: args.theme,
            dir: args.dir,
            themes_dir: "themes".into(),
            schedules: args.schedules,
            store: shared,
        },
    )
    .map_err(|message| Failure { code: 1, message })?;
    // Ctrl-C: interrupted (runs in flight were handed over, as the contract's exit 3 says).
    Ok(if interrupted {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    if args.simulate_failures.is_some() && !args.sandbox {
        return Err(Failure::input(
            "--simulate-failures only works in a sandbox run: add --sandbox",
        ));
    }
    if let Some(rate) = args.simulate_failures {
        if !(0.0..=1.0).contains(&rate) {
            return Err(Failure::input(format!(
                "--simulate-failures {rate}: give a fraction from 0 to 1 (0.3 = 30 %)"
            )));
        }
    }
    let priority = match &args.priority {
        None => None,
        Some(p) => Some(Priority::parse(p).ok_or_else(|| {
            Failure::input(format!(
                "--priority {p:?}: expected critical, high, normal or low"
            ))
        })?),
    };
    let mut variables = Map::new();
    for v in &args.vars {
        let (k, val) = parse_var_arg(v).map_err(Failure::input)?;
        variables.insert(k, val);
    }
    let blueprints: Vec<Blueprint> = if args.all_active {
        if !variables.is_empty() {
            return Err(Failure::input(
                "--var cannot be combined with --all-active (each blueprint has its own variables)",
            ));
        }
        // Files or Supabase; invalid ones are reported and skipped.
        let rt = runtime()?;
        let (found, bad) = gather_blueprints(&args.dir, args.source, &config, &rt, true)?;
        for b in &bad {
            say_err!("skipping invalid blueprint: {b}");
        }
        found
    } else {
        let name = args.blueprint.as_deref().unwrap_or_default();
        vec![load_blueprint(name, &args.dir)?]
    };
    // Check variables before anything is written.
    for bp in &blueprints {
        crate::engine::merge_variables(bp, &variables)
            .map_err(|e| Failure::input(e.to_string()))?;
    }
    let store = open_store(&config)?;
    let replay = match &args.replay {
        None => std::collections::HashMap::new(),
        Some(id) => {
            if !args.sandbox || args.all_active {
                return Err(Failure::input(
                    "--replay works in a sandbox run of one blueprint: add --sandbox",
                ));
            }
            replay_outputs(&store, id, &blueprints[0].name)?
        }
    };
    let log = logging::init(&config.log_dir, config.secrets(), "info", None)
        .map_err(|e| Failure::input(e.to_string()))?;
    let rt = runtime()?;
    let simulate = args.simulate_failures.unwrap_or(0.0);
    let json_out = args.json;
    let sandbox = args.sandbox;
    let seed = args.seed;
    let all_active = args.all_active;
    let first = blueprints[0].clone();
    let (outcomes, interrupted) = rt.block_on(async move {
        let signals = Signals::listen();
        let bus = EventBus::new();
        let engine = Engine::new(Arc::new(config), store, bus.clone());
        engine.set_role(if all_active {
            crate::engine::Role::AllActive
        } else {
            crate::engine::Role::Run
        });
        // Heartbeats keep our runs ours; a cron'd run adopts nothing.
        let maintenance = engine.start_maintenance(false);
        let tty = std::io::stderr().is_terminal();
        let mut handles = Vec::new();
        let mut progress = None;
        let mut sorted = blueprints;
        sorted.sort_by_key(|b| std::cmp::Reverse(b.priority));
        for bp in sorted {
            let bp = Arc::new(bp);
            let sub = (!all_active).then(|| bus.subscribe());
            let req = RunRequest {
                variables: variables.clone(),
                sandbox,
                simulate_failures: simulate,
                seed,
                priority,
                trigger: if all_active {
                    crate::engine::Trigger::AllActive
                } else {
                    crate::engine::Trigger::Cli
                },
                replay: replay.clone(),
                ..Default::default()
            };
            let handle = engine
                .start(bp.clone(), req)
                .map_err(|e| Failure::input(e.to_string()))?;
            if let Some(sub) = sub {
                let note = if sandbox {
                    format!(
                        "  sandbox{}",
                        if simulate > 0.0 {
                            format!(" failures {:.0}%", simulate * 100.0)
                        } else {
                            String::new()
                        }
                    )
                } else {
                    String::new()
                };
                let p = Progress::new(&bp, &handle.run_id, tty, note);
                progress = Some(tokio::spawn(p.follow(sub)));
            } else {
                say_err!("queued {} as run {}", bp.name, handle.run_id);
            }
            handles.push(handle);
        }
        let tokens: Vec<_> = handles.iter().map(|h| h.cancel_token()).collect();
        let interrupted = watch_signals(engine.clone(), tokens, signals);
        let disk = watch_disk(engine.store().clone());
        let mut outcomes = Vec::new();
        for h in handles {
            let o = h.wait().await;
            if all_active {
                say_err!(
                    "{} {}  {}  {:.1}s{}",
                    status_icon(o.status),
                    o.blueprint,
                    o.status.as_str(),
                    o.total_time_ms as f64 / 1000.0,
                    o.error
                        .as_deref()
                        .map(|e| format!("  {e}"))
                        .unwrap_or_default()
                );
            }
            outcomes.push(o);
        }
        if let Some(p) = progress {
            let _ = p.await;
        }
        // One digest of the whole batch, when NOTIFY_DIGEST names channels.
        if all_active && !sandbox && !engine.config().notify_digest.is_empty() {
            let runs: Vec<crate::notify::RunSummary> =
                outcomes.iter().map(RunOutcome::summary).collect();
            let http = reqwest::Client::new();
            for e in crate::notify::send_digest(&http, engine.config(), &runs).await {
                say_err!("warning: the digest was not sent: {e}");
            }
        }
        maintenance.stop().await;
        for o in &outcomes {
            if o.status == RunStatus::Running {
                say_err!(
                    "■ {} handed over unfinished: `omniflow resume {}` (or a running console or daemon) continues it",
                    o.blueprint, o.run_id
                );
            }
        }
        engine.stopped().await;
        settle(engine.store(), &mut outcomes, &interrupted).await;
        disk.abort();
        if let Some(e) = engine.store().take_write_error() {
            say_err!("warning: the history database reported an error: {e}");
        }
        let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
        Ok::<_, Failure>((outcomes, interrupted))
    })?;
    if let Some(p) = log.write_problem() {
        say_err!("warning: {p}");
    }

    let failed = outcomes
        .iter()
        .filter(|o| o.status != RunStatus::Success)
        .count();
    if json_out {
        if all_active {
            print_json(&AllRuns {
                runs: &outcomes,
                failed,
            });
        } else {
            print_json(&outcomes[0]);
        }
    } else if all_active {
        say_err!(
            "{} blueprint{} ran, {} failed",
            outcomes.len(),
            if outcomes.len() == 1 { "" } else { "s" },
            failed
        );
    } else {
        print_outcome(&outcomes[0], &first);
    }
    Ok(exit_code(&outcomes, interrupted))
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

pub fn resume(args: ResumeArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let store = open_store(&config)?;
    let log = logging::init(&config.log_dir, config.secrets(), "info", None)
        .map_err(|e| Failure::input(e.to_string()))?;
    let rt = runtime()?;
    let json_out = args.json;
    let (outcomes, interrupted) = rt.block_on(async move {
        let signals = Signals::listen();
        let bus = EventBus::new();
        let engine = Engine::new(Arc::new(config), store, bus.clone());
        engine.set_role(crate::engine::Role::Resume);
        let maintenance = engine.start_maintenance(false);
        let ids: Vec<String> = if args.all {
            let store = engine.store().clone();
            let lease = engine.config().scaled(engine.config().lease_timeout);
            tokio::task::spawn_blocking(move || store.orphaned_runs(lease))
                .await
                .map_err(|e| Failure::input(e.to_string()))?
                .map_err(|e| Failure::input(e.to_string()))?
        } else {
            vec![args.run_id.clone().unwrap_or_default()]
        };
        if ids.is_empty() {
            say_err!("no interrupted runs to resume");
        }
        let mut handles = Vec::new();
        let mut refused = Vec::new();
        for id in &ids {
            match engine.resume(id).await {
                Ok(h) => {
                    say_err!("resuming run {}", h.run_id);
                    handles.push(h);
                }
                Err(e) if args.all => {
                    say_err!("skipping {id}: {e}");
                    refused.push(e.to_string());
                }
                Err(e) => {
                    let code = match e {
                        crate::engine::ResumeError::Exhausted { .. }
                        | crate::engine::ResumeError::ReadFailed { .. } => 1,
                        _ => 2,
                    };
                    return Err(Failure {
                        code,
                        message: e.to_string(),
                    });
                }
            }
        }
        let tokens: Vec<_> = handles.iter().map(|h| h.cancel_token()).collect();
        let interrupted = watch_signals(engine.clone(), tokens, signals);
        let disk = watch_disk(engine.store().clone());
        let mut outcomes = Vec::new();
        for h in handles {
            outcomes.push(h.wait().await);
        }
        maintenance.stop().await;
        for o in &outcomes {
            if matches!(o.status, RunStatus::Running | RunStatus::Queued) {
                say(&format!(
                    "■ {} handed over unfinished: `omniflow resume {}` (or a running console or daemon) continues it",
                    o.blueprint, o.run_id
                ));
            }
        }
        engine.stopped().await;
        settle(engine.store(), &mut outcomes, &interrupted).await;
        disk.abort();
        // Each run as it is saved (after `settle`, so a success is only shown once it is).
        for o in &outcomes {
            say_err!(
                "{} {} {}  {}",
                status_icon(o.status),
                o.blueprint,
                o.run_id,
                o.status.as_str()
            );
            if let Some(e) = &o.error {
                say_err!("  {e}");
            }
        }
        let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
        Ok::<_, Failure>((outcomes, interrupted))
    })?;
    if let Some(p) = log.write_problem() {
        say_err!("warning: {p}");
    }
    let failed = outcomes
        .iter()
        .filter(|o| o.status != RunStatus::Success)
        .count();
    if json_out {
        print_json(&AllRuns {
            runs: &outcomes,
            failed,
        });
    }
    Ok(exit_code(&outcomes, interrupted))
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
        let entries = blueprint::load_dir(dir).map_err(|e| {
            Failure::input(format!(
                "cannot read blueprints from {}: {e}",
                dir.display()
            ))
        })?;
        for (path, r) in entries {
            match r {
                Ok(bp) if bp.active => out.push(bp),
                Ok(_) => {}
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

/// The recorded outputs of a run's successful steps, for `--replay`.
fn replay_outputs(
    store: &Store,
    run_id: &str,
    blueprint: &str,
) -> Result<std::collections::HashMap<String, Value>, Failure> {
    let run = store
        .find_run(run_id)
        .map_err(|e| Failure::input(format!("--replay: {e}")))?;
    if run.blueprint_name != blueprint {
        return Err(Failure::input(format!(
            "--replay {}: that run is of blueprint {:?}, not {blueprint:?}",
            run.id, run.blueprint_name
        )));
    }
    crate::engine::successful_outputs(store, &run.id).map_err(|e| Failure::input(e.to_string()))
}

fn status_icon(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Success => "✓",
        RunStatus::Error => "✗",
        RunStatus::Cancelled => "■",
        RunStatus::Queued | RunStatus::Running => "…",
    }
}

/// The human summary: outcome on stderr, the final nodes' outputs on stdout.
fn print_outcome(o: &RunOutcome, bp: &Blueprint) {
    let retries: u32 = o.steps.iter().map(|s| s.attempts.saturating_sub(1)).sum();
    say_err!(
        "{} {} {} in {:.1}s — {} steps, {} retr{}, {} tokens{}",
        status_icon(o.status),
        o.blueprint,
        match o.status {
            RunStatus::Success => "succeeded",
            RunStatus::Error => "failed",
            RunStatus::Cancelled => "was cancelled",
            _ => "ended",
        },
        o.total_time_ms as f64 / 1000.0,
        o.steps.len(),
        retries,
        if retries == 1 { "y" } else { "ies" },
        o.tokens_used,
        o.seed.map(|s| format!(" (seed {s})")).unwrap_or_default()
    );
    if let Some(e) = &o.error {
        say_err!("  {e}");
    }
    // The results are the outputs of the final nodes (those no other node needs).
    let needed: std::collections::HashSet<&str> = bp
        .nodes
        .iter()
        .flat_map(|n| n.needs.iter().map(String::as_str))
        .collect();
    let finals: Vec<&str> = bp
        .nodes
        .iter()
        .map(|n| n.id.as_str())
        .filter(|id| !needed.contains(id))
        .collect();
    let mut shown = 0;
    for id in &finals {
        let Some(v) = o.outputs.get(*id) else {
            continue;
        };
        let text = output_text(v);
        say_err!("── output of {id} ──");
        say_out!("{text}");
        shown += 1;
    }
    if shown == 0 && o.status == RunStatus::Success {
        say_err!(
            "  (no final output: the last steps ({}) were skipped)",
            finals.join(", ")
        );
    }
    // Last, so a long output does not push the run's id out of sight.
    say_err!("details: omniflow show {}", o.run_id);
}

/// A final node's output as the human summary prints it. Outputs come from providers,
/// services and (on resume) the database, so nothing here may assume a key is present.
fn output_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) if m.contains_key("channel") => {
            let channel = m.get("channel").and_then(Value::as_str).unwrap_or("?");
            let parts = m.get("parts").and_then(Value::as_u64).unwrap_or(1);
            let messages = format!("{parts} message{}", if parts == 1 { "" } else { "s" });
            // What happened first, then the text that was (or would have been) sent.
            let head = match m.get("delivered") {
                Some(Value::Bool(true)) => {
                    let again = m.get("alreadySent").and_then(Value::as_u64).unwrap_or(0);
                    let mut s = format!("sent on {channel} ({messages})");
                    if again > 0 {
                        s.push_str(&format!(
                            ", {again} of them already sent by an earlier attempt"
                        ));
                    }
                    s
                }
                Some(Value::Bool(false)) => {
                    format!("not sent (a sandbox run): {channel} would get {messages}")
                }
                _ => match m.get("note").and_then(Value::as_str) {
                    Some(note) => format!("{channel}: {note}"),
                    None => return serde_json::to_string_pretty(v).unwrap_or_default(),
                },
            };
            match m.get("text").and_then(Value::as_str) {
                Some(text) => format!("{head}\n{text}"),
                None => head,
            }
        }
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

pub fn validate(args: ValidateArgs) -> Result<ExitCode, Failure> {
    let mut all_ok = true;
    let mut report = Vec::new();
    for file in &args.files {
        match blueprint::load_file(file) {
            Ok(bp) => {
                if !args.json {
                    say_out!("{}: ok ({} nodes)", file.display(), bp.nodes.len());
                }
                report.push(json!({ "file": file, "ok": true, "problems": [] }));
            }
            Err(blueprint::LoadError::Invalid { problems, .. }) => {
                all_ok = false;
                if !args.json {
                    for p in &problems {
                        say_out!("{}: {p}", file.display());
                    }
                }
                let ps: Vec<Value> = problems
                    .iter()
                    .map(|p| json!({ "path": p.path, "message": p.message }))
                    .collect();
                report.push(json!({ "file": file, "ok": false, "problems": ps }));
            }
            Err(e) => {
                all_ok = false;
                if !args.json {
                    say_out!("{e}");
                }
                report.push(json!({ "file": file, "ok": false, "problems": [{ "path": "", "message": e.to_string() }] }));
            }
        }
    }
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({ "ok": all_ok, "files": report })).unwrap_or_default()
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub fn runs(args: RunsArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let status = match &args.status {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            Failure::input(format!(
                "--status {s:?}: expected queued, running, success, error or cancelled"
            ))
        })?),
    };
    let store = open_store(&config)?;
    let filter = RunFilter {
        status,
        blueprint: args.blueprint.clone(),
        limit: args.limit.max(1),
        before: None,
        ..RunFilter::default()
    };
    let rows = store
        .list_runs(&filter)
        .map_err(|e| Failure::input(e.to_string()))?;
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({ "runs": rows })).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        say_err!(
            "no runs yet in {} — try: omniflow run tech-digest --sandbox",
            store.place()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Which history this is: `omniflow runs` from another directory reads another file.
    say_err!("history: {}", store.place());
    say_out!(
        "{:<14} {:<20} {:<10} {:<20} {:>9} {:>7}  ERROR",
        "ID",
        "BLUEPRINT",
        "STATUS",
        "STARTED (UTC)",
        "DURATION",
        "TOKENS"
    );
    for r in rows {
        let started = r.started_at.unwrap_or(r.queued_at);
        say_out!(
            "{:<14} {:<20} {:<10} {:<20} {:>9} {:>7}  {}",
            r.id,
            clip(&r.blueprint_name, 20),
            r.status.as_str(),
            // To the second: `2026-11-27 13:24:56`.
            crate::store::utc_date_time(started),
            r.total_time_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            r.tokens_used,
            clip(r.error.as_deref().unwrap_or(""), 60)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn show(args: ShowArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let store = open_store(&config)?;
    let run = store
        .find_run(&args.run_id)
        .map_err(|e| Failure::input(e.to_string()))?;
    let steps = store
        .run_steps(&run.id)
        .map_err(|e| Failure::input(e.to_string()))?;
    let attempts = store
        .run_attempts(&run.id)
        .map_err(|e| Failure::input(e.to_string()))?;
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({ "run": run, "steps": steps, "attempts": attempts }))
                .unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    say_out!(
        "run {}  {}  {}{}",
        run.id,
        run.blueprint_name,
        run.status.as_str(),
        if run.sandbox {
            format!(
                "  (sandbox, seed {}, failures {:.0}%)",
                run.seed.unwrap_or(0),
                run.simulate_failures * 100.0
            )
        } else {
            String::new()
        }
    );
    say_out!(
        "started {}  finished {}  took {}  tokens {}  trigger {}",
        run.started_at
            .map(crate::store::iso8601)
            .unwrap_or_else(|| "-".into()),
        run.finished_at
            .map(crate::store::iso8601)
            .unwrap_or_else(|| "-".into()),
        run.total_time_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into()),
        run.tokens_used,
        run.trigger
    );
    if let Some(e) = &run.error {
        say_out!(
            "error ({}): {e}",
            run.error_kind.map_or("?", |k| k.as_str())
        );
    }
    say_out!();
    say_out!(
        "{:<22} {:<10} {:>8} {:>9} {:>7}  {:<10} OUTPUT / ERROR",
        "STEP",
        "STATUS",
        "ATTEMPTS",
        "DURATION",
        "TOKENS",
        "PROVIDER"
    );
    for s in &steps {
        let detail = match (&s.error, &s.output) {
            (Some(e), _) => format!("{}: {e}", s.error_kind.map_or("error", |k| k.as_str())),
            (None, Some(Value::String(t))) => t.replace('\n', " "),
            (None, Some(v)) => v.to_string(),
            (None, None) => String::new(),
        };
        let detail = if s.truncated() && s.error.is_none() {
            format!("[truncated] {detail}")
        } else {
            detail
        };
        say_out!(
            "{:<22} {:<10} {:>8} {:>9} {:>7}  {:<10} {}",
            clip(&s.step_key, 22),
            s.status.as_str(),
            s.attempts,
            s.duration_ms
                .map(|ms| format!("{:.2}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            s.tokens_used,
            clip(s.provider.as_deref().unwrap_or("-"), 10),
            clip(&detail, 70)
        );
    }
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    if !failed.is_empty() {
        say_out!();
        say_out!("failed attempts:");
        for a in failed {
            say_out!(
                "  {} #{}  {}: {}{}",
                a.step_key,
                a.attempt,
                a.error_kind.map_or("error", |k| k.as_str()),
                a.error.as_deref().unwrap_or(""),
                a.wait_ms
                    .map(|w| format!("  → waited {:.1}s", w as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
    let truncated: Vec<_> = steps.iter().filter(|s| s.truncated()).collect();
    if !truncated.is_empty() {
        println!();
        println!("answers cut off (finish_reason: length — raise maxTokens or the server's context size; \"failOnTruncation\": true makes it fail the step):");
        for s in truncated {
            println!("  {}", s.step_key);
        }
    }
    let other_models: Vec<_> = steps
        .iter()
        .filter_map(|s| Some((s, s.other_reply_model()?)))
        .collect();
    if !other_models.is_empty() {
        println!();
        println!("warning: the server answered with another model than the one asked for:");
        for (s, answered) in other_models {
            println!(
                "  {}  asked for {}, answered by {answered}",
                s.step_key,
                s.model.as_deref().unwrap_or("-")
            );
        }
    }
    // Issue 3: attempts answered by a fallback provider, and why the others were skipped.
    let fallbacks = store.run_fallbacks(&run.id).unwrap_or_default();
    if !fallbacks.is_empty() {
        say_out!();
        say_out!("provider fallbacks:");
        for (step, attempt, note) in fallbacks {
            say_out!("  {step} #{attempt}  {note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn schema() -> Result<ExitCode, Failure> {
    say_out!(
        "{}",
        serde_json::to_string_pretty(&blueprint::schema()).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn backup(args: BackupArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    if let crate::store::Location::Postgres(target) = config.database().map_err(Failure::input)? {
        return Err(Failure::input(format!(
            "omniflow backup copies the SQLite file at DB_FILE; this omniflow uses PostgreSQL \
             at {} (DATABASE_URL): back it up with `pg_dump -Fc -f omniflow.dump \"$DATABASE_URL\"` \
             and restore with `pg_restore -d \"$DATABASE_URL\" omniflow.dump`",
            target.shown()
        )));
    }
    if !config.db_file.exists() {
        return Err(Failure::input(format!(
            "no history database at {} (DB_FILE); nothing to back up",
            config.db_file.display()
        )));
    }
    match Store::open(&config.db_file) {
        Ok(store) => store
            .backup(&args.file)
            .map_err(|e| Failure::input(e.to_string())),
        // A damaged file is not opened for writing; its pages are copied as they are.
        Err(crate::store::StoreError::Malformed { .. }) => {
            crate::store::backup_file(&config.db_file, &args.file).map_err(|e| {
                Failure::input(format!(
                    "{} is damaged and cannot be copied page by page ({e}); recover what can \
                     be read with `sqlite3 {} .recover > rescued.sql`, then point DB_FILE at a \
                     fresh file",
                    config.db_file.display(),
                    config.db_file.display()
                ))
            })
        }
        Err(e) => Err(Failure::input(e.to_string())),
    }?;
    say_err!(
        "backed up {} to {}",
        config.db_file.display(),
        args.file.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn migrate(args: super::MigrateArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let url = args.to.clone().or_else(|| config.database_url.clone()).ok_or_else(|| {
        Failure::input(
            "migrate needs the PostgreSQL database to copy into: \
             omniflow migrate --to postgres://USER:PASSWORD@HOST:5432/DATABASE (or set DATABASE_URL)",
        )
    })?;
    let target = crate::store::PgTarget::parse(&url).map_err(Failure::input)?;
    let from = args.from.unwrap_or_else(|| config.db_file.clone());
    if !from.exists() {
        return Err(Failure::input(format!(
            "no SQLite history at {} (DB_FILE or --from): nothing to copy",
            from.display()
        )));
    }
    say_err!("copying {} into {} …", from.display(), target.shown());
    let copied = crate::store::pg::import::import_sqlite(&from, &target)
        .map_err(|e| Failure::input(e.to_string()))?;
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({
                "from": from,
                "to": target.shown(),
                "tables": copied,
            }))
            .unwrap_or_default()
        );
    } else {
        for c in &copied {
            let already = c.read.saturating_sub(c.written);
            say_out!(
                "  {:<20} {:>8} copied{}",
                c.label,
                c.written,
                if already > 0 {
                    format!(" ({already} already there)")
                } else {
                    String::new()
                }
            );
        }
        say_out!(
            "done: point every omniflow at it with DATABASE_URL (running it again copies only what is new)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn export(args: ExportArgs) -> Result<ExitCode, Failure> {
    let target = crate::export::Target::parse(&args.target).ok_or_else(|| {
        Failure::input(format!(
            "--target {:?}: expected python, node, github-action or docker",
            args.target
        ))
    })?;
    let bp = load_blueprint(&args.blueprint, &args.dir)?;
    let files = crate::export::export(&bp, target, &args.out, args.force)
        .map_err(|e| Failure::input(e.to_string()))?;
    say_err!(
        "exported {} to {} ({}):",
        bp.name,
        args.out.display(),
        target.as_str()
    );
    for f in files {
        say_out!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

use crate::text::clip;

/// `omniflow doctor`: configuration, the provider chain with a live check of each
/// configured link, the database and the log directory. Exit 0 when everything configured
/// works, 1 otherwise.
pub fn doctor(args: DoctorArgs) -> Result<ExitCode, Failure> {
    let config = Arc::new(load_config()?);
    let location = config.database().map_err(Failure::input)?;
    let rt = runtime()?;
    let providers = crate::providers::Providers::new(config.clone());
    if let Some(model) = &args.pull {
        return rt.block_on(pull(&providers, model));
    }
    // A provider's error may quote the request back, headers and all: no secret is shown.
    let redactor = crate::logging::Redactor::new(config.secrets());
    let checks: Vec<_> = rt
        .block_on(providers.doctor())
        .into_iter()
        .map(|mut c| {
            c.detail = redactor.redact(&c.detail).into_owned();
            c
        })
        .collect();
    let set = |o: &Option<String>| if o.is_some() { "set" } else { "unset" };
    let rate = |r: Option<crate::config::RateLimit>| {
        r.map(|r| r.to_string())
            .unwrap_or_else(|| "unlimited".into())
    };
    let settings: Vec<(&str, String)> = vec![
        ("HUGGINGFACE_TOKEN", set(&config.huggingface_token).into()),
        ("HF_INFERENCE_URL", config.hf_inference_url.clone()),
        ("USE_OLLAMA", config.use_ollama.to_string()),
        ("OLLAMA_URL", config.ollama_url.clone()),
        ("OLLAMA_MODEL", config.ollama_model.clone()),
        (
            "OPENAI_BASE_URL",
            config
                .openai_base_url
                .clone()
                .unwrap_or_else(|| "unset".into()),
        ),
        ("OPENAI_API_KEY", set(&config.openai_api_key).into()),
        ("MODEL_FAST", config.model_fast.clone()),
        ("MODEL_BETTER", config.model_better.clone()),
        ("MODEL_POWERFUL", config.model_powerful.clone()),
        (
            "REQUEST_TIMEOUT",
            format!("{}s", config.request_timeout.as_secs()),
        ),
        ("MAX_RETRIES", config.max_retries.to_string()),
        (
            "CACHE_TTL",
            if config.cache_ttl.is_zero() {
                "off".into()
            } else {
                humantime::format_duration(config.cache_ttl).to_string()
            },
        ),
        (
            "MAX_TOKENS_PER_RUN",
            config
                .max_tokens_per_run
                .map(|n| n.to_string())
                .unwrap_or_else(|| "unlimited".into()),
        ),
        ("HF_RATE_LIMIT", rate(config.hf_rate_limit)),
        ("OLLAMA_RATE_LIMIT", rate(config.ollama_rate_limit)),
        ("OPENAI_RATE_LIMIT", rate(config.openai_rate_limit)),
        ("CONCURRENCY", config.concurrency.to_string()),
        ("TELEGRAM_BOT_TOKEN", set(&config.telegram_bot_token).into()),
        ("DISCORD_WEBHOOK", set(&config.discord_webhook).into()),
        (
            "DATABASE_URL",
            match &location {
                crate::store::Location::Postgres(t) => t.shown().to_string(),
                crate::store::Location::Sqlite(_) => "unset (SQLite at DB_FILE)".into(),
            },
        ),
    ];
    let chain: Vec<&str> = checks
        .iter()
        .filter(|c| c.configured)
        .map(|c| c.provider)
        .collect();

    // The database: opens (migrating if needed), schema version, run count; then the health
    // of every process on it (their heartbeats) and runs left by a process that died.
    // A database that does not exist yet is not created just to be checked: the first run
    // creates it (its directory must be writable).
    // On PostgreSQL: connection, server version, migrations and privileges, checked without
    // migrating; the store is opened only when it can be.
    let pg = match &location {
        crate::store::Location::Postgres(t) => Some(crate::store::pg::doctor::check(t)),
        crate::store::Location::Sqlite(_) => None,
    };
    let db_exists = match &pg {
        Some(report) => report.usable(),
        None => config.db_file.exists(),
    };
    let store = if db_exists {
        open_store(&config)
    } else {
        Err(Failure::input("not created yet"))
    };
    let db = store.as_ref().map_err(Failure::clone).and_then(|s| {
        let v = s
            .schema_version()
            .map_err(|e| Failure::input(e.to_string()))?;
        let n = s
            .count_runs(&RunFilter::default())
            .map_err(|e| Failure::input(e.to_string()))?;
        let problems = s
            .integrity_problems()
            .map_err(|e| Failure::input(e.to_string()))?;
        if !problems.is_empty() {
            return Err(Failure::input(format!(
                "damaged: integrity_check found {}{}. Copy out what can be read \
                 (`omniflow backup rescued.db`, or `sqlite3 {} .recover > rescued.sql`), then \
                 point DB_FILE at a fresh file",
                problems
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
                if problems.len() > 3 { "; …" } else { "" },
                config.db_file.display()
            )));
        }
        Ok((v, n))
    });
    let lease = config.scaled(config.lease_timeout);
    let processes = store
        .as_ref()
        .ok()
        .and_then(|s| s.processes(lease).ok())
        .unwrap_or_default();
    let orphaned = store
        .as_ref()
        .ok()
        .and_then(|s| s.orphaned_runs(lease).ok())
        .unwrap_or_default();
    // The live ones, then the five most recent others.
    let shown: Vec<&crate::store::ProcessRow> = processes
        .iter()
        .filter(|p| p.alive)
        .chain(processes.iter().filter(|p| !p.alive).take(5))
        .collect();
    // The log directory is writable, or (when it does not exist yet) the directory it would
    // be created in is: checked with a probe file that is removed, never by creating it.
    let logs_exist = config.log_dir.is_dir();
    let logs = if !logs_exist && config.log_dir.exists() {
        // A file (or something else) where the directory should be: it cannot be created.
        Err(std::io::Error::other("it is a file, not a directory"))
    } else {
        writable(if logs_exist {
            &config.log_dir
        } else {
            nearest_dir(&config.log_dir)
        })
    };
    let db_dir_ok = db_exists || writable(nearest_dir(&config.db_file)).is_ok();
    let db_ok = match &pg {
        Some(report) => report.ok() && db.is_ok(),
        None => db.is_ok() || (!db_exists && db_dir_ok),
    };

    let providers_ok = checks.iter().all(|c| c.ok != Some(false));
    // With no provider at all, nothing can run a model: that is not "everything works".
    let can_run_models = !chain.is_empty();
    let all_ok = can_run_models && providers_ok && db_ok && logs.is_ok();
    if args.json {
        let v = json!({
            "ok": all_ok,
            "settings": settings.iter().map(|(k, v)| (k.to_string(), Value::String(v.clone()))).collect::<Map<_, _>>(),
            "chain": chain,
            "providers": checks,
            "canRunModels": can_run_models,
            "database": match (&pg, &db) {
                (Some(report), db) => json!({
                    "ok": db_ok,
                    "url": report.database,
                    "checks": report.checks,
                    "migrations": report.migrated,
                    "latestMigration": report.latest,
                    "runs": db.as_ref().ok().map(|(_, n)| *n),
                    "error": db.as_ref().err().filter(|_| report.usable()).map(|e| e.message.clone()),
                }),
                (None, Ok((v, n))) => json!({ "ok": true, "path": config.db_file, "schemaVersion": v, "runs": n }),
                (None, Err(_)) if !db_exists => json!({ "ok": db_dir_ok, "path": config.db_file, "exists": false }),
                (None, Err(e)) => json!({ "ok": false, "path": config.db_file, "error": e.message }),
            },
            "logDir": match &logs {
                Ok(()) => json!({ "ok": true, "path": config.log_dir, "exists": logs_exist }),
                Err(e) => json!({ "ok": false, "path": config.log_dir, "error": e.to_string() }),
            },
            "processes": shown.iter().map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                v["state"] = p.state().into();
                v
            }).collect::<Vec<_>>(),
            "orphanedRuns": orphaned,
        });
        say_out!("{}", serde_json::to_string(&v).unwrap_or_default());
    } else {
        say_out!("configuration (secrets are shown as set/unset only)");
        for (k, v) in &settings {
            say_out!("  {k:<20} {v}");
        }
        say_out!();
        if chain.is_empty() {
            say_out!("provider chain (auto): none configured — set HUGGINGFACE_TOKEN, or USE_OLLAMA=true, or OPENAI_BASE_URL; or run blueprints with --sandbox");
        } else {
            say_out!("provider chain (auto): {}", chain.join(" → "));
        }
        for c in &checks {
            let mark = match c.ok {
                Some(true) => "✓",
                Some(false) => "✗",
                None => "-",
            };
            say_out!("  {mark} {:<12} {}", c.provider, c.detail);
            if !c.configured {
                say_out!("    needs: {}", c.needs);
            }
        }
        say_out!();
        if let Some(report) = &pg {
            let mark = if db_ok { "✓" } else { "✗" };
            match &db {
                Ok((_, n)) => say_out!("{mark} database {}  {n} run(s)", report.database),
                Err(e) if report.usable() => {
                    say_out!("✗ database {}  {}", report.database, e.message)
                }
                Err(_) => say_out!("{mark} database {}", report.database),
            }
            for c in &report.checks {
                let mark = if c.ok { "✓" } else { "✗" };
                say_out!("  {mark} {:<12} {}", c.name, c.detail);
            }
        }
        match &db {
            _ if pg.is_some() => {}
            Ok((v, n)) => say_out!(
                "✓ database {}  schema v{v}, {n} run(s)",
                config.db_file.display()
            ),
            Err(_) if !db_exists && db_dir_ok => say_out!(
                "✓ database {}  does not exist yet: the first run creates it",
                config.db_file.display()
            ),
            Err(_) if !db_exists => say_out!(
                "✗ database {}  does not exist and its directory is not writable; set DB_FILE",
                config.db_file.display()
            ),
            Err(e) => say_out!("✗ database {}  {}", config.db_file.display(), e.message),
        }
        match &logs {
            Ok(()) if !logs_exist => say_out!(
                "✓ log directory {} does not exist yet: it is created on first use",
                config.log_dir.display()
            ),
            Ok(()) => say_out!("✓ log directory {} is writable", config.log_dir.display()),
            Err(e) => say_out!(
                "✗ log directory {} is not writable ({e}); set LOG_DIR to a writable directory",
                config.log_dir.display()
            ),
        }
        if db.is_ok() {
            say_out!();
            let alive = processes.iter().filter(|p| p.alive).count();
            say_out!(
                "processes on this database: {alive} alive (each heartbeats every 10 s; silent for {}s = gone)",
                lease.as_secs()
            );
            if shown.is_empty() {
                say_out!("  none has run here yet (the console, `omniflow daemon` and `omniflow run` record themselves)");
            }
            let now = std::time::SystemTime::now();
            for p in &shown {
                let mark = match p.state() {
                    "alive" => "●",
                    "stopped" => "○",
                    _ => "✗",
                };
                say_out!("  {mark} {}", p.describe(now));
            }
            if !orphaned.is_empty() {
                say_out!(
                    "  ! {} unfinished run(s) whose process is gone: a console or daemon takes them over, or `omniflow resume --all`",
                    orphaned.len()
                );
            }
        }
        say_out!();
        say_out!(
            "{}",
            if !can_run_models {
                "nothing can run a model: no provider is configured — set HUGGINGFACE_TOKEN (a free \
                 read token from https://huggingface.co/settings/tokens) in .env, or USE_OLLAMA=true \
                 with `ollama serve`, or OPENAI_BASE_URL; until then only sandbox runs work \
                 (`omniflow run NAME --sandbox`, `t` in the console)"
            } else if all_ok {
                "everything configured works"
            } else {
                "something configured does not work: see ✗ above"
            }
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else if !can_run_models {
        // A configuration problem (exit 2), not a failed check of something configured.
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    })
}

/// The directory `path` is in, or would be created in: its nearest existing ancestor.
fn nearest_dir(path: &Path) -> &Path {
    let mut p = path;
    loop {
        match p.parent() {
            Some(parent) if parent.as_os_str().is_empty() => return Path::new("."),
            Some(parent) if parent.is_dir() => return parent,
            Some(parent) => p = parent,
            None => return Path::new("."),
        }
    }
}

/// Whether files can be written in `dir` (a probe file, removed at once).
fn writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".omniflow-doctor-{}", std::process::id()));
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)
}

/// `doctor --pull MODEL`: Ollama's `/api/pull` with a progress display on stderr.
async fn pull(providers: &crate::providers::Providers, model: &str) -> Result<ExitCode, Failure> {
    let url = providers.config().ollama_url.clone();
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let result = crate::providers::ollama::pull(providers.http(), &url, model, |st| {
        let line = match (st.completed, st.total) {
            (Some(c), Some(t)) if t > 0 => format!(
                "{}  {:>3}%  {:.1}/{:.1} MB",
                st.status,
                c * 100 / t,
                c as f64 / 1e6,
                t as f64 / 1e6
            ),
            _ => st.status.clone(),
        };
        if tty {
            {
                use std::io::Write as _;
                let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
            }
        } else if st.status != last {
            // In a pipe, one line per status, not one per progress tick.
            say_err!("{line}");
        }
        last = st.status.clone();
    })
    .await;
    if tty {
        say_err!();
    }
    match result {
        Ok(()) => {
            say_err!("pulled {model} into Ollama at {url}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(Failure {
            code: 1,
            message: format!("{}: {}", e.kind, e.message),
        }),
    }
}
