//! Panics are bugs, but one in a step or a run's driver must cost that run only: it fails
//! with the panic's message in its history, and the process goes on serving its other runs
//! and its signals.

use std::any::Any;

/// The message a panic carried (`panic!("…")` gives a `&str` or a `String`).
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Logs every panic through `tracing` (with where it happened), then lets the default hook
/// print it as before. Installed once by the binary.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = message(info.payload());
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %msg, at = %at, "a panic was caught; the run it happened in fails, the process goes on");
        default(info);
    }));
}

/// Ends a run whose driver panicked: its steps are stopped, and it is recorded and
/// announced as failed with the panic's message.
pub(crate) fn driver_failed(
    ctx: &super::run::RunCtx,
    msg: &str,
    started: std::time::Instant,
) -> super::RunOutcome {
    use crate::error::ErrorKind;
    use crate::events::{Event, RunStatus};
    let run_id = ctx.run_id.to_string();
    tracing::error!(run_id = %run_id, panic = %msg, "a run's driver panicked; the run fails");
    ctx.abort.cancel();
    ctx.inner.pool.remove_run(&run_id);
    let error = format!(
        "internal error: the run's driver panicked: {msg}; this is a bug in OmniFlow — please \
         report it"
    );
    let total_time_ms = started.elapsed().as_millis() as u64;
    let tokens = ctx.tokens_spent.load(std::sync::atomic::Ordering::Relaxed);
    if !ctx.is_released() {
        ctx.inner.store.run_finished(crate::store::RunEnd {
            run_id: run_id.clone(),
            status: RunStatus::Error,
            finished_at: std::time::SystemTime::now(),
            total_time_ms,
            tokens_used: tokens,
            steps_done: 0,
            error: Some(error.clone()),
            error_kind: Some(ErrorKind::Internal),
            failed_step: None,
        });
    }
    ctx.inner.bus.publish(Event::RunFinished {
        run_id: run_id.clone(),
        blueprint: ctx.blueprint.name.clone(),
        status: RunStatus::Error,
        total_time_ms,
        error: Some(error.clone()),
    });
    super::RunOutcome {
        run_id,
        blueprint: ctx.blueprint.name.clone(),
        status: RunStatus::Error,
        total_time_ms,
        outputs: serde_json::Map::new(),
        steps: Vec::new(),
        error: Some(error),
        error_kind: Some(ErrorKind::Internal),
        failed_step: None,
        tokens_used: tokens,
        seed: ctx.seed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_both_payload_kinds() {
        let a = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(message(&*a), "plain");
        let n = 3;
        let b = std::panic::catch_unwind(|| panic!("with {n}")).unwrap_err();
        assert_eq!(message(&*b), "with 3");
    }
}
