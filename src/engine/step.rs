//! One step: render its input once, then attempt it on the pool until it succeeds, fails for
//! good, or the run is aborted. Between attempts the step holds no pool slot: it waits the
//! retry delay on its own, so 40 agents waiting out a rate limit do not block other runs.

use super::nodes::{self, AttemptEnv, Prepared, StepOutput};
use super::run::{Place, RunCtx};
use super::StepSummary;
use crate::error::{ErrorKind, StepError};
use crate::events::{Event, StepStatus};
use crate::pool::JobMeta;
use crate::providers::Admission;
use crate::retry::{Decision, RetryPolicy};
use crate::store::{AttemptRecord, NewStep, StepEnd};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// A step to run: a node, or one item of a `forEach` node.
pub(crate) struct StepSpec {
    pub node: usize,
    pub item: Option<usize>,
    /// `summarize` or `summarize[3]`.
    pub key: String,
    /// The template context (with `item`/`index` for a fan-out item).
    pub context: crate::template::Context,
}

pub(crate) struct StepResult {
    pub node: usize,
    pub item: Option<usize>,
    pub result: Result<Value, StepError>,
    pub summary: StepSummary,
    /// The last attempt's hold on a shutdown's wait, passed on to the driver, which keeps it
    /// while it handles this result (see `Inner::in_flight`).
    pub in_flight: Option<super::drain::Busy>,
}

/// One attempt's outcome. Serialisable: a fleet worker sends it back through the queue.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct AttemptDone {
    pub result: Result<StepOutput, StepError>,
    pub started_at: SystemTime,
    pub finished_at: SystemTime,
}

impl AttemptDone {
    /// An attempt that failed before it could start.
    pub fn failed_now(e: StepError) -> AttemptDone {
        let now = SystemTime::now();
        AttemptDone {
            result: Err(e),
            started_at: now,
            finished_at: now,
        }
    }
}

/// [`run`], with a panic anywhere in the step (rendering, preparing, recording) turned into
/// the step's failure with the panic's message, recorded like any other.
pub(crate) async fn run_guarded(ctx: Arc<RunCtx>, spec: StepSpec, place: Place) -> StepResult {
    use futures_util::FutureExt;
    let (node, item, key, context) = (spec.node, spec.item, spec.key.clone(), spec.context.clone());
    let started = Instant::now();
    match std::panic::AssertUnwindSafe(run(ctx.clone(), spec, place))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(payload) => {
            let msg = super::panics::message(&*payload);
            tracing::error!(run_id = %ctx.run_id, step = %key, panic = %msg, "a step panicked");
            let e = StepError::new(
                ErrorKind::Internal,
                format!("the step panicked: {msg}; this is a bug in OmniFlow — please report it"),
            );
            let spec = StepSpec {
                node,
                item,
                key,
                context,
            };
            ended_without_attempt(&ctx, &spec, Err(e), started)
        }
    }
}

/// A step that ends before any attempt (reused from an earlier run, or failed while being
/// prepared): recorded with no attempt.
fn ended_without_attempt(
    ctx: &RunCtx,
    spec: &StepSpec,
    result: Result<Value, StepError>,
    started: Instant,
) -> StepResult {
    let summary = match &result {
        Ok(output) => finish(
            ctx,
            spec,
            StepStatus::Success,
            0,
            Some(output.clone()),
            None,
            &StepOutput::default(),
            started,
        ),
        Err(e) => finish(
            ctx,
            spec,
            StepStatus::Error,
            0,
            None,
            Some(e),
            &StepOutput::default(),
            started,
        ),
    };
    StepResult {
        node: spec.node,
        item: spec.item,
        result,
        summary,
        in_flight: None,
    }
}

