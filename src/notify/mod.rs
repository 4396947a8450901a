//! Notifications: Telegram `sendMessage` and Discord webhooks, for `notify` nodes, run-level
//! `notify: {onSuccess, onFailure}` (with `NOTIFY_ON_SUCCESS` / `NOTIFY_ON_FAILURE` as the
//! defaults of blueprints that say nothing) and the digest of `run --all-active`
//! (`NOTIFY_DIGEST`).
//!
//! - `split.rs`: long texts become several messages (4096 / 2000), cut between words, never
//!   inside markup.
//! - `telegram.rs`, `discord.rs`: one message each, errors classified (429 waits as told,
//!   5xx retried, 400/401/403/404 explained and not retried) without ever quoting a token or a
//!   webhook URL.
//! - `summary.rs`: a run's summary as Telegram HTML and as a Discord embed; the digest.
//!
//! **Never twice.** With a [`Dedupe`], every message part is looked up in the store before it
//! is sent, its intent is committed before it is sent, and its message id right after the
//! service accepted it, under a key that a retry of the run (or a resume) computes again: the
//! root of the retry chain, the step, the channel, the part's index and a hash of its text.
//! So an attempt that sent part 1 and hit a 429 on part 2 resends only part 2 (a refused
//! part's intent is removed), a retried run skips what the failed run already delivered, and
//! a resume after a crash between parts sends only the parts never started. A part whose
//! intent is recorded and whose outcome is not (the crash hit while it was being sent) may
//! have arrived: it is not sent again (better one part lost than the same part twice; Telegram
//! offers no idempotency key), and the step says so (`"delivered": null`, `unknown`, a note).
//!
//! This module decides nothing about whether a run notifies: the engine calls
//! [`after_run`] at the end of each run, and `notify` nodes are ordinary steps.

// Nothing a service or a schedule answers may take the process down.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod discord;
pub mod split;
pub mod summary;
mod telegram;

pub use discord::LIMIT as DISCORD_LIMIT;
pub use split::{split, Markup};
pub use summary::{digest_discord, digest_html, escape_html, RunSummary};
pub use telegram::LIMIT as TELEGRAM_LIMIT;

use crate::blueprint::{Blueprint, Channel};
use crate::config::Config;
use crate::error::{ErrorKind, StepError};
use crate::events::RunStatus;
use crate::logging::Redactor;
use crate::retry::{Decision, RetryPolicy};
use crate::store::{NotificationRecord, PartState, Store};
use serde_json::{json, Value};
use std::time::Duration;

