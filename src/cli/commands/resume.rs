//! `omniflow resume`: runs a process left unfinished, continued here.

use super::*;

pub fn resume(args: ResumeArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let store = open_store(&config)?;
    let log = logging::init(&config.log_dir, config.secrets(), "info", None)
        .map_err(|e| Failure::input(e.to_string()))?;
    let rt = runtime()?;
    let json_out = args.json;
    let (outcomes, interrupted) = rt.block_on(async move {
        let signals = Signals::listen();
        let bus = EventBus::new();
        let engine = Engine::new(Arc::new(config), store, bus.clone());
        engine.set_role(crate::engine::Role::Resume);
        let maintenance = engine.start_maintenance(false);
        let ids: Vec<String> = if args.all {
            let store = engine.store().clone();
            let lease = engine.config().scaled(engine.config().lease_timeout);
            tokio::task::spawn_blocking(move || store.orphaned_runs(lease))
                .await
                .map_err(|e| Failure::input(e.to_string()))?
                .map_err(|e| Failure::input(e.to_string()))?
        } else {
            vec![args.run_id.clone().unwrap_or_default()]
        };
        if ids.is_empty() {
            say_err!("no interrupted runs to resume");
        }
        let mut handles = Vec::new();
        let mut refused = Vec::new();
        for id in &ids {
            match engine.resume(id).await {
                Ok(h) => {
                    say_err!("resuming run {}", h.run_id);
                    handles.push(h);
                }
                Err(e) if args.all => {
                    say_err!("skipping {id}: {e}");
                    refused.push(e.to_string());
                }
                Err(e) => {
                    let code = match e {
                        crate::engine::ResumeError::Exhausted { .. }
                        | crate::engine::ResumeError::ReadFailed { .. } => 1,
                        _ => 2,
                    };
                    return Err(Failure {
                        code,
                        message: e.to_string(),
                    });
                }
            }
        }
        let tokens: Vec<_> = handles.iter().map(|h| h.cancel_token()).collect();
        let interrupted = watch_signals(engine.clone(), tokens, signals);
        let disk = watch_disk(engine.store().clone());
        let mut outcomes = Vec::new();
        for h in handles {
            outcomes.push(h.wait().await);
        }
        maintenance.stop().await;
        for o in &outcomes {
            if matches!(o.status, RunStatus::Running | RunStatus::Queued) {
                say(&format!(
                    "■ {} handed over unfinished: `omniflow resume {}` (or a running console or daemon) continues it",
                    o.blueprint, o.run_id
                ));
            }
        }
        engine.stopped().await;
        settle(engine.store(), &mut outcomes, &interrupted).await;
        disk.abort();
        // Each run as it is saved (after `settle`, so a success is only shown once it is).
        for o in &outcomes {
            say_err!(
                "{} {} {}  {}",
                status_icon(o.status),
                o.blueprint,
                o.run_id,
                o.status.as_str()
            );
            if let Some(e) = &o.error {
                say_err!("  {e}");
            }
        }
        let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
        Ok::<_, Failure>((outcomes, interrupted))
    })?;
    if let Some(p) = log.write_problem() {
        say_err!("warning: {p}");
    }
    let failed = outcomes
        .iter()
        .filter(|o| o.status != RunStatus::Success)
        .count();
    if json_out {
        print_json(&AllRuns {
            runs: &outcomes,
            failed,
        });
    }
    Ok(exit_code(&outcomes, interrupted))
}