/// Runs one step to its end, recording every attempt. The step holds its `place` in the
/// run's window until it ends, except while it sleeps between attempts.
pub(crate) async fn run(ctx: Arc<RunCtx>, spec: StepSpec, place: Place) -> StepResult {
    let mut place = Some(place);
    let node = &ctx.blueprint.nodes[spec.node];
    let run_id = ctx.run_id.to_string();
    let store = &ctx.inner.store;
    let started = Instant::now();

    // A step recorded as done by an earlier run (retry of failed steps, resume) is reused.
    if let Some(output) = ctx.reuse.get(&spec.key) {
        return ended_without_attempt(&ctx, &spec, Ok(output.clone()), started);
    }

    let prepared = nodes::prepare(&ctx, node, &spec.context);
    store.step_queued(NewStep {
        run_id: run_id.clone(),
        step_key: spec.key.clone(),
        node_id: node.id.clone(),
        item_index: spec.item.map(|i| i as u32),
        input: prepared.as_ref().ok().and_then(Prepared::input_record),
        queued_at: SystemTime::now(),
    });
    let prepared = match prepared {
        Ok(p) => Arc::new(p),
        Err(e) => return ended_without_attempt(&ctx, &spec, Err(e), started),
    };

    let policy = RetryPolicy::resolve(
        node.retry.as_ref(),
        ctx.blueprint.defaults.retry.as_ref(),
        ctx.inner.config.max_retries,
    );
    let timeout = nodes::attempt_timeout(&ctx, node, &prepared);
    let step_key: Arc<str> = spec.key.clone().into();
    // With a fleet queue, each attempt is a queue row that any host may run; the row carries
    // the prepared input, rendered once here.
    let fleet = crate::engine::fleet::dispatcher(&ctx, &spec.key, node, &prepared, timeout);
    // A resumed step continues its numbering (and its retry budget) where the crash left it.
    let mut attempt: u32 = ctx.attempts_before.get(&spec.key).copied().unwrap_or(0);
    let mut last_ok = StepOutput::default();
    let mut in_flight = None;
    let outcome: Result<Value, StepError> = loop {
        attempt += 1;
        if ctx.abort.is_cancelled() {
            break Err(StepError::cancelled());
        }
        // A model call first waits, holding no worker, for room in the run's token budget
        // and for its provider's rate limit.
        let hold = match hold_budget(&ctx, &prepared, &spec.key).await {
            Ok(h) => h,
            Err(e) => break Err(e),
        };
        // In the fleet, the host that claims the attempt admits it to its own providers.
        let admission = match &fleet {
            Some(_) => None,
            None => match admit(&ctx.env(), &ctx.abort, &prepared, &spec.key).await {
                Ok(a) => a,
                Err(e) => break Err(e),
            },
        };
        let meta = JobMeta {
            run_id: ctx.run_id.clone(),
            step: step_key.clone(),
            attempt,
            priority: ctx.priority(),
        };
        let submitted = match &fleet {
            Some(d) => d.dispatch(meta, &ctx.abort).await.map(|done| (done, None)),
            None => {
                let job = attempt_job(
                    ctx.clone(),
                    step_key.clone(),
                    prepared.clone(),
                    attempt,
                    timeout,
                    admission,
                );
                ctx.inner.pool.submit(meta, ctx.abort.clone(), job).await
            }
        };
        let done = match submitted {
            Ok((d, busy)) => {
                in_flight = busy;
                d
            }
            Err(_) => {
                // Dropped unstarted (the run was aborted) or the attempt panicked.
                let e = if ctx.abort.is_cancelled() {
                    StepError::cancelled()
                } else {
                    StepError::new(
                        ErrorKind::Internal,
                        "the attempt panicked; this is a bug in OmniFlow — please report it",
                    )
                };
                break Err(e);
            }
        };
        let times = (done.started_at, done.finished_at);
        let err = match done.result {
            Ok(out) => {
                record_attempt(
                    &ctx,
                    node.kind.type_name(),
                    &spec.key,
                    attempt,
                    times,
                    None,
                    &out,
                );
                let value = out.value.clone();
                last_ok = out;
                break Ok(value);
            }
            Err(e) => e,
        };
        // The call is over (its tokens, if any, are counted): its estimate is let go.
        drop(hold);
        if err.kind == ErrorKind::Cancelled {
            record_attempt_err(
                &ctx,
                node.kind.type_name(),
                &spec.key,
                attempt,
                times,
                &err,
                None,
            );
            break Err(err);
        }
        match policy.decide_now(attempt, &err) {
            Decision::GiveUp { exhausted } => {
                record_attempt_err(
                    &ctx,
                    node.kind.type_name(),
                    &spec.key,
                    attempt,
                    times,
                    &err,
                    None,
                );
                let err = if exhausted && attempt > 1 {
                    StepError {
                        message: format!("{} (gave up after {attempt} attempts)", err.message),
                        ..err
                    }
                } else {
                    err
                };
                break Err(err);
            }
            Decision::Retry { wait, .. } => {
                let wait_ms = wait.as_millis() as u64;
                record_attempt_err(
                    &ctx,
                    node.kind.type_name(),
                    &spec.key,
                    attempt,
                    times,
                    &err,
                    Some(wait_ms),
                );
                store.step_retrying(&run_id, &spec.key);
                ctx.inner.bus.publish(Event::StepRetrying {
                    run_id: run_id.clone(),
                    step: spec.key.clone(),
                    node: node.id.clone(),
                    attempt,
                    kind: err.kind,
                    message: err.message.clone(),
                    wait_ms,
                });
                tracing::warn!(run_id = %run_id, step = %spec.key, attempt, kind = %err.kind, wait_ms, error = %err.message, "attempt failed, retrying");
                let scaled = ctx.inner.config.scaled(wait);
                // Asleep, the step is not in flight (a shutdown does not wait for it), and
                // it leaves its place in the run's window to another item; awake, it waits
                // for a place again before its next attempt.
                in_flight = None;
                ctx.window.step_away(place.take());
                tokio::select! {
                    _ = tokio::time::sleep(scaled) => {}
                    _ = ctx.abort.cancelled() => break Err(StepError::cancelled()),
                }
                tokio::select! {
                    p = ctx.window.come_back() => place = Some(p),
                    _ = ctx.abort.cancelled() => break Err(StepError::cancelled()),
                }
            }
        }
    };

    let (status, output, error) = match &outcome {
        Ok(v) => (StepStatus::Success, Some(v.clone()), None),
        Err(e) if e.kind == ErrorKind::Cancelled => (StepStatus::Cancelled, None, Some(e)),
        Err(e) => (StepStatus::Error, None, Some(e)),
    };
    let summary = finish(
        &ctx, &spec, status, attempt, output, error, &last_ok, started,
    );
    StepResult {
        node: spec.node,
        item: spec.item,
        result: outcome,
        summary,
        in_flight,
    }
}

