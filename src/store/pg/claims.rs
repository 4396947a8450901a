//! Sent notifications and schedule slots on PostgreSQL (see `store/claims.rs`): each write is
//! one statement, applied by the writer thread as an ask (`asks.rs`) and committed before it
//! returns. A slot is claimed by inserting its row under the unique key
//! `(blueprint_name, slot_ms)` with `ON CONFLICT DO NOTHING`: of every process of the fleet,
//! the one whose insert landed runs it.

use super::backend::{PgBackend, PgResult};
use super::ops::ms_time;
use crate::store::claims::{part_state, NotificationRecord, PartState, SlotClaim};
use crate::store::error::StoreError;
use crate::store::transitions::ProcessInfo;
use crate::store::{from_unix_ms, unix_ms};
use postgres::Client;
use std::time::SystemTime;

impl PgBackend {
    pub(crate) fn notification_part(&self, key: &str) -> Result<Option<PartState>, StoreError> {
        let key = key.to_string();
        let found: Option<(String, Option<String>)> =
            self.read("checking sent notifications", move |c| {
                c.query_opt(
                    "SELECT state, message_ids FROM notifications_sent WHERE dedupe_key = $1",
                    &[&key],
                )?
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
            })?;
        Ok(found.map(|(state, ids)| part_state(&state, ids)))
    }

    pub(crate) fn notifications_of(
        &self,
        run_id: &str,
    ) -> Result<Vec<(String, String, u32)>, StoreError> {
        let id = run_id.to_string();
        self.read("reading sent notifications", move |c| {
            c.query(
                "SELECT step_key, channel, part FROM notifications_sent
                 WHERE run_id = $1 AND state = 'sent' ORDER BY sent_at, seq",
                &[&id],
            )?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    u32::try_from(r.try_get::<_, i64>(2)?).unwrap_or(0),
                ))
            })
            .collect()
        })
    }

    pub(crate) fn root_run_id(&self, run_id: &str) -> Result<String, StoreError> {
        let start = run_id.to_string();
        self.read("following a run's parents", move |c| {
            let mut current = start.clone();
            // At most 100 links, so a hand-edited cycle cannot loop.
            for _ in 0..100 {
                let parent: Option<Option<String>> = c
                    .query_opt(
                        "SELECT parent_run_id FROM runner_executions WHERE id = $1",
                        &[&current],
                    )?
                    .map(|r| r.try_get(0))
                    .transpose()?;
                match parent.flatten() {
                    Some(p) if !p.is_empty() && p != current => current = p,
                    _ => break,
                }
            }
            Ok(current)
        })
    }

    pub(crate) fn last_slot(&self, blueprint: &str) -> Result<Option<SystemTime>, StoreError> {
        let blueprint = blueprint.to_string();
        let ms: Option<i64> = self.read("reading the last schedule slot", move |c| {
            Ok(c.query_one(
                "SELECT MAX(slot_ms) FROM schedule_slots WHERE blueprint_name = $1",
                &[&blueprint],
            )?
            .try_get(0)?)
        })?;
        Ok(ms.map(from_unix_ms))
    }

    pub(crate) fn slots_of(&self, blueprint: &str) -> Result<Vec<SlotClaim>, StoreError> {
        let blueprint = blueprint.to_string();
        self.read("reading schedule slots", move |c| {
            c.query(
                "SELECT blueprint_name, slot_ms, run_id FROM schedule_slots
                 WHERE blueprint_name = $1 ORDER BY slot_ms",
                &[&blueprint],
            )?
            .iter()
            .map(|r| {
                Ok(SlotClaim {
                    blueprint: r.try_get(0)?,
                    slot: from_unix_ms(r.try_get(1)?),
                    run_id: r.try_get(2)?,
                })
            })
            .collect()
        })
    }
}

// ---- the writes, applied by the writer thread (`backend::answer`) ------------------------

pub(super) fn record_notification_intent(
    c: &mut Client,
    rec: &NotificationRecord,
) -> PgResult<bool> {
    let n = c.execute(
        "INSERT INTO notifications_sent
             (dedupe_key, run_id, step_key, channel, part, sent_at, message_ids, state)
         VALUES ($1, $2, $3, $4, $5, date_trunc('milliseconds', now()), NULL, 'sending')
         ON CONFLICT (dedupe_key) DO NOTHING",
        &[
            &rec.dedupe_key,
            &rec.run_id,
            &rec.step_key,
            &rec.channel,
            &i64::from(rec.part),
        ],
    )?;
    Ok(n == 1)
}

pub(super) fn clear_notification_intent(c: &mut Client, key: &str) -> PgResult<()> {
    c.execute(
        "DELETE FROM notifications_sent WHERE dedupe_key = $1 AND state = 'sending'",
        &[&key],
    )?;
    Ok(())
}

pub(super) fn record_notification(c: &mut Client, rec: &NotificationRecord) -> PgResult<()> {
    let ids = (!rec.message_ids.is_null()).then(|| rec.message_ids.to_string());
    c.execute(
        "INSERT INTO notifications_sent AS n
             (dedupe_key, run_id, step_key, channel, part, sent_at, message_ids, state)
         VALUES ($1, $2, $3, $4, $5, date_trunc('milliseconds', now()), $6, 'sent')
         ON CONFLICT (dedupe_key) DO UPDATE
             SET state = 'sent', sent_at = excluded.sent_at, message_ids = excluded.message_ids
             WHERE n.state = 'sending'",
        &[
            &rec.dedupe_key,
            &rec.run_id,
            &rec.step_key,
            &rec.channel,
            &i64::from(rec.part),
            &ids,
        ],
    )?;
    Ok(())
}

pub(super) fn claim_slot(
    c: &mut Client,
    blueprint: &str,
    slot: SystemTime,
    proc: &ProcessInfo,
) -> PgResult<bool> {
    let (host, pid) = (proc.host(), i64::from(proc.pid()));
    let n = c.execute(
        "INSERT INTO schedule_slots (blueprint_name, slot_ms, slot, claimed_at, host, pid)
         VALUES ($1, $2, $3, now(), $4, $5)
         ON CONFLICT (blueprint_name, slot_ms) DO NOTHING",
        &[&blueprint, &unix_ms(slot), &ms_time(slot), &host, &pid],
    )?;
    Ok(n == 1)
}

pub(super) fn slot_run(
    c: &mut Client,
    blueprint: &str,
    slot: SystemTime,
    run_id: &str,
) -> PgResult<()> {
    c.execute(
        "UPDATE schedule_slots SET run_id = $3 WHERE blueprint_name = $1 AND slot_ms = $2",
        &[&blueprint, &unix_ms(slot), &run_id],
    )?;
    Ok(())
}
