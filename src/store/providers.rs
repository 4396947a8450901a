//! What the providers layer keeps in the store: the model-answer cache
//! (`provider_cache`) and, per attempt, the providers an `auto` chain skipped before one
//! answered (`runner_attempts.fallback`). Writes go through the writer thread like every
//! other transition; reads use the pooled read-only connections.

use super::{iso8601, saturating_i64, Store, StoreError};
use rusqlite::{params, OptionalExtension, Transaction};
use std::time::{SystemTime, UNIX_EPOCH};

/// A cached model answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAnswer {
    /// `providers::cache_key` of the call.
    pub key: String,
    /// The provider and model that produced it.
    pub provider: String,
    pub model: String,
    pub output: String,
    pub tokens_used: u64,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Inserts or replaces an entry, and prunes the expired ones (cheap: indexed).
pub(crate) fn cache_put(tx: &Transaction<'_>, c: &CachedAnswer) -> rusqlite::Result<usize> {
    tx.prepare_cached("DELETE FROM provider_cache WHERE expires_at <= ?1")?
        .execute([unix_ms(c.created_at)])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO provider_cache
             (key, provider, model, output, tokens_used, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        c.key,
        c.provider,
        c.model,
        c.output,
        saturating_i64(c.tokens_used),
        iso8601(c.created_at),
        unix_ms(c.expires_at)
    ])
}

pub(crate) fn attempt_fallback(
    tx: &Transaction<'_>,
    run_id: &str,
    step_key: &str,
    attempt: u32,
    note: &str,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "UPDATE runner_attempts SET fallback = ?4
         WHERE run_id = ?1 AND step_key = ?2 AND attempt = ?3",
    )?
    .execute(params![run_id, step_key, attempt, note])
}

impl Store {
    /// Queues a cache entry (replacing one with the same key).
    pub fn cache_put(&self, entry: CachedAnswer) {
        self.write(super::transitions::Op::CachePut(Box::new(entry)));
    }

    /// The unexpired entry for `key` at `now`, if any.
    pub fn cache_get(
        &self,
        key: &str,
        now: SystemTime,
    ) -> Result<Option<CachedAnswer>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.cache_get(key, now);
        }
        let now_ms = unix_ms(now);
        self.read("reading the response cache", |c| {
            c.prepare_cached(
                "SELECT provider, model, output, tokens_used, created_at, expires_at
                 FROM provider_cache WHERE key = ?1 AND expires_at > ?2",
            )?
            .query_row(params![key, now_ms], |r| {
                let created: String = r.get(4)?;
                let expires: i64 = r.get(5)?;
                Ok(CachedAnswer {
                    key: key.to_string(),
                    provider: r.get(0)?,
                    model: r.get(1)?,
                    output: r.get(2)?,
                    tokens_used: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                    created_at: humantime::parse_rfc3339(&created).unwrap_or(UNIX_EPOCH),
                    expires_at: UNIX_EPOCH
                        + std::time::Duration::from_millis(u64::try_from(expires).unwrap_or(0)),
                })
            })
            .optional()
        })
    }

    /// Records which providers an attempt skipped before one answered (after the attempt
    /// itself was recorded; the writer keeps the order).
    pub fn attempt_fallback(&self, run_id: &str, step_key: &str, attempt: u32, note: &str) {
        self.write(super::transitions::Op::AttemptFallback {
            run_id: run_id.to_string(),
            step_key: step_key.to_string(),
            attempt,
            note: note.to_string(),
        });
    }

    /// `(step_key, attempt, note)` of every attempt of a run answered by a fallback provider.
    pub fn run_fallbacks(&self, run_id: &str) -> Result<Vec<(String, u32, String)>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.run_fallbacks(run_id);
        }
        self.read("reading a run's provider fallbacks", |c| {
            c.prepare_cached(
                "SELECT step_key, attempt, fallback FROM runner_attempts
                 WHERE run_id = ?1 AND fallback IS NOT NULL ORDER BY step_key, attempt",
            )?
            .query_map([run_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect()
        })
    }

    /// The schema version of the file (`PRAGMA user_version`), or on PostgreSQL the newest
    /// migration applied (`omniflow_migrations`), for `omniflow doctor`.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.schema_version();
        }
        self.read("reading the schema version", |c| {
            c.pragma_query_value(None, "user_version", |r| r.get(0))
        })
    }
}
