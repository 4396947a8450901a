//! Loading and validating blueprints through the public API.

use omniflow::blueprint::*;
use omniflow::template::Templates;
use serde_json::{json, Value};
use std::path::Path;

/// `MAX_BLUEPRINT_BYTES` at its default.
const MAX: usize = omniflow::limits::DEFAULT_MAX_BLUEPRINT_BYTES;

/// The DESIGN.md §1 example, verbatim.
const EXAMPLE_JSON: &str = r#"{
  "name": "tech-digest",
  "description": "Summarise topics in parallel and post one digest.",
  "active": true,
  "priority": "normal",
  "schedule": "17 */6 * * *",
  "variables": { "TOPICS": ["rust", "wasm", "llm"] },
  "defaults": { "retry": { "attempts": 4, "backoff": "1s", "factor": 2 }, "timeout": "300s" },
  "nodes": [
    { "id": "summarize", "type": "llm", "forEach": "{{ vars.TOPICS }}",
      "model": "mistralai/Mistral-7B-Instruct-v0.2", "prompt": "Two sentences on {{ item }}." },
    { "id": "digest", "type": "transform", "needs": ["summarize"],
      "template": "{{ nodes.summarize.output | join('\n\n') }}" },
    { "id": "post", "type": "notify", "needs": ["digest"], "channel": "telegram",
      "text": "Digest\n{{ nodes.digest.output }}" }
  ],
  "notify": { "onFailure": ["discord"] },
  "testConfig": { "variables": [{ "key": "TOPICS", "value": "[\"a\",\"b\"]" }], "simulateFailures": 0.3 }
}"#;

/// The same blueprint, hand-written in TOML.
const EXAMPLE_TOML: &str = r#"
# Summarise topics in parallel and post one digest.
name = "tech-digest"
description = "Summarise topics in parallel and post one digest."
active = true
priority = "normal"
schedule = "17 */6 * * *"

[variables]
TOPICS = ["rust", "wasm", "llm"]

[defaults]
timeout = "300s"
retry = { attempts = 4, backoff = "1s", factor = 2.0 }

[[nodes]]
id = "summarize"
type = "llm"
forEach = "{{ vars.TOPICS }}"
model = "mistralai/Mistral-7B-Instruct-v0.2"
prompt = "Two sentences on {{ item }}."

[[nodes]]
id = "digest"
type = "transform"
needs = ["summarize"]
template = """{{ nodes.summarize.output | join('\n\n') }}"""

[[nodes]]
id = "post"
type = "notify"
needs = ["digest"]
channel = "telegram"
text = """Digest
{{ nodes.digest.output }}"""

[notify]
onFailure = ["discord"]

[testConfig]
variables = [{ key = "TOPICS", value = '["a","b"]' }]
simulateFailures = 0.3
"#;

fn example() -> Value {
    serde_json::from_str(EXAMPLE_JSON).unwrap()
}

fn problems(doc: &Value) -> Vec<String> {
    validate(doc).iter().map(ToString::to_string).collect()
}

