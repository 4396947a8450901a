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

/// Tests only: panics when `text` is `panic:<at>`, so a test can put a panic in a step's
/// preparation, an attempt or a run's driver (no input of a real run can reach one there).
#[cfg(test)]
pub(crate) fn injected(text: &str, at: &str) {
    if text.strip_prefix("panic:") == Some(at) {
        panic!("injected panic in {at}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RunRequest;
    use crate::events::RunStatus;
    use std::sync::Arc;

    /// With the hook the binary installs, a panic reaches the log file too (stderr may be a
    /// closed terminal or a daemon's /dev/null), with its message and where it happened.
    #[test]
    fn a_panic_is_logged_with_its_message_and_place() {
        install_hook();
        let logged = crate::logging::capture::Captured::start(tracing::Level::INFO);
        let caught = std::panic::catch_unwind(|| panic!("a bug to be logged"));
        assert!(caught.is_err());
        let log = logged.text();
        assert!(log.contains("a panic was caught"), "{log}");
        assert!(log.contains("a bug to be logged"), "{log}");
        assert!(log.contains("src/engine/panics.rs:"), "{log}");
    }

    /// A panic in a step's preparation, in an attempt and in a run's driver: each fails its
    /// own run with the panic's message in the history, while the engine goes on running
    /// other runs and still shuts down when asked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_fails_its_run_with_its_message_and_the_engine_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, store, _) =
            crate::engine::testing::sqlite_engine(dir.path(), crate::pool::DEFAULT_CONCURRENCY);
        let blueprint = |description: &str, template: &str| {
            Arc::new(
                serde_json::from_value::<crate::blueprint::Blueprint>(serde_json::json!({
                    "name": "panicky", "description": description,
                    "nodes": [
                        { "id": "a", "type": "transform", "template": "fine" },
                        { "id": "b", "type": "transform", "needs": ["a"], "template": template }
                    ]
                }))
                .unwrap(),
            )
        };
        for (description, template, said) in [
            (
                "",
                "panic:prepare",
                "the step panicked: injected panic in prepare",
            ),
            (
                "",
                "panic:attempt",
                "the attempt panicked: injected panic in attempt",
            ),
            (
                "panic:driver",
                "x",
                "the run's driver panicked: injected panic in driver",
            ),
        ] {
            let o = engine
                .start(blueprint(description, template), RunRequest::default())
                .unwrap()
                .wait()
                .await;
            assert_eq!(o.status, RunStatus::Error, "{said}");
            let row = store.find_run(&o.run_id).unwrap();
            assert_eq!(row.status, RunStatus::Error, "{said}");
            let steps = store.run_steps(&o.run_id).unwrap();
            let recorded: Vec<String> = row
                .error
                .iter()
                .cloned()
                .chain(steps.iter().filter_map(|s| s.error.clone()))
                .collect();
            assert!(
                recorded.iter().any(|e| e.contains(said)),
                "{said} not in the history: {recorded:?}"
            );
            // The same engine runs the next run to its end.
            let o = engine
                .start(blueprint("", "after"), RunRequest::default())
                .unwrap()
                .wait()
                .await;
            assert_eq!(o.status, RunStatus::Success, "after {said}: {:?}", o.error);
            assert_eq!(o.outputs["b"], serde_json::json!("after"));
        }
        assert!(
            engine
                .shutdown(std::time::Duration::from_secs(5))
                .await
                .is_empty(),
            "nothing left in flight to hand over"
        );
    }

    #[test]
    fn messages_of_both_payload_kinds() {
        let a = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(message(&*a), "plain");
        let n = 3;
        let b = std::panic::catch_unwind(|| panic!("with {n}")).unwrap_err();
        assert_eq!(message(&*b), "with 3");
    }
}
