//! One run's driver: decides which nodes are ready, fans `forEach` nodes out, skips what a
//! false condition guards, stops the run at the first failure (unless the node says
//! `continueOnError`), and enforces the run's timeout and cancellation.

use super::context::{Finished, RunValues};
use super::step::{self, StepResult, StepSpec};
use super::{Inner, RunOutcome, RunRequest, StepSummary};
use crate::blueprint::{Blueprint, NodeKind, Priority};
use crate::error::{ErrorKind, StepError};
use crate::events::{Event, RunStatus, StepStatus};
use crate::providers::SimulatedModel;
use crate::store::{RunEnd, StepEnd};
use crate::template::{Context, Templates};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// Everything the steps of one run share.
pub(crate) struct RunCtx {
    pub inner: Arc<Inner>,
    pub run_id: Arc<str>,
    pub blueprint: Arc<Blueprint>,
    pub sandbox: Option<SimulatedModel>,
    pub seed: Option<u64>,
    /// Fired by the user (cancel) — the run ends `cancelled`.
    pub cancel: CancellationToken,
    /// Fired to stop every step: a child of `cancel`, also fired on fail-fast and timeout.
    pub abort: CancellationToken,
    pub priority: Arc<AtomicUsize>,
    pub reuse: HashMap<String, Value>,
    /// Reused steps this run already recorded `success` (resuming): not written again.
    pub already_done: std::collections::HashSet<String>,
    pub attempts_before: HashMap<String, u32>,
    pub is_sandbox: bool,
    /// Handed over unfinished: record nothing more (see `ActiveRun::released`).
    pub released: Arc<AtomicBool>,
    /// Resuming a run already recorded `running`: its start is not recorded again.
    pub already_started: bool,
    /// The run this one retries or resumes: notifications dedupe on the chain's root.
    pub parent_run_id: Option<String>,
    /// Tokens spent by the run's model calls so far (added as each attempt ends), checked
    /// against `token_budget` before every model call.
    pub tokens_spent: AtomicU64,
    /// The blueprint's `maxTokensPerRun`, else `MAX_TOKENS_PER_RUN`; `None` = unlimited.
    pub token_budget: Option<u64>,
    /// Estimated tokens of the model calls in flight: with a budget, a call starts only when
    /// what is spent, what is in flight and its own estimate fit (see `step::hold_budget`).
    pub tokens_held: AtomicU64,
    /// Model calls that ended with tokens: their average sizes an unknown answer.
    pub calls_done: AtomicU64,
    /// Woken whenever a call in flight settles.
    pub budget_settled: tokio::sync::Notify,
    /// Recorded outputs to replay instead of calling a model (see `RunRequest::replay`).
    pub replay: HashMap<String, Value>,
    /// `vars` and `run` as templates see them, converted once for every step of the run.
    pub values: RunValues,
    /// Which of the run's steps hold a place in its window (see [`STEPS_PER_WORKER`]).
    pub window: Window,
}

/// How many of a run's steps may be under way at once, per worker of the pool: queued in the
/// pool, running, or waiting for their provider (a step sleeping out a retry's backoff does
/// not count, and eight times as many as are under way may sleep at once). A `forEach` item
/// becomes a step only when there is room, so a 10,000-item fan-out holds the state of at
/// most 720 steps (with the default 40 workers: 80 under way, 640 asleep), not of 10,000;
/// two per worker keep the next item queued when a worker frees up. The pool still orders
/// what is queued by priority and age, and another run's steps queue beside these instead
/// of behind every item of a large fan-out.
pub(crate) const STEPS_PER_WORKER: usize = 2;

/// The least a run keeps under way when its steps go through the fleet's shared queue
/// (`DATABASE_URL`): enough for the workers of many hosts, still a bounded amount of state.
pub(crate) const FLEET_WINDOW: usize = 1024;

/// A run's window: the places of its steps under way (see [`STEPS_PER_WORKER`]). A step holds
/// a place from its start to its end, except while it sleeps out a retry's backoff; back from
/// the sleep it waits for a place again, ahead of the run's items not started yet (the
/// semaphore hands a freed place to its waiters first, in turn), so a retry never takes the
/// run past its window.
pub(crate) struct Window {
    places: Arc<tokio::sync::Semaphore>,
    size: usize,
    /// Woken when a step gives its place up to sleep, so the driver can start another.
    left: tokio::sync::Notify,
}

/// How many of a run's steps may sleep out a backoff, per place in its window. A sleeping
/// step holds little (its rendered input and a timer), and too tight a bound idles the
/// workers whenever a provider is flaky: a 2,000-item sandbox fan-out at 30 % failures took
/// 30.0 s with one asleep per place, 19.4 s with eight, the same as with no bound. A fan-out
/// against a provider that fails every call still starts at most 9 × the window's items
/// (720 with the default 40 workers), not all of them.
const ASLEEP_PER_PLACE: usize = 8;

/// A step's place in its run's window: given back when dropped.
pub(crate) struct Place {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Window {
    fn new(size: usize) -> Window {
        Window {
            places: Arc::new(tokio::sync::Semaphore::new(size)),
            size,
            left: tokio::sync::Notify::new(),
        }
    }

    /// How many of the run's steps may be started and not ended: those in their places and
    /// [`ASLEEP_PER_PLACE`] times as many asleep. Without the second bound, a fan-out whose
    /// items fail fast and back off long would start every one of its items, each holding
    /// its state while it sleeps.
    fn most_under_way(&self) -> usize {
        self.size.saturating_mul(1 + ASLEEP_PER_PLACE)
    }