/// A model call's estimated tokens, held against the run's budget while it is in flight.
struct BudgetHold<'a> {
    ctx: &'a RunCtx,
    tokens: u64,
}

impl Drop for BudgetHold<'_> {
    fn drop(&mut self) {
        self.ctx
            .tokens_held
            .fetch_sub(self.tokens, std::sync::atomic::Ordering::SeqCst);
        self.ctx.budget_settled.notify_waiters();
    }
}

/// What a model call will likely spend: its prompt, plus `maxTokens`, else the run's average
/// call so far, else 256 tokens of answer.
fn estimate_call(ctx: &RunCtx, req: &crate::providers::LlmRequest) -> u64 {
    use crate::providers::sandbox::estimate_tokens;
    use std::sync::atomic::Ordering;
    let prompt =
        estimate_tokens(&req.prompt) + req.system.as_deref().map(estimate_tokens).unwrap_or(0);
    if let Some(n) = req.max_tokens {
        return prompt + u64::from(n);
    }
    let calls = ctx.calls_done.load(Ordering::SeqCst);
    match ctx.tokens_spent.load(Ordering::SeqCst).checked_div(calls) {
        Some(average) => average.max(prompt + 1),
        None => prompt + 256,
    }
}

/// With a token budget, waits (outside the pool) until this model call fits: what is spent,
/// the estimates of the calls in flight and its own estimate within the budget. A call always
/// starts when nothing else is in flight, so a run cannot stall; once the budget is spent, the
/// call fails with `budget_exceeded`. This keeps a 40-way fan-out from overshooting the budget
/// by 40 calls; what remains is the error of one estimate per call in flight.
async fn hold_budget<'a>(
    ctx: &'a RunCtx,
    prepared: &Prepared,
    step: &str,
) -> Result<Option<BudgetHold<'a>>, StepError> {
    use std::sync::atomic::Ordering;
    let (Some(budget), Prepared::Llm { req, .. }) = (ctx.token_budget, prepared) else {
        return Ok(None);
    };
    if ctx.replay.contains_key(step) {
        return Ok(None);
    }
    let estimate = estimate_call(ctx, req);
    loop {
        // Registered before looking, so a call settling in between still wakes us.
        let settled = ctx.budget_settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        let spent = ctx.tokens_spent.load(Ordering::SeqCst);
        if spent >= budget {
            return Err(nodes::budget_spent(spent, budget));
        }
        let held = ctx.tokens_held.load(Ordering::SeqCst);
        if held == 0 || spent + held + estimate <= budget {
            if ctx
                .tokens_held
                .compare_exchange(held, held + estimate, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(Some(BudgetHold {
                    ctx,
                    tokens: estimate,
                }));
            }
            continue;
        }
        tokio::select! {
            _ = &mut settled => {}
            _ = ctx.abort.cancelled() => return Err(StepError::cancelled()),
        }
    }
}

