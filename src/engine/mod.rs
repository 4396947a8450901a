//! The engine: turns a blueprint into steps, runs every ready step at once through the shared
//! [`Pool`], retries failed attempts, records every state change in the [`Store`], and
//! publishes it on the [`EventBus`].
//!
//! One engine per process, shared by the console, `omniflow run` and the daemon.
//!
//! - `run.rs`: one run's driver (graph readiness, fan-out, skip, fail-fast, run timeout).
//! - `step.rs`: one step's retry loop and its attempts on the pool.
//! - `nodes.rs`: what each node type does (llm, http, transform, condition, notify, delay).

mod context;
mod drain;
// The fleet's side of the engine: attempts dispatched through the shared PostgreSQL queue
// and the claimer that runs other processes' attempts here.
pub(crate) mod fleet;
mod maintenance;
pub(crate) mod nodes;
pub mod panics;
mod replay;
mod resume;
pub(crate) mod run;
pub(crate) mod step;
#[cfg(test)]
pub(crate) mod testing;

pub use fleet::FleetCounts;
pub use maintenance::{rss_mb, Maintenance, Role};
pub use replay::{recorded_blueprint, retry_plan, successful_outputs};
pub use resume::ResumeError;

use crate::blueprint::{parse_var_value, Blueprint, Priority};
use crate::config::Config;
use crate::error::ErrorKind;
use crate::events::{Event, EventBus, RunStatus, StepStatus};
use crate::pool::{Pool, PoolOptions};
use crate::providers::Providers;
use crate::store::{NewRun, Store};
use crate::template::Templates;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How a run came to be, recorded in history (`runner_executions.trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// `omniflow run`.
    Cli,
    /// Started from the console.
    Console,
    /// A schedule slot fired.
    Schedule,
    /// `omniflow run --all-active`.
    AllActive,
    /// A failed run retried (its successful steps reused).
    Retry,
    /// An interrupted run taken up again.
    Resume,
    /// Started through the library.
    Api,
}

impl Trigger {
    pub const ALL: [Trigger; 7] = [
        Trigger::Cli,
        Trigger::Console,
        Trigger::Schedule,
        Trigger::AllActive,
        Trigger::Retry,
        Trigger::Resume,
        Trigger::Api,
    ];

    /// The name recorded in history.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Cli => "cli",
            Trigger::Console => "console",
            Trigger::Schedule => "schedule",
            Trigger::AllActive => "all-active",
            Trigger::Retry => "retry",
            Trigger::Resume => "resume",
            Trigger::Api => "api",
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Overrides of the blueprint's variables (`--var K=V`).
    pub variables: Map<String, Value>,
    /// Use the simulated model and record notifications instead of sending them.
    pub sandbox: bool,
    /// Fraction of model-call attempts that fail on purpose (sandbox only).
    pub simulate_failures: f64,
    /// Reproduces the injected failures; random (and recorded) when `None`.
    pub seed: Option<u64>,
    /// Overrides the blueprint's priority.
    pub priority: Option<Priority>,
    pub trigger: Trigger,
    pub parent_run_id: Option<String>,
    /// Outputs of steps that already succeeded (retrying only the failed steps of a run, or
    /// resuming one): step key → output. These steps are recorded as done without running.
    pub reuse: HashMap<String, Value>,
    /// Attempts already made per step key (resuming a run): numbering and the retry budget
    /// continue from there.
    pub attempts_before: HashMap<String, u32>,
    /// Record and replay (`run --sandbox --replay <runId>`): step key → the recorded output of
    /// that step in an earlier run. An `llm` step found here answers with it instead of
    /// calling a model; other steps run as usual.
    pub replay: HashMap<String, Value>,
    /// Resuming: steps of `reuse` already recorded `success` in this same run. They are not
    /// written again (the store would refuse, and say so in a warning per step).
    pub already_done: std::collections::HashSet<String>,
    /// Resuming a run the store already has `running`: its start is not recorded again.
    pub already_started: bool,
}

impl Default for RunRequest {
    fn default() -> Self {
        RunRequest {
            variables: Map::new(),
            sandbox: false,
            simulate_failures: 0.0,
            seed: None,
            priority: None,
            trigger: Trigger::Api,
            parent_run_id: None,
            reuse: HashMap::new(),
            attempts_before: HashMap::new(),
            replay: HashMap::new(),
            already_done: Default::default(),
            already_started: false,
        }
    }
}

/// A request that cannot start.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StartError {
    #[error("--var {key}: blueprint \"{blueprint}\" declares no variable {key:?}{hint}")]
    UnknownVariable {
        key: String,
        blueprint: String,
        hint: String,
    },
    #[error(
        "simulated failure rate {0} is out of range: give a fraction from 0 to 1 (0.3 = 30 %)"
    )]
    BadFailureRate(f64),
    #[error("this process is shutting down and starts no new runs")]
    ShuttingDown,
    /// A budget of [`crate::limits::Limits`] the blueprint or its variables exceed.
    #[error("{0}")]
    TooLarge(String),
}

/// One step's result, as reported at the end of a run (`--json`'s `steps`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepSummary {
    pub node: String,
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    pub status: StepStatus,
    pub attempts: u32,
    pub duration_ms: u64,
    pub tokens_used: u64,
    pub cached: bool,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
}

/// How a run ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunOutcome {
    pub run_id: String,
    pub blueprint: String,
    pub status: RunStatus,
    pub total_time_ms: u64,
    /// Node id → output (a `forEach` node's output is the list of its items' outputs).
    pub outputs: Map<String, Value>,
    pub steps: Vec<StepSummary>,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    pub tokens_used: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl RunOutcome {
    /// What a run-level notification or the digest says about this run.
    pub fn summary(&self) -> crate::notify::RunSummary {
        crate::notify::RunSummary {
            run_id: self.run_id.clone(),
            blueprint: self.blueprint.clone(),
            status: self.status,
            total_time_ms: self.total_time_ms,
            steps: self.steps.len(),
            tokens_used: self.tokens_used,
            failed_step: self.failed_step.clone(),
            error: self.error.clone(),
        }
    }
}

/// A run in progress.
pub struct RunHandle {
    pub run_id: String,
    cancel: CancellationToken,
    join: tokio::task::JoinHandle<RunOutcome>,
}

impl RunHandle {
    /// Asks the run to stop; it ends as `cancelled`.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Waits for the end of the run (its history is flushed to the store by then).
    pub async fn wait(self) -> RunOutcome {
        match self.join.await {
            Ok(o) => o,
            Err(e) => RunOutcome {
                run_id: self.run_id,
                blueprint: String::new(),
                status: RunStatus::Error,
                total_time_ms: 0,
                outputs: Map::new(),
                steps: Vec::new(),
                error: Some(format!(
                    "internal error: the run's task ended abnormally ({e})"
                )),
                error_kind: Some(ErrorKind::Internal),
                failed_step: None,
                tokens_used: 0,
                seed: None,
            },
        }
    }
}

/// Tuning knobs beyond the configuration.
#[derive(Clone)]
pub struct EngineOptions {
    pub pool: PoolOptions,
    /// Makes run ids (tests inject stable ones).
    pub ids: Arc<dyn Fn() -> String + Send + Sync>,
}

impl EngineOptions {
    pub fn from_config(config: &Config) -> EngineOptions {
        EngineOptions {
            pool: PoolOptions {
                concurrency: config.concurrency,
                ..PoolOptions::default()
            },
            ids: Arc::new(crate::ids::run_id),
        }
    }
}

pub(crate) struct ActiveRun {
    pub cancel: CancellationToken,
    /// Current priority (changeable while the run is queued or running).
    pub priority: Arc<AtomicUsize>,
    /// Set when the run is handed over unfinished (graceful shutdown): nothing more about it
    /// is recorded here, so the next owner resumes it from the store.
    pub released: Arc<AtomicBool>,
    /// Fires every step of the run without marking it cancelled (used with `released`).
    pub abort: CancellationToken,
}

pub(crate) struct Inner {
    pub config: Arc<Config>,
    pub store: Store,
    pub bus: EventBus,
    pub pool: Pool,
    pub templates: Templates,
    pub providers: Providers,
    pub http: reqwest::Client,
    pub runs: Mutex<HashMap<String, ActiveRun>>,
    pub ids: Arc<dyn Fn() -> String + Send + Sync>,
    /// Set by `shutdown`: no new run starts.
    pub draining: AtomicBool,
    /// What this process is ([`Role`]), recorded with each heartbeat.
    pub role: std::sync::atomic::AtomicU8,
    /// What a shutdown gives its grace period to: every attempt running on this host (except
    /// one that only waits, a delay, which is handed over at once), and a driver's handling
    /// of a step's result up to its next wait (recording it, planning what follows, and the
    /// end of the run when it was the last).
    pub in_flight: drain::Tracker,
    /// Every run's driver, until it has ended: a shutdown waits for them to see the handover.
    pub drivers: drain::Tracker,
    /// When the maintenance loop last turned (ms since the Unix epoch; 0 = never): liveness.
    pub loop_tick_ms: std::sync::atomic::AtomicU64,
    /// Where a graceful shutdown is: a command that ends after a signal waits in
    /// [`Engine::stopped`] for the handover to be recorded and said before it exits.
    pub shutdown: tokio::sync::watch::Sender<maintenance::ShutdownPhase>,
    /// The fleet's shared queue (`DATABASE_URL=postgres://…`); `None`: the local pool alone.
    pub fleet: Option<crate::engine::fleet::FleetHandle>,
}

