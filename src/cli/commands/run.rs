//! `omniflow run`: one blueprint, or every active one, to its end.

use super::*;

pub fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let asked = Asked::check(&args)?;
    let blueprints = blueprints_to_run(&args, &config, &asked.variables)?;
    let store = open_store(&config)?;
    let replay = replay_of(&args, &store, &blueprints)?;
    let log = logging::init(&config.log_dir, config.secrets(), "info", None)
        .map_err(|e| Failure::input(e.to_string()))?;
    let rt = runtime()?;
    let first = blueprints[0].clone();
    let batch = Batch {
        blueprints,
        variables: asked.variables,
        priority: asked.priority,
        sandbox: args.sandbox,
        simulate: args.simulate_failures.unwrap_or(0.0),
        seed: args.seed,
        all_active: args.all_active,
        replay,
    };
    let (outcomes, interrupted) = rt.block_on(run_batch(config, store, batch))?;
    if let Some(p) = log.write_problem() {
        say_err!("warning: {p}");
    }
    report(&outcomes, &first, args.json, args.all_active);
    Ok(exit_code(&outcomes, interrupted))
}

/// What the flags ask for, checked before anything is read or written.
struct Asked {
    priority: Option<Priority>,
    variables: Map<String, Value>,
}

impl Asked {
    fn check(args: &RunArgs) -> Result<Asked, Failure> {
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
        Ok(Asked {
            priority,
            variables,
        })
    }
}

/// The blueprint named, or every active one (files or Supabase; invalid ones are reported
/// and skipped), each checked against the variables before anything is written.
fn blueprints_to_run(
    args: &RunArgs,
    config: &Config,
    variables: &Map<String, Value>,
) -> Result<Vec<Blueprint>, Failure> {
    let blueprints: Vec<Blueprint> = if args.all_active {
        if !variables.is_empty() {
            return Err(Failure::input(
                "--var cannot be combined with --all-active (each blueprint has its own variables)",
            ));
        }
        let rt = runtime()?;
        let (found, bad) = gather_blueprints(&args.dir, args.source, config, &rt, true)?;
        for b in &bad {
            say_err!("skipping invalid blueprint: {b}");
        }
        found
    } else {
        let name = args.blueprint.as_deref().unwrap_or_default();
        vec![load_blueprint(name, &args.dir, config)?]
    };
    for bp in &blueprints {
        crate::engine::merge_variables(bp, variables).map_err(|e| Failure::input(e.to_string()))?;
    }
    Ok(blueprints)
}

/// `--replay RUN`: the outputs of that run's successful steps.
fn replay_of(
    args: &RunArgs,
    store: &Store,
    blueprints: &[Blueprint],
) -> Result<std::collections::HashMap<String, Value>, Failure> {
    match &args.replay {
        None => Ok(std::collections::HashMap::new()),
        Some(id) => {
            if !args.sandbox || args.all_active {
                return Err(Failure::input(
                    "--replay works in a sandbox run of one blueprint: add --sandbox",
                ));
            }
            replay_outputs(store, id, &blueprints[0].name)
        }
    }
}

/// The runs to start, and how.
struct Batch {
    blueprints: Vec<Blueprint>,
    variables: Map<String, Value>,
    priority: Option<Priority>,
    sandbox: bool,
    simulate: f64,
    seed: Option<u64>,
    all_active: bool,
    replay: std::collections::HashMap<String, Value>,
}

impl Batch {
    fn request(&self) -> RunRequest {
        RunRequest {
            variables: self.variables.clone(),
            sandbox: self.sandbox,
            simulate_failures: self.simulate,
            seed: self.seed,
            priority: self.priority,
            trigger: if self.all_active {
                crate::engine::Trigger::AllActive
            } else {
                crate::engine::Trigger::Cli
            },
            replay: self.replay.clone(),
            ..Default::default()
        }
    }

    /// What the progress display shows after the blueprint's name.
    fn note(&self) -> String {
        if self.sandbox {
            format!(
                "  sandbox{}",
                if self.simulate > 0.0 {
                    format!(" failures {:.0}%", self.simulate * 100.0)
                } else {
                    String::new()
                }
            )
        } else {
            String::new()
        }
    }
}