    /// A free place for a new step, unless none is free or a step back from its sleep waits
    /// for the next one.
    fn try_place(&self) -> Option<Place> {
        self.places
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Place { _permit: p })
    }

    /// Gives the step's place up while it sleeps: the driver may start another step in it.
    pub(crate) fn step_away(&self, place: Option<Place>) {
        if place.is_some() {
            drop(place);
            self.left.notify_one();
        }
    }

    /// Waits for a place, after the steps that came back before this one.
    pub(crate) async fn come_back(&self) -> Place {
        // The semaphore lives as long as the window and is never closed.
        match self.places.clone().acquire_owned().await {
            Ok(permit) => Place { _permit: permit },
            Err(_) => unreachable!("a run's window is never closed"),
        }
    }
}

impl RunCtx {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: Arc<Inner>,
        run_id: String,
        blueprint: Arc<Blueprint>,
        variables: Map<String, Value>,
        req: RunRequest,
        seed: Option<u64>,
        cancel: CancellationToken,
        priority: Arc<AtomicUsize>,
        released: Arc<AtomicBool>,
    ) -> Arc<RunCtx> {
        let sandbox = req.sandbox.then(|| {
            SimulatedModel::new(
                req.simulate_failures,
                seed.unwrap_or(0),
                inner.config.sandbox_latency,
            )
            .with_time_scale(inner.config.time_scale)
            .with_request_timeout(inner.config.request_timeout)
        });
        let abort = cancel.child_token();
        let parent_run_id = req.parent_run_id.clone();
        let token_budget = blueprint
            .max_tokens_per_run
            .or(inner.config.max_tokens_per_run);
        let local = inner
            .pool
            .concurrency()
            .saturating_mul(STEPS_PER_WORKER)
            .max(1);
        // With a fleet, the steps go to the shared queue and every host's workers take them: the
        // driver's own CONCURRENCY must not starve the others.
        let window = if inner.fleet.is_some() {
            local.max(FLEET_WINDOW)
        } else {
            local
        };
        let values = RunValues::new(
            &variables,
            &json!({ "id": run_id, "blueprint": blueprint.name, "sandbox": req.sandbox }),
        );
        Arc::new(RunCtx {
            values,
            window: Window::new(window),
            tokens_spent: AtomicU64::new(0),
            token_budget,
            tokens_held: AtomicU64::new(0),
            calls_done: AtomicU64::new(0),
            budget_settled: tokio::sync::Notify::new(),
            replay: req.replay,
            inner,
            run_id: run_id.into(),
            blueprint,
            sandbox,
            seed,
            cancel,
            abort,
            priority,
            reuse: req.reuse,
            already_done: req.already_done,
            already_started: req.already_started,
            attempts_before: req.attempts_before,
            is_sandbox: req.sandbox,
            released,
            parent_run_id,
        })
    }

    pub fn priority(&self) -> Priority {
        Priority::from_index(self.priority.load(Ordering::Relaxed))
    }

    pub fn templates(&self) -> &Templates {
        &self.inner.templates
    }

    /// True once the run was handed over: nothing more is recorded for it here.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
enum NodeState {
    Pending,
    Running {
        remaining: usize,
        outputs: Vec<Value>,
        failed: Option<StepError>,
    },
    Done(Value),
    /// Failed, but the node says `continueOnError`: dependents run and see a null output.
    FailedContinue(StepError),
    Failed,
    Skipped,
}

impl NodeState {
    fn is_final(&self) -> bool {
        !matches!(self, NodeState::Pending | NodeState::Running { .. })
    }
}

/// A ready node's steps that have not started yet.
enum Planned {
    /// A node without `forEach`: its one step.
    One(StepSpec),
    /// A `forEach` node's items, each with its index, in order.
    Items {
        node: usize,
        base: Context,
        items: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    },
}

impl Planned {
    fn len(&self) -> usize {
        match self {
            Planned::One(_) => 1,
            Planned::Items { items, .. } => items.len(),
        }
    }
}

/// The planned steps of a run not started yet, in the order their nodes became ready; each
/// becomes a step (its future, its rendered input, its place in the pool) only when the
/// run's window has room.
#[derive(Default)]
struct Backlog(VecDeque<Planned>);

impl Backlog {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn next(&mut self, bp: &Blueprint) -> Option<StepSpec> {
        loop {
            match self.0.front_mut()? {
                Planned::One(_) => {
                    if let Some(Planned::One(spec)) = self.0.pop_front() {
                        return Some(spec);
                    }
                }
                Planned::Items { node, base, items } => match items.next() {
                    Some((n, item)) => {
                        let node = *node;
                        return Some(StepSpec {
                            node,
                            item: Some(n),
                            key: format!("{}[{n}]", bp.nodes[node].id),
                            context: base.with_item(item, n),
                        });
                    }
                    None => {
                        self.0.pop_front();
                    }
                },
            }
        }
    }
}

/// The least time between two writes of a run's progress counters.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// How many bytes of run row a second of progress writes may rewrite (see [`ProgressGate`]).
const PROGRESS_BYTES_PER_SEC: u64 = 10 << 20;

/// When a run's counters (`steps_done`, tokens) are written. SQLite rewrites a whole row to
/// change one column of it, and a run's row holds its variables and blueprint: written after
/// every step, a fan-out next to a 1 MB variable rewrote that megabyte for every batch of
/// steps, and a 10,000-node chain (an 11 MB blueprint) rewrote 11 MB per step, so a run's
/// cost grew with the square of its size. So the counters are written at most every
/// [`PROGRESS_EVERY`], and for a big row at most [`PROGRESS_BYTES_PER_SEC`] a second: the
/// cost is per second of run time, whatever its size. A step that ends between two writes
/// leaves the counters pending; the driver writes them when the interval is up even if no
/// other step ends (`Driver::next_result`), and the run's end carries the final ones.
struct ProgressGate {
    every: std::time::Duration,
    last: Option<tokio::time::Instant>,
    pending: bool,
}

