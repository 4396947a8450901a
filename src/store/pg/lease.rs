//! Run leases and processes on PostgreSQL (see `store/lease.rs`), with one difference that
//! matters across hosts: freshness is always judged by the database's clock (`now()`), never
//! by a host's, so hosts whose clocks disagree still agree on whose run is whose.

use super::backend::{PgBackend, PgResult};
use crate::store::error::StoreError;
use crate::store::lease::{owner_is_gone, Claim, ProcessRow};
use postgres::Client;
use std::time::Duration;

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

impl PgBackend {
    pub(crate) fn runs_taken_over(
        &self,
        me: String,
        ids: Vec<String>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.read("checking which runs are still ours", move |c| {
            let rows = c.query(
                "SELECT id, owner FROM runner_executions
                 WHERE id = ANY($1) AND status IN ('queued', 'running')
                   AND owner IS NOT NULL AND owner <> $2",
                &[&ids, &me],
            )?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }

    pub(crate) fn orphaned_runs(&self, lease: Duration) -> Result<Vec<String>, StoreError> {
        let ms = lease_ms(lease);
        let rows: Vec<(String, bool, Option<String>)> =
            self.read("listing orphaned runs", move |c| {
                c.query(
                    "SELECT r.id,
                            r.owner IS NULL OR p.id IS NULL OR p.stopped_at IS NOT NULL
                                OR p.heartbeat_at < now() - make_interval(secs => $1::bigint / 1000.0),
                            r.owner
                     FROM runner_executions r
                     LEFT JOIN runner_processes p ON p.id = r.owner
                     WHERE r.status IN ('queued', 'running')
                     ORDER BY r.queued_at",
                    &[&ms],
                )?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect()
            })?;
        Ok(rows
            .into_iter()
            .filter(|(_, stale, owner)| *stale || owner.as_deref().is_some_and(owner_is_gone))
            .map(|(id, _, _)| id)
            .collect())
    }

    pub(crate) fn processes(&self, lease: Duration) -> Result<Vec<ProcessRow>, StoreError> {
        let ms = lease_ms(lease);
        self.read("listing processes", move |c| {
            let rows = c.query(
                "SELECT id, host, pid, role, version, started_at, heartbeat_at, stopped_at, rss_mb,
                        memory_hold, paused, queued, running, completed, failed, concurrency,
                        stopped_at IS NULL
                            AND heartbeat_at >= now() - make_interval(secs => $1::bigint / 1000.0)
                 FROM runner_processes ORDER BY heartbeat_at DESC LIMIT 100",
                &[&ms],
            )?;
            rows.iter()
                .map(|r| {
                    let n =
                        |i: usize| -> PgResult<u64> { Ok(r.try_get::<_, i64>(i)?.max(0) as u64) };
                    let mut p = ProcessRow {
                        id: r.try_get(0)?,
                        host: r.try_get(1)?,
                        pid: u32::try_from(r.try_get::<_, i64>(2)?).unwrap_or(0),
                        role: r.try_get(3)?,
                        version: r.try_get(4)?,
                        started_at: r.try_get(5)?,
                        heartbeat_at: r.try_get(6)?,
                        stopped_at: r.try_get(7)?,
                        rss_mb: r.try_get(8)?,
                        memory_hold: r.try_get(9)?,
                        paused: r.try_get(10)?,
                        queued: n(11)?,
                        running: n(12)?,
                        completed: n(13)?,
                        failed: n(14)?,
                        concurrency: r.try_get::<_, Option<i64>>(15)?.map(|c| c.max(0) as u64),
                        alive: r.try_get(16)?,
                    };
                    // A process killed on this host is not alive, however fresh its heartbeat.
                    if p.alive && owner_is_gone(&p.id) {
                        p.alive = false;
                    }
                    Ok(p)
                })
                .collect()
        })
    }
}

/// The claim of `store/lease.rs` (applied by the writer thread, `backend::answer`), with the row locked (`FOR UPDATE`) instead of SQLite's
/// database-wide write lock, and the lease judged by `now()` on the server.
pub(super) fn claim(
    c: &mut Client,
    run_id: &str,
    me: &str,
    lease: Duration,
    max_takeovers: u32,
) -> PgResult<Claim> {
    let mut tx = c.transaction()?;
    let Some(row) = tx.query_opt(
        "SELECT status, owner, takeovers FROM runner_executions WHERE id = $1 FOR UPDATE",
        &[&run_id],
    )?
    else {
        return Ok(Claim::NotFound);
    };
    let status: String = row.try_get(0)?;
    let owner: Option<String> = row.try_get(1)?;
    let takeovers = u32::try_from(row.try_get::<_, i64>(2)?).unwrap_or(u32::MAX);
    if status != "queued" && status != "running" {
        return Ok(Claim::Finished);
    }
    if owner.as_deref() == Some(me) {
        return Ok(Claim::Mine);
    }
    let ms = lease_ms(lease);
    if let Some(owner) = &owner {
        let row = tx.query_opt(
            "SELECT stopped_at IS NULL
                    AND heartbeat_at >= now() - make_interval(secs => $2::bigint / 1000.0),
                    -- now() is this transaction's start: a heartbeat committed since may be
                    -- later than it, and a lease never has more than its length left.
                    LEAST($2::bigint, GREATEST(0, (extract(epoch FROM
                        heartbeat_at + make_interval(secs => $2::bigint / 1000.0) - now()) * 1000)::bigint)),
                    role
             FROM runner_processes WHERE id = $1",
            &[owner, &ms],
        )?;
        if let Some(row) = row {
            let fresh: bool = row.try_get(0)?;
            let left: i64 = row.try_get(1)?;
            let role: String = row.try_get(2)?;
            if fresh {
                if owner_is_gone(owner) {
                    tracing::info!(run_id, owner = %owner, "the run's process is gone; taking it over without waiting for its lease");
                } else {
                    return Ok(Claim::Live {
                        owner: owner.clone(),
                        role: Some(role),
                        expires_in: Duration::from_millis(u64::try_from(left).unwrap_or(0)),
                    });
                }
            }
        }
    }
    // A run released by a clean shutdown (owner NULL) was handed over, not taken over.
    let takeovers = takeovers + u32::from(owner.is_some());
    if takeovers > max_takeovers {
        let in_flight: Vec<String> = tx
            .query(
                "SELECT step_key FROM runner_steps
                 WHERE run_id = $1 AND status IN ('running', 'retrying') ORDER BY seq",
                &[&run_id],
            )?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
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
        let step_error = format!(
            "in flight when the process running it stopped (killed or crashed) {takeovers} times"
        );
        tx.execute(
            "UPDATE runner_steps
             SET status = 'error', error_kind = 'interrupted', error = $2,
                 finished_at = date_trunc('milliseconds', now())
             WHERE run_id = $1 AND status IN ('running', 'retrying')",
            &[&run_id, &step_error],
        )?;
        tx.execute(
            "UPDATE runner_executions
             SET status = 'error', owner = NULL, takeovers = $2,
                 finished_at = date_trunc('milliseconds', now()),
                 error_kind = 'interrupted', error = $3, failed_step = $4
             WHERE id = $1 AND status IN ('queued', 'running')",
            &[&run_id, &i64::from(takeovers), &error, &in_flight.first()],
        )?;
        tx.commit()?;
        return Ok(Claim::Exhausted { takeovers });
    }
    let n = tx.execute(
        "UPDATE runner_executions SET owner = $2, takeovers = $3
         WHERE id = $1 AND owner IS NOT DISTINCT FROM $4 AND status IN ('queued', 'running')",
        &[&run_id, &me, &i64::from(takeovers), &owner],
    )?;
    tx.commit()?;
    Ok(if n == 1 {
        Claim::Claimed { takeovers }
    } else {
        // The row is locked FOR UPDATE: nobody can have changed it since we read it; kept as
        // a guard all the same.
        Claim::Live {
            owner: owner.unwrap_or_default(),
            role: None,
            expires_in: lease,
        }
    })
}