/// Runs the batch on an engine of its own, under signals, and reports each run as it is
/// saved. Returns the outcomes and whether a signal came.
async fn run_batch(
    config: Config,
    store: Store,
    mut batch: Batch,
) -> Result<(Vec<RunOutcome>, bool), Failure> {
    let signals = Signals::listen();
    let bus = EventBus::new();
    let engine = Engine::new(Arc::new(config), store, bus.clone());
    engine.set_role(if batch.all_active {
        crate::engine::Role::AllActive
    } else {
        crate::engine::Role::Run
    });
    // Heartbeats keep our runs ours; a cron'd run adopts nothing.
    let maintenance = engine.start_maintenance(false);
    let blueprints = std::mem::take(&mut batch.blueprints);
    let (handles, progress) = start_runs(&engine, &bus, blueprints, &batch)?;
    let tokens: Vec<_> = handles.iter().map(|h| h.cancel_token()).collect();
    let interrupted = watch_signals(engine.clone(), tokens, signals);
    let disk = watch_disk(engine.store().clone());
    let mut outcomes = wait_runs(handles, batch.all_active).await;
    if let Some(p) = progress {
        let _ = p.await;
    }
    if batch.all_active && !batch.sandbox {
        send_digest(&engine, &outcomes).await;
    }
    maintenance.stop().await;
    for o in &outcomes {
        if o.status == RunStatus::Running {
            say_err!(
                "■ {} handed over unfinished: `omniflow resume {}` (or a running console or daemon) continues it",
                o.blueprint, o.run_id
            );
        }
    }
    engine.stopped().await;
    settle(engine.store(), &mut outcomes, &interrupted).await;
    disk.abort();
    if let Some(e) = engine.store().take_write_error() {
        say_err!("warning: the history database reported an error: {e}");
    }
    let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
    Ok((outcomes, interrupted))
}

type ProgressTask = tokio::task::JoinHandle<()>;

/// Starts every blueprint's run, the highest priority first: one run is followed by the
/// progress display, several are each announced with their run id.
fn start_runs(
    engine: &Engine,
    bus: &EventBus,
    mut blueprints: Vec<Blueprint>,
    batch: &Batch,
) -> Result<(Vec<crate::engine::RunHandle>, Option<ProgressTask>), Failure> {
    let tty = std::io::stderr().is_terminal();
    let mut handles = Vec::new();
    let mut progress = None;
    blueprints.sort_by_key(|b| std::cmp::Reverse(b.priority));
    for bp in blueprints {
        let bp = Arc::new(bp);
        let sub = (!batch.all_active).then(|| bus.subscribe());
        let handle = engine
            .start(bp.clone(), batch.request())
            .map_err(|e| Failure::input(e.to_string()))?;
        if let Some(sub) = sub {
            let p = Progress::new(&bp, &handle.run_id, tty, batch.note());
            progress = Some(tokio::spawn(p.follow(sub)));
        } else {
            say_err!("queued {} as run {}", bp.name, handle.run_id);
        }
        handles.push(handle);
    }
    Ok((handles, progress))
}

