//! Every blueprint shipped in `blueprints/` loads into the typed model and hangs together.
//!
//! A floor, not the validator (which reports every problem with its path): the graph is sound,
//! every `nodes.X` a node reads is upstream of it, every template and expression compiles, and
//! every schedule parses.

use omniflow::blueprint::{Blueprint, NodeKind};
use omniflow::template::Templates;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

fn blueprint_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints")
}

/// Every `.json` and `.toml` file, as raw JSON (TOML is converted) and typed.
fn load_all() -> Vec<(PathBuf, Value, Blueprint)> {
    let mut paths: Vec<PathBuf> = fs::read_dir(blueprint_dir())
        .expect("blueprints/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("json" | "toml")
            )
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path).expect("readable blueprint");
            let raw: Value = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display())),
                _ => {
                    let t: toml::Value = toml::from_str(&text)
                        .unwrap_or_else(|e| panic!("{}: invalid TOML: {e}", path.display()));
                    serde_json::to_value(t).expect("TOML converts to JSON")
                }
            };
            let bp: Blueprint = serde_json::from_value(raw.clone())
                .unwrap_or_else(|e| panic!("{}: not a blueprint: {e}", path.display()));
            (path, raw, bp)
        })
        .collect()
}

#[test]
fn the_expected_blueprints_are_bundled() {
    let names: HashSet<String> = load_all().into_iter().map(|(_, _, bp)| bp.name).collect();
    for name in ["tech-digest", "triage", "page-summary"] {
        assert!(names.contains(name), "blueprints/ lacks {name}: {names:?}");
    }
}

#[test]
fn every_bundled_blueprint_is_sound() {
    for (path, raw, bp) in load_all() {
        let file = path.display().to_string();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        assert_eq!(bp.name, stem, "{file}: name should match the file name");
        assert!(!bp.nodes.is_empty(), "{file}: no nodes");

        // Ids: unique, identifier-shaped.
        let mut ids = HashSet::new();
        for node in &bp.nodes {
            assert!(is_identifier(&node.id), "{file}: bad node id {:?}", node.id);
            assert!(
                ids.insert(node.id.as_str()),
                "{file}: duplicate id {}",
                node.id
            );
        }

        // Needs: existing nodes, no self-reference, no cycle.
        for node in &bp.nodes {
            for need in &node.needs {
                assert!(
                    ids.contains(need.as_str()),
                    "{file}: {} needs unknown {need:?}",
                    node.id
                );
                assert_ne!(need, &node.id, "{file}: {} needs itself", node.id);
            }
        }
        let upstream = ancestors(&bp);
        for node in &bp.nodes {
            assert!(
                !upstream[node.id.as_str()].contains(node.id.as_str()),
                "{file}: {} is in a cycle",
                node.id
            );
        }

        // A node reads only the outputs of nodes upstream of it.
        let raw_nodes = raw["nodes"].as_array().expect("nodes is a list");
        for (node, raw_node) in bp.nodes.iter().zip(raw_nodes) {
            for read in node_references(raw_node) {
                assert!(
                    upstream[node.id.as_str()].contains(read.as_str()),
                    "{file}: {} reads nodes.{read} without needing it (directly or through \
                     its needs)",
                    node.id
                );
            }
        }

        // Templates and expressions compile in the engine's own environment (its filters, its
        // undefined behaviour), not a bare minijinja one.
        let env = Templates::new();
        for node in &bp.nodes {
            let raw_node = serde_json::to_value(node).expect("node serializes");
            for text in strings(&raw_node) {
                if text.contains("{{") || text.contains("{%") {
                    env.check_syntax(&text).unwrap_or_else(|e| {
                        panic!(
                            "{file}: {}: template does not compile: {e}\n{text}",
                            node.id
                        )
                    });
                }
            }
            if let NodeKind::Condition(c) = &node.kind {
                env.check_expr_syntax(&c.expression).unwrap_or_else(|e| {
                    panic!("{file}: {}: expression does not compile: {e}", node.id)
                });
            }
        }

        if let Some(schedule) = &bp.schedule {
            croner::Cron::new(schedule)
                .parse()
                .unwrap_or_else(|e| panic!("{file}: schedule {schedule:?}: {e}"));
        }

        // The sandbox test the console runs by default.
        let test = bp
            .test_config
            .as_ref()
            .unwrap_or_else(|| panic!("{file}: no testConfig"));
        for var in &test.variables {
            assert!(
                bp.variables.contains_key(&var.key),
                "{file}: test variable {} is not a variable of the blueprint",
                var.key
            );
        }
        let rate = test.simulate_failures.unwrap_or(0.0);
        assert!(
            (0.0..=1.0).contains(&rate),
            "{file}: simulateFailures {rate}"
        );
    }
}

