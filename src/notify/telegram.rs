//! Telegram Bot API `sendMessage` (PROTOCOLS.md §4). The token sits in the URL path: it never
//! appears in an error (reqwest's texts have the URL cut out; messages name the variable).

use super::transport;
use crate::config::Config;
use crate::error::{ErrorKind, StepError};
use serde_json::{json, Value};
use std::time::Duration;

/// Telegram's limit on one message (UTF-16 units, after entity parsing).
pub const LIMIT: usize = 4096;

/// Token and chat, or the error that says how to set them.
pub(crate) fn credentials(config: &Config) -> Result<(&str, &str), StepError> {
    match (&config.telegram_bot_token, &config.telegram_chat_id) {
        (Some(t), Some(c)) => Ok((t, c)),
        (None, _) => Err(StepError::new(
            ErrorKind::Config,
            "Telegram is not configured: set TELEGRAM_BOT_TOKEN (from @BotFather) and \
             TELEGRAM_CHAT_ID in .env, or run with --sandbox to record notifications instead",
        )),
        (Some(_), None) => Err(StepError::new(
            ErrorKind::Config,
            "TELEGRAM_CHAT_ID is missing: send your bot a message, then read the chat id from \
             https://api.telegram.org/bot<token>/getUpdates and set TELEGRAM_CHAT_ID in .env",
        )),
    }
}

/// Sends one message; returns its `message_id`.
pub(crate) async fn send_part(
    http: &reqwest::Client,
    config: &Config,
    text: &str,
    parse_mode: Option<&str>,
) -> Result<Value, StepError> {
    let (token, chat) = credentials(config)?;
    let url = format!(
        "{}/bot{}/sendMessage",
        config.telegram_api_url.trim_end_matches('/'),
        token
    );
    let mut body = json!({ "chat_id": chat, "text": text });
    if let Some(pm) = parse_mode {
        body["parse_mode"] = json!(pm);
    }
    let resp = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| transport("Telegram", &e))?;
    let status = resp.status().as_u16();
    let header_wait = crate::retry::retry_after_header(resp.headers());
    let reply = super::read_reply(resp, "Telegram", "TELEGRAM_API_URL").await?;
    if reply["ok"].as_bool() == Some(true) {
        return Ok(reply["result"]["message_id"].clone());
    }
    if (200..300).contains(&status) {
        return Err(StepError::new(
            ErrorKind::BadResponse,
            "Telegram answered without \"ok\": true; is TELEGRAM_API_URL right?",
        ));
    }
    Err(classify(status, &reply, header_wait))
}

/// Maps an error reply (HTTP status and the `{ok:false, error_code, description}` envelope).
pub(crate) fn classify(status: u16, reply: &Value, header_wait: Option<Duration>) -> StepError {
    let desc = reply["description"]
        .as_str()
        .unwrap_or("no description")
        .to_string();
    // Branch on the HTTP status: error_code's contents "are subject to change".
    let code = if status == 0 {
        reply["error_code"].as_u64().unwrap_or(0) as u16
    } else {
        status
    };
    let wait = reply["parameters"]["retry_after"]
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(crate::limits::secs_f64)
        .or(header_wait);
    let lower = desc.to_ascii_lowercase();
    let (kind, hint) = match code {
        429 => (ErrorKind::RateLimited, "Telegram asks to slow down; waiting as it says"),
        401 => (
            ErrorKind::Auth,
            "the bot token is invalid: check TELEGRAM_BOT_TOKEN (from @BotFather)",
        ),
        403 if lower.contains("blocked") => (
            ErrorKind::Auth,
            "the user blocked the bot: they must unblock it (or use another TELEGRAM_CHAT_ID)",
        ),
        403 => (
            ErrorKind::Auth,
            "the bot cannot write to this chat (not a member, or kicked): add the bot to the chat",
        ),
        400 if lower.contains("chat not found") => (
            ErrorKind::InvalidRequest,
            "check TELEGRAM_CHAT_ID, and send the bot a message first",
        ),
        400 if lower.contains("parse entities") => (
            ErrorKind::InvalidRequest,
            "the text is not valid for its parseMode: escape <, > and & for HTML, or drop parseMode",
        ),
        400 => (ErrorKind::InvalidRequest, "Telegram refused the message"),
        404 => (
            ErrorKind::Auth,
            "the bot token is malformed or TELEGRAM_API_URL is wrong: check TELEGRAM_BOT_TOKEN",
        ),
        500..=599 => (ErrorKind::Server, "Telegram failed; retrying"),
        _ => (ErrorKind::InvalidRequest, "Telegram refused the message"),
    };
    let mut e = StepError::new(kind, format!("Telegram error {code}: {desc} — {hint}"));
    e.retry_after = wait;
    e
}
