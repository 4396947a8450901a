//! Cron expressions (croner) in UTC, a fixed offset or an IANA time zone (chrono-tz).
//!
//! A schedule names wall-clock times in its zone. Where daylight saving makes a wall-clock
//! time ambiguous, each slot still fires at most once:
//!
//! - **Clocks go back** (a local hour happens twice): a wall-clock time fires at its first
//!   occurrence only. `30 2 * * *` in `Europe/Berlin` fires at 02:30 summer time (00:30Z) on
//!   2026-10-25, not again at 02:30 winter time; an hourly or more frequent schedule pauses
//!   during the repeated hour.
//! - **Clocks go forward** (a local hour is skipped): a wall-clock time in the gap fires once,
//!   at the first instant after it. `30 2 * * *` in `Europe/Berlin` fires at 03:00 summer time
//!   (01:00Z) on 2026-03-29; all slots in the gap together fire that once.
//!
//! UTC and fixed offsets have neither case.

use crate::blueprint::{parse_timezone, Blueprint, Zone};
use chrono::{DateTime, TimeZone, Utc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A parsed `schedule` with its time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: croner::Cron,
    zone: Zone,
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
        let zone = parse_timezone(bp.timezone.as_deref())?;
        Ok(Some(CronSchedule { cron, zone }))
    }

    /// The first slot strictly after `t`; `None` if the expression never fires again.
    ///
    /// In a zone with daylight saving, a wall-clock time that happens twice (clocks go back)
    /// is a slot at its first occurrence only, and one that does not happen (clocks go
    /// forward) is a slot at the first instant after the gap.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
        let after: DateTime<Utc> = Utc.timestamp_opt(i64::try_from(secs).ok()?, 0).single()?;
        // croner walks wall-clock times, handed to it as UTC so that it sees neither gaps nor
        // repeats; the zone then says which instant each one is.
        let mut wall = Utc.from_utc_datetime(&self.zone.wall_clock(after));
        // A wall-clock time whose first occurrence is not after `t` (it is being repeated
        // now) is skipped. A repeat lasts an hour or two: a minute schedule skips ~120.
        for _ in 0..10_000 {
            wall = self.cron.find_next_occurrence(&wall, false).ok()?;
            match self.zone.instant(wall.naive_utc()) {
                Some(at) if at > after => {
                    let s = u64::try_from(at.timestamp()).ok()?;
                    return Some(UNIX_EPOCH + Duration::from_secs(s));
                }
                _ => {}
            }
        }
        None
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
    use chrono::FixedOffset;

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

    /// `bp`'s slots after `from` up to and including `until`.
    fn slots(bp: &Blueprint, from: &str, until: &str) -> Vec<SystemTime> {
        let cron = CronSchedule::of(bp).unwrap().unwrap();
        let (mut t, end) = (at(from), at(until));
        let mut out = Vec::new();
        while let Some(next) = cron.next_after(t).filter(|n| *n <= end) {
            out.push(next);
            t = next;
        }
        out
    }

    #[test]
    fn bad_zones_and_crons_that_never_fire_are_explained() {
        // A typo of a named zone: the value, the closest zone, and what is accepted.
        let e =
            next_fire_time(&bp("0 9 * * *", Some("Europe/Pariss")), SystemTime::now()).unwrap_err();
        assert!(
            e.contains("\"Europe/Pariss\"")
                && e.contains("did you mean \"Europe/Paris\"?")
                && e.contains("fixed offset")
                && e.contains("IANA"),
            "{e}"
        );
        let e = next_fire_time(&bp("0 0 30 2 *", None), SystemTime::now()).unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        assert_eq!(
            parse_timezone(Some("-0530")).unwrap(),
            Zone::Fixed(FixedOffset::west_opt(19800).unwrap())
        );
        let e = parse_timezone(Some("+25")).unwrap_err();
        assert!(e.contains("\"+25\" is not a valid UTC offset"), "{e}");
        // Multi-byte text where an offset's digits go is an error, not a panic.
        assert!(parse_timezone(Some("+1é2")).is_err());
    }

    #[test]
    fn named_zones_are_parsed_and_unknown_ones_get_the_closest_name() {
        assert_eq!(
            parse_timezone(Some("Europe/Berlin")),
            Ok(Zone::Named(chrono_tz::Europe::Berlin))
        );
        assert_eq!(
            parse_timezone(Some(" Asia/Kolkata ")),
            Ok(Zone::Named(chrono_tz::Asia::Kolkata))
        );
        // POSIX sign: Etc/GMT+5 is five hours behind UTC; "GMT+5" is the intuitive offset.
        assert_eq!(
            parse_timezone(Some("Etc/GMT+5")),
            Ok(Zone::Named(chrono_tz::Etc::GMTPlus5))
        );
        assert_eq!(
            parse_timezone(Some("GMT+5")),
            Ok(Zone::Fixed(FixedOffset::east_opt(5 * 3600).unwrap()))
        );
        for utc in [
            "UTC",
            "utc",
            "Z",
            "GMT",
            "Etc/UTC",
            "etc/utc",
            "Zulu",
            "UCT",
            "Etc/Universal",
            "+00:00",
            "UTC-0",
            "",
        ] {
            let z = parse_timezone(Some(utc)).unwrap();
            assert!(z.is_utc(), "{utc}: {z:?}");
            assert_eq!(z.to_string(), "UTC");
        }
        assert!(!parse_timezone(Some("Europe/London")).unwrap().is_utc());
        assert!(!parse_timezone(Some("+01:00")).unwrap().is_utc());
        assert_eq!(
            parse_timezone(Some("America/New_York"))
                .unwrap()
                .to_string(),
            "America/New_York"
        );
        assert_eq!(
            parse_timezone(Some("-05:30")).unwrap().to_string(),
            "-05:30"
        );

        let hint = |raw: &str| {
            let e = parse_timezone(Some(raw)).unwrap_err();
            assert!(
                e.starts_with(&format!("timezone \"{raw}\" is not a known time zone")),
                "{e}"
            );
            e.split_once("did you mean \"")
                .map(|(_, rest)| rest.split('"').next().unwrap_or_default().to_string())
        };
        assert_eq!(hint("Europe/Berln").as_deref(), Some("Europe/Berlin"));
        assert_eq!(hint("europe/berlin").as_deref(), Some("Europe/Berlin"));
        assert_eq!(
            hint("America/New York").as_deref(),
            Some("America/New_York")
        );
        assert_eq!(hint("Amerca/Chicago").as_deref(), Some("America/Chicago"));
        assert_eq!(hint("Berlin").as_deref(), Some("Europe/Berlin"));
        assert_eq!(hint("kolkata").as_deref(), Some("Asia/Kolkata"));
        // No guess for strangers, nor for abbreviations (PST is not EST).
        assert_eq!(hint("Mars/Olympus"), None);
        assert_eq!(hint("PST"), None);
        assert_eq!(hint("CEST"), None);
    }

    #[test]
    fn a_named_zone_follows_daylight_saving() {
        let berlin = bp("0 9 * * *", Some("Europe/Berlin"));
        // 09:00 CET (+01:00) in winter, 09:00 CEST (+02:00) in summer.
        let next = |b: &Blueprint, t: &str| next_fire_time(b, at(t)).unwrap();
        assert_eq!(
            next(&berlin, "2026-01-15T00:00:00Z"),
            Some(at("2026-01-15T08:00:00Z"))
        );
        assert_eq!(
            next(&berlin, "2026-07-15T00:00:00Z"),
            Some(at("2026-07-15T07:00:00Z"))
        );
        // Across the change: the day before and the day of it (2026-03-29, 2026-10-25).
        assert_eq!(
            slots(&berlin, "2026-03-28T00:00:00Z", "2026-03-30T00:00:00Z"),
            [at("2026-03-28T08:00:00Z"), at("2026-03-29T07:00:00Z")]
        );
        assert_eq!(
            slots(&berlin, "2026-10-24T00:00:00Z", "2026-10-26T00:00:00Z"),
            [at("2026-10-24T07:00:00Z"), at("2026-10-25T08:00:00Z")]
        );

        // New York changes on other days (2026-03-08, 2026-11-01): EST -05:00, EDT -04:00.
        let ny = bp("0 9 * * *", Some("America/New_York"));
        assert_eq!(
            slots(&ny, "2026-03-07T00:00:00Z", "2026-03-09T00:00:00Z"),
            [at("2026-03-07T14:00:00Z"), at("2026-03-08T13:00:00Z")]
        );
        assert_eq!(
            slots(&ny, "2026-10-31T00:00:00Z", "2026-11-02T00:00:00Z"),
            [at("2026-10-31T13:00:00Z"), at("2026-11-01T14:00:00Z")]
        );

        // Kolkata has no daylight saving: 09:00 IST (+05:30) is 03:30Z all year.
        let kolkata = bp("0 9 * * *", Some("Asia/Kolkata"));
        for day in ["2026-01-15", "2026-07-15"] {
            assert_eq!(
                next(&kolkata, &format!("{day}T00:00:00Z")),
                Some(at(&format!("{day}T03:30:00Z")))
            );
        }
    }

    #[test]
    fn a_slot_in_the_skipped_hour_fires_once_right_after_it() {
        // Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00Z); 02:30 never happens.
        let b = bp("30 2 * * *", Some("Europe/Berlin"));
        assert_eq!(
            slots(&b, "2026-03-28T00:00:00Z", "2026-03-31T00:00:00Z"),
            [
                at("2026-03-28T01:30:00Z"), // 02:30 CET
                at("2026-03-29T01:00:00Z"), // 03:00 CEST, the first instant after the gap
                at("2026-03-30T00:30:00Z"), // 02:30 CEST
            ]
        );
        // Every slot of the gap fires that once, together with 03:00 itself.
        let q = bp("*/15 * * * *", Some("Europe/Berlin"));
        assert_eq!(
            slots(&q, "2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z"),
            [
                at("2026-03-29T00:45:00Z"), // 01:45 CET
                at("2026-03-29T01:00:00Z"), // 02:00–03:00 local
                at("2026-03-29T01:15:00Z"), // 03:15 CEST
                at("2026-03-29T01:30:00Z"),
            ]
        );
        // New York skips 02:00–03:00 EST on 2026-03-08 (07:00Z).
        let ny = bp("30 2 * * *", Some("America/New_York"));
        assert_eq!(
            next_fire_time(&ny, at("2026-03-08T00:00:00Z")).unwrap(),
            Some(at("2026-03-08T07:00:00Z"))
        );
    }

    #[test]
    fn a_slot_in_the_repeated_hour_fires_once() {
        // Berlin, 2026-10-25: 03:00 CEST goes back to 02:00 CET (01:00Z); 02:30 happens at
        // 00:30Z and again at 01:30Z. It fires at the first only.
        let b = bp("30 2 * * *", Some("Europe/Berlin"));
        // The local day of 2026-10-25: 22:00Z the day before to 23:00Z.
        assert_eq!(
            slots(&b, "2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z"),
            [at("2026-10-25T00:30:00Z")]
        );
        // Asked during the second pass of the hour, the next slot is the next day's.
        for t in [
            "2026-10-25T00:30:00Z",
            "2026-10-25T01:15:00Z",
            "2026-10-25T01:30:00Z",
        ] {
            assert_eq!(
                next_fire_time(&b, at(t)).unwrap(),
                Some(at("2026-10-26T01:30:00Z")),
                "{t}"
            );
        }
        // An hourly schedule fires at 02:00 CEST and next at 03:00 CET, not at 02:00 CET.
        let h = bp("0 * * * *", Some("Europe/Berlin"));
        assert_eq!(
            slots(&h, "2026-10-24T23:30:00Z", "2026-10-25T03:00:00Z"),
            [
                at("2026-10-25T00:00:00Z"), // 02:00 CEST
                at("2026-10-25T02:00:00Z"), // 03:00 CET
                at("2026-10-25T03:00:00Z"),
            ]
        );
        // Every minute: never two slots at one instant, never one back in time.
        let m = slots(
            &bp("* * * * *", Some("Europe/Berlin")),
            "2026-10-24T23:00:00Z",
            "2026-10-25T03:00:00Z",
        );
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            m.len(),
            4 * 60 - 60,
            "the repeated hour's minutes fire once"
        );
    }
}
