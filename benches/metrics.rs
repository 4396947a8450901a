//! What a `/metrics` scrape costs the pool during a 40-way fan-out.
//!
//! `cargo bench --bench metrics` (add `-- quick` for fewer repetitions). Three numbers:
//! - a scrape's round trip over HTTP (request, render, answer) while 40 sandbox calls run:
//!   an upper bound on the CPU time one scrape takes from the process;
//! - `Pool::stats()`, the one moment a scrape holds the pool's lock (workers wait for it);
//! - the fan-out's wall time with a scraper hammering `/metrics` against without: what the
//!   pool loses, divided by the scrapes made meanwhile.

use omniflow::blueprint::Blueprint;
use omniflow::config::Config;
use omniflow::engine::{Engine, EngineOptions, RunRequest};
use omniflow::events::EventBus;
use omniflow::pool::PoolOptions;
use omniflow::store::Store;
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let reps = if quick { 3 } else { 9 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    println!("omniflow metrics bench — 2 worker threads, 40-way sandbox fan-out (50 ms per call), history in SQLite");
    rt.block_on(run(&dir, reps));
}

fn engine(dir: &tempfile::TempDir) -> Engine {
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert(
        "DB_FILE".into(),
        dir.path().join("metrics.db").display().to_string(),
    );
    vars.insert("SANDBOX_LATENCY_MS".into(), "50".into());
    let config = Config::from_vars(&vars).expect("config");
    let store = Store::open(&config.db_file).expect("store");
    let mut options = EngineOptions::from_config(&config);
    options.pool = PoolOptions {
        concurrency: 40,
        ..PoolOptions::default()
    };
    Engine::with_options(Arc::new(config), store, EventBus::new(), options)
}

fn blueprint() -> Arc<Blueprint> {
    let items: Vec<String> = (0..40).map(|i| format!("item {i}")).collect();
    Arc::new(
        serde_json::from_value(json!({
            "name": "bench-fan",
            "variables": { "ITEMS": items },
            "nodes": [
                { "id": "ask", "type": "llm", "forEach": "{{ vars.ITEMS }}", "model": "m",
                  "prompt": "About {{ item }}." },
                { "id": "join", "type": "transform", "needs": ["ask"],
                  "template": "{{ nodes.ask.output | length }}" }
            ]
        }))
        .expect("blueprint"),
    )
}

fn scrape(addr: SocketAddr) -> usize {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut buf = Vec::with_capacity(32 * 1024);
    s.read_to_end(&mut buf).expect("read");
    assert!(buf.starts_with(b"HTTP/1.1 200"), "scrape failed");
    buf.len()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn fan_out(engine: &Engine, bp: &Arc<Blueprint>) -> f64 {
    let t = Instant::now();
    let h = engine
        .start(
            bp.clone(),
            RunRequest {
                sandbox: true,
                ..Default::default()
            },
        )
        .expect("start");
    let out = h.wait().await;
    assert_eq!(out.status, omniflow::events::RunStatus::Success);
    t.elapsed().as_secs_f64() * 1000.0
}

async fn run(dir: &tempfile::TempDir, reps: usize) {
    let engine = engine(dir);
    engine.set_role(omniflow::engine::Role::Daemon);
    let server = omniflow::metrics::serve(
        &engine,
        omniflow::metrics::Options {
            listen: "127.0.0.1:0".parse().expect("addr"),
            token: None,
            sandbox: true,
        },
    )
    .await
    .expect("serve");
    let addr = server.addr();
    let bp = blueprint();
    // Warm up: the families exist, the database has its pages.
    fan_out(&engine, &bp).await;

    // Fan-outs alone, and with a scraper running back to back.
    let mut alone = Vec::new();
    let mut scraped = Vec::new();
    let scrapes = Arc::new(AtomicUsize::new(0));
    let round_trips = Arc::new(Mutex::new(Vec::new()));
    let mut bytes = 0;
    for _ in 0..reps {
        alone.push(fan_out(&engine, &bp).await);
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let (stop, scrapes, round_trips) = (stop.clone(), scrapes.clone(), round_trips.clone());
            std::thread::spawn(move || {
                let mut size = 0;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    size = scrape(addr);
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    round_trips.lock().expect("lock").push(ms);
                    scrapes.fetch_add(1, Ordering::Relaxed);
                }
                size
            })
        };
        scraped.push(fan_out(&engine, &bp).await);
        stop.store(true, Ordering::Relaxed);
        bytes = scraper.join().expect("scraper");
    }
    // The pool's lock, as a scrape takes it, while a fan-out runs.
    let h = engine
        .start(
            bp.clone(),
            RunRequest {
                sandbox: true,
                ..Default::default()
            },
        )
        .expect("start");
    let mut stats_us = Vec::new();
    while stats_us.len() < 2000 {
        let t = Instant::now();
        let s = engine.pool().stats();
        stats_us.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(s);
        if stats_us.len() % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    h.wait().await;
    server.stop().await;

    let mut rt = round_trips.lock().expect("lock").clone();
    let total_scrapes = scrapes.load(Ordering::Relaxed);
    let alone_ms = percentile(&mut alone.clone(), 0.5);
    let scraped_ms = percentile(&mut scraped.clone(), 0.5);
    let per_fan_out = total_scrapes as f64 / reps as f64;
    println!(
        "scrape round trip during the fan-out: p50 {:.3} ms, p99 {:.3} ms ({} scrapes, {} bytes each)",
        percentile(&mut rt, 0.5),
        percentile(&mut rt, 0.99),
        total_scrapes,
        bytes
    );
    println!(
        "pool lock held by a scrape (Pool::stats): p50 {:.1} µs, p99 {:.1} µs",
        percentile(&mut stats_us, 0.5),
        percentile(&mut stats_us, 0.99)
    );
    let lost = scraped_ms - alone_ms;
    println!(
        "fan-out wall time: {alone_ms:.1} ms alone, {scraped_ms:.1} ms while scraped back to back ({per_fan_out:.0} scrapes per fan-out) → {:.3} ms of pool time per scrape (medians of {reps}; negative = within noise)",
        lost / per_fan_out.max(1.0)
    );
}
