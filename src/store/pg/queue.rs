//! The fleet's queue of step attempts in PostgreSQL (`runner_queue`), and every statement that
//! moves a row through it. Each transition is one function guarded by the state it expects:
//!
//! ```text
//! enqueue ──► queued ──claim──► running ──complete (fenced)──► done ──take_results──► (deleted)
//!               ▲                  │
//!               └──── rescue ◄─────┘ lease expired (rescues < limit; else ──► failed)
//! ```
//!
//! - **Claims** take up to N rows in one statement, `FOR UPDATE SKIP LOCKED`, in priority order
//!   (critical → high → normal → low), then by age. A claim gives the row a fresh
//!   `claim_token` and a lease computed from the server's `now()`: host clocks never decide who
//!   owns a row.
//! - **Tags:** a process takes a row when it has every tag of the row. A row without tags goes
//!   to any process; a process without `OMNIFLOW_TAGS` takes only rows without tags.
//! - **Fencing:** completion and heartbeats match `id` *and* `claim_token`; a worker whose lease
//!   was rescued (a "zombie") matches nothing, and its late result is dropped.
//! - **Rescue:** a running row whose lease passed goes back to `queued` with `rescues + 1`; a
//!   row already rescued `limit` times is `failed` instead, so an attempt that kills every
//!   process it reaches cannot loop through the fleet.
//! - **Wake-ups:** `NOTIFY omniflow_jobs` when rows become claimable, `NOTIFY omniflow_done`
//!   (payload: the row id) when a row is finished; both inside the transition's transaction,
//!   so they fire at commit. Payloads are ids, never data (PostgreSQL caps them at 8,000 bytes).
//!
//! The tables are created by the store's versioned migrations (`omniflow_migrations`, see
//! [`super::schema`]) from [`MIGRATION`].

use super::connect::{describe, PgTarget};
use postgres::types::{ToSql, Type};

use super::pool::PgPool;
use serde_json::Value;
use std::time::Duration;

/// The store's migration that creates the queue's tables (and the fleet's rate-limit
/// windows). Written to be a no-op where they exist: an earlier version of OmniFlow created
/// them itself, with these same statements, outside the versioned migrations, under the
/// advisory lock taken first here (so a process of that version starting at the same moment
/// cannot race this one on the catalog).
pub const MIGRATION: &str = r#"
SELECT pg_advisory_xact_lock(122515794493441);
SET LOCAL client_min_messages = warning;
CREATE TABLE IF NOT EXISTS runner_queue (
    id           bigserial PRIMARY KEY,
    run_id       text NOT NULL,
    step_key     text NOT NULL,
    attempt      integer NOT NULL,
    -- 3 critical, 2 high, 1 normal, 0 low: claims take the highest first.
    priority     smallint NOT NULL,
    -- A process takes the row only when it has every one of these (OMNIFLOW_TAGS).
    tags         text[] NOT NULL DEFAULT '{}',
    -- What the attempt needs to run on any host (the rendered input, the node, the run).
    payload      jsonb NOT NULL,
    state        text NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'done', 'failed')),
    available_at timestamptz NOT NULL DEFAULT now(),
    locked_by    text,
    claim_token  text,
    claimed_at   timestamptz,
    lease_until  timestamptz,
    -- Times the row went back to the queue because its worker's lease expired.
    rescues      integer NOT NULL DEFAULT 0,
    -- `done`: the attempt's outcome as the engine wrote it; `failed`: `error` says why.
    result       jsonb,
    error        text,
    finished_at  timestamptz,
    UNIQUE (run_id, step_key, attempt)
);
CREATE INDEX IF NOT EXISTS runner_queue_next
    ON runner_queue (priority DESC, available_at, id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS runner_queue_leases
    ON runner_queue (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS runner_queue_finished
    ON runner_queue (finished_at) WHERE state IN ('done', 'failed');
CREATE TABLE IF NOT EXISTS runner_rate_windows (
    provider     text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    used         integer NOT NULL,
    PRIMARY KEY (provider, window_start)
);
CREATE INDEX IF NOT EXISTS runner_rate_windows_end ON runner_rate_windows (window_end);
"#;

/// The channel told when rows become claimable.
pub const JOBS_CHANNEL: &str = "omniflow_jobs";
/// The channel told (payload: the row id) when a row is finished, done or failed.
pub const DONE_CHANNEL: &str = "omniflow_done";

/// The lock an earlier version took to create the queue's tables itself (see [`MIGRATION`],
/// which spells it in decimal).
#[cfg(test)]
const SCHEMA_LOCK: i64 = 0x6f6d_6e69_0001;
/// Held (for one transaction) by the process sweeping expired leases, so a fleet sweeps once.
const SWEEP_LOCK: i64 = 0x6f6d_6e69_0002;

/// A queue operation that failed; the text says what was being done and never shows the
/// password.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct QueueError(pub String);

type Result<T> = std::result::Result<T, QueueError>;

pub use super::listen::{listen, Heard, Notice};

/// A step attempt to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub run_id: String,
    pub step_key: String,
    pub attempt: u32,
    /// `Priority::index`: 3 critical … 0 low.
    pub priority: u8,
    pub tags: Vec<String>,
    pub payload: Value,
}

/// A row this process claimed: run it, heartbeat it, complete it with its token.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJob {
    pub id: i64,
    pub token: String,
    pub run_id: String,
    pub step_key: String,
    pub attempt: u32,
    pub priority: u8,
    pub payload: Value,
    /// How many times the row was rescued before this claim.
    pub rescues: u32,
}

/// The process enqueuing, when it may claim some of its new rows at once
/// ([`Queue::enqueue_claiming`]).
#[derive(Debug, Clone, Copy)]
pub struct Claimer<'a> {
    /// `locked_by` of its claims.
    pub worker: &'a str,
    /// Its `OMNIFLOW_TAGS`: it takes a row when it has every tag of the row.
    pub tags: &'a [String],
    /// Its free workers: at most this many rows are claimed.
    pub free: usize,
    pub lease: Duration,
    /// The rows it does not claim stay out of every claim for this long, or until
    /// [`Queue::reveal`], and no one is woken for them: the enqueuing process first makes
    /// them fit for another host (its history committed), then reveals them. The bound is
    /// for a process that dies in between: its rows come back like its leases.
    pub hold_rest: Option<Duration>,
    /// The claim tokens of the rows it claims, by job ([`new_token`]), where it chose them
    /// before the insert (it starts their attempts meanwhile); new ones for the others.
    pub tokens: Option<&'a [Option<String>]>,
}

/// A fresh claim token.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A finished row, as its driver takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The worker's result, as it wrote it.
    Done(Value),
    /// The queue gave the attempt up (its workers' leases kept expiring): why.
    Failed(String),
    /// The row is gone before its result was taken: another driver of the run took or
    /// withdrew it (a driver paused past its lease, and the one that adopted the run, both
    /// waited for it). The attempt is to be enqueued again.
    Vanished,
}

/// What one sweep of expired leases did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rescued {
    /// Back in the queue.
    pub requeued: Vec<i64>,
    /// Given up after too many rescues.
    pub failed: Vec<i64>,
    /// False when another process held the sweep lock: it sweeps this time.
    pub swept: bool,
}

/// The queue of one process, on the process's shared pool of connections (the store's
/// reads use it too: [`super::pool`]).
#[derive(Clone, Debug)]
pub struct Queue {
    pool: PgPool,
    target: PgTarget,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(0.001)
}

impl Queue {
    /// A queue on a pool of its own of at most `connections` connections, opened as they
    /// are needed (nothing is connected here). Blocking: call it off the async runtime's
    /// threads, like every method.
    pub fn new(target: &PgTarget, connections: u32) -> Result<Queue> {
        Ok(Queue::on(
            PgPool::sized(target, connections).map_err(QueueError)?,
        ))
    }

    /// A queue on `pool`, shared with whatever else uses it (the store's reads).
    pub fn on(pool: PgPool) -> Queue {
        Queue {
            target: pool.target().clone(),
            pool,
        }
    }

    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The most connections its pool opens.
    pub fn connections(&self) -> u32 {
        self.pool.size()
    }

