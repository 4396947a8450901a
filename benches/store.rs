//! The history writer on its own: a `forEach` run's transitions, in the order the engine
//! queues them, sent as fast as one thread can, timed until the last one is committed to a
//! real SQLite file (WAL). This is the ceiling of persisted steps per second, whatever the
//! engine does.
//!
//! Each line gives the wall-clock rate and the writer thread's own CPU time per step (from
//! `/proc/self/task/*/schedstat`); on a machine shared with other work the second is the
//! one to compare.
//!
//! `cargo bench --bench store` (add `-- quick` for fewer repetitions).

use omniflow::blueprint::Priority;
use omniflow::events::{RunStatus, StepStatus};
use omniflow::store::{AttemptRecord, NewRun, NewStep, RunEnd, StepEnd, Store};
use serde_json::{json, Value};
use std::time::{Instant, SystemTime};

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let reps = if quick { 3 } else { 7 };
    println!("omniflow store bench — one writer thread, a real SQLite file (WAL); medians of {reps} runs");
    println!("each line: a forEach run's transitions (queued, started, attempt, finished, progress) until committed\n");
    for order in [Order::QueuedFirst, Order::AsTheyRun] {
        for big_vars in [false, true] {
            for n in [100, 1_000, 10_000] {
                let mut rates = Vec::new();
                let mut cpu = Vec::new();
                for _ in 0..reps {
                    let (rate, us) = one_run(n, order, big_vars);
                    rates.push(rate);
                    cpu.push(us);
                }
                rates.sort_by(f64::total_cmp);
                cpu.sort_by(f64::total_cmp);
                println!(
                    "{:<28} {:<22} {n:>6} steps: {:>7.0} steps/s   writer {:>5.1} µs CPU/step",
                    order.label(),
                    if big_vars {
                        "variables of n numbers"
                    } else {
                        "small variables"
                    },
                    rates[rates.len() / 2],
                    cpu[cpu.len() / 2]
                );
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Order {
    /// Every step is queued before the first starts (a fan-out planned all at once).
    QueuedFirst,
    /// Each step is queued just before it starts (a fan-out planned as workers free up).
    AsTheyRun,
}

impl Order {
    fn label(self) -> &'static str {
        match self {
            Order::QueuedFirst => "all queued, then each runs",
            Order::AsTheyRun => "each queued as it runs",
        }
    }
}

/// CPU time used so far by the store's writer thread, in nanoseconds.
fn writer_cpu_ns() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "omniflow-store" {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Steps per second from the first write to the commit of the last, and the writer thread's
/// CPU time per step in microseconds.
fn one_run(n: usize, order: Order, big_vars: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("bench.db")).expect("store");
    let vars = if big_vars {
        json!({ "N": (0..n).collect::<Vec<_>>() })
    } else {
        json!({})
    };
    let cpu_before = writer_cpu_ns();
    let started = Instant::now();
    store.insert_run(NewRun {
        id: "run".into(),
        blueprint_name: "wide".into(),
        priority: Priority::Normal,
        trigger: "cli".into(),
        sandbox: true,
        seed: None,
        simulate_failures: 0.0,
        blueprint: json!({ "name": "wide", "variables": vars.clone(), "nodes": [] }),
        variables: vars,
        parent_run_id: None,
        queued_at: SystemTime::now(),
    });
    store.run_started("run", SystemTime::now(), 1);
    let key = |i: usize| format!("each[{i}]");
    let queue = |i: usize| {
        store.step_queued(NewStep {
            run_id: "run".into(),
            step_key: key(i),
            node_id: "each".into(),
            item_index: Some(i as u32),
            input: None,
            queued_at: SystemTime::now(),
        })
    };
    if let Order::QueuedFirst = order {
        (0..n).for_each(queue);
    }
    for i in 0..n {
        if let Order::AsTheyRun = order {
            queue(i);
        }
        let at = SystemTime::now();
        store.step_started("run", &key(i), 1, at);
        store.attempt_finished(AttemptRecord {
            run_id: "run".into(),
            step_key: key(i),
            attempt: 1,
            ok: true,
            error_kind: None,
            error: None,
            wait_ms: None,
            started_at: at,
            finished_at: SystemTime::now(),
            tokens_used: 0,
            provider: None,
            model: None,
            cached: false,
        });
        store.step_finished(StepEnd {
            run_id: "run".into(),
            step_key: key(i),
            node_id: "each".into(),
            item_index: Some(i as u32),
            status: StepStatus::Success,
            attempts: 1,
            output: Some(Value::String(i.to_string())),
            error_kind: None,
            error: None,
            tokens_used: 0,
            provider: None,
            model: None,
            cached: false,
            reply_model: None,
            finish_reason: None,
            finished_at: SystemTime::now(),
            duration_ms: 0,
        });
        store.run_progress("run", i as u32 + 1, 0);
    }
    store.run_finished(RunEnd {
        run_id: "run".into(),
        status: RunStatus::Success,
        finished_at: SystemTime::now(),
        total_time_ms: 0,
        tokens_used: 0,
        steps_done: n as u32,
        error: None,
        error_kind: None,
        failed_step: None,
    });
    store.flush_blocking();
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let cpu_us = writer_cpu_ns().saturating_sub(cpu_before) as f64 / 1000.0 / n as f64;
    assert_eq!(store.take_write_error(), None);
    assert_eq!(store.run_steps("run").expect("steps").len(), n);
    (rate, cpu_us)
}