/// Waits for every run, in order; with `--all-active` each gets a line as it ends.
async fn wait_runs(handles: Vec<crate::engine::RunHandle>, all_active: bool) -> Vec<RunOutcome> {
    let mut outcomes = Vec::new();
    for h in handles {
        let o = h.wait().await;
        if all_active {
            say_err!(
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
    outcomes
}

/// One digest of the whole batch, when NOTIFY_DIGEST names channels.
async fn send_digest(engine: &Engine, outcomes: &[RunOutcome]) {
    if engine.config().notify_digest.is_empty() {
        return;
    }
    let runs: Vec<crate::notify::RunSummary> = outcomes.iter().map(RunOutcome::summary).collect();
    let http = reqwest::Client::new();
    for e in crate::notify::send_digest(&http, engine.config(), &runs).await {
        say_err!("warning: the digest was not sent: {e}");
    }
}

/// The end of the command: JSON on stdout, a line per batch, or one run's summary.
fn report(outcomes: &[RunOutcome], first: &Blueprint, json_out: bool, all_active: bool) {
    let failed = outcomes
        .iter()
        .filter(|o| o.status != RunStatus::Success)
        .count();
    if json_out {
        if all_active {
            print_json(&AllRuns {
                runs: outcomes,
                failed,
            });
        } else {
            print_json(&outcomes[0]);
        }
    } else if all_active {
        say_err!(
            "{} blueprint{} ran, {} failed",
            outcomes.len(),
            if outcomes.len() == 1 { "" } else { "s" },
            failed
        );
    } else {
        print_outcome(&outcomes[0], first);
    }
}

/// The recorded outputs of a run's successful steps, for `--replay`.
fn replay_outputs(
    store: &Store,
    run_id: &str,
    blueprint: &str,
) -> Result<std::collections::HashMap<String, Value>, Failure> {
    let run = store
        .find_run(run_id)
        .map_err(|e| Failure::input(format!("--replay: {e}")))?;
    if run.blueprint_name != blueprint {
        return Err(Failure::input(format!(
            "--replay {}: that run is of blueprint {:?}, not {blueprint:?}",
            run.id, run.blueprint_name
        )));
    }
    crate::engine::successful_outputs(store, &run.id).map_err(|e| Failure::input(e.to_string()))
}

/// The human summary: outcome on stderr, the final nodes' outputs on stdout.
fn print_outcome(o: &RunOutcome, bp: &Blueprint) {
    let retries: u32 = o.steps.iter().map(|s| s.attempts.saturating_sub(1)).sum();
    say_err!(
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
        say_err!("  {e}");
    }
    // The results are the outputs of the final nodes (those no other node needs).
    let needed: std::collections::HashSet<&str> = bp
        .nodes
        .iter()
        .flat_map(|n| n.needs.iter().map(String::as_str))
        .collect();
    let finals: Vec<&str> = bp
        .nodes
        .iter()
        .map(|n| n.id.as_str())
        .filter(|id| !needed.contains(id))
        .collect();
    let mut shown = 0;
    for id in &finals {
        let Some(v) = o.outputs.get(*id) else {
            continue;
        };
        let text = output_text(v);
        say_err!("── output of {id} ──");
        say_out!("{text}");
        shown += 1;
    }
    if shown == 0 && o.status == RunStatus::Success {
        say_err!(
            "  (no final output: the last steps ({}) were skipped)",
            finals.join(", ")
        );
    }
    // Last, so a long output does not push the run's id out of sight.
    say_err!("details: omniflow show {}", o.run_id);
}

/// A final node's output as the human summary prints it. Outputs come from providers,
/// services and (on resume) the database, so nothing here may assume a key is present.
fn output_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) if m.contains_key("channel") => {
            let channel = m.get("channel").and_then(Value::as_str).unwrap_or("?");
            let parts = m.get("parts").and_then(Value::as_u64).unwrap_or(1);
            let messages = format!("{parts} message{}", if parts == 1 { "" } else { "s" });
            // What happened first, then the text that was (or would have been) sent.
            let head = match m.get("delivered") {
                Some(Value::Bool(true)) => {
                    let again = m.get("alreadySent").and_then(Value::as_u64).unwrap_or(0);
                    let mut s = format!("sent on {channel} ({messages})");
                    if again > 0 {
                        s.push_str(&format!(
                            ", {again} of them already sent by an earlier attempt"
                        ));
                    }
                    s
                }
                Some(Value::Bool(false)) => {
                    format!("not sent (a sandbox run): {channel} would get {messages}")
                }
                _ => match m.get("note").and_then(Value::as_str) {
                    Some(note) => format!("{channel}: {note}"),
                    None => return serde_json::to_string_pretty(v).unwrap_or_default(),
                },
            };
            match m.get("text").and_then(Value::as_str) {
                Some(text) => format!("{head}\n{text}"),
                None => head,
            }
        }
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}
