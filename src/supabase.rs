//! Active blueprints from a Supabase table over its REST API (PostgREST, PROTOCOLS.md §6):
//! `GET {SUPABASE_URL}/rest/v1/blueprints?select=*&active=eq.true` with the key in `apikey`
//! and `Authorization: Bearer`. Each row holds its blueprint in a `jsonb` column named
//! `blueprint` (or the row itself is the blueprint, when it has `nodes`). A row whose
//! blueprint is invalid is reported with its row id and skipped; the others still run.
//!
//! Sizes are checked before anything is parsed, as for files: the reply is read up to
//! [`REPLY_BLUEPRINTS`] × `MAX_BLUEPRINT_BYTES`, cut into its rows by one pass over the bytes,
//! and a row over `MAX_BLUEPRINT_BYTES` is reported with its id, unparsed.
//!
//! The table, for reference:
//! ```sql
//! create table blueprints (
//!   id bigint generated always as identity primary key,
//!   name text not null,
//!   active boolean not null default true,
//!   blueprint jsonb not null,
//!   created_at timestamptz not null default now()
//! );
//! ```

// Nothing a service or a schedule answers may take the process down.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use crate::blueprint::{self, Blueprint};
use crate::config::Config;
use serde_json::Value;
use std::time::Duration;

/// The table read.
pub const TABLE: &str = "blueprints";

/// The reply holds every active row, so it may be this many times `MAX_BLUEPRINT_BYTES` (64 MiB
/// at the default): room for several blueprints at the limit and for hundreds of ordinary
/// ones, while a runaway table or a misbehaving proxy is refused instead of buffered whole.
pub const REPLY_BLUEPRINTS: usize = 4;

/// One row: its id and its blueprint, or why it cannot be used.
#[derive(Debug)]
pub struct Row {
    pub id: String,
    pub blueprint: Result<Blueprint, String>,
}

/// Why the rows could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum SupabaseError {
    #[error("Supabase is not configured: set SUPABASE_URL (https://<project>.supabase.co) and SUPABASE_KEY (Project Settings → API)")]
    NotConfigured,
    #[error("SUPABASE_URL is not a URL (expected https://<project>.supabase.co)")]
    BadUrl,
    #[error("could not reach Supabase ({0})")]
    Network(String),
    #[error("Supabase answered HTTP {status}: {message} — {hint}")]
    Status {
        status: u16,
        message: String,
        hint: String,
    },
    #[error("Supabase answered something that is not a JSON array of rows ({0})")]
    BadReply(String),
    #[error("Supabase sent a reply larger than {0} ({REPLY_BLUEPRINTS} × MAX_BLUEPRINT_BYTES); refused unread: mark fewer rows active, split the blueprints' data out of them, or raise MAX_BLUEPRINT_BYTES")]
    TooLarge(String),
}

