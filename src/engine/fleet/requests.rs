//! Requests from consoles of the fleet for the runs this process drives: a console on
//! another host cannot cancel a run or change its priority itself (the run lives in this
//! process), so it records the request on the run's row and announces it (`NOTIFY
//! omniflow_requests`, `store/pg/fleet_view.rs`). This task looks when told, and on the slow
//! poll in case the notification was missed, and carries the request out through the same
//! calls as a local console's key (`Engine::cancel`, `Engine::set_priority`).

use super::Fleet;
use crate::engine::{Engine, Inner};
use crate::store::pg::fleet_view::Request;
use std::collections::HashSet;
use std::sync::{Arc, Weak};

pub(crate) async fn watcher(fleet: Arc<Fleet>, engine: Weak<Inner>) {
    // Runs already cancelled here: a cancel request stays on the row until the run ends.
    let mut cancelled: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = fleet.requests_wake.notified() => {}
            _ = tokio::time::sleep(super::POLL) => {}
            _ = fleet.stop.cancelled() => return,
        }
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let engine_now = Engine { inner };
        let ids = engine_now.active_runs();
        cancelled.retain(|id| ids.contains(id));
        if ids.is_empty() {
            continue;
        }
        let store = engine_now.inner.store.clone();
        let taken = tokio::task::spawn_blocking(move || store.take_requests(ids)).await;
        let requests = match taken {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "fleet: cannot read the consoles' requests; trying again");
                continue;
            }
            Err(_) => continue,
        };
        for (run_id, request) in requests {
            match request {
                Request::Cancel => {
                    if !cancelled.contains(&run_id) && engine_now.cancel(&run_id) {
                        tracing::info!(run_id = %run_id, "cancelling the run: a console asked");
                        cancelled.insert(run_id);
                    }
                }
                Request::Priority(p) => {
                    if engine_now.set_priority(&run_id, p) {
                        tracing::info!(run_id = %run_id, priority = p.as_str(), "priority changed: a console asked");
                    }
                }
            }
        }
    }
}
