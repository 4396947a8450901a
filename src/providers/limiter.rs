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
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

// The rate a setting names is a configuration value; the limiter enforces it.
pub use crate::config::RateLimit;

#[derive(Debug, Default)]
struct State {
    /// Times of the grants still inside the window, oldest first; reservations
    /// ([`Limiter::reserve`]) may lie in the future.
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

/// A place in a limiter's window taken ahead of a call ([`Limiter::reserve`]). Dropped
/// without being redeemed (the run was cancelled, the answer came from the cache), it gives
/// its place back, so a cancelled fan-out leaves no phantom reservations behind.
#[derive(Debug)]
pub struct Grant {
    limiter: Arc<Limiter>,
    at: Instant,
    /// False for an unlimited limiter (only pauses apply): nothing was recorded.
    recorded: bool,
    live: bool,
}

impl Grant {
    /// How long until the reserved place comes.
    pub fn wait(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// True while a 429 pauses the provider: the reservation no longer holds.
    pub fn paused(&self) -> bool {
        !self.limiter.paused_for().is_zero()
    }

    /// At the moment of the call: `true` if the place still holds (it is moved to now);
    /// `false` if it went stale (a 429 pause came, or the call is so late that using it could
    /// break the quota) and was given back — then wait in [`Limiter::acquire`] instead.
    pub fn redeem(self) -> bool {
        self.redeem_at(Instant::now())
    }

    fn redeem_at(mut self, now: Instant) -> bool {
        self.live = false;
        self.limiter.redeem_place(self.at, self.recorded, now)
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if self.live && self.recorded {
            self.limiter.release(self.at);
        }
    }
}

impl Limiter {
    /// `limit` `None` = unlimited (only 429 pauses apply). `time_scale` shrinks the window in
    /// tests, like every other wait.
    pub fn new(limit: Option<RateLimit>, time_scale: f64) -> Limiter {
        let window = limit
            .map(|l| crate::limits::scale(l.per, time_scale))
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

    /// Drops the grants that have left the window, and a pause that is over.
    fn prune(&self, st: &mut State, now: Instant) {
        if st.paused_until.is_some_and(|u| u <= now) {
            st.paused_until = None;
        }
        while st
            .granted
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            st.granted.pop_front();
        }
    }

    /// The earliest time a new grant may be placed, after every grant already given: not
    /// during a pause, not before the last grant (the window stays in order), and not until
    /// the `requests`-th most recent grant has left the window.
    fn earliest(&self, st: &State, now: Instant) -> Instant {
        let mut t = now.max(st.paused_until.unwrap_or(now));
        if let Some(limit) = self.limit {
            if let Some(&last) = st.granted.back() {
                t = t.max(last);
            }
            let n = limit.requests as usize;
            if st.granted.len() >= n {
                t = t.max(st.granted[st.granted.len() - n] + self.window);
            }
        }
        t
    }

    /// Records a grant at `now` if that keeps every window within the quota — also in a hole
    /// a given-back reservation left — and says so.
    fn place_now(&self, st: &mut State, now: Instant) -> bool {
        if st.paused_until.is_some() {
            return false;
        }
        let Some(limit) = self.limit else {
            return true;
        };
        let p = st.granted.partition_point(|&t| t <= now);
        st.granted.insert(p, now);
        // Every run of requests + 1 consecutive grants that contains the new one must span
        // at least a window.
        let n = limit.requests as usize;
        let len = st.granted.len();
        let fits = len <= n
            || (p.saturating_sub(n)..=p.min(len - n - 1))
                .all(|k| st.granted[k + n].saturating_duration_since(st.granted[k]) >= self.window);
        if !fits {
            st.granted.remove(p);
        }
        fits
    }

    /// Either takes a grant now (`None`) or says how long to wait before asking again.
    fn try_acquire(&self, now: Instant) -> Option<Duration> {
        let mut st = self.lock();
        self.prune(&mut st, now);
        if self.place_now(&mut st, now) {
            return None;
        }
        // At the latest, the place after every grant given so far.
        Some(
            self.earliest(&st, now)
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        )
    }

    /// Takes the earliest free place in the window ahead of the call: the caller waits until
    /// [`Grant::wait`] is over — outside any pool slot, so a rate-limited call does not hold a
    /// worker — then [`Grant::redeem`]s it at the moment of the call.
    pub fn reserve(self: &Arc<Self>) -> Grant {
        self.reserve_at(Instant::now())
    }

    fn reserve_at(self: &Arc<Self>, now: Instant) -> Grant {
        let mut st = self.lock();
        self.prune(&mut st, now);
        let at = self.earliest(&st, now);
        let recorded = self.limit.is_some();
        if recorded {
            st.granted.push_back(at);
        }
        Grant {
            limiter: Arc::clone(self),
            at,
            recorded,
            live: true,
        }
    }

    /// Gives a reserved place back (the first grant recorded at `at`).
    fn release(&self, at: Instant) {
        let mut st = self.lock();
        if let Some(i) = st.granted.iter().position(|&t| t == at) {
            st.granted.remove(i);
        }
    }

    /// How late a reservation may be used where it stands: a tenth of the window, at most
    /// 100 ms — the jitter any request has between its grant and its arrival at the server.
    fn slack(&self) -> Duration {
        (self.window / 10).min(Duration::from_millis(100))
    }