/// Reads every active row of the `blueprints` table.
pub async fn active_blueprints(
    http: &reqwest::Client,
    config: &Config,
) -> Result<Vec<Row>, SupabaseError> {
    let (Some(base), Some(key)) = (&config.supabase_url, &config.supabase_key) else {
        return Err(SupabaseError::NotConfigured);
    };
    let url = reqwest::Url::parse(&format!("{}/rest/v1/{TABLE}", base.trim_end_matches('/')))
        .map_err(|_| SupabaseError::BadUrl)?;
    let resp = http
        .get(url)
        .query(&[("select", "*"), ("active", "eq.true")])
        .header("apikey", key)
        .header(reqwest::header::AUTHORIZATION, format!("Bearer {key}"))
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| {
            // The key is in headers, never in reqwest's text; the URL holds none.
            let mut text = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(s) = cur {
                text.push_str(&format!(": {s}"));
                cur = s.source();
            }
            SupabaseError::Network(text)
        })?;
    let status = resp.status().as_u16();
    let max = config.limits.max_blueprint_bytes;
    let body = read_body(resp, max.saturating_mul(REPLY_BLUEPRINTS)).await?;
    let text = String::from_utf8_lossy(&body);
    if (200..300).contains(&status) {
        let Some(rows) = elements(&body) else {
            return Err(SupabaseError::BadReply(text.chars().take(120).collect()));
        };
        return Ok(rows
            .into_iter()
            .enumerate()
            .map(|(i, range)| row_text(i, &text[range], max))
            .collect());
    }
    // An error reply is a small object; a large one is not parsed, only quoted.
    let reply: Value = if text.len() <= 64 * 1024 {
        serde_json::from_str(&text).unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let message = reply["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| text.chars().take(200).collect());
    let code = reply["code"].as_str().unwrap_or("");
    let hint = match (status, code) {
        (401, _) | (403, _) => "check SUPABASE_KEY (Project Settings → API; the anon key needs a read policy, or use the service_role key)".to_string(),
        (404, _) | (_, "42P01") | (_, "PGRST205") => format!("create the table \"{TABLE}\" (see README: Supabase)"),
        (_, "42703") => format!("the table \"{TABLE}\" needs the columns active (boolean) and blueprint (jsonb)"),
        _ => reply["hint"].as_str().unwrap_or("see the Supabase logs").to_string(),
    };
    Err(SupabaseError::Status {
        status,
        message,
        hint,
    })
}

/// The reply's bytes, refused once they pass `cap` (a `Content-Length` over it is refused
/// before reading).
async fn read_body(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, SupabaseError> {
    let too_big = || SupabaseError::TooLarge(crate::limits::human_bytes(cap));
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| SupabaseError::Network(e.to_string()))?
    {
        if body.len().saturating_add(chunk.len()) > cap {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The byte ranges of a JSON array's elements, found by one pass that tracks strings and
/// nesting without parsing; `None` when the text is not an array (or not UTF-8, or cut off).
fn elements(body: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    std::str::from_utf8(body).ok()?;
    let first = body.iter().position(|c| !c.is_ascii_whitespace())?;
    if body[first] != b'[' {
        return None;
    }
    let (mut out, mut depth, mut start) = (Vec::new(), 0usize, None);
    // Only whitespace comes before `first`, so the scan may start at 0.
    for (i, c) in blueprint::json_outside_strings(body) {
        match c {
            b'[' | b'{' => {
                if depth == 1 && start.is_none() {
                    start = Some(i);
                }
                depth += 1;
            }
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    if let Some(s) = start.take() {
                        out.push(s..i);
                    }
                    return body[i + 1..]
                        .iter()
                        .all(u8::is_ascii_whitespace)
                        .then_some(out);
                }
            }
            b',' if depth == 1 => out.push(start.take()?..i),
            _ if depth == 1 && start.is_none() && !c.is_ascii_whitespace() => start = Some(i),
            _ => {}
        }
    }
    None
}

/// The `id` of a row's text, read without building the rest of it (serde skips the other
/// fields without allocating); `None` when there is none or the text is not an object.
fn id_of(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: Option<Value>,
    }
    match serde_json::from_str::<Id>(text).ok()?.id? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One row from its text: refused unparsed when over `MAX_BLUEPRINT_BYTES`, else parsed.
fn row_text(index: usize, text: &str, max: usize) -> Row {
    match blueprint::check_size(text, blueprint::Format::Json, max) {
        Ok(()) => match serde_json::from_str(text) {
            Ok(r) => row(index, r, max),
            Err(e) => Row {
                id: format!("#{}", index + 1),
                blueprint: Err(format!("Supabase row #{}: not JSON ({e})", index + 1)),
            },
        },
        Err(size) => {
            let id = id_of(text).unwrap_or_else(|| format!("#{}", index + 1));
            Row {
                blueprint: Err(format!("Supabase row {id}: the row {size}")),
                id,
            }
        }
    }
}

fn row(index: usize, r: Value, max: usize) -> Row {
    let id = match r.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("#{}", index + 1),
    };
    let doc = match r.get("blueprint") {
        // A jsonb column arrives as JSON; a text column holding JSON is accepted too.
        Some(Value::String(s)) => blueprint::check_size(s, blueprint::Format::Json, max)
            .map_err(|size| format!("its blueprint column {size}"))
            .and_then(|()| {
                serde_json::from_str(s)
                    .map_err(|e| format!("its blueprint column is text that is not JSON ({e})"))
            }),
        Some(v @ Value::Object(_)) => Ok(v.clone()),
        Some(other) => Err(format!(
            "its blueprint column holds {}, expected a JSON object",
            match other {
                Value::Null => "null",
                Value::Array(_) => "an array",
                _ => "a scalar",
            }
        )),
        None if r.get("nodes").is_some() => {
            let mut v = r.clone();
            if let Value::Object(m) = &mut v {
                for k in ["id", "created_at", "updated_at"] {
                    m.remove(k);
                }
            }
            Ok(v)
        }
        None => Err("it has no blueprint column (expected a jsonb column named blueprint)".into()),
    };
    let blueprint = doc.and_then(|d| {
        blueprint::load_value(d).map_err(|problems| {
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
    });
    let blueprint = blueprint.map_err(|e| format!("Supabase row {id}: {e}"));
    Row { id, blueprint }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(body: &str) -> Option<Vec<&str>> {
        elements(body.as_bytes()).map(|v| v.into_iter().map(|r| body[r].trim()).collect())
    }

    #[test]
    fn a_reply_is_cut_into_its_rows_without_parsing_them() {
        assert_eq!(
            cut(r#" [ {"id":1,"b":{"x":[1,2]}} , {"id":"a]\",}"} ,3, "s,]" ] "#),
            Some(vec![
                r#"{"id":1,"b":{"x":[1,2]}}"#,
                r#"{"id":"a]\",}"}"#,
                "3",
                r#""s,]""#
            ])
        );
        assert_eq!(cut("[]"), Some(vec![]));
        for bad in [r#"{"id":1}"#, "[{}", "[{}] x", "", "[,]"] {
            assert_eq!(cut(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_oversized_row_keeps_its_id() {
        let text = format!(
            r#"{{"blueprint":{{"v":[{}]}},"id":42}}"#,
            "1,".repeat(5000) + "1"
        );
        let row = row_text(0, &text, 4096);
        assert_eq!(row.id, "42");
        let e = row.blueprint.unwrap_err();
        assert!(e.starts_with("Supabase row 42: the row is "), "{e}");
        assert!(e.contains("MAX_BLUEPRINT_BYTES (4 KiB)"), "{e}");
    }
}
