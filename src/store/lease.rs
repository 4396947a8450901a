//! Leases between processes, and each process's health.
//!
//! A run belongs to the process that runs it (`runner_executions.owner`). Every process
//! records itself in `runner_processes` and heartbeats there (with its pool state and memory);
//! as long as the owner's heartbeat is fresh, its runs are its own. When a process stops
//! heartbeating (SIGKILL, power loss) its unfinished runs are *orphaned*, and another process
//! (the console, the daemon, `omniflow resume`) may claim one — a guarded transition under
//! `BEGIN IMMEDIATE`, so two claimers can never both win — and resume it. A clean shutdown
//! releases its runs (owner `NULL`) for immediate adoption.
//!
//! `takeovers` counts claims of a run whose owner had died; past a limit the run is failed
//! instead of resumed: a run that keeps killing its process must not crash every process
//! that picks it up.

use super::asks::Ask;
use super::iso8601;
use super::transitions::{Op, ProcessInfo};
use super::{Msg, Store, StoreError};
use crate::events::PoolStats;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// This process's id in `runner_processes`: host, pid and start time (a pid is reused).
pub fn process_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = super::transitions::hostname().unwrap_or_else(|| "localhost".into());
        format!(
            "{host}:{}:{}",
            std::process::id(),
            unix_ms(SystemTime::now())
        )
    })
}

/// How much later than its recorded start a process with the owner's pid may have started
/// and still be the owner: the id's time is taken when the store opens, shortly after the
/// process started. A process with that pid started later than this is a newcomer that
/// reused the pid, so the owner is gone.
const START_SLACK_MS: i64 = 30_000;

/// Whether the process `owner` (an id `host:pid:start_ms`, see [`process_id`]) is certainly
/// gone: it ran on this host, and no process with its pid that started by its recorded start
/// time is alive here (no such pid, a zombie, or a newer process that reused the pid). A
/// process on another host, or one this platform cannot check, is never certainly gone: its
/// lease decides.
///
/// One host name must mean one pid namespace: containers that share the host's name but not
/// its pids must not share a database file (give each its own host name, the default).
pub fn owner_is_gone(owner: &str) -> bool {
    let mut parts = owner.rsplitn(3, ':');
    let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(start_ms), Ok(pid)) = (start.parse::<i64>(), pid.parse::<u32>()) else {
        return false;
    };
    let here = super::transitions::hostname().unwrap_or_else(|| "localhost".into());
    if host != here {
        return false;
    }
    if owner == process_id() {
        return false;
    }
    match process_started_ms(pid) {
        Liveness::Gone => true,
        Liveness::Started(ms) => ms > start_ms.saturating_add(START_SLACK_MS),
        Liveness::Unknown => false,
    }
}

enum Liveness {
    /// No such process, or it is a zombie (dead, not yet reaped).
    Gone,
    /// Alive, started at this Unix time in milliseconds.
    Started(i64),
    /// Cannot tell (no `/proc`).
    Unknown,
}

/// A live process's start time from `/proc/<pid>/stat` (field 22, clock ticks after boot)
/// and the boot time in `/proc/stat`.
fn process_started_ms(pid: u32) -> Liveness {
    if !std::path::Path::new("/proc/self/stat").exists() {
        return Liveness::Unknown;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Liveness::Gone;
    };
    // The command name (field 2) is in parentheses and may hold spaces or parentheses.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Liveness::Unknown;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    match fields.first() {
        Some(&"Z") | Some(&"X") | Some(&"x") => return Liveness::Gone,
        None => return Liveness::Unknown,
        _ => {}
    }
    let Some(ticks) = fields.get(19).and_then(|t| t.parse::<i64>().ok()) else {
        return Liveness::Unknown;
    };
    let Some(btime) = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<i64>().ok())
    }) else {
        return Liveness::Unknown;
    };
    // SAFETY: sysconf only reads a constant of the C library.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Liveness::Unknown;
    }
    Liveness::Started(btime * 1000 + ticks * 1000 / hz)
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One heartbeat: who we are and how the pool and memory look.
#[derive(Debug, Clone)]
pub struct Health {
    /// `console`, `daemon`, `run`, `resume`.
    pub role: String,
    pub at: SystemTime,
    pub rss_mb: Option<f64>,
    pub pool: PoolStats,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The run is ours now; `takeovers` after this claim.
    Claimed {
        takeovers: u32,
    },
    /// Already ours.
    Mine,
    /// Another live process holds it: its heartbeat is fresh (and, on this host, its pid is
    /// alive). `expires_in`: how long the lease lasts if that process stops heartbeating now.
    Live {
        owner: String,
        role: Option<String>,
        expires_in: Duration,
    },
    /// It already ended.
    Finished,
    NotFound,
    /// Its processes died too often; it was failed instead of claimed.
    Exhausted {
        takeovers: u32,
    },
}

