//! Cron expressions (croner) in UTC or a fixed offset.

use crate::blueprint::Blueprint;
use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A parsed `schedule` with its time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: croner::Cron,
    tz: FixedOffset,
}

/// Parses a blueprint's `timezone`: `UTC` (also `Z`, `GMT`, `Etc/UTC`, none) or a fixed offset
/// (`+02:00`, `-0530`, `+2`, `UTC+2`, `GMT-05:30`).
pub fn parse_timezone(tz: Option<&str>) -> Result<FixedOffset, String> {
    let utc = FixedOffset::east_opt(0).ok_or("UTC offset")?;
    let Some(raw) = tz.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(utc);
    };
    let upper = raw.to_ascii_uppercase();
    if ["UTC", "Z", "GMT", "ETC/UTC", "ETC/GMT"].contains(&upper.as_str()) {
        return Ok(utc);
    }
    let offset = upper
        .strip_prefix("UTC")
        .or_else(|| upper.strip_prefix("GMT"))
        .unwrap_or(&upper);
    let bad = || {
        format!(
            "timezone \"{raw}\" is not supported: use \"UTC\" or a fixed offset such as \"+02:00\" or \"UTC-5\" \
             (named zones with daylight saving are not supported; write the cron in UTC instead)"
        )
    };
    let (sign, rest) = match offset.as_bytes().first() {
        Some(b'+') => (1, &offset[1..]),
        Some(b'-') => (-1, &offset[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    let (Ok(h), Ok(m)) = (h.parse::<i32>(), m.parse::<i32>()) else {
        return Err(bad());
    };
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

impl CronSchedule {
    /// The blueprint's schedule; `Ok(None)` when it has none.
    pub fn of(bp: &Blueprint) -> Result<Option<CronSchedule>, String> {
        let Some(expr) = bp
            .schedule
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        else {
            return Ok(None);
        };
        crate::blueprint::check_cron(expr)?;
        let cron = croner::Cron::new(expr)
            .parse()
            .map_err(|e| format!("invalid cron expression \"{expr}\": {e}"))?;
        let tz = parse_timezone(bp.timezone.as_deref())?;
        Ok(Some(CronSchedule { cron, tz }))
    }

    /// The first slot strictly after `t`; `None` if the expression never fires again.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
        let utc: DateTime<Utc> = Utc.timestamp_opt(i64::try_from(secs).ok()?, 0).single()?;
        let local = utc.with_timezone(&self.tz);
        let next = self.cron.find_next_occurrence(&local, false).ok()?;
        let s = u64::try_from(next.timestamp()).ok()?;
        Some(UNIX_EPOCH + Duration::from_secs(s))
    }
}

/// When `bp` fires next after `now` (for the console): `Ok(None)` if it has no schedule or is
/// inactive, `Err` if its schedule or time zone is unusable or never fires.
pub fn next_fire_time(bp: &Blueprint, now: SystemTime) -> Result<Option<SystemTime>, String> {
    if !bp.active {
        return Ok(None);
    }
    match CronSchedule::of(bp)? {
        None => Ok(None),
        Some(c) => c.next_after(now).map(Some).ok_or_else(|| {
            format!(
                "schedule \"{}\" never fires",
                bp.schedule.as_deref().unwrap_or_default()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    fn bp(schedule: &str, tz: Option<&str>) -> Blueprint {
        let mut v = serde_json::json!({
            "name": "x", "schedule": schedule,
            "nodes": [{ "id": "a", "type": "transform", "template": "x" }]
        });
        if let Some(tz) = tz {
            v["timezone"] = tz.into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn next_slot_in_utc_and_in_an_offset() {
        let now = at("2026-01-01T05:20:00Z");
        let n = next_fire_time(&bp("17 */6 * * *", None), now).unwrap();
        assert_eq!(n, Some(at("2026-01-01T06:17:00Z")));
        // 09:00 at +02:00 is 07:00 UTC.
        let n = next_fire_time(&bp("0 9 * * *", Some("+02:00")), now).unwrap();
        assert_eq!(n, Some(at("2026-01-01T07:00:00Z")));
        let n = next_fire_time(&bp("0 9 * * *", Some("UTC-5")), now).unwrap();
        assert_eq!(n, Some(at("2026-01-01T14:00:00Z")));
        // Strictly after: a slot at `now` is not next.
        let n = next_fire_time(&bp("20 5 * * *", None), now).unwrap();
        assert_eq!(n, Some(at("2026-01-02T05:20:00Z")));
    }

    #[test]
    fn bad_zones_and_crons_that_never_fire_are_explained() {
        let e =
            next_fire_time(&bp("0 9 * * *", Some("Europe/Paris")), SystemTime::now()).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        let e = next_fire_time(&bp("0 0 30 2 *", None), SystemTime::now()).unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        assert_eq!(
            parse_timezone(Some("-0530")).unwrap().local_minus_utc(),
            -19800
        );
        assert!(parse_timezone(Some("+25")).is_err());
    }
}