/// Asserts exactly one problem at `path` whose message contains every word of `words`.
#[track_caller]
fn assert_problem(doc: &Value, path: &str, words: &[&str]) {
    let found = validate(doc);
    let at: Vec<&Problem> = found.iter().filter(|p| p.path == path).collect();
    assert!(
        !at.is_empty(),
        "no problem at {path:?}; got:\n{}",
        found
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let hit = at
        .iter()
        .any(|p| words.iter().all(|w| p.message.contains(w)));
    assert!(hit, "problem at {path} lacks {words:?}: {at:?}");
}

#[test]
fn design_example_validates_and_loads() {
    assert_eq!(problems(&example()), Vec::<String>::new());
    let bp = load_str(EXAMPLE_JSON, Format::Json, MAX).unwrap();
    assert_eq!(bp.name, "tech-digest");
    assert_eq!(bp.nodes.len(), 3);
    assert_eq!(bp.nodes[0].kind.type_name(), "llm");
    assert_eq!(bp.defaults.retry.as_ref().and_then(|r| r.attempts), Some(4));
}

#[test]
fn toml_loads_equal_to_json() {
    let from_json = load_str(EXAMPLE_JSON, Format::Json, MAX).unwrap();
    let from_toml = load_str(EXAMPLE_TOML, Format::Toml, MAX).unwrap();
    assert_eq!(from_json, from_toml);
}

#[test]
fn files_load_and_resolve_by_file_name_or_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("digest.json"), EXAMPLE_JSON).unwrap();
    std::fs::write(
        dir.path().join("other.toml"),
        EXAMPLE_TOML.replace("tech-digest", "other-one"),
    )
    .unwrap();
    std::fs::write(dir.path().join("broken.json"), "{ nope").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();

    let all = load_dir(dir.path(), MAX).unwrap();
    let names: Vec<_> = all
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["broken.json", "digest.json", "other.toml"]);
    assert!(all[0].1.is_err() && all[1].1.is_ok() && all[2].1.is_ok());

    // By file stem, by `name` field, by path.
    assert_eq!(
        resolve("digest", dir.path(), MAX).unwrap(),
        dir.path().join("digest.json")
    );
    assert_eq!(
        resolve("tech-digest", dir.path(), MAX).unwrap(),
        dir.path().join("digest.json")
    );
    assert_eq!(
        resolve("other-one", dir.path(), MAX).unwrap(),
        dir.path().join("other.toml")
    );
    let p = dir.path().join("other.toml");
    assert_eq!(
        resolve(p.to_str().unwrap(), Path::new("/nonexistent"), MAX).unwrap(),
        p
    );

    let e = resolve("tech-digets", dir.path(), MAX)
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean \"tech-digest\"?"), "{e}");
    assert!(
        e.contains("available: broken, other-one, tech-digest"),
        "{e}"
    );
}

#[test]
fn invalid_files_list_every_problem_prefixed_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(
        &path,
        r#"{"name": "x", "nodes": [{"id": "a", "type": "llm", "promt": "x"}]}"#,
    )
    .unwrap();
    let e = load_file(&path, MAX).unwrap_err();
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in &lines {
        assert!(line.starts_with(&path.display().to_string()), "{line}");
    }
    assert!(
        text.contains("nodes[0]: missing required field \"prompt\""),
        "{text}"
    );
    assert!(
        text.contains("nodes[0].promt: unknown field \"promt\" — did you mean \"prompt\"?"),
        "{text}"
    );

    let e = load_file(&dir.path().join("missing.json"), MAX).unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }));
    let e = load_file(&dir.path().join("x.yaml"), MAX)
        .unwrap_err()
        .to_string();
    assert!(e.contains(".json or .toml"), "{e}");
}

#[test]
fn unknown_fields_suggest_the_closest() {
    let mut doc = example();
    doc["nodes"][0]["promt"] = json!("x");
    assert_problem(
        &doc,
        "nodes[0].promt",
        &["unknown field \"promt\"", "did you mean \"prompt\"?"],
    );
    let mut doc = example();
    doc["descripton"] = json!("x");
    assert_problem(&doc, "descripton", &["did you mean \"description\"?"]);
    let mut doc = example();
    doc["defaults"]["retry"]["max_delay"] = json!("5s");
    assert_problem(
        &doc,
        "defaults.retry.max_delay",
        &["did you mean \"maxDelay\"?"],
    );
}

#[test]
fn unknown_node_type_lists_the_types() {
    let mut doc = example();
    doc["nodes"][1]["type"] = json!("transfrom");
    assert_problem(
        &doc,
        "nodes[1].type",
        &[
            "unknown node type \"transfrom\"",
            "did you mean \"transform\"?",
            "llm, http, transform, condition, notify, delay",
        ],
    );
    let mut doc = example();
    doc["nodes"][1].as_object_mut().unwrap().remove("type");
    assert_problem(
        &doc,
        "nodes[1]",
        &["missing required field \"type\"", "llm, http"],
    );
}

