//! Notifications against fake Telegram and Discord servers (PROTOCOLS.md §4–5): rate limits
//! honoured, dead webhooks not retried, long reports split, nothing sent twice on retry, and
//! tokens nowhere.

mod common;
mod fakes;

use common::{blueprint, engine, run, Env};
use fakes::{
    discord, discord_429, discord_unknown_webhook, html_balanced, telegram, telegram_429, Fake,
};
use omniflow::engine::RunRequest;
use omniflow::events::{RunStatus, StepStatus};
use serde_json::{json, Value};
use std::collections::HashMap;

const TOKEN: &str = "7012345678:AAHsEcReTtOkEnVaLuE0123456789abcdefXYZ";
const HOOK_TOKEN: &str = "wEbHoOkToKeN-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ";

fn tg_env(fake: &Fake, extra: &[(&str, &str)]) -> Env {
    let mut vars = vec![
        ("TELEGRAM_BOT_TOKEN", TOKEN),
        ("TELEGRAM_CHAT_ID", "42"),
        ("TELEGRAM_API_URL", fake.url.as_str()),
    ];
    vars.extend_from_slice(extra);
    engine(&vars, 8)
}

fn hook(fake: &Fake) -> String {
    format!("{}/api/webhooks/123456789/{HOOK_TOKEN}", fake.url)
}

fn notify_bp(
    channel: &str,
    text: &str,
    parse_mode: Option<&str>,
) -> std::sync::Arc<omniflow::blueprint::Blueprint> {
    let mut node = json!({ "id": "post", "type": "notify", "channel": channel,
                           "text": "{{ vars.REPORT }}", "retry": { "attempts": 3, "backoff": "1s" } });
    if let Some(pm) = parse_mode {
        node["parseMode"] = json!(pm);
    }
    blueprint(json!({ "name": "report", "variables": { "REPORT": text }, "nodes": [node] }))
}

/// A 10,000-character HTML report: bold headings, links with entities, words.
fn report() -> String {
    let mut t = String::new();
    let mut i = 0;
    while t.chars().count() < 10_000 {
        t.push_str(&format!(
            "<b>Topic {i}</b>\nSome words about topic {i} &amp; friends, see <a href=\"https://example.org/{i}\">the source</a>.\n\n"
        ));
        i += 1;
    }
    t.chars()
        .take(10_000)
        .collect::<String>()
        .rsplit_once("\n\n")
        .unwrap()
        .0
        .to_string()
}