impl ProgressGate {
    /// A gate for a run whose row holds about `row_bytes` of snapshot.
    fn new(row_bytes: u64) -> ProgressGate {
        let every =
            std::time::Duration::from_secs_f64(row_bytes as f64 / PROGRESS_BYTES_PER_SEC as f64)
                .max(PROGRESS_EVERY);
        ProgressGate {
            every,
            last: None,
            pending: false,
        }
    }

    /// The gate of a run with this blueprint and these variables: what a write of its row
    /// rewrites is its snapshot of both.
    fn for_run<V: serde::Serialize + ?Sized>(bp: &Blueprint, vars: &V) -> ProgressGate {
        ProgressGate::new(json_len(bp) + json_len(vars))
    }

    /// A step ended: whether to write the counters now (else they are pending).
    fn due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let due = self.last.is_none_or(|t| now >= t + self.every);
        if due {
            self.last = Some(now);
            self.pending = false;
        } else {
            self.pending = true;
        }
        due
    }

    /// When pending counters are to be written.
    fn flush_at(&self) -> Option<tokio::time::Instant> {
        match (self.pending, self.last) {
            (true, Some(t)) => Some(t + self.every),
            _ => None,
        }
    }

    /// The pending counters are being written now.
    fn flushed(&mut self) {
        self.last = Some(tokio::time::Instant::now());
        self.pending = false;
    }
}

/// The bytes a writer would produce for `value` as JSON, without keeping them.
fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, value);
    c.0
}

type Inflight = FuturesUnordered<futures_util::future::BoxFuture<'static, StepResult>>;

/// Starts planned steps while the run's window has a free place.
fn start_steps(ctx: &Arc<RunCtx>, backlog: &mut Backlog, inflight: &mut Inflight) {
    while inflight.len() < ctx.window.most_under_way() {
        let Some(place) = ctx.window.try_place() else {
            break;
        };
        let Some(spec) = backlog.next(&ctx.blueprint) else {
            break;
        };
        inflight.push(Box::pin(step::run_guarded(ctx.clone(), spec, place)));
    }
}

/// Which nodes may start (Kahn's algorithm): each node counts its needs that have not
/// settled yet; when a node settles, its dependents count down, and those at zero are ready.
struct Readiness {
    needs: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    waiting: Vec<usize>,
    /// Lowest index first, so nodes that become ready together start in blueprint order.
    ready: BTreeSet<usize>,
    settled: Vec<bool>,
}

impl Readiness {
    fn new(bp: &Blueprint, index: &HashMap<&str, usize>) -> Readiness {
        let needs: Vec<Vec<usize>> = bp
            .nodes
            .iter()
            .map(|n| {
                n.needs
                    .iter()
                    .filter_map(|d| index.get(d.as_str()).copied())
                    .collect()
            })
            .collect();
        let mut dependents = vec![Vec::new(); needs.len()];
        for (i, ns) in needs.iter().enumerate() {
            for &d in ns {
                dependents[d].push(i);
            }
        }
        let waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
        let ready = (0..needs.len()).filter(|&i| waiting[i] == 0).collect();
        Readiness {
            settled: vec![false; needs.len()],
            needs,
            dependents,
            waiting,
            ready,
        }
    }

    fn next_ready(&mut self) -> Option<usize> {
        self.ready.pop_first()
    }

    fn needs(&self, i: usize) -> &[usize] {
        &self.needs[i]
    }

    /// Node `i` reached a final state: its dependents learn of it, and templates see it.
    fn settle(&mut self, i: usize, state: &NodeState, finished: &Finished) {
        if std::mem::replace(&mut self.settled[i], true) {
            return;
        }
        match state {
            NodeState::Done(v) => finished.done(i, v),
            NodeState::FailedContinue(e) => finished.failed_continue(i, &e.message),
            NodeState::Skipped => finished.skipped(i),
            _ => {}
        }
        for &j in &self.dependents[i] {
            self.waiting[j] -= 1;
            if self.waiting[j] == 0 {
                self.ready.insert(j);
            }
        }
    }
}

/// Runs the blueprint to its end and records the outcome. Returns with it the hold on a
/// shutdown's wait of the step result that ended the run, if one did (see
/// `StepResult::in_flight`), for the caller to drop once the run is off the active list.
pub(crate) async fn drive(ctx: Arc<RunCtx>) -> (RunOutcome, Option<super::drain::Busy>) {
    #[cfg(test)]
    super::panics::injected(
        ctx.blueprint.description.as_deref().unwrap_or_default(),
        "driver",
    );
    let mut d = Driver::start(ctx);
    loop {
        d.plan_ready();
        // New steps wait while the history writer is far behind: their writes would only
        // pile up in memory, and the run ends when its history is saved anyway.
        if !d.backlog.is_empty() {
            d.ctx.inner.store.room().await;
        }
        // What was planned starts as the window has room; once the run is stopping, the rest
        // still pass through here and end at once as cancelled, recorded like before.
        start_steps(&d.ctx, &mut d.backlog, &mut d.inflight);
        if d.inflight.is_empty() {
            break;
        }
        match d.next_result().await {
            Next::Step(res) => d.on_finished(res),
            Next::Again => continue,
            Next::Ended => break,
            Next::TimedOut => {
                d.time_out().await;
                break;
            }
        }
    }
    d.end().await
}