#[test]
fn wrong_types_and_missing_fields() {
    let mut doc = example();
    doc["nodes"][1]["needs"] = json!("summarize");
    assert_problem(
        &doc,
        "nodes[1].needs",
        &["expected an array of node ids, got a string"],
    );
    let mut doc = example();
    doc["active"] = json!("yes");
    assert_problem(&doc, "active", &["expected true or false", "got a string"]);
    let mut doc = example();
    doc["defaults"]["retry"]["attempts"] = json!(2.5);
    assert_problem(
        &doc,
        "defaults.retry.attempts",
        &["expected an integer, got a number (2.5)"],
    );
    let mut doc = example();
    doc.as_object_mut().unwrap().remove("name");
    assert_problem(&doc, "", &["missing required field \"name\""]);
    let mut doc = example();
    doc["nodes"][2].as_object_mut().unwrap().remove("channel");
    assert_problem(&doc, "nodes[2]", &["missing required field \"channel\""]);
    assert!(!validate(&json!([1, 2])).is_empty());
    assert_problem(&json!("text"), "", &["expected an object"]);
}

#[test]
fn node_ids_are_required_unique_identifiers() {
    let mut doc = example();
    doc["nodes"][2]["id"] = json!("digest");
    doc["nodes"][2]["needs"] = json!([]);
    doc["nodes"][2]["text"] = json!("x");
    assert_problem(
        &doc,
        "nodes[2].id",
        &["duplicate id \"digest\" (first at nodes[1])"],
    );
    let mut doc = example();
    doc["nodes"][2]["id"] = json!("post-it");
    assert_problem(
        &doc,
        "nodes[2].id",
        &["invalid id \"post-it\"", "nodes.post-it.output"],
    );
    let mut doc = example();
    doc["nodes"][2].as_object_mut().unwrap().remove("id");
    assert_problem(&doc, "nodes[2]", &["missing required field \"id\""]);
}

#[test]
fn needs_must_name_other_existing_nodes() {
    let mut doc = example();
    doc["nodes"][1]["needs"] = json!(["sumarize"]);
    assert_problem(
        &doc,
        "nodes[1].needs[0]",
        &["unknown node \"sumarize\" — did you mean \"summarize\"?"],
    );
    let mut doc = example();
    doc["nodes"][2]["needs"] = json!(["digest", "post"]);
    assert_problem(&doc, "nodes[2].needs[1]", &["\"post\" needs itself"]);
}

#[test]
fn thousands_of_misspelt_needs_are_all_reported_in_order() {
    // 3,000 nodes, each needing a node that does not exist but is one letter from a real one:
    // every problem is reported, in document order; suggestions stop once the validation has
    // compared its budget of names (comparing every pair would take minutes at 10,000 nodes).
    let nodes: Vec<Value> = (0..3000)
        .map(|i| {
            json!({ "id": format!("step{i}"), "type": "transform", "template": "x",
                          "needs": [format!("stepp{i}")] })
        })
        .collect();
    let found = problems(&json!({ "name": "many", "nodes": nodes }));
    assert_eq!(found.len(), 3000, "{:?}", &found[..3]);
    for (i, p) in found.iter().enumerate() {
        assert!(
            p.starts_with(&format!("nodes[{i}].needs[0]: unknown node \"stepp{i}\"")),
            "{p}"
        );
    }
    assert!(
        found[0].contains("did you mean \"step0\"?"),
        "the first ones still carry a suggestion: {}",
        found[0]
    );
    assert!(!found[2999].contains("did you mean"), "{}", found[2999]);
}

#[test]
fn cycles_are_reported_with_their_nodes_in_order() {
    let doc = json!({
        "name": "loop",
        "nodes": [
            { "id": "a", "type": "delay", "duration": "1s", "needs": ["b"] },
            { "id": "b", "type": "delay", "duration": "1s", "needs": ["c"] },
            { "id": "c", "type": "delay", "duration": "1s", "needs": ["a"] },
            { "id": "d", "type": "delay", "duration": "1s", "needs": ["c"] }
        ]
    });
    assert_eq!(
        problems(&doc),
        ["nodes: cycle a → b → c → a (each needs the next, so none of them can start)"]
    );
}

