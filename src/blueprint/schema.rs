//! The blueprint JSON Schema (draft 2020-12): what `omniflow schema` prints and what the
//! structural validator walks, so the two cannot disagree.
//!
//! Standard keywords used: `type`, `properties`, `required`, `additionalProperties`, `enum`,
//! `const`, `items`, `minimum`, `maximum`, `minLength`, `minItems`, `pattern`, `oneOf`,
//! `$ref`/`$defs`, `description`. Extensions, ignored by other validators:
//! - `format`: `duration` (humantime, "30s"), `cron` (5 fields), `template` (a Jinja
//!   template), `expression` (a Jinja expression), `forEach` (a template or a list),
//!   `templateJson` (JSON whose strings are templates);
//! - `discriminator` (as in OpenAPI): a node's `type` picks its `oneOf` branch, so a problem is
//!   reported against the one node type meant, not against all six;
//! - `x-expected`: the wording of "expected …" in type errors.

use serde_json::{json, Map, Value};
use std::sync::OnceLock;

/// The node types, in the order messages list them.
pub const NODE_TYPES: [&str; 6] = ["llm", "http", "transform", "condition", "notify", "delay"];
/// LLM providers' names, in [`ProviderName::ALL`]'s order (the schema's enum and messages).
pub const PROVIDERS: [&str; 6] = [
    ProviderName::ALL[0].as_str(),
    ProviderName::ALL[1].as_str(),
    ProviderName::ALL[2].as_str(),
    ProviderName::ALL[3].as_str(),
    ProviderName::ALL[4].as_str(),
    ProviderName::ALL[5].as_str(),
];

/// Where a node's model calls go: the one list of provider names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderName {
    /// Ollama when `USE_OLLAMA=true`, then Hugging Face, then the OpenAI-compatible server.
    Auto,
    /// Hugging Face's router (chat completions); `hf` is accepted too.
    HuggingFace,
    Ollama,
    /// Any OpenAI-compatible server (`OPENAI_BASE_URL`).
    OpenAi,
    /// The simulated model.
    Sandbox,
    /// Hugging Face's text-generation path.
    HfInference,
}

impl ProviderName {
    /// Every provider, in the order messages list them (`hf-inference`, added last, keeps
    /// the older messages' order).
    pub const ALL: [ProviderName; 6] = [
        ProviderName::Auto,
        ProviderName::HuggingFace,
        ProviderName::Ollama,
        ProviderName::OpenAi,
        ProviderName::Sandbox,
        ProviderName::HfInference,
    ];

    /// The name blueprints and history use.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProviderName::Auto => "auto",
            ProviderName::HuggingFace => "huggingface",
            ProviderName::Ollama => "ollama",
            ProviderName::OpenAi => "openai",
            ProviderName::Sandbox => "sandbox",
            ProviderName::HfInference => "hf-inference",
        }
    }

    /// A name as a blueprint writes it: exact, or `hf` for `huggingface`, or empty for
    /// `auto`.
    pub fn parse(name: &str) -> Option<ProviderName> {
        match name {
            "" => Some(ProviderName::Auto),
            "hf" => Some(ProviderName::HuggingFace),
            other => ProviderName::ALL.into_iter().find(|p| p.as_str() == other),
        }
    }

    /// "auto, huggingface, …": every name, for messages.
    pub fn list() -> String {
        PROVIDERS.join(", ")
    }
}
/// HTTP methods an `http` node may use.
pub const HTTP_METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
/// Notification channels.
pub const CHANNELS: [&str; 2] = ["telegram", "discord"];
/// Node ids must be identifiers so `nodes.ID.output` works in templates.
pub const ID_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";
/// What a fleet tag may be (as `OMNIFLOW_TAGS` reads them).
pub const TAG_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// The blueprint JSON Schema.
pub fn schema() -> Value {
    schema_ref().clone()
}

/// The schema, built once.
pub(crate) fn schema_ref() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(build)
}

