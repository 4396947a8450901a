//! A per-provider request-rate limiter, so 40 parallel agents do not storm a free API into
//! a wall of 429s, and a 429 pauses the whole provider rather than one call.
//!
//! It is a *sliding-window* limiter: at most `requests` grants in any window of `per`. A token
//! bucket of the same rate would let through up to twice the quota in the first window (a full
//! bucket, then the refill), which is exactly what a quota like "10 per second" refuses; the
//! sliding window never exceeds it, so a limit configured to match a provider's quota gets no
//! 429 at all. Memory is one timestamp per request of the window.
//!
//! Time is tokio's (`tokio::time::Instant`), so tests may pause and advance it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// "`requests` per `per`", e.g. 60 per minute. Parsed from `60/min`, `10/s`, `5/2s`, or a bare
/// number (per minute); `0`, `none`, `off` or `unlimited` mean no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

impl RateLimit {
    pub fn per_minute(n: u32) -> RateLimit {
        RateLimit {
            requests: n,
            per: Duration::from_secs(60),
        }
    }

    /// `None` for "unlimited"; `Err` with what was expected.
    pub fn parse(text: &str) -> Result<Option<RateLimit>, &'static str> {
        const EXPECTED: &str =
            "a rate such as 60/min, 10/s or 5/2s (a bare number is per minute; 0 or off = unlimited)";
        let t = text.trim().to_ascii_lowercase();
        if ["0", "none", "off", "unlimited", "false"].contains(&t.as_str()) {
            return Ok(None);
        }
        let (n, unit) = t.split_once('/').unwrap_or((t.as_str(), "min"));
        let requests: u32 = n.trim().parse().map_err(|_| EXPECTED)?;
        if requests == 0 {
            return Ok(None);
        }
        let unit = unit.trim();
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other).map_err(|_| EXPECTED)?,
        };
        if per.is_zero() {
            return Err(EXPECTED);
        }
        Ok(Some(RateLimit { requests, per }))
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.requests,
            humantime::format_duration(self.per)
        )
    }
}

#[derive(Debug, Default)]
struct State {
    /// Times of the grants still inside the window, oldest first.
    granted: VecDeque<Instant>,
    /// Nobody is granted before this (a 429's `Retry-After`).
    paused_until: Option<Instant>,
}

/// One provider's limiter. Shared by every call to that provider (`Arc` it).
#[derive(Debug)]
pub struct Limiter {
    limit: Option<RateLimit>,
    /// The window, scaled (`OMNIFLOW_TIME_SCALE`); `limit.per` is the configured one.
    window: Duration,
    state: Mutex<State>,
}

impl Limiter {
    /// `limit` `None` = unlimited (only 429 pauses apply). `time_scale` shrinks the window in
    /// tests, like every other wait.
    pub fn new(limit: Option<RateLimit>, time_scale: f64) -> Limiter {
        let window = limit
            .map(|l| l.per.mul_f64(time_scale.max(0.0)))
            .unwrap_or_default();
        Limiter {
            limit,
            window,
            state: Mutex::new(State::default()),
        }
    }

    pub fn limit(&self) -> Option<RateLimit> {
        self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Either takes a grant now (`None`) or says how long to wait before asking again.
    fn try_acquire(&self, now: Instant) -> Option<Duration> {
        let mut st = self.lock();
        if let Some(until) = st.paused_until {
            if until > now {
                return Some(until - now);
            }
            st.paused_until = None;
        }
        let limit = self.limit?;
        while st
            .granted
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            st.granted.pop_front();
        }
        if st.granted.len() < limit.requests as usize {
            st.granted.push_back(now);
            return None;
        }
        // Full: the oldest grant leaves the window at `oldest + window`.
        let oldest = st.granted.front().copied().unwrap_or(now);
        Some((oldest + self.window).saturating_duration_since(now))
    }