#[test]
fn template_syntax_errors_carry_the_line() {
    let mut doc = example();
    doc["nodes"][1]["template"] = json!("ok\n{{ nodes.summarize.output | join(', ') ");
    assert_problem(&doc, "nodes[1].template", &["template error", "line 2"]);
    let mut doc = example();
    doc["nodes"][2]["type"] = json!("condition");
    doc["nodes"][2]["expression"] = json!("nodes.digest.output ==");
    let o = doc["nodes"][2].as_object_mut().unwrap();
    o.remove("channel");
    o.remove("text");
    assert_problem(&doc, "nodes[2].expression", &["template error"]);
}

#[test]
fn templates_must_read_declared_variables() {
    let mut doc = example();
    doc["nodes"][0]["forEach"] = json!("{{ vars.TOPIC }}");
    assert_problem(
        &doc,
        "nodes[0].forEach",
        &["unknown variable \"TOPIC\" — did you mean \"TOPICS\"? (declared: TOPICS)"],
    );
    let mut doc = example();
    doc["nodes"][0]["prompt"] = json!("{{ vars['TOPIC'] }} {{ item }}");
    assert_problem(&doc, "nodes[0].prompt", &["unknown variable \"TOPIC\""]);
}

#[test]
fn templates_must_read_known_nodes_they_need() {
    let mut doc = example();
    doc["nodes"][1]["template"] = json!("{{ nodes.sumarize.output }}");
    assert_problem(
        &doc,
        "nodes[1].template",
        &["unknown node \"sumarize\" — did you mean \"summarize\"?"],
    );

    // post needs digest, which needs summarize: reading summarize is fine (transitive).
    let mut doc = example();
    doc["nodes"][2]["text"] = json!("{{ nodes.summarize.output | length }}");
    assert_eq!(problems(&doc), Vec::<String>::new());

    // digest reads post, which it does not need.
    let mut doc = example();
    doc["nodes"][1]["template"] = json!("{{ nodes.summarize.output }}{{ nodes['post'].output }}");
    assert_problem(
        &doc,
        "nodes[1].template",
        &["nodes.post", "not in this node's needs", "add it to needs"],
    );

    let mut doc = example();
    doc["nodes"][1]["template"] = json!("{{ nodes.digest.output }}");
    assert_problem(&doc, "nodes[1].template", &["its own output"]);

    let mut doc = example();
    doc["nodes"][1]["template"] = json!("{{ nodes.summarize.outptu }}");
    assert_problem(
        &doc,
        "nodes[1].template",
        &["unknown field \"outptu\"", "did you mean \"output\"?"],
    );
}

#[test]
fn item_only_in_for_each_nodes() {
    let mut doc = example();
    doc["nodes"][1]["template"] = json!("{{ item }} {{ nodes.summarize.output }}");
    assert_problem(
        &doc,
        "nodes[1].template",
        &["\"item\" is only defined in a node with forEach"],
    );
    let mut doc = example();
    doc["nodes"][0]["forEach"] = json!("{{ item }}");
    assert_problem(&doc, "nodes[0].forEach", &["forEach cannot read \"item\""]);
    let mut doc = example();
    doc["nodes"][1]["template"] = json!("{{ itme }}");
    assert_problem(
        &doc,
        "nodes[1].template",
        &["unknown name \"itme\"", "did you mean \"item\"?"],
    );
}