    /// A reservation made for `at`, used at `now`: kept where it stands when the call is at
    /// most [`Limiter::slack`] late, else moved to `now` if that keeps every window within
    /// the quota (`true`: call now), else given back (`false`: acquire).
    fn redeem_place(&self, at: Instant, recorded: bool, now: Instant) -> bool {
        let mut st = self.lock();
        self.prune(&mut st, now);
        if st.paused_until.is_none() && now.saturating_duration_since(at) <= self.slack() {
            return true;
        }
        if recorded {
            if let Some(i) = st.granted.iter().position(|&t| t == at) {
                st.granted.remove(i);
            }
        }
        self.place_now(&mut st, now)
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

    /// The limit a limiter was built with, as it reports it (none when off).
    #[test]
    fn a_limiter_reports_its_limit() {
        let limit = RateLimit {
            requests: 7,
            per: Duration::from_secs(90),
        };
        assert_eq!(Limiter::new(Some(limit), 0.001).limit(), Some(limit));
        assert_eq!(Limiter::new(None, 1.0).limit(), None);
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

    fn per_second(n: u32) -> Arc<Limiter> {
        Arc::new(Limiter::new(
            Some(RateLimit {
                requests: n,
                per: Duration::from_secs(1),
            }),
            1.0,
        ))
    }

    #[test]
    fn reservations_take_the_next_free_places_in_order() {
        let l = per_second(2);
        let t0 = Instant::now();
        let gs: Vec<Grant> = (0..5).map(|_| l.reserve_at(t0)).collect();
        let at: Vec<Duration> = gs.iter().map(|g| g.at - t0).collect();
        let s = Duration::from_secs;
        assert_eq!(at, vec![s(0), s(0), s(1), s(1), s(2)]);
        // A caller that asks now (no reservation) queues behind them.
        assert_eq!(l.try_acquire(t0), Some(s(2)));
    }

    #[test]
    fn a_dropped_reservation_gives_its_place_back() {
        let l = per_second(1);
        let t0 = Instant::now();
        let first = l.reserve_at(t0);
        let later: Vec<Grant> = (0..39).map(|_| l.reserve_at(t0)).collect();
        assert_eq!(later[38].at - t0, Duration::from_secs(39));
        // A cancelled fan-out: its 39 waiting reservations leave no phantom places.
        drop(later);
        assert_eq!(l.reserve_at(t0).at - t0, Duration::from_secs(1));
        drop(first);
    }

    #[test]
    fn redeeming_on_time_holds_and_too_late_gives_the_place_back() {
        let l = per_second(1);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let a = l.reserve_at(t0);
        let b = l.reserve_at(t0);
        assert_eq!(b.at - t0, s(1));
        assert!(a.redeem_at(t0), "on time");
        // b is used 0.5 s late: moved to 1.5 s it is still a window after a.
        assert!(b.redeem_at(t0 + Duration::from_millis(1500)));
        // c was placed at 2.5 s (a window after b's new time); used at 3 s it would sit
        // 0.5 s before d's place at 3.5 s: refused and given back.
        let c = l.reserve_at(t0);
        assert_eq!(c.at - t0, Duration::from_millis(2500));
        let d = l.reserve_at(t0);
        assert_eq!(d.at - t0, Duration::from_millis(3500));
        assert!(!c.redeem_at(t0 + s(3)));
        // c's place is free again: a caller at 2.5 s gets it at once.
        assert_eq!(l.try_acquire(t0 + Duration::from_millis(2500)), None);
        drop(d);
    }

    #[test]
    fn a_queue_of_reservations_holds_when_calls_are_a_little_late() {
        // A fan-out reserved two windows ahead: moving a place by the few milliseconds a call
        // takes to reach its worker would collide with the next window's places, so a place
        // used within the slack (a tenth of the window) stays where it stands.
        let l = Arc::new(Limiter::new(
            Some(RateLimit {
                requests: 10,
                per: Duration::from_millis(250),
            }),
            1.0,
        ));
        let t0 = Instant::now();
        let mut gs: Vec<Grant> = (0..20).map(|_| l.reserve_at(t0)).collect();
        let second: Vec<Grant> = gs.split_off(10);
        for g in gs {
            assert!(g.redeem_at(t0 + Duration::from_millis(5)));
        }
        for g in second {
            assert!(g.redeem_at(t0 + Duration::from_millis(270)));
        }
        // 60 ms late is past the slack: the place moves to when it is used, which still fits
        // (the earlier windows are over). Too late to fit is the 1-per-second case above.
        let late = l.reserve_at(t0);
        assert_eq!(late.at - t0, Duration::from_millis(500));
        assert!(late.redeem_at(t0 + Duration::from_millis(560)));
        assert_eq!(
            l.lock().granted.back().map(|t| *t - t0),
            Some(Duration::from_millis(560))
        );
    }

    #[test]
    fn a_pause_voids_reservations_and_places_new_ones_after_it() {
        let l = per_second(10);
        let t0 = Instant::now();
        let g = l.reserve_at(t0);
        l.pause_at(t0, Duration::from_secs(5));
        assert!(
            !g.redeem_at(t0),
            "a 429 came: the reservation no longer holds"
        );
        assert_eq!(l.reserve_at(t0).at - t0, Duration::from_secs(5));
        // Unlimited limiters record nothing, but a pause still applies.
        let u = Arc::new(Limiter::new(None, 1.0));
        assert_eq!(u.reserve_at(t0).at, t0);
        u.pause_at(t0, Duration::from_secs(2));
        assert_eq!(u.reserve_at(t0).at - t0, Duration::from_secs(2));
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
