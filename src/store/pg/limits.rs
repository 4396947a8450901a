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
//!
//! Each take carries a token, recorded with the place in the same statement
//! (`runner_rate_grants`, [`MIGRATION`]): a take sent again after its connection dropped
//! (the first may have committed, its reply lost) finds its token and counts once.

use std::time::Duration;

/// The store's migration that records each place taken by its token.
pub const MIGRATION: &str = r#"
CREATE TABLE runner_rate_grants (
    token      text PRIMARY KEY,
    provider   text NOT NULL,
    window_end timestamptz NOT NULL
);
CREATE INDEX runner_rate_grants_end ON runner_rate_grants (window_end);
"#;

/// The answer to one take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Take {
    /// A place was taken: the call may go now.
    Granted,
    /// The window is full: ask again after this long (when the next window opens).
    Full(Duration),
}

/// A new take's token: run [`take`] again with the same one after a dropped connection.
pub fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Takes one place in `provider`'s window of `per` (at most `limit` places per window), or
/// says how long until the next window. Safe to run again with the same `token` (a place it
/// took already is the answer, not a second place). Blocking: call it off the async
/// runtime's threads.
pub fn take(
    client: &mut postgres::Client,
    provider: &str,
    limit: u32,
    per: Duration,
    token: &str,
) -> Result<Take, postgres::Error> {
    let per_s = per.as_secs_f64().max(0.001);
    let limit = i32::try_from(limit).unwrap_or(i32::MAX);
    let places: i64 = client
        .query_one(
            "WITH prior AS (
                 SELECT 1 FROM runner_rate_grants WHERE token = $4
             ), w AS (
                 SELECT to_timestamp(floor(extract(epoch FROM now())::float8 / $2) * $2) AS s
             ), taken AS (
                 INSERT INTO runner_rate_windows (provider, window_start, window_end, used)
                 SELECT $1, w.s, w.s + make_interval(secs => $2), 1 FROM w
                 WHERE NOT EXISTS (SELECT 1 FROM prior)
                 ON CONFLICT (provider, window_start)
                     DO UPDATE SET used = runner_rate_windows.used + 1
                     WHERE runner_rate_windows.used < $3
                 RETURNING window_end
             ), granted AS (
                 INSERT INTO runner_rate_grants (token, provider, window_end)
                 SELECT $4, $1, window_end FROM taken
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM granted) + (SELECT count(*) FROM prior)",
            &[&provider, &per_s, &limit, &token],
        )?
        .get(0);
    if places > 0 {
        return Ok(Take::Granted);
    }
    let left: f64 = client
        .query_one(
            "SELECT (floor(extract(epoch FROM now())::float8 / $1) + 1) * $1
                 - extract(epoch FROM now())::float8",
            &[&per_s],
        )?
        .get(0);
    Ok(Take::Full(Duration::from_secs_f64(left.max(0.001))))
}

/// Deletes windows that are over, and the places taken in them.
pub fn prune(client: &mut postgres::Client) -> Result<u64, postgres::Error> {
    client.execute(
        "DELETE FROM runner_rate_grants WHERE window_end < now() - interval '1 minute'",
        &[],
    )?;
    client.execute(
        "DELETE FROM runner_rate_windows WHERE window_end < now() - interval '1 minute'",
        &[],
    )
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
                                take(&mut c, "huggingface", 30, per, &token()).unwrap()
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
        match take(&mut c, "huggingface", 30, per, &token()).unwrap() {
            Take::Full(wait) => assert!(wait <= per, "{wait:?}"),
            Take::Granted => panic!("the budget is spent"),
        }
        // Another provider has its own budget.
        assert_eq!(
            take(&mut c, "openai", 1, per, &token()).unwrap(),
            Take::Granted
        );
        assert_eq!(prune(&mut c).unwrap(), 0);
    }

    #[test]
    fn a_take_sent_again_with_its_token_counts_once() {
        let Some(db) = ScratchDb::new("rate_again") else {
            return;
        };
        Queue::new(db.target(), 1).unwrap().ensure_schema().unwrap();
        let per = Duration::from_secs(3600);
        let mut c = db.target().connect().unwrap();
        let first = token();
        // Its reply lost with the connection, the same take is sent again: still one place.
        for _ in 0..3 {
            assert_eq!(
                take(&mut c, "ollama", 2, per, &first).unwrap(),
                Take::Granted
            );
        }
        assert_eq!(
            take(&mut c, "ollama", 2, per, &token()).unwrap(),
            Take::Granted
        );
        assert!(matches!(
            take(&mut c, "ollama", 2, per, &token()).unwrap(),
            Take::Full(_)
        ));
        // A place already taken is still the answer once the window is full.
        assert_eq!(
            take(&mut c, "ollama", 2, per, &first).unwrap(),
            Take::Granted
        );
        let used: i32 = c
            .query_one(
                "SELECT used FROM runner_rate_windows WHERE provider = 'ollama'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(used, 2);
    }

    /// The sweep's pruning deletes the windows that are over (more than a minute ago) and the
    /// places taken in them, and says how many windows went; the current window and its
    /// places stay. Otherwise both tables would grow by a row for every call for ever.
    #[test]
    fn windows_that_are_over_go_with_their_places() {
        let Some(db) = ScratchDb::new("rate_prune") else {
            return;
        };
        let q = Queue::new(db.target(), 1).unwrap();
        q.ensure_schema().unwrap();
        assert_eq!(
            q.take_rate("ollama", 5, Duration::from_secs(3600)).unwrap(),
            Take::Granted
        );
        let mut c = db.target().connect().unwrap();
        c.batch_execute(
            "INSERT INTO runner_rate_windows (provider, window_start, window_end, used)
             VALUES ('openai', now() - interval '3 hours', now() - interval '2 hours', 1),
                    ('huggingface', now() - interval '2 hours', now() - interval '1 hour', 2);
             INSERT INTO runner_rate_grants (token, provider, window_end)
             VALUES ('old-1', 'openai', now() - interval '2 hours'),
                    ('old-2', 'huggingface', now() - interval '1 hour'),
                    ('old-3', 'huggingface', now() - interval '1 hour')",
        )
        .unwrap();
        assert_eq!(q.prune_rates().unwrap(), 2, "the windows that were over");
        let mut left = |sql: &str| -> Vec<String> {
            c.query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        assert_eq!(
            left("SELECT provider FROM runner_rate_windows ORDER BY provider"),
            ["ollama"]
        );
        assert_eq!(
            left("SELECT provider FROM runner_rate_grants ORDER BY provider"),
            ["ollama"]
        );
        assert_eq!(q.prune_rates().unwrap(), 0, "nothing more is over");
    }
}
