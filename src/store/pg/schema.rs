//! The PostgreSQL tables: the same tables and columns as SQLite's (`store/schema.rs`), with
//! times as `timestamptz`, flags as `boolean` and ids compared byte by byte (`COLLATE "C"`,
//! so history pages sort as on SQLite whatever the server's locale).
//!
//! Versioned migrations recorded in `omniflow_migrations`, applied at open under an advisory
//! lock: three processes starting together apply each migration once, and the others wait and
//! find it done. A database migrated by a newer omniflow is refused before anything is
//! written, as SQLite's `NewerSchema` is.

use super::backend::pg_error;
use super::connect::PgTarget;
use crate::store::error::StoreError;
use postgres::Client;

/// The advisory lock key that serialises migrations (any constant; "omniflow" in ASCII).
const MIGRATION_LOCK: i64 = 0x6f6d_6e69_666c_6f77;

/// Migration `i` (0-based) is version `i + 1`. Append only: a released migration is never
/// edited, because databases in the field already ran it.
pub(crate) const MIGRATIONS: &[(&str, &str)] = &[
    (
        "runs, steps, attempts, processes, notifications, schedule slots, provider cache",
        r#"
    CREATE TABLE runner_executions (
        id                TEXT COLLATE "C" PRIMARY KEY,
        blueprint_name    TEXT NOT NULL,
        status            TEXT NOT NULL
                          CHECK (status IN ('queued','running','success','error','cancelled')),
        priority          TEXT NOT NULL,
        trigger           TEXT NOT NULL,
        sandbox           BOOLEAN NOT NULL,
        seed              BIGINT,
        simulate_failures DOUBLE PRECISION,
        variables         TEXT,
        blueprint         TEXT,
        parent_run_id     TEXT,
        queued_at         TIMESTAMPTZ NOT NULL,
        -- The queue time until the run starts (see SQLite's schema).
        started_at        TIMESTAMPTZ,
        finished_at       TIMESTAMPTZ,
        total_time_ms     BIGINT,
        tokens_used       BIGINT NOT NULL DEFAULT 0,
        steps_total       BIGINT,
        steps_done        BIGINT,
        error             TEXT,
        error_kind        TEXT,
        failed_step       TEXT,
        host              TEXT,
        pid               BIGINT,
        owner             TEXT,
        takeovers         BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX runner_executions_started ON runner_executions (started_at DESC, id DESC);
    CREATE INDEX runner_executions_status ON runner_executions (status, started_at DESC, id DESC);
    CREATE INDEX runner_executions_blueprint
        ON runner_executions (blueprint_name, started_at DESC, id DESC);
    CREATE INDEX runner_executions_unfinished ON runner_executions (queued_at)
        WHERE status IN ('queued', 'running');

    CREATE TABLE runner_steps (
        run_id        TEXT COLLATE "C" NOT NULL REFERENCES runner_executions (id) ON DELETE CASCADE,
        step_key      TEXT COLLATE "C" NOT NULL,
        node_id       TEXT NOT NULL,
        item_index    BIGINT,
        status        TEXT NOT NULL CHECK (status IN
                      ('pending','running','retrying','success','error','skipped','cancelled')),
        attempts      BIGINT NOT NULL DEFAULT 0,
        input         TEXT,
        output        TEXT,
        error_kind    TEXT,
        error         TEXT,
        tokens_used   BIGINT NOT NULL DEFAULT 0,
        cached        BOOLEAN NOT NULL DEFAULT FALSE,
        provider      TEXT,
        model         TEXT,
        queued_at     TIMESTAMPTZ,
        started_at    TIMESTAMPTZ,
        finished_at   TIMESTAMPTZ,
        duration_ms   BIGINT,
        -- Insertion order: graph order for display. One sequence for the whole table (not
        -- MAX(seq) + 1 per run as on SQLite): no lookup per insert, and processes inserting
        -- steps of one run at once still get distinct, ordered values.
        seq           BIGSERIAL,
        reply_model   TEXT,
        finish_reason TEXT,
        PRIMARY KEY (run_id, step_key)
    );
    -- No (run_id, seq) index, unlike SQLite: the primary key serves a run's steps (sorted by
    -- seq after), and a second index led by run_id lets a plan made while the table was empty
    -- look a step up by run_id alone, scanning all of a large run's steps for each write.

    CREATE TABLE runner_attempts (
        run_id      TEXT COLLATE "C" NOT NULL,
        step_key    TEXT COLLATE "C" NOT NULL,
        attempt     BIGINT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('success','error')),
        error_kind  TEXT,
        error       TEXT,
        wait_ms     BIGINT,
        started_at  TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ NOT NULL,
        duration_ms BIGINT NOT NULL,
        tokens_used BIGINT NOT NULL DEFAULT 0,
        provider    TEXT,
        model       TEXT,
        cached      BOOLEAN NOT NULL DEFAULT FALSE,
        fallback    TEXT,
        PRIMARY KEY (run_id, step_key, attempt),
        FOREIGN KEY (run_id, step_key) REFERENCES runner_steps (run_id, step_key)
            ON DELETE CASCADE
    );

    -- Heartbeats are the database's time (`now()`), never a host's: hosts' clocks differ.
    CREATE TABLE runner_processes (
        id            TEXT PRIMARY KEY,
        host          TEXT,
        pid           BIGINT NOT NULL,
        role          TEXT NOT NULL,
        version       TEXT NOT NULL,
        started_at    TIMESTAMPTZ NOT NULL,
        heartbeat_at  TIMESTAMPTZ NOT NULL,
        heartbeat_ms  BIGINT NOT NULL,
        stopped_at    TIMESTAMPTZ,
        rss_mb        DOUBLE PRECISION,
        memory_hold   BOOLEAN NOT NULL DEFAULT FALSE,
        paused        BOOLEAN NOT NULL DEFAULT FALSE,
        queued        BIGINT NOT NULL DEFAULT 0,
        running       BIGINT NOT NULL DEFAULT 0,
        completed     BIGINT NOT NULL DEFAULT 0,
        failed        BIGINT NOT NULL DEFAULT 0,
        concurrency   BIGINT
    );

    CREATE TABLE notifications_sent (
        dedupe_key  TEXT PRIMARY KEY,
        run_id      TEXT NOT NULL,
        step_key    TEXT NOT NULL,
        channel     TEXT NOT NULL,
        part        BIGINT NOT NULL,
        sent_at     TIMESTAMPTZ NOT NULL,
        message_ids TEXT,
        -- Insertion order for parts sent within the same microsecond.
        seq         BIGSERIAL
    );
    CREATE INDEX notifications_sent_run ON notifications_sent (run_id);

    -- The unique key is what makes a slot fire once in the fleet: whoever inserts it runs it.
    CREATE TABLE schedule_slots (
        blueprint_name TEXT NOT NULL,
        slot_ms        BIGINT NOT NULL,
        slot           TIMESTAMPTZ NOT NULL,
        claimed_at     TIMESTAMPTZ NOT NULL,
        run_id         TEXT,
        host           TEXT,
        pid            BIGINT,
        PRIMARY KEY (blueprint_name, slot_ms)
    );

    CREATE TABLE provider_cache (
        key         TEXT PRIMARY KEY,
        provider    TEXT NOT NULL,
        model       TEXT NOT NULL,
        output      TEXT NOT NULL,
        tokens_used BIGINT NOT NULL DEFAULT 0,
        created_at  TIMESTAMPTZ NOT NULL,
        expires_at  TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX provider_cache_expires ON provider_cache (expires_at);
    "#,
    ),
    (
        "the fleet's queue of step attempts and its rate-limit windows",
        super::queue::MIGRATION,
    ),
    (
        "notification parts: intent recorded before sending (state)",
        // A part's intent (`sending`) is committed before it is sent, its delivery (`sent`)
        // after; rows from before were all delivered.
        r#"
    ALTER TABLE notifications_sent ADD COLUMN state TEXT NOT NULL DEFAULT 'sent'
        CHECK (state IN ('sending', 'sent'));
    "#,
    ),
    (
        "requests to a run's driver: cancel, priority",
        super::fleet_view::MIGRATION,
    ),
    (
        "fleet rate-limit places by token (a take sent again counts once)",
        super::limits::MIGRATION,
    ),
    (
        "the history writers' last transaction numbers (a batch replayed after a lost commit reply)",
        // One row per writer, updated in each of its transactions: after its connection
        // dropped during a commit, the writer reads whether that transaction's number is
        // here before applying the batch again.
        r#"
    CREATE TABLE runner_writer_batches (
        writer TEXT PRIMARY KEY,
        batch  BIGINT NOT NULL,
        at     TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    "#,
    ),
];

/// The newest migration this build knows.
pub const LATEST: i64 = MIGRATIONS.len() as i64;

/// Applies what is missing, under the advisory lock; refuses a newer database.
pub(crate) fn migrate(client: &mut Client, target: &PgTarget) -> Result<(), StoreError> {
    let e = |doing: &'static str| move |err| pg_error(target, doing, err);
    // Everything below, the migrations table included, under one lock: processes starting
    // together wait here and find the work done.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(e("locking the migrations"))?;
    // Created only when missing: PostgreSQL checks the CREATE privilege before it looks for
    // the table, so `CREATE TABLE IF NOT EXISTS` would refuse a user who reads and writes a
    // database its owner migrated but may not create tables (what `doctor` calls fine).
    let result = client
        .query_one("SELECT to_regclass('omniflow_migrations') IS NULL", &[])
        .map_err(e("looking for the migrations table"))
        .and_then(|missing| {
            if missing.get::<_, bool>(0) {
                client
                    .batch_execute(
                        "CREATE TABLE omniflow_migrations (
                             version     BIGINT PRIMARY KEY,
                             description TEXT NOT NULL,
                             applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
                         )",
                    )
                    .map_err(e("creating the migrations table"))?;
            }
            migrate_locked(client, target)
        });
    // Unlocked on every path; a dropped connection releases it anyway.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    result
}

fn migrate_locked(client: &mut Client, target: &PgTarget) -> Result<(), StoreError> {
    let e = |doing: &'static str| move |err| pg_error(target, doing, err);
    let current: i64 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM omniflow_migrations",
            &[],
        )
        .map_err(e("reading the migrations"))?
        .get(0);
    if current > LATEST {
        return Err(StoreError::NewerMigrations {
            place: target.shown().to_string(),
            found: current,
            known: LATEST,
        });
    }
    for (i, (description, sql)) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current {
            continue;
        }
        let mut tx = client.transaction().map_err(e("migrating"))?;
        tx.batch_execute(sql).map_err(|err| {
            tracing::error!(version, error = %err, "PostgreSQL migration failed");
            pg_error(target, "migrating", err)
        })?;
        tx.execute(
            "INSERT INTO omniflow_migrations (version, description) VALUES ($1, $2)",
            &[&version, description],
        )
        .map_err(e("recording a migration"))?;
        tx.commit().map_err(e("committing a migration"))?;
        tracing::info!(database = %target.shown(), version, "PostgreSQL database migrated");
    }
    Ok(())
}

/// The newest migration recorded in the database (0 when none), for `omniflow doctor`.
pub(crate) fn applied(client: &mut Client) -> Result<i64, postgres::Error> {
    Ok(client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM omniflow_migrations",
            &[],
        )?
        .get(0))
}
