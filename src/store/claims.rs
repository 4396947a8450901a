//! Claims that must be decided at once, not merely queued: "was this message already
//! delivered?" and "does this process fire this schedule slot?". The writes are asks to the
//! writer thread (`asks.rs`): applied after what was queued before them, committed in their
//! own transaction before the call returns. The checks are reads on the readers'
//! connections. Blocking: call them from `spawn_blocking` or plain threads.
//!
//! - `notifications_sent`: checked before a message part is sent, recorded right after the
//!   service accepted it. The window between the service's reply and the commit (a few
//!   milliseconds) is the only way a message can go out twice: if the process dies exactly
//!   there, a resumed run sends that part again (at-least-once; Telegram has no idempotency
//!   key that would let us do better).
//! - `schedule_slots`: `INSERT OR IGNORE` on `(blueprint_name, slot_ms)` inside
//!   `BEGIN IMMEDIATE`: of any number of processes on one database, exactly one gets `true`.

use super::asks::{Ask, Reply};
use super::error::StoreError;
use super::transitions::ProcessInfo;
use super::{iso8601, Store};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One delivered message part.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRecord {
    pub dedupe_key: String,
    pub run_id: String,
    pub step_key: String,
    pub channel: String,
    pub part: u32,
    /// What the service returned to identify the message (e.g. Telegram's `message_id`).
    pub message_ids: Value,
}

