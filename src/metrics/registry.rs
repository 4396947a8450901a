//! The metric families and how each event moves them; the live state (queue, workers, pool,
//! memory) is read at scrape time by [`Live`].

use crate::engine::Engine;
use crate::events::{Event, StepStatus};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];
type L3 = [(&'static str, String); 3];
type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Model calls and steps: 5 ms … ~5.5 min in ×2.5 steps.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.5, 13))
}

/// Retry waits: 10 ms … ~2.7 min in ×3 steps (backoff 1-2-4 s, provider hints up to 30 s).
fn wait_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 3.0, 10))
}

/// Whole runs: 50 ms … ~3.6 h in ×4 steps.
fn run_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 4.0, 10))
}

fn s(v: impl Into<String>) -> String {
    v.into()
}

/// Counters moved by events. Every label value is bounded: blueprint names, node types,
/// provider and model names from the configuration and the blueprints, status and error-kind
/// words. Never a run id, a step key with an item index, or any text a run produced.
pub(crate) struct Counters {
    runs_started: Family<L1, Counter>,
    runs_finished: Family<L2, Counter>,
    runs_released: Family<L1, Counter>,
    run_seconds: HistFamily<L2>,
    steps: Family<L3, Counter>,
    attempts: Family<L3, Counter>,
    retries: Family<L2, Counter>,
    retry_wait_seconds: HistFamily<L1>,
    model_call_seconds: HistFamily<L2>,
    model_tokens: Family<L2, Counter>,
    cache_hits: Family<L2, Counter>,
    rate_limit_waits: Family<L1, Counter>,
    rate_limit_wait_seconds: Family<L1, Counter<f64, AtomicU64>>,
    fan_out_items: Counter,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            runs_started: Family::default(),
            runs_finished: Family::default(),
            runs_released: Family::default(),
            run_seconds: Family::new_with_constructor(run_buckets),
            steps: Family::default(),
            attempts: Family::default(),
            retries: Family::default(),
            retry_wait_seconds: Family::new_with_constructor(wait_buckets),
            model_call_seconds: Family::new_with_constructor(latency_buckets),
            model_tokens: Family::default(),
            cache_hits: Family::default(),
            rate_limit_waits: Family::default(),
            rate_limit_wait_seconds: Family::default(),
            fan_out_items: Counter::default(),
        }
    }

    /// Moves the counters for one event. Cheap: a few hash lookups under read locks.
    pub(crate) fn record(&self, ev: &Event) {
        match ev {
            Event::RunStarted { blueprint, .. } => {
                self.runs_started
                    .get_or_create(&[("blueprint", blueprint.clone())])
                    .inc();
            }
            Event::RunFinished {
                blueprint,
                status,
                total_time_ms,
                ..
            } => {
                let l = [
                    ("blueprint", blueprint.clone()),
                    ("status", s(status.as_str())),
                ];
                self.runs_finished.get_or_create(&l).inc();
                self.run_seconds
                    .get_or_create(&l)
                    .observe(*total_time_ms as f64 / 1000.0);
            }
            Event::RunReleased { blueprint, .. } => {
                self.runs_released
                    .get_or_create(&[("blueprint", blueprint.clone())])
                    .inc();
            }
            Event::FanOut { items, .. } => {
                self.fan_out_items.inc_by(*items as u64);
            }
            Event::StepFinished {
                node_type,
                status,
                error_kind,
                ..
            } => {
                let kind = match (status, error_kind) {
                    (StepStatus::Success | StepStatus::Skipped, _) => "none",
                    (_, Some(k)) => k.as_str(),
                    (_, None) => "none",
                };
                self.steps
                    .get_or_create(&[
                        ("node_type", s(*node_type)),
                        ("status", s(status.as_str())),
                        ("error_kind", s(kind)),
                    ])
                    .inc();
            }
            Event::AttemptFinished(a) => {
                let provider = a.provider.clone().unwrap_or_else(|| "none".into());
                let kind = a.error_kind.map_or("none", |k| k.as_str());
                self.attempts
                    .get_or_create(&[
                        ("node_type", s(a.node_type)),
                        ("provider", provider.clone()),
                        ("error_kind", s(kind)),
                    ])
                    .inc();
                if let Some(wait) = a.retry_wait_ms {
                    self.retries
                        .get_or_create(&[("node_type", s(a.node_type)), ("error_kind", s(kind))])
                        .inc();
                    self.retry_wait_seconds
                        .get_or_create(&[("error_kind", s(kind))])
                        .observe(wait as f64 / 1000.0);
                }
                if a.node_type == "llm" {
                    let model = a.model.clone().unwrap_or_else(|| "none".into());
                    let l = [("provider", provider), ("model", model)];
                    self.model_call_seconds
                        .get_or_create(&l)
                        .observe(a.duration_ms as f64 / 1000.0);
                    if a.tokens > 0 {
                        self.model_tokens.get_or_create(&l).inc_by(a.tokens);
                    }
                    if a.cached {
                        self.cache_hits.get_or_create(&l).inc();
                    }
                }
            }
            Event::StepWaiting {
                provider, wait_ms, ..
            } => {
                let l = [("provider", provider.clone())];
                self.rate_limit_waits.get_or_create(&l).inc();
                self.rate_limit_wait_seconds
                    .get_or_create(&l)
                    .inc_by(*wait_ms as f64 / 1000.0);
            }
            // Waits for a provider's free slot are shown in the console; not yet a metric.
            Event::RunQueued { .. }
            | Event::StepWaitingSlot { .. }
            | Event::StepStarted { .. }
            | Event::StepRetrying { .. }
            | Event::WorkerBusy { .. }
            | Event::WorkerIdle { .. }
            | Event::Pool(_)
            | Event::Tokens { .. } => {}
        }
    }
}

