//! Engine benchmarks, each printed beside a baseline measured in the same run (the same work
//! as bare tokio tasks, without the pool, the engine or persistence), so the ratio means
//! something on a noisy machine.
//!
//! `cargo bench --bench engine` (add `-- quick` for fewer repetitions).
//!
//! Engines and pools are built with the defaults a user gets (`CONCURRENCY`'s default pool),
//! except where a line says otherwise.
//!
//! The provider lines run the real provider clients against a local fake
//! OpenAI-compatible server started here.

use omniflow::blueprint::{Blueprint, Priority};
use omniflow::config::Config;
use omniflow::engine::{Engine, EngineOptions, RunRequest};
use omniflow::events::{EventBus, RunStatus};
use omniflow::pool::{JobMeta, Pool, PoolOptions};
use omniflow::store::Store;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let reps = if quick { 3 } else { 9 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    println!(
        "omniflow engine bench — 2 worker threads, history persisted to a real SQLite file (WAL)"
    );
    println!(
        "each line: omniflow vs baseline (bare tokio, no persistence); medians of {reps} runs\n"
    );
    // First, while the process is fresh, so its RSS means something.
    queued_memory(&rt);
    rt.block_on(async {
        big_output_memory(&dir).await;
        chain(&dir, reps).await;
        long_chains(&dir, quick).await;
        throughput(&dir, reps).await;
        fan_out(&dir, reps).await;
        provider_overhead(reps).await;
        rate_limited(reps.min(3)).await;
        rate_limited_fan_out(&dir, reps.min(3)).await;
    });
}

/// An engine as a user gets it: the configuration's defaults, its pool included.
fn engine(dir: &tempfile::TempDir, name: &str, extra: &[(&str, &str)]) -> Engine {
    engine_with(dir, name, extra, None)
}

fn engine_with(
    dir: &tempfile::TempDir,
    name: &str,
    extra: &[(&str, &str)],
    concurrency: Option<usize>,
) -> Engine {
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert(
        "DB_FILE".into(),
        dir.path().join(format!("{name}.db")).display().to_string(),
    );
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let config = Config::from_vars(&vars).expect("config");
    let store = Store::open(&config.db_file).expect("store");
    let mut options = EngineOptions::from_config(&config);
    if let Some(concurrency) = concurrency {
        options.pool = PoolOptions {
            concurrency,
            ..options.pool
        };
    }
    Engine::with_options(Arc::new(config), store, EventBus::new(), options)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bp(v: serde_json::Value) -> Arc<Blueprint> {
    Arc::new(serde_json::from_value(v).expect("blueprint"))
}

/// Per-step overhead: a 40-step sequential chain of no-op transforms.
async fn chain(dir: &tempfile::TempDir, reps: usize) {
    let e = engine(dir, "chain", &[]);
    let nodes: Vec<_> = (0..40)
        .map(|i| {
            if i == 0 {
                json!({ "id": "s0", "type": "transform", "template": "x" })
            } else {
                json!({ "id": format!("s{i}"), "type": "transform", "needs": [format!("s{}", i - 1)], "template": "x" })
            }
        })
        .collect();
    let b = bp(json!({ "name": "chain", "nodes": nodes }));
    let mut ours = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let o = e
            .start(b.clone(), RunRequest::default())
            .expect("start")
            .wait()
            .await;
        assert_eq!(o.status, RunStatus::Success);
        ours.push(t.elapsed().as_secs_f64() * 1000.0 / 40.0);
    }
    let mut base = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let mut prev = String::from("x");
        for _ in 0..40 {
            let p = prev.clone();
            prev = tokio::spawn(async move { p }).await.expect("join");
        }
        base.push(t.elapsed().as_secs_f64() * 1000.0 / 40.0);
    }
    let (o, b) = (median(ours), median(base));
    println!(
        "per-step overhead (40-step chain, every change persisted): {o:.3} ms/step   baseline {b:.4} ms/step   (target < 1 ms)"
    );
}

