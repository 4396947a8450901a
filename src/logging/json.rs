//! The log line format: one flat JSON object per line (shape documented in [`super`]).

use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Keys every line has; a field with one of these names is written as `field_<name>`.
const RESERVED: [&str; 4] = ["timestamp", "level", "target", "message"];

/// Formats an event as one flat JSON object: `timestamp`, `level`, `target`, `message`, then
/// the fields of the enclosing spans (outermost first) and of the event (the event wins).
/// Span fields are read as [`JsonFields`] stored them, so the layer must use
/// `.fmt_fields(JsonFields::new())`.
pub(crate) struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;

        let mut fields = FieldMap::default();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(stored) = ext.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&stored.fields) {
                    for (k, v) in map {
                        fields.insert(&k, v);
                    }
                }
            }
        }
        event.record(&mut fields);

        let meta = event.metadata();
        // Events bridged from the `log` crate (reqwest, hyper) carry their real target in a
        // field; the tracing target is just "log".
        let target = fields
            .log_target
            .take()
            .unwrap_or_else(|| meta.target().to_string());

        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(target));
        line.insert(
            "message".into(),
            fields
                .message
                .take()
                .unwrap_or(Value::String(String::new())),
        );
        line.extend(fields.map);

        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields as JSON values.
#[derive(Default)]
struct FieldMap {
    message: Option<Value>,
    log_target: Option<String>,
    map: Map<String, Value>,
}

impl FieldMap {
    fn insert(&mut self, name: &str, value: Value) {
        if name == "message" {
            self.message = Some(value);
        } else if name == "log.target" {
            if let Value::String(s) = value {
                self.log_target = Some(s);
            }
        } else if name.starts_with("log.") {
            // log.module_path, log.file, log.line: noise in a log pane.
        } else if RESERVED.contains(&name) {
            self.map.insert(format!("field_{name}"), value);
        } else {
            self.map.insert(name.to_string(), value);
        }
    }
}

impl Visit for FieldMap {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.insert(field.name(), v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field.name(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field.name(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field.name(), Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field.name(), Value::String(value.to_string()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field.name(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field.name(), Value::String(format!("{value:?}")));
    }
}

/// One line of a log file, parsed: what the console's log pane shows.
///
/// ```
/// use omniflow::logging::LogLine;
/// let line = LogLine::parse(
///     r#"{"timestamp":"2025-01-31T17:06:02.123456Z","level":"WARN","target":"omniflow::engine","message":"retrying","run_id":"r-1","attempt":2}"#,
/// ).unwrap();
/// assert_eq!(line.level, "WARN");
/// assert_eq!(line.fields["run_id"], "r-1");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// RFC 3339 UTC, as written.
    pub timestamp: String,
    /// `TRACE` | `DEBUG` | `INFO` | `WARN` | `ERROR`.
    pub level: String,
    pub target: String,
    pub message: String,
    /// Every other key of the line (`run_id`, `step`, …).
    pub fields: Map<String, Value>,
}

impl LogLine {
    /// `None` when the line is not an OmniFlow log line (not JSON, or lacking a fixed key).
    pub fn parse(line: &str) -> Option<LogLine> {
        let Value::Object(mut map) = serde_json::from_str::<Value>(line.trim_end()).ok()? else {
            return None;
        };
        let mut take = |key: &str| match map.remove(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        Some(LogLine {
            timestamp: take("timestamp")?,
            level: take("level")?,
            target: take("target")?,
            message: take("message")?,
            fields: map,
        })
    }
}
