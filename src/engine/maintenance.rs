//! What keeps a process a good neighbour of the others on one database:
//! - a heartbeat every third of `LEASE_TIMEOUT` (10 s by default): the health check (pool state,
//!   memory) and the proof that this process's run leases are alive;
//! - the memory hold: above `MEMORY_THRESHOLD_MB` the pool takes no new work until memory
//!   falls (checked every second, logged when it changes);
//! - adoption (console and daemon only, every second): runs orphaned by a dead process are
//!   claimed and resumed;
//! - graceful shutdown: stop taking work, let steps in flight finish within a grace period,
//!   hand the rest over.

use super::Engine;
use crate::store::Health;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// The background loop of [`Engine::start_maintenance`]; stops when dropped or stopped.
pub struct Maintenance {
    stop: CancellationToken,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl Maintenance {
    /// Stops the loop and waits for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How often a process proves its leases alive: three times a lease, so one late or lost
/// heartbeat does not let another process take its runs over.
fn heartbeat_every(config: &crate::config::Config) -> Duration {
    config.scaled(config.lease_timeout / 3)
}

/// When the maintenance loop, turning every second, next proves the leases alive: once a
/// period, not at every turn (a fleet's processes would write ten times as often).
struct Beat {
    last: Instant,
    every: Duration,
}

impl Beat {
    fn new(now: Instant, every: Duration) -> Beat {
        Beat { last: now, every }
    }

    /// Whether a heartbeat is due at `now`; if so, the period starts again from `now`.
    fn due(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last) >= self.every {
            self.last = now;
            return true;
        }
        false
    }
}

/// Process RSS in MB, if the platform tells.
pub fn rss_mb() -> Option<f64> {
    memory_stats::memory_stats().map(|m| m.physical_mem as f64 / 1_048_576.0)
}

/// What a process running an engine is, as `runner_processes.role` and the metrics' `role`
/// label show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Embedded through the library, with no role named.
    Api,
    /// `omniflow run` of one blueprint.
    Run,
    /// `omniflow run --all-active`.
    AllActive,
    /// `omniflow resume`.
    Resume,
    /// `omniflow daemon`.
    Daemon,
    /// The console.
    Console,
}