    /// Waits until this call may be sent. Cancel-safe: dropping the future takes no grant.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire(Instant::now()) {
                None => return,
                // At least 1 ms so a rounding error cannot spin.
                Some(wait) => tokio::time::sleep(wait.max(Duration::from_millis(1))).await,
            }
        }
    }

    /// A 429: nobody calls this provider for `wait` (already scaled). A longer pause in force
    /// is kept.
    pub fn pause_for(&self, wait: Duration) {
        self.pause_at(Instant::now(), wait);
    }

    fn pause_at(&self, now: Instant, wait: Duration) {
        let until = now + wait;
        let mut st = self.lock();
        if st.paused_until.is_none_or(|u| u < until) {
            st.paused_until = Some(until);
        }
    }

    /// How long the provider stays paused by a 429 (zero when it is not).
    pub fn paused_for(&self) -> Duration {
        self.paused_at(Instant::now())
    }

    fn paused_at(&self, now: Instant) -> Duration {
        self.lock()
            .paused_until
            .map(|u| u.saturating_duration_since(now))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(
            RateLimit::parse("60/min").unwrap(),
            Some(RateLimit::per_minute(60))
        );
        assert_eq!(
            RateLimit::parse("30").unwrap(),
            Some(RateLimit::per_minute(30))
        );
        assert_eq!(
            RateLimit::parse("10/s").unwrap(),
            Some(RateLimit {
                requests: 10,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            RateLimit::parse("5/250ms").unwrap().unwrap().per,
            Duration::from_millis(250)
        );
        assert_eq!(RateLimit::parse("off").unwrap(), None);
        assert_eq!(RateLimit::parse("0").unwrap(), None);
        assert!(RateLimit::parse("lots").is_err());
        assert!(RateLimit::parse("5/0s").is_err());
    }

    /// Drives the limiter with an explicit clock (`try_acquire(now)`), one caller after
    /// another as the queue would: each waits what it is told, then asks again.
    fn grant_times(l: &Limiter, start: Instant, n: usize) -> Vec<Duration> {
        let mut t = start;
        (0..n)
            .map(|_| {
                while let Some(w) = l.try_acquire(t) {
                    t += w;
                }
                t - start
            })
            .collect()
    }

    #[test]
    fn never_more_than_the_quota_in_any_window() {
        let l = Limiter::new(
            Some(RateLimit {
                requests: 5,
                per: Duration::from_secs(1),
            }),
            1.0,
        );
        let times = grant_times(&l, Instant::now(), 23);
        for (i, t) in times.iter().enumerate() {
            let in_window = times
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_secs(1))
                .count();
            assert!(in_window <= 5, "{in_window} grants in the window from #{i}");
        }
        // 23 requests at 5/s: bursts at 0, 1, 2, 3 and 4 s.
        assert_eq!(times[4], Duration::ZERO);
        assert_eq!(times[5], Duration::from_secs(1));
        assert_eq!(times[22], Duration::from_secs(4));
    }

    #[test]
    fn the_window_is_scaled_for_tests() {
        let l = Limiter::new(Some(RateLimit::per_minute(2)), 0.001);
        let times = grant_times(&l, Instant::now(), 3);
        assert_eq!(times[2], Duration::from_millis(60));
    }

    #[test]
    fn a_pause_holds_every_caller() {
        let l = Limiter::new(None, 1.0);
        let start = Instant::now();
        assert_eq!(l.try_acquire(start), None, "unlimited and unpaused");
        l.pause_at(start, Duration::from_secs(7));
        l.pause_at(start, Duration::from_secs(2)); // a shorter pause does not shorten it
        assert_eq!(l.paused_at(start), Duration::from_secs(7));
        assert_eq!(grant_times(&l, start, 2), vec![Duration::from_secs(7); 2]);
        assert_eq!(l.paused_at(start + Duration::from_secs(7)), Duration::ZERO);
    }

    #[tokio::test]
    async fn acquire_waits_in_real_time_too() {
        let l = Limiter::new(Some(RateLimit::per_minute(1)), 0.0001);
        l.acquire().await;
        l.acquire().await; // 6 ms later
        l.pause_for(Duration::from_millis(5));
        assert!(l.paused_for() > Duration::ZERO);
        l.acquire().await;
    }
}