#[test]
fn tech_digest_is_the_designed_40_topic_fan_out() {
    let (_, _, bp) = load_all()
        .into_iter()
        .find(|(_, _, bp)| bp.name == "tech-digest")
        .expect("tech-digest is bundled");
    let topics = bp.variables["TOPICS"].as_array().expect("TOPICS is a list");
    assert_eq!(topics.len(), 40);
    let unique: HashSet<_> = topics.iter().collect();
    assert_eq!(unique.len(), 40, "topics are distinct");
    assert_eq!(bp.schedule.as_deref(), Some("17 */6 * * *"));
    assert!(bp
        .node("summarize")
        .and_then(|n| n.for_each.as_ref())
        .is_some());
    let test = bp.test_config.expect("testConfig");
    assert_eq!(test.simulate_failures, Some(0.3));
    let test_topics = omniflow::blueprint::parse_var_value(&test.variables[0].value);
    assert_eq!(test_topics.as_array().map(Vec::len), Some(3));
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// For each node, every node it depends on directly or transitively.
fn ancestors(bp: &Blueprint) -> HashMap<&str, HashSet<&str>> {
    let needs: HashMap<&str, Vec<&str>> = bp
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.needs.iter().map(String::as_str).collect()))
        .collect();
    needs
        .keys()
        .map(|&id| {
            let mut seen = HashSet::new();
            let mut stack: Vec<&str> = needs[id].clone();
            while let Some(next) = stack.pop() {
                if seen.insert(next) {
                    stack.extend(needs.get(next).into_iter().flatten().copied());
                }
            }
            (id, seen)
        })
        .collect()
}

/// Every string inside a JSON value.
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        Value::Object(map) => map.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// The ids `X` of every `nodes.X` a node's strings mention.
fn node_references(raw_node: &Value) -> HashSet<String> {
    let mut found = HashSet::new();
    for text in strings(raw_node) {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("nodes.") {
            let before_ok = rest[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            let after = &rest[i + "nodes.".len()..];
            let id: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if before_ok && !id.is_empty() {
                found.insert(id);
            }
            rest = after;
        }
    }
    found
}

/// Renders one node's template as a run does: the production template environment (semi-strict
/// undefined, OmniFlow's filters, the fuel limit) and the context a step gets (`vars.X`,
/// `nodes.ID.output` and `.status`, `run`).
fn render(bp: &Blueprint, node: &str, outputs: Value) -> String {
    let template = match &bp.node(node).expect("node exists").kind {
        NodeKind::Transform(t) => t.template.clone(),
        NodeKind::Notify(n) => n.text.clone(),
        other => panic!("{node} is a {}", other.type_name()),
    };
    let nodes: serde_json::Map<String, Value> = outputs
        .as_object()
        .expect("outputs by node id")
        .iter()
        .map(|(id, out)| {
            (
                id.clone(),
                serde_json::json!({ "output": out, "status": "success" }),
            )
        })
        .collect();
    let context = serde_json::json!({
        "vars": bp.variables,
        "nodes": nodes,
        "run": { "id": "0test0000", "blueprint": bp.name, "sandbox": false },
    });
    Templates::new()
        .render(&template, &context)
        .unwrap_or_else(|e| panic!("{}.{node}: {}", bp.name, e.message))
}

fn bundled(name: &str) -> Blueprint {
    load_all()
        .into_iter()
        .map(|(_, _, bp)| bp)
        .find(|bp| bp.name == name)
        .unwrap_or_else(|| panic!("{name} is bundled"))
}

#[test]
fn templates_render_plausible_upstream_outputs() {
    let digest = bundled("tech-digest");
    let answers: Vec<String> = (0..40).map(|i| format!(" answer {i}\n")).collect();
    let text = render(
        &digest,
        "digest",
        serde_json::json!({ "summarize": answers }),
    );
    assert!(
        text.starts_with("▪ Rust language and compiler releases\nanswer 0\n\n▪ "),
        "{text}"
    );
    assert!(
        text.ends_with("▪ AI regulation and policy\nanswer 39"),
        "{text}"
    );

    let triage = bundled("triage");
    for (answer, label) in [
        ("Urgent.\n", "urgent"),
        (" normal", "normal"),
        ("SPAM", "spam"),
    ] {
        let out = render(&triage, "label", serde_json::json!({ "classify": answer }));
        assert_eq!(out, label);
    }

    let page = bundled("page-summary");
    let body = format!("  {}", "x".repeat(5000));
    let out = render(&page, "excerpt", serde_json::json!({ "fetch": body }));
    assert_eq!(out.len(), 3998, "cut to 4000 characters, then trimmed");

    let releases = bundled("release-notes");
    let reply = serde_json::json!([{ "name": "v0.30.0", "tag_name": "v0.30.0",
        "published_at": "2025-06-01T10:00:00Z", "body": "## Breaking\n- renamed X" }]);
    let notes = render(&releases, "notes", serde_json::json!({ "fetch": reply }));
    assert!(
        notes.starts_with("v0.30.0 (v0.30.0, 2025-06-01T10:00:00Z)\n\n## Breaking"),
        "{notes}"
    );
    let post = render(
        &releases,
        "post",
        serde_json::json!({ "notes": notes, "summarize": "- X is now Y" }),
    );
    assert!(
        post.starts_with("New release of ratatui/ratatui: v0.30.0 (v0.30.0"),
        "{post}"
    );
}