/// What the driver's wait for the next result brought.
// Only ever returned and matched at once, never stored: boxing the result would cost an
// allocation per step for nothing.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// A step ended.
    Step(StepResult),
    /// The user cancelled, or a step went to sleep out a backoff: plan and start again.
    Again,
    /// Nothing is in flight any more.
    Ended,
    /// The run's deadline passed.
    TimedOut,
}

/// One run's driver, from its start to its end (see [`drive`]).
struct Driver {
    ctx: Arc<RunCtx>,
    started: Instant,
    states: Vec<NodeState>,
    graph: Readiness,
    finished: Arc<Finished>,
    summaries: Vec<StepSummary>,
    inflight: Inflight,
    backlog: Backlog,
    failure: Option<(String, StepError)>,
    timed_out: bool,
    tokens: u64,
    steps_done: u32,
    progress: ProgressGate,
    run_timeout: Option<std::time::Duration>,
    deadline: Option<tokio::time::Instant>,
    /// The hold of the step result being handled (see `StepResult::in_flight`): kept until
    /// the driver waits again, or to the end of the run when that result was its last.
    handling: Option<super::drain::Busy>,
}

impl Driver {
    /// Records the run's start and sets up its readiness counters.
    fn start(ctx: Arc<RunCtx>) -> Driver {
        let started = Instant::now();
        let bp = ctx.blueprint.clone();
        let inner = ctx.inner.clone();
        let run_id = ctx.run_id.to_string();
        if !ctx.already_started {
            inner
                .store
                .run_started(&run_id, SystemTime::now(), bp.nodes.len() as u32);
        }
        inner.bus.publish(Event::RunStarted {
            run_id: run_id.clone(),
            blueprint: bp.name.clone(),
            nodes: bp.nodes.len(),
        });
        tracing::info!(run_id = %run_id, blueprint = %bp.name, "run started");

        let index: HashMap<&str, usize> = bp
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        let states: Vec<NodeState> = vec![NodeState::Pending; bp.nodes.len()];
        let graph = Readiness::new(&bp, &index);
        let finished = Finished::new(&bp);
        let summaries: Vec<StepSummary> = Vec::new();
        let inflight = Inflight::new();
        let backlog = Backlog::default();
        let failure: Option<(String, StepError)> = None;
        let timed_out = false;
        let tokens: u64 = 0;
        let steps_done: u32 = 0;
        let run_timeout = bp.timeout.as_ref().map(crate::blueprint::DurationSpec::get);
        // Checked: a timeout too far away to represent is no deadline at all.
        let deadline = run_timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(inner.config.scaled(t)));
        let progress = ProgressGate::for_run(&bp, ctx.values.vars());