/// The process's engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the pool on the current tokio runtime.
    pub fn new(config: Arc<Config>, store: Store, bus: EventBus) -> Engine {
        let options = EngineOptions::from_config(&config);
        Engine::with_options(config, store, bus, options)
    }

    pub fn with_options(
        config: Arc<Config>,
        store: Store,
        bus: EventBus,
        options: EngineOptions,
    ) -> Engine {
        crate::limits::memory::watch(config.memory_threshold_mb);
        let pool = Pool::new(options.pool.clone(), bus.clone());
        let http = reqwest::Client::builder()
            .user_agent(concat!("omniflow/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let templates = Templates::with_limits(config.limits.clone());
        let fleet = crate::engine::fleet::Fleet::new(&config, &store);
        let mut providers = Providers::new(config.clone()).with_store(store.clone());
        if let Some(f) = &fleet {
            // A provider's rate limit is one budget for the whole fleet.
            providers = providers.with_fleet_rates(crate::providers::fleet_rates::FleetRates::new(
                f.queue().clone(),
            ));
        }
        let engine = Engine {
            inner: Arc::new(Inner {
                // The store keeps the providers' response cache.
                providers,
                fleet: fleet.clone().map(crate::engine::fleet::FleetHandle),
                config,
                store,
                bus,
                pool,
                templates,
                http,
                runs: Mutex::new(HashMap::new()),
                ids: options.ids,
                draining: AtomicBool::new(false),
                role: std::sync::atomic::AtomicU8::new(Role::Api as u8),
                in_flight: drain::Tracker::new(),
                drivers: drain::Tracker::new(),
                loop_tick_ms: std::sync::atomic::AtomicU64::new(0),
                shutdown: tokio::sync::watch::Sender::new(maintenance::ShutdownPhase::NotAsked),
            }),
        };
        if let Some(f) = &fleet {
            f.start(Arc::downgrade(&engine.inner));
        }
        // Registered before any run is inserted, so no other process ever sees our runs
        // without a live owner.
        engine.heartbeat();
        engine
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub fn bus(&self) -> &EventBus {
        &self.inner.bus
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    /// Checks the request, records the run as queued and starts it.
    pub fn start(
        &self,
        blueprint: Arc<Blueprint>,
        req: RunRequest,
    ) -> Result<RunHandle, StartError> {
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(StartError::ShuttingDown);
        }
        let variables = merge_variables(&blueprint, &req.variables)?;
        check_sizes(&blueprint, &variables, &self.inner.config.limits)?;
        if !(0.0..=1.0).contains(&req.simulate_failures) || req.simulate_failures.is_nan() {
            return Err(StartError::BadFailureRate(req.simulate_failures));
        }
        let run_id = (self.inner.ids)();
        let priority = req.priority.unwrap_or(blueprint.priority);
        // A sandbox run always has a seed, so its injected failures can be replayed.
        let seed = req
            .sandbox
            .then(|| req.seed.unwrap_or_else(|| rand::random::<u32>() as u64));
        self.inner.store.insert_run(NewRun {
            id: run_id.clone(),
            blueprint_name: blueprint.name.clone(),
            priority,
            trigger: req.trigger.as_str().to_string(),
            sandbox: req.sandbox,
            seed,
            simulate_failures: if req.sandbox {
                req.simulate_failures
            } else {
                0.0
            },
            variables: Value::Object(variables.clone()),
            blueprint: serde_json::to_value(&*blueprint).unwrap_or(Value::Null),
            parent_run_id: req.parent_run_id.clone(),
            queued_at: SystemTime::now(),
        });
        tracing::info!(run_id = %run_id, blueprint = %blueprint.name, sandbox = req.sandbox, trigger = %req.trigger, "run queued");
        Ok(self.launch(run_id, blueprint, variables, req, seed, priority))
    }

    /// Publishes the run, registers it as active and spawns its driver.
    pub(crate) fn launch(
        &self,
        run_id: String,
        blueprint: Arc<Blueprint>,
        variables: Map<String, Value>,
        req: RunRequest,
        seed: Option<u64>,
        priority: Priority,
    ) -> RunHandle {
        let cancel = CancellationToken::new();
        let prio = Arc::new(AtomicUsize::new(priority.index()));
        let released = Arc::new(AtomicBool::new(false));
        self.inner.bus.publish(Event::RunQueued {
            run_id: run_id.clone(),
            blueprint: blueprint.name.clone(),
            priority,
            sandbox: req.sandbox,
        });
        let ctx = run::RunCtx::new(
            self.inner.clone(),
            run_id.clone(),
            blueprint,
            variables,
            req,
            seed,
            cancel.clone(),
            prio.clone(),
            released.clone(),
        );
        self.lock_runs().insert(
            run_id.clone(),
            ActiveRun {
                cancel: cancel.clone(),
                priority: prio,
                released,
                abort: ctx.abort.clone(),
            },
        );
        let inner = self.inner.clone();
        let id = run_id.clone();
        let driving = self.inner.drivers.hold();
        let join = tokio::spawn(async move {
            use futures_util::FutureExt;
            // Held until the run is off the active list.
            let _driving = driving;
            let started = std::time::Instant::now();
            let guarded = ctx.clone();
            let (outcome, handling) = match std::panic::AssertUnwindSafe(run::drive(ctx))
                .catch_unwind()
                .await
            {
                Ok(done) => done,
                Err(payload) => (
                    panics::driver_failed(&guarded, &panics::message(&*payload), started),
                    None,
                ),
            };
            inner.store.flush().await;
            inner
                .runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            // Only now, with the run saved and off the active list, may a shutdown that waits
            // for it go on (it would hand over a run still on the list).
            drop(handling);
            outcome
        });
        RunHandle {
            run_id,
            cancel,
            join,
        }
    }

    /// Cancels a run of this process. `false` if no such run is active here.
    pub fn cancel(&self, run_id: &str) -> bool {
        match self.lock_runs().get(run_id) {
            Some(r) => {
                r.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Changes the priority of an active run: its queued steps move now, later ones follow.
    pub fn set_priority(&self, run_id: &str, priority: Priority) -> bool {
        let found = match self.lock_runs().get(run_id) {
            Some(r) => {
                r.priority.store(priority.index(), Ordering::Relaxed);
                true
            }
            None => false,
        };
        if found {
            self.inner.pool.set_run_priority(run_id, priority);
            if let Some(f) = &self.inner.fleet {
                f.0.set_run_priority(run_id, priority);
            }
        }
        found
    }

    /// What this process did through the fleet's shared queue since it started; `None`
    /// without a fleet.
    pub fn fleet_counts(&self) -> Option<FleetCounts> {
        self.inner.fleet.as_ref().map(|f| f.0.counters.read())
    }

    /// The fleet's shared queue, when this process is in one (`DATABASE_URL=postgres://…`):
    /// the console reads its depth. Blocking calls: use it off the async threads.
    pub fn fleet_queue(&self) -> Option<crate::store::pg::queue::Queue> {
        self.inner.fleet.as_ref().map(|f| f.0.queue().clone())
    }

    /// The fleet's announcements of runs other processes changed, heard on this process's
    /// `LISTEN` connection (no connection of their own); `None` without a fleet.
    pub fn follow_fleet_events(
        &self,
    ) -> Option<std::sync::mpsc::Receiver<crate::store::pg::events::Live>> {
        self.inner.fleet.as_ref().map(|f| f.0.follow_events())
    }

    /// Ids of the runs in flight in this process.
    pub fn active_runs(&self) -> Vec<String> {
        self.lock_runs().keys().cloned().collect()
    }

    fn lock_runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, ActiveRun>> {
        self.inner.runs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Refuses a blueprint with more nodes than `MAX_NODES`, or a variable (from the blueprint,
/// `--var` or a trigger) larger than `MAX_VARIABLE_BYTES`: every step's context holds the
/// variables, so one huge value costs every step.
pub fn check_sizes(
    bp: &Blueprint,
    variables: &Map<String, Value>,
    limits: &crate::limits::Limits,
) -> Result<(), StartError> {
    if bp.nodes.len() > limits.max_nodes {
        return Err(StartError::TooLarge(format!(
            "blueprint \"{}\" has {} nodes, more than MAX_NODES ({}); split it, or raise MAX_NODES",
            bp.name,
            bp.nodes.len(),
            limits.max_nodes
        )));
    }
    for (k, v) in variables {
        // Each list item and map entry counts 16 bytes beside its text: in memory it is a
        // value of its own, copied into the run and its steps' context, so 15 MB of `1,`
        // (5 million numbers) took 1.9 GB to run.
        let max = limits.max_variable_bytes;
        let slots = entries(v, max / 16).saturating_mul(16);
        let mut counter = crate::template::SizeCounter::new(max.saturating_sub(slots));
        // The counter refuses the write that would take it past its cap (the only error a
        // `Value` can give it).
        if slots > max || serde_json::to_writer(&mut counter, v).is_err() {
            return Err(StartError::TooLarge(format!(
                "variable {k} is larger than MAX_VARIABLE_BYTES ({}, counting 16 bytes for each \
                 list item and map entry); pass a smaller value, or raise MAX_VARIABLE_BYTES",
                crate::limits::human_bytes(max)
            )));
        }
    }
    Ok(())
}

/// The list items and map entries in `v`, counted up to just past `cap`.
fn entries(v: &Value, cap: usize) -> usize {
    let mut n = 0;
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        if n > cap {
            break;
        }
        match v {
            Value::Array(a) => {
                n += a.len();
                todo.extend(a);
            }
            Value::Object(m) => {
                n += m.len();
                todo.extend(m.values());
            }
            _ => {}
        }
    }
    n
}

/// The blueprint's variables with the overrides applied; an override of an undeclared
/// variable is refused (a typo would otherwise silently do nothing).
pub fn merge_variables(
    bp: &Blueprint,
    overrides: &Map<String, Value>,
) -> Result<Map<String, Value>, StartError> {
    let mut vars = bp.variables.clone();
    for (k, v) in overrides {
        if !vars.contains_key(k) {
            let declared: Vec<&str> = bp.variables.keys().map(String::as_str).collect();
            let hint = if declared.is_empty() {
                " (it declares none; add it under \"variables\")".to_string()
            } else {
                format!(" (declared: {})", declared.join(", "))
            };
            return Err(StartError::UnknownVariable {
                key: k.clone(),
                blueprint: bp.name.clone(),
                hint,
            });
        }
        vars.insert(k.clone(), v.clone());
    }
    Ok(vars)
}

/// Parses `K=V` (V as JSON when it is JSON, else text).
pub fn parse_var_arg(arg: &str) -> Result<(String, Value), String> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), parse_var_value(v))),
        _ => Err(format!(
            "bad --var {arg:?}: expected KEY=VALUE, e.g. --var TOPICS='[\"rust\",\"wasm\"]'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::entries;
    use serde_json::{json, Value};

    /// Counting a variable's entries stops soon after the cap: a hostile variable of a
    /// million entries costs the cap and the one list that crossed it, not a million.
    #[test]
    fn counting_entries_stops_just_past_the_cap() {
        let list = json!((0..1000).collect::<Vec<u32>>());
        let huge = Value::Array(vec![list; 1000]);
        let n = entries(&huge, 100);
        assert!((101..=1100).contains(&n), "{n}");
        assert_eq!(entries(&json!({"a": [1, 2], "b": {"c": 3}}), 100), 5);
    }

    /// A variable's entries count against its size wherever they are nested: a list of 2,000
    /// numbers inside a list is 4 KB of text but 2,000 values, over a 16 KB limit; the same
    /// list as 200 numbers is not.
    #[test]
    fn nested_entries_count_against_a_variable_s_size() {
        let limits = crate::limits::Limits {
            max_variable_bytes: 16_000,
            ..Default::default()
        };
        let bp: crate::blueprint::Blueprint =
            serde_json::from_value(json!({ "name": "sized", "nodes": [] })).unwrap();
        let vars = |n: usize| {
            let mut m = serde_json::Map::new();
            m.insert("NESTED".into(), json!([vec![1; n]]));
            m
        };
        let Err(super::StartError::TooLarge(e)) = super::check_sizes(&bp, &vars(2000), &limits)
        else {
            panic!("2,000 nested values fit in 16 KB");
        };
        assert!(
            e.contains("variable NESTED is larger than MAX_VARIABLE_BYTES"),
            "{e}"
        );
        assert!(super::check_sizes(&bp, &vars(200), &limits).is_ok());
    }
}