/// A process as recorded by its last heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRow {
    pub id: String,
    pub host: Option<String>,
    pub pid: u32,
    pub role: String,
    pub version: String,
    #[serde(serialize_with = "super::types::iso")]
    pub started_at: SystemTime,
    #[serde(serialize_with = "super::types::iso")]
    pub heartbeat_at: SystemTime,
    #[serde(serialize_with = "super::types::iso_opt")]
    pub stopped_at: Option<SystemTime>,
    pub rss_mb: Option<f64>,
    pub memory_hold: bool,
    pub paused: bool,
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub concurrency: Option<u64>,
    /// Heartbeat fresh and not stopped.
    pub alive: bool,
}

impl ProcessRow {
    /// `alive`, `stopped` (it exited cleanly) or `gone` (silent past the lease: killed, crashed
    /// or its machine went down).
    pub fn state(&self) -> &'static str {
        if self.alive {
            "alive"
        } else if self.stopped_at.is_some() {
            "stopped"
        } else {
            "gone"
        }
    }

    /// One line for people: role, where, how long, the pool and memory at its last heartbeat.
    pub fn describe(&self, now: SystemTime) -> String {
        let since = |t: Option<SystemTime>| {
            t.and_then(|t| now.duration_since(t).ok())
                .map(short_span)
                .unwrap_or_else(|| "?".into())
        };
        let clock = |t: Option<SystemTime>| {
            t.map(|t| super::utc_clock(t, false))
                .unwrap_or_else(|| "?".into())
        };
        let who = format!(
            "{:<7} {}:{}",
            self.role,
            self.host.as_deref().unwrap_or("localhost"),
            self.pid
        );
        match self.state() {
            "alive" => {
                let mut s = format!(
                    "{who}  up {}, heartbeat {} ago · {}/{} busy, {} queued",
                    since(Some(self.started_at)),
                    since(Some(self.heartbeat_at)),
                    self.running,
                    self.concurrency
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "?".into()),
                    self.queued
                );
                if let Some(mb) = self.rss_mb {
                    s.push_str(&format!(" · {mb:.0} MB"));
                }
                if self.memory_hold {
                    s.push_str(" · holding back (memory)");
                }
                if self.paused {
                    s.push_str(" · paused");
                }
                s.push_str(&format!(" · v{}", self.version));
                s
            }
            "stopped" => format!(
                "{who}  stopped at {} UTC ({} ago)",
                clock(self.stopped_at),
                since(self.stopped_at)
            ),
            _ => format!(
                "{who}  silent since {} UTC ({} ago) — killed or crashed; its unfinished runs can be \
                 taken over",
                clock(Some(self.heartbeat_at)),
                since(Some(self.heartbeat_at))
            ),
        }
    }
}

/// `42s`, `17m`, `5h12m`, `3d4h`: a span as people read it (process ages here, the time
/// until a schedule fires in the console).
pub fn short_span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub(crate) fn heartbeat(
    tx: &Transaction<'_>,
    h: &Health,
    proc: &ProcessInfo,
) -> rusqlite::Result<usize> {
    let at = iso8601(h.at);
    tx.prepare_cached(
        "INSERT INTO runner_processes (id, host, pid, role, version, started_at, heartbeat_at,
             heartbeat_ms, rss_mb, memory_hold, paused, queued, running, completed, failed, concurrency)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
         ON CONFLICT (id) DO UPDATE SET role = excluded.role, heartbeat_at = excluded.heartbeat_at,
             heartbeat_ms = excluded.heartbeat_ms, rss_mb = excluded.rss_mb,
             memory_hold = excluded.memory_hold, paused = excluded.paused, queued = excluded.queued,
             running = excluded.running, completed = excluded.completed, failed = excluded.failed,
             concurrency = excluded.concurrency
         WHERE runner_processes.stopped_at IS NULL",
    )?
    .execute(params![
        proc.id,
        proc.host,
        proc.pid,
        h.role,
        env!("CARGO_PKG_VERSION"),
        at,
        unix_ms(h.at),
        h.rss_mb,
        h.pool.memory_hold,
        h.pool.paused,
        h.pool.queued_total() as i64,
        h.pool.running as i64,
        h.pool.completed as i64,
        h.pool.failed as i64,
        h.pool.concurrency as i64,
    ])
}

