//! Fleet-wide request-rate limits: one budget per provider for every host on the database.
//!
//! A limit of N per `per` is counted in fixed windows of `per` on the database's clock: a row
//! per provider and window, taken with one atomic statement
//! (`INSERT … ON CONFLICT DO UPDATE SET used = used + 1 WHERE used < N RETURNING`). Two hosts
//! racing for the last place serialise on the row; exactly one gets it. Unlike the
//! per-process sliding window, fixed windows let up to N calls through on each side of a
//! window's edge (so up to 2N within one `per` across the edge); a quota that cannot take that
//! should be configured at half. The table, `runner_rate_windows`, comes with the queue's
//! migration (`queue::MIGRATION`).

use super::connect::{describe, PgTarget};
use std::time::Duration;

/// The answer to one take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Take {
    /// A place was taken: the call may go now.
    Granted,
    /// The window is full: ask again after this long (when the next window opens).
    Full(Duration),
}

/// Takes one place in `provider`'s window of `per` (at most `limit` places per window), or
/// says how long until the next window. Blocking: call it off the async runtime's threads.
pub fn take(
    client: &mut postgres::Client,
    target: &PgTarget,
    provider: &str,
    limit: u32,
    per: Duration,
) -> Result<Take, String> {
    let per_s = per.as_secs_f64().max(0.001);
    let limit = i32::try_from(limit).unwrap_or(i32::MAX);
    let fail = |e: postgres::Error| describe(&e, target, "take a place in a rate limit");
    let granted = client
        .query_opt(
            "WITH w AS (
                 SELECT to_timestamp(floor(extract(epoch FROM now())::float8 / $2) * $2) AS s
             )
             INSERT INTO runner_rate_windows (provider, window_start, window_end, used)
             SELECT $1, w.s, w.s + make_interval(secs => $2), 1 FROM w
             ON CONFLICT (provider, window_start)
                 DO UPDATE SET used = runner_rate_windows.used + 1
                 WHERE runner_rate_windows.used < $3
             RETURNING used",
            &[&provider, &per_s, &limit],
        )
        .map_err(fail)?;
    if granted.is_some() {
        return Ok(Take::Granted);
    }
    let left: f64 = client
        .query_one(
            "SELECT (floor(extract(epoch FROM now())::float8 / $1) + 1) * $1
                 - extract(epoch FROM now())::float8",
            &[&per_s],
        )
        .map_err(fail)?
        .get(0);
    Ok(Take::Full(Duration::from_secs_f64(left.max(0.001))))
}

/// Deletes windows that are over.
pub fn prune(client: &mut postgres::Client, target: &PgTarget) -> Result<u64, String> {
    client
        .execute(
            "DELETE FROM runner_rate_windows WHERE window_end < now() - interval '1 minute'",
            &[],
        )
        .map_err(|e| describe(&e, target, "prune rate-limit windows"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::pg::queue::Queue;
    use crate::store::pg::testing::ScratchDb;

    #[test]
    fn two_hosts_racing_share_one_budget() {
        let Some(db) = ScratchDb::new("rate_race") else {
            return;
        };
        Queue::new(db.target(), 1).unwrap().ensure_schema().unwrap();
        // A window of an hour: the test cannot cross its edge by being slow.
        let per = Duration::from_secs(3600);
        let granted: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let target = db.target().clone();
                    s.spawn(move || {
                        let mut c = target.connect().unwrap();
                        (0..40)
                            .filter(|_| {
                                take(&mut c, &target, "huggingface", 30, per).unwrap()
                                    == Take::Granted
                            })
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(granted.iter().sum::<usize>(), 30, "{granted:?}");
        let mut c = db.target().connect().unwrap();
        match take(&mut c, db.target(), "huggingface", 30, per).unwrap() {
            Take::Full(wait) => assert!(wait <= per, "{wait:?}"),
            Take::Granted => panic!("the budget is spent"),
        }
        // Another provider has its own budget.
        assert_eq!(
            take(&mut c, db.target(), "openai", 1, per).unwrap(),
            Take::Granted
        );
        assert_eq!(prune(&mut c, db.target()).unwrap(), 0);
    }
}