fn texts(fake: &Fake) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| {
            let b = r.json();
            b["text"]
                .as_str()
                .or(b["content"].as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

fn words(s: &str) -> Vec<String> {
    // Compare the visible words: tags that a cut closes and reopens are markup, not text.
    let mut out = String::new();
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_429_with_retry_after_then_success() {
    let fake = telegram(TOKEN).await;
    fake.push(telegram_429(2));
    let env = tg_env(&fake, &[]);
    let o = run(
        &env,
        &notify_bp("telegram", "hello", None),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.steps[0].attempts, 2);
    assert_eq!(texts(&fake), ["hello", "hello"]);
    // The wait was the one Telegram asked for (2 s, recorded before scaling).
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    assert_eq!(attempts[0].wait_ms, Some(2000), "{attempts:?}");
    assert!(attempts[0]
        .error
        .as_deref()
        .unwrap()
        .contains("Too Many Requests"));
    // `show` and the console's step detail name the channel as the step's provider.
    let steps = env.store.run_steps(&o.run_id).unwrap();
    assert_eq!(steps[0].provider.as_deref(), Some("telegram"), "{steps:?}");
    assert_eq!(
        attempts[1].provider.as_deref(),
        Some("telegram"),
        "{attempts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_429_float_retry_after_then_success() {
    let fake = discord().await;
    fake.push(discord_429(0.25));
    let h = hook(&fake);
    let env = engine(&[("DISCORD_WEBHOOK", h.as_str())], 8);
    let o = run(
        &env,
        &notify_bp("discord", "hi @everyone", None),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    assert_eq!(attempts[0].wait_ms, Some(250));
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].target.contains("wait=true"));
    // Mentions are suppressed by default.
    assert_eq!(reqs[1].json()["allowed_mentions"], json!({ "parse": [] }));
    assert_eq!(o.outputs["post"]["messageIds"], json!(["1001"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_header_alone_is_honoured() {
    let fake = discord().await;
    fake.push(
        fakes::Reply::json(429, json!({ "message": "You are being rate limited." }))
            .with_header("Retry-After", "3"),
    );
    let h = hook(&fake);
    let env = engine(&[("DISCORD_WEBHOOK", h.as_str())], 8);
    let o = run(
        &env,
        &notify_bp("discord", "x", None),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success);
    assert_eq!(
        env.store.run_attempts(&o.run_id).unwrap()[0].wait_ms,
        Some(3000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_webhook_is_not_retried_nor_used_again() {
    let fake = discord().await;
    fake.push(discord_unknown_webhook());
    let h = hook(&fake);
    let env = engine(&[("DISCORD_WEBHOOK", h.as_str())], 8);
    let bp = notify_bp("discord", "x", None);
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert_eq!(o.steps[0].attempts, 1, "a 404 is not retried");
    let err = o.error.clone().unwrap();
    assert!(
        err.contains("Unknown Webhook") && err.contains("do not use this one again"),
        "{err}"
    );
    assert!(!err.contains(HOOK_TOKEN));
    // The webhook is dead for this process: a second run does not call it.
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    assert!(o.error.unwrap().contains("not used again"));
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_and_client_errors_explained() {
    let fake = telegram(TOKEN).await;
    fake.push(fakes::Reply::json(
        502,
        json!({ "ok": false, "error_code": 502, "description": "Bad Gateway" }),
    ));
    let env = tg_env(&fake, &[]);
    let o = run(
        &env,
        &notify_bp("telegram", "x", None),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success);
    assert_eq!(o.steps[0].attempts, 2);

    fake.push(fakes::Reply::json(403, json!({ "ok": false, "error_code": 403, "description": "Forbidden: bot was blocked by the user" })));
    let o = run(
        &env,
        &notify_bp("telegram", "x", None),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.steps[0].attempts, 1);
    assert!(o.error.unwrap().contains("unblock"));

    let o = run(
        &env,
        &notify_bp("telegram", "<b>unclosed", Some("HTML")),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.steps[0].attempts, 1);
    assert!(o.error.unwrap().contains("parse entities"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_any_real_one_is_refused_not_read() {
    // A 2 MiB answer (a wrong TELEGRAM_API_URL, a proxy's page): the attempt fails with what
    // happened and the setting to check, instead of reading it all into memory.
    let fake = telegram(TOKEN).await;
    fake.push(fakes::Reply::json(
        200,
        json!({ "ok": true, "result": { "message_id": 1, "text": "x".repeat(2 << 20) } }),
    ));
    let env = tg_env(&fake, &[]);
    let o = run(
        &env,
        &notify_bp("telegram", "hello", None),
        RunRequest::default(),
    )
    .await;
    let attempts = env.store.run_attempts(&o.run_id).unwrap();
    let first = attempts[0].error.as_deref().unwrap_or_default();
    assert!(
        first.contains("larger than 1 MiB") && first.contains("TELEGRAM_API_URL"),
        "{attempts:?}"
    );
    assert_eq!(
        attempts[0].error_kind.map(|k| k.as_str()),
        Some("bad_response")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_chat_id_and_malformed_webhook_are_clear_errors() {
    let env = engine(
        &[
            ("TELEGRAM_BOT_TOKEN", TOKEN),
            ("DISCORD_WEBHOOK", "https://example.org/not-a-hook"),
        ],
        8,
    );
    let o = run(
        &env,
        &notify_bp("telegram", "x", None),
        RunRequest::default(),
    )
    .await;
    assert!(o.error.unwrap().contains("TELEGRAM_CHAT_ID is missing"));
    let o = run(
        &env,
        &notify_bp("discord", "x", None),
        RunRequest::default(),
    )
    .await;
    let e = o.error.unwrap();
    assert!(
        e.contains("DISCORD_WEBHOOK is not a webhook URL") && !e.contains("example.org"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10000_character_report_is_split_between_words_with_valid_html() {
    let fake = telegram(TOKEN).await;
    let env = tg_env(&fake, &[]);
    let text = report();
    assert!(text.chars().count() > 9_900);
    let o = run(
        &env,
        &notify_bp("telegram", &text, Some("HTML")),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let sent = texts(&fake);
    assert_eq!(sent.len(), 3, "10,000 characters in parts of at most 4096");
    for p in &sent {
        assert!(p.encode_utf16().count() <= 4096);
        assert!(html_balanced(p), "{p}");
    }
    assert_eq!(words(&sent.join("\n")), words(&text));
    assert_eq!(o.outputs["post"]["parts"], json!(3));

    // Discord: parts of at most 2000, same words.
    let dfake = discord().await;
    let h = hook(&dfake);
    let env = engine(&[("DISCORD_WEBHOOK", h.as_str())], 8);
    let plain = words(&text).join(" ");
    let o = run(
        &env,
        &notify_bp("discord", &plain, None),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    let sent = texts(&dfake);
    assert!(sent.len() >= plain.chars().count().div_ceil(2000));
    assert!(sent.iter().all(|p| p.chars().count() <= 2000));
    assert_eq!(sent.join(" "), plain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_attempt_sends_only_the_parts_not_yet_delivered() {
    let fake = telegram(TOKEN).await;
    let env = tg_env(&fake, &[]);
    let text = report();
    // Part 1 goes through, part 2 is rate limited: the second attempt must not resend part 1.
    fake.push(fakes::Reply::json(
        200,
        json!({ "ok": true, "result": { "message_id": 1 } }),
    ));
    fake.push(telegram_429(1));
    let o = run(
        &env,
        &notify_bp("telegram", &text, Some("HTML")),
        RunRequest::default(),
    )
    .await;
    assert_eq!(o.status, RunStatus::Success, "{:?}", o.error);
    assert_eq!(o.steps[0].attempts, 2);
    let sent = texts(&fake);
    assert_eq!(sent.len(), 4, "part 1, part 2 (429), part 2, part 3");
    let mut unique = sent.clone();
    unique.dedup();
    assert_eq!(unique.len(), 3);
    assert_eq!(sent[1], sent[2]);
    assert_eq!(env.store.notifications_of(&o.run_id).unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_run_does_not_resend_what_the_failed_run_delivered() {
    let fake = telegram(TOKEN).await;
    let env = tg_env(&fake, &[]);
    let text = report();
    let bp = blueprint(json!({
        "name": "digest", "variables": { "REPORT": text },
        "nodes": [
            { "id": "build", "type": "transform", "template": "{{ vars.REPORT }}" },
            { "id": "post", "type": "notify", "needs": ["build"], "channel": "telegram",
              "parseMode": "HTML", "text": "{{ nodes.build.output }}" }
        ]
    }));
    // Part 1 delivered, then Telegram refuses (400, not retried): the run fails.
    fake.push(fakes::Reply::json(
        200,
        json!({ "ok": true, "result": { "message_id": 7 } }),
    ));
    fake.push(fakes::Reply::json(
        400,
        json!({ "ok": false, "error_code": 400, "description": "Bad Request: chat not found" }),
    ));
    let first = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(first.status, RunStatus::Error);
    assert_eq!(texts(&fake).len(), 2);

    // Retry the run: succeeded steps reused, the notify step runs again.
    let reuse: HashMap<String, Value> = first
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Success)
        .map(|s| (s.step.clone(), first.outputs[&s.node].clone()))
        .collect();
    let retry = RunRequest {
        parent_run_id: Some(first.run_id.clone()),
        reuse,
        trigger: omniflow::engine::Trigger::Retry,
        ..Default::default()
    };
    let second = run(&env, &bp, retry.clone()).await;
    assert_eq!(second.status, RunStatus::Success, "{:?}", second.error);
    let sent = texts(&fake);
    assert_eq!(
        sent.len(),
        4,
        "part 1 (run 1), part 2 refused (run 1), parts 2 and 3 (run 2)"
    );
    assert_eq!(sent[1], sent[2]);
    assert_eq!(second.outputs["post"]["alreadySent"], json!(1));

    // A retry of the retry (the chain's root is still the first run) sends nothing.
    let third = run(
        &env,
        &bp,
        RunRequest {
            parent_run_id: Some(second.run_id.clone()),
            ..retry
        },
    )
    .await;
    assert_eq!(third.status, RunStatus::Success);
    assert_eq!(texts(&fake).len(), 4);
    assert_eq!(third.outputs["post"]["alreadySent"], json!(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_level_notifications_summarise_the_run() {
    let tg = telegram(TOKEN).await;
    let dc = discord().await;
    let h = hook(&dc);
    let env = tg_env(
        &tg,
        &[
            ("DISCORD_WEBHOOK", h.as_str()),
            ("NOTIFY_ON_FAILURE", "telegram,discord"),
        ],
    );
    // Fails: the template reads an undefined node output as JSON.
    let bp = blueprint(json!({
        "name": "nightly <job>",
        "nodes": [{ "id": "parse", "type": "transform", "parse": "json", "template": "not json & <b>" }]
    }));
    let o = run(&env, &bp, RunRequest::default()).await;
    assert_eq!(o.status, RunStatus::Error);
    let t = tg.requests();
    assert_eq!(t.len(), 1);
    let body = t[0].json();
    assert_eq!(body["parse_mode"], "HTML");
    let text = body["text"].as_str().unwrap();
    assert!(text.contains("<b>nightly &lt;job&gt;</b> failed"), "{text}");
    assert!(text.contains("failed step: <code>parse</code>"), "{text}");
    assert!(html_balanced(text));
    let d = dc.requests();
    assert_eq!(d.len(), 1);
    let embed = &d[0].json()["embeds"][0];
    assert_eq!(embed["color"], json!(0xE74C3C));
    let fields: Vec<String> = embed["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        fields,
        ["Blueprint", "Status", "Duration", "Failed step", "Error"]
    );
    assert_eq!(d[0].json()["allowed_mentions"], json!({ "parse": [] }));

    // Success is not announced (NOTIFY_ON_SUCCESS unset), and a sandbox run sends nothing.
    let ok = blueprint(
        json!({ "name": "ok", "nodes": [{ "id": "a", "type": "transform", "template": "x" }] }),
    );
    run(&env, &ok, RunRequest::default()).await;
    run(&env, &bp, common::sandbox(0.0, 1)).await;
    assert_eq!(tg.requests().len(), 1);
    assert_eq!(dc.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_logs_history_errors_or_json() {
    let tg = telegram("another-token").await; // our token is refused: 404 on its path
    let dc = discord().await;
    dc.push(fakes::Reply::json(
        401,
        json!({ "message": "Invalid Webhook Token", "code": 50027 }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let h = hook(&dc);
    std::fs::write(
        dir.path().join("leak.json"),
        json!({
            "name": "leak",
            "notify": { "onFailure": ["telegram", "discord"] },
            "nodes": [
                { "id": "tg", "type": "notify", "channel": "telegram", "text": "hi", "continueOnError": true },
                { "id": "dc", "type": "notify", "channel": "discord", "text": "hi", "continueOnError": true },
                { "id": "down", "type": "notify", "channel": "telegram", "text": "hi", "needs": ["tg", "dc"] }
            ]
        })
        .to_string(),
    )
    .unwrap();
    let logs = dir.path().join("logs");
    let d = dir.path().to_path_buf();
    let (url, h2, d2) = (tg.url.clone(), h.clone(), d.clone());
    let out = tokio::task::spawn_blocking(move || run_leak(&d2, &url, &h2, "debug"))
        .await
        .unwrap();
    // And once against an address nobody listens on: reqwest's error text holds the URL.
    let bin_out2 =
        tokio::task::spawn_blocking(move || run_leak(&d, "http://127.0.0.1:1", &h, "trace"))
            .await
            .unwrap();
    for o in [&out, &bin_out2] {
        assert_eq!(o.status.code(), Some(1));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["status"], "error");
        let stderr = String::from_utf8_lossy(&o.stderr);
        for s in [&stdout, &stderr] {
            assert!(!s.contains(TOKEN) && !s.contains(HOOK_TOKEN), "{s}");
        }
    }
    let errors = String::from_utf8_lossy(&bin_out2.stdout).to_string();
    assert!(errors.contains("could not reach Telegram"), "{errors}");
    // Every log line, every byte of the database (and its WAL).
    let mut log_text = String::new();
    for f in std::fs::read_dir(&logs).unwrap() {
        log_text.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
    }
    assert!(log_text.lines().count() > 10);
    assert!(
        log_text.contains("Telegram error 404"),
        "the failures were logged"
    );
    assert!(!log_text.contains(TOKEN) && !log_text.contains(HOOK_TOKEN));
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("h.db") {
            let bytes = std::fs::read(&p).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(TOKEN) && !text.contains(HOOK_TOKEN),
                "{}",
                p.display()
            );
        }
    }
}

fn run_leak(dir: &std::path::Path, api: &str, hook: &str, rust_log: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_omniflow"))
        .args(["run", "leak.json", "--json"])
        .current_dir(dir)
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("TELEGRAM_CHAT_ID", "42")
        .env("TELEGRAM_API_URL", api)
        .env("DISCORD_WEBHOOK", hook)
        .env("DB_FILE", dir.join("h.db"))
        .env("LOG_DIR", dir.join("logs"))
        .env("RUST_LOG", rust_log)
        .env("OMNIFLOW_TIME_SCALE", "0.001")
        .env("MAX_RETRIES", "1")
        .output()
        .unwrap()
}