pub(crate) fn process_stopped(
    tx: &Transaction<'_>,
    at: SystemTime,
    proc: &ProcessInfo,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "UPDATE runner_processes SET stopped_at = ?2 WHERE id = ?1 AND stopped_at IS NULL",
    )?
    .execute(params![proc.id, iso8601(at)])
}

/// Hands every unfinished run of ours to whoever adopts it next.
pub(crate) fn release_runs(tx: &Transaction<'_>, proc: &ProcessInfo) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "UPDATE runner_executions SET owner = NULL
         WHERE owner = ?1 AND status IN ('queued', 'running')",
    )?
    .execute([&proc.id])
}

/// Claims `run_id` for `me` if its owner is gone (guarded: only one claimer can win).
pub(super) fn claim(
    conn: &mut Connection,
    run_id: &str,
    me: &str,
    now: SystemTime,
    lease: Duration,
    max_takeovers: u32,
) -> rusqlite::Result<Claim> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let row: Option<(String, Option<String>, u32)> = tx
        .query_row(
            "SELECT status, owner, takeovers FROM runner_executions WHERE id = ?1",
            [run_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((status, owner, takeovers)) = row else {
        return Ok(Claim::NotFound);
    };
    if status != "queued" && status != "running" {
        return Ok(Claim::Finished);
    }
    if owner.as_deref() == Some(me) {
        return Ok(Claim::Mine);
    }
    let stale_before = unix_ms(now) - i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    if let Some(owner) = &owner {
        let row: Option<(bool, i64, String)> = tx
            .query_row(
                "SELECT stopped_at IS NULL AND heartbeat_ms >= ?2, heartbeat_ms, role
                 FROM runner_processes WHERE id = ?1",
                params![owner, stale_before],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((true, beat_ms, role)) = row {
            // A fresh heartbeat from a process that is gone (SIGKILL, crash) on this host
            // does not hold the run: take it over now instead of waiting out the lease.
            if owner_is_gone(owner) {
                tracing::info!(run_id, owner = %owner, "the run's process is gone; taking it over without waiting for its lease");
            } else {
                let left = beat_ms.saturating_sub(stale_before).max(0);
                return Ok(Claim::Live {
                    owner: owner.clone(),
                    role: Some(role),
                    expires_in: Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                });
            }
        }
    }
    // A run released by a clean shutdown (owner NULL) was handed over, not taken over.
    let takeovers = takeovers + u32::from(owner.is_some());
    if takeovers > max_takeovers {
        // The steps in flight when the process last died are the suspects: name them, and
        // fail them, so `omniflow show` and the console point at the step to look at.
        let in_flight: Vec<String> = {
            let mut q = tx.prepare(
                "SELECT step_key FROM runner_steps
                 WHERE run_id = ?1 AND status IN ('running', 'retrying') ORDER BY seq",
            )?;
            let keys = q.query_map([run_id], |r| r.get(0))?;
            keys.collect::<rusqlite::Result<_>>()?
        };
        let suspects = match in_flight.len() {
            0 => String::new(),
            1..=5 => format!("; in flight when it last stopped: {}", in_flight.join(", ")),
            n => format!(
                "; in flight when it last stopped: {} and {} more",
                in_flight[..5].join(", "),
                n - 5
            ),
        };
        let error = format!(
            "the process running this run stopped {takeovers} times (killed or crashed){suspects}; \
             it is not resumed again, so it cannot take more processes down"
        );
        tx.execute(
            "UPDATE runner_steps
             SET status = 'error', error_kind = 'interrupted',
                 error = 'in flight when the process running it stopped (killed or crashed) ' || ?2 || ' times',
                 finished_at = ?3
             WHERE run_id = ?1 AND status IN ('running', 'retrying')",
            params![run_id, takeovers, iso8601(now)],
        )?;
        tx.execute(
            "UPDATE runner_executions
             SET status = 'error', owner = NULL, takeovers = ?2, finished_at = ?3,
                 error_kind = 'interrupted', error = ?4, failed_step = ?5
             WHERE id = ?1 AND status IN ('queued', 'running')",
            params![run_id, takeovers, iso8601(now), error, in_flight.first()],
        )?;
        tx.commit()?;
        return Ok(Claim::Exhausted { takeovers });
    }
    let n = tx.execute(
        "UPDATE runner_executions SET owner = ?2, takeovers = ?3
         WHERE id = ?1 AND owner IS ?4 AND status IN ('queued', 'running')",
        params![run_id, me, takeovers, owner],
    )?;
    tx.commit()?;
    Ok(if n == 1 {
        Claim::Claimed { takeovers }
    } else {
        // Under BEGIN IMMEDIATE nobody can have changed the row since we read it; kept as a
        // guard all the same.
        Claim::Live {
            owner: owner.unwrap_or_default(),
            role: None,
            expires_in: lease,
        }
    })
}

impl Store {
    /// Records this process's heartbeat: its pool and memory (a health check), and the proof
    /// that its runs' leases are alive. Call it before the first run is inserted.
    pub fn heartbeat(&self, h: Health) {
        // On PostgreSQL the heartbeat also goes at once on a reader's connection: behind a long
        // batch of history, the queued one alone could land after the lease ran out and make
        // the fleet adopt this live process's runs. The queued copy keeps `flush` meaning
        // "every write before it is in".
        if let Some(pg) = self.pg() {
            pg.heartbeat_now(&h, self.owner());
        }
        self.send(Msg::Write(Op::Heartbeat(Box::new(h))));
    }

    /// Marks this process stopped (its runs become adoptable at once).
    pub fn process_stopped(&self) {
        self.send(Msg::Write(Op::ProcessStopped {
            at: SystemTime::now(),
        }));
    }

    /// Hands every unfinished run of this process to the next process that adopts runs.
    pub fn release_runs(&self) {
        self.send(Msg::Write(Op::ReleaseRuns));
    }

    /// Claims an orphaned run (its owner's heartbeat is older than `lease`, or it was
    /// released). Runs on the writer thread, after every write queued before it.
    pub async fn claim_run(
        &self,
        run_id: &str,
        lease: Duration,
        max_takeovers: u32,
    ) -> Result<Claim, StoreError> {
        let run_id = run_id.to_string();
        self.ask(|reply| Ask::ClaimRun {
            run_id,
            lease,
            max_takeovers,
            reply,
        })
        .await
    }

    /// Which of `ids` (runs this process drives) another process has taken over, with the
    /// new owner: this process missed its lease (it was paused, or its heartbeats could not
    /// reach the database) and must stop driving them.
    pub fn runs_taken_over(&self, ids: Vec<String>) -> Result<Vec<(String, String)>, StoreError> {
        let me = self.owner().to_string();
        if let Some(pg) = self.pg() {
            return pg.runs_taken_over(me, ids);
        }
        self.read("checking which runs are still ours", move |c| {
            let mut st = c.prepare_cached(
                "SELECT owner FROM runner_executions
                 WHERE id = ?1 AND status IN ('queued', 'running') AND owner IS NOT NULL",
            )?;
            let mut lost = Vec::new();
            for id in &ids {
                let owner: Option<String> = st.query_row([id], |r| r.get(0)).optional()?;
                if let Some(owner) = owner.filter(|o| *o != me) {
                    lost.push((id.clone(), owner));
                }
            }
            Ok(lost)
        })
    }

    /// Unfinished runs whose owner is gone (or that were released), oldest first.
    pub fn orphaned_runs(&self, lease: Duration) -> Result<Vec<String>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.orphaned_runs(lease);
        }
        let stale_before =
            unix_ms(SystemTime::now()) - i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows: Vec<(String, bool, Option<String>)> =
            self.read("listing orphaned runs", |c| {
                let mut st = c.prepare_cached(
                    "SELECT r.id,
                            r.owner IS NULL OR p.id IS NULL OR p.stopped_at IS NOT NULL
                                OR p.heartbeat_ms < ?1,
                            r.owner
                     FROM runner_executions r
                     LEFT JOIN runner_processes p ON p.id = r.owner
                     WHERE r.status IN ('queued', 'running')
                     ORDER BY r.queued_at",
                )?;
                let rows =
                    st.query_map([stale_before], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect()
            })?;
        // A run whose lease looks fresh is orphaned all the same when its process is gone
        // from this host (killed before its lease ran out).
        Ok(rows
            .into_iter()
            .filter(|(_, stale, owner)| *stale || owner.as_deref().is_some_and(owner_is_gone))
            .map(|(id, _, _)| id)
            .collect())
    }

    /// Every process that heartbeated into this database, newest first.
    pub fn processes(&self, lease: Duration) -> Result<Vec<ProcessRow>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.processes(lease);
        }
        let stale_before =
            unix_ms(SystemTime::now()) - i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self.read("listing processes", |c| {
            let mut st = c.prepare_cached(
                "SELECT id, host, pid, role, version, started_at, heartbeat_at, stopped_at, rss_mb,
                        memory_hold, paused, queued, running, completed, failed, concurrency,
                        stopped_at IS NULL AND heartbeat_ms >= ?1
                 FROM runner_processes ORDER BY heartbeat_ms DESC LIMIT 100",
            )?;
            let rows = st.query_map([stale_before], |r| {
                Ok(ProcessRow {
                    id: r.get(0)?,
                    host: r.get(1)?,
                    pid: r.get(2)?,
                    role: r.get(3)?,
                    version: r.get(4)?,
                    started_at: super::read::time_req(r, 5)?,
                    heartbeat_at: super::read::time_req(r, 6)?,
                    stopped_at: super::read::time_at(r, 7)?,
                    rss_mb: r.get(8)?,
                    memory_hold: r.get(9)?,
                    paused: r.get(10)?,
                    queued: r.get::<_, i64>(11)?.max(0) as u64,
                    running: r.get::<_, i64>(12)?.max(0) as u64,
                    completed: r.get::<_, i64>(13)?.max(0) as u64,
                    failed: r.get::<_, i64>(14)?.max(0) as u64,
                    concurrency: r.get::<_, Option<i64>>(15)?.map(|c| c.max(0) as u64),
                    alive: r.get(16)?,
                })
            })?;
            let rows: Vec<ProcessRow> = rows.collect::<rusqlite::Result<_>>()?;
            // A process killed on this host is not alive, however fresh its last heartbeat.
            Ok(rows
                .into_iter()
                .map(|mut p| {
                    if p.alive && owner_is_gone(&p.id) {
                        p.alive = false;
                    }
                    p
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(role: &str, pid: u32, alive: bool, stopped_at: Option<SystemTime>) -> ProcessRow {
        let at = UNIX_EPOCH + Duration::from_secs(1_796_637_000); // 2026-12-07 09:50:00 UTC
        ProcessRow {
            id: format!("web1:{pid}:1"),
            host: Some("web1".into()),
            pid,
            role: role.into(),
            version: "0.1.0".into(),
            started_at: at - Duration::from_secs(3600),
            heartbeat_at: at,
            stopped_at,
            rss_mb: Some(42.0),
            memory_hold: false,
            paused: false,
            queued: 5,
            running: 3,
            completed: 0,
            failed: 0,
            concurrency: Some(32),
            alive,
        }
    }

    /// A process on this host whose pid is alive is the owner it names when it started at
    /// most `START_SLACK_MS` after the owner's recorded start (clocks and `/proc` round
    /// differently), and another process that reused the pid when it started later.
    #[test]
    fn a_reused_pid_is_told_from_its_owner_by_the_start_time() {
        let Liveness::Started(started) = process_started_ms(std::process::id()) else {
            return; // no /proc here
        };
        let host = super::super::transitions::hostname().unwrap_or_else(|| "localhost".into());
        let owner = |recorded: i64| format!("{host}:{}:{recorded}", std::process::id());
        assert!(!owner_is_gone(&owner(started)));
        assert!(!owner_is_gone(&owner(started - START_SLACK_MS)));
        assert!(owner_is_gone(&owner(started - START_SLACK_MS - 1)));
        assert!(!owner_is_gone(&format!(
            "elsewhere:{}:0",
            std::process::id()
        )));
    }

    /// `doctor`'s line for a process says how it ended: stopped cleanly at a time, or silent
    /// since its last heartbeat (its runs can be taken over).
    #[test]
    fn a_process_line_says_how_it_ended() {
        let at = UNIX_EPOCH + Duration::from_secs(1_796_637_000);
        let now = at + Duration::from_secs(600);
        assert_eq!(
            process("console", 5, false, Some(at)).describe(now),
            "console web1:5  stopped at 09:50:00 UTC (10m ago)"
        );
        assert_eq!(
            process("run", 7, false, None).describe(now),
            "run     web1:7  silent since 09:50:00 UTC (10m ago) — killed or crashed; its \
             unfinished runs can be taken over"
        );
        assert_eq!(
            process("daemon", 9, true, None).describe(now),
            "daemon  web1:9  up 1h10m, heartbeat 10m ago · 3/32 busy, 5 queued · 42 MB · v0.1.0"
        );
    }
}