#[test]
fn http_templates_are_checked_everywhere() {
    let mut doc = example();
    doc["nodes"].as_array_mut().unwrap().push(json!({
        "id": "call", "type": "http", "method": "POST", "needs": ["digest"],
        "url": "https://example.com/{{ vars.NOPE }}",
        "headers": { "X-Topic": "{{ vars.TOPICS | first }}", "X-Bad": "{{ nodes.post.output }}" },
        "body": { "text": "{{ nodes.digest.output }}", "list": ["{{ index }}"] }
    }));
    assert_problem(&doc, "nodes[3].url", &["unknown variable \"NOPE\""]);
    assert_problem(&doc, "nodes[3].headers[\"X-Bad\"]", &["add it to needs"]);
    assert_problem(
        &doc,
        "nodes[3].body.list[0]",
        &["\"index\" is only defined"],
    );
    assert_eq!(validate(&doc).len(), 3, "{:?}", problems(&doc));
}

#[test]
fn bad_cron_shows_the_expression_and_an_example() {
    let mut doc = example();
    doc["schedule"] = json!("17 */6 * *");
    assert_problem(
        &doc,
        "schedule",
        &["\"17 */6 * *\"", "5 fields", "e.g. \"17 */6 * * *\""],
    );
    let mut doc = example();
    doc["schedule"] = json!("61 * * * *");
    assert_problem(
        &doc,
        "schedule",
        &["invalid cron expression \"61 * * * *\""],
    );
}

#[test]
fn named_time_zones_validate_and_a_typo_suggests_the_zone() {
    let dir = tempfile::tempdir().unwrap();
    let write = |file: &str, tz: &str| {
        let mut doc = example();
        doc["timezone"] = json!(tz);
        let path = dir.path().join(file);
        std::fs::write(&path, doc.to_string()).unwrap();
        path
    };
    let good = load_file(&write("berlin.json", "Europe/Berlin"), MAX).unwrap();
    assert_eq!(good.timezone.as_deref(), Some("Europe/Berlin"));
    let bad = write("berln.json", "Europe/Berln");
    let text = load_file(&bad, MAX).unwrap_err().to_string();
    assert!(
        text.starts_with(&bad.display().to_string())
            && text.contains(
                "timezone: \"Europe/Berln\" is not a known time zone — did you mean \"Europe/Berlin\"?"
            ),
        "{text}"
    );
    let mut doc = example();
    doc["timezone"] = json!("Berlin");
    assert_problem(
        &doc,
        "timezone",
        &[
            "did you mean \"Europe/Berlin\"?",
            "fixed offset",
            "IANA zone name",
        ],
    );
}

#[test]
fn durations_need_a_unit_everywhere() {
    let mut doc = example();
    doc["defaults"]["timeout"] = json!("300");
    doc["defaults"]["retry"]["backoff"] = json!("soon");
    doc["defaults"]["retry"]["maxDelay"] = json!("1 fortnight");
    doc["timeout"] = json!(30);
    doc["nodes"][0]["timeout"] = json!("5x");
    doc["nodes"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "id": "wait", "type": "delay", "duration": "2" }));
    assert_problem(&doc, "defaults.timeout", &["add a unit: 300s"]);
    assert_problem(
        &doc,
        "defaults.retry.backoff",
        &["invalid duration \"soon\""],
    );
    assert_problem(&doc, "defaults.retry.maxDelay", &["invalid duration"]);
    assert_problem(
        &doc,
        "timeout",
        &["expected a duration such as \"30s\", got an integer (30): add a unit, \"30s\""],
    );
    assert_problem(&doc, "nodes[0].timeout", &["invalid duration \"5x\""]);
    assert_problem(&doc, "nodes[3].duration", &["add a unit: 2s"]);
}

#[test]
fn numbers_must_be_in_range() {
    let mut doc = example();
    doc["defaults"]["retry"]["attempts"] = json!(21);
    doc["defaults"]["retry"]["factor"] = json!(0.5);
    doc["defaults"]["retry"]["jitter"] = json!(1.5);
    doc["nodes"][0]["temperature"] = json!(2.5);
    doc["testConfig"]["simulateFailures"] = json!(-0.1);
    doc["maxTokensPerRun"] = json!(0);
    assert_problem(
        &doc,
        "defaults.retry.attempts",
        &["21 is out of range", "between 1 and 20"],
    );
    assert_problem(&doc, "defaults.retry.factor", &["at least 1"]);
    assert_problem(&doc, "defaults.retry.jitter", &["between 0 and 1"]);
    assert_problem(&doc, "nodes[0].temperature", &["between 0 and 2"]);
    assert_problem(&doc, "testConfig.simulateFailures", &["between 0 and 1"]);
    assert_problem(&doc, "maxTokensPerRun", &["at least 1"]);
    let mut doc = example();
    doc["defaults"]["retry"]["attempts"] = json!(0);
    assert_problem(&doc, "defaults.retry.attempts", &["between 1 and 20"]);
}