fn build() -> Value {
    let mut defs = Map::new();
    defs.insert("duration".into(), duration());
    defs.insert("template".into(), template());
    defs.insert("retry".into(), retry());
    defs.insert("channel".into(), channel());
    defs.insert("provider".into(), provider());
    defs.insert("parse".into(), parse());
    defs.insert("node".into(), node());
    for ty in NODE_TYPES {
        defs.insert(format!("{ty}Node"), node_of_type(ty));
    }
    let mut root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://omniflow.dev/schema/blueprint.json",
        "title": "OmniFlow blueprint",
        "description": "An automation: a graph of nodes (steps) plus what it needs to run. Keys are camelCase; the same schema applies to JSON and TOML files.",
        "type": "object",
        "required": ["name", "nodes"],
        "additionalProperties": false,
        "properties": {
            "name": { "type": "string", "minLength": 1,
                      "description": "Unique name; `omniflow run NAME` finds the blueprint by it." },
            "description": { "type": "string", "description": "What the automation does." },
            "active": { "type": "boolean", "default": true,
                        "description": "Whether `run --all-active` and the scheduler pick it up." },
            "priority": { "enum": ["critical", "high", "normal", "low"], "default": "normal",
                          "description": "Priority of its steps in the shared pool." },
            "schedule": { "type": "string", "format": "cron",
                          "description": "Cron expression, 5 fields (minute hour day-of-month month day-of-week), e.g. \"17 */6 * * *\"." },
            "timezone": { "type": "string",
                          "description": "Time zone of `schedule`: \"UTC\" (the default), a fixed offset such as \"+02:00\" or \"UTC-5\", or an IANA zone name such as \"Europe/Berlin\" (follows daylight saving: a local time repeated when clocks go back fires once, one skipped when they go forward fires right after the gap)." },
            "variables": { "type": "object", "additionalProperties": true,
                           "x-expected": "an object of variable names and default values",
                           "description": "Variables and their default values, read as `vars.NAME`; `--var NAME=VALUE` overrides them." },
            "defaults": {
                "type": "object", "additionalProperties": false,
                "description": "Settings every node inherits unless it sets its own.",
                "properties": {
                    "retry": { "$ref": "#/$defs/retry" },
                    "timeout": { "$ref": "#/$defs/duration", "description": "Per-attempt timeout of each step." },
                    "model": { "type": "string", "description": "Model of llm nodes that name none." },
                    "provider": { "$ref": "#/$defs/provider" }
                }
            },
            "timeout": { "$ref": "#/$defs/duration", "description": "Wall-clock limit of the whole run (\"30m\")." },
            "maxTokensPerRun": { "type": "integer", "minimum": 1,
                                 "description": "Token budget of one run; model calls past it fail with budget_exceeded." },
            "nodes": { "type": "array", "minItems": 1, "items": { "$ref": "#/$defs/node" },
                       "x-expected": "an array of nodes",
                       "description": "The steps. Order does not matter: `needs` decides it." },
            "notify": {
                "type": "object", "additionalProperties": false,
                "description": "Run-level notifications.",
                "properties": {
                    "onSuccess": { "type": "array", "items": { "$ref": "#/$defs/channel" },
                                   "x-expected": "an array of channels",
                                   "description": "Channels told when a run succeeds." },
                    "onFailure": { "type": "array", "items": { "$ref": "#/$defs/channel" },
                                   "x-expected": "an array of channels",
                                   "description": "Channels told when a run fails." }
                }
            },
            "testConfig": {
                "type": "object", "additionalProperties": false,
                "description": "What the console's sandbox test uses by default.",
                "properties": {
                    "variables": {
                        "type": "array", "x-expected": "an array of {key, value} objects",
                        "description": "Variable values for the test; each key must be a declared variable.",
                        "items": {
                            "type": "object", "additionalProperties": false,
                            "required": ["key", "value"],
                            "properties": {
                                "key": { "type": "string", "description": "A declared variable." },
                                "value": { "type": "string",
                                           "x-expected": "a string (JSON text for lists, e.g. \"[\\\"a\\\"]\")",
                                           "description": "The value as typed; parsed as JSON when it is JSON." }
                            }
                        }
                    },
                    "simulateFailures": { "type": "number", "minimum": 0, "maximum": 1,
                                          "description": "Fraction of attempts that fail on purpose (0.3 = 30 %)." }
                }
            }
        },
        "$defs": defs
    });
    // Added outside the json! above, which is at the macro recursion limit.
    if let Some(props) = root.get_mut("properties").and_then(Value::as_object_mut) {
        if let Some(tz) = props.get_mut("timezone").and_then(Value::as_object_mut) {
            tz.insert("format".into(), json!("timezone"));
        }
        props.insert(
            "missedSlots".into(),
            json!({ "enum": ["skip", "runOnce"],
                    "description": "Schedule slots that passed while no scheduler ran: skip them (like cron), or run once at start-up. Default: SCHEDULE_MISSED, else skip." }),
        );
        props.insert("tags".into(), tags("this blueprint's steps"));
    }
    root
}