/// Waits, outside the pool, for the place of a model call among its provider's calls in
/// flight (`*_CONCURRENCY`) and in its provider's rate limit (a 429 pauses the whole
/// provider). Only a real call to a provider is
/// admitted: a sandbox or replayed step goes straight to the pool. `Err` when the run is
/// aborted meanwhile.
pub(crate) async fn admit(
    ctx: &AttemptEnv<'_>,
    abort: &CancellationToken,
    prepared: &Prepared,
    step: &str,
) -> Result<Option<Admission>, StepError> {
    let Prepared::Llm { req, .. } = prepared else {
        return Ok(None);
    };
    if ctx.sandbox.is_some() || ctx.replay.is_some_and(|r| r.contains_key(step)) {
        return Ok(None);
    }
    let providers = &ctx.inner.providers;
    // First a place among the provider's calls in flight, so the rate-limit place below is
    // not left to go stale while the step waits for a slot.
    let slot = match providers.in_flight_limit(req, None).await {
        None => None,
        Some((link, limit)) => match limit.try_take() {
            Some(s) => Some(s),
            None => {
                ctx.inner.bus.publish(Event::StepWaitingSlot {
                    run_id: ctx.run_id.to_string(),
                    step: step.to_string(),
                    node: node_of(step).to_string(),
                    provider: link.as_str().to_string(),
                    limit: limit.limit,
                });
                tokio::select! {
                    s = limit.take() => s,
                    _ = abort.cancelled() => return Err(StepError::cancelled()),
                }
            }
        },
    };
    let mut slot = slot;
    let mut admission = providers.admit(req, None);
    let mut told = false;
    loop {
        let Some(a) = &mut admission else {
            return Ok(None);
        };
        let wait = a.wait();
        if wait.is_zero() {
            if !a.voided() {
                if let Some(s) = slot.take() {
                    a.hold(s);
                }
                return Ok(admission);
            }
            // A 429 paused the provider after the place was taken: give it back, queue again.
            drop(admission.take());
            admission = providers.admit(req, None);
            continue;
        }
        // Said once per attempt, for waits a person would notice.
        if !told && wait >= ctx.inner.config.scaled(Duration::from_millis(500)) {
            told = true;
            ctx.inner.bus.publish(Event::StepWaiting {
                run_id: ctx.run_id.to_string(),
                step: step.to_string(),
                node: node_of(step).to_string(),
                provider: a.provider().to_string(),
                wait_ms: wait.as_millis() as u64,
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = abort.cancelled() => return Err(StepError::cancelled()),
        }
    }
}

/// An attempt's start: the step's `running` in the history and the `StepStarted` event.
pub(crate) fn announce_start(
    inner: &super::Inner,
    run_id: &str,
    step: &str,
    attempt: u32,
    started_at: SystemTime,
) {
    inner.store.step_started(run_id, step, attempt, started_at);
    inner.bus.publish(Event::StepStarted {
        run_id: run_id.to_string(),
        step: step.to_string(),
        node: node_of(step).to_string(),
        attempt,
    });
}

/// One attempt, as the pool runs it: marks the step running, runs the node under the
/// attempt's timeout and the run's abort signal (either really stops the work: the node's
/// future is dropped). Returns the attempt's hold on a shutdown's wait with its outcome.
async fn attempt_job(
    ctx: Arc<RunCtx>,
    step: Arc<str>,
    prepared: Arc<Prepared>,
    attempt: u32,
    timeout: Duration,
    admission: Option<Admission>,
) -> (AttemptDone, Option<super::drain::Busy>) {
    run_attempt(
        &ctx.env(),
        &ctx.abort,
        &step,
        &prepared,
        attempt,
        timeout,
        admission,
        true,
    )
    .await
}

/// One attempt on this host, wherever its run is driven: marks the step running, runs the
/// node under the attempt's timeout and `abort` (either really stops the work: the node's
/// future is dropped). Returns, with the outcome, the attempt's hold on a shutdown's wait
/// (`Inner::in_flight`), for the caller to keep until the outcome is handled; an attempt that
/// only waits (a delay) has none: a shutdown hands it over at once. With `announce` false the
/// caller records and announces the start itself ([`announce_start`]), once it knows the
/// attempt is really the step's (a fleet attempt started before its queue row was confirmed).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_attempt(
    ctx: &AttemptEnv<'_>,
    abort: &CancellationToken,
    step: &str,
    prepared: &Prepared,
    attempt: u32,
    timeout: Duration,
    admission: Option<Admission>,
    announce: bool,
) -> (AttemptDone, Option<super::drain::Busy>) {
    let in_flight = match prepared {
        Prepared::Delay(_) => None,
        _ => ctx.inner.in_flight.hold(),
    };
    let started_at = SystemTime::now();
    if announce {
        announce_start(ctx.inner, ctx.run_id, step, attempt, started_at);
    }
    let scaled = ctx.inner.config.scaled(timeout);
    let result = tokio::select! {
        biased;
        _ = abort.cancelled() => Err(StepError::cancelled()),
        r = tokio::time::timeout(scaled, guarded_execute(ctx, prepared, step, attempt, admission)) => match r {
            Ok(r) => r,
            Err(_) => Err(StepError::new(
                ErrorKind::Timeout,
                timeout_message(prepared, timeout),
            )),
        },
    };
    let done = AttemptDone {
        result,
        started_at,
        finished_at: SystemTime::now(),
    };
    (done, in_flight)
}

/// One attempt's work, with a panic turned into the attempt's failure (with its message).
async fn guarded_execute(
    ctx: &AttemptEnv<'_>,
    prepared: &Prepared,
    step: &str,
    attempt: u32,
    admission: Option<Admission>,
) -> Result<StepOutput, StepError> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(nodes::execute(ctx, prepared, step, attempt, admission))
        .catch_unwind()
        .await
        .unwrap_or_else(|payload| {
            Err(StepError::new(
                ErrorKind::Internal,
                format!(
                    "the attempt panicked: {}; this is a bug in OmniFlow — please report it",
                    super::panics::message(&*payload)
                ),
            ))
        })
}

