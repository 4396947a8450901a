use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

fn meta(run: &str, step: &str, p: Priority) -> JobMeta {
    JobMeta {
        run_id: run.into(),
        step: step.into(),
        attempt: 1,
        priority: p,
    }
}

fn pool(concurrency: usize) -> Pool {
    Pool::new(
        PoolOptions {
            concurrency,
            aging: Duration::from_secs(3600),
        },
        EventBus::new(),
    )
}

#[tokio::test]
async fn runs_by_priority_then_arrival() {
    let p = pool(1);
    p.pause();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut futs = Vec::new();
    for (name, prio) in [
        ("low", Priority::Low),
        ("normal1", Priority::Normal),
        ("critical", Priority::Critical),
        ("high", Priority::High),
        ("normal2", Priority::Normal),
    ] {
        let order = order.clone();
        futs.push(p.submit(
            meta("r", name, prio),
            CancellationToken::new(),
            async move { order.lock().unwrap().push(name) },
        ));
    }
    assert_eq!(p.stats().queued, [1, 2, 1, 1]);
    p.resume();
    for f in futs {
        f.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        ["critical", "high", "normal1", "normal2", "low"]
    );
    assert_eq!(p.stats().completed, 5);
}

#[tokio::test]
async fn never_more_than_concurrency_in_flight() {
    let p = pool(4);
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut futs = Vec::new();
    for i in 0..40 {
        let (now, peak) = (now.clone(), peak.clone());
        futs.push(p.submit(
            meta("r", &format!("s{i}"), Priority::Normal),
            CancellationToken::new(),
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                now.fetch_sub(1, Ordering::SeqCst);
            },
        ));
    }
    for f in futs {
        f.await.unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn workers_report_what_they_run() {
    let p = pool(2);
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let fut = p.submit(
        meta("run-1", "fetch", Priority::High),
        CancellationToken::new(),
        async move { g.notified().await },
    );
    // Wait until a worker took it.
    let mut busy = None;
    for _ in 0..200 {
        busy = p.workers().into_iter().find_map(|w| w.job);
        if busy.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = busy.expect("a worker took the job");
    assert_eq!(busy.run_id, "run-1");
    assert_eq!(busy.step, "fetch");
    assert_eq!(p.stats().running, 1);
    gate.notify_one();
    fut.await.unwrap();
    assert!(p.workers().iter().all(|w| w.job.is_none()));
}

#[tokio::test]
async fn cancelled_queued_jobs_never_start() {
    let p = pool(1);
    p.pause();
    let started = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let s = started.clone();
    let fut = p.submit(
        meta("r", "a", Priority::Normal),
        cancel.clone(),
        async move {
            s.fetch_add(1, Ordering::SeqCst);
        },
    );
    cancel.cancel();
    p.resume();
    assert_eq!(fut.await, Err(PoolError::Dropped));
    assert_eq!(started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn remove_run_and_set_run_priority() {
    let p = pool(1);
    p.pause();
    let a = p.submit(
        meta("a", "x", Priority::Low),
        CancellationToken::new(),
        async { "a" },
    );
    let b = p.submit(
        meta("b", "x", Priority::Low),
        CancellationToken::new(),
        async { "b" },
    );
    let c = p.submit(
        meta("c", "x", Priority::Low),
        CancellationToken::new(),
        async { "c" },
    );
    assert_eq!(p.set_run_priority("c", Priority::Critical), 1);
    assert_eq!(p.stats().queued, [2, 0, 0, 1]);
    assert_eq!(p.remove_run("a"), 1);
    p.resume();
    assert_eq!(a.await, Err(PoolError::Dropped));
    assert_eq!(c.await, Ok("c"));
    assert_eq!(b.await, Ok("b"));
}

#[tokio::test]
async fn a_panicking_job_does_not_kill_its_worker() {
    let p = pool(1);
    let bad = p.submit(
        meta("r", "bad", Priority::Normal),
        CancellationToken::new(),
        async { panic!("boom") },
    );
    assert_eq!(bad.await, Err(PoolError::Dropped));
    let good = p.submit(
        meta("r", "good", Priority::Normal),
        CancellationToken::new(),
        async { 7 },
    );
    assert_eq!(good.await, Ok(7));
    assert_eq!(p.stats().failed, 1);
}

#[tokio::test]
async fn busy_and_idle_events_are_published() {
    let bus = EventBus::new();
    let sub = bus.subscribe();
    let p = Pool::new(
        PoolOptions {
            concurrency: 1,
            aging: Duration::ZERO,
        },
        bus,
    );
    p.submit(
        meta("r", "s", Priority::Normal),
        CancellationToken::new(),
        async {},
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    while let Some(ev) = sub.try_recv() {
        seen.push(ev);
    }
    assert!(seen
        .iter()
        .any(|e| matches!(e, Event::WorkerBusy { step, .. } if step == "s")));
    assert!(seen
        .iter()
        .any(|e| matches!(e, Event::WorkerIdle { worker: 0 })));
}
