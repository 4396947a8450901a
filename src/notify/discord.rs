//! Discord webhooks (PROTOCOLS.md §5). The webhook URL holds its token: it never appears in an
//! error. A webhook that answered 404 is deleted: Discord says not to use it again, so this
//! process stops calling it.

use super::transport;
use crate::config::Config;
use crate::error::{ErrorKind, StepError};
use serde_json::Value;
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Discord's limit on one message's `content`.
pub const LIMIT: usize = 2000;

/// Webhooks that answered 404 Unknown Webhook in this process.
fn dead() -> &'static Mutex<HashSet<String>> {
    static DEAD: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    DEAD.get_or_init(|| Mutex::new(HashSet::new()))
}

/// The webhook URL, checked, or the error that says how to fix it (never quoting the URL).
pub(crate) fn webhook(config: &Config) -> Result<&str, StepError> {
    let Some(hook) = config.discord_webhook.as_deref() else {
        return Err(StepError::new(
            ErrorKind::Config,
            "Discord is not configured: set DISCORD_WEBHOOK (Server Settings → Integrations → \
             Webhooks → Copy Webhook URL) in .env, or run with --sandbox",
        ));
    };
    let ok = reqwest::Url::parse(hook).ok().is_some_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some()
            && u.path().contains("/webhooks/")
            && u.path_segments()
                .map(|s| s.filter(|p| !p.is_empty()).count())
                >= Some(3)
    });
    if !ok {
        return Err(StepError::new(
            ErrorKind::Config,
            "DISCORD_WEBHOOK is not a webhook URL: expected https://discord.com/api/webhooks/<id>/<token> \
             (copy it again from Server Settings → Integrations → Webhooks)",
        ));
    }
    if dead()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(hook)
    {
        return Err(StepError::new(
            ErrorKind::InvalidRequest,
            "DISCORD_WEBHOOK answered 404 Unknown Webhook earlier: it was deleted and is not used \
             again — create a new webhook and update DISCORD_WEBHOOK",
        ));
    }
    Ok(hook)
}

/// Posts one message body (`content` or `embeds`); returns the message id (we ask
/// `wait=true`), or null when the server answers 204.
pub(crate) async fn send_part(
    http: &reqwest::Client,
    config: &Config,
    body: &Value,
) -> Result<Value, StepError> {
    let hook = webhook(config)?;
    let resp = http
        .post(hook)
        .query(&[("wait", "true")])
        .json(body)
        .send()
        .await
        .map_err(|e| transport("Discord", &e))?;
    let status = resp.status().as_u16();
    let header_wait = crate::retry::retry_after_header(resp.headers());
    let reply = super::read_reply(resp, "Discord", "DISCORD_WEBHOOK").await?;
    if (200..300).contains(&status) {
        return Ok(reply.get("id").cloned().unwrap_or(Value::Null));
    }
    if status == 404 {
        dead()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hook.to_string());
    }
    Err(classify(status, &reply, header_wait))
}

pub(crate) fn classify(status: u16, reply: &Value, header_wait: Option<Duration>) -> StepError {
    let msg = reply["message"]
        .as_str()
        .unwrap_or("no message")
        .to_string();
    let wait = reply["retry_after"]
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(crate::limits::secs_f64)
        .or(header_wait);
    let (kind, hint) = match status {
        429 => (
            ErrorKind::RateLimited,
            "Discord asks to slow down; waiting as it says",
        ),
        401 | 403 => (
            ErrorKind::Auth,
            "the webhook refused us (its token is wrong): copy DISCORD_WEBHOOK again",
        ),
        404 => (
            ErrorKind::InvalidRequest,
            "unknown webhook: it was deleted — create a new one and do not use this one again",
        ),
        400 => (
            ErrorKind::InvalidRequest,
            "Discord refused the message (too long, or empty)",
        ),
        500..=599 => (ErrorKind::Server, "Discord failed; retrying"),
        _ => (ErrorKind::InvalidRequest, "Discord refused the message"),
    };
    let mut e = StepError::new(kind, format!("Discord error {status}: {msg} — {hint}"));
    e.retry_after = wait;
    e
}