/// What to send.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// A `notify` node's text, with its Telegram `parseMode`.
    Text {
        text: &'a str,
        parse_mode: Option<&'a str>,
    },
    /// A run's end.
    Run(&'a RunSummary),
    /// The end of `run --all-active`.
    Digest(&'a [RunSummary]),
}

/// Where delivered parts are recorded so they are never sent twice.
#[derive(Debug, Clone)]
pub struct Dedupe {
    pub store: Store,
    /// The first run of the retry chain ([`Store::root_run_id`]).
    pub root: String,
    pub run_id: String,
    /// The step (`post`, `post[2]`) or `run:onFailure`, `run:onSuccess`, `digest`.
    pub step_key: String,
}

/// One message as a service takes it.
enum Part {
    Telegram {
        text: String,
        parse_mode: Option<String>,
    },
    Discord(Value),
}

impl Part {
    fn content(&self) -> String {
        match self {
            Part::Telegram { text, parse_mode } => format!("{parse_mode:?}\n{text}"),
            Part::Discord(v) => v.to_string(),
        }
    }
}

fn parts(channel: Channel, msg: Message<'_>) -> Vec<Part> {
    match (channel, msg) {
        (Channel::Telegram, Message::Text { text, parse_mode }) => {
            split(text, TELEGRAM_LIMIT, Markup::for_telegram(parse_mode))
                .into_iter()
                .map(|text| Part::Telegram {
                    text,
                    parse_mode: parse_mode.map(str::to_string),
                })
                .collect()
        }
        (Channel::Discord, Message::Text { text, .. }) => {
            split(text, DISCORD_LIMIT, Markup::Markdown)
                .into_iter()
                .map(|p| {
                    Part::Discord(json!({ "content": p, "allowed_mentions": { "parse": [] } }))
                })
                .collect()
        }
        (Channel::Telegram, Message::Run(s)) => html_parts(&s.telegram_html()),
        (Channel::Telegram, Message::Digest(runs)) => html_parts(&digest_html(runs)),
        (Channel::Discord, Message::Run(s)) => vec![Part::Discord(s.discord_body())],
        (Channel::Discord, Message::Digest(runs)) => vec![Part::Discord(digest_discord(runs))],
    }
}

fn html_parts(text: &str) -> Vec<Part> {
    split(text, TELEGRAM_LIMIT, Markup::Html)
        .into_iter()
        .map(|text| Part::Telegram {
            text,
            parse_mode: Some("HTML".into()),
        })
        .collect()
}

/// FNV-1a, 64 bits: a content hash that is stable across builds (std's hasher is not).
fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sends `msg` on `channel`, part by part; with `dedupe`, parts already delivered are skipped
/// and each delivered part is recorded. One attempt: errors come back classified for the
/// engine's retry policy (a failed part leaves the earlier ones recorded).
pub async fn deliver(
    http: &reqwest::Client,
    config: &Config,
    channel: Channel,
    msg: Message<'_>,
    dedupe: Option<&Dedupe>,
) -> Result<Value, StepError> {
    let result = deliver_parts(http, config, channel, msg, dedupe).await;
    let outcome = match &result {
        Ok(v) if v["parts"] == v["alreadySent"] => "already_sent",
        Ok(_) => "sent",
        Err(e) => e.kind.as_str(),
    };
    crate::telemetry::notification(channel.as_str(), outcome);
    result
}

async fn deliver_parts(
    http: &reqwest::Client,
    config: &Config,
    channel: Channel,
    msg: Message<'_>,
    dedupe: Option<&Dedupe>,
) -> Result<Value, StepError> {
    // Configuration problems first: nothing is sent when the channel cannot work.
    match channel {
        Channel::Telegram => telegram::credentials(config).map(|_| ())?,
        Channel::Discord => discord::webhook(config).map(|_| ())?,
    }
    let sent_text = match msg {
        Message::Text { text, .. } => Some(text),
        _ => None,
    };
    let parts = parts(channel, msg);
    let total = parts.len();
    let mut ids = Vec::with_capacity(total);
    let mut skipped = 0;
    // Parts (1-based) whose sending a crash interrupted.
    let mut unknown: Vec<usize> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let rec = dedupe.map(|d| NotificationRecord {
            dedupe_key: format!(
                "{}|{}|{}|{i}|{:016x}",
                d.root,
                d.step_key,
                channel.as_str(),
                fnv64(&part.content())
            ),
            run_id: d.run_id.clone(),
            step_key: d.step_key.clone(),
            channel: channel.as_str().into(),
            part: i as u32,
            message_ids: Value::Null,
        });
        if let (Some(d), Some(rec)) = (dedupe, &rec) {
            match intent(d, rec).await? {
                Intent::Send => {}
                Intent::Sent(prev) => {
                    tracing::info!(run_id = %d.run_id, step = %d.step_key, channel = channel.as_str(), part = i + 1, "notification part already delivered; not sent again");
                    ids.push(prev);
                    skipped += 1;
                    continue;
                }
                Intent::Unknown => {
                    tracing::warn!(run_id = %d.run_id, step = %d.step_key, channel = channel.as_str(), part = i + 1, "the process stopped while this notification part was being sent; not sending it again, so it cannot arrive twice");
                    ids.push(Value::Null);
                    unknown.push(i + 1);
                    continue;
                }
            }
        }
        let sent = match part {
            Part::Telegram { text, parse_mode } => {
                telegram::send_part(http, config, text, parse_mode.as_deref()).await
            }
            Part::Discord(body) => discord::send_part(http, config, body).await,
        };
        let id = match sent {
            Ok(id) => id,
            Err(mut e) => {
                // The service refused the part or never got it: its intent goes, so the next
                // attempt sends it.
                if let (Some(d), Some(rec)) = (dedupe, &rec) {
                    let key = rec.dedupe_key.clone();
                    blocking(d.store.clone(), move |s| {
                        s.clear_notification_intent(&key).map(Some)
                    })
                    .await;
                }
                // A service's error may quote the request back (Telegram's path holds the bot
                // token, a webhook's URL is its secret): no secret goes into a step's error.
                let redactor = crate::logging::Redactor::new(config.secrets());
                e.message = redactor.redact(&e.message).into_owned();
                return Err(e);
            }
        };
        if let (Some(d), Some(mut rec)) = (dedupe, rec) {
            rec.message_ids = id.clone();
            blocking(d.store.clone(), move |s| {
                s.record_notification(&rec).map(Some)
            })
            .await;
        }
        ids.push(id);
    }
    if !unknown.is_empty() {
        let mut v = record(channel, true, total, skipped, ids, sent_text);
        let which = unknown
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(m) = v.as_object_mut() {
            m.insert("delivered".into(), Value::Null);
            m.insert("unknownParts".into(), json!(unknown));
            m.insert(
                "note".into(),
                json!(format!(
                    "the process stopped while part {which} of {total} was being sent; it was not \
                     sent again so it cannot arrive twice (the other parts were sent once)"
                )),
            );
        }
        return Ok(v);
    }
    Ok(record(channel, true, total, skipped, ids, sent_text))
}

