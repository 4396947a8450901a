//! `omniflow runs` and `omniflow show`: the history, as tables.

use super::*;

use crate::text::clip;

pub fn runs(args: RunsArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let status = match &args.status {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            Failure::input(format!(
                "--status {s:?}: expected queued, running, success, error or cancelled"
            ))
        })?),
    };
    let store = open_store(&config)?;
    let filter = RunFilter {
        status,
        blueprint: args.blueprint.clone(),
        limit: args.limit.max(1),
        before: None,
        ..RunFilter::default()
    };
    let rows = store
        .list_runs(&filter)
        .map_err(|e| Failure::input(e.to_string()))?;
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({ "runs": rows })).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        say_err!(
            "no runs yet in {} — try: omniflow run tech-digest --sandbox",
            store.place()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Which history this is: `omniflow runs` from another directory reads another file.
    say_err!("history: {}", store.place());
    say_out!(
        "{:<14} {:<20} {:<10} {:<20} {:>9} {:>7}  ERROR",
        "ID",
        "BLUEPRINT",
        "STATUS",
        "STARTED (UTC)",
        "DURATION",
        "TOKENS"
    );
    for r in rows {
        let started = r.started_at.unwrap_or(r.queued_at);
        say_out!(
            "{:<14} {:<20} {:<10} {:<20} {:>9} {:>7}  {}",
            r.id,
            clip(&r.blueprint_name, 20),
            r.status.as_str(),
            // To the second: `2026-11-27 13:24:56`.
            crate::store::utc_date_time(started),
            r.total_time_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            r.tokens_used,
            clip(r.error.as_deref().unwrap_or(""), 60)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn show(args: ShowArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let store = open_store(&config)?;
    let run = store
        .find_run(&args.run_id)
        .map_err(|e| Failure::input(e.to_string()))?;
    let steps = store
        .run_steps(&run.id)
        .map_err(|e| Failure::input(e.to_string()))?;
    let attempts = store
        .run_attempts(&run.id)
        .map_err(|e| Failure::input(e.to_string()))?;
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({ "run": run, "steps": steps, "attempts": attempts }))
                .unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    say_out!(
        "run {}  {}  {}{}",
        run.id,
        run.blueprint_name,
        run.status.as_str(),
        if run.sandbox {
            format!(
                "  (sandbox, seed {}, failures {:.0}%)",
                run.seed.unwrap_or(0),
                run.simulate_failures * 100.0
            )
        } else {
            String::new()
        }
    );
    say_out!(
        "started {}  finished {}  took {}  tokens {}  trigger {}",
        run.started_at
            .map(crate::store::iso8601)
            .unwrap_or_else(|| "-".into()),
        run.finished_at
            .map(crate::store::iso8601)
            .unwrap_or_else(|| "-".into()),
        run.total_time_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into()),
        run.tokens_used,
        run.trigger
    );
    if let Some(e) = &run.error {
        say_out!(
            "error ({}): {e}",
            run.error_kind.map_or("?", |k| k.as_str())
        );
    }
    say_out!();
    say_out!(
        "{:<22} {:<10} {:>8} {:>9} {:>7}  {:<10} OUTPUT / ERROR",
        "STEP",
        "STATUS",
        "ATTEMPTS",
        "DURATION",
        "TOKENS",
        "PROVIDER"
    );
    for s in &steps {
        let detail = match (&s.error, &s.output) {
            (Some(e), _) => format!("{}: {e}", s.error_kind.map_or("error", |k| k.as_str())),
            (None, Some(Value::String(t))) => t.replace('\n', " "),
            (None, Some(v)) => v.to_string(),
            (None, None) => String::new(),
        };
        let detail = if s.truncated() && s.error.is_none() {
            format!("[truncated] {detail}")
        } else {
            detail
        };
        say_out!(
            "{:<22} {:<10} {:>8} {:>9} {:>7}  {:<10} {}",
            clip(&s.step_key, 22),
            s.status.as_str(),
            s.attempts,
            s.duration_ms
                .map(|ms| format!("{:.2}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            s.tokens_used,
            clip(s.provider.as_deref().unwrap_or("-"), 10),
            clip(&detail, 70)
        );
    }
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    if !failed.is_empty() {
        say_out!();
        say_out!("failed attempts:");
        for a in failed {
            say_out!(
                "  {} #{}  {}: {}{}",
                a.step_key,
                a.attempt,
                a.error_kind.map_or("error", |k| k.as_str()),
                a.error.as_deref().unwrap_or(""),
                a.wait_ms
                    .map(|w| format!("  → waited {:.1}s", w as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
    let truncated: Vec<_> = steps.iter().filter(|s| s.truncated()).collect();
    if !truncated.is_empty() {
        println!();
        println!("answers cut off (finish_reason: length — raise maxTokens or the server's context size; \"failOnTruncation\": true makes it fail the step):");
        for s in truncated {
            println!("  {}", s.step_key);
        }
    }
    let other_models: Vec<_> = steps
        .iter()
        .filter_map(|s| Some((s, s.other_reply_model()?)))
        .collect();
    if !other_models.is_empty() {
        println!();
        println!("warning: the server answered with another model than the one asked for:");
        for (s, answered) in other_models {
            println!(
                "  {}  asked for {}, answered by {answered}",
                s.step_key,
                s.model.as_deref().unwrap_or("-")
            );
        }
    }
    // A step answered by a later provider in its chain says so, with why the earlier ones
    // were skipped: otherwise the answering model looks like the one the blueprint asked for.
    let fallbacks = store.run_fallbacks(&run.id).unwrap_or_default();
    if !fallbacks.is_empty() {
        say_out!();
        say_out!("provider fallbacks:");
        for (step, attempt, note) in fallbacks {
            say_out!("  {step} #{attempt}  {note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
