//! The typed blueprint. Files are first checked against the schema by the validator (which
//! reports every problem with its path); only a valid document is deserialized into these
//! types, so serde here can be lenient.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// One automation: a graph of nodes plus what it needs to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Blueprint {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether `run --all-active` and the scheduler pick it up.
    #[serde(default = "yes")]
    pub active: bool,
    #[serde(default)]
    pub priority: Priority,
    /// Cron expression (5 fields, UTC unless `timezone` says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Zone of `schedule`: UTC, a fixed offset or an IANA name (see `schedule::parse_timezone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// What the scheduler does with slots that passed while nothing ran; `None`
    /// follows `SCHEDULE_MISSED` (default skip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_slots: Option<MissedSlots>,
    /// Variables and their default values; `--var K=V` overrides them.
    #[serde(default)]
    pub variables: Map<String, Value>,
    #[serde(default)]
    pub defaults: Defaults,
    /// Wall-clock limit for the whole run ("30m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    /// Token budget of one run (model calls stop with `budget_exceeded` past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_per_run: Option<u64>,
    pub nodes: Vec<Node>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<RunNotify>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_config: Option<TestConfig>,
    /// In a fleet, only processes with every one of these tags (`OMNIFLOW_TAGS`) run this
    /// blueprint's steps; each node may add its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Run priority in the shared pool. Order: critical > high > normal > low.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low = 0,
    #[default]
    Normal = 1,
    High = 2,
    Critical = 3,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Index 0..4 with 3 = critical.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: usize) -> Priority {
        match i {
            0 => Priority::Low,
            1 => Priority::Normal,
            2 => Priority::High,
            _ => Priority::Critical,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings every node inherits unless it sets its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Defaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// Retry settings. `attempts` counts every try, the first included (4 = 1 try + 3 retries).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// First wait ("1s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<DurationSpec>,
    /// Each wait is the previous one times this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// No wait is longer than this ("30s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<DurationSpec>,
    /// Randomise each wait by up to ± this fraction (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

/// One step of the graph.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// A template yielding a list (`"{{ vars.TOPICS }}"`) or a literal list: one step per item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    /// A failure of this node does not fail the run; dependents see a null output.
    #[serde(default)]
    pub continue_on_error: bool,
    /// In a sandbox run, the node's output instead of running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_output: Option<Value>,
    /// In a fleet, only processes with every one of these tags (and the blueprint's) run
    /// this node's steps: `["gpu"]` keeps a 70B model on the GPU box.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(flatten)]
    pub kind: NodeKind,
}

/// What a node does, by its `type`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NodeKind {
    Llm(LlmNode),
    Http(HttpNode),
    Transform(TransformNode),
    Condition(ConditionNode),
    Notify(NotifyNode),
    Delay(DelayNode),
}

impl NodeKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            NodeKind::Llm(_) => "llm",
            NodeKind::Http(_) => "http",
            NodeKind::Transform(_) => "transform",
            NodeKind::Condition(_) => "condition",
            NodeKind::Notify(_) => "notify",
            NodeKind::Delay(_) => "delay",
        }
    }
}

/// How a text result becomes the node's output.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parse {
    /// The output is the text.
    #[default]
    Text,
    /// The text is parsed as JSON (a parse failure is an error of the step).
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LlmNode {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `auto` (default), `huggingface`, `ollama`, `openai` or `sandbox`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    #[serde(default)]
    pub parse: Parse,
    /// Fail the step when the answer was cut off (`finish_reason: length`: at `maxTokens` or
    /// the server's context size) instead of passing on the partial text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_on_truncation: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpNode {
    pub url: String,
    #[serde(default = "get")]
    pub method: String,
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// A string template, or JSON whose strings are templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// `auto` (default: JSON when the reply says so), `text` or `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

fn get() -> String {
    "GET".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TransformNode {
    pub template: String,
    #[serde(default)]
    pub parse: Parse,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConditionNode {
    /// A Jinja expression (no braces): `nodes.classify.output == "urgent"`.
    pub expression: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NotifyNode {
    pub channel: Channel,
    pub text: String,
    /// Telegram `parse_mode` (`HTML`, `MarkdownV2`); ignored by Discord.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_mode: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Telegram,
    Discord,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Telegram => "telegram",
            Channel::Discord => "discord",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DelayNode {
    /// How long to wait ("2s").
    pub duration: DurationSpec,
}

/// Schedule slots missed while no scheduler ran (the daemon or console was down).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum MissedSlots {
    /// Like cron: a missed slot is gone.
    #[default]
    Skip,
    /// Run once at start-up for all the slots missed since the last one that fired.
    RunOnce,
}

impl MissedSlots {
    pub fn as_str(self) -> &'static str {
        match self {
            MissedSlots::Skip => "skip",
            MissedSlots::RunOnce => "runOnce",
        }
    }
}

/// Run-level notifications.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunNotify {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_success: Vec<Channel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_failure: Vec<Channel>,
}

/// What the console's sandbox test uses by default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TestConfig {
    #[serde(default)]
    pub variables: Vec<TestVariable>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulate_failures: Option<f64>,
}

/// A test variable; `value` is text as typed, parsed as JSON when it is JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TestVariable {
    pub key: String,
    pub value: String,
}

impl Blueprint {
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

/// Reads a variable value given as text (`--var K=V`, test variables): JSON when it parses as
/// JSON, the text itself otherwise.
pub fn parse_var_value(text: &str) -> Value {
    let t = text.trim();
    let looks_json = t.starts_with('[')
        || t.starts_with('{')
        || t.starts_with('"')
        || t == "true"
        || t == "false"
        || t == "null"
        || t.parse::<f64>().is_ok();
    if looks_json {
        if let Ok(v) = serde_json::from_str(t) {
            return v;
        }
    }
    Value::String(text.to_string())
}

/// A duration as the blueprint writes it (`"30s"`, `"1h 30m"`), parsed once when the blueprint
/// loads: an invalid one fails the load with the validator's message, never a silent default.
/// Serialises back to the text as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationSpec {
    text: String,
    value: std::time::Duration,
}

impl DurationSpec {
    /// Parses with the validator's rules (a unit is required; at most 30 days).
    pub fn parse(text: &str) -> Result<DurationSpec, String> {
        super::parse_duration(text).map(|value| DurationSpec {
            text: text.to_string(),
            value,
        })
    }

    /// The duration.
    pub fn get(&self) -> std::time::Duration {
        self.value
    }

    /// The text as written.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl Serialize for DurationSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DurationSpec::parse(&text).map_err(serde::de::Error::custom)
    }
}
