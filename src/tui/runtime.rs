//! The console's event loop and the background work it delegates.
//!
//! One loop merges every source with `tokio::select!`: terminal input, engine events, results
//! of background work, a clock tick, SIGTERM. After a wake-up it drains whatever else is ready
//! (up to [`DRAIN`] messages), so a burst of events costs one frame, and it draws only when
//! something visible changed, at most once per [`FRAME`].
//!
//! The loop never touches SQLite, the network or files: [`Effect`]s go to tasks on the tokio
//! runtime (reads through `spawn_blocking`), the log tailer and the sampler are threads/tasks
//! of their own — and, on a shared PostgreSQL history, the thread listening to other
//! processes' announcements (`NOTIFY omniflow_events`) — and all of them answer over one
//! bounded channel.

use super::app::{now_ms, App, Bg, Effect, Msg};
use super::state::{BlueprintEntry, LogEntry, RunDetail};
use super::terminal;
use crate::blueprint::{self, LoadError};
use crate::engine::Engine;
use crate::events::Subscriber;
use crate::store::pg::fleet_view::{Request, Requested};
use crate::store::Store;
use futures_util::StreamExt;
use ratatui::crossterm::event::{Event as TermEvent, EventStream};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Shortest time between two frames (a 30 fps cap).
pub const FRAME: Duration = Duration::from_millis(33);
/// Most messages applied before the next frame may be drawn.
pub const DRAIN: usize = 4096;
/// Capacity of the background results channel.
pub const BG_CAP: usize = 256;

/// What the effects need: the engine (and through it the pool and the store).
#[derive(Clone)]
pub struct Ctx {
    pub engine: Engine,
    pub store: Store,
    pub dir: PathBuf,
    pub tx: mpsc::Sender<Bg>,
    pub memory_threshold_mb: u64,
}