        Driver {
            ctx,
            started,
            states,
            graph,
            finished,
            summaries,
            inflight,
            backlog,
            failure,
            timed_out,
            tokens,
            steps_done,
            progress,
            run_timeout,
            deadline,
            handling: None,
        }
    }

    /// Readiness: every node whose needs are all final starts (a node becomes ready when the
    /// last of its needs settles, dependency counters, so planning costs O(nodes + edges) a
    /// run): skipped, settled at once (an empty forEach), failed in planning, or planned into
    /// the backlog.
    fn plan_ready(&mut self) {
        let ctx = &self.ctx;
        let bp = &ctx.blueprint;
        if self.failure.is_some() || ctx.abort.is_cancelled() {
            return;
        }
        while let Some(i) = self.graph.next_ready() {
            let node = &bp.nodes[i];
            if let Some(reason) = skip_reason(bp, &self.states, self.graph.needs(i)) {
                record_skip(ctx, i, &reason, &mut self.summaries);
                self.states[i] = NodeState::Skipped;
                self.graph.settle(i, &self.states[i], &self.finished);
                continue;
            }
            let base = self.finished.context(&ctx.values);
            match plan_node(ctx, i, &base) {
                Ok(planned) if planned.len() == 0 => {
                    // A forEach over an empty list: done, with an empty output.
                    self.states[i] = NodeState::Done(Value::Array(Vec::new()));
                    self.graph.settle(i, &self.states[i], &self.finished);
                }
                Ok(planned) => {
                    let n = planned.len();
                    self.states[i] = NodeState::Running {
                        remaining: n,
                        outputs: vec![Value::Null; n],
                        failed: None,
                    };
                    self.backlog.0.push_back(planned);
                }
                Err(e) => {
                    let key = node.id.clone();
                    record_plan_failure(ctx, i, &e, &mut self.summaries);
                    if node.continue_on_error {
                        self.states[i] = NodeState::FailedContinue(e);
                        self.graph.settle(i, &self.states[i], &self.finished);
                    } else if self.failure.is_none() {
                        // What is ready already still starts, and stops at once (its
                        // steps see the abort); nothing after it starts.
                        self.states[i] = NodeState::Failed;
                        self.failure = Some((key, e));
                        ctx.abort.cancel();
                        ctx.inner.pool.remove_run(&ctx.run_id);
                    } else {
                        self.states[i] = NodeState::Failed;
                    }
                }
            }
        }
    }

    /// Dispatch: waits for the next step to end, for the user's cancel, for a step going to
    /// sleep (another may take its place), or for the run's deadline.
    async fn next_result(&mut self) -> Next {
        // Waiting for the next result, the driver has nothing in flight.
        drop(self.handling.take());
        let ctx = &self.ctx;
        let deadline = self.deadline;
        let flush_at = self.progress.flush_at();
        let inflight = &mut self.inflight;
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, inflight.next()).await.ok(),
                None => Some(inflight.next().await),
            }
        };
        let res = tokio::select! {
            r = next => r,
            _ = ctx.cancel.cancelled(), if !ctx.abort.is_cancelled() => {
                // The user cancelled: steps see `abort` (a child) and queued ones are dropped.
                ctx.inner.pool.remove_run(&ctx.run_id);
                return Next::Again;
            }
            // A step went to sleep out a backoff: another may take its place.
            _ = ctx.window.left.notified(), if !self.backlog.is_empty() => return Next::Again,
            // Counters left pending by a step that ended between two writes.
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)),
                if flush_at.is_some() => {
                self.progress.flushed();
                ctx.inner.store.run_progress(&ctx.run_id, self.steps_done, self.tokens);
                return Next::Again;
            }
        };
        match res {
            Some(Some(r)) => Next::Step(r),
            Some(None) => Next::Ended,
            None => Next::TimedOut,
        }
    }

    /// On finished: a step's result is folded into its node; a node that settled lets its
    /// dependents know; the first failure (without `continueOnError`) stops the run.
    fn on_finished(&mut self, mut res: StepResult) {
        let ctx = &self.ctx;
        self.handling = res.in_flight.take();
        let node = res.node;
        let failed = finish_step(
            ctx,
            &mut self.states,
            &mut self.summaries,
            &mut self.tokens,
            &mut self.steps_done,
            res,
        );
        if self.states[node].is_final() {
            self.graph.settle(node, &self.states[node], &self.finished);
        }
        if self.progress.due() {
            ctx.inner
                .store
                .run_progress(&ctx.run_id, self.steps_done, self.tokens);
        }
        if let Some((node, err)) = failed {
            if self.failure.is_none() && !ctx.abort.is_cancelled() {
                self.failure = Some((node, err));
                // Fail fast: every other step of this run stops.
                ctx.abort.cancel();
                ctx.inner.pool.remove_run(&ctx.run_id);
            }
        }
    }

    /// The run's deadline passed: stop everything still going, then drain what is in flight,
    /// and what was planned, without a deadline.
    async fn time_out(&mut self) {
        let ctx = &self.ctx;
        self.timed_out = true;
        ctx.abort.cancel();
        ctx.inner.pool.remove_run(&ctx.run_id);
        loop {
            start_steps(ctx, &mut self.backlog, &mut self.inflight);
            drop(self.handling.take());
            let Some(mut r) = self.inflight.next().await else {
                break;
            };
            self.handling = r.in_flight.take();
            finish_step(
                ctx,
                &mut self.states,
                &mut self.summaries,
                &mut self.tokens,
                &mut self.steps_done,
                r,
            );
        }
        // Nothing is planned any more: no node needs to learn what settled.
    }

    /// End of run: the outcome from the nodes' states, recorded once the run's history is
    /// saved, published, and notified; or, for a run handed over, only announced.
    async fn end(self) -> (RunOutcome, Option<super::drain::Busy>) {
        let Driver {
            ctx,
            started,
            states,
            summaries,
            failure,
            timed_out,
            tokens,
            steps_done,
            run_timeout,
            handling,
            ..
        } = self;
        let bp = ctx.blueprint.clone();
        let inner = ctx.inner.clone();
        let run_id = ctx.run_id.to_string();
        // Outputs of the nodes that produced one.
        let mut outputs = Map::new();
        for (i, st) in states.into_iter().enumerate() {
            if let NodeState::Done(v) = st {
                outputs.insert(bp.nodes[i].id.clone(), v);
            }
        }
        let (status, error, error_kind, failed_step) = if timed_out {
            let t = run_timeout.map(|t| humantime::format_duration(t).to_string());
            (
                RunStatus::Error,
                Some(format!(
                    "the run exceeded its timeout of {} and was stopped; raise the blueprint's \"timeout\"",
                    t.unwrap_or_default()
                )),
                Some(ErrorKind::Timeout),
                None,
            )
        } else if let Some((node, e)) = failure {
            (
                RunStatus::Error,
                Some(format!("step {node} failed: {}", e.message)),
                Some(e.kind),
                Some(node),
            )
        } else if ctx.cancel.is_cancelled() {
            (
                RunStatus::Cancelled,
                Some("cancelled by the user".to_string()),
                Some(ErrorKind::Cancelled),
                None,
            )
        } else {
            (RunStatus::Success, None, None, None)
        };
        if !ctx.is_released() {
            // A run is finished when its history is: its time includes committing its steps.
            inner.store.flush().await;
        }
        let total_time_ms = started.elapsed().as_millis() as u64;
        if ctx.is_released() {
            // Another process resumes it from what the store holds; say so and stop here.
            inner.bus.publish(Event::RunReleased {
                run_id: run_id.clone(),
                blueprint: bp.name.clone(),
            });
            tracing::info!(run_id = %run_id, blueprint = %bp.name, "run released unfinished for another process to resume");
            let outcome = RunOutcome {
                run_id,
                blueprint: bp.name.clone(),
                status: RunStatus::Running,
                total_time_ms,
                outputs,
                steps: summaries,
                error: Some(
                    "released unfinished by a shutdown; `omniflow resume` or a daemon continues it"
                        .into(),
                ),
                error_kind: None,
                failed_step: None,
                tokens_used: tokens,
                seed: ctx.seed,
            };
            return (outcome, handling);
        }
        inner.store.run_finished(RunEnd {
            run_id: run_id.clone(),
            status,
            finished_at: SystemTime::now(),
            total_time_ms,
            tokens_used: tokens,
            steps_done,
            error: error.clone(),
            error_kind,
            failed_step: failed_step.clone(),
        });
        inner.bus.publish(Event::RunFinished {
            run_id: run_id.clone(),
            blueprint: bp.name.clone(),
            status,
            total_time_ms,
            error: error.clone(),
        });
        match status {
            RunStatus::Success => {
                tracing::info!(run_id = %run_id, blueprint = %bp.name, total_time_ms, tokens, "run succeeded")
            }
            _ => {
                tracing::warn!(run_id = %run_id, blueprint = %bp.name, status = status.as_str(), error = error.as_deref().unwrap_or(""), "run did not succeed")
            }
        }
        // Run-level notifications: `notify.onSuccess/onFailure`, else the global
        // defaults. Before `wait` returns, so a CLI run does not exit before they are sent.
        let outcome = RunOutcome {
            run_id,
            blueprint: bp.name.clone(),
            status,
            total_time_ms,
            outputs,
            steps: summaries,
            error,
            error_kind,
            failed_step,
            tokens_used: tokens,
            seed: ctx.seed,
        };
        crate::notify::after_run(
            &inner.http,
            &inner.config,
            &inner.store,
            &bp,
            &outcome.summary(),
            ctx.is_sandbox,
        )
        .await;
        (outcome, handling)
    }
}

