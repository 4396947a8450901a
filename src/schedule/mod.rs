//! Schedules: while the console or `omniflow daemon` runs, each active blueprint with a
//! `schedule` fires at its cron slots.
//!
//! - **Time.** Cron in UTC, or in the blueprint's `timezone`: a fixed offset (`"+02:00"`,
//!   `"UTC-5"`) or an IANA zone (`"Europe/Berlin"`, from chrono-tz's built-in tz database)
//!   whose daylight saving it follows. A local time repeated when clocks go back fires once
//!   (its first occurrence); one skipped when they go forward fires once, right after the gap
//!   (see [`CronSchedule::next_after`]). Slots are instants, so the claims below never see a
//!   local time twice.
//! - **A slot fires once.** Before a slot runs, it is claimed in the store
//!   ([`Store::claim_slot`]: `INSERT OR IGNORE` in `BEGIN IMMEDIATE`); only the process whose
//!   insert landed starts the run, so two daemons (or a daemon and a console) on one database
//!   never run a slot twice.
//! - **Missed slots** (the scheduler was not running, or its tick came more than a minute
//!   late): `missedSlots: "skip"` (the default, like cron) lets them go; `"runOnce"` runs once
//!   for all of them, at start-up, starting from the last slot any process claimed. A blueprint
//!   that never fired before has nothing missed.
//! - **Injectable clock.** [`Scheduler::tick`] takes the time; [`spawn`] reads a [`Clock`];
//!   tests use a [`ManualClock`] and never wait for a real slot.

// Nothing a service or a schedule answers may take the process down.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod clock;
mod cron;

pub use crate::blueprint::{parse_timezone, Zone};
pub use clock::{Clock, ManualClock, SystemClock};
pub use cron::{next_fire_time, CronSchedule};

use crate::blueprint::{Blueprint, MissedSlots};
use crate::engine::{Engine, RunRequest};
use crate::store::Store;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// A slot fired later than this after its time counts as missed.
pub const GRACE: Duration = Duration::from_secs(60);

/// Look back at most this far for missed slots.
const CATCH_UP_WINDOW: Duration = Duration::from_secs(31 * 24 * 3600);

/// A slot this process claimed and must run.
#[derive(Debug, Clone)]
pub struct Fire {
    pub blueprint: Arc<Blueprint>,
    /// The slot's time.
    pub slot: SystemTime,
    /// Fired late, for missed slots (`runOnce`).
    pub caught_up: bool,
}

struct Entry {
    bp: Arc<Blueprint>,
    cron: CronSchedule,
    missed: MissedSlots,
    /// Slots after this time have not been considered yet.
    cursor: SystemTime,
}

/// The schedules of a set of blueprints.
pub struct Scheduler {
    entries: Vec<Entry>,
    store: Store,
}

