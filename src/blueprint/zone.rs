//! A blueprint's `timezone`: UTC, a fixed offset or an IANA zone. Parsed here, with the
//! blueprint's other fields, so validation needs nothing from the scheduler that fires it.

use chrono::{DateTime, FixedOffset, NaiveDateTime, Offset, TimeZone, Utc};
use std::fmt;

/// A blueprint's `timezone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// UTC (offset 0) or a fixed offset such as `+02:00`: no daylight saving.
    Fixed(FixedOffset),
    /// An IANA zone (`Europe/Berlin`) with its daylight-saving rules.
    Named(chrono_tz::Tz),
}

impl Zone {
    /// UTC, the zone of a blueprint without `timezone`.
    pub fn utc() -> Zone {
        Zone::Fixed(Utc.fix())
    }

    /// Whether slots in this zone are the same as in UTC (offset 0, or an alias of UTC).
    pub fn is_utc(&self) -> bool {
        matches!(self, Zone::Fixed(o) if o.local_minus_utc() == 0)
    }

    /// The wall-clock time at `t` in this zone.
    pub(crate) fn wall_clock(&self, t: DateTime<Utc>) -> NaiveDateTime {
        match self {
            Zone::Fixed(o) => t.with_timezone(o).naive_local(),
            Zone::Named(tz) => t.with_timezone(tz).naive_local(),
        }
    }

    /// The instant a wall-clock time names: the earlier one when the time happens twice, the
    /// first instant after the gap when it does not happen at all. `None` only if no wall-clock
    /// minute of the next two days exists (no zone has such a gap).
    pub(crate) fn instant(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        let tz = match self {
            Zone::Fixed(o) => {
                return o
                    .from_local_datetime(&wall)
                    .earliest()
                    .map(|d| d.with_timezone(&Utc))
            }
            Zone::Named(tz) => tz,
        };
        // In a gap, the first wall-clock minute that exists is the instant the clocks jumped
        // (today's transitions fall on whole minutes; cron slots always do).
        let mut t = wall;
        for _ in 0..2 * 24 * 60 {
            if let Some(d) = tz.from_local_datetime(&t).earliest() {
                return Some(d.with_timezone(&Utc));
            }
            t = t.checked_add_signed(chrono::Duration::minutes(1))?;
        }
        None
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Fixed(_) if self.is_utc() => f.write_str("UTC"),
            Zone::Fixed(o) => write!(f, "{o}"),
            Zone::Named(tz) => f.write_str(tz.name()),
        }
    }
}

/// Names of UTC, in upper case: `Z`, the common ones, and the IANA aliases of `Etc/UTC`.
const UTC_NAMES: &[&str] = &[
    "UTC",
    "Z",
    "GMT",
    "UCT",
    "ZULU",
    "UNIVERSAL",
    "GREENWICH",
    "GMT0",
    "GMT+0",
    "GMT-0",
    "ETC/UTC",
    "ETC/GMT",
    "ETC/UCT",
    "ETC/ZULU",
    "ETC/UNIVERSAL",
    "ETC/GREENWICH",
    "ETC/GMT0",
    "ETC/GMT+0",
    "ETC/GMT-0",
];

const ACCEPTED: &str = "use \"UTC\", a fixed offset such as \"+02:00\" or \"UTC-5\", or an IANA zone name such as \"Europe/Berlin\" or \"America/New_York\"";

/// Parses a blueprint's `timezone`: absent or UTC (also `Z`, `GMT`, `Etc/UTC`, any case), a
/// fixed offset (`+02:00`, `-0530`, `+2`, `UTC+2`, `GMT-05:30`), or an IANA zone name
/// (`Europe/Berlin`, exact case). An unknown name is refused with the closest known one.
pub fn parse_timezone(tz: Option<&str>) -> Result<Zone, String> {
    let Some(raw) = tz.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(Zone::utc());
    };
    let upper = raw.to_ascii_uppercase();
    if UTC_NAMES.contains(&upper.as_str()) {
        return Ok(Zone::utc());
    }
    let offset = upper
        .strip_prefix("UTC")
        .or_else(|| upper.strip_prefix("GMT"))
        .unwrap_or(&upper);
    if offset.starts_with(['+', '-']) {
        return fixed_offset(offset).map(Zone::Fixed).ok_or_else(|| {
            format!(
                "timezone \"{raw}\" is not a valid UTC offset: write [+|-]HH:MM with at most 14 hours, \
                 e.g. \"+02:00\", \"-0530\" or \"UTC-5\""
            )
        });
    }
    if let Ok(tz) = raw.parse::<chrono_tz::Tz>() {
        return Ok(Zone::Named(tz));
    }
    let hint = closest_zone(raw)
        .map(|z| format!(" — did you mean \"{z}\"?"))
        .unwrap_or_default();
    Err(format!(
        "timezone \"{raw}\" is not a known time zone{hint} ({ACCEPTED})"
    ))
}

/// `+HH:MM`, `-HHMM`, `+H`: at most 14 hours.
fn fixed_offset(s: &str) -> Option<FixedOffset> {
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at_checked(2)?,
        None => (rest, "0"),
    };
    let (h, m) = (h.parse::<i32>().ok()?, m.parse::<i32>().ok()?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

/// The IANA name `raw` most likely means: the same name in another case or spelling
/// (`europe/berlin`, `America/New York`), a typo of a `Region/City` name (`Europe/Berln`), or
/// the zone of a city written alone (`Berlin`). Abbreviations (`PST`, `CEST`) get no guess:
/// the closest names by spelling are other zones.
fn closest_zone(raw: &str) -> Option<&'static str> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .flat_map(char::to_lowercase)
            .collect()
    };
    let names = || chrono_tz::TZ_VARIANTS.iter().map(|z| z.name());
    let want = norm(raw);
    if let Some(same) = names().find(|n| norm(n) == want) {
        return Some(same);
    }
    if raw.contains('/') {
        return crate::blueprint::did_you_mean(raw, names().filter(|n| n.contains('/')));
    }
    names().find(|n| {
        n.rsplit_once('/')
            .is_some_and(|(region, city)| region != "Etc" && norm(city) == want)
    })
}