/// Runs the console until the user quits or SIGTERM. The terminal is set up and restored here.
pub async fn run(
    mut app: App,
    ctx: Ctx,
    mut rx: mpsc::Receiver<Bg>,
    sub: Subscriber,
    sched_stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<bool> {
    let stop = Arc::new(AtomicBool::new(false));
    spawn_sampler(ctx.clone(), stop.clone());
    spawn_log_tailer(
        ctx.engine.config().log_dir.clone(),
        ctx.tx.clone(),
        stop.clone(),
    );
    if let Some(target) = ctx.store.postgres() {
        match ctx.engine.follow_fleet_events() {
            Some(heard) => forward_fleet_events(heard, ctx.tx.clone(), stop.clone()),
            None => spawn_fleet_listener(target.clone(), ctx.tx.clone(), stop.clone()),
        }
    }
    let mut term = terminal::Terminal::enter()?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sigterm = terminal::sigterm();
    app.now_ms = now_ms();
    let first = app.start();
    execute(&ctx, first);
    let mut last_draw: Option<Instant> = None;
    let mut dropped_seen = 0u64;
    let mut panics_seen = terminal::background_panics();
    while !app.quit {
        if app.dirty {
            let due = last_draw.is_none_or(|t| t.elapsed() >= FRAME);
            if due {
                if let Err(e) = term.draw(&app) {
                    // The terminal is gone (a dropped SSH session): leave as on a hang-up.
                    tracing::warn!(error = %e, "cannot draw: the terminal is gone; handing runs over");
                    app.quit_mode = crate::tui::app::QuitMode::HandOver;
                    break;
                }
                app.dirty = false;
                last_draw = Some(Instant::now());
            }
        }
        let wait = match last_draw {
            Some(t) if app.dirty => FRAME.saturating_sub(t.elapsed()),
            _ => Duration::from_secs(3600),
        };
        let mut fx = Vec::new();
        tokio::select! {
            ev = keys.next() => match ev {
                Some(Ok(TermEvent::Key(k))) => fx.extend(app.update(Msg::Key(k))),
                Some(Ok(TermEvent::Resize(_, _))) => {
                    if term.autoresize().is_err() {
                        app.quit_mode = crate::tui::app::QuitMode::HandOver;
                        break;
                    }
                    app.dirty = true;
                }
                Some(Ok(_)) => {}
                // The terminal is gone (hang-up, a dropped SSH session): leave, handing the runs
                // in flight over rather than cancelling work nobody asked to stop.
                Some(Err(_)) | None => {
                    app.quit_mode = crate::tui::app::QuitMode::HandOver;
                    break;
                }
            },
            ev = sub.recv() => {
                if let Some(ev) = ev {
                    fx.extend(app.update(Msg::Engine(ev)));
                    for _ in 0..DRAIN {
                        match sub.try_recv() {
                            Some(ev) => fx.extend(app.update(Msg::Engine(ev))),
                            None => break,
                        }
                    }
                }
            },
            bg = rx.recv() => {
                if let Some(bg) = bg {
                    fx.extend(app.update(Msg::Bg(bg)));
                    for _ in 0..DRAIN {
                        match rx.try_recv() {
                            Ok(bg) => fx.extend(app.update(Msg::Bg(bg))),
                            Err(_) => break,
                        }
                    }
                }
            },
            _ = tick.tick() => {
                fx.extend(app.update(Msg::Tick(now_ms())));
                let dropped = sub.dropped();
                if dropped != dropped_seen {
                    dropped_seen = dropped;
                    fx.extend(app.update(Msg::Bg(Bg::Lagged(dropped))));
                }
                let panics = terminal::background_panics();
                if panics != panics_seen {
                    panics_seen = panics;
                    fx.extend(app.update(Msg::Bg(Bg::Failed(format!(
                        "an internal error (a panic) was caught in a background task — the console goes on; \
                         the message is in the log ({panics} so far); please report it"
                    )))));
                }
            },
            _ = terminal::recv(&mut sigterm) => {
                // SIGTERM or SIGHUP: a graceful shutdown, runs in flight are handed over.
                app.quit = true;
                app.quit_mode = crate::tui::app::QuitMode::HandOver;
            },
            _ = tokio::time::sleep(wait) => {},
        }
        execute(&ctx, fx);
    }
    stop.store(true, Ordering::Relaxed);
    term.leave();
    sched_stop.cancel();
    let active = ctx.engine.active_runs();
    if !active.is_empty() {
        use crate::tui::app::QuitMode;
        match app.quit_mode {
            QuitMode::Cancel => {
                for id in &active {
                    ctx.engine.cancel(id);
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while !ctx.engine.active_runs().is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            QuitMode::HandOver => {
                let grace = ctx.engine.config().shutdown_grace;
                // Not eprintln!: after a hang-up stderr is gone, and a failed write must not
                // panic in the middle of handing the runs over.
                say(format_args!(
                    "omniflow: handing {} run(s) over (steps in flight get up to {}s); a daemon, the next console or `omniflow resume --all` continues them",
                    active.len(),
                    grace.as_secs()
                ));
                ctx.engine.shutdown(grace).await;
            }
            QuitMode::Finish => {
                say(format_args!(
                    "omniflow: waiting for {} run(s) to finish (Ctrl-C to hand them over instead)…",
                    active.len()
                ));
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if ctx.engine.active_runs().is_empty() {
                                break;
                            }
                        }
                        _ = tokio::signal::ctrl_c() => {
                            ctx.engine.shutdown(Duration::ZERO).await;
                            break;
                        }
                    }
                }
            }
        }
    }
    ctx.store.flush().await;
    Ok(app.interrupted)
}

