//! Known console states with fixed ids and a fixed clock, for the rendering tests, the
//! state-update tests and the console bench. Not used by the console itself.

use super::app::{App, Bg, Msg};
use super::state::{BlueprintEntry, LogEntry, RunDetail};
use super::theme::Theme;
use crate::blueprint::{Blueprint, Priority};
use crate::error::ErrorKind;
use crate::events::{Event, PoolStats, RunStatus, StepStatus};
use crate::store::{AttemptRow, RunRow, StepRow};
use std::path::PathBuf;
use std::sync::Arc;

/// 2026-11-27T10:00:00Z in ms.
pub const T0: u64 = 1_795_773_600_000;

/// A small valid blueprint with a test configuration.
pub fn blueprint(name: &str, priority: &str, active: bool) -> Arc<Blueprint> {
    let json = serde_json::json!({
        "name": name,
        "priority": priority,
        "active": active,
        "schedule": "17 */6 * * *",
        "variables": { "TOPICS": ["a", "b"] },
        "nodes": [
            { "id": "summarize", "type": "llm", "forEach": "{{ vars.TOPICS }}", "prompt": "On {{ item }}." },
            { "id": "digest", "type": "transform", "needs": ["summarize"], "template": "{{ nodes.summarize.output | join(' ') }}" }
        ],
        "testConfig": { "variables": [{ "key": "TOPICS", "value": "[\"x\",\"y\"]" }], "simulateFailures": 0.3 }
    });
    match serde_json::from_value(json) {
        Ok(b) => Arc::new(b),
        Err(e) => unreachable_blueprint(e),
    }
}

#[cold]
fn unreachable_blueprint(e: serde_json::Error) -> Arc<Blueprint> {
    // The literal above is valid; keep the fixture total anyway.
    Arc::new(Blueprint {
        name: format!("broken fixture: {e}"),
        ..blueprint_default()
    })
}

fn blueprint_default() -> Blueprint {
    serde_json::from_value(serde_json::json!({"name": "x", "nodes": []})).unwrap_or_else(|_| {
        // Only reachable if the model changes incompatibly; the fixture is then obviously wrong.
        Blueprint {
            name: String::new(),
            description: None,
            active: true,
            priority: Priority::Normal,
            schedule: None,
            timezone: None,
            variables: Default::default(),
            defaults: Default::default(),
            timeout: None,
            max_tokens_per_run: None,
            nodes: Vec::new(),
            notify: None,
            test_config: None,
            missed_slots: None,
            tags: Vec::new(),
        }
    })
}

pub fn entries() -> Vec<BlueprintEntry> {
    vec![
        BlueprintEntry {
            name: "tech-digest".into(),
            file: "blueprints/tech-digest.json".into(),
            blueprint: Some(blueprint("tech-digest", "normal", true)),
            problems: vec![],
        },
        BlueprintEntry {
            name: "triage".into(),
            file: "blueprints/triage.toml".into(),
            blueprint: Some(blueprint("triage", "high", false)),
            problems: vec![],
        },
        BlueprintEntry {
            name: "broken".into(),
            file: "blueprints/broken.json".into(),
            blueprint: None,
            problems: vec![
                "nodes[1].needs[0]: unknown node \"sumarize\" — did you mean \"summarize\"?".into(),
            ],
        },
    ]
}