/// What a `notify` node outputs. One shape for a real delivery, a sandbox run (nothing sent:
/// `delivered` false, no message ids) and the exported programs, so a template reading
/// `nodes.post.output.parts` or `.text` works the same in all of them.
fn record(
    channel: Channel,
    delivered: bool,
    parts: usize,
    already_sent: usize,
    message_ids: Vec<Value>,
    text: Option<&str>,
) -> Value {
    let mut v = json!({
        "channel": channel.as_str(),
        "delivered": delivered,
        "parts": parts,
        "alreadySent": already_sent,
        "messageIds": message_ids,
    });
    if let (Some(t), Some(m)) = (text, v.as_object_mut()) {
        m.insert("text".into(), Value::String(t.to_string()));
    }
    v
}

/// The record a sandbox run keeps for a `notify` node: what a real delivery would record,
/// split into the parts the service would get, with nothing sent.
pub fn sandbox_record(channel: Channel, text: &str, parse_mode: Option<&str>) -> Value {
    let total = parts(channel, Message::Text { text, parse_mode }).len();
    record(channel, false, total, 0, Vec::new(), Some(text))
}

/// What to do with one message part, from its record.
enum Intent {
    /// Nothing recorded: its intent is now recorded; send it.
    Send,
    /// Delivered earlier, with these message ids.
    Sent(Value),
    /// An earlier attempt recorded its intent and never its outcome (the process stopped
    /// while sending it): it may have arrived, so it is not sent again.
    Unknown,
}

/// Looks a part up and, when nothing is recorded, records its intent (committed before the
/// part is sent). When the intent cannot be recorded the part is not sent: the attempt fails
/// and is retried, so nothing leaves whose record could be lost.
async fn intent(d: &Dedupe, rec: &NotificationRecord) -> Result<Intent, StepError> {
    let store = d.store.clone();
    let rec = rec.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<Intent, crate::store::StoreError> {
        match store.notification_part(&rec.dedupe_key)? {
            Some(PartState::Sent(ids)) => return Ok(Intent::Sent(ids)),
            Some(PartState::Sending) => return Ok(Intent::Unknown),
            None => {}
        }
        Ok(match store.record_notification_intent(&rec)? {
            true => Intent::Send,
            // Another attempt recorded it between the two statements.
            false => match store.notification_part(&rec.dedupe_key)? {
                Some(PartState::Sent(ids)) => Intent::Sent(ids),
                _ => Intent::Unknown,
            },
        })
    })
    .await;
    let why = match r {
        Ok(Ok(i)) => return Ok(i),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    Err(StepError::new(
        ErrorKind::Server,
        format!("could not record that a notification part is about to be sent ({why}); it was not sent, so it cannot arrive twice — retrying"),
    ))
}