    fn conn(&self) -> Result<super::pool::Pooled> {
        self.pool.get().map_err(QueueError)
    }

    /// Runs `f` on a pooled connection. A connection the server dropped (a restart,
    /// `pg_terminate_backend`) fails the statement before it runs: `f` is tried again on
    /// another connection (each pooled one may have been dropped too, hence a few tries).
    /// Every statement here may run twice: each is guarded by the row states it expects.
    fn with<T>(
        &self,
        doing: &str,
        mut f: impl FnMut(&mut postgres::Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let mut tries: u32 = 0;
        loop {
            let mut c = self.conn()?;
            match f(&mut c) {
                Ok(v) => return Ok(v),
                Err(e) if super::backend::lost(&e) && tries <= self.pool.size() => {
                    tries += 1;
                    tracing::debug!(error = %describe(&e, &self.target, doing), "fleet: a queue connection was dropped; trying another");
                }
                Err(e) => return Err(QueueError(describe(&e, &self.target, doing))),
            }
        }
    }

    /// Brings the database's tables, the queue's included, up to this build's migrations
    /// (a no-op when the store did it already at open, as it does in every process).
    pub fn ensure_schema(&self) -> Result<()> {
        let mut c = self.conn()?;
        super::schema::migrate(&mut c, &self.target).map_err(|e| QueueError(e.to_string()))
    }

    /// Inserts `jobs` and wakes idle claimers; returns each job's row id, in order. A job
    /// whose (run, step, attempt) is already queued keeps its row (a driver that took a run
    /// over waits for the attempt its predecessor enqueued instead of running it twice).
    pub fn enqueue(&self, jobs: &[NewJob]) -> Result<Vec<i64>> {
        Ok(self
            .enqueue_claiming(jobs, None)?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// [`Queue::enqueue`], where the enqueuing process also claims, in the same statement,
    /// what a claim right after the insert would give it: up to `me.free` of the new rows it
    /// may run (tags), minus the claimable rows already queued ahead of them (priority, then
    /// age), which its claimer takes next. A fan-out whose driver has free workers so starts
    /// without the round trips of a notification and a claim; the claim order of the fleet
    /// is the same. Returns each job's row id, in order, with the claim of the rows taken
    /// (the other rows are left to any process, woken by the notification, which is sent
    /// only when such rows exist).
    pub fn enqueue_claiming(
        &self,
        jobs: &[NewJob],
        me: Option<&Claimer<'_>>,
    ) -> Result<Vec<(i64, Option<ClaimedJob>)>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let runs: Vec<&str> = jobs.iter().map(|j| j.run_id.as_str()).collect();
        let steps: Vec<&str> = jobs.iter().map(|j| j.step_key.as_str()).collect();
        let attempts: Vec<i32> = jobs
            .iter()
            .map(|j| i32::try_from(j.attempt).unwrap_or(i32::MAX))
            .collect();
        let prios: Vec<i16> = jobs.iter().map(|j| i16::from(j.priority.min(3))).collect();
        // Tags travel as one comma-joined text per job: PostgreSQL has no ragged arrays.
        let tags: Vec<String> = jobs.iter().map(|j| j.tags.join(",")).collect();
        let payloads: Vec<&Value> = jobs.iter().map(|j| &j.payload).collect();
        // Each job this process may run gets its rank in claim order (priority, then the
        // order of the batch, which is the ids' order); the others none.
        let mut ranks: Vec<Option<i32>> = vec![None; jobs.len()];
        let (worker, my_tags, free, lease, hold) = match me {
            Some(m) => (m.worker, m.tags, m.free, m.lease, m.hold_rest),
            None => ("", &[][..], 0, Duration::ZERO, None),
        };
        let tokens: Vec<Option<&str>> = match me.and_then(|m| m.tokens) {
            Some(t) => (0..jobs.len())
                .map(|i| t.get(i).and_then(|x| x.as_deref()))
                .collect(),
            None => vec![None; jobs.len()],
        };
        let hold = hold.map_or(0.0, |h| h.as_secs_f64());
        let mut eligible: Vec<usize> = (0..jobs.len())
            .filter(|&i| free > 0 && jobs[i].tags.iter().all(|t| my_tags.contains(t)))
            .collect();
        eligible.sort_by_key(|&i| (std::cmp::Reverse(prios[i]), i));
        for (rank, &i) in eligible.iter().enumerate() {
            ranks[i] = Some(i32::try_from(rank + 1).unwrap_or(i32::MAX));
        }
        let lowest = eligible.iter().map(|&i| prios[i]).min().unwrap_or(0);
        let free = i32::try_from(free).unwrap_or(i32::MAX);
        // One statement (its own transaction): the notification fires when the rows commit,
        // and a fan-out costs one round trip, not six. Run twice (a reply lost with its
        // connection), it finds its rows there, claimed or not, and returns them as they are.
        let rows = self.with("enqueue steps", |c| {
            c.query_typed(
                "WITH ahead AS (
                     SELECT count(*)::int AS n FROM (
                         SELECT 1 FROM runner_queue
                         WHERE state = 'queued' AND available_at <= now()
                           AND tags <@ $9::text[] AND priority >= $10
                         LIMIT $8
                     ) x
                 ), v AS (
                     SELECT r, s, a, p, t, j, tok,
                            (k IS NOT NULL AND k <= $8 - (SELECT n FROM ahead)) AS mine
                     FROM unnest($1::text[], $2::text[], $3::int[], $4::smallint[],
                                 $5::text[], $6::jsonb[], $7::int[], $15::text[])
                          AS u(r, s, a, p, t, j, k, tok)
                 ), ins AS (
                     INSERT INTO runner_queue (run_id, step_key, attempt, priority, tags, payload,
                                               available_at, state, locked_by, claim_token,
                                               claimed_at, lease_until)
                     SELECT r, s, a, p, CASE WHEN t = '' THEN '{}'::text[]
                                             ELSE string_to_array(t, ',') END, j,
                            CASE WHEN mine THEN now()
                                 ELSE now() + make_interval(secs => $14) END,
                            CASE WHEN mine THEN 'running' ELSE 'queued' END,
                            CASE WHEN mine THEN $11 END,
                            CASE WHEN mine THEN COALESCE(tok, gen_random_uuid()::text) END,
                            CASE WHEN mine THEN now() END,
                            CASE WHEN mine THEN now() + make_interval(secs => $12) END
                     FROM v
                     ON CONFLICT (run_id, step_key, attempt)
                         DO UPDATE SET priority = EXCLUDED.priority
                     RETURNING id, run_id, step_key, attempt, state, locked_by, claim_token,
                               priority, payload, rescues
                 ), told AS (
                     SELECT pg_notify($13, '') WHERE $14 = 0 AND EXISTS (
                         SELECT 1 FROM ins WHERE state = 'queued')
                 )
                 SELECT ins.* FROM ins CROSS JOIN (SELECT count(*) FROM told) AS woken",
                &[
                    (&runs as &(dyn ToSql + Sync), Type::TEXT_ARRAY),
                    (&steps, Type::TEXT_ARRAY),
                    (&attempts, Type::INT4_ARRAY),
                    (&prios, Type::INT2_ARRAY),
                    (&tags, Type::TEXT_ARRAY),
                    (&payloads, Type::JSONB_ARRAY),
                    (&ranks, Type::INT4_ARRAY),
                    (&free, Type::INT4),
                    (&my_tags, Type::TEXT_ARRAY),
                    (&lowest, Type::INT2),
                    (&worker, Type::TEXT),
                    (&secs(lease), Type::FLOAT8),
                    (&JOBS_CHANNEL, Type::TEXT),
                    (&hold, Type::FLOAT8),
                    (&tokens, Type::TEXT_ARRAY),
                ],
            )
        })?;
        let mut got = std::collections::HashMap::new();
        for r in rows {
            let key: (String, String, i32) = (r.get(1), r.get(2), r.get(3));
            let id: i64 = r.get(0);
            // Running under this process's name: claimed by this statement (or by its first
            // try, whose reply was lost). The caller skips a row its claimer already holds.
            let claimed = (me.is_some()
                && r.get::<_, &str>(4) == "running"
                && r.get::<_, Option<&str>>(5) == Some(worker))
            .then(|| ClaimedJob {
                id,
                token: r.get::<_, Option<String>>(6).unwrap_or_default(),
                run_id: key.0.clone(),
                step_key: key.1.clone(),
                attempt: u32::try_from(key.2).unwrap_or(0),
                priority: u8::try_from(r.get::<_, i16>(7)).unwrap_or(1),
                payload: r.get(8),
                rescues: u32::try_from(r.get::<_, i32>(9)).unwrap_or(0),
            });
            got.insert(key, (id, claimed));
        }
        jobs.iter()
            .zip(&attempts)
            .map(|(j, &a)| {
                got.remove(&(j.run_id.clone(), j.step_key.clone(), a))
                    .ok_or_else(|| {
                        QueueError(format!(
                            "the queue returned no row for {} {} — a bug, please report it",
                            j.run_id, j.step_key
                        ))
                    })
            })
            .collect()
    }

    /// Makes rows held back by [`Claimer::hold_rest`] claimable now, and wakes the claimers;
    /// returns how many were still waiting. Run twice, the second finds nothing to do.
    pub fn reveal(&self, ids: &[i64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let rows = self.with("release held steps", |c| {
            c.query_typed(
                "WITH r AS (
                     UPDATE runner_queue SET available_at = now()
                     WHERE id = ANY($1) AND state = 'queued' AND available_at > now()
                     RETURNING id
                 ), told AS (
                     SELECT pg_notify($2, '') WHERE EXISTS (SELECT 1 FROM r)
                 )
                 SELECT count(*) FROM r CROSS JOIN (SELECT count(*) FROM told) AS woken",
                &[
                    (&ids as &(dyn ToSql + Sync), Type::INT8_ARRAY),
                    (&JOBS_CHANNEL, Type::TEXT),
                ],
            )
        })?;
        Ok(rows
            .first()
            .map_or(0, |r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
    }

    /// Claims up to `n` claimable rows for `worker` in one statement: highest priority first,
    /// then oldest; rows locked by a concurrent claim are skipped, never waited for. Only rows
    /// whose tags are all in `tags` are taken. Each claimed row gets a new token and a lease
    /// of `lease` from the server's clock.
    pub fn claim(
        &self,
        worker: &str,
        tags: &[String],
        n: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedJob>> {
        let batch = format!("{:016x}", rand::random::<u64>());
        self.claim_as(&batch, worker, tags, n, lease)
    }

    /// [`Queue::claim`], its tokens prefixed with `batch`: sent again after its reply was lost
    /// with its connection, the claim finds the rows its first try took (running under this
    /// worker, with this prefix) and returns them, taking only what is left of `n`. Without
    /// that, those rows stayed running under tokens nobody held until their lease ran out.
    fn claim_as(
        &self,
        batch: &str,
        worker: &str,
        tags: &[String],
        n: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedJob>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let rows = self.with("claim steps", |c| {
            c.query_typed(
                "WITH prior AS (
                     SELECT id FROM runner_queue
                     WHERE state = 'running' AND locked_by = $1
                       AND starts_with(claim_token, $5 || ':')
                 ), next AS (
                     SELECT id FROM runner_queue
                     WHERE state = 'queued' AND available_at <= now() AND tags <@ $3::text[]
                     ORDER BY priority DESC, available_at, id
                     LIMIT greatest($2 - (SELECT count(*) FROM prior), 0)
                     FOR UPDATE SKIP LOCKED
                 ), took AS (
                     UPDATE runner_queue q
                     SET state = 'running', locked_by = $1,
                         claim_token = $5 || ':' || gen_random_uuid()::text,
                         claimed_at = now(), lease_until = now() + make_interval(secs => $4)
                     FROM next WHERE q.id = next.id
                     RETURNING q.id, q.claim_token, q.run_id, q.step_key, q.attempt,
                               q.priority, q.payload, q.rescues
                 )
                 SELECT * FROM took
                 UNION ALL
                 SELECT q.id, q.claim_token, q.run_id, q.step_key, q.attempt, q.priority,
                        q.payload, q.rescues
                 FROM runner_queue q JOIN prior ON q.id = prior.id",
                &[
                    (&worker as &(dyn ToSql + Sync), Type::TEXT),
                    (&limit as &(dyn ToSql + Sync), Type::INT8),
                    (&tags as &(dyn ToSql + Sync), Type::TEXT_ARRAY),
                    (&secs(lease) as &(dyn ToSql + Sync), Type::FLOAT8),
                    (&batch as &(dyn ToSql + Sync), Type::TEXT),
                ],
            )
        })?;
        let mut jobs: Vec<ClaimedJob> = rows
            .into_iter()
            .map(|r| ClaimedJob {
                id: r.get(0),
                token: r.get(1),
                run_id: r.get(2),
                step_key: r.get(3),
                attempt: u32::try_from(r.get::<_, i32>(4)).unwrap_or(0),
                priority: u8::try_from(r.get::<_, i16>(5)).unwrap_or(1),
                payload: r.get(6),
                rescues: u32::try_from(r.get::<_, i32>(7)).unwrap_or(0),
            })
            .collect();
        // RETURNING keeps no order: start the most urgent, oldest first.
        jobs.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.id));
        Ok(jobs)
    }

    /// Extends the leases of the rows `worker` holds (`(id, token)`), from the server's clock;
    /// returns the ids still held. A missing id was rescued or cancelled: its attempt should
    /// stop, its result would be dropped anyway.
    pub fn heartbeat(
        &self,
        worker: &str,
        held: &[(i64, String)],
        lease: Duration,
    ) -> Result<Vec<i64>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = held.iter().map(|h| h.0).collect();
        let tokens: Vec<&str> = held.iter().map(|h| h.1.as_str()).collect();
        let rows = self.with("extend leases", |c| {
            c.query_typed(
                "UPDATE runner_queue q SET lease_until = now() + make_interval(secs => $4)
                 FROM unnest($2::bigint[], $3::text[]) AS h(id, token)
                 WHERE q.id = h.id AND q.claim_token = h.token AND q.locked_by = $1
                   AND q.state = 'running'
                 RETURNING q.id",
                &[
                    (&worker as &(dyn ToSql + Sync), Type::TEXT),
                    (&ids as &(dyn ToSql + Sync), Type::INT8_ARRAY),
                    (&tokens as &(dyn ToSql + Sync), Type::TEXT_ARRAY),
                    (&secs(lease) as &(dyn ToSql + Sync), Type::FLOAT8),
                ],
            )
        })?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Records the results of claimed rows (`(id, token, result)`), fenced by their tokens,
    /// and tells the drivers; returns the ids recorded (now, or by an earlier call with the
    /// same claim). A row whose lease was taken (another token, or no longer running) is not
    /// touched: its late result is dropped.
    pub fn complete(&self, done: &[(i64, String, Value)]) -> Result<Vec<i64>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = done.iter().map(|d| d.0).collect();
        let tokens: Vec<&str> = done.iter().map(|d| d.1.as_str()).collect();
        let results: Vec<&Value> = done.iter().map(|d| &d.2).collect();
        let rows = self.with("record step results", |c| {
            c.query_typed(
                "WITH h AS (
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::jsonb[])
                         AS h(id, token, result)
                 ), d AS (
                     UPDATE runner_queue q
                     SET state = 'done', result = h.result, finished_at = now(),
                         lease_until = NULL
                     FROM h
                     WHERE q.id = h.id AND q.claim_token = h.token AND q.state = 'running'
                     RETURNING q.id
                 ), told AS (
                     SELECT id, pg_notify($4, id::text) FROM d
                 )
                 SELECT id FROM told
                 UNION ALL
                 -- Recorded by this very claim before (a reply lost with its connection, then
                 -- this retry): recorded, not dropped. (The statement's snapshot predates d.)
                 SELECT q.id FROM runner_queue q JOIN h ON q.id = h.id
                 WHERE q.claim_token = h.token AND q.state = 'done'",
                &[
                    (&ids as &(dyn ToSql + Sync), Type::INT8_ARRAY),
                    (&tokens as &(dyn ToSql + Sync), Type::TEXT_ARRAY),
                    (&results as &(dyn ToSql + Sync), Type::JSONB_ARRAY),
                    (&DONE_CHANNEL as &(dyn ToSql + Sync), Type::TEXT),
                ],
            )
        })?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Gives a claimed row back to the queue untouched (its worker stopped before running
    /// it); fenced like a completion, and not counted as a rescue.
    pub fn release(&self, id: i64, token: &str) -> Result<bool> {
        self.with("give a step back", |c| {
            let mut tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE runner_queue SET state = 'queued', locked_by = NULL, claim_token = NULL,
                     lease_until = NULL
                 WHERE id = $1 AND claim_token = $2 AND state = 'running'",
                &[&id, &token],
            )?;
            if n > 0 {
                tx.execute("SELECT pg_notify($1, '')", &[&JOBS_CHANNEL])?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    /// Puts running rows whose lease passed back in the queue (`rescues + 1`), or fails those
    /// already rescued `max_rescues` times; wakes claimers and drivers. Only one process of
    /// the fleet sweeps at a time; the others return at once with `swept: false`.
    pub fn rescue_expired(&self, max_rescues: u32) -> Result<Rescued> {
        let limit = i32::try_from(max_rescues).unwrap_or(i32::MAX);
        self.with("rescue expired leases", |c| {
            let mut tx = c.transaction()?;
            let locked: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&SWEEP_LOCK])?
                .get(0);
            if !locked {
                return Ok(Rescued::default());
            }
            let rows = tx.query(
                "WITH expired AS (
                     SELECT id FROM runner_queue
                     WHERE state = 'running' AND lease_until < now()
                     FOR UPDATE SKIP LOCKED
                 )
                 UPDATE runner_queue q
                 SET state = CASE WHEN q.rescues >= $1 THEN 'failed' ELSE 'queued' END,
                     error = CASE WHEN q.rescues >= $1 THEN format(
                         'the attempt''s worker stopped answering %s times (its lease of \
LEASE_TIMEOUT expired each time: the host died, or the attempt kills the process that runs \
it); given up after MAX_TAKEOVERS (%s) rescues — see the logs of the hosts that ran it \
(last: %s)', q.rescues + 1, $1, q.locked_by) END,
                     finished_at = CASE WHEN q.rescues >= $1 THEN now() END,
                     rescues = q.rescues + 1,
                     locked_by = NULL, claim_token = NULL, lease_until = NULL
                 FROM expired WHERE q.id = expired.id
                 RETURNING q.id, q.state",
                &[&limit],
            )?;
            let mut out = Rescued {
                swept: true,
                ..Rescued::default()
            };
            for r in rows {
                let id: i64 = r.get(0);
                if r.get::<_, &str>(1) == "queued" {
                    out.requeued.push(id);
                } else {
                    out.failed.push(id);
                }
            }
            if !out.requeued.is_empty() {
                tx.execute("SELECT pg_notify($1, '')", &[&JOBS_CHANNEL])?;
            }
            for id in &out.failed {
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&DONE_CHANNEL, &id.to_string() as &(dyn ToSql + Sync)],
                )?;
            }
            // Finished rows nobody took within a day: their driver is gone for good.
            tx.execute(
                "DELETE FROM runner_queue WHERE state IN ('done', 'failed')
                   AND finished_at < now() - interval '1 day'",
                &[],
            )?;
            // History writers' transaction numbers left by processes that died.
            tx.execute(
                "DELETE FROM runner_writer_batches WHERE at < now() - interval '1 day'",
                &[],
            )?;
            // Rows of runs that have ended: a driver died after the row finished and before
            // it took the result, and the run ended without it (cancelled, failed), or a
            // taken result's row outlived a dropped connection.
            tx.execute(
                "DELETE FROM runner_queue q WHERE q.state IN ('done', 'failed')
                   AND EXISTS (SELECT 1 FROM runner_executions r WHERE r.id = q.run_id
                               AND r.status IN ('success', 'error', 'cancelled'))",
                &[],
            )?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Returns the outcomes of the finished rows among `ids` and takes them out of the queue;
    /// the others (still queued or running) are left alone. [`Queue::finished`], then
    /// [`Queue::forget`].
    pub fn take_results(&self, ids: &[i64]) -> Result<Vec<(i64, Outcome)>> {
        let done: Vec<(i64, Outcome)> = self
            .finished(ids)?
            .into_iter()
            .filter(|d| d.1 != Outcome::Vanished)
            .collect();
        let taken: Vec<i64> = done.iter().map(|d| d.0).collect();
        self.forget(&taken)?;
        Ok(done)
    }

    /// The outcomes of the finished rows among `ids` (still queued or running: not listed;
    /// no longer in the queue: [`Outcome::Vanished`]).
    /// Read only: the rows go with [`Queue::forget`] once their driver has them, so a
    /// connection dropped in between never loses a result (the rows left are pruned once
    /// their run has ended).
    pub fn finished(&self, ids: &[i64]) -> Result<Vec<(i64, Outcome)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.with("read step results", |c| {
            c.query_typed(
                "SELECT id, state, result, error FROM runner_queue WHERE id = ANY($1)",
                &[(&ids, Type::INT8_ARRAY)],
            )
        })?;
        let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        let vanished: Vec<(i64, Outcome)> = ids
            .iter()
            .filter(|id| !present.contains(id))
            .map(|id| (*id, Outcome::Vanished))
            .collect();
        Ok(rows
            .into_iter()
            .filter(|r| matches!(r.get::<_, &str>(1), "done" | "failed"))
            .map(|r| {
                let id: i64 = r.get(0);
                let outcome = if r.get::<_, &str>(1) == "done" {
                    Outcome::Done(r.get::<_, Option<Value>>(2).unwrap_or(Value::Null))
                } else {
                    Outcome::Failed(
                        r.get::<_, Option<String>>(3)
                            .unwrap_or_else(|| "the queue gave the attempt up".into()),
                    )
                };
                (id, outcome)
            })
            .chain(vanished)
            .collect())
    }

    /// Deletes finished rows whose results their driver has.
    pub fn forget(&self, ids: &[i64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.with("take step results", |c| {
            c.execute(
                "DELETE FROM runner_queue WHERE id = ANY($1) AND state IN ('done', 'failed')",
                &[&ids],
            )
        })
    }

    /// The attempts of `run_id` still in the queue, whatever their state: `(step, attempt)`.
    /// A driver adopting the run waits for these (or takes their results) instead of asking
    /// again.
    pub fn attempts_of(&self, run_id: &str) -> Result<Vec<(String, u32)>> {
        let rows = self.with("read a run's queued steps", |c| {
            c.query(
                "SELECT step_key, attempt FROM runner_queue WHERE run_id = $1",
                &[&run_id],
            )
        })?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), u32::try_from(r.get::<_, i32>(1)).unwrap_or(0)))
            .collect())
    }

    /// Withdraws rows (their driver no longer waits: the run was cancelled or failed fast).
    /// A worker running one loses it at its next heartbeat, and its result is dropped.
    pub fn cancel(&self, ids: &[i64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.with("withdraw steps", |c| {
            c.execute("DELETE FROM runner_queue WHERE id = ANY($1)", &[&ids])
        })
    }

    /// Takes a place in `provider`'s fleet-wide rate limit (see [`super::limits`]).
    pub fn take_rate(
        &self,
        provider: &str,
        limit: u32,
        per: Duration,
    ) -> Result<super::limits::Take> {
        // One token for every try: a take whose reply was lost with its connection, sent
        // again, is told its place instead of taking a second one.
        let token = super::limits::token();
        self.with("take a place in a rate limit", |c| {
            super::limits::take(c, provider, limit, per, &token)
        })
    }

    /// Deletes rate-limit windows that are over.
    pub fn prune_rates(&self) -> Result<u64> {
        self.with("prune rate-limit windows", super::limits::prune)
    }

    /// Moves the queued rows of `run_id` to `priority` (running rows keep theirs); returns
    /// how many moved.
    pub fn set_run_priority(&self, run_id: &str, priority: u8) -> Result<u64> {
        let p = i16::from(priority.min(3));
        self.with("change a run's priority", |c| {
            c.execute(
                "UPDATE runner_queue SET priority = $2 WHERE run_id = $1 AND state = 'queued'",
                &[&run_id, &p],
            )
        })
    }

    /// Rows waiting to be claimed, by priority (indexed like `Priority::index`).
    pub fn depth(&self) -> Result<[u64; 4]> {
        let rows = self.with("count the queue", |c| {
            c.query(
                "SELECT priority, count(*) FROM runner_queue WHERE state = 'queued'
                 GROUP BY priority",
                &[],
            )
        })?;
        let mut out = [0u64; 4];
        for r in rows {
            let p = usize::try_from(r.get::<_, i16>(0)).unwrap_or(1).min(3);
            out[p] = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
        }
        Ok(out)
    }
}

