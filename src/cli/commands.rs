//! One function per command. Each returns its exit code or a [`Failure`].

use super::progress::Progress;
use super::{BackupArgs, Failure, RunArgs, RunsArgs, ShowArgs, TuiArgs, ValidateArgs};
use crate::blueprint::{self, Blueprint, Priority};
use crate::config::Config;
use crate::engine::{parse_var_arg, Engine, RunOutcome, RunRequest};
use crate::events::{EventBus, RunStatus};
use crate::logging;
use crate::store::{RunFilter, Store};
use serde_json::{json, Map, Value};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

fn load_config() -> Result<Config, Failure> {
    Config::load().map_err(|e| Failure::input(format!("{e} (check your environment or .env)")))
}

fn open_store(config: &Config) -> Result<Store, Failure> {
    Store::open(&config.db_file).map_err(|e| Failure::input(e.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot start the async runtime: {e}"),
        })
}

fn load_blueprint(name: &str, dir: &Path) -> Result<Blueprint, Failure> {
    let path = blueprint::resolve(name, dir).map_err(|e| Failure::input(e.to_string()))?;
    blueprint::load_file(&path).map_err(|e| Failure::input(e.to_string()))
}

pub fn tui(args: TuiArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    if !std::io::stdout().is_terminal() {
        return Err(Failure::input(
            "the console needs a terminal (stdout is not one); for scripts use `omniflow run`, \
             `omniflow runs` and `omniflow show`",
        ));
    }
    crate::tui::run(
        config,
        crate::tui::Options {
            theme: args.theme,
            dir: args.dir,
            themes_dir: "themes".into(),
        },
    )
    .map_err(|message| Failure { code: 1, message })?;
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    if args.simulate_failures.is_some() && !args.sandbox {
        return Err(Failure::input(
            "--simulate-failures only works in a sandbox run: add --sandbox",
        ));
    }
    if let Some(rate) = args.simulate_failures {
        if !(0.0..=1.0).contains(&rate) {
            return Err(Failure::input(format!(
                "--simulate-failures {rate}: give a fraction from 0 to 1 (0.3 = 30 %)"
            )));
        }
    }
    let priority = match &args.priority {
        None => None,
        Some(p) => Some(Priority::parse(p).ok_or_else(|| {
            Failure::input(format!(
                "--priority {p:?}: expected critical, high, normal or low"
            ))
        })?),
    };
    let mut variables = Map::new();
    for v in &args.vars {
        let (k, val) = parse_var_arg(v).map_err(Failure::input)?;
        variables.insert(k, val);
    }
    let blueprints: Vec<Blueprint> = if args.all_active {
        if !variables.is_empty() {
            return Err(Failure::input(
                "--var cannot be combined with --all-active (each blueprint has its own variables)",
            ));
        }
        active_blueprints(&args.dir)?
    } else {
        let name = args.blueprint.as_deref().unwrap_or_default();
        vec![load_blueprint(name, &args.dir)?]
    };
    // Check variables before anything is written.
    for bp in &blueprints {
        crate::engine::merge_variables(bp, &variables)
            .map_err(|e| Failure::input(e.to_string()))?;
    }
    let store = open_store(&config)?;
    let _log = logging::init(&config.log_dir, config.secrets(), "info", None)
        .map_err(|e| Failure::input(e.to_string()))?;
    let rt = runtime()?;
    let simulate = args.simulate_failures.unwrap_or(0.0);
    let json_out = args.json;
    let sandbox = args.sandbox;
    let seed = args.seed;
    let all_active = args.all_active;
    let outcomes = rt.block_on(async move {
        let bus = EventBus::new();
        let engine = Engine::new(Arc::new(config), store, bus.clone());
        let tty = std::io::stderr().is_terminal();
        let mut handles = Vec::new();
        let mut progress = None;
        let mut sorted = blueprints;
        sorted.sort_by_key(|b| std::cmp::Reverse(b.priority));
        for bp in sorted {
            let bp = Arc::new(bp);
            let sub = (!all_active).then(|| bus.subscribe());
            let req = RunRequest {
                variables: variables.clone(),
                sandbox,
                simulate_failures: simulate,
                seed,
                priority,
                trigger: if all_active { "all-active" } else { "cli" }.into(),
                ..Default::default()
            };
            let handle = engine
                .start(bp.clone(), req)
                .map_err(|e| Failure::input(e.to_string()))?;
            if let Some(sub) = sub {
                let note = if sandbox {
                    format!(
                        "  sandbox{}",
                        if simulate > 0.0 {
                            format!(" failures {:.0}%", simulate * 100.0)
                        } else {
                            String::new()
                        }
                    )
                } else {
                    String::new()
                };
                let p = Progress::new(&bp, &handle.run_id, tty, note);
                progress = Some(tokio::spawn(p.follow(sub)));
            } else {
                eprintln!("queued {} as run {}", bp.name, handle.run_id);
            }
            handles.push(handle);
        }
        let tokens: Vec<_> = handles.iter().map(|h| h.cancel_token()).collect();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ncancelling… (press Ctrl-C again to quit at once)");
                for t in &tokens {
                    t.cancel();
                }
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let mut outcomes = Vec::new();
        for h in handles {
            let o = h.wait().await;
            if all_active {
                eprintln!(
                    "{} {}  {}  {:.1}s{}",
                    status_icon(o.status),
                    o.blueprint,
                    o.status.as_str(),
                    o.total_time_ms as f64 / 1000.0,
                    o.error
                        .as_deref()
                        .map(|e| format!("  {e}"))
                        .unwrap_or_default()
                );
            }
            outcomes.push(o);
        }
        if let Some(p) = progress {
            let _ = p.await;
        }
        engine.store().flush().await;
        if let Some(e) = engine.store().take_write_error() {
            eprintln!("warning: the history database reported an error: {e}");
        }
        Ok::<_, Failure>(outcomes)
    })?;

    let failed = outcomes
        .iter()
        .filter(|o| o.status != RunStatus::Success)
        .count();
    if json_out {
        let v = if all_active {
            json!({ "runs": outcomes, "failed": failed })
        } else {
            serde_json::to_value(&outcomes[0]).unwrap_or(Value::Null)
        };
        println!("{}", serde_json::to_string(&v).unwrap_or_default());
    } else if all_active {
        eprintln!(
            "{} blueprint{} ran, {} failed",
            outcomes.len(),
            if outcomes.len() == 1 { "" } else { "s" },
            failed
        );
    } else {
        print_outcome(&outcomes[0]);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn active_blueprints(dir: &Path) -> Result<Vec<Blueprint>, Failure> {
    let entries = blueprint::load_dir(dir).map_err(|e| {
        Failure::input(format!(
            "cannot read blueprints from {}: {e}",
            dir.display()
        ))
    })?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (path, r) in entries {
        match r {
            Ok(bp) if bp.active => out.push(bp),
            Ok(_) => {}
            Err(e) => bad.push(format!("{} — {e}", path.display())),
        }
    }
    for b in &bad {
        eprintln!("skipping invalid blueprint: {b}");
    }
    if out.is_empty() {
        return Err(Failure::input(format!(
            "no active blueprints in {} (set \"active\": true in one, or see README)",
            dir.display()
        )));
    }
    Ok(out)
}

fn status_icon(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Success => "✓",
        RunStatus::Error => "✗",
        RunStatus::Cancelled => "■",
        RunStatus::Queued | RunStatus::Running => "…",
    }
}

/// The human summary: outcome on stderr, the final nodes' outputs on stdout.
fn print_outcome(o: &RunOutcome) {
    let retries: u32 = o.steps.iter().map(|s| s.attempts.saturating_sub(1)).sum();
    eprintln!(
        "{} {} {} in {:.1}s — {} steps, {} retr{}, {} tokens{}",
        status_icon(o.status),
        o.blueprint,
        match o.status {
            RunStatus::Success => "succeeded",
            RunStatus::Error => "failed",
            RunStatus::Cancelled => "was cancelled",
            _ => "ended",
        },
        o.total_time_ms as f64 / 1000.0,
        o.steps.len(),
        retries,
        if retries == 1 { "y" } else { "ies" },
        o.tokens_used,
        o.seed.map(|s| format!(" (seed {s})")).unwrap_or_default()
    );
    if let Some(e) = &o.error {
        eprintln!("  {e}");
    }
    eprintln!("  details: omniflow show {}", o.run_id);
    // The outputs nobody else consumed are the results.
    if let Some((id, v)) = o.outputs.iter().next_back() {
        let text = match v {
            Value::String(s) => s.clone(),
            // A notification's record: show what was (or in a sandbox, would be) sent.
            Value::Object(m) if m.contains_key("channel") && m["text"].is_string() => {
                m["text"].as_str().unwrap_or_default().to_string()
            }
            other => serde_json::to_string_pretty(other).unwrap_or_default(),
        };
        eprintln!("── output of {id} ──");
        println!("{text}");
    }
}

pub fn validate(args: ValidateArgs) -> Result<ExitCode, Failure> {
    let mut all_ok = true;
    let mut report = Vec::new();
    for file in &args.files {
        match blueprint::load_file(file) {
            Ok(bp) => {
                if !args.json {
                    println!("{}: ok ({} nodes)", file.display(), bp.nodes.len());
                }
                report.push(json!({ "file": file, "ok": true, "problems": [] }));
            }
            Err(blueprint::LoadError::Invalid { problems, .. }) => {
                all_ok = false;
                if !args.json {
                    for p in &problems {
                        println!("{}: {p}", file.display());
                    }
                }
                let ps: Vec<Value> = problems
                    .iter()
                    .map(|p| json!({ "path": p.path, "message": p.message }))
                    .collect();
                report.push(json!({ "file": file, "ok": false, "problems": ps }));
            }
            Err(e) => {
                all_ok = false;
                if !args.json {
                    println!("{e}");
                }
                report.push(json!({ "file": file, "ok": false, "problems": [{ "path": "", "message": e.to_string() }] }));
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&json!({ "ok": all_ok, "files": report })).unwrap_or_default()
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

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
    };
    let rows = store
        .list_runs(&filter)
        .map_err(|e| Failure::input(e.to_string()))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&json!({ "runs": rows })).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        eprintln!(
            "no runs yet in {} — try: omniflow run tech-digest --sandbox",
            config.db_file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<14} {:<20} {:<10} {:<20} {:>9} {:>7}  ERROR",
        "ID", "BLUEPRINT", "STATUS", "STARTED (UTC)", "DURATION", "TOKENS"
    );
    for r in rows {
        let started = r.started_at.as_deref().unwrap_or(&r.queued_at);
        println!(
            "{:<14} {:<20} {:<10} {:<20} {:>9} {:>7}  {}",
            r.id,
            clip(&r.blueprint_name, 20),
            r.status.as_str(),
            clip(&started.replace('T', " "), 19),
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
        println!(
            "{}",
            serde_json::to_string(&json!({ "run": run, "steps": steps, "attempts": attempts }))
                .unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
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
    println!(
        "started {}  finished {}  took {}  tokens {}  trigger {}",
        run.started_at.as_deref().unwrap_or("-"),
        run.finished_at.as_deref().unwrap_or("-"),
        run.total_time_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into()),
        run.tokens_used,
        run.trigger
    );
    if let Some(e) = &run.error {
        println!("error ({}): {e}", run.error_kind.as_deref().unwrap_or("?"));
    }
    println!();
    println!(
        "{:<22} {:<10} {:>8} {:>9} {:>7}  {:<10} OUTPUT / ERROR",
        "STEP", "STATUS", "ATTEMPTS", "DURATION", "TOKENS", "PROVIDER"
    );
    for s in &steps {
        let detail = match (&s.error, &s.output) {
            (Some(e), _) => format!("{}: {e}", s.error_kind.as_deref().unwrap_or("error")),
            (None, Some(Value::String(t))) => t.replace('\n', " "),
            (None, Some(v)) => v.to_string(),
            (None, None) => String::new(),
        };
        println!(
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
        println!();
        println!("failed attempts:");
        for a in failed {
            println!(
                "  {} #{}  {}: {}{}",
                a.step_key,
                a.attempt,
                a.error_kind.as_deref().unwrap_or("error"),
                a.error.as_deref().unwrap_or(""),
                a.wait_ms
                    .map(|w| format!("  → waited {:.1}s", w as f64 / 1000.0))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn schema() -> Result<ExitCode, Failure> {
    println!(
        "{}",
        serde_json::to_string_pretty(&blueprint::schema()).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn backup(args: BackupArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    if !config.db_file.exists() {
        return Err(Failure::input(format!(
            "no history database at {} (DB_FILE); nothing to back up",
            config.db_file.display()
        )));
    }
    let store = open_store(&config)?;
    store
        .backup(&args.file)
        .map_err(|e| Failure::input(e.to_string()))?;
    eprintln!(
        "backed up {} to {}",
        config.db_file.display(),
        args.file.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
