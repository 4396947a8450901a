//! The console: a terminal UI that hosts the engine and its pool, shows live panes (blueprints,
//! queue and throughput, workers, memory, logs, history) and drives runs from the keyboard.
//!
//! Shape (after gitui and ratatui's templates):
//! - `state.rs` — what the panes show; `app.rs` — [`App`], the one `update` that turns a
//!   [`Msg`] (key, engine event, background result, tick) into state changes and [`Effect`]s;
//! - `ui/` — rendering, which only reads the `App`;
//! - `runtime.rs` — the `select!` loop, frame capping and coalescing, and the background work
//!   (SQLite reads, file IO, the log tailer, the memory sampler) that answers over a bounded
//!   channel; the UI loop itself never does I/O;
//! - `terminal.rs` — raw mode and the alternate screen, restored on every path;
//! - `theme.rs` — semantic colours from `themes/*.toml`.
//!
//! `app/keys.rs` holds what every key does; `app/forms.rs` the sandbox form and the editor.

// The console must never take the terminal down with it: no unwrap, expect or panic outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod app;
#[doc(hidden)]
pub mod fixtures;
pub mod runtime;
pub mod state;
pub mod terminal;
pub mod theme;
pub mod ui;

pub use app::{App, Bg, Effect, Msg};

use crate::config::Config;
use crate::engine::Engine;
use crate::events::EventBus;
use crate::store::Store;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use theme::Theme;

/// How the console was asked to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Theme name (a file in `themes/` without `.toml`, or a bundled one).
    pub theme: Option<String>,
    /// The blueprints directory.
    pub dir: PathBuf,
    /// Where theme files are looked up.
    pub themes_dir: PathBuf,
    /// Fire the active blueprints' schedules from this console (`--schedules`). Off by
    /// default: a console opened to look around starts no run nobody asked for.
    pub schedules: bool,
    /// The history already opened by the caller (a shared PostgreSQL database); `None`
    /// opens the SQLite file at `DB_FILE`.
    pub store: Option<Store>,
}

/// Every theme the theme key cycles through: the bundled ones, then other files in `dir`.
/// Broken files are skipped here (choosing one by name reports the problem).
pub fn available_themes(dir: &Path) -> Vec<Theme> {
    let mut names: Vec<String> = theme::BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut extra: Vec<String> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let p = e.path();
                (p.extension().and_then(|x| x.to_str()) == Some("toml"))
                    .then(|| p.file_stem().map(|s| s.to_string_lossy().to_string()))
                    .flatten()
            })
            .filter(|n| !names.contains(n))
            .collect();
        extra.sort();
        names.extend(extra);
    }
    names
        .iter()
        .filter_map(|n| match Theme::load(n, dir) {
            (t, None) => Some(t),
            _ => None,
        })
        .collect()
}

/// Why no model provider can answer a real run, or `None` when one is configured (the `auto`
/// chain: Ollama when `USE_OLLAMA`, Hugging Face with a token, an OpenAI-compatible server).
pub fn no_provider(config: &Config) -> Option<String> {
    let any =
        config.use_ollama || config.huggingface_token.is_some() || config.openai_base_url.is_some();
    (!any).then(|| {
        "set HUGGINGFACE_TOKEN in .env (a free read token from \
         https://huggingface.co/settings/tokens), or USE_OLLAMA=true with `ollama serve`, or \
         OPENAI_BASE_URL for an OpenAI-compatible server, then restart the console."
            .to_string()
    })
}