fn timeout_message(prepared: &Prepared, timeout: Duration) -> String {
    let secs = timeout.as_secs_f64();
    match prepared {
        Prepared::Llm { .. } => format!(
            "the model call timed out after {secs}s and was stopped (REQUEST_TIMEOUT or the node's \"timeout\"); raise it if the model is just slow, or pick a smaller model"
        ),
        _ => format!(
            "the step timed out after {secs}s and was stopped; raise the node's \"timeout\" (or REQUEST_TIMEOUT)"
        ),
    }
}

/// `summarize[3]` → `summarize`.
pub(crate) fn node_of(step: &str) -> &str {
    step.split_once('[').map(|(n, _)| n).unwrap_or(step)
}

fn record_attempt(
    ctx: &RunCtx,
    node_type: &'static str,
    step: &str,
    attempt: u32,
    times: (SystemTime, SystemTime),
    wait_ms: Option<u64>,
    out: &StepOutput,
) {
    ctx.inner.store.attempt_finished(AttemptRecord {
        run_id: ctx.run_id.to_string(),
        step_key: step.to_string(),
        attempt,
        ok: true,
        error_kind: None,
        error: None,
        wait_ms,
        started_at: times.0,
        finished_at: times.1,
        tokens_used: out.tokens,
        provider: out.provider.clone(),
        model: out.model.clone(),
        cached: out.cached,
    });
    // The run's spent tokens, checked against its budget before each model call, and which
    // providers the chain skipped (recorded so `show` can say why another one answered).
    ctx.tokens_spent
        .fetch_add(out.tokens, std::sync::atomic::Ordering::SeqCst);
    if out.tokens > 0 {
        ctx.calls_done
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(note) = &out.fallback {
        ctx.inner
            .store
            .attempt_fallback(&ctx.run_id, step, attempt, note);
    }
    // The attempt's tokens go with it (`AttemptFinished`); `Tokens` events are only the
    // live count while an answer streams.
    publish_attempt(ctx, node_type, step, attempt, times, None, wait_ms, out);
}

fn record_attempt_err(
    ctx: &RunCtx,
    node_type: &'static str,
    step: &str,
    attempt: u32,
    times: (SystemTime, SystemTime),
    err: &StepError,
    wait_ms: Option<u64>,
) {
    if ctx.is_released() {
        return; // stopped by the handover: the next owner repeats this attempt
    }
    ctx.inner.store.attempt_finished(AttemptRecord {
        run_id: ctx.run_id.to_string(),
        step_key: step.to_string(),
        attempt,
        ok: false,
        error_kind: Some(err.kind),
        error: Some(err.message.clone()),
        wait_ms,
        started_at: times.0,
        finished_at: times.1,
        tokens_used: 0,
        provider: None,
        model: None,
        cached: false,
    });
    let none = StepOutput::default();
    publish_attempt(
        ctx,
        node_type,
        step,
        attempt,
        times,
        Some(err.kind),
        wait_ms,
        &none,
    );
}

/// Tells the bus what was just recorded in `runner_attempts` (for `/metrics`).
#[allow(clippy::too_many_arguments)]
fn publish_attempt(
    ctx: &RunCtx,
    node_type: &'static str,
    step: &str,
    attempt: u32,
    times: (SystemTime, SystemTime),
    error_kind: Option<ErrorKind>,
    retry_wait_ms: Option<u64>,
    out: &StepOutput,
) {
    let node = node_of(step);
    ctx.inner.bus.publish(Event::AttemptFinished(Box::new(
        crate::events::AttemptInfo {
            run_id: ctx.run_id.to_string(),
            step: step.to_string(),
            node: node.to_string(),
            node_type,
            attempt,
            error_kind,
            provider: out.provider.clone(),
            model: out.model.clone(),
            duration_ms: times
                .1
                .duration_since(times.0)
                .unwrap_or_default()
                .as_millis() as u64,
            tokens: out.tokens,
            cached: out.cached,
            retry_wait_ms,
        },
    )));
}

#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &RunCtx,
    spec: &StepSpec,
    status: StepStatus,
    attempts: u32,
    output: Option<Value>,
    error: Option<&StepError>,
    out: &StepOutput,
    started: Instant,
) -> StepSummary {
    let node = &ctx.blueprint.nodes[spec.node];
    let duration_ms = started.elapsed().as_millis() as u64;
    // A step stopped by a handover stays unfinished in the store: the next owner runs it.
    let handed_over = ctx.is_released() && status == StepStatus::Cancelled;
    // Resuming: a step this run already recorded as done is not recorded again.
    let recorded = status == StepStatus::Success && ctx.already_done.contains(&spec.key);
    if !handed_over && !recorded {
        ctx.inner.store.step_finished(StepEnd {
            run_id: ctx.run_id.to_string(),
            step_key: spec.key.clone(),
            node_id: node.id.clone(),
            item_index: spec.item.map(|i| i as u32),
            status,
            attempts,
            output: output.clone(),
            error_kind: error.map(|e| e.kind),
            error: error.map(|e| e.message.clone()),
            tokens_used: out.tokens,
            provider: out.provider.clone(),
            model: out.model.clone(),
            cached: out.cached,
            reply_model: out.reply_model.clone(),
            finish_reason: out.finish_reason.clone(),
            finished_at: SystemTime::now(),
            duration_ms,
        });
    }
    if !handed_over {
        ctx.inner.bus.publish(Event::StepFinished {
            run_id: ctx.run_id.to_string(),
            step: spec.key.clone(),
            node: node.id.clone(),
            node_type: node.kind.type_name(),
            status,
            attempts,
            duration_ms,
            error: error.map(|e| e.message.clone()),
            error_kind: error.map(|e| e.kind),
        });
    }
    match status {
        _ if handed_over => {
            tracing::info!(run_id = %ctx.run_id, step = %spec.key, "step handed over unfinished (the next owner runs it)")
        }
        // A fan-out item's success is a debug line: its node's end is the info line (see
        // `run::finish_step`), so 10,000 items are one line in the log pane, not 10,000 (and
        // not a sixth of the run's CPU). Its failures stay warnings, each.
        StepStatus::Success if spec.item.is_some() => {
            tracing::debug!(run_id = %ctx.run_id, step = %spec.key, attempts, duration_ms, tokens = out.tokens, "step succeeded")
        }
        StepStatus::Success => {
            tracing::info!(run_id = %ctx.run_id, step = %spec.key, attempts, duration_ms, tokens = out.tokens, "step succeeded")
        }
        _ => {
            tracing::warn!(run_id = %ctx.run_id, step = %spec.key, attempts, status = status.as_str(), kind = error.map(|e| e.kind.as_str()).unwrap_or(""), error = error.map(|e| e.message.as_str()).unwrap_or(""), "step did not succeed")
        }
    }
    StepSummary {
        node: node.id.clone(),
        step: spec.key.clone(),
        item: spec.item.map(|i| i as u32),
        status,
        attempts,
        duration_ms,
        tokens_used: out.tokens,
        cached: out.cached,
        error: error.map(|e| e.message.clone()),
        error_kind: error.map(|e| e.kind),
    }
}