impl Role {
    const ALL: [Role; 6] = [
        Role::Api,
        Role::Run,
        Role::AllActive,
        Role::Resume,
        Role::Daemon,
        Role::Console,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Run => "run",
            Role::AllActive => "all-active",
            Role::Resume => "resume",
            Role::Daemon => "daemon",
            Role::Console => "console",
        }
    }

    fn from_u8(v: u8) -> Role {
        Role::ALL
            .into_iter()
            .find(|r| *r as u8 == v)
            .unwrap_or(Role::Api)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Engine {
    /// Records a heartbeat now (also done once when the engine is created).
    pub fn heartbeat(&self) {
        self.inner.store.heartbeat(Health {
            role: self.role().as_str().to_string(),
            at: SystemTime::now(),
            rss_mb: rss_mb(),
            pool: self.inner.pool.stats(),
        });
    }

    /// The role named by [`Engine::set_role`].
    pub fn role(&self) -> Role {
        Role::from_u8(self.inner.role.load(Ordering::Relaxed))
    }

    /// When the maintenance loop last turned (`None` before its first turn, or when it was
    /// never started): the liveness signal of `/healthz`.
    pub fn last_loop_turn(&self) -> Option<SystemTime> {
        match self.inner.loop_tick_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// True once [`Engine::shutdown`] began: no new run starts.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Names this process's role in `runner_processes` and the metrics' `role` label.
    pub fn set_role(&self, role: Role) {
        self.inner.role.store(role as u8, Ordering::Relaxed);
        self.heartbeat();
    }

    /// Starts heartbeats and the memory hold; with `adopt`, also claims and resumes runs
    /// whose process died. Every process that runs blueprints needs this, or its runs look
    /// orphaned to the others after `LEASE_TIMEOUT`.
    pub fn start_maintenance(&self, adopt: bool) -> Maintenance {
        let stop = CancellationToken::new();
        let engine = self.clone();
        let token = stop.clone();
        // The first reading is taken before this returns: a process that starts above the
        // threshold holds its pool before a schedule or an adopted run can submit work.
        let mut held = self.check_memory(false);
        // That reading is the loop's first turn, as far as liveness goes.
        let started_ms = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        self.inner.loop_tick_ms.store(started_ms, Ordering::Relaxed);
        let join = tokio::spawn(async move {
            let config = engine.inner.config.clone();
            let beat_every = heartbeat_every(&config);
            let mut tick = tokio::time::interval(config.scaled(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut beat = Beat::new(Instant::now(), beat_every);
            let mut full = None;
            if adopt {
                engine.adopt_orphans().await;
            }
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let now_ms = SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_millis() as u64);
                engine.inner.loop_tick_ms.store(now_ms, Ordering::Relaxed);
                held = engine.check_memory(held);
                full = engine.check_disk(full);
                if beat.due(Instant::now()) {
                    engine.heartbeat();
                    engine.let_go_of_lost_runs().await;
                }
                // Every tick, not every heartbeat: a run whose process was killed on this
                // host is orphaned at once (its pid is gone), and is taken over within a
                // second.
                if adopt {
                    engine.adopt_orphans().await;
                }
            }
        });
        Maintenance {
            stop,
            join: Some(join),
        }
    }

    /// Holds the pool while RSS is above the threshold. Returns the new state.
    fn check_memory(&self, was_held: bool) -> bool {
        let threshold = self.inner.config.memory_threshold_mb as f64;
        let Some(rss) = rss_mb() else {
            return false;
        };
        let hold = rss > threshold;
        if hold != was_held {
            self.inner.pool.set_memory_hold(hold);
            if hold {
                tracing::warn!(
                    rss_mb = rss,
                    threshold_mb = threshold,
                    "memory above MEMORY_THRESHOLD_MB: the pool takes no new work until it falls"
                );
            } else {
                tracing::info!(
                    rss_mb = rss,
                    threshold_mb = threshold,
                    "memory back under MEMORY_THRESHOLD_MB: the pool takes work again"
                );
            }
        }
        hold
    }

    /// Holds the pool while the store cannot save (disk full). Returns the new state.
    fn check_disk(&self, was: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
        let now = self.inner.store.disk_full();
        if now != was {
            self.inner
                .pool
                .set_store_hold(now.as_ref().map(|d| d.display().to_string()));
            match &now {
                Some(dir) => tracing::warn!(
                    dir = %dir.display(),
                    "disk full: free space at {}; the pool takes no new work until the history can be saved",
                    dir.display()
                ),
                None => tracing::info!("the history database has room again: the pool takes work"),
            }
        }
        now
    }

    /// Stops driving the runs another process has taken over: this one missed its lease (it
    /// was paused, or its heartbeats did not reach the database), and the new owner drives
    /// them from the history now. Nothing more about them is recorded here.
    async fn let_go_of_lost_runs(&self) {
        let ids = self.active_runs();
        if ids.is_empty() {
            return;
        }
        let store = self.inner.store.clone();
        let lost = match tokio::task::spawn_blocking(move || store.runs_taken_over(ids)).await {
            Ok(Ok(lost)) => lost,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not check that this process still owns its runs");
                return;
            }
            Err(_) => return,
        };
        for (id, owner) in lost {
            let found = {
                let runs = self.lock_runs();
                runs.get(&id).map(|r| {
                    r.released.store(true, Ordering::Relaxed);
                    r.abort.cancel();
                })
            };
            if found.is_some() {
                self.inner.pool.remove_run(&id);
                tracing::warn!(run_id = %id, owner = %owner, "another process took this run over (this one missed its lease); stopping it here, the new owner continues it");
            }
        }
    }

    /// Claims and resumes every run whose owner is gone.
    async fn adopt_orphans(&self) {
        let store = self.inner.store.clone();
        let lease = self.inner.config.scaled(self.inner.config.lease_timeout);
        let orphans = match tokio::task::spawn_blocking(move || store.orphaned_runs(lease)).await {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not look for interrupted runs");
                return;
            }
            Err(_) => return,
        };
        for id in orphans {
            if self.active_runs().contains(&id) {
                continue;
            }
            match self.resume(&id).await {
                Ok(handle) => {
                    tracing::info!(run_id = %id, "resumed a run whose process had stopped");
                    tokio::spawn(handle.wait());
                }
                Err(e) => tracing::info!(run_id = %id, reason = %e, "not resuming"),
            }
        }
    }

    /// Graceful shutdown: no new runs, no new attempts; steps in flight get `grace` to finish;
    /// then every unfinished run is handed over (left unfinished in the store, owner cleared)
    /// for the next console, daemon or `omniflow resume` to continue. Returns the ids handed
    /// over.
    pub async fn shutdown(&self, grace: Duration) -> Vec<String> {
        /// Marks the shutdown over however it ends (done, or its task dropped with the
        /// runtime), so a wait for it cannot outlive it.
        struct Over<'a>(&'a tokio::sync::watch::Sender<ShutdownPhase>);
        impl Drop for Over<'_> {
            fn drop(&mut self) {
                self.0.send_replace(ShutdownPhase::Over);
            }
        }
        self.inner.shutdown.send_replace(ShutdownPhase::UnderWay);
        let _over = Over(&self.inner.shutdown);
        self.inner.draining.store(true, Ordering::Relaxed);
        self.inner.pool.pause();
        // A grace too long for the clock (`SHUTDOWN_GRACE=99999999999`) has no limit.
        let deadline = tokio::time::Instant::now().checked_add(grace);
        // The attempts in flight, and what their runs' drivers do with their results
        // (recording them, finishing a run whose last step this was), end within the grace
        // or are handed over with their runs below.
        if !self.inner.in_flight.wait_until(deadline).await {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutdown: the grace period ended with attempts still in flight"
            );
        }
        // Steps this process ran for the fleet: results written, the rest given back.
        if let Some(f) = &self.inner.fleet {
            f.0.finish().await;
        }
        let released: Vec<String> = {
            let runs = self.lock_runs();
            for r in runs.values() {
                r.released.store(true, Ordering::Relaxed);
            }
            // Queued before the drivers stop, so whoever waits on a run and then flushes
            // the store finds it handed over.
            self.inner.store.release_runs();
            self.inner.store.process_stopped();
            for r in runs.values() {
                r.abort.cancel();
            }
            runs.keys().cloned().collect()
        };
        for id in &released {
            self.inner.pool.remove_run(id);
        }
        // Wait for the drivers to see the handover.
        self.inner
            .drivers
            .wait_until(Some(tokio::time::Instant::now() + Duration::from_secs(5)))
            .await;
        self.inner.store.flush().await;
        if !released.is_empty() {
            tracing::info!(
                runs = released.len(),
                "shutdown: handed unfinished runs over"
            );
        }
        released
    }

    /// Marks this process stopped in the store (a clean exit with nothing running). After a
    /// signal, first waits for the [`Engine::shutdown`] it started to end: the handover it
    /// records and logs would otherwise be cut short by the exit.
    pub async fn stopped(&self) {
        let mut phase = self.inner.shutdown.subscribe();
        // The sender lives in the engine, so the wait ends only with the phase.
        let _ = phase.wait_for(|p| *p != ShutdownPhase::UnderWay).await;
        // After `shutdown` (which records the stop itself) there is nothing to add: a second
        // record would only be refused with a warning.
        if !self.inner.draining.load(Ordering::Relaxed) {
            if let Some(f) = &self.inner.fleet {
                // No more claims; what this process runs for others goes back to the queue.
                self.inner.draining.store(true, Ordering::Relaxed);
                f.0.finish().await;
            }
            self.inner.store.process_stopped();
        }
        self.inner.store.flush().await;
    }
}