/// Folds a finished step into its node. Returns the node and error when the run must fail.
fn finish_step(
    ctx: &RunCtx,
    states: &mut [NodeState],
    summaries: &mut Vec<StepSummary>,
    tokens: &mut u64,
    steps_done: &mut u32,
    r: StepResult,
) -> Option<(String, StepError)> {
    *tokens += r.summary.tokens_used;
    *steps_done += 1;
    summaries.push(r.summary.clone());
    let node = &ctx.blueprint.nodes[r.node];
    let NodeState::Running {
        remaining,
        outputs,
        failed,
    } = &mut states[r.node]
    else {
        return None;
    };
    match r.result {
        Ok(v) => outputs[r.item.unwrap_or(0)] = v,
        Err(e) => {
            if failed.is_none()
                || failed
                    .as_ref()
                    .is_some_and(|f| f.kind == ErrorKind::Cancelled)
            {
                *failed = Some(e);
            }
        }
    }
    *remaining -= 1;
    if *remaining > 0 {
        return None;
    }
    let outputs = std::mem::take(outputs);
    let failed = failed.take();
    if node.for_each.is_some() {
        let status = match &failed {
            None => "succeeded",
            Some(e) if e.kind == ErrorKind::Cancelled => "cancelled",
            Some(_) if node.continue_on_error => "failed, continuing",
            Some(_) => "failed",
        };
        tracing::info!(run_id = %ctx.run_id, step = %node.id, items = outputs.len(), status, "fan-out finished");
    }
    let output = if node.for_each.is_some() {
        Value::Array(outputs)
    } else {
        outputs.into_iter().next().unwrap_or(Value::Null)
    };
    match failed {
        None => {
            states[r.node] = NodeState::Done(output);
            None
        }
        Some(e) if node.continue_on_error && e.kind != ErrorKind::Cancelled => {
            states[r.node] = NodeState::FailedContinue(e);
            None
        }
        Some(e) => {
            states[r.node] = NodeState::Failed;
            (e.kind != ErrorKind::Cancelled).then(|| (node.id.clone(), e))
        }
    }
}

/// Why a ready node must be skipped: a need was skipped, or a need is a condition that was
/// false.
fn skip_reason(bp: &Blueprint, states: &[NodeState], needs: &[usize]) -> Option<String> {
    for &d in needs {
        match &states[d] {
            NodeState::Skipped => {
                return Some(format!("skipped because {} was skipped", bp.nodes[d].id))
            }
            NodeState::Done(v) if matches!(bp.nodes[d].kind, NodeKind::Condition(_)) => {
                let truthy = match v {
                    Value::Array(items) => items.iter().all(Templates::is_truthy),
                    other => Templates::is_truthy(other),
                };
                if !truthy {
                    return Some(format!(
                        "skipped because condition {} was false",
                        bp.nodes[d].id
                    ));
                }
            }
            _ => {}
        }
    }
    None
}

/// The steps of a ready node: one, or one per item of its `forEach`.
fn plan_node(ctx: &RunCtx, i: usize, base: &Context) -> Result<Planned, StepError> {
    let node = &ctx.blueprint.nodes[i];
    let Some(for_each) = &node.for_each else {
        return Ok(Planned::One(StepSpec {
            node: i,
            item: None,
            key: node.id.clone(),
            context: base.clone(),
        }));
    };
    let items = ctx.templates().eval_list_in(for_each, base)?;
    let max = ctx.inner.config.limits.max_items;
    if items.len() > max {
        return Err(StepError::new(
            ErrorKind::Template,
            format!(
                "forEach yields {} items, more than MAX_ITEMS ({max}); split the list over \
                 several runs, or raise MAX_ITEMS",
                items.len()
            ),
        ));
    }
    ctx.inner.bus.publish(Event::FanOut {
        run_id: ctx.run_id.to_string(),
        node: node.id.clone(),
        items: items.len(),
    });
    Ok(Planned::Items {
        node: i,
        base: base.clone(),
        items: items.into_iter().enumerate(),
    })
}