/// Opens the console and runs it until the user quits; `Ok(true)` when it was left with
/// Ctrl-C. Problems that leave the rest usable (logging, the database, the theme) are shown
/// inside the console, not returned.
pub fn run(config: Config, opts: Options) -> Result<bool, String> {
    let mut problems = Vec::new();
    let (theme, theme_problem) =
        Theme::load(opts.theme.as_deref().unwrap_or("dark"), &opts.themes_dir);
    problems.extend(theme_problem);
    let themes = available_themes(&opts.themes_dir);

    let log_guard = crate::logging::init(&config.log_dir, config.secrets(), "info", None);
    let log_problem = log_guard.as_ref().err().map(|e| e.to_string());
    problems.extend(log_problem.clone());

    let tmp = std::env::temp_dir().join(format!("omniflow-console-{}.db", std::process::id()));
    let (store, db_banner) = match opts
        .store
        .clone()
        .map_or_else(|| Store::open(&config.db_file), Ok)
    {
        Ok(s) => (s, None),
        Err(e) => {
            let banner = format!(
                "{e} — until then, runs go to a temporary database ({})",
                tmp.display()
            );
            match Store::open(&tmp) {
                Ok(s) => (s, Some(banner)),
                Err(e2) => return Err(format!("{e}; and no temporary database either: {e2}")),
            }
        }
    };
    problems.extend(db_banner.clone());
    let on_fallback = db_banner.is_some();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("omniflow-console")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    // Only with `--schedules` do the active blueprints' schedules fire in this console.
    let scheduled: Vec<Arc<crate::blueprint::Blueprint>> = if opts.schedules {
        crate::blueprint::load_dir(&opts.dir, config.limits.max_blueprint_bytes)
            .map(|v| {
                v.into_iter()
                    .filter_map(|(_, r)| r.ok())
                    .filter(|b| b.active)
                    .map(Arc::new)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let config = Arc::new(config);
    let result = rt.block_on(async {
        let bus = EventBus::new();
        let sub = bus.subscribe();
        let engine = Engine::new(config.clone(), store.clone(), bus);
        engine.set_role(crate::engine::Role::Console);
        // `--listen`: this process's /metrics, /healthz and /readyz while the console runs.
        let metrics = match config.listen {
            Some(listen) => {
                let opts = crate::metrics::Options {
                    listen,
                    token: config.metrics_token.clone(),
                    sandbox: false,
                };
                match crate::metrics::serve(&engine, opts).await {
                    Ok(m) => Some(m),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            }
            None => None,
        };
        // Heartbeats, the memory hold, and adopting runs whose process died.
        let maintenance = engine.start_maintenance(true);
        let (sched, sched_problems) = crate::schedule::Scheduler::new(
            &scheduled,
            store.clone(),
            config.schedule_missed,
            std::time::SystemTime::now(),
        );
        problems.extend(sched_problems.iter().map(|p| p.to_string()));
        let sched_stop = tokio_util::sync::CancellationToken::new();
        let scheduler = crate::schedule::spawn(
            engine.clone(),
            sched,
            Arc::new(crate::schedule::SystemClock),
            sched_stop.clone(),
            std::time::Duration::from_secs(30),
            crate::engine::RunRequest {
                trigger: crate::engine::Trigger::Schedule,
                ..Default::default()
            },
        );
        let host = engine.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(runtime::BG_CAP);
        let mut app = App::new(opts.dir.clone(), theme, themes, config.concurrency);
        app.limits = config.limits.clone();
        app.memory.threshold_mb = config.memory_threshold_mb;
        app.logs.problem = log_problem;
        app.history.banner = db_banner;
        app.db_path = store.place();
        app.schedules_here = opts.schedules;
        app.no_provider = no_provider(&config);
        if store.postgres().is_some() {
            app.fleet = Some(state::FleetState::default());
        }
        app.startup_problems = problems;
        let ctx = runtime::Ctx {
            engine,
            store: store.clone(),
            dir: opts.dir.clone(),
            tx,
            memory_threshold_mb: config.memory_threshold_mb,
        };
        let r = runtime::run(app, ctx, rx, sub, sched_stop).await;
        drop(scheduler);
        maintenance.stop().await;
        if let Some(m) = metrics {
            m.stop().await;
        }
        host.stopped().await;
        r
    });
    // Workers and timers still parked are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    if on_fallback {
        // The temporary database goes with the session, unless it holds runs worth keeping.
        let runs = store
            .count_runs(&crate::store::RunFilter::default())
            .unwrap_or(0);
        drop(store);
        if runs == 0 {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = tmp.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        } else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "omniflow: this session's {runs} run(s) are in the temporary database {}: \
                 `DB_FILE={} omniflow runs` reads them; delete it when done",
                tmp.display(),
                tmp.display()
            );
        }
    } else {
        drop(store);
    }
    drop(log_guard);
    result.map_err(|e| format!("terminal error: {e}"))
}