/// Events the recorder missed because it fell behind (progress events only; lifecycle ones
/// queue). Shared with the recorder task.
#[derive(Debug, Default)]
pub(crate) struct Dropped(pub AtomicU64);

/// What is read at scrape time: the pool, the workers, memory, the loops.
pub(crate) struct Live {
    engine: Engine,
    dropped: Arc<Dropped>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug + Send + Sync>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let me = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(me)
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pool = self.engine.pool().stats();
        {
            let mut me = enc.encode_descriptor(
                "omniflow_queue_depth",
                "Step attempts waiting for a worker, by priority",
                None,
                MetricType::Gauge,
            )?;
            for p in crate::blueprint::Priority::ALL {
                let l = [("priority", p.as_str())];
                ConstGauge::new(pool.queued[p.index()] as i64).encode(me.encode_family(&l)?)?;
            }
        }
        {
            let mut me = enc.encode_descriptor(
                "omniflow_workers",
                "Pool workers: busy, idle, and the pool's size (CONCURRENCY)",
                None,
                MetricType::Gauge,
            )?;
            let idle = pool.concurrency.saturating_sub(pool.running);
            for (state, n) in [
                ("busy", pool.running),
                ("idle", idle),
                ("total", pool.concurrency),
            ] {
                ConstGauge::new(n as i64).encode(me.encode_family(&[("state", state)])?)?;
            }
        }
        {
            let mut me = enc.encode_descriptor(
                "omniflow_pool_state",
                "1 for the pool's current state: running, paused (by a person), memory_hold (RSS above MEMORY_THRESHOLD_MB), draining (shutting down)",
                None,
                MetricType::Gauge,
            )?;
            let current = if self.engine.is_draining() {
                "draining"
            } else if pool.paused {
                "paused"
            } else if pool.memory_hold {
                "memory_hold"
            } else {
                "running"
            };
            for state in ["running", "paused", "memory_hold", "draining"] {
                ConstGauge::new(i64::from(state == current))
                    .encode(me.encode_family(&[("state", state)])?)?;
            }
        }
        let completed = ConstCounter::new(pool.completed);
        let failed = ConstCounter::new(pool.failed);
        {
            let mut me = enc.encode_descriptor(
                "omniflow_pool_jobs_finished",
                "Step attempts the pool ran to the end, by outcome (ok: the job returned; panicked: it did not)",
                None,
                MetricType::Counter,
            )?;
            completed.encode(me.encode_family(&[("outcome", "ok")])?)?;
            failed.encode(me.encode_family(&[("outcome", "panicked")])?)?;
        }
        gauge(
            &mut enc,
            "omniflow_runs_active",
            "Runs in flight in this process",
            self.engine.active_runs().len() as i64,
        )?;
        if let Some(f) = self.engine.fleet_counts() {
            let mut me = enc.encode_descriptor(
                "omniflow_fleet_attempts",
                "Step attempts through the fleet's shared queue (DATABASE_URL=postgres://...): enqueued by this process's runs; claimed, completed (result recorded) and fenced (result dropped: another host took its lease over first) by its workers",
                None,
                MetricType::Counter,
            )?;
            for (event, n) in [
                ("enqueued", f.enqueued),
                ("claimed", f.claimed),
                ("completed", f.completed),
                ("fenced", f.fenced),
            ] {
                ConstCounter::new(n).encode(me.encode_family(&[("event", event)])?)?;
            }
        }
        if let Some(rss) = crate::engine::rss_mb() {
            gauge(
                &mut enc,
                "omniflow_memory_rss_bytes",
                "Resident memory of this process",
                (rss * 1_048_576.0).round(),
            )?;
        }
        gauge(
            &mut enc,
            "omniflow_memory_threshold_bytes",
            "MEMORY_THRESHOLD_MB: above it the pool takes no new work",
            self.engine.config().memory_threshold_mb as f64 * 1_048_576.0,
        )?;
        if let Some(t) = self.engine.last_loop_turn() {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            gauge(
                &mut enc,
                "omniflow_loop_last_turn_timestamp_seconds",
                "When the maintenance loop (heartbeats, memory hold) last turned",
                secs,
            )?;
        }
        let dropped = ConstCounter::new(self.dropped.0.load(Ordering::Relaxed));
        let me = enc.encode_descriptor(
            "omniflow_metrics_events_dropped",
            "Progress events (rate-limit waits) the metrics recorder missed because it fell behind",
            None,
            MetricType::Counter,
        )?;
        dropped.encode(me)
    }
}