/// A line on stderr, if there still is one.
fn say(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Starts the effects; each answers on `ctx.tx` when it has something to say.
pub fn execute(ctx: &Ctx, effects: Vec<Effect>) {
    for e in effects {
        let ctx = ctx.clone();
        match e {
            Effect::Quit => {}
            Effect::LoadBlueprints => {
                tokio::spawn(async move {
                    let dir = ctx.dir.clone();
                    let max = ctx.engine.config().limits.max_blueprint_bytes;
                    let r = tokio::task::spawn_blocking(move || load_blueprints(&dir, max))
                        .await
                        .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx.tx.send(Bg::Blueprints(r)).await;
                });
            }
            Effect::QueryHistory { generation, filter } => {
                tokio::spawn(async move {
                    // Read our own writes: every event the console has seen is committed first,
                    // so a run announced finished is never read back as `running`.
                    ctx.store.flush().await;
                    let store = ctx.store.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        let rows = store.list_runs(&filter).map_err(|e| e.to_string())?;
                        let total = store.count_runs(&filter).ok();
                        Ok((rows, total))
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx
                        .tx
                        .send(Bg::History {
                            generation,
                            result: r,
                        })
                        .await;
                });
            }
            Effect::LoadDetail { generation, run_id } => {
                tokio::spawn(async move {
                    ctx.store.flush().await;
                    let store = ctx.store.clone();
                    let r = tokio::task::spawn_blocking(move || load_detail(&store, &run_id))
                        .await
                        .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx
                        .tx
                        .send(Bg::Detail {
                            generation,
                            result: r,
                        })
                        .await;
                });
            }
            Effect::Start { blueprint, request } => {
                tokio::spawn(async move {
                    let what = if request.sandbox {
                        format!("sandbox test of {}", blueprint.name)
                    } else {
                        blueprint.name.clone()
                    };
                    let msg = match ctx.engine.start(blueprint, *request) {
                        Ok(h) => Bg::Started {
                            run_id: h.run_id.clone(),
                            what,
                        },
                        Err(e) => Bg::Failed(format!("{what} did not start: {e}")),
                    };
                    let _ = ctx.tx.send(msg).await;
                });
            }
            Effect::Export {
                blueprint,
                target,
                out,
            } => {
                tokio::spawn(async move {
                    let shown = out.display().to_string();
                    let name = blueprint.name.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        crate::export::export(&blueprint, target, &out, false)
                    })
                    .await;
                    let msg = match r {
                        Ok(Ok(files)) => Bg::Notice(format!(
                            "exported {name} as {} to {shown} ({} files)",
                            target.as_str(),
                            files.len()
                        )),
                        Ok(Err(e)) => Bg::Failed(format!("export of {name} failed: {e}")),
                        Err(e) => Bg::Failed(format!("export of {name} failed: {e}")),
                    };
                    let _ = ctx.tx.send(msg).await;
                });
            }
            Effect::Retry {
                run_id,
                only_failed,
            } => {
                tokio::spawn(async move {
                    let store = ctx.store.clone();
                    let id = run_id.clone();
                    let plan = tokio::task::spawn_blocking(move || {
                        crate::engine::retry_plan(&store, &id, only_failed)
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let msg = match plan {
                        Ok((bp, req)) => {
                            let reused = req.reuse.len();
                            let what = if only_failed {
                                format!(
                                    "retry of {}'s failed steps ({reused} outputs reused)",
                                    bp.name
                                )
                            } else {
                                format!("retry of {}", bp.name)
                            };
                            match ctx.engine.start(bp, req) {
                                Ok(h) => Bg::Started {
                                    run_id: h.run_id.clone(),
                                    what,
                                },
                                Err(e) => Bg::Failed(format!("{what} did not start: {e}")),
                            }
                        }
                        Err(e) => Bg::Failed(e),
                    };
                    let _ = ctx.tx.send(msg).await;
                });
            }
            Effect::Cancel { run_id } => {
                if ctx.engine.cancel(&run_id) {
                } else if ctx.store.postgres().is_some() {
                    tokio::spawn(ask_driver(ctx, run_id, Request::Cancel));
                } else {
                    let _ = ctx.tx.try_send(Bg::Failed(format!(
                        "run {} is not active in this console any more",
                        super::app::short(&run_id)
                    )));
                }
            }
            Effect::SetPriority { run_id, priority } => {
                if ctx.engine.set_priority(&run_id, priority) {
                } else if ctx.store.postgres().is_some() {
                    tokio::spawn(ask_driver(ctx, run_id, Request::Priority(priority)));
                } else {
                    let _ = ctx.tx.try_send(Bg::Failed(format!(
                        "run {} is not active in this console any more",
                        super::app::short(&run_id)
                    )));
                }
            }
            Effect::ReloadRuns(ids) => {
                tokio::spawn(async move {
                    let store = ctx.store.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        store.runs_by_id(ids).map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx.tx.send(Bg::RunsReloaded(r)).await;
                });
            }
            Effect::LoadFleet => {
                tokio::spawn(async move {
                    let (store, queue) = (ctx.store.clone(), ctx.engine.fleet_queue());
                    let r = tokio::task::spawn_blocking(move || {
                        // One source per figure: the depth is the shared queue's own count.
                        let depth = match queue {
                            Some(q) => q.depth().map_err(|e| e.to_string())?,
                            None => return Err("this process is not in a fleet".to_string()),
                        };
                        let running = store.running_attempts().map_err(|e| e.to_string())?;
                        Ok((depth, running))
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx.tx.send(Bg::Fleet(r)).await;
                });
            }
            Effect::SetPaused(p) => {
                if p {
                    ctx.engine.pool().pause();
                } else {
                    ctx.engine.pool().resume();
                }
            }
            Effect::FindRunLogs { run_id, mark } => {
                tokio::spawn(async move {
                    let dir = ctx.engine.config().log_dir.clone();
                    let id = run_id.clone();
                    let r = tokio::task::spawn_blocking(move || run_lines(&dir, &id))
                        .await
                        .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx
                        .tx
                        .send(Bg::RunLogs {
                            run_id,
                            mark,
                            result: r,
                        })
                        .await;
                });
            }
            Effect::ReadFile(path) => {
                tokio::spawn(async move {
                    let p = path.clone();
                    // The editor opens blueprints: one too large to load is not read whole either.
                    let max = ctx.engine.config().limits.max_blueprint_bytes;
                    let r = tokio::task::spawn_blocking(move || {
                        blueprint::read_text(&p, max).map_err(|e| match e {
                            LoadError::Io { source, .. } => {
                                format!("cannot read {}: {source}", p.display())
                            }
                            e => e.to_string(),
                        })
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx.tx.send(Bg::EditorText { path, result: r }).await;
                });
            }
            Effect::SaveFile { path, text } => {
                tokio::spawn(async move {
                    let p = path.clone();
                    let r = tokio::task::spawn_blocking(move || save_with_backup(&p, &text))
                        .await
                        .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                    let _ = ctx.tx.send(Bg::Saved { path, result: r }).await;
                });
            }
        }
    }
}

/// Asks the process driving another process's run to cancel it or change its priority
/// (through the shared database), and says how that went.
async fn ask_driver(ctx: Ctx, run_id: String, request: Request) {
    let store = ctx.store.clone();
    let id = run_id.clone();
    let r = tokio::task::spawn_blocking(move || store.request(&id, request))
        .await
        .map_err(|e| format!("internal error: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    let short = super::app::short(&run_id);
    let what = match request {
        Request::Cancel => "cancel".to_string(),
        Request::Priority(p) => format!("priority {}", p.as_str()),
    };
    let msg = match r {
        Ok(Requested::Sent { owner: Some(owner) }) => Bg::Notice(format!(
            "asked {} (pid {}) for {what} of run {short}: it acts within a second",
            super::app::host_of(&owner),
            super::app::pid_of(&owner)
        )),
        Ok(Requested::Sent { owner: None }) => Bg::Notice(format!(
            "{what} of run {short} recorded; no process drives it now: the one that takes it over acts on it"
        )),
        Ok(Requested::NotActive) => Bg::Failed(format!(
            "run {short} is not queued or running any more: nothing to {what}"
        )),
        Ok(Requested::NotShared) => Bg::Failed(format!(
            "run {short} is not active in this console any more"
        )),
        Err(e) => Bg::Failed(format!("could not ask for {what} of run {short}: {e}")),
    };
    let _ = ctx.tx.send(msg).await;
}

/// Passes the fleet's announcements of changed runs, heard on the engine's `LISTEN`
/// connection, to the UI; on a thread of its own, which waits when the UI is behind (the
/// listening thread never does: it also wakes the fleet's claims and results).
fn forward_fleet_events(
    heard: std::sync::mpsc::Receiver<crate::store::pg::events::Live>,
    tx: mpsc::Sender<Bg>,
    stop: Arc<AtomicBool>,
) {
    let spawned = std::thread::Builder::new()
        .name("console-fleet-events".into())
        .spawn(move || loop {
            match heard.recv_timeout(Duration::from_millis(200)) {
                Ok(live) => {
                    if tx.blocking_send(Bg::Live(live)).is_err() {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if stop.load(Ordering::Relaxed) || tx.is_closed() {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot follow the fleet: {e}; other processes' runs show on the clock");
    }
}

/// Listens to the fleet's announcements of changed runs on a thread of its own (the
/// blocking client runs its own runtime); this process's own are skipped (the event bus
/// has them).
fn spawn_fleet_listener(
    target: crate::store::pg::PgTarget,
    tx: mpsc::Sender<Bg>,
    stop: Arc<AtomicBool>,
) {
    let spawned = std::thread::Builder::new()
        .name("console-fleet-listen".into())
        .spawn(move || {
            let me = crate::store::process_id();
            crate::store::pg::events::follow(
                &target,
                me,
                &|| stop.load(Ordering::Relaxed) || tx.is_closed(),
                // Waits when the UI is behind: the server keeps the notifications meanwhile,
                // and the UI takes a backlog in one frame.
                &mut |live| {
                    let _ = tx.blocking_send(Bg::Live(live));
                },
            );
        });
    if let Err(e) = spawned {
        tracing::error!("cannot listen to the fleet: {e}; other processes' runs show on the clock");
    }
}

/// Every blueprint file of `dir`, valid or not (one larger than `max_bytes`,
/// `MAX_BLUEPRINT_BYTES`, is listed with that problem, unparsed).
pub fn load_blueprints(dir: &Path, max_bytes: usize) -> Result<Vec<BlueprintEntry>, String> {
    let files = blueprint::load_dir(dir, max_bytes).map_err(|e| {
        // The full path: a relative `blueprints` says nothing about where it was looked for.
        let full = std::env::current_dir()
            .map(|cwd| cwd.join(dir))
            .unwrap_or_else(|_| dir.to_path_buf());
        format!(
            "cannot read the blueprints directory {}: {e} — start omniflow where blueprints/ is, or pass --dir",
            full.display()
        )
    })?;
    Ok(files
        .into_iter()
        .map(|(file, loaded)| {
            let stem = file
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            match loaded {
                Ok(bp) => BlueprintEntry {
                    name: bp.name.clone(),
                    file,
                    blueprint: Some(Arc::new(bp)),
                    problems: Vec::new(),
                },
                Err(LoadError::Invalid { problems, .. }) => BlueprintEntry {
                    name: stem,
                    file,
                    blueprint: None,
                    problems: problems.iter().map(ToString::to_string).collect(),
                },
                Err(e) => BlueprintEntry {
                    name: stem,
                    file,
                    blueprint: None,
                    problems: vec![e.to_string()],
                },
            }
        })
        .collect())
}

fn load_detail(store: &Store, run_id: &str) -> Result<Box<RunDetail>, String> {
    let run = store.find_run(run_id).map_err(|e| e.to_string())?;
    let steps = store.run_steps(&run.id).map_err(|e| e.to_string())?;
    let attempts = store.run_attempts(&run.id).map_err(|e| e.to_string())?;
    Ok(Box::new(RunDetail {
        run,
        steps,
        attempts,
    }))
}

/// Writes `text` to `path` through a temporary file and a rename, after copying the current
/// file to `path.bak`. Returns the backup's path, or `None` when the file already holds
/// exactly `text` (then nothing is written, and no backup made).
pub fn save_with_backup(path: &Path, text: &str) -> Result<Option<String>, String> {
    if std::fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(None);
    }
    let mut bak = path.as_os_str().to_owned();
    bak.push(".bak");
    let bak = PathBuf::from(bak);
    if path.exists() {
        std::fs::copy(path, &bak).map_err(|e| {
            format!(
                "cannot back up {} to {}: {e}",
                path.display(),
                bak.display()
            )
        })?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    Ok(Some(bak.display().to_string()))
}

/// Samples process memory and the pool a few times a second for the panes.
fn spawn_sampler(ctx: Ctx, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let lease = {
            let c = ctx.engine.config();
            c.scaled(c.lease_timeout)
        };
        let mut n: u64 = 0;
        let mut log_failure_told = false;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            // Logs that stop being written after start (a full disk, LOG_DIR removed): said
            // once, since the log pane cannot show what was never written.
            if !log_failure_told {
                if let Some(p) = crate::logging::write_problem() {
                    log_failure_told = ctx.tx.send(Bg::LogWriteFailed(p)).await.is_ok();
                }
            }
            // Every 2 s: the processes on the database (a SQLite read, off the async workers).
            if n % 8 == 0 {
                let store = ctx.store.clone();
                let tx = ctx.tx.clone();
                tokio::spawn(async move {
                    let r = tokio::task::spawn_blocking(move || store.processes(lease))
                        .await
                        .map_err(|e| format!("internal error: {e}"))
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let _ = tx.try_send(Bg::Processes(r));
                });
            }
            n += 1;
            let rss = memory_stats::memory_stats().map(|m| m.physical_mem as u64);
            let pool = ctx.engine.pool();
            // The memory hold itself is the engine's (`Engine::start_maintenance`).
            // A gauge: when the UI is behind, this sample is simply skipped.
            let _ = ctx.tx.try_send(Bg::Sample {
                rss,
                stats: pool.stats(),
                workers: pool.workers(),
            });
        }
    });
}

/// Most bytes of log files read to find one run's lines (newest files first).
const RUN_LOG_SCAN: u64 = 256 << 20;
/// Most lines of one run kept from the files.
const RUN_LOG_LINES: usize = 20_000;

/// Every line about `run_id` in the log files of `dir`, oldest first. Reads whole files,
/// newest first, until [`RUN_LOG_SCAN`] bytes; lines are matched on the id's text before
/// they are parsed, so the cost is one pass over the bytes.
pub fn run_lines(dir: &Path, run_id: &str) -> Result<Vec<LogEntry>, String> {
    use std::io::BufRead;
    let mut files = crate::logging::log_files(dir);
    files.reverse();
    let mut read = 0u64;
    let mut per_file: Vec<Vec<LogEntry>> = Vec::new();
    for f in files {
        if read >= RUN_LOG_SCAN {
            break;
        }
        let file =
            std::fs::File::open(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        read += file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut found = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            if line.contains(run_id) {
                let e = LogEntry::from_line(&line);
                if e.run_id.as_deref() == Some(run_id) {
                    found.push(e);
                }
            }
        }
        per_file.push(found);
    }
    let mut out: Vec<LogEntry> = per_file.into_iter().rev().flatten().collect();
    if out.len() > RUN_LOG_LINES {
        out.drain(..out.len() - RUN_LOG_LINES);
    }
    Ok(out)
}

/// How much of the newest log file is shown at start.
const LOG_BACKLOG: u64 = 64 * 1024;

/// Follows the newest file in `dir` on a thread of its own (plain file IO).
fn spawn_log_tailer(dir: PathBuf, tx: mpsc::Sender<Bg>, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("omniflow-log-tail".into())
        .spawn(move || {
            let mut tail = Tail::default();
            let mut last_problem: Option<String> = None;
            while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
                match tail.poll(&dir) {
                    Ok(lines) => {
                        if last_problem.take().is_some() {
                            let _ = tx.blocking_send(Bg::LogProblem(None));
                        }
                        if !lines.is_empty() && tx.blocking_send(Bg::Logs(lines)).is_err() {
                            break;
                        }
                    }
                    Err(p) => {
                        if last_problem.as_ref() != Some(&p) {
                            last_problem = Some(p.clone());
                            let _ = tx.blocking_send(Bg::LogProblem(Some(p)));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the log tailer: {e}");
    }
}

/// The state of following one log directory.
#[derive(Default)]
pub struct Tail {
    file: Option<PathBuf>,
    pos: u64,
    partial: String,
}

impl Tail {
    /// New complete lines since the last call (switching to a newer file when one appears).
    pub fn poll(&mut self, dir: &Path) -> Result<Vec<LogEntry>, String> {
        if !dir.is_dir() {
            return Err(format!(
                "LOG_DIR {} does not exist or is not a directory: no logs to show",
                dir.display()
            ));
        }
        let Some(newest) = crate::logging::log_files(dir).pop() else {
            return Ok(Vec::new());
        };
        let mut f = std::fs::File::open(&newest)
            .map_err(|e| format!("cannot read {}: {e}", newest.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut skip_first = false;
        if self.file.as_ref() != Some(&newest) {
            // The first file shows its end; a newer day's file is read from its start.
            self.pos = if self.file.is_none() && len > LOG_BACKLOG {
                skip_first = true;
                len - LOG_BACKLOG
            } else {
                0
            };
            self.file = Some(newest.clone());
            self.partial.clear();
        }
        if len < self.pos {
            self.pos = 0; // truncated
            self.partial.clear();
        }
        if len == self.pos {
            return Ok(Vec::new());
        }
        f.seek(SeekFrom::Start(self.pos))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity((len - self.pos).min(1 << 20) as usize);
        f.take(4 << 20)
            .read_to_end(&mut buf)
            .map_err(|e| e.to_string())?;
        self.pos += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut out = Vec::new();
        let text = std::mem::take(&mut self.partial);
        let mut parts: Vec<&str> = text.split('\n').collect();
        let rest = parts.pop().unwrap_or("");
        self.partial = rest.to_string();
        for (i, l) in parts.into_iter().enumerate() {
            if (i == 0 && skip_first) || l.trim().is_empty() {
                continue;
            }
            out.push(LogEntry::from_line(l));
        }
        Ok(out)
    }
}