impl Scheduler {
    /// Schedules every active blueprint that has a `schedule`. Returns the problems of those
    /// that cannot be scheduled (bad time zone, a cron that never fires), one line each; the
    /// others are scheduled anyway.
    pub fn new(
        blueprints: &[Arc<Blueprint>],
        store: Store,
        default_missed: MissedSlots,
        now: SystemTime,
    ) -> (Scheduler, Vec<String>) {
        let mut entries = Vec::new();
        let mut problems = Vec::new();
        for bp in blueprints.iter().filter(|b| b.active) {
            let cron = match CronSchedule::of(bp) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    problems.push(format!("{}: {e}", bp.name));
                    continue;
                }
            };
            if cron.next_after(now).is_none() {
                problems.push(format!(
                    "{}: schedule \"{}\" never fires (no such date in the next centuries); fix the day and month fields",
                    bp.name,
                    bp.schedule.as_deref().unwrap_or_default()
                ));
                continue;
            }
            let missed = bp.missed_slots.unwrap_or(default_missed);
            let cursor = match missed {
                MissedSlots::Skip => now,
                MissedSlots::RunOnce => match store.last_slot(&bp.name) {
                    Ok(Some(last)) if last < now => {
                        last.max(now.checked_sub(CATCH_UP_WINDOW).unwrap_or(last))
                    }
                    Ok(_) => now,
                    Err(e) => {
                        problems.push(format!(
                            "{}: cannot read its last slot ({e}); missed slots are skipped",
                            bp.name
                        ));
                        now
                    }
                },
            };
            entries.push(Entry {
                bp: bp.clone(),
                cron,
                missed,
                cursor,
            });
        }
        (Scheduler { entries, store }, problems)
    }

    /// Names of the scheduled blueprints.
    pub fn scheduled(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.bp.name.as_str()).collect()
    }

    /// Every slot due by `now` that this process claimed. Blocking (claims are SQLite
    /// transactions): call from `spawn_blocking` or a plain thread.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Fire> {
        let mut fires = Vec::new();
        for e in &mut self.entries {
            if now <= e.cursor {
                continue;
            }
            let mut latest = None;
            let mut passed = 0u32;
            let mut t = e.cursor;
            while let Some(slot) = e.cron.next_after(t) {
                if slot > now {
                    break;
                }
                latest = Some(slot);
                passed += 1;
                t = slot;
                if passed >= 100_000 {
                    break;
                }
            }
            e.cursor = now;
            let Some(slot) = latest else { continue };
            let late = now.duration_since(slot).unwrap_or_default() > GRACE;
            // Slots that did not fire on time; with `skip` they are let go, with `runOnce`
            // the one run below stands for them.
            let missed = if late { passed } else { passed - 1 };
            crate::telemetry::schedule_slots(&e.bp.name, "missed", missed.into());
            if e.missed == MissedSlots::Skip {
                crate::telemetry::schedule_slots(&e.bp.name, "skipped", missed.into());
            }
            if late && e.missed == MissedSlots::Skip {
                tracing::info!(blueprint = %e.bp.name, missed = passed, "schedule: missed slot(s) skipped (missedSlots: skip)");
                continue;
            }
            match self.store.claim_slot(&e.bp.name, slot) {
                Ok(true) => {
                    crate::telemetry::schedule_slots(&e.bp.name, "fired", 1);
                    if late || passed > 1 {
                        tracing::info!(blueprint = %e.bp.name, missed = passed, slot = %crate::store::iso8601(slot), "schedule: running once for missed slot(s)");
                    }
                    fires.push(Fire {
                        blueprint: e.bp.clone(),
                        slot,
                        caught_up: late,
                    });
                }
                Ok(false) => {
                    crate::telemetry::schedule_slots(&e.bp.name, "claimed_elsewhere", 1);
                    tracing::debug!(blueprint = %e.bp.name, slot = %crate::store::iso8601(slot), "schedule: slot already claimed by another process")
                }
                // Not firing is the safe side: firing without a claim could run it twice.
                Err(err) => {
                    crate::telemetry::schedule_slots(&e.bp.name, "claim_failed", 1);
                    tracing::error!(blueprint = %e.bp.name, error = %err, "schedule: cannot claim the slot; not fired")
                }
            }
        }
        fires
    }

    /// The earliest next slot of any schedule after `now`.
    pub fn next_due(&self, now: SystemTime) -> Option<SystemTime> {
        self.entries
            .iter()
            .filter_map(|e| e.cron.next_after(now.max(e.cursor)))
            .min()
    }

    /// Each scheduled blueprint's next fire time (for the console).
    pub fn next_fire_times(&self, now: SystemTime) -> Vec<(String, Option<SystemTime>)> {
        self.entries
            .iter()
            .map(|e| (e.bp.name.clone(), e.cron.next_after(now)))
            .collect()
    }
}

/// Runs a scheduler until `stop`: ticks at each due slot (re-reading the clock at least every
/// `nap`), starts each claimed slot's run on the engine (trigger `schedule`), and once
/// stopped, waits for the runs it started to finish. Returns how many runs it started.
///
/// `base` is the request each fired run starts with (e.g. `sandbox: true`); its trigger is
/// set to `schedule`.
pub fn spawn(
    engine: Engine,
    scheduler: Scheduler,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
    nap: Duration,
    base: RunRequest,
) -> tokio::task::JoinHandle<usize> {
    let scheduler = Arc::new(Mutex::new(scheduler));
    tokio::spawn(async move {
        let mut runs = tokio::task::JoinSet::new();
        let mut started = 0usize;
        loop {
            let now = clock.now();
            let sched = scheduler.clone();
            let fires = tokio::task::spawn_blocking(move || {
                sched.lock().unwrap_or_else(|e| e.into_inner()).tick(now)
            })
            .await
            .unwrap_or_default();
            for fire in fires {
                let req = RunRequest {
                    trigger: crate::engine::Trigger::Schedule,
                    ..base.clone()
                };
                match engine.start(fire.blueprint.clone(), req) {
                    Ok(handle) => {
                        started += 1;
                        tracing::info!(run_id = %handle.run_id, blueprint = %fire.blueprint.name, slot = %crate::store::iso8601(fire.slot), "schedule: slot fired");
                        let store = engine.store().clone();
                        let (name, slot, id) = (
                            fire.blueprint.name.clone(),
                            fire.slot,
                            handle.run_id.clone(),
                        );
                        let _ =
                            tokio::task::spawn_blocking(move || store.slot_run(&name, slot, &id))
                                .await;
                        runs.spawn(handle.wait());
                    }
                    Err(e) => {
                        tracing::error!(blueprint = %fire.blueprint.name, error = %e, "schedule: the run could not start")
                    }
                }
            }
            // Reap finished runs so the set does not grow.
            while runs.try_join_next().is_some() {}
            let now = clock.now();
            let next = scheduler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_due(now);
            let wait = next
                .and_then(|n| n.duration_since(now).ok())
                .unwrap_or(nap)
                .min(nap);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(
            in_flight = runs.len(),
            "schedule: stopped firing; waiting for runs in flight"
        );
        while runs.join_next().await.is_some() {}
        started
    })
}