/// A chain of `n` transforms, each printing 1 KB of text and reading its predecessor.
fn kb_chain(n: usize) -> Arc<Blueprint> {
    let pad = "x".repeat(1000);
    let nodes: Vec<_> = (0..n)
        .map(|i| {
            if i == 0 {
                json!({ "id": "s0", "type": "transform", "template": format!("{pad} start") })
            } else {
                json!({ "id": format!("s{i}"), "type": "transform", "needs": [format!("s{}", i - 1)],
                        "template": format!("{pad} {{{{ nodes.s{}.status }}}}", i - 1) })
            }
        })
        .collect();
    bp(json!({ "name": format!("chain{n}"), "nodes": nodes }))
}

/// Per-step overhead of chains of 100, 1,000 and 10,000 steps with 1 KB outputs: flat if the
/// engine is linear in the run's length. Baseline: the same chain as bare tokio tasks passing
/// a 1 KB string along.
async fn long_chains(dir: &tempfile::TempDir, quick: bool) {
    let e = engine(dir, "long_chains", &[]);
    let mut first = None;
    for n in [100usize, 1_000, 10_000] {
        let b = kb_chain(n);
        let reps = match (n, quick) {
            (10_000, true) => 1,
            (10_000, false) => 3,
            (_, true) => 3,
            _ => 5,
        };
        let mut ours = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let o = e
                .start(b.clone(), RunRequest::default())
                .expect("start")
                .wait()
                .await;
            assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
            ours.push(t.elapsed().as_secs_f64() * 1000.0 / n as f64);
        }
        let mut base = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let mut prev = "x".repeat(1000);
            for _ in 0..n {
                let p = prev.clone();
                prev = tokio::spawn(async move { format!("{p} ") })
                    .await
                    .expect("join");
                prev.truncate(1000);
            }
            base.push(t.elapsed().as_secs_f64() * 1000.0 / n as f64);
        }
        let (o, b) = (median(ours), median(base));
        let first = *first.get_or_insert(o);
        println!(
            "chain of {n} steps with 1 KB outputs: {o:.3} ms/step   baseline {b:.4} ms/step   ({:.2}× the 100-step chain's; target within 2×)",
            o / first
        );
    }
}

/// Peak RSS of the process (VmHWM) since the last `reset_peak_rss`.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Makes the next `peak_rss_mb` report the peak from now on (Linux: `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A 1 MB output followed by 100 and by 1,000 steps that read it, as a chain and as
/// siblings all ready at once: the peak RSS must not grow with the step count. Baseline: the
/// process's RSS before the run.
async fn big_output_memory(dir: &tempfile::TempDir) {
    let e = engine(dir, "big_output", &[]);
    let big = "y".repeat(1 << 20);
    for shape in ["chain", "siblings"] {
        let mut line = format!("1 MB output, then {shape} of");
        for n in [100usize, 1_000] {
            let mut nodes =
                vec![json!({ "id": "big", "type": "transform", "template": "{{ vars.BIG }}" })];
            for i in 0..n {
                let need = if shape == "chain" && i > 0 {
                    format!("s{}", i - 1)
                } else {
                    "big".to_string()
                };
                nodes.push(json!({ "id": format!("s{i}"), "type": "transform", "needs": [need],
                                   "template": "{{ nodes.big.status }} {{ nodes.big.output[:8] }}" }));
            }
            let b = bp(json!({ "name": "big", "variables": { "BIG": big }, "nodes": nodes }));
            let before = memory_stats::memory_stats()
                .map(|m| m.physical_mem as f64 / 1_048_576.0)
                .unwrap_or(f64::NAN);
            reset_peak_rss();
            let t = Instant::now();
            let o = e
                .start(b, RunRequest::default())
                .expect("start")
                .wait()
                .await;
            assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            line.push_str(&format!(
                "   {n} steps: peak RSS {:.1} MB in {ms:.0} ms (RSS before {before:.1} MB)",
                peak_rss_mb()
            ));
        }
        println!("{line}   (target: the peak does not grow with the steps)");
    }
}

