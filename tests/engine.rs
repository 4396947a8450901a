//! The engine end to end: real blueprints, the real pool, a real SQLite file.

mod common;

use common::*;
use omniflow::engine::RunRequest;
use omniflow::events::{Event, RunStatus, StepStatus};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_flow_along_needs_and_history_is_recorded() {
    let env = engine(&[], 8);
    let bp = blueprint(json!({
        "name": "chain",
        "variables": { "WHO": "world", "INFO": { "lang": "rust", "tags": ["a", "b"] } },
        "nodes": [
            { "id": "greet", "type": "transform", "template": "hello {{ vars.WHO }}" },
            { "id": "shout", "type": "transform", "needs": ["greet"], "template": "{{ nodes.greet.output | upper }}!" },
            { "id": "data", "type": "transform", "parse": "json", "template": "{{ vars.INFO | tojson }}" },
            { "id": "use", "type": "transform", "needs": ["data", "shout"],
              "template": "{{ nodes.shout.output }} in {{ nodes.data.output.lang }} / {{ nodes.data.output.tags | join(',') }}" }
        ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["use"], json!("HELLO WORLD! in rust / a,b"));
    assert_eq!(o.outputs["data"]["tags"], json!(["a", "b"]));

    let row = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(row.status, RunStatus::Success);
    assert_eq!(row.blueprint_name, "chain");
    assert!(row.total_time_ms.is_some());
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(steps.len(), 4);
    assert!(steps
        .iter()
        .all(|s| s.status == StepStatus::Success && s.attempts == 1));
    let use_step = steps.iter().find(|s| s.step_key == "use").unwrap();
    assert_eq!(use_step.output, Some(json!("HELLO WORLD! in rust / a,b")));

    // The original's monitoring queries, verbatim, on the same file.
    let conn = rusqlite::Connection::open(env.store.path().unwrap()).unwrap();
    let rows: Vec<(String, String, Option<i64>)> = conn
        .prepare("SELECT blueprint_name, status, total_time_ms FROM runner_executions ORDER BY started_at DESC LIMIT 10;")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "chain");
    assert_eq!(rows[0].1, "success");
    assert!(rows[0].2.is_some());
    let errors: i64 = conn
        .query_row(
            "SELECT count(*) FROM (SELECT * FROM runner_executions WHERE status = 'error')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(errors, 0);
}

/// 40 items, 64 workers: all 40 model calls are open at the server at the same moment. The
/// server answers none of them until it holds all 40, so this is what it saw, not a sample
/// of the pool taken at the right time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_40_item_fan_out_puts_40_agents_in_flight_together() {
    const ANSWER: &str = r#"{"choices":[{"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    let fake = common::counting::start_gathering(40, ANSWER.to_string());
    let url = format!("{}/v1", fake.url);
    let env = engine(
        &[
            ("OPENAI_BASE_URL", url.as_str()),
            ("OPENAI_CONCURRENCY", "0"),
            ("CACHE_TTL", "0"),
            ("REQUEST_TIMEOUT", "120000"),
        ],
        64,
    );
    let topics: Vec<String> = (0..40).map(|i| format!("topic{i}")).collect();
    let bp = blueprint(json!({
        "name": "fan",
        "variables": { "TOPICS": topics },
        "nodes": [
            { "id": "summarize", "type": "llm", "provider": "openai", "model": "m",
              "forEach": "{{ vars.TOPICS }}", "prompt": "Two sentences on {{ item }}." },
            { "id": "digest", "type": "transform", "needs": ["summarize"], "template": "{{ nodes.summarize.output | length }} summaries" }
        ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(
        fake.peak.load(Ordering::SeqCst),
        40,
        "all 40 model calls open at the server at once"
    );
    assert_eq!(o.outputs["summarize"].as_array().unwrap().len(), 40);
    assert_eq!(o.outputs["digest"], json!("40 summaries"));
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(
        steps.iter().filter(|s| s.node_id == "summarize").count(),
        40
    );
    let item7 = steps.iter().find(|s| s.step_key == "summarize[7]").unwrap();
    assert_eq!(item7.item_index, Some(7));
    assert!(item7.input.as_ref().unwrap()["prompt"]
        .as_str()
        .unwrap()
        .contains("topic7"));
    assert_eq!(item7.tokens_used, 4);
    assert_eq!(item7.provider.as_deref(), Some("openai"));
}

/// The same prompt in a later run is answered from the cache (the model is asked once, the
/// step says it was cached); only a retry skips the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_run_of_the_same_prompt_is_answered_from_the_cache() {
    const ANSWER: &str = r#"{"choices":[{"message":{"role":"assistant","content":"kept"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    let fake = common::counting::start(std::time::Duration::ZERO, ANSWER.to_string());
    let url = format!("{}/v1", fake.url);
    let env = engine(&[("OPENAI_BASE_URL", url.as_str())], 4);
    let bp = blueprint(json!({
        "name": "cached",
        "nodes": [ { "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                     "prompt": "Two sentences on caching." } ]
    }));
    for round in 0..2 {
        let o = run(&env, &bp, RunRequest::default()).await;
        assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
        assert_eq!(o.outputs["ask"], json!("kept"));
        let steps = env.store.run_steps(&o.run_id).unwrap();
        assert_eq!(steps[0].cached, round == 1, "round {round}");
    }
    let asked: usize = fake.prompts.lock().unwrap().values().sum();
    assert_eq!(asked, 1, "the model was asked once");
}

/// An answer that failed its step (here not the JSON the node parses) is not served again to
/// the retry from the cache: the retry asks the model, and its answer is the step's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_asks_the_model_again_rather_than_the_cache() {
    let chat = |content: &str| {
        Reply::json(
            200,
            &json!({"choices": [{"message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
            .to_string(),
        )
    };
    // The first request is the provider's look at what server this is (`GET /props`).
    let server = fake_server(vec![
        Reply::json(404, "{}"),
        chat("Sure! Here it is."),
        chat(r#"{"ok": true}"#),
    ])
    .await;
    let url = format!("{}/v1", server.url);
    let env = engine(&[("OPENAI_BASE_URL", url.as_str())], 4);
    let bp = blueprint(json!({
        "name": "json-retry",
        "nodes": [ { "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                     "prompt": "Answer in JSON.", "parse": "json",
                     "retry": { "attempts": 2, "backoff": "1s" } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["ask"], json!({"ok": true}));
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!((steps[0].attempts, steps[0].cached), (2, false));
    let asked = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with("POST /v1/chat/completions"))
        .count();
    assert_eq!(asked, 2, "each attempt asked the model");
}

/// An answer the server cut off (`finish_reason: length`) fails a node with
/// `"failOnTruncation": true`, at once and without a retry (the same call stops at the same
/// limit), saying why; without it the answer is kept and the cut is recorded for `show`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_answer_fails_a_node_that_asks_for_it_without_a_retry() {
    const ANSWER: &str = r#"{"choices":[{"message":{"role":"assistant","content":"half an ans"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
    let fake = common::counting::start(std::time::Duration::ZERO, ANSWER.to_string());
    let url = format!("{}/v1", fake.url);
    let env = engine(&[("OPENAI_BASE_URL", url.as_str()), ("CACHE_TTL", "0")], 4);
    let node = |fail: bool| {
        json!({ "id": "ask", "type": "llm", "provider": "openai", "model": "m",
                "prompt": format!("Two sentences, fail {fail}."), "maxTokens": 5,
                "failOnTruncation": fail, "retry": { "attempts": 3, "backoff": "1s" } })
    };

    let o = run(
        &env,
        &blueprint(json!({ "name": "cut", "nodes": [node(true)] })),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Error, "{:?}", o.error);
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(steps[0].status, StepStatus::Error, "{steps:?}");
    assert_eq!(steps[0].attempts, 1, "not retried: {steps:?}");
    assert_eq!(
        steps[0].error_kind,
        Some(omniflow::error::ErrorKind::InvalidRequest)
    );
    let error = steps[0].error.as_deref().unwrap();
    assert!(error.contains("cut off"), "{error}");
    assert!(error.contains("maxTokens (5)"), "{error}");

    let o = run(
        &env,
        &blueprint(json!({ "name": "kept", "nodes": [node(false)] })),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["ask"], json!("half an ans"));
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert!(steps[0].truncated(), "{steps:?}");
    let asked: usize = fake.prompts.lock().unwrap().values().sum();
    assert_eq!(asked, 2, "each run asked the model once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_becomes_steps_as_workers_free_up() {
    // 2 workers: at most 2 × 2 of the run's steps are queued or running at any moment, however
    // many items the fan-out has; every item still runs, in order, and is recorded.
    let env = engine(
        &[
            ("SANDBOX_LATENCY_MS", "20000"),
            ("REQUEST_TIMEOUT", "10000"),
        ],
        2,
    );
    let bp = blueprint(json!({
        "name": "wide",
        "variables": { "N": (0..30).collect::<Vec<_>>() },
        "nodes": [
            { "id": "ask", "type": "llm", "forEach": "{{ vars.N }}", "prompt": "item {{ item }}" },
            { "id": "count", "type": "transform", "needs": ["ask"], "template": "{{ nodes.ask.output | length }}" }
        ]
    }));
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (p, s, pool) = (peak.clone(), stop.clone(), env.engine.pool().clone());
    let sampler = tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            let st = pool.stats();
            p.fetch_max(
                st.queued.iter().sum::<usize>() + st.running,
                Ordering::Relaxed,
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    });
    let o = run(&env, &bp, sandbox(0.0, 7)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let most = peak.load(Ordering::Relaxed);
    assert!(
        (1..=4).contains(&most),
        "at most 2 steps per worker in the pool, saw {most}"
    );
    assert_eq!(o.outputs["count"], json!("30"));
    let steps = env.store.run_steps(&o.run_id).unwrap();
    let items: Vec<Option<u32>> = steps
        .iter()
        .filter(|s| s.node_id == "ask")
        .map(|s| s.item_index)
        .collect();
    assert_eq!(
        items,
        (0..30).map(Some).collect::<Vec<_>>(),
        "every item recorded, in order"
    );
    assert!(steps.iter().all(|s| s.status == StepStatus::Success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_items_wait_for_a_place_in_the_window() {
    // 2 workers: a window of 4. Items that fail fast and back off long give their places to
    // new items while they sleep; back from the sleep they wait for a place, so the pool
    // never holds more than 4 of the run's steps however often they fail.
    let env = engine(
        &[("SANDBOX_LATENCY_MS", "1000"), ("REQUEST_TIMEOUT", "10000")],
        2,
    );
    let sub = env.bus.subscribe();
    let pool = env.engine.pool().clone();
    let watcher = tokio::spawn(async move {
        let (mut in_pool, mut under_way) = (0, 0);
        let mut open = std::collections::HashSet::new();
        while let Some(ev) = sub.recv().await {
            let st = pool.stats();
            in_pool = usize::max(in_pool, st.queued.iter().sum::<usize>() + st.running);
            match ev {
                Event::StepStarted { step, .. } => {
                    open.insert(step);
                    under_way = usize::max(under_way, open.len());
                }
                Event::StepFinished { step, .. } => {
                    open.remove(&step);
                }
                Event::RunFinished { .. } => break,
                _ => {}
            }
        }
        (in_pool, under_way)
    });
    let bp = blueprint(json!({
        "name": "flaky",
        "variables": { "N": (0..200).collect::<Vec<_>>() },
        "nodes": [
            { "id": "ask", "type": "llm", "forEach": "{{ vars.N }}", "prompt": "item {{ item }}",
              "continueOnError": true, "retry": { "attempts": 5, "backoff": "300s", "factor": 1 } }
        ]
    }));
    let o = run(&env, &bp, sandbox(0.6, 11)).await;
    let (in_pool, under_way) = watcher.await.unwrap();
    assert!(
        (1..=4).contains(&in_pool),
        "at most 2 steps per worker in the pool, retries included; saw {in_pool}"
    );
    // Items slept outside the window while others took their places (the bound on how many
    // may sleep, 8 per place, is the unit test's: this run does not reach it).
    assert!(
        under_way > 4,
        "no item slept outside the window: {under_way}"
    );
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(steps.len(), 200, "every item recorded");
    assert!(
        steps.iter().filter(|s| s.attempts > 1).count() > 10,
        "items were retried: {steps:?}"
    );
    assert!(steps.iter().any(|s| s.status == StepStatus::Success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_run_queues_beside_a_large_fan_out_not_behind_it() {
    // One worker, a 40-item fan-out of slow steps, then a one-step run of the same priority:
    // the second run waits for the few items already queued, not for all forty.
    let env = engine(
        &[
            ("SANDBOX_LATENCY_MS", "20000"),
            ("REQUEST_TIMEOUT", "10000"),
        ],
        1,
    );
    let sub = env.bus.subscribe();
    let wide = blueprint(json!({
        "name": "wide",
        "variables": { "N": (0..40).collect::<Vec<_>>() },
        "nodes": [ { "id": "ask", "type": "llm", "forEach": "{{ vars.N }}", "prompt": "item {{ item }}" } ]
    }));
    let small = blueprint(json!({
        "name": "small",
        "nodes": [ { "id": "hello", "type": "transform", "template": "hi" } ]
    }));
    let first = env.engine.start(wide, sandbox(0.0, 3)).unwrap();
    loop {
        if let Some(Event::StepStarted { .. }) = sub.recv().await {
            break;
        }
    }
    let second = run(&env, &small, RunRequest::default()).await;
    assert_eq!(second.status, RunStatus::Success);
    let mut wide_done_before = 0;
    while let Some(ev) = sub.try_recv() {
        match ev {
            Event::RunFinished { run_id, .. } if run_id == second.run_id => break,
            Event::StepFinished { run_id, .. } if run_id != second.run_id => wide_done_before += 1,
            _ => {}
        }
    }
    assert!(
        wide_done_before < 10,
        "the small run waited for {wide_done_before} of the fan-out's 40 items"
    );
    assert_eq!(first.wait().await.status, RunStatus::Success);
}

/// A sandbox model call streams its tokens to the bus as a real streamed call does (the
/// console shows them on the step's worker): rising counts for that run's step, the last
/// one the answer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_call_publishes_its_streamed_tokens() {
    let env = engine(
        &[("OMNIFLOW_TIME_SCALE", "1"), ("SANDBOX_LATENCY_MS", "500")],
        2,
    );
    let sub = env.bus.subscribe();
    let bp = blueprint(json!({
        "name": "streamed",
        "nodes": [ { "id": "ask", "type": "llm", "prompt": "Two sentences on rust and wasm." } ]
    }));
    let o = run(&env, &bp, sandbox(0.0, 1)).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let mut counts = Vec::new();
    while let Some(ev) = sub.try_recv() {
        if let Event::Tokens {
            run_id,
            step,
            tokens,
        } = ev
        {
            assert_eq!((run_id.as_str(), step.as_str()), (o.run_id.as_str(), "ask"));
            counts.push(tokens);
        }
    }
    let total = omniflow::providers::sandbox::estimate_tokens(o.outputs["ask"].as_str().unwrap());
    assert_eq!(counts, [total / 2, total]);
}

/// With the one worker busy, a run started at a higher priority waits in the pool at its
/// priority (what the console's queue depth shows) and takes the worker before a run of
/// normal priority queued ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_run_takes_the_next_free_worker_first() {
    use omniflow::blueprint::Priority;
    // The first run's call is answered only when the test says so.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hold", listener.local_addr().unwrap());
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let _ = common::http::read_request(&mut sock).await;
        g.notified().await;
        common::http::write_reply(&mut sock, 200, &[], "ok").await;
    });
    // Real time: the held call must not time out.
    let env = engine(&[("OMNIFLOW_TIME_SCALE", "1")], 1);
    let sub = env.bus.subscribe();
    let one_step = |name: &str| {
        blueprint(json!({
            "name": name,
            "nodes": [ { "id": "step", "type": "transform", "template": name } ]
        }))
    };
    let busy = blueprint(json!({
        "name": "busy",
        "nodes": [ { "id": "call", "type": "http", "url": url } ]
    }));
    let busy = env.engine.start(busy, RunRequest::default()).unwrap();
    loop {
        if let Some(Event::StepStarted { run_id, .. }) = sub.recv().await {
            if run_id == busy.run_id {
                break;
            }
        }
    }
    let normal = env
        .engine
        .start(one_step("normal"), RunRequest::default())
        .unwrap();
    let urgent = env
        .engine
        .start(
            one_step("urgent"),
            RunRequest {
                priority: Some(Priority::High),
                ..RunRequest::default()
            },
        )
        .unwrap();
    let mut waiting = [0; 4];
    waiting[Priority::Normal.index()] = 1;
    waiting[Priority::High.index()] = 1;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while env.engine.pool().stats().queued != waiting {
        assert!(
            std::time::Instant::now() < until,
            "not one step waiting at each priority: {:?}",
            env.engine.pool().stats().queued
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    gate.notify_one();
    let mut started = Vec::new();
    while started.len() < 2 {
        if let Some(Event::StepStarted { run_id, .. }) = sub.recv().await {
            if run_id == normal.run_id || run_id == urgent.run_id {
                started.push(if run_id == urgent.run_id {
                    "urgent"
                } else {
                    "normal"
                });
            }
        }
    }
    assert_eq!(started, ["urgent", "normal"]);
    for h in [busy, normal, urgent] {
        assert_eq!(h.wait().await.status, RunStatus::Success);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_false_condition_skips_what_depends_on_it() {
    let env = engine(&[], 8);
    let bp = blueprint(json!({
        "name": "route",
        "variables": { "LABEL": "urgent" },
        "nodes": [
            { "id": "is_urgent", "type": "condition", "expression": "vars.LABEL == 'urgent'" },
            { "id": "is_spam", "type": "condition", "expression": "vars.LABEL == 'spam'" },
            { "id": "page", "type": "transform", "needs": ["is_urgent"], "template": "paging" },
            { "id": "drop", "type": "transform", "needs": ["is_spam"], "template": "dropping" },
            { "id": "after_drop", "type": "transform", "needs": ["drop"], "template": "never" }
        ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success);
    assert_eq!(o.outputs["page"], json!("paging"));
    assert!(!o.outputs.contains_key("drop"));
    let steps = env.store.run_steps(&o.run_id).unwrap();
    let status = |k: &str| steps.iter().find(|s| s.step_key == k).unwrap().status;
    assert_eq!(status("is_spam"), StepStatus::Success);
    assert_eq!(status("drop"), StepStatus::Skipped);
    assert_eq!(status("after_drop"), StepStatus::Skipped, "skips propagate");
    assert_eq!(status("page"), StepStatus::Success);
}

/// Only a condition's false output skips what needs it: an ordinary node whose output is
/// empty or false is a value like any other, and its dependents run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_false_output_skips_nothing() {
    let env = engine(&[], 8);
    let bp = blueprint(json!({
        "name": "falsy",
        "nodes": [
            { "id": "empty", "type": "transform", "template": "" },
            { "id": "no", "type": "transform", "parse": "json", "template": "false" },
            { "id": "after", "type": "transform", "needs": ["empty", "no"],
              "template": "ran" }
        ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["empty"], json!(""));
    assert_eq!(o.outputs["no"], json!(false));
    assert_eq!(o.outputs["after"], json!("ran"));
    let steps = env.store.run_steps(&o.run_id).unwrap();
    let after = steps.iter().find(|s| s.step_key == "after").unwrap();
    assert_eq!(after.status, StepStatus::Success);
}

/// A fan-out whose items fail one after another fails the run with the first item's error,
/// the one that happened first, not whichever came last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fan_out_reports_its_first_error() {
    // One worker: the second request starts after the first has failed.
    let server = fake_server(vec![
        Reply::json(404, r#"{"error":"first failure"}"#),
        Reply::json(404, r#"{"error":"second failure"}"#),
    ])
    .await;
    let env = engine(&[], 1);
    let bp = blueprint(json!({
        "name": "fan-fail",
        "nodes": [ { "id": "fetch", "type": "http", "url": server.url.clone(),
                     "forEach": "{{ [1, 2] }}", "retry": { "attempts": 1 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(server.seen.lock().unwrap().len(), 2);
    let error = env.store.find_run(&o.run_id).unwrap().error.unwrap();
    assert!(
        error.starts_with("step fetch failed") && error.contains("first failure"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_fails_the_run_unless_it_continues_on_error() {
    let server = fake_server(vec![Reply::json(404, r#"{"error":"nope"}"#)]).await;
    let env = engine(&[], 8);
    let mk = |continue_on_error: bool| {
        blueprint(json!({
            "name": "fails",
            "nodes": [
                { "id": "fetch", "type": "http", "url": format!("{}/missing", server.url), "continueOnError": continue_on_error },
                { "id": "after", "type": "transform", "needs": ["fetch"],
                  "template": "fetch was {{ nodes.fetch.status }}, output {{ nodes.fetch.output | default('none', true) }}" }
            ]
        }))
    };
    let o = run(&env, &mk(false), RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.failed_step.as_deref(), Some("fetch"));
    assert!(o.error.as_deref().unwrap().contains("404"), "{:?}", o.error);
    let fetch = o.steps.iter().find(|s| s.node == "fetch").unwrap();
    assert_eq!(fetch.attempts, 1, "a 404 is not retried");
    let row = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(row.status, RunStatus::Error);
    assert_eq!(row.failed_step.as_deref(), Some("fetch"));
    assert_eq!(row.error_kind.map(|k| k.as_str()), Some("invalid_request"));

    let o = run(&env, &mk(true), RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["after"], json!("fetch was error, output none"));
}

/// Variables given at the start (`--var`) may outweigh the blueprint itself: a 100-item
/// list over a one-item default runs, each item in its own step, and the counters arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_given_at_the_start_may_outweigh_the_blueprint() {
    let env = engine(&[], 8);
    let bp = blueprint(json!({
        "name": "small",
        "variables": { "T": ["a"] },
        "nodes": [ { "id": "each", "type": "transform", "forEach": "{{ vars.T }}",
                     "template": "{{ item }}" } ]
    }));
    let many: Vec<String> = (0..100).map(|i| format!("topic number {i:03}")).collect();
    let mut req = RunRequest::default();
    req.variables.insert("T".into(), json!(many));
    let o = run(&env, &bp, req).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let row = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(row.steps_done, Some(100));
    assert_eq!(env.store.run_steps(&o.run_id).unwrap().len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_and_every_attempt_is_recorded() {
    let server = fake_server(vec![
        Reply::json(503, r#"{"error":"busy"}"#),
        Reply {
            status: 429,
            headers: vec![("Retry-After".into(), "2".into())],
            body: "slow down".into(),
        },
        Reply::json(200, r#"{"items":[{"title":"first"}]}"#),
    ])
    .await;
    let env = engine(&[], 8);
    let bp = blueprint(json!({
        "name": "flaky",
        "nodes": [
            { "id": "fetch", "type": "http", "url": server.url.clone() },
            { "id": "title", "type": "transform", "needs": ["fetch"], "template": "{{ nodes.fetch.output.items[0].title }}" }
        ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["title"], json!("first"));
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    let fetch: Vec<_> = attempts.iter().filter(|a| a.step_key == "fetch").collect();
    assert_eq!(fetch.len(), 3);
    assert_eq!(fetch[0].error_kind.map(|k| k.as_str()), Some("server"));
    assert!(
        (900..=1100).contains(&fetch[0].wait_ms.unwrap()),
        "1 s backoff ± jitter"
    );
    assert_eq!(
        fetch[1].error_kind.map(|k| k.as_str()),
        Some("rate_limited")
    );
    assert_eq!(fetch[1].wait_ms, Some(2000), "Retry-After wins");
    assert!(fetch[2].ok);
    assert_eq!(server.seen.lock().unwrap().len(), 3);
    // `runs`/`show` list the step's provider: an HTTP call is "http".
    let steps = env.store.run_steps(&o.run_id).unwrap();
    let step = steps.iter().find(|s| s.step_key == "fetch").unwrap();
    assert_eq!(step.provider.as_deref(), Some("http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_errors_are_never_retried() {
    let server = fake_server(vec![Reply::json(401, r#"{"error":"Invalid credentials"}"#)]).await;
    let env = engine(&[], 8);
    let bp = blueprint(json!({
        "name": "auth",
        "nodes": [ { "id": "fetch", "type": "http", "url": server.url.clone() } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.error_kind, Some(omniflow::error::ErrorKind::Auth));
    assert_eq!(server.seen.lock().unwrap().len(), 1);
}

/// The error `show` prints for a step whose retries ran out says how many attempts were made;
/// a step that was never retried (one attempt allowed, or an error that is not retried after
/// a retryable one) does not claim to have given up after retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_ran_out_of_retries_says_how_many_attempts_it_made() {
    let env = engine(&[], 8);
    let error_of = |run_id: &str| {
        let steps = env.store.run_steps(run_id).unwrap();
        let run = env.store.find_run(run_id).unwrap();
        (
            steps[0].attempts,
            steps[0].error.clone().unwrap(),
            run.error.unwrap(),
        )
    };

    let busy = fake_server(vec![Reply::json(503, r#"{"error":"busy"}"#)]).await;
    let bp = blueprint(json!({
        "name": "exhausted",
        "nodes": [ { "id": "fetch", "type": "http", "url": busy.url.clone(),
                     "retry": { "attempts": 3 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    let (attempts, step_error, run_error) = error_of(&o.run_id);
    assert_eq!(attempts, 3);
    assert!(
        step_error.ends_with("(gave up after 3 attempts)"),
        "{step_error}"
    );
    assert!(
        run_error.contains("(gave up after 3 attempts)"),
        "{run_error}"
    );

    let bp = blueprint(json!({
        "name": "once",
        "nodes": [ { "id": "fetch", "type": "http", "url": busy.url.clone(),
                     "retry": { "attempts": 1 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    let (attempts, step_error, _) = error_of(&o.run_id);
    assert_eq!(attempts, 1);
    assert!(!step_error.contains("gave up"), "{step_error}");

    let then_auth = fake_server(vec![
        Reply::json(503, r#"{"error":"busy"}"#),
        Reply::json(401, r#"{"error":"Invalid credentials"}"#),
    ])
    .await;
    let bp = blueprint(json!({
        "name": "then-auth",
        "nodes": [ { "id": "fetch", "type": "http", "url": then_auth.url.clone(),
                     "retry": { "attempts": 5 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    let (attempts, step_error, _) = error_of(&o.run_id);
    assert_eq!(attempts, 2);
    assert_eq!(o.error_kind, Some(omniflow::error::ErrorKind::Auth));
    assert!(!step_error.contains("gave up"), "{step_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_failures_recover_and_are_recorded_per_attempt() {
    let env = engine(&[("SANDBOX_LATENCY_MS", "1000")], 32);
    let topics: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    let bp = blueprint(json!({
        "name": "chaos",
        "variables": { "TOPICS": topics },
        "defaults": { "retry": { "attempts": 8 } },
        "nodes": [
            { "id": "summarize", "type": "llm", "forEach": "{{ vars.TOPICS }}", "prompt": "On {{ item }}" }
        ]
    }));
    let o = run(&env, &bp, sandbox(0.3, 42)).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.seed, Some(42));
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.len() >= 5,
        "about 30% of ~57 attempts fail, got {}",
        failed.len()
    );
    for a in &failed {
        assert!(a.error_kind.is_some() && a.error.is_some());
        assert!(
            a.wait_ms.is_some(),
            "each recovered failure records its wait"
        );
    }
    let kinds: std::collections::HashSet<_> = failed
        .iter()
        .filter_map(|a| a.error_kind.map(|k| k.as_str()))
        .collect();
    assert!(kinds.len() >= 3, "several kinds injected: {kinds:?}");

    // The same seed injects the same failures.
    let again = run(&env, &bp, sandbox(0.3, 42)).await;
    let again_attempts = env.store.run_attempts(&again.run_id).unwrap();
    let sig = |v: &Vec<omniflow::store::AttemptRow>| {
        let mut s: Vec<_> = v
            .iter()
            .map(|a| {
                (
                    a.step_key.clone(),
                    a.attempt,
                    a.error_kind.map(|k| k.as_str()),
                )
            })
            .collect();
        s.sort();
        s
    };
    assert_eq!(sig(&attempts), sig(&again_attempts));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timeout_really_stops_the_work() {
    let env = engine(&[], 8);
    // A server that accepts the connection and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // accept and never answer
        }
    });
    let hang = blueprint(json!({
        "name": "hang",
        "nodes": [ { "id": "fetch", "type": "http", "url": format!("http://{addr}/"), "timeout": "5s",
                     "retry": { "attempts": 2, "backoff": "1s" } } ]
    }));
    let o = run(&env, &hang, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.error_kind, Some(omniflow::error::ErrorKind::Timeout));
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(attempts
        .iter()
        .all(|a| a.error_kind.map(|k| k.as_str()) == Some("timeout")));
    assert_eq!(
        attempts[0].error.as_deref(),
        Some(
            "the step timed out after 5s and was stopped; raise the node's \"timeout\" (or REQUEST_TIMEOUT)"
        )
    );

    // A model call that never answers says so, and what to try.
    let env = engine(
        &[
            ("USE_OLLAMA", "true"),
            ("OLLAMA_URL", &format!("http://{addr}")),
        ],
        8,
    );
    let ask = blueprint(json!({
        "name": "hang",
        "nodes": [ { "id": "ask", "type": "llm", "provider": "ollama", "model": "m",
                     "prompt": "hi", "timeout": "5s", "retry": { "attempts": 1 } } ]
    }));
    let o = run(&env, &ask, RunRequest::default()).await;
    assert_eq!(o.error_kind, Some(omniflow::error::ErrorKind::Timeout));
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    assert_eq!(
        attempts[0].error.as_deref(),
        Some(
            "the model call timed out after 5s and was stopped (REQUEST_TIMEOUT or the node's \"timeout\"); raise it if the model is just slow, or pick a smaller model"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_stops_it_and_records_cancelled() {
    let env = engine(&[("OMNIFLOW_TIME_SCALE", "1")], 8);
    let bp = blueprint(json!({
        "name": "long",
        "nodes": [
            { "id": "wait", "type": "delay", "duration": "1h" },
            { "id": "after", "type": "transform", "needs": ["wait"], "template": "x" }
        ]
    }));
    let sub = env.bus.subscribe();
    let h = env.engine.start(bp, RunRequest::default()).unwrap();
    // Cancelled the way `omniflow run`'s Ctrl-C does it: through a token taken from the
    // handle, whose `wait` goes on elsewhere.
    let token = h.cancel_token();
    // Wait until the delay is running, then cancel.
    loop {
        if let Some(Event::StepStarted { step, .. }) = sub.recv().await {
            if step == "wait" {
                break;
            }
        }
    }
    token.cancel();
    let o = tokio::time::timeout(std::time::Duration::from_secs(60), h.wait())
        .await
        .expect("the cancelled run ends (its delay is an hour)");
    assert_eq!(o.status, RunStatus::Cancelled);
    let row = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(row.status, RunStatus::Cancelled);
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(steps[0].status, StepStatus::Cancelled);
    assert!(
        steps.iter().all(|s| s.step_key != "after"),
        "nothing after a cancel starts"
    );
    assert_eq!(env.engine.pool().stats().running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_block_the_pool() {
    let env = engine(&[], 4);
    let stalled = env.bus.subscribe(); // never read until the end
    let watcher = env.bus.subscribe();
    let bp = blueprint(json!({
        "name": "busy",
        "variables": { "N": (0..3000).collect::<Vec<_>>() },
        "nodes": [ { "id": "each", "type": "transform", "forEach": "{{ vars.N }}", "template": "{{ item }}" } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success);
    // Far more events than the subscriber's channel holds were published …
    assert!(env.bus.published() > 3 * omniflow::events::CHANNEL_CAP as u64);
    // … progress events were dropped for the stalled one, lifecycle events all kept in order.
    let mut finished = 0;
    while let Some(ev) = stalled.try_recv() {
        if matches!(ev, Event::StepFinished { .. }) {
            finished += 1;
        }
    }
    assert_eq!(finished, 3000);
    assert!(stalled.dropped() > 0);
    drop(watcher);
}

/// A forEach over an empty list is done at once with an empty output, and what needs it
/// runs on it; no step is recorded for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_for_each_over_an_empty_list_is_done_with_an_empty_output() {
    let env = engine(&[], 2);
    let bp = blueprint(json!({
        "name": "empty", "variables": { "TOPICS": [] },
        "nodes": [
            { "id": "each", "type": "transform", "forEach": "{{ vars.TOPICS }}",
              "template": "{{ item }}" },
            { "id": "after", "type": "transform", "needs": ["each"],
              "template": "{{ nodes.each.output | length }} items" }
        ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["each"], json!([]));
    assert_eq!(o.outputs["after"], json!("0 items"));
    let steps = env.store.run_steps(&o.run_id).unwrap();
    let keys: Vec<_> = steps.iter().map(|s| s.step_key.as_str()).collect();
    assert_eq!(keys, ["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_variables_are_refused_before_anything_is_recorded() {
    let env = engine(&[], 2);
    let bp = blueprint(json!({
        "name": "v", "variables": { "TOPICS": [] },
        "nodes": [ { "id": "a", "type": "transform", "template": "x" } ]
    }));
    let mut req = RunRequest::default();
    req.variables.insert("TOPIX".into(), json!(1));
    let err = env.engine.start(bp, req).err().unwrap();
    assert!(err.to_string().contains("declared: TOPICS"), "{err}");
    let rows = env.store.list_runs(&Default::default()).unwrap();
    assert!(rows.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_errors_fail_the_step_with_a_clear_message() {
    let env = engine(&[], 2);
    let bp = blueprint(json!({
        "name": "t",
        "nodes": [ { "id": "a", "type": "transform", "template": "{{ vars.MISSING.deeper }}" } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.error_kind, Some(omniflow::error::ErrorKind::Template));
    assert!(
        o.error.as_deref().unwrap().contains("a.template"),
        "{:?}",
        o.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_honours_its_own_timeout() {
    let env = engine(&[], 4);
    let bp = blueprint(json!({
        "name": "slow",
        "nodes": [ { "id": "wait", "type": "delay", "duration": "1h", "timeout": "2s",
                     "retry": { "attempts": 1 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.error_kind, Some(omniflow::error::ErrorKind::Timeout));
}

/// A run of the one node `node` (a JSON node with its `id`), once its step has started.
async fn started_alone(env: &Env, node: serde_json::Value) -> omniflow::engine::RunHandle {
    let id = node["id"].as_str().expect("the node has an id").to_string();
    let bp = blueprint(json!({ "name": "alone", "nodes": [node] }));
    let sub = env.bus.subscribe();
    let h = env.engine.start(bp, RunRequest::default()).unwrap();
    loop {
        if let Some(Event::StepStarted { step, .. }) = sub.recv().await {
            if step == id {
                return h;
            }
        }
    }
}

/// A run of one step that waits an hour (a delay), once that step has started.
async fn waiting_an_hour(env: &Env) -> omniflow::engine::RunHandle {
    started_alone(
        env,
        json!({ "id": "wait", "type": "delay", "duration": "1h" }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_hands_a_waiting_delay_over_without_its_grace() {
    let env = engine(&[("OMNIFLOW_TIME_SCALE", "1")], 4);
    let h = waiting_an_hour(&env).await;
    assert!(!env.engine.is_draining(), "draining before a shutdown");
    // A grace of an hour: only a delay that gives way lets this return.
    let released = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        env.engine.shutdown(std::time::Duration::from_secs(3600)),
    )
    .await
    .expect("the shutdown waited out its grace for a delay");
    assert_eq!(released, vec![h.run_id.clone()]);
    // What `/readyz` and the console report from now on.
    assert!(env.engine.is_draining());
    let o = h.wait().await;
    assert_eq!(o.status, RunStatus::Running, "handed over, not finished");
    // What `show` and the next owner read: the run and its step still under way, not the
    // step cancelled by the handover.
    env.store.flush().await;
    let row = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(row.status, RunStatus::Running);
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].status, StepStatus::Running, "{:?}", steps[0].error);
}

/// A process that finds at its heartbeat that another one took a run of its over (it missed
/// its lease: paused, or cut off from the database) stops driving that run: the run is left
/// to its new owner, not finished or recorded further here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_another_process_took_over_is_let_go_at_the_next_heartbeat() {
    // Heartbeats every second (a third of the lease).
    let env = engine(&[("OMNIFLOW_TIME_SCALE", "1"), ("LEASE_TIMEOUT", "3")], 2);
    let _maintenance = env.engine.start_maintenance(false);
    let h = waiting_an_hour(&env).await;
    env.store.flush().await;
    let conn = rusqlite::Connection::open(env.store.path().unwrap()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    conn.execute(
        "UPDATE runner_executions SET owner = 'elsewhere:1:1' WHERE id = ?1",
        [&h.run_id],
    )
    .unwrap();
    let o = tokio::time::timeout(std::time::Duration::from_secs(30), h.wait())
        .await
        .expect("the run taken over was still driven here");
    assert_eq!(o.status, RunStatus::Running, "let go, not finished");
    env.store.flush().await;
    let (status, owner): (String, String) = conn
        .query_row(
            "SELECT status, owner FROM runner_executions WHERE id = ?1",
            [&o.run_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (status.as_str(), owner.as_str()),
        ("running", "elsewhere:1:1")
    );
}

/// A shutdown's log (a daemon's stderr on SIGTERM) says the grace ended with attempts still
/// in flight when it did, which explains the steps handed over, and not when nothing was
/// running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_says_its_grace_ended_with_attempts_in_flight_only_when_it_did() {
    const ENDED: &str = "shutdown: the grace period ended with attempts still in flight";
    // `shutdown` logs on the thread that awaits it: this one.
    let logged = omniflow::logging::capture::Captured::start(tracing::Level::INFO);
    let idle = engine(&[], 2);
    assert!(idle
        .engine
        .shutdown(std::time::Duration::ZERO)
        .await
        .is_empty());
    assert!(!logged.text().contains(ENDED), "{}", logged.text());

    // A server that accepts and never answers: the call is in flight until stopped.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow", silent.local_addr().unwrap());
    let env = engine(&[], 2);
    let h = started_alone(&env, json!({ "id": "fetch", "type": "http", "url": url })).await;
    let released = env.engine.shutdown(std::time::Duration::ZERO).await;
    assert_eq!(released, vec![h.run_id.clone()]);
    assert!(logged.text().contains(ENDED), "{}", logged.text());
}

/// A signal's shutdown runs on a task of its own while the command waits for its runs; the
/// command then calls `stopped`, which returns only once that shutdown has ended (the
/// handover recorded and said), not while it still gives the steps in flight their grace:
/// the command would exit under it. (One thread: the shutdown's task has finished its
/// turn by the time `stopped` resumes.)
#[tokio::test]
async fn stopped_waits_for_a_shutdown_under_way() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow", silent.local_addr().unwrap());
    let env = engine(&[], 2);
    let h = started_alone(&env, json!({ "id": "fetch", "type": "http", "url": url })).await;
    let (done, handed_over) = tokio::sync::oneshot::channel();
    let engine = env.engine.clone();
    tokio::spawn(async move {
        let released = engine.shutdown(std::time::Duration::from_millis(300)).await;
        let _ = done.send(released);
    });
    // Let the shutdown begin, as a signal handler's task would before the runs end.
    tokio::task::yield_now().await;
    env.engine.stopped().await;
    let mut handed_over = handed_over;
    assert_eq!(
        handed_over.try_recv(),
        Ok(vec![h.run_id.clone()]),
        "stopped returned before the shutdown had handed the run over"
    );
}

/// A resumed step goes on with its retries where they stopped: the attempts made before the
/// handover count against its budget and its numbering continues. Allowed two attempts, a
/// step that failed once before the handover is given up after one more, "after 2 attempts",
/// instead of starting over with a fresh budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_step_goes_on_with_its_retries_where_they_stopped() {
    let env = engine(&[("OMNIFLOW_TIME_SCALE", "1")], 2);
    let busy = fake_server(vec![Reply::json(503, r#"{"error":"busy"}"#)]).await;
    // The server's address is the run's own variable: the blueprint's default points nowhere,
    // so a resumed run that forgot its variables would call nothing that answers.
    let bp = blueprint(json!({
        "name": "flaky",
        "variables": { "URL": "http://127.0.0.1:9/nothing-listens-here" },
        "nodes": [ { "id": "fetch", "type": "http", "url": "{{ vars.URL }}",
                     "retry": { "attempts": 2, "backoff": "1h", "jitter": 0 } } ]
    }));
    let sub = env.bus.subscribe();
    let mut req = RunRequest::default();
    req.variables.insert("URL".into(), json!(busy.url.clone()));
    let h = env.engine.start(bp, req).unwrap();
    // The first attempt failed; the step waits an hour for its second, and is handed over.
    loop {
        if let Some(Event::StepRetrying { step, attempt, .. }) = sub.recv().await {
            assert_eq!((step.as_str(), attempt), ("fetch", 1));
            break;
        }
    }
    let run_id = h.run_id.clone();
    assert_eq!(
        env.engine.shutdown(std::time::Duration::ZERO).await,
        vec![run_id.clone()]
    );
    h.wait().await;

    // The next process on the same history resumes it.
    let vars: std::collections::HashMap<String, String> = [
        ("DB_FILE", env.dir.path().join("history.db")),
        ("LOG_DIR", env.dir.path().join("logs")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.display().to_string()))
    .collect();
    let config = omniflow::config::Config::from_vars(&vars).unwrap();
    let store = omniflow::store::Store::open(&config.db_file).unwrap();
    let bus = omniflow::events::EventBus::new();
    let next = omniflow::engine::Engine::new(Arc::new(config), store.clone(), bus.clone());
    let sub = bus.subscribe();
    let resumed = next.resume(&run_id).await.unwrap();
    // Its one attempt left fails, and that is the end of the step (not a retry).
    let status = loop {
        match sub.recv().await {
            Some(Event::StepRetrying { attempt, .. }) => {
                panic!("the resumed step was retried as its attempt {attempt}")
            }
            Some(Event::RunFinished { status, .. }) => break status,
            _ => {}
        }
    };
    assert_eq!(status, RunStatus::Error);
    resumed.wait().await;
    let steps = store.run_steps(&run_id).unwrap();
    assert_eq!(steps[0].attempts, 2);
    let error = steps[0].error.clone().unwrap();
    assert!(error.ends_with("(gave up after 2 attempts)"), "{error}");
    assert_eq!(
        busy.seen.lock().unwrap().len(),
        2,
        "the resumed attempt went to the run's URL"
    );
}

/// A shutdown gives its grace to the work in flight and returns when that ends, not later:
/// here the run's last step is done and its driver is sending the run's notification when
/// the shutdown begins. The notification is held by the fake Telegram; once it is answered,
/// the run finishes (it is not handed over half-notified) and the shutdown, with a grace of
/// an hour, returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_returns_when_the_work_in_flight_ends() {
    shutdown_with_a_notification_in_flight(
        std::time::Duration::from_secs(3600),
        std::time::Duration::from_secs(1),
    )
    .await;
}

/// A grace too long for the clock to add (`SHUTDOWN_GRACE=99999999999`: no limit) waits for
/// the work in flight too, here for longer than a few seconds, and still returns when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_without_a_time_limit_waits_for_the_work_in_flight() {
    shutdown_with_a_notification_in_flight(
        std::time::Duration::MAX,
        std::time::Duration::from_secs(3),
    )
    .await;
}

/// A shutdown with `grace` while a finished run's notification is held by the fake Telegram
/// for `held` (the shutdown must not return meanwhile), then answered: the run finishes,
/// nothing is handed over.
async fn shutdown_with_a_notification_in_flight(
    grace: std::time::Duration,
    held: std::time::Duration,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let req = http::read_request(&mut sock).await;
        let _ = got_tx.send(req);
        let _ = answer_rx.await;
        let ok = r#"{"ok":true,"result":{"message_id":7}}"#;
        http::write_reply(&mut sock, 200, &[], ok).await;
    });
    let env = engine(
        &[
            ("TELEGRAM_BOT_TOKEN", "123:secret"),
            ("TELEGRAM_CHAT_ID", "42"),
            ("TELEGRAM_API_URL", url.as_str()),
        ],
        2,
    );
    let bp = blueprint(json!({
        "name": "told",
        "notify": { "onSuccess": ["telegram"] },
        "nodes": [ { "id": "a", "type": "transform", "template": "x" } ]
    }));
    let h = env.engine.start(bp, RunRequest::default()).unwrap();
    let req = got_rx
        .await
        .unwrap()
        .expect("the run's notification is sent");
    assert!(req.body.contains("told"), "{}", req.body);

    let engine = env.engine.clone();
    let mut shutdown = tokio::spawn(async move { engine.shutdown(grace).await });
    // Held, the notification keeps the shutdown waiting (it cannot end before it).
    let early = tokio::time::timeout(held, &mut shutdown).await;
    assert!(
        early.is_err(),
        "the shutdown returned while the run was still notifying: {early:?}"
    );
    answer_tx.send(()).unwrap();
    let released = tokio::time::timeout(std::time::Duration::from_secs(120), shutdown)
        .await
        .expect("the shutdown waited out its grace")
        .unwrap();
    assert!(
        released.is_empty(),
        "a finished run was handed over: {released:?}"
    );
    let o = h.wait().await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(
        env.store.find_run(&o.run_id).unwrap().status,
        RunStatus::Success
    );
    assert_eq!(env.store.notifications_of(&o.run_id).unwrap().len(), 1);
}

/// Durations are parsed once, when a blueprint loads: one too large for the clock is refused
/// there with the validator's words (a library caller or an old run's snapshot cannot slip it
/// past), and the longest allowed, 30 days, neither panics nor ends anything early: a run
/// timeout that far is no deadline, a retry backoff that long waits until the run is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_beyond_the_clock_do_not_panic() {
    for field in [
        json!({ "name": "far", "timeout": "213503982334601d", "nodes": [] }),
        json!({ "name": "far", "nodes": [ { "id": "a", "type": "delay", "duration": "213503982334601d" } ] }),
    ] {
        let err = serde_json::from_value::<omniflow::blueprint::Blueprint>(field)
            .expect_err("refused at load");
        assert!(err.to_string().contains("longer than 30 days"), "{err}");
    }

    // Real time: scaled down, the durations would fit the clock.
    let env = engine(&[("OMNIFLOW_TIME_SCALE", "1")], 4);
    let bp = blueprint(json!({
        "name": "far",
        "timeout": "30d",
        "nodes": [ { "id": "a", "type": "transform", "template": "x" } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);

    let server = fake_server(vec![Reply::json(500, "{}"); 4]).await;
    let bp = blueprint(json!({
        "name": "backoff",
        "nodes": [ { "id": "get", "type": "http", "url": server.url.clone(),
                     "retry": { "attempts": 3, "backoff": "30d", "maxDelay": "30d" } } ]
    }));
    let sub = env.bus.subscribe();
    let h = env.engine.start(bp, RunRequest::default()).unwrap();
    loop {
        if let Some(Event::StepRetrying { .. }) = sub.recv().await {
            break;
        }
    }
    h.cancel();
    let o = h.wait().await;
    assert_eq!(o.status, RunStatus::Cancelled, "{:?}", o.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_budgets_fail_the_run_with_their_setting() {
    let env = engine(
        &[
            ("MAX_ITEMS", "5"),
            ("MAX_NODES", "3"),
            ("MAX_VARIABLE_BYTES", "100"),
        ],
        4,
    );
    let fan = blueprint(json!({
        "name": "fan",
        "nodes": [ { "id": "f", "type": "transform", "forEach": "{{ range(6) | list }}",
                     "template": "{{ item }}" } ]
    }));
    let o = run(&env, &fan, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert!(
        o.error.as_deref().unwrap().contains("MAX_ITEMS"),
        "{:?}",
        o.error
    );
    // Exactly MAX_ITEMS is within the budget.
    let fan = blueprint(json!({
        "name": "fan",
        "nodes": [ { "id": "f", "type": "transform", "forEach": "{{ range(5) | list }}",
                     "template": "{{ item }}" } ]
    }));
    let o = run(&env, &fan, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["f"], json!(["0", "1", "2", "3", "4"]));

    let many = blueprint(json!({
        "name": "many",
        "nodes": (0..4).map(|i| json!({ "id": format!("n{i}"), "type": "transform", "template": "x" }))
            .collect::<Vec<_>>()
    }));
    let e = env.engine.start(many, RunRequest::default()).err().unwrap();
    assert!(e.to_string().contains("MAX_NODES"), "{e}");

    let big = blueprint(json!({
        "name": "big",
        "variables": { "TEXT": "x".repeat(200) },
        "nodes": [ { "id": "a", "type": "transform", "template": "{{ vars.TEXT }}" } ]
    }));
    let e = env.engine.start(big, RunRequest::default()).err().unwrap();
    assert!(e.to_string().contains("MAX_VARIABLE_BYTES"), "{e}");
    // 61 bytes of JSON, but 30 values: each item counts beside its text.
    let many = blueprint(json!({
        "name": "many-items",
        "variables": { "L": vec![0; 30] },
        "nodes": [ { "id": "a", "type": "transform", "template": "{{ vars.L | length }}" } ]
    }));
    let e = env.engine.start(many, RunRequest::default()).err().unwrap();
    assert!(e.to_string().contains("MAX_VARIABLE_BYTES"), "{e}");
    let few = blueprint(json!({
        "name": "few-items",
        "variables": { "L": vec![0; 4] },
        "nodes": [ { "id": "a", "type": "transform", "template": "{{ vars.L | length }}" } ]
    }));
    let o = run(&env, &few, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
}

/// The history's progress counters do not wait for the next step's end: two steps that end
/// together write the first count at once and the second when the write interval is up,
/// while a long step after them is still running (`show` and other processes' consoles read
/// these counters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_counters_reach_the_history_while_a_long_step_runs() {
    let env = engine(&[], 4);
    let bp = blueprint(json!({
        "name": "progress",
        "nodes": [
            { "id": "a", "type": "transform", "template": "a" },
            { "id": "b", "type": "transform", "template": "b" },
            // An hour scaled down 1000×: 3.6 s, far beyond the 200 ms write interval.
            { "id": "wait", "type": "delay", "duration": "1h", "needs": ["a", "b"] }
        ]
    }));
    let handle = env.engine.start(bp, RunRequest::default()).unwrap();
    let id = handle.run_id.clone();
    let mut seen_while_running = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        env.store.flush().await;
        let row = env.store.find_run(&id).unwrap();
        if row.status != RunStatus::Running && row.status != RunStatus::Queued {
            break;
        }
        if row.steps_done == Some(2) {
            seen_while_running = Some(row.steps_done);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen_while_running,
        Some(Some(2)),
        "both quick steps were counted in the history before the long step ended"
    );
    let o = handle.wait().await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(env.store.find_run(&id).unwrap().steps_done, Some(3));
}

/// A run is over when its history is: by the time the run is announced finished (the console
/// then reloads it from the database, `omniflow run` prints it), the rows of its steps are
/// committed. Another connection holds the database's write lock until the run's step has
/// ended, so that commit can only come after the step's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_announced_finished_only_once_its_steps_are_committed() {
    let env = engine(&[], 4);
    let path = env.store.path().unwrap().to_path_buf();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let sub = env.bus.subscribe();
    let bp = blueprint(json!({
        "name": "one",
        "nodes": [ { "id": "a", "type": "transform", "template": "x" } ]
    }));
    let h = env.engine.start(bp, RunRequest::default()).unwrap();
    loop {
        if let Some(Event::StepFinished { step, .. }) = sub.recv().await {
            if step == "a" {
                break;
            }
        }
    }
    other.execute_batch("COMMIT").unwrap();
    loop {
        if let Some(Event::RunFinished { run_id, .. }) = sub.recv().await {
            if run_id == h.run_id {
                break;
            }
        }
    }
    let status: Option<String> = other
        .query_row(
            "SELECT status FROM runner_steps WHERE run_id = ?1 AND step_key = 'a'",
            [&h.run_id],
            |r| r.get(0),
        )
        .ok();
    assert_eq!(status.as_deref(), Some("success"));
    assert_eq!(h.wait().await.status, RunStatus::Success);
}

/// A cancelled run ends `cancelled`, also when a step that was still to start fails on its
/// way out (here a fan-out item whose URL does not render): what a cancel stops is not
/// reported as the run's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_stays_cancelled_when_a_later_step_fails_on_its_way_out() {
    // A server that accepts and never answers: the first item is in flight until cancelled.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    // One worker: two items under way, the third waits in the run until there is room.
    let env = engine(&[("OMNIFLOW_TIME_SCALE", "1")], 1);
    let bp = blueprint(json!({
        "name": "cancel-fan",
        "variables": { "ITEMS": [ { "u": url.clone() }, { "u": url }, { "none": 1 } ] },
        "nodes": [ { "id": "fetch", "type": "http", "url": "{{ item.u }}",
                     "forEach": "{{ vars.ITEMS }}" } ]
    }));
    let sub = env.bus.subscribe();
    let h = env.engine.start(bp, RunRequest::default()).unwrap();
    loop {
        if let Some(Event::StepStarted { step, .. }) = sub.recv().await {
            if step == "fetch[0]" {
                break;
            }
        }
    }
    h.cancel();
    let o = h.wait().await;
    assert_eq!(o.status, RunStatus::Cancelled, "{:?}", o.error);
    let row = env.store.find_run(&o.run_id).unwrap();
    assert_eq!(row.status, RunStatus::Cancelled, "{:?}", row.error);
}

/// An HTTP node's `response`: `json` parses what the server sent whatever its content type
/// says (APIs that answer JSON as `text/plain`), `text` keeps it as text even when it is
/// JSON, and `auto` (the default) goes by the content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_node_reads_its_answer_as_its_response_setting_says() {
    let body = r#"{"items":[1,2]}"#;
    let plain = fake_server(vec![Reply {
        status: 200,
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: body.into(),
    }])
    .await;
    let json = fake_server(vec![Reply::json(200, body)]).await;
    let env = engine(&[], 4);
    let bp = blueprint(json!({
        "name": "responses",
        "nodes": [
            { "id": "as_json", "type": "http", "url": plain.url.clone(), "response": "json" },
            { "id": "as_text", "type": "http", "url": json.url.clone(), "response": "text" },
            { "id": "auto_json", "type": "http", "url": json.url.clone() },
            { "id": "auto_text", "type": "http", "url": plain.url.clone() }
        ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["as_json"], json!({ "items": [1, 2] }));
    assert_eq!(o.outputs["as_text"], json!(body));
    assert_eq!(o.outputs["auto_json"], json!({ "items": [1, 2] }));
    assert_eq!(o.outputs["auto_text"], json!(body));
}

/// Retrying a failed run (the console's `r`, `omniflow retry`): the new run runs as the old
/// one did (its variables, the sandbox and its failure rate, its priority), says it is a retry
/// of it, and with only the failed steps asked for, reuses the steps that succeeded. Its seed
/// is a fresh one: the old seed would inject the very failure being retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_runs_as_the_failed_run_did_and_reuses_its_successful_steps() {
    use omniflow::blueprint::Priority;
    use omniflow::engine::{retry_plan, Trigger};
    let env = engine(&[], 8);
    let bp = blueprint(json!({
        "name": "two-steps",
        "variables": { "WHO": "the blueprint's" },
        "nodes": [
            { "id": "a", "type": "transform", "template": "from a, for {{ vars.WHO }}" },
            { "id": "b", "type": "llm", "needs": ["a"], "prompt": "{{ nodes.a.output }}",
              "retry": { "attempts": 1 } }
        ]
    }));
    let mut first = sandbox(1.0, 7);
    first.priority = Some(Priority::High);
    first
        .variables
        .insert("WHO".into(), json!("given at the start"));
    let failed = run(&env, &bp, first).await;
    assert_eq!(failed.status, RunStatus::Error);
    let plan = |id: &str, only_failed: bool| {
        let (store, id) = (env.store.clone(), id.to_string());
        tokio::task::spawn_blocking(move || retry_plan(&store, &id, only_failed))
    };
    let (plan_bp, req) = plan(&failed.run_id, true).await.unwrap().unwrap();
    assert_eq!(plan_bp.name, "two-steps");
    // One comparison, so a difference in any of them shows them all.
    assert_eq!(
        (
            req.variables.get("WHO"),
            req.sandbox,
            req.simulate_failures,
            req.seed,
            req.priority,
            req.trigger,
            req.parent_run_id.as_deref(),
            &req.reuse,
        ),
        (
            Some(&json!("given at the start")),
            true,
            1.0,
            None,
            Some(Priority::High),
            Trigger::Retry,
            Some(failed.run_id.as_str()),
            // Only the successful step is reused.
            &[("a".to_string(), json!("from a, for given at the start"))].into(),
        )
    );

    // The retry, once the model stops failing: recorded as a retry of the failed run.
    let mut req = req;
    req.simulate_failures = 0.0;
    let retried = env.engine.start(plan_bp, req).unwrap().wait().await;
    assert_eq!(retried.status, RunStatus::Success, "{:?}", retried.error);
    let row = env.store.find_run(&retried.run_id).unwrap();
    assert_eq!(row.trigger, "retry");
    assert_eq!(row.parent_run_id.as_deref(), Some(failed.run_id.as_str()));
    assert_eq!(row.priority, Priority::High);
    assert!(row.sandbox);
    assert_eq!(row.variables["WHO"], json!("given at the start"));

    // A whole retry reuses nothing; a run that succeeded is not retried.
    let (_, whole) = plan(&failed.run_id, false).await.unwrap().unwrap();
    assert!(whole.reuse.is_empty());
    let refused = plan(&retried.run_id, false).await.unwrap().unwrap_err();
    assert!(
        refused.contains("only a failed or cancelled run can be retried"),
        "{refused}"
    );
}

/// `--var K=V`: the value is JSON when it parses as JSON, else text; the key is trimmed, and
/// an empty key is refused with the form expected.
#[test]
fn a_var_argument_needs_a_key() {
    use omniflow::engine::parse_var_arg;
    assert_eq!(
        parse_var_arg(r#"TOPICS=["rust","wasm"]"#),
        Ok(("TOPICS".to_string(), json!(["rust", "wasm"])))
    );
    assert_eq!(
        parse_var_arg(" WHO =a=b"),
        Ok(("WHO".to_string(), json!("a=b")))
    );
    for bad in ["=x", "  =x", "no-equals"] {
        let e = parse_var_arg(bad).unwrap_err();
        assert!(e.contains("expected KEY=VALUE"), "{bad}: {e}");
    }
}

/// The bus the engine hands out (the metrics recorder and embedders subscribe to it) carries
/// its runs' events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_bus_carries_its_runs_events() {
    let env = engine(&[], 2);
    let sub = env.engine.bus().subscribe();
    let bp = blueprint(json!({
        "name": "one",
        "nodes": [ { "id": "a", "type": "transform", "template": "x" } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), sub.recv()).await {
            Ok(Some(Event::RunFinished { run_id, .. })) if run_id == o.run_id => break,
            Ok(Some(_)) | Ok(None) => {}
            Err(_) => panic!("no RunFinished for {} on the engine's bus", o.run_id),
        }
    }
}

/// A process's role as `runner_processes` and the metrics name it, and the maintenance
/// loop's last turn (what `/healthz` reads): none before it starts, then the time it turned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maintenance_loop_says_when_it_last_turned() {
    use omniflow::engine::Role;
    assert_eq!(Role::Daemon.to_string(), "daemon");
    assert_eq!(format!("{}", Role::AllActive), "all-active");
    let env = engine(&[], 2);
    assert_eq!(env.engine.last_loop_turn(), None);
    let before = std::time::SystemTime::now();
    let maintenance = env.engine.start_maintenance(false);
    let turned = env.engine.last_loop_turn().expect("a first turn");
    // Milliseconds are kept: the turn may read up to 1 ms before `before`.
    assert!(
        turned + std::time::Duration::from_millis(1) >= before
            && turned <= std::time::SystemTime::now(),
        "{turned:?} is not now ({before:?})"
    );
    maintenance.stop().await;
}

/// An HTTP node's JSON body has its templates rendered, in nested lists and objects too; a
/// 408 (the server timed the request out) is retried like a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_body_is_rendered_and_a_408_is_retried_as_a_timeout() {
    let server = fake_server(vec![
        Reply::json(408, r#"{"error":"request timeout"}"#),
        Reply::json(200, r#"{"ok":true}"#),
    ])
    .await;
    let env = engine(&[], 2);
    let bp = blueprint(json!({
        "name": "post",
        "variables": { "Q": "rust" },
        "nodes": [ { "id": "send", "type": "http", "method": "POST", "url": server.url.clone(),
                     "body": { "q": "{{ vars.Q }}", "list": ["about {{ vars.Q }}", 3], "n": true },
                     "retry": { "attempts": 2 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["send"], json!({ "ok": true }));
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    assert_eq!(attempts.len(), 2, "the 408 was retried");
    assert_eq!(attempts[0].error_kind.map(|k| k.as_str()), Some("timeout"));
    let seen = server.seen.lock().unwrap().clone();
    let body = seen[0].split_once('\n').unwrap().1;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(body).unwrap(),
        json!({ "q": "rust", "list": ["about rust", 3], "n": true })
    );
}

/// A reply whose body breaks off (the server closes before its `Content-Length`): the HTTP
/// node fails with a bad response, not a network error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_reply_cut_off_mid_body_is_a_bad_response() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            if common::http::read_request(&mut sock).await.is_some() {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                            Content-Length: 100\r\n\r\n{\"items\": [";
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        }
    });
    let env = engine(&[], 2);
    let bp = blueprint(json!({
        "name": "cut",
        "nodes": [ { "id": "fetch", "type": "http", "url": url, "retry": { "attempts": 1 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(
        o.error_kind,
        Some(omniflow::error::ErrorKind::BadResponse),
        "{:?}",
        o.error
    );
}

/// An HTTP node reads a reply of up to 10 MiB whole (exactly 10 MiB included), and refuses
/// one over 10 MiB (rather than hold it in memory) with a bad response that names the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_node_reads_replies_up_to_10_mib_whole() {
    let text = |len: usize| Reply {
        status: 200,
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: "x".repeat(len),
    };
    let large = fake_server(vec![text(10 * 1024 * 1024)]).await;
    let huge = fake_server(vec![text(10 * 1024 * 1024 + 1)]).await;
    let env = engine(&[], 2);
    let bp = blueprint(json!({
        "name": "large",
        "nodes": [ { "id": "fetch", "type": "http", "url": large.url.clone() } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(
        o.outputs["fetch"].as_str().map(str::len),
        Some(10 * 1024 * 1024)
    );
    let bp = blueprint(json!({
        "name": "huge",
        "nodes": [ { "id": "fetch", "type": "http", "url": huge.url.clone(),
                     "retry": { "attempts": 1 } } ]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(
        o.error_kind,
        Some(omniflow::error::ErrorKind::BadResponse),
        "{:?}",
        o.error
    );
    let e = o.error.unwrap_or_default();
    assert!(e.contains("answered with more than 10 MiB; refused"), "{e}");
}

/// In the sandbox an HTTP node without a `sandboxOutput` reaches nothing: it answers with a
/// simulated reply of the type the node would get (JSON for `response: "json"`, else a page),
/// recorded as the sandbox's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_http_node_answers_with_a_simulated_reply_of_its_type() {
    let env = engine(&[], 4);
    let api = "http://127.0.0.1:9/api";
    let page = "http://127.0.0.1:9/page";
    let bp = blueprint(json!({
        "name": "simulated",
        "nodes": [
            { "id": "api", "type": "http", "url": api, "response": "json" },
            { "id": "page", "type": "http", "url": page, "response": "text" }
        ]
    }));
    let o = run(&env, &bp, sandbox(0.0, 1)).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.outputs["api"]["simulated"], json!(true));
    assert_eq!(o.outputs["api"]["url"], json!(api));
    let text = o.outputs["page"].as_str().expect("a page as text");
    assert!(text.contains(&format!("<h1>{page}</h1>")), "{text}");
    let steps = env.store.run_steps(&o.run_id).unwrap();
    for id in ["api", "page"] {
        let s = steps.iter().find(|s| s.step_key == id).unwrap();
        assert_eq!(s.provider.as_deref(), Some("sandbox"), "{id}");
    }
}

/// In the sandbox an `llm` node that parses JSON gets JSON shaped like the object its prompt
/// shows (the simulated model may wrap it in a Markdown fence, as real models do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_llm_node_that_parses_json_gets_the_shape_its_prompt_shows() {
    let env = engine(&[], 2);
    let bp = blueprint(json!({
        "name": "shaped",
        "nodes": [ { "id": "ask", "type": "llm", "parse": "json",
                     "prompt": "Answer as {\"title\": \"a title\", \"score\": 3, \"tags\": [\"x\"]} about rust" } ]
    }));
    let o = run(&env, &bp, sandbox(0.0, 1)).await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let answer = o.outputs["ask"].as_object().expect("a JSON object");
    assert!(answer["title"].is_string(), "{answer:?}");
    assert!(answer["score"].is_u64(), "{answer:?}");
    assert!(answer["tags"].is_array(), "{answer:?}");
}
