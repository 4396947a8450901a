//! The process's one pool of PostgreSQL connections: the history's reads (the store's reader
//! threads) and every statement of the fleet's queue share it. Only the history writer (one
//! transaction after another, its prepared statements kept) and the `LISTEN` connection stay
//! dedicated. Its size comes from `CONCURRENCY` ([`super::connect::pool_size`]); connections
//! are opened when needed and closed after a minute unused, so an idle process holds few.

use super::connect::PgTarget;
use r2d2_postgres::r2d2;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

pub(crate) type Manager = r2d2_postgres::PostgresConnectionManager<MakeRustlsConnect>;
pub(crate) type Pooled = r2d2::PooledConnection<Manager>;

/// A handle on the pool; cheap to clone.
#[derive(Clone)]
pub struct PgPool {
    pool: Arc<OffRuntime>,
    target: PgTarget,
    size: u32,
}

impl std::fmt::Debug for PgPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPool")
            .field("target", &self.target)
            .field("size", &self.size)
            .finish()
    }
}

/// The pool, dropped on a plain thread: closing a blocking client runs the driver's own
/// runtime, which panics on an async runtime's thread (where the last handle may well go).
struct OffRuntime(Option<r2d2::Pool<Manager>>);

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("pg-pool-close".into())
                .spawn(move || drop(pool));
        }
    }
}

/// Plans every query with its parameters and the tables' current size: the history's
/// filtered pages differ a lot in which index suits them, and a generic plan fixed while the
/// tables were small would stay. The queue's statements are sent unnamed, planned each time
/// anyway. PostgreSQL 11 has no such setting and keeps its default.
#[derive(Debug)]
struct CustomPlans;

impl r2d2::CustomizeConnection<postgres::Client, postgres::Error> for CustomPlans {
    fn on_acquire(&self, c: &mut postgres::Client) -> Result<(), postgres::Error> {
        if let Err(e) = c.batch_execute("SET plan_cache_mode = force_custom_plan") {
            tracing::debug!(error = %e, "plan_cache_mode is not available; keeping the default");
        }
        Ok(())
    }
}

/// The pool's connections commit without waiting for the WAL to reach the disk
/// (`synchronous_commit = off`, a setting PostgreSQL allows per session). What they write is
/// coordination, not history — queue rows, process heartbeats, a console's cancel or
/// priority request; the history, claims of runs and slots, and sent notifications go
/// through the writer's connection. A queue statement: a server crash can lose the last fraction of a second of
/// them, and each such loss is one the queue already recovers from — a lost insert reads as
/// a vanished row and is enqueued again, a lost claim or completion leaves the row to its
/// lease and it runs again, exactly like a reply lost with its connection. The history's
/// writer keeps the server's setting. Waiting for the disk made every enqueue and every
/// completion one flush long (several milliseconds on a busy disk), on a fan-out's path.
fn coordination(config: &postgres::Config) -> postgres::Config {
    let mut c = config.clone();
    let options = match config.get_options() {
        Some(o) if !o.trim().is_empty() => format!("{o} -c synchronous_commit=off"),
        _ => "-c synchronous_commit=off".to_string(),
    };
    c.options(&options);
    c
}

impl PgPool {
    /// A pool of at most `target.pool_size()` connections to `target`; nothing is connected
    /// here. Blocking use only: call its connections off the async runtime's threads.
    pub fn new(target: &PgTarget) -> Result<PgPool, String> {
        PgPool::sized(target, target.pool_size())
    }

    /// A pool of at most `connections` connections.
    pub fn sized(target: &PgTarget, connections: u32) -> Result<PgPool, String> {
        let size = connections.max(1);
        let manager = Manager::new(coordination(target.config()), target.connector()?);
        let pool = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .idle_timeout(Some(Duration::from_secs(60)))
            .connection_timeout(Duration::from_secs(10))
            // A connection the server dropped fails its next statement, which its user tries
            // again on another; a broken one is not put back (`has_broken`).
            .test_on_check_out(false)
            .connection_customizer(Box::new(CustomPlans))
            .build_unchecked(manager);
        Ok(PgPool {
            pool: Arc::new(OffRuntime(Some(pool))),
            target: target.clone(),
            size,
        })
    }

    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// At most this many connections; also how many dropped connections one statement may
    /// meet before it gives up.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// A connection, waiting up to 10 s for one to be free; the error names the fix.
    pub(crate) fn get(&self) -> Result<Pooled, String> {
        let Some(pool) = &self.pool.0 else {
            return Err("the connection pool is closed".into());
        };
        pool.get().map_err(|e| {
            format!(
                "cannot reach PostgreSQL at {} ({e}); check DATABASE_URL and that the server is up",
                self.target.shown()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pg::testing::ScratchDb;

    /// What the pool's sessions run with: every query planned with its parameters (a generic
    /// plan fixed while the tables were small would stay), and commits that do not wait for
    /// the disk (coordination rows only; the history's writer keeps the server's setting).
    #[test]
    fn pooled_sessions_plan_each_query_and_commit_without_waiting_for_the_disk() {
        let Some(db) = ScratchDb::new("pool_settings") else {
            return;
        };
        let pool = PgPool::sized(db.target(), 1).unwrap();
        let mut c = pool.get().unwrap();
        let show = |c: &mut Pooled, name: &str| -> String {
            c.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0)
        };
        assert_eq!(show(&mut c, "plan_cache_mode"), "force_custom_plan");
        assert_eq!(show(&mut c, "synchronous_commit"), "off");
    }

    /// Session options in `DATABASE_URL` (`options=-c …`) hold on the pool's connections
    /// too, next to the pool's own setting.
    #[test]
    fn the_url_s_session_options_are_kept_on_pooled_sessions() {
        let Some(db) = ScratchDb::new("pool_options") else {
            return;
        };
        let url = format!(
            "{}{}options=-c%20statement_timeout%3D54321",
            db.url(),
            if db.url().contains('?') { "&" } else { "?" }
        );
        let target = PgTarget::parse(&url).unwrap();
        let pool = PgPool::sized(&target, 1).unwrap();
        let mut c = pool.get().unwrap();
        let show = |c: &mut Pooled, name: &str| -> String {
            c.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0)
        };
        assert_eq!(show(&mut c, "statement_timeout"), "54321ms");
        assert_eq!(show(&mut c, "synchronous_commit"), "off");
    }
}