fn record_skip(ctx: &RunCtx, i: usize, reason: &str, summaries: &mut Vec<StepSummary>) {
    let node = &ctx.blueprint.nodes[i];
    record_final(ctx, i, StepStatus::Skipped, Some(reason.to_string()), None);
    summaries.push(StepSummary {
        node: node.id.clone(),
        step: node.id.clone(),
        item: None,
        status: StepStatus::Skipped,
        attempts: 0,
        duration_ms: 0,
        tokens_used: 0,
        cached: false,
        error: None,
        error_kind: None,
    });
    tracing::info!(run_id = %ctx.run_id, step = %node.id, reason, "step skipped");
}

fn record_plan_failure(ctx: &RunCtx, i: usize, e: &StepError, summaries: &mut Vec<StepSummary>) {
    let node = &ctx.blueprint.nodes[i];
    record_final(
        ctx,
        i,
        StepStatus::Error,
        Some(e.message.clone()),
        Some(e.kind),
    );
    summaries.push(StepSummary {
        node: node.id.clone(),
        step: node.id.clone(),
        item: None,
        status: StepStatus::Error,
        attempts: 0,
        duration_ms: 0,
        tokens_used: 0,
        cached: false,
        error: Some(e.message.clone()),
        error_kind: Some(e.kind),
    });
    tracing::warn!(run_id = %ctx.run_id, step = %node.id, kind = %e.kind, error = %e.message, "step failed before it started");
}

fn record_final(
    ctx: &RunCtx,
    i: usize,
    status: StepStatus,
    error: Option<String>,
    kind: Option<ErrorKind>,
) {
    let node = &ctx.blueprint.nodes[i];
    ctx.inner.store.step_finished(StepEnd {
        run_id: ctx.run_id.to_string(),
        step_key: node.id.clone(),
        node_id: node.id.clone(),
        item_index: None,
        status,
        attempts: 0,
        output: None,
        error_kind: kind,
        error: error.clone(),
        tokens_used: 0,
        provider: None,
        model: None,
        cached: false,
        reply_model: None,
        finish_reason: None,
        finished_at: SystemTime::now(),
        duration_ms: 0,
    });
    ctx.inner.bus.publish(Event::StepFinished {
        run_id: ctx.run_id.to_string(),
        step: node.id.clone(),
        node: node.id.clone(),
        node_type: node.kind.type_name(),
        status,
        attempts: 0,
        duration_ms: 0,
        error,
        error_kind: kind,
    });
}

#[cfg(test)]
mod tests {
    use super::{json_len, ProgressGate, Window, PROGRESS_EVERY};
    use crate::engine::testing::sqlite_engine;