#[test]
fn enums_list_their_values() {
    let mut doc = example();
    doc["priority"] = json!("urgent");
    doc["nodes"][2]["channel"] = json!("slack");
    doc["nodes"][0]["provider"] = json!("olama");
    doc["nodes"][0]["parse"] = json!("yaml");
    doc["notify"]["onFailure"] = json!(["discrod"]);
    doc["nodes"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "id": "h", "type": "http", "url": "x", "method": "get" }));
    assert_problem(
        &doc,
        "priority",
        &["unknown value \"urgent\"", "critical, high, normal, low"],
    );
    assert_problem(
        &doc,
        "nodes[2].channel",
        &["\"slack\"", "telegram, discord"],
    );
    assert_problem(
        &doc,
        "nodes[0].provider",
        &[
            "did you mean \"ollama\"?",
            "auto, huggingface, ollama, openai, sandbox",
        ],
    );
    assert_problem(&doc, "nodes[0].parse", &["text, json"]);
    assert_problem(&doc, "notify.onFailure[0]", &["did you mean \"discord\"?"]);
    assert_problem(
        &doc,
        "nodes[3].method",
        &[
            "did you mean \"GET\"?",
            "GET, POST, PUT, PATCH, DELETE, HEAD",
        ],
    );
}

#[test]
fn test_variables_must_be_declared() {
    let mut doc = example();
    doc["testConfig"]["variables"] = json!([{ "key": "TOPIC", "value": "x" }]);
    assert_problem(
        &doc,
        "testConfig.variables[0].key",
        &[
            "\"TOPIC\" is not a declared variable",
            "did you mean \"TOPICS\"?",
        ],
    );
}

#[test]
fn one_broken_document_reports_all_its_problems_in_document_order() {
    let doc = json!({
        "name": "broken",
        "priority": "urgent",
        "schedule": "every hour",
        "variables": { "TOPICS": [] },
        "defaults": { "timeout": "300" },
        "nodes": [
            { "id": "a", "type": "llm", "promt": "x", "forEach": "{{ vars.TOPIC }}" },
            { "id": "b", "type": "transform", "needs": ["sumarize", "c"], "template": "{{ nodes.a.output" },
            { "id": "c", "type": "notify", "channel": "slack", "text": "{{ item }}", "needs": ["b"] },
            { "id": "a", "type": "delay", "duration": "1s" },
            { "id": "d", "type": "wait" }
        ],
        "testConfig": { "variables": [{ "key": "NOPE", "value": "1" }], "simulateFailures": 2 }
    });
    let found = problems(&doc);
    let expected_order = [
        "priority: unknown value \"urgent\"",
        "schedule: invalid cron expression \"every hour\"",
        "defaults.timeout: invalid duration \"300\": add a unit: 300s",
        "nodes: cycle b → c → b",
        "nodes[0]: missing required field \"prompt\"",
        "nodes[0].promt: unknown field \"promt\" — did you mean \"prompt\"?",
        "nodes[0].forEach: unknown variable \"TOPIC\"",
        "nodes[1].needs[0]: unknown node \"sumarize\"",
        "nodes[1].template: template error",
        "nodes[2].channel: unknown value \"slack\"",
        "nodes[2].text: \"item\" is only defined in a node with forEach",
        "nodes[3].id: duplicate id \"a\" (first at nodes[0])",
        "nodes[4].type: unknown node type \"wait\"",
        "testConfig.variables[0].key: \"NOPE\" is not a declared variable",
        "testConfig.simulateFailures: 2 is out of range",
    ];
    assert_eq!(found.len(), expected_order.len(), "{found:#?}");
    for (got, want) in found.iter().zip(expected_order) {
        assert!(
            got.starts_with(want),
            "{got:?} should start with {want:?}\nall: {found:#?}"
        );
    }
}