/// Runs blocking queue work off the async runtime's threads (the driver runs its own
/// runtime and must not be entered from a tokio worker).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.0),
        Err(e) => Err(format!("a queue operation stopped abnormally ({e})")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::pg::testing::ScratchDb;
    use serde_json::json;
    use std::collections::HashSet;

    /// A client listening on the claimers' channel, as an idle process would.
    fn jobs_listener(db: &ScratchDb) -> postgres::Client {
        let mut l = db.target().connect().unwrap();
        l.batch_execute(&format!("LISTEN {JOBS_CHANNEL}")).unwrap();
        l
    }

    /// The wake-ups a listener has received since last asked (they reach it at its next
    /// exchange with the server).
    fn wake_ups(l: &mut postgres::Client) -> usize {
        l.batch_execute("SELECT 1").unwrap();
        postgres::fallible_iterator::FallibleIterator::count(l.notifications().iter()).unwrap()
    }

    fn queue(name: &str) -> Option<(ScratchDb, Queue)> {
        let db = ScratchDb::new(name)?;
        let q = Queue::new(db.target(), 4).unwrap();
        q.ensure_schema().unwrap();
        // Twice: a second process starting finds the tables there.
        q.ensure_schema().unwrap();
        Some((db, q))
    }

    fn job(run: &str, step: &str, priority: u8, tags: &[&str]) -> NewJob {
        NewJob {
            run_id: run.into(),
            step_key: step.into(),
            attempt: 1,
            priority,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            payload: json!({ "step": step }),
        }
    }

    fn lease() -> Duration {
        Duration::from_secs(30)
    }

    /// What the previous version of OmniFlow ran at start, outside the migrations: its text,
    /// kept here as that version shipped it.
    const PREVIOUS_QUEUE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS runner_queue (
    id bigserial PRIMARY KEY, run_id text NOT NULL, step_key text NOT NULL,
    attempt integer NOT NULL, priority smallint NOT NULL, tags text[] NOT NULL DEFAULT '{}',
    payload jsonb NOT NULL,
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed')),
    available_at timestamptz NOT NULL DEFAULT now(), locked_by text, claim_token text,
    claimed_at timestamptz, lease_until timestamptz, rescues integer NOT NULL DEFAULT 0,
    result jsonb, error text, finished_at timestamptz, UNIQUE (run_id, step_key, attempt)
);
CREATE INDEX IF NOT EXISTS runner_queue_next
    ON runner_queue (priority DESC, available_at, id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS runner_queue_leases
    ON runner_queue (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS runner_queue_finished
    ON runner_queue (finished_at) WHERE state IN ('done', 'failed');
CREATE TABLE IF NOT EXISTS runner_rate_windows (
    provider text NOT NULL, window_start timestamptz NOT NULL,
    window_end timestamptz NOT NULL, used integer NOT NULL,
    PRIMARY KEY (provider, window_start)
);
CREATE INDEX IF NOT EXISTS runner_rate_windows_end ON runner_rate_windows (window_end);
"#;

    #[test]
    fn a_database_whose_queue_the_previous_version_created_is_migrated_in_place() {
        let Some(db) = ScratchDb::new("queue_upgrade") else {
            return;
        };
        // The previous version: migration 1 recorded, the queue's tables made by the queue
        // itself, and a step waiting in it.
        let mut c = db.target().connect().unwrap();
        c.batch_execute(
            "CREATE TABLE omniflow_migrations (version BIGINT PRIMARY KEY,
                 description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .unwrap();
        c.batch_execute(crate::store::pg::schema::MIGRATIONS[0].1)
            .unwrap();
        c.execute(
            "INSERT INTO omniflow_migrations (version, description) VALUES (1, 'first')",
            &[],
        )
        .unwrap();
        c.batch_execute(PREVIOUS_QUEUE_SCHEMA).unwrap();
        let old = Queue::new(db.target(), 2).unwrap();
        let id = old.enqueue(&[job("r", "waiting", 1, &[])]).unwrap()[0];
        drop(old);

        // This version opens it: the migration finds the tables and records itself.
        let store = crate::store::Store::open_postgres(db.target()).unwrap();
        drop(store);
        let versions: Vec<i64> = c
            .query(
                "SELECT version FROM omniflow_migrations ORDER BY version",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Every migration is recorded once, the queue's among them.
        let every: Vec<i64> = (1..=crate::store::pg::schema::LATEST).collect();
        assert_eq!(versions, every);
        // The waiting step is still there, and the queue works.
        let q = Queue::new(db.target(), 2).unwrap();
        q.ensure_schema().unwrap();
        let got = q.claim("w", &[], 10, lease()).unwrap();
        assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), [id]);
        let id2 = q.enqueue(&[job("r", "new", 1, &[])]).unwrap()[0];
        assert!(id2 > id);
        assert_eq!(
            q.take_rate("openai", 1, Duration::from_secs(3600)).unwrap(),
            crate::store::pg::limits::Take::Granted
        );
    }

    #[test]
    fn a_fresh_database_gets_the_queue_from_the_migrations() {
        let Some(db) = ScratchDb::new("queue_fresh") else {
            return;
        };
        drop(crate::store::Store::open_postgres(db.target()).unwrap());
        let q = Queue::new(db.target(), 1).unwrap();
        q.enqueue(&[job("r", "a", 1, &[])]).unwrap();
        assert_eq!(q.depth().unwrap(), [0, 1, 0, 0]);
        // The migration takes the lock the previous version's processes take to create the
        // queue themselves, so the two cannot race during a rolling upgrade.
        assert!(MIGRATION.contains(&format!("pg_advisory_xact_lock({SCHEMA_LOCK})")));
    }

    #[test]
    fn claims_go_by_priority_then_age() {
        let Some((_db, q)) = queue("priority") else {
            return;
        };
        q.enqueue(&[job("r", "low", 0, &[]), job("r", "normal1", 1, &[])])
            .unwrap();
        q.enqueue(&[job("r", "critical", 3, &[]), job("r", "normal2", 1, &[])])
            .unwrap();
        q.enqueue(&[job("r", "high", 2, &[])]).unwrap();
        let mut order = Vec::new();
        while let Some(j) = q.claim("w", &[], 1, lease()).unwrap().pop() {
            order.push(j.step_key);
        }
        assert_eq!(order, ["critical", "high", "normal1", "normal2", "low"]);

        // A batch claim returns the same order.
        let ids = q
            .enqueue(&[
                job("s", "a", 1, &[]),
                job("s", "b", 3, &[]),
                job("s", "c", 1, &[]),
            ])
            .unwrap();
        let got: Vec<String> = q
            .claim("w", &[], 10, lease())
            .unwrap()
            .into_iter()
            .map(|j| j.step_key)
            .collect();
        assert_eq!(got, ["b", "a", "c"]);
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn concurrent_claimers_never_take_a_row_twice() {
        let Some((_db, q)) = queue("skip_locked") else {
            return;
        };
        let jobs: Vec<NewJob> = (0..400)
            .map(|i| job("r", &format!("s[{i}]"), (i % 4) as u8, &[]))
            .collect();
        q.enqueue(&jobs).unwrap();
        let claimed: Vec<Vec<i64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|w| {
                    let q = q.clone();
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        loop {
                            let got = q.claim(&format!("w{w}"), &[], 7, lease()).unwrap();
                            if got.is_empty() {
                                break mine;
                            }
                            mine.extend(got.into_iter().map(|j| j.id));
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: Vec<i64> = claimed.iter().flatten().copied().collect();
        let unique: HashSet<i64> = all.iter().copied().collect();
        assert_eq!(all.len(), 400, "every row claimed");
        assert_eq!(unique.len(), 400, "no row claimed twice");
    }

    #[test]
    fn a_zombie_after_rescue_cannot_complete() {
        let Some((db, q)) = queue("fencing") else {
            return;
        };
        let id = q.enqueue(&[job("r", "a", 1, &[])]).unwrap()[0];
        let zombie = q.claim("host-a", &[], 1, lease()).unwrap().remove(0);
        // Host A stops answering: its lease runs out (written directly, no waiting).
        let mut c = db.target().connect().unwrap();
        c.execute(
            "UPDATE runner_queue SET lease_until = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .unwrap();
        let swept = q.rescue_expired(3).unwrap();
        assert_eq!(swept.requeued, vec![id]);
        let fresh = q.claim("host-b", &[], 1, lease()).unwrap().remove(0);
        assert_eq!(fresh.id, id);
        assert_eq!(fresh.rescues, 1);
        assert_ne!(fresh.token, zombie.token);

        // The zombie wakes up: its heartbeat holds nothing, its result is dropped.
        let held = q
            .heartbeat("host-a", &[(id, zombie.token.clone())], lease())
            .unwrap();
        assert!(held.is_empty());
        let recorded = q
            .complete(&[(id, zombie.token, json!({ "by": "zombie" }))])
            .unwrap();
        assert!(recorded.is_empty());
        assert!(q.take_results(&[id]).unwrap().is_empty(), "still running");

        // The rightful worker's result is the one the driver gets.
        assert_eq!(
            q.heartbeat("host-b", &[(id, fresh.token.clone())], lease())
                .unwrap(),
            vec![id]
        );
        assert_eq!(
            q.complete(&[(id, fresh.token.clone(), json!({ "by": "b" }))])
                .unwrap(),
            vec![id]
        );
        // A second completion (a write retried after its reply was lost) is told the result
        // is recorded, and changes nothing.
        assert_eq!(
            q.complete(&[(id, fresh.token, json!({ "by": "again" }))])
                .unwrap(),
            vec![id]
        );
        assert_eq!(
            q.take_results(&[id]).unwrap(),
            vec![(id, Outcome::Done(json!({ "by": "b" })))]
        );
        assert!(q.take_results(&[id]).unwrap().is_empty(), "taken once");
    }

    /// The process whose sweep ran is told so (it then prunes the spent rate-limit windows,
    /// once for the fleet); one that found another process sweeping is told it did not, and
    /// leaves the expired rows to that one.
    #[test]
    fn a_sweep_says_whether_it_ran() {
        let Some((db, q)) = queue("sweep_ran") else {
            return;
        };
        let id = q.enqueue(&[job("r", "dead", 1, &[])]).unwrap()[0];
        let mut c = db.target().connect().unwrap();
        c.execute(
            "UPDATE runner_queue SET state = 'running', locked_by = 'gone', claim_token = 't',
                 lease_until = now() - interval '5 minutes' WHERE id = $1",
            &[&id],
        )
        .unwrap();
        let mut other = db.target().connect().unwrap();
        let mut sweeping = other.transaction().unwrap();
        sweeping
            .execute("SELECT pg_advisory_xact_lock($1)", &[&SWEEP_LOCK])
            .unwrap();
        let r = q.rescue_expired(3).unwrap();
        assert!(!r.swept);
        assert!(r.requeued.is_empty() && r.failed.is_empty());
        sweeping.rollback().unwrap();
        let r = q.rescue_expired(3).unwrap();
        assert!(r.swept);
        assert_eq!(r.requeued, vec![id]);
        // A sweep that finds nothing expired still ran.
        assert!(q.rescue_expired(3).unwrap().swept);
    }

    #[test]
    fn an_expired_lease_written_directly_is_rescued_exactly_once() {
        let Some((db, q)) = queue("rescue_once") else {
            return;
        };
        let ids = q
            .enqueue(&[job("r", "dead", 1, &[]), job("r", "alive", 1, &[])])
            .unwrap();
        let mut c = db.target().connect().unwrap();
        // One row claimed by a host that died long ago; one held by a live host.
        c.execute(
            "UPDATE runner_queue SET state = 'running', locked_by = 'gone', claim_token = 't',
                 lease_until = now() - interval '5 minutes' WHERE id = $1",
            &[&ids[0]],
        )
        .unwrap();
        c.execute(
            "UPDATE runner_queue SET state = 'running', locked_by = 'live', claim_token = 'u',
                 lease_until = now() + interval '5 minutes' WHERE id = $1",
            &[&ids[1]],
        )
        .unwrap();
        // Three sweepers at once, as three daemons would: the row goes back once.
        let results: Vec<Rescued> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    let q = q.clone();
                    s.spawn(move || q.rescue_expired(3).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let requeued: Vec<i64> = results.iter().flat_map(|r| r.requeued.clone()).collect();
        assert_eq!(requeued, vec![ids[0]]);
        assert!(q.rescue_expired(3).unwrap().requeued.is_empty());
        let row = c
            .query_one(
                "SELECT state, rescues, locked_by FROM runner_queue WHERE id = $1",
                &[&ids[0]],
            )
            .unwrap();
        assert_eq!(row.get::<_, &str>(0), "queued");
        assert_eq!(row.get::<_, i32>(1), 1);
        assert_eq!(row.get::<_, Option<String>>(2), None);
        let live = c
            .query_one("SELECT state FROM runner_queue WHERE id = $1", &[&ids[1]])
            .unwrap();
        assert_eq!(live.get::<_, &str>(0), "running");
    }

    #[test]
    fn a_row_that_keeps_losing_its_worker_is_given_up() {
        let Some((db, q)) = queue("rescue_limit") else {
            return;
        };
        let id = q.enqueue(&[job("r", "killer", 1, &[])]).unwrap()[0];
        let mut c = db.target().connect().unwrap();
        for round in 0..=2 {
            let j = q.claim("w", &[], 1, lease()).unwrap();
            assert_eq!(j.len(), 1, "round {round}");
            c.execute(
                "UPDATE runner_queue SET lease_until = now() - interval '1 second'",
                &[],
            )
            .unwrap();
            let r = q.rescue_expired(2).unwrap();
            if round < 2 {
                assert_eq!(r.requeued, vec![id]);
            } else {
                assert_eq!(r.failed, vec![id]);
            }
        }
        assert!(q.claim("w", &[], 1, lease()).unwrap().is_empty());
        let taken = q.take_results(&[id]).unwrap();
        let [(_, Outcome::Failed(why))] = taken.as_slice() else {
            panic!("{taken:?}");
        };
        assert!(
            why.contains("3 times") && why.contains("MAX_TAKEOVERS"),
            "{why}"
        );
    }

    #[test]
    fn tags_decide_who_takes_a_row() {
        let Some((_db, q)) = queue("tags") else {
            return;
        };
        q.enqueue(&[
            job("r", "plain", 1, &[]),
            job("r", "gpu", 1, &["gpu"]),
            job("r", "gpu-eu", 1, &["gpu", "eu"]),
            job("r", "us", 1, &["us"]),
        ])
        .unwrap();
        let steps = |v: Vec<ClaimedJob>| -> Vec<String> {
            let mut s: Vec<String> = v.into_iter().map(|j| j.step_key).collect();
            s.sort();
            s
        };
        // No tags: only untagged rows.
        let none = q.claim("untagged", &[], 10, lease()).unwrap();
        assert_eq!(steps(none), ["plain"]);
        // gpu,eu: rows whose every tag it has; not the `us` row.
        let tags = vec!["eu".to_string(), "gpu".to_string()];
        let got = q.claim("gpu-box", &tags, 10, lease()).unwrap();
        assert_eq!(steps(got), ["gpu", "gpu-eu"]);
        let us = q.claim("us-box", &["us".into()], 10, lease()).unwrap();
        assert_eq!(steps(us), ["us"]);
    }

    #[test]
    fn enqueueing_an_attempt_twice_keeps_one_row() {
        let Some((_db, q)) = queue("enqueue_twice") else {
            return;
        };
        let a = q.enqueue(&[job("r", "x", 1, &[])]).unwrap();
        let b = q.enqueue(&[job("r", "x", 1, &[])]).unwrap();
        assert_eq!(a, b);
        assert_eq!(q.depth().unwrap(), [0, 1, 0, 0]);
        assert_eq!(q.set_run_priority("r", 3).unwrap(), 1);
        assert_eq!(q.depth().unwrap(), [0, 0, 0, 1]);
        assert_eq!(q.cancel(&a).unwrap(), 1);
        assert_eq!(q.depth().unwrap(), [0, 0, 0, 0]);
    }

    /// The enqueuing process claims, in the insert, what a claim right after it would give
    /// it: its free workers' worth of the rows its tags allow, in claim order, less the
    /// claimable rows already ahead of them; the rest stay queued for anyone.
    #[test]
    fn an_enqueue_claims_for_the_free_workers_of_its_process() {
        let Some((_db, q)) = queue("enqueue_claiming") else {
            return;
        };
        let gpu = vec!["gpu".to_string()];
        let me = Claimer {
            worker: "host-a:1:1",
            tags: &gpu,
            free: 3,
            lease: lease(),
            hold_rest: None,
            tokens: None,
        };
        let got = q
            .enqueue_claiming(
                &[
                    job("r", "low", 0, &[]),
                    job("r", "n1", 1, &[]),
                    job("r", "cpu-only", 1, &["cpu"]),
                    job("r", "n2", 1, &["gpu"]),
                    job("r", "critical", 3, &[]),
                ],
                Some(&me),
            )
            .unwrap();
        let claimed: Vec<&str> = got
            .iter()
            .filter_map(|(_, c)| c.as_ref().map(|c| c.step_key.as_str()))
            .collect();
        // Claim order: critical, then the normal ones in the batch's order; "cpu-only" is not
        // this process's to take; three workers.
        assert_eq!(claimed, ["n1", "n2", "critical"]);
        for (id, c) in &got {
            if let Some(c) = c {
                assert_eq!(c.id, *id);
                assert!(!c.token.is_empty());
            }
        }
        // The other two wait for anyone, and the claimed ones complete with their tokens.
        assert_eq!(q.depth().unwrap(), [1, 1, 0, 0]);
        let done: Vec<(i64, String, Value)> = got
            .iter()
            .filter_map(|(_, c)| c.as_ref().map(|c| (c.id, c.token.clone(), json!("ok"))))
            .collect();
        assert_eq!(q.complete(&done).unwrap().len(), 3);

        // Two claimable rows already queued ahead (the low one is behind a normal row): with
        // three free workers, one new row is claimed in the insert, and the claimer takes the
        // two older ones next.
        let older = q
            .enqueue(&[job("r2", "old1", 1, &[]), job("r2", "old2", 2, &[])])
            .unwrap();
        let got = q
            .enqueue_claiming(
                &[job("r3", "new1", 1, &[]), job("r3", "new2", 1, &[])],
                Some(&me),
            )
            .unwrap();
        assert!(got[0].1.is_some() && got[1].1.is_none(), "{got:?}");
        let next: Vec<i64> = q
            .claim("host-a:1:1", &gpu, 2, lease())
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(next, [older[1], older[0]]);

        // Sent again after a reply lost with its connection: the same rows and claims.
        let again = q
            .enqueue_claiming(
                &[job("r3", "new1", 1, &[]), job("r3", "new2", 1, &[])],
                Some(&me),
            )
            .unwrap();
        assert_eq!(again, got);
        // Without a claimer (or no free worker) nothing is claimed.
        let none = q.enqueue_claiming(&[job("r4", "x", 1, &[])], None).unwrap();
        assert!(none[0].1.is_none());
    }

    /// An enqueuing process that started attempts before their insert chose their tokens:
    /// the rows it claims carry them (sent again, the same), and its results are recorded
    /// under them. A row it did not choose one for gets a new token.
    #[test]
    fn an_enqueue_claims_under_the_tokens_its_process_chose() {
        let Some((_db, q)) = queue("enqueue_tokens") else {
            return;
        };
        let chosen = [Some(new_token()), None];
        let me = Claimer {
            worker: "w",
            tags: &[],
            free: 2,
            lease: lease(),
            hold_rest: None,
            tokens: Some(&chosen),
        };
        let jobs = [job("r", "a", 1, &[]), job("r", "b", 1, &[])];
        let got = q.enqueue_claiming(&jobs, Some(&me)).unwrap();
        let a = got[0].1.clone().unwrap();
        let b = got[1].1.clone().unwrap();
        assert_eq!(Some(&a.token), chosen[0].as_ref());
        assert!(!b.token.is_empty() && Some(&b.token) != chosen[0].as_ref());
        assert_eq!(q.enqueue_claiming(&jobs, Some(&me)).unwrap(), got);
        let recorded = q
            .complete(&[(a.id, chosen[0].clone().unwrap(), json!("a"))])
            .unwrap();
        assert_eq!(recorded, vec![a.id]);
    }

    /// Claimers elsewhere are woken only when the insert leaves rows for them: a fan-out its
    /// own process takes whole wakes nobody.
    #[test]
    fn an_enqueue_that_leaves_no_row_queued_wakes_nobody() {
        let Some((db, q)) = queue("enqueue_quiet") else {
            return;
        };
        let mut listener = jobs_listener(&db);
        let me = Claimer {
            worker: "w",
            tags: &[],
            free: 2,
            lease: lease(),
            hold_rest: None,
            tokens: None,
        };
        q.enqueue_claiming(&[job("r", "a", 1, &[]), job("r", "b", 1, &[])], Some(&me))
            .unwrap();
        q.enqueue_claiming(
            &[
                job("r", "c", 1, &[]),
                job("r", "d", 1, &[]),
                job("r", "e", 1, &[]),
            ],
            Some(&me),
        )
        .unwrap();
        assert_eq!(
            wake_ups(&mut listener),
            1,
            "one wake-up, for the insert that left a row queued"
        );
        assert_eq!(q.depth().unwrap(), [0, 1, 0, 0]);
    }

    /// Rows held back by the enqueuing process are in no claim, and wake nobody, until it
    /// reveals them (or the hold runs out, if it died first).
    #[test]
    fn held_rows_are_claimable_once_revealed_or_once_the_hold_runs_out() {
        let Some((db, q)) = queue("enqueue_hold") else {
            return;
        };
        let mut listener = jobs_listener(&db);
        // A claimable row ahead leaves one of the two new rows unclaimed: held.
        q.enqueue(&[job("r0", "ahead", 1, &[])]).unwrap();
        assert_eq!(wake_ups(&mut listener), 1);
        let me = Claimer {
            worker: "w",
            tags: &[],
            free: 2,
            lease: lease(),
            hold_rest: Some(Duration::from_secs(3600)),
            tokens: None,
        };
        let got = q
            .enqueue_claiming(&[job("r", "a", 1, &[]), job("r", "b", 1, &[])], Some(&me))
            .unwrap();
        assert!(got[0].1.is_some() && got[1].1.is_none(), "{got:?}");
        assert_eq!(wake_ups(&mut listener), 0, "nobody is woken for a held row");
        let other: Vec<String> = q
            .claim("other", &[], 10, lease())
            .unwrap()
            .into_iter()
            .map(|j| j.step_key)
            .collect();
        assert_eq!(other, ["ahead"], "the held row is in no claim");
        assert_eq!(q.reveal(&[got[0].0, got[1].0]).unwrap(), 1);
        assert_eq!(wake_ups(&mut listener), 1);
        assert_eq!(q.reveal(&[got[1].0]).unwrap(), 0, "revealed once");
        let other = q.claim("other", &[], 10, lease()).unwrap();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].id, got[1].0);

        // A process that died before revealing: its rows come back when the hold runs out.
        q.enqueue(&[job("r2", "ahead", 1, &[])]).unwrap();
        let short = Claimer {
            hold_rest: Some(Duration::from_millis(300)),
            tokens: None,
            ..me
        };
        let got = q
            .enqueue_claiming(
                &[job("r2", "c", 1, &[]), job("r2", "d", 1, &[])],
                Some(&short),
            )
            .unwrap();
        let d = got[1].0;
        assert_eq!(q.claim("other", &[], 10, lease()).unwrap().len(), 1);
        std::thread::sleep(Duration::from_millis(400));
        let later = q.claim("other", &[], 10, lease()).unwrap();
        assert_eq!(later.iter().map(|j| j.id).collect::<Vec<_>>(), [d]);
    }

    /// A claim sent again after its reply was lost (same batch) gets back the rows its first
    /// try took, with their tokens, and takes only what is left of its count; another claim
    /// does not see them.
    #[test]
    fn a_claim_sent_again_gets_back_what_its_first_try_took() {
        let Some((_db, q)) = queue("claim_again") else {
            return;
        };
        let ids = q
            .enqueue(&[
                job("r", "a", 1, &[]),
                job("r", "b", 1, &[]),
                job("r", "c", 1, &[]),
                job("r", "d", 1, &[]),
            ])
            .unwrap();
        let first = q.claim_as("b1", "w", &[], 2, lease()).unwrap();
        assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), ids[..2]);
        let again = q.claim_as("b1", "w", &[], 3, lease()).unwrap();
        assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), ids[..3]);
        assert_eq!(again[..2], first[..], "the same rows, with the same tokens");
        // Completed with the tokens the retry returned: fenced as usual.
        let done: Vec<(i64, String, Value)> = again
            .iter()
            .map(|j| (j.id, j.token.clone(), json!("ok")))
            .collect();
        assert_eq!(q.complete(&done).unwrap().len(), 3);
        let other = q.claim("w", &[], 10, lease()).unwrap();
        assert_eq!(other.iter().map(|j| j.id).collect::<Vec<_>>(), ids[3..]);
        assert!(q.claim_as("b1", "w", &[], 10, lease()).unwrap().is_empty());
    }

    #[test]
    fn a_listener_hears_new_steps_and_reconnects() {
        let Some((db, q)) = queue("listen") else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = db.target().clone();
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            listen(
                &target,
                &[JOBS_CHANNEL, DONE_CHANNEL],
                Duration::from_millis(50),
                Duration::from_millis(100),
                &|| s2.load(std::sync::atomic::Ordering::Relaxed),
                &mut |h| {
                    let _ = tx.send(h);
                },
            )
        });
        let wait = |want: &dyn Fn(&Heard) -> bool| loop {
            let h = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            if want(&h) {
                break h;
            }
        };
        wait(&|h| *h == Heard::Connected);
        q.enqueue(&[job("r", "a", 1, &[])]).unwrap();
        wait(&|h| matches!(h, Heard::Notice(n) if n.channel == JOBS_CHANNEL));
        // The server drops the listening connection: the listener says so and comes back.
        let mut c = db.target().connect().unwrap();
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND query LIKE 'LISTEN%'",
            &[],
        )
        .unwrap();
        wait(&|h| matches!(h, Heard::Lost(_)));
        wait(&|h| *h == Heard::Connected);
        let j = q.claim("w", &[], 1, lease()).unwrap().remove(0);
        q.complete(&[(j.id, j.token, json!(1))]).unwrap();
        let heard = wait(&|h| matches!(h, Heard::Notice(n) if n.channel == DONE_CHANNEL));
        assert_eq!(
            heard,
            Heard::Notice(Notice {
                channel: DONE_CHANNEL.into(),
                payload: j.id.to_string()
            })
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
    }

    /// A worker that stops before running a step gives its row back: queued again for any
    /// claimer, who is woken. A release under a token that no longer holds the row (it was
    /// taken over) changes nothing and wakes nobody.
    #[test]
    fn a_released_row_is_queued_again_and_wakes_claimers_and_a_stale_release_does_nothing() {
        let Some((db, q)) = queue("release") else {
            return;
        };
        q.enqueue(&[job("r", "a", 1, &[])]).unwrap();
        let j = q.claim("w", &[], 1, lease()).unwrap().remove(0);
        let mut listener = jobs_listener(&db);
        assert!(!q.release(j.id, "a token taken over").unwrap());
        assert_eq!(
            q.depth().unwrap(),
            [0; 4],
            "a stale release queued the row again"
        );
        assert_eq!(wake_ups(&mut listener), 0, "a stale release woke claimers");
        assert!(q.release(j.id, &j.token).unwrap());
        assert_eq!(q.depth().unwrap(), [0, 1, 0, 0], "queued again");
        assert_eq!(wake_ups(&mut listener), 1, "claimers are told");
        // Given back untouched: the next claimer gets it, not counted as a rescue.
        let again = q.claim("w2", &[], 1, lease()).unwrap();
        assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), [j.id]);
        assert!(
            !q.release(j.id, &j.token).unwrap(),
            "the first claim's token is spent"
        );
    }

    /// Terminates the other sessions on `db` (a server restart, an administrator's
    /// `pg_terminate_backend`); their clients learn it at their next statement.
    fn drop_sessions(db: &ScratchDb) -> i64 {
        let mut c = db.target().connect().unwrap();
        c.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .len() as i64
    }

    /// Pooled connections the server dropped are each met by a statement, which goes on on
    /// another: the caller sees it succeed, not "connection closed".
    #[test]
    fn a_statement_goes_on_on_another_connection_when_the_server_dropped_its_pooled_ones() {
        let Some(db) = ScratchDb::new("queue_dropped") else {
            return;
        };
        let q = Queue::new(db.target(), 3).unwrap();
        q.ensure_schema().unwrap();
        // Three pooled connections, all idle.
        let barrier = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let c = q.conn().unwrap();
                    barrier.wait();
                    drop(c);
                });
            }
        });
        assert!(drop_sessions(&db) >= 3);
        q.enqueue(&[job("r", "a", 1, &[])]).unwrap();
        let j = q.claim("w", &[], 1, lease()).unwrap().remove(0);
        drop_sessions(&db);
        assert!(q.release(j.id, &j.token).unwrap());
        assert_eq!(q.depth().unwrap(), [0, 1, 0, 0]);
    }

    /// A statement whose every connection is dropped under it gives up after a few tries (one
    /// per pooled connection that may have been dropped, one on a new one, and the first),
    /// and says why; a statement the server refuses is not tried again at all.
    #[test]
    fn a_statement_that_keeps_losing_its_connection_gives_up_and_a_refused_one_is_not_retried() {
        let Some(db) = ScratchDb::new("queue_lost_always") else {
            return;
        };
        let q = Queue::new(db.target(), 2).unwrap();
        q.ensure_schema().unwrap();
        q.enqueue(&[job("r", "a", 1, &[])]).unwrap();
        let j = q.claim("w", &[], 1, lease()).unwrap().remove(0);
        let mut c = db.target().connect().unwrap();
        // Every try of the release counts itself (a sequence is not rolled back), then the
        // server ends its session, or refuses it.
        c.batch_execute(
            "CREATE SEQUENCE tries;
             CREATE TABLE how (kill boolean NOT NULL);
             INSERT INTO how VALUES (true);
             CREATE FUNCTION lose() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM nextval('tries');
                 IF (SELECT kill FROM how) THEN
                     PERFORM pg_terminate_backend(pg_backend_pid());
                     PERFORM pg_sleep(5);
                 END IF;
                 RAISE EXCEPTION 'refused';
             END $$;
             CREATE TRIGGER lose BEFORE UPDATE ON runner_queue
                 FOR EACH ROW EXECUTE FUNCTION lose();",
        )
        .unwrap();
        let tries = |c: &mut postgres::Client| -> i64 {
            c.query_one(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM tries",
                &[],
            )
            .unwrap()
            .get(0)
        };
        // On a thread of its own: a statement retried for ever fails the test, not hangs it.
        let release = |q: &Queue, token: String| {
            let (q, id) = (q.clone(), j.id);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(q.release(id, &token));
            });
            rx.recv_timeout(Duration::from_secs(60))
                .expect("the release was tried for ever")
        };
        let err = release(&q, j.token.clone()).unwrap_err().to_string();
        assert!(err.contains("give a step back"), "{err}");
        assert_eq!(tries(&mut c), 4, "tries with 2 pooled connections");
        c.batch_execute("UPDATE how SET kill = false; ALTER SEQUENCE tries RESTART")
            .unwrap();
        let err = release(&q, j.token.clone()).unwrap_err().to_string();
        assert!(err.contains("refused"), "{err}");
        assert_eq!(tries(&mut c), 1, "a refused statement was tried again");
    }
}
