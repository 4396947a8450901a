//! `omniflow daemon`: headless, for systemd or Docker. Loads the active blueprints (from
//! `--dir`, and from Supabase when configured), fires their schedules through the pool, logs to
//! `LOG_DIR` and stderr. Adopts runs whose process died. SIGTERM, SIGINT or SIGHUP: stop
//! firing, give steps in flight `SHUTDOWN_GRACE` to finish, hand the rest over, exit 0 (a
//! daemon stopped on request did its job); a second signal exits at once (3: interrupted).
//! With `--listen` (or `OMNIFLOW_LISTEN`) it serves `/metrics`, `/healthz` and `/readyz` from
//! before the first run until it stops.

use super::commands::{load_config, open_store, runtime};
use super::{DaemonArgs, Failure};
use crate::blueprint::Blueprint;
use crate::engine::{Engine, RunRequest};
use crate::events::EventBus;
use crate::logging;
use crate::schedule::{self, Scheduler, SystemClock};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// Longest sleep between two looks at the clock.
const NAP: Duration = Duration::from_secs(30);

pub fn daemon(args: DaemonArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let store = open_store(&config)?;
    let _log = logging::init(
        &config.log_dir,
        config.secrets(),
        "info",
        Some(tracing::Level::INFO),
    )
    .map_err(|e| Failure::input(e.to_string()))?;
    let rt = runtime()?;
    let (blueprints, bad) =
        super::commands::gather_blueprints(&args.dir, args.source, &config, &rt, false)?;
    for b in &bad {
        tracing::warn!(problem = %b, "daemon: blueprint skipped");
    }
    let sandbox = args.sandbox;
    let simulate_failures = args.simulate_failures.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&simulate_failures) {
        return Err(Failure::input(format!(
            "--simulate-failures {simulate_failures}: expected a fraction between 0 and 1 (0.3 = 30 %)"
        )));
    }
    let listen = args.listen.or(config.listen);
    let metrics_token = config.metrics_token.clone();
    let missed = config.schedule_missed;
    let code = rt.block_on(async move {
        // Listen before anything else: a SIGTERM during start-up must stop us gracefully,
        // not kill us with the default action.
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "daemon: cannot listen for signals");
                return ExitCode::from(1);
            }
        };
        let engine = Engine::new(Arc::new(config), store.clone(), EventBus::new());
        engine.set_role(crate::engine::Role::Daemon);
        // Before anything runs, so every run is counted.
        let metrics = match listen {
            Some(listen) => {
                let opts = crate::metrics::Options {
                    listen,
                    token: metrics_token,
                    sandbox,
                };
                match crate::metrics::serve(&engine, opts).await {
                    Ok(m) => Some(m),
                    Err(e) => {
                        tracing::error!(error = %e, "daemon: cannot serve metrics");
                        return ExitCode::from(2);
                    }
                }
            }
            None => None,
        };
        // Heartbeats, the memory hold, and adopting runs whose process died.
        let maintenance = engine.start_maintenance(true);
        let log_watch = tokio::spawn(watch_log_writes());
        let bps: Vec<Arc<Blueprint>> = blueprints.into_iter().map(Arc::new).collect();
        let (sched, problems) = Scheduler::new(&bps, store, missed, SystemTime::now());
        for p in &problems {
            tracing::warn!(problem = %p, "daemon: schedule not used");
        }
        let names = sched.scheduled().join(", ");
        if names.is_empty() {
            tracing::warn!(blueprints = bps.len(), "daemon: no active blueprint has a usable schedule; idle until stopped (add \"schedule\": \"17 */6 * * *\" to one)");
        } else {
            for (name, next) in sched.next_fire_times(SystemTime::now()) {
                tracing::info!(blueprint = %name, next = %next.map(crate::store::iso8601).unwrap_or_default(), "daemon: scheduled");
            }
        }
        tracing::info!(scheduled = %names, sandbox, pid = std::process::id(), "daemon started");
        let stop = CancellationToken::new();
        let base = RunRequest {
            sandbox,
            simulate_failures,
            ..Default::default()
        };
        let runner = schedule::spawn(
            engine.clone(),
            sched,
            Arc::new(SystemClock),
            stop.clone(),
            NAP,
            base,
        );
        signals.recv().await;
        let in_flight = engine.active_runs().len();
        let grace = engine.config().shutdown_grace;
        tracing::info!(in_flight, grace_s = grace.as_secs(), "daemon: stopping; no new slots fire, steps in flight get the grace period, the rest is handed over (signal again to quit at once)");
        stop.cancel();
        tokio::spawn(async move {
            signals.recv().await;
            tracing::warn!("daemon: second signal; quitting at once");
            std::process::exit(i32::from(super::commands::EXIT_INTERRUPTED));
        });
        let handed_over = engine.shutdown(grace).await;
        if !handed_over.is_empty() {
            tracing::info!(runs = handed_over.len(), "daemon: unfinished runs handed over; the next daemon, console or `omniflow resume --all` continues them");
        }
        let started = runner.await.unwrap_or(0);
        log_watch.abort();
        maintenance.stop().await;
        // Serving until here: probes see "not ready" (draining) while runs hand over.
        if let Some(m) = metrics {
            m.stop().await;
        }
        engine.store().flush().await;
        if let Some(e) = engine.store().take_write_error() {
            tracing::error!(error = %e, "daemon: the history database reported an error");
        }
        tracing::info!(runs_started = started, "daemon stopped");
        ExitCode::SUCCESS
    });
    Ok(code)
}

/// Says once on stderr (where systemd and Docker collect it) when the log files stop being
/// written after start: a full disk or a removed `LOG_DIR` would otherwise lose every line
/// without a word. `/readyz` shows it too (`checks.logs`).
async fn watch_log_writes() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(p) = logging::write_problem() {
            tracing::error!("daemon: {p}");
            return;
        }
    }
}

/// SIGTERM (systemd, `docker stop`), SIGINT (Ctrl-C) and SIGHUP (the terminal of a daemon
/// started by hand went away): each stops the daemon gracefully.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
                _ = self.hup.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
