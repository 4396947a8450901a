//! Retry semantics: how many tries, how long to wait between them, and when to stop.
//!
//! The decision reads the error's kind through [`ErrorKind::retry_class`] (the one exhaustive
//! match) and the provider's hint: a model that is loading waits its `estimated_time` (capped
//! at [`MODEL_LOADING_CAP`]); a rate limit waits `Retry-After` ([`RATE_LIMIT_DEFAULT`] when the
//! provider gave none). Every other retryable failure waits an exponential backoff with jitter.

use crate::blueprint::{DurationSpec, RetrySpec};
use crate::error::{ErrorKind, RetryClass, StepError};
use std::time::Duration;

/// A loading model is never waited for longer than this per attempt.
pub const MODEL_LOADING_CAP: Duration = Duration::from_secs(30);
/// A 429 without `Retry-After` waits this long.
pub const RATE_LIMIT_DEFAULT: Duration = Duration::from_secs(60);

/// The resolved retry settings of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The wait after the first failure.
    pub backoff: Duration,
    pub factor: f64,
    pub max_delay: Duration,
    /// Each backoff is randomised by up to ± this fraction, so 40 agents that failed together
    /// do not all come back in the same millisecond.
    pub jitter: f64,
}

/// A uniform random number in [-1, 1): the backoff moves by up to ± `jitter` of itself,
/// as often shorter as longer.
fn jitter_unit() -> f64 {
    rand::random::<f64>() * 2.0 - 1.0
}

/// The waits between tries at something outside that is briefly away (a database that is
/// starting, a lock another process holds): each wait twice the one before, up to a cap, so
/// a short outage is bridged quickly and a long one is not hammered.
#[derive(Debug, Clone)]
pub(crate) struct Doubling {
    next: Duration,
    cap: Duration,
}

impl Doubling {
    pub(crate) fn new(first: Duration, cap: Duration) -> Doubling {
        Doubling {
            next: first.min(cap),
            cap,
        }
    }

    /// The wait to take now; the next one is twice as long, up to the cap.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let now = self.next;
        self.next = self.next.saturating_mul(2).min(self.cap);
        now
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Wait, then try again. `hinted` when the wait came from the provider.
    Retry { wait: Duration, hinted: bool },
    /// Stop: the error is not retryable, or the attempts are spent.
    GiveUp { exhausted: bool },
}

impl RetryPolicy {
    /// `MAX_RETRIES` retries after the first try, waiting 1 s, 2 s, 4 s …
    pub fn from_max_retries(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            attempts: max_retries.saturating_add(1),
            backoff: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: 0.1,
        }
    }

    /// The node's own settings, field by field over the blueprint's defaults, over
    /// [`RetryPolicy::from_max_retries`]. Durations were parsed when the blueprint loaded.
    pub fn resolve(
        node: Option<&RetrySpec>,
        defaults: Option<&RetrySpec>,
        max_retries: u32,
    ) -> RetryPolicy {
        let mut p = RetryPolicy::from_max_retries(max_retries);
        for spec in [defaults, node].into_iter().flatten() {
            if let Some(a) = spec.attempts {
                p.attempts = a.max(1);
            }
            if let Some(d) = spec.backoff.as_ref().map(DurationSpec::get) {
                p.backoff = d;
            }
            if let Some(f) = spec.factor {
                p.factor = f.max(1.0);
            }
            if let Some(d) = spec.max_delay.as_ref().map(DurationSpec::get) {
                p.max_delay = d;
            }
            if let Some(j) = spec.jitter {
                p.jitter = j.clamp(0.0, 1.0);
            }
        }
        p
    }

    /// The backoff after failed attempt `attempt` (1-based), before jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = self.factor.powi(attempt.saturating_sub(1).min(60) as i32);
        let secs = (self.backoff.as_secs_f64() * exp).min(self.max_delay.as_secs_f64());
        crate::limits::secs_f64(secs)
    }

    /// [`RetryPolicy::decide`] with a fresh random jitter: what every retry loop calls.
    pub fn decide_now(&self, attempt: u32, err: &StepError) -> Decision {
        self.decide(attempt, err, jitter_unit())
    }

    /// Decides after attempt `attempt` (1-based) failed with `err`. `jitter_unit` is a random
    /// number in [-1, 1] (injected so tests are exact).
    pub fn decide(&self, attempt: u32, err: &StepError, jitter_unit: f64) -> Decision {
        if err.kind.retry_class() == RetryClass::Fatal {
            return Decision::GiveUp { exhausted: false };
        }
        if attempt >= self.attempts {
            return Decision::GiveUp { exhausted: true };
        }
        match (err.kind, err.retry_after) {
            (ErrorKind::ModelLoading, Some(hint)) => Decision::Retry {
                wait: hint.min(MODEL_LOADING_CAP),
                hinted: true,
            },
            (ErrorKind::RateLimited, hint) => Decision::Retry {
                wait: hint.unwrap_or(RATE_LIMIT_DEFAULT),
                hinted: hint.is_some(),
            },
            (_, Some(hint)) => Decision::Retry {
                wait: hint.min(self.max_delay.max(MODEL_LOADING_CAP)),
                hinted: true,
            },
            (_, None) => {
                let base = self.base_delay(attempt).as_secs_f64();
                let j = jitter_unit.clamp(-1.0, 1.0) * self.jitter;
                Decision::Retry {
                    wait: crate::limits::secs_f64(base * (1.0 + j)),
                    hinted: false,
                }
            }
        }
    }
}