/// A schedule slot as claimed in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotClaim {
    pub blueprint: String,
    pub slot: SystemTime,
    pub run_id: Option<String>,
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Store {
    /// Sends an ask to the writer and waits, blocking this thread, for its answer.
    pub(super) fn ask_blocking<T>(
        &self,
        ask: impl FnOnce(Reply<T>) -> Ask,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let ask = ask(Reply::Blocking(tx));
        let doing = ask.doing();
        if !self.send(super::Msg::Ask(ask)) {
            return Err(super::asks::writer_stopped(self.place(), doing));
        }
        // The writer dropped the reply without answering: it stopped (panicked) meanwhile.
        rx.recv()
            .unwrap_or_else(|_| Err(super::asks::writer_stopped(self.place(), doing)))
    }

    /// Like [`Store::ask_blocking`], waiting without blocking the thread.
    pub(super) async fn ask<T>(&self, ask: impl FnOnce(Reply<T>) -> Ask) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ask = ask(Reply::Async(tx));
        let doing = ask.doing();
        if !self.send(super::Msg::Ask(ask)) {
            return Err(super::asks::writer_stopped(self.place(), doing));
        }
        rx.await
            .unwrap_or_else(|_| Err(super::asks::writer_stopped(self.place(), doing)))
    }

    /// The message ids recorded for `dedupe_key` if that message part was already delivered.
    pub fn notification_sent(&self, dedupe_key: &str) -> Result<Option<Value>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.notification_sent(dedupe_key);
        }
        let found: Option<Option<String>> = self.read("checking sent notifications", |conn| {
            conn.query_row(
                "SELECT message_ids FROM notifications_sent WHERE dedupe_key = ?1",
                [dedupe_key],
                |r| r.get(0),
            )
            .optional()
        })?;
        Ok(found.map(|ids| {
            ids.and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null)
        }))
    }

    /// Records a delivered message part (committed before this returns). A second record
    /// with the same key is ignored.
    pub fn record_notification(&self, rec: &NotificationRecord) -> Result<(), StoreError> {
        let rec = Box::new(rec.clone());
        self.ask_blocking(|reply| Ask::RecordNotification { rec, reply })
    }

    /// Every delivered part recorded for a run, oldest first: (step key, channel, part).
    pub fn notifications_of(&self, run_id: &str) -> Result<Vec<(String, String, u32)>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.notifications_of(run_id);
        }
        self.read("reading sent notifications", |conn| {
            let mut stmt = conn.prepare(
                "SELECT step_key, channel, part FROM notifications_sent WHERE run_id = ?1
                 ORDER BY sent_at, rowid",
            )?;
            let rows = stmt.query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    /// The first run of a retry chain: follows `parent_run_id` from `run_id` (at most 100
    /// links, so a hand-edited cycle cannot loop). A run not (yet) in the database is its own
    /// root.
    pub fn root_run_id(&self, run_id: &str) -> Result<String, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.root_run_id(run_id);
        }
        self.read("following a run's parents", |conn| {
            let mut current = run_id.to_string();
            for _ in 0..100 {
                let parent: Option<Option<String>> = conn
                    .query_row(
                        "SELECT parent_run_id FROM runner_executions WHERE id = ?1",
                        [&current],
                        |r| r.get(0),
                    )
                    .optional()?;
                match parent.flatten() {
                    Some(p) if !p.is_empty() && p != current => current = p,
                    _ => break,
                }
            }
            Ok(current)
        })
    }

    /// Claims a schedule slot: `true` for exactly one caller per (blueprint, slot), across
    /// every process sharing the database.
    pub fn claim_slot(&self, blueprint: &str, slot: SystemTime) -> Result<bool, StoreError> {
        let blueprint = blueprint.to_string();
        self.ask_blocking(|reply| Ask::ClaimSlot {
            blueprint,
            slot,
            reply,
        })
    }

    /// Notes which run a claimed slot started.
    pub fn slot_run(
        &self,
        blueprint: &str,
        slot: SystemTime,
        run_id: &str,
    ) -> Result<(), StoreError> {
        let (blueprint, run_id) = (blueprint.to_string(), run_id.to_string());
        self.ask_blocking(|reply| Ask::SlotRun {
            blueprint,
            slot,
            run_id,
            reply,
        })
    }

    /// The latest slot claimed for a blueprint (by any process).
    pub fn last_slot(&self, blueprint: &str) -> Result<Option<SystemTime>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.last_slot(blueprint);
        }
        let ms: Option<i64> = self.read("reading the last schedule slot", |conn| {
            conn.query_row(
                "SELECT MAX(slot_ms) FROM schedule_slots WHERE blueprint_name = ?1",
                [blueprint],
                |r| r.get(0),
            )
        })?;
        Ok(ms.map(from_ms))
    }

    /// Every claimed slot of a blueprint, oldest first.
    pub fn slots_of(&self, blueprint: &str) -> Result<Vec<SlotClaim>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.slots_of(blueprint);
        }
        self.read("reading schedule slots", |conn| {
            let mut stmt = conn.prepare(
                "SELECT blueprint_name, slot_ms, run_id FROM schedule_slots
                 WHERE blueprint_name = ?1 ORDER BY slot_ms",
            )?;
            let rows = stmt.query_map([blueprint], |r| {
                Ok(SlotClaim {
                    blueprint: r.get(0)?,
                    slot: from_ms(r.get(1)?),
                    run_id: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }
}

// ---- the writes, applied by the writer thread (`writer::answer`) -------------------------

pub(super) fn record_notification(
    conn: &Connection,
    rec: &NotificationRecord,
) -> rusqlite::Result<()> {
    let ids = (!rec.message_ids.is_null()).then(|| rec.message_ids.to_string());
    conn.execute(
        "INSERT OR IGNORE INTO notifications_sent
             (dedupe_key, run_id, step_key, channel, part, sent_at, message_ids)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            rec.dedupe_key,
            rec.run_id,
            rec.step_key,
            rec.channel,
            rec.part,
            iso8601(SystemTime::now()),
            ids
        ],
    )?;
    Ok(())
}

pub(super) fn claim_slot(
    conn: &mut Connection,
    blueprint: &str,
    slot: SystemTime,
    proc: &ProcessInfo,
) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = tx.execute(
        "INSERT OR IGNORE INTO schedule_slots
             (blueprint_name, slot_ms, slot, claimed_at, host, pid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            blueprint,
            to_ms(slot),
            iso8601(slot),
            iso8601(SystemTime::now()),
            proc.host(),
            proc.pid()
        ],
    )?;
    tx.commit()?;
    Ok(n == 1)
}

pub(super) fn slot_run(
    conn: &Connection,
    blueprint: &str,
    slot: SystemTime,
    run_id: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE schedule_slots SET run_id = ?3 WHERE blueprint_name = ?1 AND slot_ms = ?2",
        params![blueprint, to_ms(slot), run_id],
    )?;
    Ok(())
}