/// Fleet tags: which processes (`OMNIFLOW_TAGS`) run `what`.
fn tags(what: &str) -> Value {
    json!({ "type": "array",
            "items": { "type": "string", "pattern": TAG_PATTERN },
            "x-expected": "an array of tags such as [\"gpu\"]",
            "description": format!("In a fleet (DATABASE_URL=postgres://…), only processes whose OMNIFLOW_TAGS include every one of these run {what}; untagged steps run anywhere. Without a fleet, tags change nothing.") })
}

fn duration() -> Value {
    json!({ "type": "string", "format": "duration",
            "x-expected": "a duration such as \"30s\"",
            "description": "A duration with a unit: \"500ms\", \"30s\", \"5m\", \"1h 30m\"." })
}

fn template() -> Value {
    json!({ "type": "string", "format": "template",
            "description": "A Jinja template reading vars.X, nodes.ID.output, item, index and run." })
}

fn retry() -> Value {
    json!({
        "type": "object", "additionalProperties": false,
        "description": "Retry settings; `attempts` counts every try, the first included.",
        "properties": {
            "attempts": { "type": "integer", "minimum": 1, "maximum": 20,
                          "description": "Tries in all (4 = 1 try + 3 retries)." },
            "backoff": { "$ref": "#/$defs/duration", "description": "First wait (\"1s\")." },
            "factor": { "type": "number", "minimum": 1,
                        "description": "Each wait is the previous one times this." },
            "maxDelay": { "$ref": "#/$defs/duration", "description": "No wait is longer than this." },
            "jitter": { "type": "number", "minimum": 0, "maximum": 1,
                        "description": "Randomise each wait by up to ± this fraction (default 0.1)." }
        }
    })
}

fn channel() -> Value {
    json!({ "enum": CHANNELS, "description": "A notification channel." })
}

fn provider() -> Value {
    json!({ "enum": PROVIDERS,
            "description": "Where model calls go; auto tries Ollama first when USE_OLLAMA=true, then Hugging Face (router), then the OpenAI-compatible server; hf-inference is HF's text-generation path." })
}

fn parse() -> Value {
    json!({ "enum": ["text", "json"], "default": "text",
            "description": "How the text result becomes the output: as is, or parsed as JSON." })
}

/// Fields every node has, whatever its type.
fn common_properties() -> Map<String, Value> {
    let common = json!({
        "id": { "type": "string", "pattern": ID_PATTERN,
                "description": "Unique id; templates read this node's result as nodes.ID.output." },
        "type": { "enum": NODE_TYPES, "description": "What the node does." },
        "description": { "type": "string", "description": "What the step is for." },
        "needs": { "type": "array", "items": { "type": "string" },
                   "x-expected": "an array of node ids",
                   "description": "Nodes that must finish first; their outputs are readable here." },
        "forEach": { "type": ["string", "array"], "format": "forEach",
                     "x-expected": "a template yielding a list, or a list",
                     "description": "Run once per item (\"{{ vars.TOPICS }}\" or a literal list); the output is the list of the items' outputs." },
        "retry": { "$ref": "#/$defs/retry" },
        "timeout": { "$ref": "#/$defs/duration", "description": "Per-attempt timeout." },
        "continueOnError": { "type": "boolean",
                             "description": "A failure does not fail the run; dependents see a null output." },
        "sandboxOutput": { "description": "In a sandbox run, the node's output instead of running it (any JSON): e.g. a realistic API reply for an http node, so what follows can be tried offline." }
    });
    match common {
        Value::Object(mut m) => {
            m.insert(
                "tags".into(),
                tags("this node's steps (on top of the blueprint's tags)"),
            );
            m
        }
        _ => Map::new(),
    }
}