/// Runs a store call off the async runtime. A store failure is logged and read as "nothing
/// recorded": a notification is better sent than lost.
async fn blocking<T: Send + 'static>(
    store: Store,
    f: impl FnOnce(&Store) -> Result<Option<T>, crate::store::StoreError> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "notification record unavailable; delivery goes on without it");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "notification record task failed");
            None
        }
    }
}

/// Attempts of a run-level notification or digest (they are not engine steps).
const ATTEMPTS: u32 = 4;
/// Longest wait between them (before `OMNIFLOW_TIME_SCALE`).
const MAX_WAIT: Duration = Duration::from_secs(120);

/// [`deliver`] retried by the engine's retry policy (`RetryPolicy::decide`, the one place
/// that decides retryability): `ATTEMPTS` tries, the service's wait when it gives one (at
/// most `MAX_WAIT`), else 1 s, 2 s, 4 s.
pub async fn deliver_with_retries(
    http: &reqwest::Client,
    config: &Config,
    channel: Channel,
    msg: Message<'_>,
    dedupe: Option<&Dedupe>,
) -> Result<Value, StepError> {
    let policy = RetryPolicy::from_max_retries(ATTEMPTS - 1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let e = match deliver(http, config, channel, msg, dedupe).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let wait = match policy.decide_now(attempt, &e) {
            Decision::Retry { wait, .. } => wait.min(MAX_WAIT),
            Decision::GiveUp { .. } => return Err(e),
        };
        tracing::warn!(channel = channel.as_str(), attempt, wait_ms = wait.as_millis() as u64, error = %e.message, "notification failed, retrying");
        tokio::time::sleep(config.scaled(wait)).await;
    }
}

/// The channels a run's end is announced on: the blueprint's `notify` when it has one (an
/// empty `notify: {}` opts out), else `NOTIFY_ON_SUCCESS` / `NOTIFY_ON_FAILURE`. Cancelled
/// runs are not announced (someone cancelled them).
pub fn run_channels(bp: &Blueprint, config: &Config, status: RunStatus) -> Vec<Channel> {
    let (ok, bad) = match &bp.notify {
        Some(n) => (&n.on_success, &n.on_failure),
        None => (&config.notify_on_success, &config.notify_on_failure),
    };
    match status {
        RunStatus::Success => ok.clone(),
        RunStatus::Error => bad.clone(),
        RunStatus::Cancelled | RunStatus::Queued | RunStatus::Running => Vec::new(),
    }
}

/// Announces a run's end on its channels (see [`run_channels`]). Failures are logged, never
/// change the run. A sandbox run only logs what it would send.
pub async fn after_run(
    http: &reqwest::Client,
    config: &Config,
    store: &Store,
    bp: &Blueprint,
    summary: &RunSummary,
    sandbox: bool,
) {
    let channels = run_channels(bp, config, summary.status);
    if channels.is_empty() {
        return;
    }
    // The summary quotes errors, which may quote anything: pass them through the redactor.
    let redactor = Redactor::new(config.secrets());
    let mut summary = summary.clone();
    summary.error = summary.error.map(|e| redactor.redact(&e).into_owned());
    let event = if summary.status == RunStatus::Success {
        "run:onSuccess"
    } else {
        "run:onFailure"
    };
    for channel in channels {
        if sandbox {
            crate::telemetry::notification(channel.as_str(), "sandbox");
            tracing::info!(run_id = %summary.run_id, channel = channel.as_str(), event, "sandbox: run notification recorded, not sent");
            continue;
        }
        let dedupe = Dedupe {
            store: store.clone(),
            root: summary.run_id.clone(),
            run_id: summary.run_id.clone(),
            step_key: event.into(),
        };
        match deliver_with_retries(http, config, channel, Message::Run(&summary), Some(&dedupe))
            .await
        {
            Ok(_) => {
                tracing::info!(run_id = %summary.run_id, channel = channel.as_str(), event, "run notification sent")
            }
            Err(e) => {
                tracing::warn!(run_id = %summary.run_id, channel = channel.as_str(), event, kind = %e.kind, error = %e.message, "run notification failed")
            }
        }
    }
}