/// Where [`Engine::shutdown`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownPhase {
    NotAsked,
    UnderWay,
    Over,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Stopping the loop waits for it to end: once `stop` returns the loop holds no part of
    /// the engine, so a process that then flushes and closes its store has nothing of the
    /// loop left to write, even on a runtime that has not run the loop since.
    /// Three heartbeats fit in a lease, at the process's time scale too.
    #[test]
    fn a_lease_hears_three_heartbeats() {
        let config = |vars: &[(&str, &str)]| {
            let vars: std::collections::HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            crate::config::Config::from_vars(&vars).unwrap()
        };
        for (vars, every) in [
            (&[][..], Duration::from_secs(10)),
            (&[("LEASE_TIMEOUT", "9")][..], Duration::from_secs(3)),
            (
                &[("LEASE_TIMEOUT", "9"), ("OMNIFLOW_TIME_SCALE", "0.1")][..],
                Duration::from_millis(300),
            ),
        ] {
            assert_eq!(super::heartbeat_every(&config(vars)), every, "{vars:?}");
        }
    }

    /// Turning every second with a 10 s period, the loop beats at 10 s, then at 20 s: once a
    /// period, counted from the last beat.
    #[test]
    fn a_heartbeat_is_due_once_a_period() {
        let start = std::time::Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut beat = super::Beat::new(start, Duration::from_secs(10));
        let due: Vec<u64> = (1..=25).filter(|&s| beat.due(at(s))).collect();
        assert_eq!(due, [10, 20]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stopping_the_loop_waits_for_it_to_let_go_of_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _store, _) = crate::engine::testing::sqlite_engine(dir.path(), 2);
        let alone = std::sync::Arc::strong_count(&engine.inner);
        let maintenance = engine.start_maintenance(true);
        assert_eq!(
            std::sync::Arc::strong_count(&engine.inner),
            alone + 1,
            "the loop holds the engine"
        );
        maintenance.stop().await;
        assert_eq!(std::sync::Arc::strong_count(&engine.inner), alone);
    }
}