/// The registry of one process: its counters, the process-wide telemetry and the live state,
/// every series labelled with `host` and `role`.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub counters: Arc<Counters>,
    pub dropped: Arc<Dropped>,
}

impl Metrics {
    pub(crate) fn new(engine: Engine, host: &str, role: &str) -> Metrics {
        let labels = [
            (Cow::Borrowed("host"), Cow::Owned(host.to_string())),
            (Cow::Borrowed("role"), Cow::Owned(role.to_string())),
        ];
        let mut r = Registry::with_labels(labels.into_iter());
        let c = Arc::new(Counters::new());
        let dropped = Arc::new(Dropped::default());
        r.register(
            "omniflow_build",
            "The OmniFlow version serving these metrics (always 1)",
            prometheus_client::metrics::info::Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register(
            "omniflow_runs_started",
            "Runs started, by blueprint",
            c.runs_started.clone(),
        );
        r.register(
            "omniflow_runs_finished",
            "Runs finished, by blueprint and status (success, error, cancelled)",
            c.runs_finished.clone(),
        );
        r.register(
            "omniflow_runs_released",
            "Runs handed over unfinished at shutdown, by blueprint",
            c.runs_released.clone(),
        );
        r.register(
            "omniflow_run_duration_seconds",
            "Time from a run's start to its end, by blueprint and status",
            c.run_seconds.clone(),
        );
        r.register(
            "omniflow_steps",
            "Steps finished, by node type, status and error kind",
            c.steps.clone(),
        );
        r.register(
            "omniflow_attempts",
            "Step attempts finished, by node type, provider and error kind (none: it succeeded)",
            c.attempts.clone(),
        );
        r.register(
            "omniflow_retries",
            "Failed attempts that were retried, by node type and error kind",
            c.retries.clone(),
        );
        r.register(
            "omniflow_retry_wait_seconds",
            "The wait before each retry, by the error kind that caused it",
            c.retry_wait_seconds.clone(),
        );
        r.register(
            "omniflow_model_call_duration_seconds",
            "Model-call attempts (llm steps), by provider and model",
            c.model_call_seconds.clone(),
        );
        r.register(
            "omniflow_model_tokens",
            "Tokens used by model calls, by provider and model",
            c.model_tokens.clone(),
        );
        r.register(
            "omniflow_model_cache_hits",
            "Model calls answered from the response cache, by provider and model",
            c.cache_hits.clone(),
        );
        r.register(
            "omniflow_rate_limit_waits",
            "Noticeable waits for a provider's rate limit (outside the pool), by provider",
            c.rate_limit_waits.clone(),
        );
        r.register(
            "omniflow_rate_limit_wait_seconds",
            "Seconds waited for providers' rate limits, by provider",
            c.rate_limit_wait_seconds.clone(),
        );
        r.register(
            "omniflow_fan_out_items",
            "Steps planned by forEach nodes",
            c.fan_out_items.clone(),
        );
        let t = crate::telemetry::get();
        r.register(
            "omniflow_notifications",
            "Notification deliveries, by channel and outcome (sent, already_sent, sandbox, or the error kind)",
            t.notifications.clone(),
        );
        r.register(
            "omniflow_schedule_slots",
            "Schedule slots, by blueprint and outcome (fired, missed, skipped, claimed_elsewhere, claim_failed)",
            t.schedule_slots.clone(),
        );
        r.register(
            "omniflow_store_write_batch_duration_seconds",
            "Time of one store write batch (one transaction)",
            t.store_batch_seconds.clone(),
        );
        r.register(
            "omniflow_store_write_queue",
            "Writes queued to the store writer, not yet committed",
            t.store_queue.clone(),
        );
        r.register(
            "omniflow_store_write_failures",
            "Writes the store could not save (each is logged)",
            t.store_write_failures.clone(),
        );
        r.register_collector(Box::new(Live {
            engine,
            dropped: dropped.clone(),
        }));
        Metrics {
            registry: r,
            counters: c,
            dropped,
        }
    }

    /// The exposition, in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::events::{AttemptInfo, RunStatus};

    fn engine(dir: &tempfile::TempDir) -> Engine {
        let mut vars = std::collections::HashMap::new();
        vars.insert(
            "DB_FILE".to_string(),
            dir.path().join("m.db").display().to_string(),
        );
        // Not the default: the threshold gauge must show this process's setting.
        vars.insert("MEMORY_THRESHOLD_MB".to_string(), "321".to_string());
        let config = crate::config::Config::from_vars(&vars).unwrap();
        let store = crate::store::Store::open(&config.db_file).unwrap();
        Engine::new(Arc::new(config), store, crate::events::EventBus::new())
    }

    fn attempt(kind: Option<ErrorKind>, wait: Option<u64>) -> Event {
        Event::AttemptFinished(Box::new(AttemptInfo {
            run_id: "0mrun0000abcd".into(),
            step: "ask[7]".into(),
            node: "ask".into(),
            node_type: "llm",
            attempt: 1,
            error_kind: kind,
            provider: kind.is_none().then(|| "huggingface".into()),
            model: kind.is_none().then(|| "mistral".into()),
            duration_ms: 1200,
            tokens: if kind.is_none() { 42 } else { 0 },
            cached: kind.is_none(),
            retry_wait_ms: wait,
        }))
    }

    /// Every family, once it has a sample, renders under the name the README, the dashboard
    /// and the tests use; run ids and step keys never appear.
    #[tokio::test]
    async fn every_family_renders_and_the_dashboard_names_only_real_series() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(engine(&dir), "web-1", "daemon");
        for ev in [
            Event::RunStarted {
                run_id: "0mrun0000abcd".into(),
                blueprint: "digest".into(),
                nodes: 2,
            },
            Event::FanOut {
                run_id: "0mrun0000abcd".into(),
                node: "ask".into(),
                items: 40,
            },
            attempt(Some(ErrorKind::RateLimited), Some(2000)),
            attempt(None, None),
            Event::StepWaiting {
                run_id: "0mrun0000abcd".into(),
                step: "ask[7]".into(),
                node: "ask".into(),
                provider: "huggingface".into(),
                wait_ms: 1500,
            },
            Event::StepFinished {
                run_id: "0mrun0000abcd".into(),
                step: "ask[7]".into(),
                node: "ask".into(),
                node_type: "llm",
                status: StepStatus::Error,
                attempts: 2,
                duration_ms: 3000,
                error: Some("secret-ish message text".into()),
                error_kind: Some(ErrorKind::Timeout),
            },
            Event::RunFinished {
                run_id: "0mrun0000abcd".into(),
                blueprint: "digest".into(),
                status: RunStatus::Error,
                total_time_ms: 4000,
                error: Some("message text".into()),
            },
            Event::RunReleased {
                run_id: "0mrun0000abcd".into(),
                blueprint: "digest".into(),
            },
        ] {
            m.counters.record(&ev);
        }
        crate::telemetry::notification("discord", "sent");
        crate::telemetry::schedule_slots("digest", "fired", 1);
        crate::telemetry::store_batch(std::time::Duration::from_millis(3), 0);
        let text = m.render();
        assert!(!text.contains("0mrun0000abcd") && !text.contains("ask[7]"));
        assert!(
            !text.contains("omniflow_fleet_attempts"),
            "a process outside a fleet has no fleet series"
        );
        assert!(!text.contains("message text"));
        for line in [
            r#"omniflow_runs_finished_total{host="web-1",role="daemon",blueprint="digest",status="error"} 1"#,
            r#"omniflow_steps_total{host="web-1",role="daemon",node_type="llm",status="error",error_kind="timeout"} 1"#,
            r#"omniflow_attempts_total{host="web-1",role="daemon",node_type="llm",provider="none",error_kind="rate_limited"} 1"#,
            r#"omniflow_retries_total{host="web-1",role="daemon",node_type="llm",error_kind="rate_limited"} 1"#,
            r#"omniflow_model_tokens_total{host="web-1",role="daemon",provider="huggingface",model="mistral"} 42"#,
            r#"omniflow_model_cache_hits_total{host="web-1",role="daemon",provider="huggingface",model="mistral"} 1"#,
            r#"omniflow_rate_limit_wait_seconds_total{host="web-1",role="daemon",provider="huggingface"} 1.5"#,
            r#"omniflow_fan_out_items_total{host="web-1",role="daemon"} 40"#,
            // MEMORY_THRESHOLD_MB=321, in bytes.
            r#"omniflow_memory_threshold_bytes{host="web-1",role="daemon"} 336592896"#,
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dash: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("deploy/grafana/omniflow.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let mut checked = 0;
        for t in dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["targets"].as_array().unwrap())
        {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                // A fleet's series: a process outside one has none (the fleet test below
                // renders them).
                if !word.starts_with("omniflow_") || word.starts_with("omniflow_fleet_") {
                    continue;
                }
                let family = word.strip_suffix("_bucket").unwrap_or(word);
                assert!(
                    families.contains(&family),
                    "{word} is not exposed: {families:?}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 14, "{checked}");
    }

    /// A process in a fleet says what it did through the shared queue: a run of three
    /// steps, each queued, taken and recorded by this one process, counts three of each (the
    /// ones taken at their insert too) and none dropped.
    #[test]
    fn a_fleet_process_counts_the_attempts_it_queued_took_and_recorded() {
        let Some(db) = crate::store::pg::testing::ScratchDb::new("fleet_metrics") else {
            return;
        };
        let (rt, engine, _dir) = crate::engine::testing::fleet_engine(&db, 2);
        let bp: crate::blueprint::Blueprint = serde_json::from_value(serde_json::json!({
            "name": "counted",
            "nodes": [
                { "id": "a", "type": "transform", "template": "1" },
                { "id": "b", "type": "transform", "needs": ["a"], "template": "2" },
                { "id": "c", "type": "transform", "needs": ["b"], "template": "3" }
            ]
        }))
        .unwrap();
        let m = Metrics::new(engine.clone(), "web-1", "daemon");
        let text = rt.block_on(async {
            let h = engine
                .start(Arc::new(bp), crate::engine::RunRequest::default())
                .unwrap();
            let o = tokio::time::timeout(std::time::Duration::from_secs(60), h.wait())
                .await
                .expect("the run ends");
            assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
            m.render()
        });
        for (event, n) in [
            ("enqueued", 3),
            ("claimed", 3),
            ("completed", 3),
            ("fenced", 0),
        ] {
            let line = format!(
                r#"omniflow_fleet_attempts_total{{host="web-1",role="daemon",event="{event}"}} {n}"#
            );
            assert!(text.contains(&line), "missing {line}\n{text}");
        }
        drop(m);
        drop(engine);
        drop(rt);
    }
}
