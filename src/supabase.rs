//! Active blueprints from a Supabase table over its REST API (PostgREST, PROTOCOLS.md §6):
//! `GET {SUPABASE_URL}/rest/v1/blueprints?select=*&active=eq.true` with the key in `apikey`
//! and `Authorization: Bearer`. Each row holds its blueprint in a `jsonb` column named
//! `blueprint` (or the row itself is the blueprint, when it has `nodes`). A row whose
//! blueprint is invalid is reported with its row id and skipped; the others still run.
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
    let text = resp
        .text()
        .await
        .map_err(|e| SupabaseError::Network(e.to_string()))?;
    let reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
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
        return Err(SupabaseError::Status {
            status,
            message,
            hint,
        });
    }
    let Value::Array(rows) = reply else {
        return Err(SupabaseError::BadReply(text.chars().take(120).collect()));
    };
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| row(i, r))
        .collect())
}

fn row(index: usize, r: Value) -> Row {
    let id = match r.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("#{}", index + 1),
    };
    let doc = match r.get("blueprint") {
        // A jsonb column arrives as JSON; a text column holding JSON is accepted too.
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("its blueprint column is text that is not JSON ({e})")),
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