/// Pool throughput, bare and through the engine with persistence.
async fn throughput(dir: &tempfile::TempDir, reps: usize) {
    const N: usize = 10_000;
    let pool = Pool::new(PoolOptions::default(), EventBus::new());
    let mut ours = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let futs: Vec<_> = (0..N)
            .map(|i| {
                pool.submit(
                    JobMeta {
                        run_id: "bench".into(),
                        step: format!("s{i}").into(),
                        attempt: 1,
                        priority: Priority::Normal,
                    },
                    CancellationToken::new(),
                    async move { i },
                )
            })
            .collect();
        for f in futs {
            f.await.expect("job");
        }
        ours.push(N as f64 / t.elapsed().as_secs_f64());
    }
    let mut base = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let hs: Vec<_> = (0..N).map(|i| tokio::spawn(async move { i })).collect();
        for h in hs {
            h.await.expect("join");
        }
        base.push(N as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "pool throughput (10,000 no-op tasks): {:.0} tasks/s   baseline {:.0} tasks/s   (target ≥ 10,000)",
        median(ours),
        median(base)
    );

    // The same through the engine: one forEach of 10,000 no-op transforms, every step's
    // queued/started/attempt/finished rows written to SQLite.
    let e = engine(dir, "throughput", &[]);
    let b = bp(json!({
        "name": "wide",
        "variables": { "N": (0..N).collect::<Vec<_>>() },
        "nodes": [ { "id": "each", "type": "transform", "forEach": "{{ vars.N }}", "template": "{{ item }}" } ]
    }));
    let mut eng = Vec::new();
    for _ in 0..reps.min(3) {
        let t = Instant::now();
        let o = e
            .start(b.clone(), RunRequest::default())
            .expect("start")
            .wait()
            .await;
        assert_eq!(o.status, RunStatus::Success);
        eng.push(N as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "engine throughput (forEach of 10,000 no-op steps, persisted): {:.0} steps/s",
        median(eng)
    );
}

