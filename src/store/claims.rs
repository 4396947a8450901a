//! Claims that must be decided at once, not merely queued: "was this message already
//! delivered?" and "does this process fire this schedule slot?". The writes are asks to the
//! writer thread (`asks.rs`): applied after what was queued before them, committed in their
//! own transaction before the call returns. The checks are reads on the readers'
//! connections. Blocking: call them from `spawn_blocking` or plain threads.
//!
//! - `notifications_sent`: one row per message part. Its intent (`state = 'sending'`) is
//!   committed before the part is sent; the service's message id (`state = 'sent'`) right
//!   after it accepted it; a part the service refused or never got has its intent removed, so
//!   the next attempt sends it. A part left `sending` by a crash may or may not have arrived
//!   (Telegram has no idempotency key to ask): it is never sent again (at-most-once for that
//!   one part; the other parts of the message are sent or skipped as recorded).
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

/// What the store knows about one message part.
#[derive(Debug, Clone, PartialEq)]
pub enum PartState {
    /// Its intent is recorded and its outcome is not: the process stopped while sending it.
    Sending,
    /// The service accepted it; the message id(s) it returned (null when it returns none).
    Sent(Value),
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

/// A row's `state` and `message_ids` as a [`PartState`] (an unknown state reads as sending:
/// the safe side, never sent again).
pub(crate) fn part_state(state: &str, ids: Option<String>) -> PartState {
    if state == "sent" {
        PartState::Sent(
            ids.and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null),
        )
    } else {
        PartState::Sending
    }
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
        Ok(match self.notification_part(dedupe_key)? {
            Some(PartState::Sent(ids)) => Some(ids),
            _ => None,
        })
    }

    /// What is recorded for one message part: nothing, its intent, or its delivery.
    pub fn notification_part(&self, dedupe_key: &str) -> Result<Option<PartState>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.notification_part(dedupe_key);
        }
        let found: Option<(String, Option<String>)> =
            self.read("checking sent notifications", |conn| {
                conn.query_row(
                    "SELECT state, message_ids FROM notifications_sent WHERE dedupe_key = ?1",
                    [dedupe_key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
            })?;
        Ok(found.map(|(state, ids)| part_state(&state, ids)))
    }

    /// Records that a message part is about to be sent (committed before this returns):
    /// `false` when the part already has a record (sent, or being sent by an attempt that did
    /// not say how it ended), and then it must not be sent.
    pub fn record_notification_intent(&self, rec: &NotificationRecord) -> Result<bool, StoreError> {
        let rec = Box::new(rec.clone());
        self.ask_blocking(|reply| Ask::NotificationIntent { rec, reply })
    }

    /// Removes the intent of a part the service refused or never got, so the next attempt
    /// sends it. A part recorded as sent is left alone.
    pub fn clear_notification_intent(&self, dedupe_key: &str) -> Result<(), StoreError> {
        let dedupe_key = dedupe_key.to_string();
        self.ask_blocking(|reply| Ask::ClearNotificationIntent { dedupe_key, reply })
    }

    /// Records a delivered message part (committed before this returns): its intent becomes
    /// `sent` with the service's message ids. A part already recorded as sent is left alone.
    pub fn record_notification(&self, rec: &NotificationRecord) -> Result<(), StoreError> {
        let rec = Box::new(rec.clone());
        self.ask_blocking(|reply| Ask::RecordNotification { rec, reply })
    }

    /// Every delivered part recorded for a run, oldest first: (step key, channel, part).
    /// Intents whose outcome is unknown are not listed.
    pub fn notifications_of(&self, run_id: &str) -> Result<Vec<(String, String, u32)>, StoreError> {
        if let Some(pg) = self.pg() {
            return pg.notifications_of(run_id);
        }
        self.read("reading sent notifications", |conn| {
            let mut stmt = conn.prepare(
                "SELECT step_key, channel, part FROM notifications_sent
                 WHERE run_id = ?1 AND state = 'sent' ORDER BY sent_at, rowid",
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

pub(super) fn record_notification_intent(
    conn: &Connection,
    rec: &NotificationRecord,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO notifications_sent
             (dedupe_key, run_id, step_key, channel, part, sent_at, message_ids, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, 'sending')",
        params![
            rec.dedupe_key,
            rec.run_id,
            rec.step_key,
            rec.channel,
            rec.part,
            iso8601(SystemTime::now()),
        ],
    )?;
    Ok(n == 1)
}

pub(super) fn clear_notification_intent(conn: &Connection, key: &str) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM notifications_sent WHERE dedupe_key = ?1 AND state = 'sending'",
        [key],
    )?;
    Ok(())
}

pub(super) fn record_notification(
    conn: &Connection,
    rec: &NotificationRecord,
) -> rusqlite::Result<()> {
    let ids = (!rec.message_ids.is_null()).then(|| rec.message_ids.to_string());
    conn.execute(
        "INSERT INTO notifications_sent
             (dedupe_key, run_id, step_key, channel, part, sent_at, message_ids, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'sent')
         ON CONFLICT (dedupe_key) DO UPDATE
             SET state = 'sent', sent_at = excluded.sent_at, message_ids = excluded.message_ids
             WHERE notifications_sent.state = 'sending'",
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
