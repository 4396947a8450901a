//! A run's summary as a Telegram HTML message and as a Discord embed, and the digest of
//! `run --all-active`.

use crate::events::RunStatus;
use serde_json::{json, Value};

/// What a run-level notification says about one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub run_id: String,
    pub blueprint: String,
    pub status: RunStatus,
    pub total_time_ms: u64,
    pub steps: usize,
    pub tokens_used: u64,
    pub failed_step: Option<String>,
    pub error: Option<String>,
}

/// Escapes text for Telegram's `parse_mode: HTML` (only `<`, `>` and `&` need it).
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            c => out.push(c),
        }
    }
    out
}

fn icon(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Success => "✅",
        RunStatus::Error => "❌",
        RunStatus::Cancelled => "⏹",
        RunStatus::Queued | RunStatus::Running => "⏳",
    }
}

fn verb(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Success => "succeeded",
        RunStatus::Error => "failed",
        RunStatus::Cancelled => "was cancelled",
        RunStatus::Queued | RunStatus::Running => "is running",
    }
}

/// Embed colour by status.
pub fn colour(s: RunStatus) -> u32 {
    match s {
        RunStatus::Success => 0x2E_CC71,
        RunStatus::Error => 0xE7_4C3C,
        RunStatus::Cancelled => 0x95_A5A6,
        RunStatus::Queued | RunStatus::Running => 0x34_98DB,
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// Cuts to at most `n` characters (the services' limits count characters), with an ellipsis.
pub use crate::text::clip_chars as clip;

impl RunSummary {
    /// Telegram, `parse_mode: HTML`. The error is clipped so the message fits in one part.
    pub fn telegram_html(&self) -> String {
        let mut t = format!(
            "{} <b>{}</b> {}\n{} · {} steps · {} tokens\nrun <code>{}</code>",
            icon(self.status),
            escape_html(&self.blueprint),
            verb(self.status),
            secs(self.total_time_ms),
            self.steps,
            self.tokens_used,
            escape_html(&self.run_id),
        );
        if let Some(step) = &self.failed_step {
            t.push_str(&format!(
                "\nfailed step: <code>{}</code>",
                escape_html(step)
            ));
        }
        if let Some(e) = &self.error {
            t.push_str(&format!("\n<pre>{}</pre>", escape_html(&clip(e, 3000))));
        }
        t
    }

    /// A Discord webhook body: one embed, within Discord's embed limits.
    pub fn discord_body(&self) -> Value {
        let mut fields = vec![
            json!({ "name": "Blueprint", "value": clip(&self.blueprint, 1024), "inline": true }),
            json!({ "name": "Status", "value": self.status.as_str(), "inline": true }),
            json!({ "name": "Duration", "value": secs(self.total_time_ms), "inline": true }),
        ];
        if let Some(step) = &self.failed_step {
            fields
                .push(json!({ "name": "Failed step", "value": clip(step, 1024), "inline": true }));
        }
        if let Some(e) = &self.error {
            fields.push(json!({ "name": "Error", "value": clip(e, 1000), "inline": false }));
        }
        json!({
            "embeds": [{
                "title": clip(&format!("{} {} {}", icon(self.status), self.blueprint, verb(self.status)), 256),
                "color": colour(self.status),
                "fields": fields,
                "footer": { "text": clip(&format!("run {} · {} steps · {} tokens", self.run_id, self.steps, self.tokens_used), 2048) },
            }],
            "allowed_mentions": { "parse": [] },
        })
    }
}

/// The digest of several runs (`run --all-active`), as Telegram HTML.
pub fn digest_html(runs: &[RunSummary]) -> String {
    let failed = runs
        .iter()
        .filter(|r| r.status != RunStatus::Success)
        .count();
    let mut t = format!(
        "<b>OmniFlow: {} blueprint{} ran, {} failed</b>",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        failed
    );
    for r in runs {
        t.push_str(&format!(
            "\n{} <b>{}</b> {} in {}",
            icon(r.status),
            escape_html(&r.blueprint),
            r.status.as_str(),
            secs(r.total_time_ms)
        ));
        if let Some(e) = &r.error {
            t.push_str(&format!(" — {}", escape_html(&clip(e, 300))));
        }
    }
    t
}

/// The digest as a Discord body: one embed, a field per run (the first 25), colour red when
/// anything failed.
pub fn digest_discord(runs: &[RunSummary]) -> Value {
    let failed = runs
        .iter()
        .filter(|r| r.status != RunStatus::Success)
        .count();
    let fields: Vec<Value> = runs
        .iter()
        .take(25)
        .map(|r| {
            let mut v = format!("{} in {}", r.status.as_str(), secs(r.total_time_ms));
            if let Some(e) = &r.error {
                v.push_str(&format!("\n{}", clip(e, 180)));
            }
            json!({ "name": clip(&format!("{} {}", icon(r.status), r.blueprint), 256), "value": clip(&v, 200), "inline": false })
        })
        .collect();
    let status = if failed == 0 {
        RunStatus::Success
    } else {
        RunStatus::Error
    };
    json!({
        "embeds": [{
            "title": format!("OmniFlow: {} blueprint{} ran, {} failed", runs.len(), if runs.len() == 1 { "" } else { "s" }, failed),
            "color": colour(status),
            "fields": fields,
        }],
        "allowed_mentions": { "parse": [] },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> RunSummary {
        RunSummary {
            run_id: "r1".into(),
            blueprint: "a<b>&c".into(),
            status: RunStatus::Error,
            total_time_ms: 1234,
            steps: 3,
            tokens_used: 9,
            failed_step: Some("post".into()),
            error: Some("x < y & z".into()),
        }
    }

    #[test]
    fn telegram_text_is_escaped() {
        let t = failed().telegram_html();
        assert!(t.contains("<b>a&lt;b&gt;&amp;c</b> failed"), "{t}");
        assert!(t.contains("<pre>x &lt; y &amp; z</pre>"), "{t}");
        assert!(t.contains("1.2s"));
    }

    #[test]
    fn discord_embed_has_the_fields_and_colour() {
        let b = failed().discord_body();
        let e = &b["embeds"][0];
        assert_eq!(e["color"], json!(0xE74C3C));
        let names: Vec<&str> = e["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["Blueprint", "Status", "Duration", "Failed step", "Error"]
        );
        assert_eq!(b["allowed_mentions"], json!({ "parse": [] }));
    }
}
