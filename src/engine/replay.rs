//! New runs planned from a recorded one: the blueprint as the run recorded it, and the outputs
//! of its successful steps to reuse (step keys are stable across runs of the same blueprint
//! snapshot). The console's retry, `run --replay` and resuming read history the same way.

use super::{RunRequest, Trigger};
use crate::blueprint::Blueprint;
use crate::events::{RunStatus, StepStatus};
use crate::store::{RunRow, Store, StoreError};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// The blueprint a run recorded when it started.
pub fn recorded_blueprint(run: &RunRow) -> Result<Blueprint, String> {
    let snapshot = run
        .blueprint
        .clone()
        .ok_or_else(|| "no blueprint was recorded".to_string())?;
    serde_json::from_value(snapshot).map_err(|e| e.to_string())
}

/// The outputs of a run's successful steps, by step key.
pub fn successful_outputs(
    store: &Store,
    run_id: &str,
) -> Result<HashMap<String, Value>, StoreError> {
    Ok(store
        .run_steps(run_id)?
        .into_iter()
        .filter(|s| s.status == StepStatus::Success)
        .map(|s| (s.step_key, s.output.unwrap_or(Value::Null)))
        .collect())
}

/// The blueprint (as the run recorded it) and request of a retry of a failed or cancelled
/// run. With `only_failed`, the successful steps' outputs are reused, so only the failed,
/// cancelled and never-run steps run again. Blocking (reads the store).
pub fn retry_plan(
    store: &Store,
    run_id: &str,
    only_failed: bool,
) -> Result<(Arc<Blueprint>, RunRequest), String> {
    let run = store.find_run(run_id).map_err(|e| e.to_string())?;
    if !matches!(run.status, RunStatus::Error | RunStatus::Cancelled) {
        return Err(format!(
            "run {} is {}: only a failed or cancelled run can be retried",
            run.id.get(..10).unwrap_or(&run.id),
            run.status.as_str()
        ));
    }
    let bp = recorded_blueprint(&run).map_err(|reason| {
        format!(
            "run {}'s blueprint snapshot does not load: {reason}",
            run.id
        )
    })?;
    let reuse = if only_failed {
        successful_outputs(store, &run.id).map_err(|e| e.to_string())?
    } else {
        HashMap::new()
    };
    let variables = match run.variables {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    Ok((
        Arc::new(bp),
        RunRequest {
            variables,
            sandbox: run.sandbox,
            simulate_failures: run.simulate_failures,
            // No seed (the default): a sandbox retry draws a new one, or its injected
            // failures would come again exactly as before.
            priority: Some(run.priority),
            trigger: Trigger::Retry,
            parent_run_id: Some(run.id.clone()),
            reuse,
            ..RunRequest::default()
        },
    ))
}