    /// A step gives its place up while it sleeps, and back from the sleep waits for one
    /// ahead of the steps not started yet: the window never holds more than its size.
    #[tokio::test]
    async fn a_step_back_from_its_sleep_waits_for_a_place_ahead_of_new_ones() {
        let window = Window::new(2);
        let first = window.try_place().expect("a first place");
        let second = window.try_place().expect("a second place");
        assert!(window.try_place().is_none(), "the window is full");
        window.step_away(Some(first));
        // The driver hears of the place left, and starts a new step in it.
        tokio::time::timeout(Duration::from_secs(30), window.left.notified())
            .await
            .expect("the driver is woken");
        let third = window.try_place().expect("the place left");
        assert!(window.try_place().is_none());
        // The sleeper wakes: every place is taken, so it waits.
        let mut back = std::pin::pin!(window.come_back());
        assert!(futures_util::poll!(back.as_mut()).is_pending());
        // A place frees up: the sleeper takes it, not a new step.
        drop(second);
        assert!(window.try_place().is_none(), "a new step went ahead");
        let first = back.await;
        drop((first, third));
        assert!(window.try_place().is_some());
        assert_eq!(window.most_under_way(), 18, "eight asleep per place");
    }
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_small_row_is_written_at_most_every_200_ms_and_never_left_behind() {
        let mut gate = ProgressGate::new(2_000);
        assert!(gate.due(), "the first end is written at once");
        assert!(!gate.due(), "a second end right after waits");
        let at = gate.flush_at().expect("the counters are pending");
        assert_eq!(at - tokio::time::Instant::now(), PROGRESS_EVERY);
        tokio::time::advance(PROGRESS_EVERY).await;
        gate.flushed();
        assert_eq!(gate.flush_at(), None, "nothing is pending once written");
        tokio::time::advance(PROGRESS_EVERY).await;
        assert!(gate.due(), "an end after a quiet spell is written at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_big_row_is_rewritten_at_a_bounded_rate() {
        // An 11 MB snapshot (a 10,000-node chain with 1 KB templates): about one write a
        // second, so the rewrites cost per second of run time, not per step.
        let mut gate = ProgressGate::new(11 << 20);
        assert!(gate.due());
        let mut written = 1;
        for _ in 0..10_000 {
            tokio::time::advance(Duration::from_micros(100)).await;
            if gate.due() {
                written += 1;
            }
        }
        // One second of steps: the first write and at most one more.
        assert!(
            written <= 2,
            "{written} writes of an 11 MB row in one second"
        );
        assert!(
            gate.flush_at().is_some(),
            "the last counters are still pending"
        );
    }

    /// Another process takes the history's write lock (until the returned connection
    /// commits): the writer waits with the batch it took, and more than a batch plus the
    /// bound stays queued behind it, so the store has no room.
    fn put_writer_behind(
        store: &crate::store::Store,
        path: &std::path::Path,
    ) -> rusqlite::Connection {
        use futures_util::FutureExt;
        let other = rusqlite::Connection::open(path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        for i in 0..8192 + 2 * crate::store::ROOM + 1 {
            store.run_progress("elsewhere", i as u32, 0);
        }
        assert!(
            store.room().now_or_never().is_none(),
            "the writer is behind"
        );
        other
    }

    /// A run's driver starts no steps while the history writer is far behind (another
    /// process holds the write lock and more than `ROOM` writes wait): their writes would
    /// only pile up in memory. Once the lock goes the writer catches up, and the run goes on
    /// and ends with every step done. (Paused clock, and this task never idles while it
    /// watches: the driver's bounded wait for room cannot run out, only the writer catching
    /// up ends it.)
    #[tokio::test(start_paused = true)]
    async fn a_run_starts_no_steps_while_the_history_writer_is_far_behind() {
        use crate::events::{Event, RunStatus};
        let dir = tempfile::tempdir().unwrap();
        let (engine, store, path) = sqlite_engine(dir.path(), 40);
        let events = engine.bus().subscribe();
        let bp: crate::blueprint::Blueprint = serde_json::from_value(serde_json::json!({
            "name": "fan",
            "nodes": [ { "id": "f", "type": "transform", "forEach": "{{ range(4) | list }}",
                         "template": "{{ item }}" } ]
        }))
        .unwrap();
        let other = put_writer_behind(&store, &path);
        let h = engine
            .start(
                std::sync::Arc::new(bp),
                crate::engine::RunRequest::default(),
            )
            .unwrap();
        let started = |events: &crate::events::Subscriber| {
            let mut n = 0;
            while let Some(ev) = events.try_recv() {
                if matches!(ev, Event::StepStarted { .. }) {
                    n += 1;
                }
            }
            n
        };
        let until = std::time::Instant::now() + Duration::from_millis(300);
        while std::time::Instant::now() < until {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            started(&events),
            0,
            "steps started while the history writer was far behind"
        );
        other.execute_batch("COMMIT").unwrap();
        let o = h.wait().await;
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        assert_eq!(o.outputs["f"], serde_json::json!(["0", "1", "2", "3"]));
        drop(other);
    }

    /// While the history writer is far behind, a run whose steps are all started still
    /// takes their results as they come (nothing is left to start, so there is nothing to
    /// hold back): both steps here are reported finished before the writer catches up.
    /// (Paused clock and a task that never idles, as above: a wait for room would not end.)
    #[tokio::test(start_paused = true)]
    async fn results_are_taken_while_the_history_writer_is_far_behind() {
        use crate::events::{Event, RunStatus};
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let (engine, store, path) = sqlite_engine(dir.path(), 2);
        let events = engine.bus().subscribe();
        // A server that answers its two requests only when told.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/call", listener.local_addr().unwrap());
        let (arrived_tx, arrived) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for sock in listener.incoming().take(2) {
                let mut sock = sock.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = arrived_tx.send(());
                held.push(sock);
            }
            let _ = released.recv();
            for mut sock in held {
                let _ = sock.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        let bp: crate::blueprint::Blueprint = serde_json::from_value(serde_json::json!({
            "name": "pair",
            "nodes": [ { "id": "a", "type": "http", "url": url.clone() },
                       { "id": "b", "type": "http", "url": url } ]
        }))
        .unwrap();
        let h = engine
            .start(
                std::sync::Arc::new(bp),
                crate::engine::RunRequest::default(),
            )
            .unwrap();
        // Hang detection only: the calls are made on this task's runtime, so it yields.
        let until = std::time::Instant::now() + Duration::from_secs(30);
        let mut calls = 0;
        while calls < 2 {
            assert!(
                std::time::Instant::now() < until,
                "the two calls never came"
            );
            if arrived.try_recv().is_ok() {
                calls += 1;
            }
            tokio::task::yield_now().await;
        }
        let other = put_writer_behind(&store, &path);
        release.send(()).unwrap();
        // Well within the writer's busy timeout (5 s), after which it would give the batch up
        // and make room anyway.
        let mut finished = Vec::new();
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while finished.len() < 2 && std::time::Instant::now() < until {
            while let Some(ev) = events.try_recv() {
                if let Event::StepFinished { step, .. } = ev {
                    finished.push(step);
                }
            }
            tokio::task::yield_now().await;
        }
        finished.sort();
        assert_eq!(
            finished,
            ["a", "b"],
            "a result was left waiting for the history writer"
        );
        other.execute_batch("COMMIT").unwrap();
        let o = h.wait().await;
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        drop(other);
    }

    /// A run's row holds its blueprint and its variables once each: with 30 MB of variables
    /// (3 s of writing at 10 MB/s) beside a small blueprint, its counters are written every
    /// 3 s, not every 200 ms, nor far more rarely.
    #[test]
    fn a_runs_counters_wait_for_as_long_as_its_snapshot_takes_to_write() {
        let bp: crate::blueprint::Blueprint = serde_json::from_value(serde_json::json!({
            "name": "big-vars",
            "nodes": [ { "id": "a", "type": "transform", "template": "{{ vars.TEXT | length }}" } ]
        }))
        .unwrap();
        let vars = serde_json::json!({ "TEXT": "x".repeat(30 << 20) });
        let every = ProgressGate::for_run(&bp, &vars).every;
        assert!(
            every >= Duration::from_secs(3) && every < Duration::from_millis(3_100),
            "{every:?}"
        );
        let small = ProgressGate::for_run(&bp, &serde_json::json!({}));
        assert_eq!(small.every, PROGRESS_EVERY);
    }

    #[test]
    fn json_len_counts_what_serde_json_writes() {
        let v = serde_json::json!({"a": [1, 2, 3], "b": "x\"y"});
        assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len() as u64);
    }
}