fn iso(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// A history row; `i` makes the id and the start time.
pub fn run_row(i: u64, blueprint: &str, status: RunStatus) -> RunRow {
    let started = T0 - i * 60_000;
    RunRow {
        id: format!("0mwz{i:05}abcd"),
        blueprint_name: blueprint.into(),
        status,
        priority: Priority::Normal,
        trigger: "console".into(),
        sandbox: true,
        seed: Some(7),
        simulate_failures: 0.3,
        variables: serde_json::json!({"TOPICS": ["x", "y"]}),
        blueprint: None,
        parent_run_id: None,
        queued_at: iso(started),
        started_at: Some(iso(started)),
        finished_at: status.is_final().then(|| iso(started + 4200)),
        total_time_ms: status.is_final().then_some(4200),
        tokens_used: 160,
        steps_total: Some(2),
        steps_done: Some(3),
        error: (status == RunStatus::Error)
            .then(|| "summarize[1]: rate limit reached (simulated 429)".to_string()),
        error_kind: (status == RunStatus::Error).then_some(crate::error::ErrorKind::RateLimited),
        failed_step: (status == RunStatus::Error).then(|| "summarize[1]".to_string()),
    }
}

pub fn history_rows(n: u64) -> Vec<RunRow> {
    (0..n)
        .map(|i| {
            let status = match i % 4 {
                1 => RunStatus::Error,
                3 => RunStatus::Cancelled,
                _ => RunStatus::Success,
            };
            run_row(i, if i % 2 == 0 { "tech-digest" } else { "triage" }, status)
        })
        .collect()
}

pub fn detail() -> RunDetail {
    let run = run_row(1, "tech-digest", RunStatus::Error);
    let step = |key: &str, item: Option<u32>, status: StepStatus, at: u64, took: u64| StepRow {
        run_id: run.id.clone(),
        step_key: key.into(),
        node_id: key.split('[').next().unwrap_or(key).into(),
        item_index: item,
        status,
        attempts: if status == StepStatus::Error { 2 } else { 1 },
        input: Some(serde_json::json!({"prompt": format!("On {key}.")})),
        output: (status == StepStatus::Success).then(|| {
            serde_json::json!(
                "A short simulated answer that wraps when the panel is narrow enough to need it."
            )
        }),
        error_kind: (status == StepStatus::Error).then_some(crate::error::ErrorKind::RateLimited),
        error: (status == StepStatus::Error).then(|| "rate limit reached (simulated 429)".into()),
        tokens_used: 80,
        cached: false,
        provider: Some("sandbox".into()),
        model: Some("mistralai/Mistral-7B-Instruct-v0.2".into()),
        queued_at: Some(iso(T0 + at)),
        started_at: Some(iso(T0 + at)),
        finished_at: Some(iso(T0 + at + took)),
        duration_ms: Some(took),
        reply_model: None,
        finish_reason: None,
    };
    let steps = vec![
        step("summarize[0]", Some(0), StepStatus::Success, 0, 900),
        step("summarize[1]", Some(1), StepStatus::Error, 0, 3300),
        step("digest", None, StepStatus::Cancelled, 3300, 10),
    ];
    let attempt = |key: &str, n: u32, ok: bool, wait: Option<u64>| AttemptRow {
        step_key: key.into(),
        attempt: n,
        ok,
        error_kind: (!ok).then_some(crate::error::ErrorKind::RateLimited),
        error: (!ok).then(|| "rate limit reached (simulated 429)".into()),
        wait_ms: wait,
        started_at: iso(T0),
        finished_at: iso(T0 + 300),
        duration_ms: 300,
        tokens_used: if ok { 80 } else { 0 },
        provider: Some("sandbox".into()),
        model: None,
        cached: false,
    };
    let attempts = vec![
        attempt("summarize[0]", 1, true, None),
        attempt("summarize[1]", 1, false, Some(2000)),
        attempt("summarize[1]", 2, false, None),
    ];
    RunDetail {
        run,
        steps,
        attempts,
    }
}

/// A fresh console at [`T0`] with 4 workers and the default theme.
pub fn app() -> App {
    let themes = super::theme::BUILTIN
        .iter()
        .filter_map(|(n, t)| Theme::from_toml(n, t).ok())
        .collect();
    let mut app = App::new(PathBuf::from("blueprints"), Theme::default(), themes, 4);
    app.now_ms = T0;
    app.memory.threshold_mb = 500;
    app.db_path = "./automation_runner.db".into();
    app
}

/// A console in mid-run: blueprints loaded, two workers busy, a step retrying, history and
/// logs filled, memory known.
pub fn busy_app() -> App {
    let mut app = app();
    let _ = app.start();
    app.update(Msg::Bg(Bg::Blueprints(Ok(entries()))));
    let run = "0mwz00000live".to_string();
    for ev in [
        Event::RunQueued {
            run_id: run.clone(),
            blueprint: "tech-digest".into(),
            priority: Priority::Normal,
            sandbox: true,
        },
        Event::RunStarted {
            run_id: run.clone(),
            blueprint: "tech-digest".into(),
            nodes: 2,
        },
        Event::WorkerBusy {
            worker: 0,
            run_id: run.clone(),
            step: "summarize[0]".into(),
            attempt: 1,
        },
        Event::WorkerBusy {
            worker: 2,
            run_id: run.clone(),
            step: "summarize[2]".into(),
            attempt: 2,
        },
        Event::StepRetrying {
            run_id: run.clone(),
            step: "summarize[1]".into(),
            node: "summarize".into(),
            attempt: 1,
            kind: ErrorKind::RateLimited,
            message: "rate limit reached (simulated 429), retry after 2s".into(),
            wait_ms: 2000,
        },
        Event::Pool(PoolStats {
            queued: [0, 3, 1, 0],
            running: 2,
            concurrency: 4,
            paused: false,
            memory_hold: false,
            disk_full: None,
            completed: 12,
            failed: 0,
        }),
    ] {
        app.update(Msg::Engine(ev));
    }
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((history_rows(6), Some(6))),
    }));
    let lines = [
        r#"{"timestamp":"2026-11-27T10:00:01.000000Z","level":"INFO","target":"omniflow::engine","message":"run queued","run_id":"0mwz00000live","blueprint":"tech-digest"}"#,
        r#"{"timestamp":"2026-11-27T10:00:02.000000Z","level":"WARN","target":"omniflow::engine","message":"attempt failed, retrying","run_id":"0mwz00000live","step":"summarize[1]","kind":"rate_limited"}"#,
        r#"{"timestamp":"2026-11-27T10:00:03.000000Z","level":"INFO","target":"omniflow::engine","message":"step succeeded","run_id":"0mwz00000live","step":"summarize[3]"}"#,
    ];
    app.update(Msg::Bg(Bg::Logs(
        lines.iter().map(|l| LogEntry::from_line(l)).collect(),
    )));
    app.memory.rss = Some(120 << 20);
    app.update(Msg::Tick(T0 + 1500));
    app
}