#[test]
fn nothing_panics_on_strange_documents() {
    let strange = [
        json!(null),
        json!({}),
        json!({ "nodes": null }),
        json!({ "nodes": [null, 1, "x", [], {}] }),
        json!({ "name": "", "nodes": [] }),
        json!({ "name": "x", "nodes": [{ "id": 5, "type": "llm", "prompt": 1, "needs": [1, null, "x"] }] }),
        json!({ "name": "x", "nodes": [{ "id": "a", "type": ["llm"], "forEach": {} }] }),
        json!({ "name": "x", "variables": [], "testConfig": { "variables": [{ "key": 1 }] }, "nodes": [{ "id": "a", "type": "transform", "template": "{% for %}" }] }),
        json!({ "name": "x", "nodes": [{ "id": "a", "type": "transform", "template": "{{ nodes[", "needs": ["a", "a"] }] }),
    ];
    for doc in strange {
        let found = validate(&doc);
        assert!(!found.is_empty(), "{doc}");
        for p in &found {
            assert!(!p.message.is_empty());
        }
    }
    for text in ["", "{", "[", "nul", "{\"a\":}", "\u{0}"] {
        for format in [Format::Json, Format::Toml] {
            match load_str(text, format, MAX) {
                Err(problems) => assert!(
                    !problems.is_empty() && problems.iter().all(|p| !p.message.is_empty()),
                    "{text:?}: {problems:?}"
                ),
                Ok(bp) => panic!("{text:?} as {format:?} loaded as a blueprint: {bp:?}"),
            }
        }
    }
}

#[test]
fn schema_is_printable_json_schema() {
    let s = schema();
    assert_eq!(
        s["$schema"],
        json!("https://json-schema.org/draft/2020-12/schema")
    );
    assert_eq!(s["additionalProperties"], json!(false));
    assert!(s["properties"]["nodes"].is_object());
    let text = serde_json::to_string_pretty(&s).unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_ok());
}