/// Sends the digest of `run --all-active` to `NOTIFY_DIGEST`'s channels; returns the errors
/// (one line per channel that failed).
pub async fn send_digest(
    http: &reqwest::Client,
    config: &Config,
    runs: &[RunSummary],
) -> Vec<String> {
    let redactor = Redactor::new(config.secrets());
    let runs: Vec<RunSummary> = runs
        .iter()
        .map(|r| RunSummary {
            error: r.error.as_ref().map(|e| redactor.redact(e).into_owned()),
            ..r.clone()
        })
        .collect();
    let mut errors = Vec::new();
    for &channel in &config.notify_digest {
        match deliver_with_retries(http, config, channel, Message::Digest(&runs), None).await {
            Ok(_) => tracing::info!(channel = channel.as_str(), runs = runs.len(), "digest sent"),
            Err(e) => {
                tracing::warn!(channel = channel.as_str(), kind = %e.kind, error = %e.message, "digest failed");
                errors.push(format!("{}: {}", channel.as_str(), e.message));
            }
        }
    }
    errors
}

/// A transport failure. reqwest's Display includes the URL, which holds the token: it is cut
/// out.
pub(crate) fn transport(service: &str, e: &reqwest::Error) -> StepError {
    let mut text = e.to_string();
    if let Some(u) = e.url() {
        text = text.replace(u.as_str(), "[url]");
    }
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Network
    };
    let mut source = String::new();
    let mut cur = std::error::Error::source(e);
    while let Some(s) = cur {
        source.push_str(&format!(": {s}"));
        cur = s.source();
    }
    if let Some(u) = e.url() {
        source = source.replace(u.as_str(), "[url]");
    }
    StepError::new(kind, format!("could not reach {service} ({text}{source})"))
}

/// The most of a Telegram or Discord reply that is read. Theirs are a few KB (the message
/// echoed back, at most a few thousand characters); anything larger is not from them (a wrong
/// `TELEGRAM_API_URL`, a proxy's page) and must not fill the process's memory.
pub(crate) const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// Reads a service's JSON reply, at most [`MAX_REPLY_BYTES`]: `Null` for a body that is not
/// JSON or breaks off (the caller judges by the status), an error for a larger one, refused
/// as soon as it is known to be (its `Content-Length`, or the byte past the cap).
pub(crate) async fn read_reply(
    mut resp: reqwest::Response,
    service: &str,
    setting: &str,
) -> Result<Value, StepError> {
    let too_big = || {
        StepError::new(
            ErrorKind::BadResponse,
            format!(
                "{service} sent a reply larger than {} MiB, which no {service} reply is; refused — check {setting}",
                MAX_REPLY_BYTES >> 20
            ),
        )
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_REPLY_BYTES as u64)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_REPLY_BYTES {
                    return Err(too_big());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => return Ok(Value::Null),
        }
    }
    Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Splits plain text into pieces of at most `limit` characters, between words when possible.
pub fn split_text(text: &str, limit: usize) -> Vec<String> {
    split(text, limit, Markup::Plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_stable() {
        assert_eq!(fnv64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn blueprint_notify_overrides_the_global_defaults() {
        let mut vars = std::collections::HashMap::new();
        vars.insert(
            "NOTIFY_ON_FAILURE".to_string(),
            "telegram, discord".to_string(),
        );
        let config = Config::from_vars(&vars).unwrap();
        let mut bp: Blueprint = serde_json::from_value(json!({
            "name": "x", "nodes": [{ "id": "a", "type": "transform", "template": "x" }]
        }))
        .unwrap();
        assert_eq!(
            run_channels(&bp, &config, RunStatus::Error),
            [Channel::Telegram, Channel::Discord]
        );
        assert!(run_channels(&bp, &config, RunStatus::Success).is_empty());
        assert!(run_channels(&bp, &config, RunStatus::Cancelled).is_empty());
        bp.notify = Some(crate::blueprint::RunNotify {
            on_success: vec![Channel::Discord],
            on_failure: vec![],
        });
        assert!(run_channels(&bp, &config, RunStatus::Error).is_empty());
        assert_eq!(
            run_channels(&bp, &config, RunStatus::Success),
            [Channel::Discord]
        );
    }
}