/// Fields specific to one node type, and which of them are required.
fn type_properties(ty: &str) -> (Value, Vec<&'static str>) {
    match ty {
        "llm" => (
            json!({
                "prompt": { "$ref": "#/$defs/template", "description": "The prompt (a template)." },
                "system": { "$ref": "#/$defs/template", "description": "System prompt (a template)." },
                "model": { "type": "string", "description": "Model id, e.g. mistralai/Mistral-7B-Instruct-v0.2." },
                "provider": { "$ref": "#/$defs/provider" },
                "temperature": { "type": "number", "minimum": 0, "maximum": 2,
                                 "description": "Sampling temperature." },
                "maxTokens": { "type": "integer", "minimum": 1, "maximum": 1_000_000,
                               "description": "Most tokens to generate." },
                "cache": { "type": "boolean", "description": "Reuse an identical earlier answer." },
                "parse": { "$ref": "#/$defs/parse" },
                "failOnTruncation": { "type": "boolean",
                                      "description": "Fail the step when the answer is cut off (finish_reason \"length\": at maxTokens or the server's context size) instead of passing the partial text on. Default false: the step succeeds and is marked truncated." }
            }),
            vec!["prompt"],
        ),
        "http" => (
            json!({
                "url": { "$ref": "#/$defs/template", "description": "URL (a template)." },
                "method": { "enum": HTTP_METHODS, "default": "GET", "description": "HTTP method." },
                "headers": { "type": "object",
                             "additionalProperties": { "$ref": "#/$defs/template" },
                             "x-expected": "an object of header names and template strings",
                             "description": "Request headers; values are templates." },
                "body": { "format": "templateJson",
                          "description": "A string template, or JSON whose strings are templates." },
                "response": { "enum": ["auto", "text", "json"], "default": "auto",
                              "description": "How the reply becomes the output (auto: JSON when the reply says so)." }
            }),
            vec!["url"],
        ),
        "transform" => (
            json!({
                "template": { "$ref": "#/$defs/template", "description": "The output (a template)." },
                "parse": { "$ref": "#/$defs/parse" }
            }),
            vec!["template"],
        ),
        "condition" => (
            json!({
                "expression": { "type": "string", "format": "expression",
                                "description": "A Jinja expression (no braces); false skips what depends on this node." }
            }),
            vec!["expression"],
        ),
        "notify" => (
            json!({
                "channel": { "$ref": "#/$defs/channel" },
                "text": { "$ref": "#/$defs/template", "description": "The message (a template)." },
                "parseMode": { "enum": ["HTML", "MarkdownV2", "Markdown"],
                               "description": "Telegram parse_mode; ignored by Discord." }
            }),
            vec!["channel", "text"],
        ),
        _ => (
            json!({
                "duration": { "$ref": "#/$defs/duration", "description": "How long to wait." }
            }),
            vec!["duration"],
        ),
    }
}

/// A node: common fields, and the branch its `type` names.
fn node() -> Value {
    let mapping: Map<String, Value> = NODE_TYPES
        .iter()
        .map(|t| (t.to_string(), json!(format!("#/$defs/{t}Node"))))
        .collect();
    let branches: Vec<Value> = NODE_TYPES
        .iter()
        .map(|t| json!({ "$ref": format!("#/$defs/{t}Node") }))
        .collect();
    json!({
        "type": "object",
        "description": "One step of the graph.",
        "required": ["id", "type"],
        "properties": common_properties(),
        "discriminator": { "propertyName": "type", "mapping": mapping, "x-noun": "node type" },
        "oneOf": branches
    })
}

fn node_of_type(ty: &str) -> Value {
    let mut props = common_properties();
    props.insert("type".into(), json!({ "const": ty }));
    let (own, own_required) = type_properties(ty);
    if let Value::Object(own) = own {
        props.extend(own);
    }
    let mut required = vec!["id", "type"];
    required.extend(own_required);
    json!({
        "type": "object",
        "description": format!("A node of type {ty}."),
        "additionalProperties": false,
        "required": required,
        "properties": props
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_draft_2020_12_with_every_node_type() {
        let s = schema();
        assert_eq!(
            s["$schema"],
            json!("https://json-schema.org/draft/2020-12/schema")
        );
        for t in NODE_TYPES {
            assert!(s["$defs"][format!("{t}Node")].is_object(), "{t}");
        }
        // Printable and re-readable.
        let text = serde_json::to_string_pretty(&s).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref" {
                        if let Some(r) = x.as_str() {
                            out.push(r.to_string());
                        }
                    }
                    collect_refs(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_ref_resolves() {
        let s = schema();
        let mut refs = Vec::new();
        collect_refs(&s, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            assert!(s.pointer(r.trim_start_matches('#')).is_some(), "{r}");
        }
    }

    #[test]
    fn every_model_field_is_in_the_schema() {
        // Spot-check against the serde model: a fully populated blueprint serializes to keys the
        // schema knows (the validator test of the examples covers the rest).
        let s = schema();
        for key in [
            "name",
            "description",
            "active",
            "priority",
            "schedule",
            "timezone",
            "missedSlots",
            "variables",
            "defaults",
            "timeout",
            "maxTokensPerRun",
            "nodes",
            "notify",
            "testConfig",
        ] {
            assert!(s["properties"][key].is_object(), "{key}");
        }
        for key in [
            "prompt",
            "system",
            "model",
            "provider",
            "temperature",
            "maxTokens",
            "cache",
            "parse",
            "failOnTruncation",
        ] {
            assert!(
                s["$defs"]["llmNode"]["properties"][key].is_object(),
                "{key}"
            );
        }
    }
}