#[test]
fn bundled_blueprints_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints");
    let Ok(all) = load_dir(&dir, MAX) else {
        return; // no bundled blueprints in this checkout yet
    };
    for (path, loaded) in all {
        if let Err(e) = loaded {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn templates_render_with_the_engine_context() {
    let t = Templates::new();
    let bp = load_str(EXAMPLE_JSON, Format::Json, MAX).unwrap();
    let mut ctx = json!({
        "vars": bp.variables,
        "nodes": { "summarize": { "output": ["A.", "B."], "status": "success" } },
        "run": { "id": "r1", "blueprint": bp.name }
    });
    let items = t
        .eval_list(bp.nodes[0].for_each.as_ref().unwrap(), &ctx)
        .unwrap();
    assert_eq!(items, [json!("rust"), json!("wasm"), json!("llm")]);
    ctx["item"] = items[0].clone();
    ctx["index"] = json!(0);
    let NodeKind::Llm(llm) = &bp.nodes[0].kind else {
        panic!()
    };
    assert_eq!(
        t.render(&llm.prompt, &ctx).unwrap(),
        "Two sentences on rust."
    );
    let NodeKind::Transform(tr) = &bp.nodes[1].kind else {
        panic!()
    };
    assert_eq!(t.render(&tr.template, &ctx).unwrap(), "A.\n\nB.");
    assert_eq!(
        t.render("{{ vars.TOPICS | tojson }}", &ctx).unwrap(),
        r#"["rust","wasm","llm"]"#
    );
    assert_eq!(t.render("{{ vars.X | default('y') }}", &ctx).unwrap(), "y");
    assert_eq!(
        t.render("{{ 'aaaa bbbb cccc' | truncate(8, leeway=0) }}", &ctx)
            .unwrap(),
        "aaaa..."
    );
    assert!(t.render("{% include 'x' %}", &ctx).is_err());
    assert!(t.render("{{ env }}", &ctx).is_err());
    assert_eq!(
        t.eval_expr("vars.TOPICS | length > 2", &ctx).unwrap(),
        json!(true)
    );
    assert_eq!(t.eval_list(&json!([1]), &ctx).unwrap(), [json!(1)]);
    assert_eq!(
        t.eval_list(&json!("{{ vars.TOPICS | tojson }}"), &ctx)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        t.eval_list(&json!("[{% for x in vars.TOPICS %}{{ loop.index }}{{ ',' if not loop.last }}{% endfor %}]"), &ctx).unwrap(),
        [json!(1), json!(2), json!(3)]
    );
}

/// Every path of a document, for mutation tests.
fn all_pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                all_pointers(
                    x,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                all_pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The schema and the serde model agree: whatever the validator accepts deserializes, for
/// every single-point mutation of the example (replaced by another value or removed).
#[test]
fn whatever_validates_deserializes() {
    let base = example();
    let mut pointers = Vec::new();
    all_pointers(&base, String::new(), &mut pointers);
    let replacements = [
        json!(null),
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(100000),
        json!(""),
        json!("x"),
        json!("1s"),
        json!("llm"),
        json!([]),
        json!(["x"]),
        json!({}),
    ];
    let mut accepted = 0;
    for ptr in pointers.iter().filter(|p| !p.is_empty()) {
        let mut variants = Vec::new();
        for r in &replacements {
            let mut doc = base.clone();
            if let Some(slot) = doc.pointer_mut(ptr) {
                *slot = r.clone();
                variants.push(doc);
            }
        }
        // Removal.
        let (parent, last) = ptr.rsplit_once('/').unwrap();
        let mut doc = base.clone();
        match doc.pointer_mut(parent) {
            Some(Value::Object(m)) => {
                m.remove(last);
            }
            Some(Value::Array(a)) => {
                a.remove(last.parse::<usize>().unwrap());
            }
            _ => {}
        }
        variants.push(doc);
        for doc in variants {
            if validate(&doc).is_empty() {
                accepted += 1;
                if let Err(e) = load_value(doc.clone()) {
                    panic!("validated but did not load: {e:?}\n{doc:#}");
                }
            }
        }
    }
    assert!(accepted > 20, "{accepted}");
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(load_str(&deep_json, Format::Json, MAX).is_err());
    let deep_toml = format!("a = {}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(load_str(&deep_toml, Format::Toml, MAX).is_err());
    let t = Templates::new();
    let deep_tpl = format!("{{{{ {}1{} }}}}", "(".repeat(100_000), ")".repeat(100_000));
    assert!(t.check_syntax(&deep_tpl).is_err());
    assert!(t.render(&deep_tpl, &json!({})).is_err());
}

#[test]
fn tags_say_which_fleet_processes_run_a_step() {
    let bp = load_str(
        r#"{"name":"t","tags":["gpu"],"nodes":[{"id":"a","type":"transform","template":"x","tags":["eu"]}]}"#,
        Format::Json,
        MAX,
    )
    .unwrap();
    assert_eq!(bp.tags, ["gpu"]);
    assert_eq!(bp.nodes[0].tags, ["eu"]);
    let e = load_str(
        r#"{"name":"t","nodes":[{"id":"a","type":"transform","template":"x","tags":["gpu box"]}]}"#,
        Format::Json,
        MAX,
    )
    .unwrap_err()
    .iter()
    .map(|p| p.to_string())
    .collect::<Vec<_>>()
    .join("\n");
    assert!(
        e.contains("nodes[0].tags[0]") && e.contains("invalid tag"),
        "{e}"
    );
    // `omniflow schema` documents them.
    assert!(schema()["properties"]["tags"].is_object());
    assert!(serde_json::to_string(&schema())
        .unwrap()
        .contains("OMNIFLOW_TAGS"));
}
