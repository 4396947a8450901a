//! Telegram and Discord delivery for `notify` nodes. Tokens and webhook URLs never appear in
//! an error message: reqwest's texts have the URL removed, and messages name the variable
//! instead.

use crate::blueprint::Channel;
use crate::config::Config;
use crate::error::{ErrorKind, StepError};
use serde_json::{json, Value};
use std::time::Duration;

/// Telegram's limit on one message.
pub const TELEGRAM_LIMIT: usize = 4096;
/// Discord's limit on one message's content.
pub const DISCORD_LIMIT: usize = 2000;

/// Sends `text` on `channel`; long texts go as several messages split between words.
pub async fn send(
    http: &reqwest::Client,
    config: &Config,
    channel: Channel,
    text: &str,
    parse_mode: Option<&str>,
) -> Result<Value, StepError> {
    match channel {
        Channel::Telegram => telegram(http, config, text, parse_mode).await,
        Channel::Discord => discord(http, config, text).await,
    }
}

async fn telegram(
    http: &reqwest::Client,
    config: &Config,
    text: &str,
    parse_mode: Option<&str>,
) -> Result<Value, StepError> {
    let (Some(token), Some(chat)) = (&config.telegram_bot_token, &config.telegram_chat_id) else {
        return Err(StepError::new(
            ErrorKind::Config,
            "Telegram is not configured: set TELEGRAM_BOT_TOKEN (from @BotFather) and \
             TELEGRAM_CHAT_ID in .env, or run with --sandbox to record notifications instead",
        ));
    };
    let url = format!(
        "{}/bot{}/sendMessage",
        config.telegram_api_url.trim_end_matches('/'),
        token
    );
    let mut ids = Vec::new();
    for part in split_text(text, TELEGRAM_LIMIT) {
        let mut body = json!({ "chat_id": chat, "text": part });
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
        let header_wait = retry_after_header(resp.headers());
        let reply: Value = resp.json().await.unwrap_or(Value::Null);
        if reply["ok"].as_bool() == Some(true) {
            ids.push(reply["result"]["message_id"].clone());
            continue;
        }
        let desc = reply["description"]
            .as_str()
            .unwrap_or("no description")
            .to_string();
        let code = reply["error_code"]
            .as_u64()
            .map(|c| c as u16)
            .unwrap_or(status);
        let wait = reply["parameters"]["retry_after"]
            .as_f64()
            .map(Duration::from_secs_f64)
            .or(header_wait);
        let (kind, hint) = match code {
            429 => (ErrorKind::RateLimited, "Telegram asks to slow down"),
            401 => (ErrorKind::Auth, "the bot token is invalid: check TELEGRAM_BOT_TOKEN"),
            403 => (
                ErrorKind::Auth,
                "the bot cannot write to this chat (blocked, or not a member): add the bot to the chat",
            ),
            400 if desc.contains("chat not found") => (
                ErrorKind::InvalidRequest,
                "check TELEGRAM_CHAT_ID, and send the bot a message first",
            ),
            400 => (ErrorKind::InvalidRequest, "Telegram refused the message"),
            404 => (ErrorKind::Auth, "the bot token is invalid: check TELEGRAM_BOT_TOKEN"),
            500..=599 => (ErrorKind::Server, "Telegram failed"),
            _ => (ErrorKind::InvalidRequest, "Telegram refused the message"),
        };
        let mut e = StepError::new(kind, format!("Telegram error {code}: {desc} — {hint}"));
        e.retry_after = wait;
        return Err(e);
    }
    Ok(json!({ "channel": "telegram", "delivered": true, "messageIds": ids }))
}

async fn discord(http: &reqwest::Client, config: &Config, text: &str) -> Result<Value, StepError> {
    let Some(hook) = &config.discord_webhook else {
        return Err(StepError::new(
            ErrorKind::Config,
            "Discord is not configured: set DISCORD_WEBHOOK (Server Settings → Integrations → \
             Webhooks → Copy Webhook URL) in .env, or run with --sandbox",
        ));
    };
    let mut sent = 0;
    for part in split_text(text, DISCORD_LIMIT) {
        let body = json!({ "content": part, "allowed_mentions": { "parse": [] } });
        let resp = http
            .post(hook)
            .json(&body)
            .send()
            .await
            .map_err(|e| transport("Discord", &e))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            sent += 1;
            continue;
        }
        let header_wait = retry_after_header(resp.headers());
        let reply: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = reply["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        let wait = reply["retry_after"]
            .as_f64()
            .map(Duration::from_secs_f64)
            .or(header_wait);
        let (kind, hint) = match status {
            429 => (ErrorKind::RateLimited, "Discord asks to slow down"),
            401 | 403 => (
                ErrorKind::Auth,
                "the webhook refused us: check DISCORD_WEBHOOK",
            ),
            404 => (
                ErrorKind::InvalidRequest,
                "unknown webhook: it was deleted — create a new one and do not use this one again",
            ),
            500..=599 => (ErrorKind::Server, "Discord failed"),
            _ => (ErrorKind::InvalidRequest, "Discord refused the message"),
        };
        let mut e = StepError::new(kind, format!("Discord error {status}: {msg} — {hint}"));
        e.retry_after = wait;
        return Err(e);
    }
    Ok(json!({ "channel": "discord", "delivered": true, "messages": sent }))
}

fn transport(service: &str, e: &reqwest::Error) -> StepError {
    // reqwest's Display includes the URL, which holds the token: cut it out.
    let mut text = e.to_string();
    if let Some(u) = e.url() {
        text = text.replace(u.as_str(), "[url]");
    }
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Network
    };
    let source = std::error::Error::source(e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    StepError::new(kind, format!("could not reach {service} ({text}{source})"))
}

/// `Retry-After` in seconds (integer or decimal), if present.
pub fn retry_after_header(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    h.get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Splits text into pieces of at most `limit` characters, between words when possible.
pub fn split_text(text: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.chars().count() > limit {
        let cut = rest
            .char_indices()
            .nth(limit)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        let head = &rest[..cut];
        let at = head
            .rfind('\n')
            .or_else(|| head.rfind(' '))
            .filter(|&i| i > 0)
            .unwrap_or(cut);
        out.push(rest[..at].trim_end().to_string());
        rest = rest[at..].trim_start();
    }
    let rest = rest.trim_end();
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_words_whole_and_respects_the_limit() {
        let text = "word ".repeat(1000);
        let parts = split_text(&text, 2000);
        assert!(parts.len() >= 3);
        for p in &parts {
            assert!(p.chars().count() <= 2000);
            assert!(!p.starts_with(' ') && !p.ends_with(' '));
            assert!(p.split(' ').all(|w| w == "word"));
        }
        assert_eq!(split_text("short", 10), vec!["short"]);
    }
}