/// `Retry-After`, if present: seconds (integer or decimal), or an HTTP-date (RFC 9110, e.g.
/// `Wed, 21 Oct 2026 07:28:00 GMT`) turned into the time left until then (zero if past).
pub fn retry_after_header(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(v, std::time::SystemTime::now())
}

/// [`retry_after_header`]'s parser, with the clock passed in.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| crate::limits::secs_f64(secs));
    }
    // IMF-fixdate is a subset of RFC 2822's date format.
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let at = std::time::SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = humantime::parse_rfc3339("2026-10-21T07:27:30Z").unwrap();
        assert_eq!(parse_retry_after("35", now), Some(Duration::from_secs(35)));
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date already past means "now", not an error.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
    }

    fn err(kind: ErrorKind) -> StepError {
        StepError::new(kind, "x")
    }

    fn wait(d: Decision) -> Duration {
        match d {
            Decision::Retry { wait, .. } => wait,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn default_policy_waits_1_2_4_then_gives_up() {
        let p = RetryPolicy::from_max_retries(3);
        let e = err(ErrorKind::Server);
        assert_eq!(wait(p.decide(1, &e, 0.0)), Duration::from_secs(1));
        assert_eq!(wait(p.decide(2, &e, 0.0)), Duration::from_secs(2));
        assert_eq!(wait(p.decide(3, &e, 0.0)), Duration::from_secs(4));
        assert_eq!(p.decide(4, &e, 0.0), Decision::GiveUp { exhausted: true });
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let p = RetryPolicy::from_max_retries(3);
        let e = err(ErrorKind::Timeout);
        assert_eq!(wait(p.decide(1, &e, 1.0)), Duration::from_millis(1100));
        assert_eq!(wait(p.decide(1, &e, -1.0)), Duration::from_millis(900));
    }

    #[test]
    fn auth_and_invalid_requests_fail_at_once() {
        let p = RetryPolicy::from_max_retries(3);
        for k in [
            ErrorKind::Auth,
            ErrorKind::InvalidRequest,
            ErrorKind::CreditsExhausted,
            ErrorKind::Config,
        ] {
            assert_eq!(
                p.decide(1, &err(k), 0.0),
                Decision::GiveUp { exhausted: false }
            );
        }
    }

    #[test]
    fn provider_hints_win_and_loading_is_capped() {
        let p = RetryPolicy::from_max_retries(3);
        let loading = err(ErrorKind::ModelLoading).with_retry_after(Duration::from_secs_f64(579.3));
        assert_eq!(wait(p.decide(1, &loading, 0.0)), Duration::from_secs(30));
        let loading = err(ErrorKind::ModelLoading).with_retry_after(Duration::from_millis(2500));
        assert_eq!(
            wait(p.decide(1, &loading, 0.9)),
            Duration::from_millis(2500)
        );
        let limited = err(ErrorKind::RateLimited).with_retry_after(Duration::from_secs(7));
        assert_eq!(wait(p.decide(1, &limited, 0.5)), Duration::from_secs(7));
        assert_eq!(
            p.decide(1, &err(ErrorKind::RateLimited), 0.5),
            Decision::Retry {
                wait: RATE_LIMIT_DEFAULT,
                hinted: false
            }
        );
    }

    #[test]
    fn node_settings_override_defaults_field_by_field() {
        let defaults = RetrySpec {
            attempts: Some(5),
            backoff: Some(DurationSpec::parse("500ms").unwrap()),
            ..Default::default()
        };
        let node = RetrySpec {
            factor: Some(3.0),
            max_delay: Some(DurationSpec::parse("2s").unwrap()),
            ..Default::default()
        };
        let p = RetryPolicy::resolve(Some(&node), Some(&defaults), 3);
        assert_eq!(p.attempts, 5);
        assert_eq!(p.base_delay(1), Duration::from_millis(500));
        assert_eq!(p.base_delay(2), Duration::from_millis(1500));
        assert_eq!(
            p.base_delay(3),
            Duration::from_secs(2),
            "capped by maxDelay"
        );
    }

    #[test]
    fn the_node_wins_over_the_defaults_for_the_same_field() {
        let defaults = RetrySpec {
            attempts: Some(6),
            backoff: Some(DurationSpec::parse("2s").unwrap()),
            factor: Some(4.0),
            max_delay: Some(DurationSpec::parse("100s").unwrap()),
            jitter: Some(0.5),
        };
        let node = RetrySpec {
            attempts: Some(2),
            backoff: Some(DurationSpec::parse("3s").unwrap()),
            factor: Some(1.5),
            max_delay: Some(DurationSpec::parse("4s").unwrap()),
            jitter: Some(0.0),
        };
        let p = RetryPolicy::resolve(Some(&node), Some(&defaults), 3);
        assert_eq!(
            p,
            RetryPolicy {
                attempts: 2,
                backoff: Duration::from_secs(3),
                factor: 1.5,
                max_delay: Duration::from_secs(4),
                jitter: 0.0,
            }
        );
        // And the defaults win over MAX_RETRIES where the node says nothing.
        let p = RetryPolicy::resolve(None, Some(&defaults), 3);
        assert_eq!((p.attempts, p.backoff), (6, Duration::from_secs(2)));
    }

    #[test]
    fn a_hint_on_another_kind_is_capped_and_loading_keeps_its_own_cap() {
        // release-notes sets maxDelay 60s: a loading model still waits at most 30 s, and a
        // server error whose reply says "retry in an hour" waits at most the larger of the two.
        let p = RetryPolicy {
            max_delay: Duration::from_secs(60),
            ..RetryPolicy::from_max_retries(3)
        };
        let loading = err(ErrorKind::ModelLoading).with_retry_after(Duration::from_secs(600));
        assert_eq!(wait(p.decide(1, &loading, 0.0)), MODEL_LOADING_CAP);
        let busy = err(ErrorKind::Server).with_retry_after(Duration::from_secs(3600));
        assert_eq!(
            p.decide(1, &busy, 0.0),
            Decision::Retry {
                wait: Duration::from_secs(60),
                hinted: true
            }
        );
        let p = RetryPolicy::from_max_retries(3); // maxDelay 30 s
        assert_eq!(wait(p.decide(1, &busy, 0.0)), Duration::from_secs(30));
    }

    #[test]
    fn doubling_waits_double_up_to_their_cap_and_never_overflow() {
        let ms = Duration::from_millis;
        let mut d = Doubling::new(ms(200), Duration::from_secs(5));
        let waits: Vec<u128> = (0..8).map(|_| d.next_wait().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        // A first wait above the cap is cut to it; the largest duration does not overflow.
        let mut d = Doubling::new(Duration::MAX, ms(100));
        assert_eq!((d.next_wait(), d.next_wait()), (ms(100), ms(100)));
    }

    #[test]
    fn jitter_moves_a_wait_both_ways_within_its_fraction() {
        let units: Vec<f64> = (0..2_000).map(|_| jitter_unit()).collect();
        assert!(units.iter().all(|u| (-1.0..1.0).contains(u)), "{units:?}");
        // As often shorter as longer: 2,000 draws of a fair coin are all one side with
        // odds of 2^-1999.
        assert!(units.iter().any(|u| *u < -0.5) && units.iter().any(|u| *u > 0.5));
        let p = RetryPolicy {
            attempts: 3,
            backoff: Duration::from_secs(10),
            factor: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
        };
        let err = StepError::new(ErrorKind::Server, "503");
        for _ in 0..200 {
            match p.decide_now(1, &err) {
                Decision::Retry { wait, hinted } => {
                    assert!(!hinted);
                    assert!(
                        (Duration::from_secs(8)..=Duration::from_secs(12)).contains(&wait),
                        "{wait:?}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