/// Fan-out of 40 sandbox model calls of 200 ms each.
async fn fan_out(dir: &tempfile::TempDir, reps: usize) {
    let e = engine(dir, "fanout", &[("SANDBOX_LATENCY_MS", "200")]);
    let topics: Vec<String> = (0..40).map(|i| format!("topic {i}")).collect();
    let b = bp(json!({
        "name": "fan",
        "variables": { "TOPICS": topics },
        "nodes": [ { "id": "summarize", "type": "llm", "forEach": "{{ vars.TOPICS }}", "prompt": "Two sentences on {{ item }}." } ]
    }));
    let mut ours = Vec::new();
    for _ in 0..reps {
        let req = RunRequest {
            sandbox: true,
            seed: Some(1),
            ..Default::default()
        };
        let t = Instant::now();
        let o = e.start(b.clone(), req).expect("start").wait().await;
        assert_eq!(o.status, RunStatus::Success);
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut base = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let hs: Vec<_> = (0..40)
            .map(|_| tokio::spawn(tokio::time::sleep(Duration::from_millis(200))))
            .collect();
        for h in hs {
            h.await.expect("join");
        }
        base.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (o, b) = (median(ours), median(base));
    println!(
        "fan-out of 40 model calls × 200 ms: makespan {o:.1} ms   baseline {b:.1} ms   ({:+.1} % vs 200 ms; target within 10 %)",
        (o / 200.0 - 1.0) * 100.0
    );
}

/// Peak RSS with 10,000 tasks queued in a paused pool.
fn queued_memory(rt: &tokio::runtime::Runtime) {
    const N: usize = 10_000;
    let rss = || {
        memory_stats::memory_stats()
            .map(|m| m.physical_mem as f64 / 1_048_576.0)
            .unwrap_or(f64::NAN)
    };
    let before = rss();
    let (queued, after) = rt.block_on(async {
        let pool = Pool::new(PoolOptions::default(), EventBus::new());
        pool.pause();
        let mut futs = Vec::with_capacity(N);
        for i in 0..N {
            let prompt = format!("Two sentences on topic {i}.");
            futs.push(pool.submit(
                JobMeta {
                    run_id: "mem".into(),
                    step: format!("summarize[{i}]").into(),
                    attempt: 1,
                    priority: Priority::Normal,
                },
                CancellationToken::new(),
                async move { prompt.len() },
            ));
        }
        let queued = pool.stats().queued_total();
        let after = rss();
        pool.resume();
        for f in futs {
            f.await.expect("job");
        }
        (queued, after)
    });
    // Baseline: the same futures boxed in a Vec, no pool.
    let base_before = rss();
    let v: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>>> = (0..N)
        .map(|i| {
            let prompt = format!("Two sentences on topic {i}.");
            Box::pin(async move { prompt.len() }) as _
        })
        .collect();
    let base_after = rss();
    drop(v);
    println!(
        "memory with {queued} tasks queued: process RSS {after:.1} MB (+{:.1} MB for the queue)   baseline +{:.1} MB for {N} boxed futures   (target < 50 MB)",
        after - before,
        (base_after - base_before).max(0.0)
    );
}

// ---- providers ------------------------------------------------------------------

/// A local fake chat-completions server: every request gets a small JSON completion, or a 429
/// when more than `quota` requests arrived in the last `window` (counted by arrival).
async fn fake_model_server(
    quota: Option<(usize, Duration)>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rejected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let log: Arc<std::sync::Mutex<Vec<Instant>>> = Default::default();
    let rj = rejected.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (log, rj) = (log.clone(), rj.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
                let limited = quota.is_some_and(|(q, w)| {
                    let now = Instant::now();
                    let mut log = log.lock().expect("log");
                    let recent = log.iter().filter(|t| now.duration_since(**t) < w).count();
                    if recent >= q {
                        true
                    } else {
                        log.push(now);
                        false
                    }
                });
                let (status, body) = if limited {
                    rj.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (429, r#"{"error":"Rate limit reached"}"#.to_string())
                } else {
                    (200, r#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"A short answer from the fake model."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}"#.to_string())
                };
                let out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), rejected)
}

fn bench_providers(vars: &[(&str, &str)]) -> omniflow::providers::Providers {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    omniflow::providers::Providers::new(Arc::new(Config::from_vars(&vars).expect("config")))
}

fn bench_request(i: usize) -> omniflow::providers::LlmRequest {
    omniflow::providers::LlmRequest {
        provider: "openai".into(),
        model: "m".into(),
        system: None,
        prompt: format!("Two sentences on topic {i}."),
        temperature: None,
        max_tokens: Some(64),
        subject: None,
    }
}

/// The provider layer (chain, limiter, streaming-capable client, error mapping) against a bare
/// reqwest POST + JSON parse to the same fake.
async fn provider_overhead(reps: usize) {
    const N: usize = 200;
    let (url, _) = fake_model_server(None).await;
    let p = bench_providers(&[("OPENAI_BASE_URL", &url)]);
    let bare = reqwest::Client::new();
    let chat = format!("{url}/v1/chat/completions");
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        for i in 0..N {
            let mut o = omniflow::providers::CallOptions::new(omniflow::providers::AttemptKey {
                step: "s",
                attempt: 1,
            });
            o.cache = false;
            p.complete_with(&bench_request(i), o).await.expect("call");
        }
        ours.push(t.elapsed().as_secs_f64() * 1e6 / N as f64);
        let t = Instant::now();
        for i in 0..N {
            let v: serde_json::Value = bare
                .post(&chat)
                .json(&json!({ "model": "m", "messages": [{ "role": "user", "content": format!("Two sentences on topic {i}.") }], "max_tokens": 64 }))
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json");
            assert!(v["choices"][0]["message"]["content"].is_string());
        }
        base.push(t.elapsed().as_secs_f64() * 1e6 / N as f64);
    }
    let (o, b) = (median(ours), median(base));
    println!(
        "provider call vs bare reqwest (local fake, {N} sequential calls): {o:.0} µs/call   baseline {b:.0} µs/call   (ratio {:.2})",
        o / b
    );
}

/// 40 parallel calls through a provider limited to the fake's quota (10 per 250 ms): the
/// makespan against the quota's minimum (grants at 0, 250, 500, 750 ms), and the 429 count.
async fn rate_limited(reps: usize) {
    let window = Duration::from_millis(250);
    // The fake counts by arrival over a slightly shorter window (jitter between a grant and
    // its arrival); the limiter is configured to the quota itself.
    let (url, rejected) = fake_model_server(Some((10, window - Duration::from_millis(25)))).await;
    let p = bench_providers(&[("OPENAI_BASE_URL", &url), ("OPENAI_RATE_LIMIT", "10/250ms")]);
    let mut spans = Vec::new();
    let mut errors = 0usize;
    for _ in 0..reps {
        // Let the previous round's window pass.
        tokio::time::sleep(window * 2).await;
        let t = Instant::now();
        let hs: Vec<_> = (0..40)
            .map(|i| {
                let p = p.clone();
                tokio::spawn(async move {
                    let mut o =
                        omniflow::providers::CallOptions::new(omniflow::providers::AttemptKey {
                            step: "s",
                            attempt: 1,
                        });
                    o.cache = false;
                    p.complete_with(&bench_request(i), o).await.is_ok()
                })
            })
            .collect();
        for h in hs {
            if !h.await.unwrap_or(false) {
                errors += 1;
            }
        }
        spans.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let m = median(spans);
    println!(
        "40 parallel calls, limit 10/250 ms = the fake's quota: makespan {m:.0} ms   quota minimum 750 ms (+{:.1} %)   429s from the fake: {}   failed calls: {errors}",
        (m / 750.0 - 1.0) * 100.0,
        rejected.load(std::sync::atomic::Ordering::SeqCst)
    );
}

/// The same quota through the engine: a 40-way fan-out of model calls (8 workers) at
/// 10 per 250 ms, and meanwhile another run's one-step blueprint. The calls wait for the
/// limit outside the pool, so the other run's step does not queue behind them; its latency
/// is printed beside the same run on an idle engine.
async fn rate_limited_fan_out(dir: &tempfile::TempDir, reps: usize) {
    let window = Duration::from_millis(250);
    let (url, rejected) = fake_model_server(Some((10, window - Duration::from_millis(25)))).await;
    let e = engine_with(
        dir,
        "limited",
        &[
            ("OPENAI_BASE_URL", url.as_str()),
            ("OPENAI_RATE_LIMIT", "10/250ms"),
            ("CACHE_TTL", "0"),
        ],
        Some(8),
    );
    let topics: Vec<String> = (0..40).map(|i| format!("topic {i}")).collect();
    let fan = bp(json!({
        "name": "fan",
        "variables": { "TOPICS": topics },
        "nodes": [ { "id": "summarize", "type": "llm", "provider": "openai", "model": "m",
                     "forEach": "{{ vars.TOPICS }}", "prompt": "Two sentences on {{ item }}.",
                     "cache": false } ]
    }));
    let quick = bp(json!({
        "name": "quick",
        "nodes": [ { "id": "t", "type": "transform", "template": "done" } ]
    }));
    let (mut spans, mut during, mut alone) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        tokio::time::sleep(window * 2).await;
        let t = Instant::now();
        let q = e
            .start(quick.clone(), RunRequest::default())
            .expect("start");
        assert_eq!(q.wait().await.status, RunStatus::Success);
        alone.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let h = e.start(fan.clone(), RunRequest::default()).expect("start");
        // Let the fan-out fill the limit first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let tq = Instant::now();
        let q = e
            .start(quick.clone(), RunRequest::default())
            .expect("start");
        assert_eq!(q.wait().await.status, RunStatus::Success);
        during.push(tq.elapsed().as_secs_f64() * 1000.0);
        let o = h.wait().await;
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        spans.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (m, d, a) = (median(spans), median(during), median(alone));
    println!(
        "engine fan-out of 40 model calls at 10/250 ms (8 workers): makespan {m:.0} ms   quota minimum 750 ms (+{:.1} %)   429s: {}   another run's step meanwhile: {d:.1} ms   (alone {a:.1} ms)",
        (m / 750.0 - 1.0) * 100.0,
        rejected.load(std::sync::atomic::Ordering::SeqCst)
    );
}
