//! Scratch PostgreSQL databases for tests: each test gets its own database, dropped when the
//! handle goes. `OMNIFLOW_TEST_PG` names the server (CI sets it and a missing server fails
//! the test); without it, `postgres://postgres@127.0.0.1:5432/postgres` is tried and a missing
//! server skips the test with one line saying so.

// Test support: a test that cannot get its database must stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::connect::PgTarget;
use std::sync::atomic::{AtomicU32, Ordering};

const DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database that exists for one test.
pub struct ScratchDb {
    admin: PgTarget,
    name: String,
    target: PgTarget,
    url: String,
}

impl ScratchDb {
    /// A fresh empty database, or `None` (after printing "skipped: no PostgreSQL at …") when
    /// no server answers and `OMNIFLOW_TEST_PG` is unset. Panics when `OMNIFLOW_TEST_PG` is
    /// set and its server does not answer: CI must not pass by skipping.
    pub fn new(test: &str) -> Option<ScratchDb> {
        let required = std::env::var("OMNIFLOW_TEST_PG")
            .ok()
            .filter(|s| !s.is_empty());
        let url = required.clone().unwrap_or_else(|| DEFAULT.to_string());
        let admin = PgTarget::parse(&url).expect("OMNIFLOW_TEST_PG is a PostgreSQL URL");
        // The driver runs its own runtime; a test on a tokio runtime must not block it.
        let mut client = match std::thread::scope(|s| s.spawn(|| admin.connect()).join()) {
            Ok(Ok(c)) => c,
            Ok(Err(_)) | Err(_) if required.is_none() => {
                eprintln!("skipped: no PostgreSQL at {} ({test})", admin.shown());
                return None;
            }
            Ok(Err(e)) => panic!("OMNIFLOW_TEST_PG is set but PostgreSQL does not answer: {e}"),
            Err(_) => panic!("connecting to OMNIFLOW_TEST_PG panicked"),
        };
        static N: AtomicU32 = AtomicU32::new(0);
        let slug: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!(
            "omniflow_t_{slug}_{}_{}_{:04x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u16>()
        );
        let create = format!("CREATE DATABASE \"{name}\"");
        // Moved into the thread so that it is also dropped there (dropping a client drives
        // the driver's runtime too).
        std::thread::scope(|s| s.spawn(move || client.batch_execute(&create)).join())
            .expect("CREATE DATABASE did not panic")
            .unwrap_or_else(|e| panic!("cannot create the scratch database {name}: {e}"));
        let target = admin.with_dbname(&name);
        let url = to_url(&url, &name);
        Some(ScratchDb {
            admin,
            name,
            target,
            url,
        })
    }

    /// The scratch database, parsed.
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The scratch database as a `DATABASE_URL` for a child process.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The server URL with its path replaced by `db`.
fn to_url(server: &str, db: &str) -> String {
    match url::Url::parse(server) {
        Ok(mut u) if server.contains("://") => {
            u.set_path(&format!("/{db}"));
            u.to_string()
        }
        _ => format!("{server} dbname={db}"),
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Best effort: a test that failed still leaves the server clean when it can.
        let _ =
            std::thread::spawn(move || admin.connect().map(|mut c| c.batch_execute(&drop))).join();
    }
}

/// Another transaction on `target`, on a thread of its own, does `work` and stays open until
/// told (or the sender is dropped), then rolls back: what it locked stays locked meanwhile.
/// Returns once `work` is done.
pub fn held_transaction(
    target: PgTarget,
    work: impl FnOnce(&mut postgres::Transaction<'_>) + Send + 'static,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let mut c = target.connect().unwrap();
        let mut tx = c.transaction().unwrap();
        work(&mut tx);
        done_tx.send(()).unwrap();
        let _ = released.recv();
        tx.rollback().unwrap();
    });
    done.recv().unwrap();
    (release, holder)
}
