//! Fleet-wide rate limits: with a fleet, a provider's `*_RATE_LIMIT` is one budget shared by
//! every host, taken from the database one place at a time (`store::pg::limits`). The
//! per-process limiter then keeps only the 429 pauses.

use crate::config::RateLimit;
use crate::store::pg::limits::Take;
use crate::store::pg::queue::blocking;
use crate::store::pg::queue::Queue;
use std::time::Duration;

/// The fleet's rate budgets, through the queue's connections.
pub struct FleetRates {
    queue: Queue,
}

impl FleetRates {
    pub fn new(queue: Queue) -> FleetRates {
        FleetRates { queue }
    }

    /// Waits until `provider` has a place in its fleet-wide window (`per` already scaled).
    /// When the database does not answer the call goes ahead: a 429 from the provider still
    /// pauses it, and stopping every model call of the host for a database hiccup would be
    /// worse.
    pub async fn acquire(&self, provider: &'static str, limit: RateLimit, per: Duration) {
        let mut told = false;
        loop {
            let q = self.queue.clone();
            match blocking(move || q.take_rate(provider, limit.requests, per)).await {
                Ok(Take::Granted) => return,
                Ok(Take::Full(wait)) => {
                    if !told {
                        told = true;
                        tracing::debug!(
                            provider,
                            wait_ms = wait.as_millis() as u64,
                            "fleet: rate limit reached for the fleet; waiting for the next window"
                        );
                    }
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
                Err(e) => {
                    tracing::warn!(provider, error = %e, "fleet: cannot take a place in the fleet-wide rate limit; calling anyway");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::pg::testing::ScratchDb;

    /// A host's call takes its place in the fleet's budget: with a budget of two, a call made
    /// here leaves one place to the other hosts, and the one after it is told to wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_takes_its_place_in_the_fleets_budget() {
        let Some(db) = ScratchDb::new("fleet_rates_acquire") else {
            return;
        };
        let target = db.target().clone();
        let queue = tokio::task::spawn_blocking(move || {
            let q = Queue::new(&target, 2).unwrap();
            q.ensure_schema().unwrap();
            q
        })
        .await
        .unwrap();
        // A window of an hour: the test cannot cross its edge by being slow.
        let per = Duration::from_secs(3600);
        let limit = RateLimit { requests: 2, per };
        FleetRates::new(queue.clone())
            .acquire("huggingface", limit, per)
            .await;
        let (second, third) = blocking(move || {
            Ok((
                queue.take_rate("huggingface", 2, per)?,
                queue.take_rate("huggingface", 2, per)?,
            ))
        })
        .await
        .unwrap();
        assert_eq!(second, Take::Granted, "one place was left");
        assert!(
            matches!(third, Take::Full(_)),
            "the budget is spent: {third:?}"
        );
    }
}
