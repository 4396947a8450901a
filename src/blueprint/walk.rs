//! The structural validator: a walker over the subset of JSON Schema that
//! [`super::schema`] uses. It reports every mismatch with its path and collects the places
//! that hold templates, which the semantic checks in [`super::validate`] then examine.

use super::problem::{suggestion, JPath};
use super::schema::ID_PATTERN;
use super::validate::{check_cron, parse_duration};
use serde_json::{Map, Value};

/// What a template site holds, which decides how it is parsed and what it may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SiteKind {
    /// A template string (`{{ … }}`).
    Template,
    /// A Jinja expression without braces (a condition).
    Expression,
    /// A node's `forEach` template: evaluated before the items exist.
    ForEach,
}

/// A string in the document that is a template.
#[derive(Debug, Clone)]
pub(crate) struct Site {
    pub(crate) path: JPath,
    pub(crate) kind: SiteKind,
    pub(crate) text: String,
}

/// Walks a document against the schema, collecting problems and template sites.
pub(crate) struct Walker<'s> {
    root: &'s Value,
    pub(crate) problems: Vec<(JPath, String)>,
    pub(crate) sites: Vec<Site>,
}

impl<'s> Walker<'s> {
    pub(crate) fn new(schema: &'s Value) -> Self {
        Walker {
            root: schema,
            problems: Vec::new(),
            sites: Vec::new(),
        }
    }

    /// Checks the whole document.
    pub(crate) fn run(&mut self, doc: &Value) {
        let root = self.root;
        self.check(root, doc, &JPath::root());
    }

    fn problem(&mut self, path: &JPath, message: impl Into<String>) {
        self.problems.push((path.clone(), message.into()));
    }

    fn resolve(&self, reference: &str) -> Option<&'s Value> {
        let root: &'s Value = self.root;
        reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
    }

    fn check(&mut self, schema: &'s Value, v: &Value, path: &JPath) {
        let Some(s) = schema.as_object() else {
            return; // `true` / `{}`: anything goes
        };
        // Our `$ref`s carry only a description beside them, so following the target is all.
        if let Some(reference) = s.get("$ref").and_then(Value::as_str) {
            if let Some(target) = self.resolve(reference) {
                self.check(target, v, path);
            }
            return;
        }
        if let Some(t) = s.get("type") {
            if !type_matches(t, v) {
                let mut msg = format!("expected {}, got {}", expected(s), got(v));
                // `timeout = 300` in TOML is the likeliest duration mistake: show the fix.
                if s.get("format").and_then(Value::as_str) == Some("duration") && v.is_number() {
                    msg.push_str(&format!(": add a unit, \"{v}s\""));
                }
                self.problem(path, msg);
                return;
            }
        }
        if let Some(c) = s.get("const") {
            if c != v {
                self.problem(path, format!("expected {c}, got {}", got(v)));
                return;
            }
        }
        if let Some(options) = s.get("enum").and_then(Value::as_array) {
            if !options.contains(v) {
                self.problem(path, enum_message(options, v));
                return;
            }
        }
        match v {
            Value::Number(_) => self.check_number(s, v, path),
            Value::String(text) => self.check_string(s, text, path),
            Value::Array(items) => self.check_array(s, items, path),
            Value::Object(obj) => self.check_object(s, obj, path),
            Value::Null | Value::Bool(_) => {}
        }
        if s.get("format").and_then(Value::as_str) == Some("templateJson") {
            self.collect_json_templates(v, path);
        }
    }

    fn check_number(&mut self, s: &Map<String, Value>, v: &Value, path: &JPath) {
        let Some(x) = v.as_f64() else { return };
        let min = s.get("minimum").and_then(Value::as_f64);
        let max = s.get("maximum").and_then(Value::as_f64);
        let out = min.is_some_and(|m| x < m) || max.is_some_and(|m| x > m);
        if out {
            let range = match (min, max) {
                (Some(a), Some(b)) => format!("must be between {a} and {b}"),
                (Some(a), None) => format!("must be at least {a}"),
                (None, Some(b)) => format!("must be at most {b}"),
                (None, None) => String::new(),
            };
            self.problem(path, format!("{v} is out of range: {range}"));
        }
    }

    fn check_string(&mut self, s: &Map<String, Value>, text: &str, path: &JPath) {
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if (text.chars().count() as u64) < min {
                self.problem(path, "must not be empty");
                return;
            }
        }
        if let Some(pattern) = s.get("pattern").and_then(Value::as_str) {
            if let Err(msg) = check_pattern(pattern, text) {
                self.problem(path, msg);
                return;
            }
        }
        let kind = match s.get("format").and_then(Value::as_str) {
            Some("duration") => {
                if let Err(msg) = parse_duration(text) {
                    self.problem(path, msg);
                }
                return;
            }
            Some("cron") => {
                if let Err(msg) = check_cron(text) {
                    self.problem(path, msg);
                }
                return;
            }
            // UTC, a fixed offset or an IANA name, parsed the way the scheduler will parse it
            // (`blueprint::zone`), so a zone that loads is a zone that fires.
            Some("timezone") => {
                if let Err(msg) = super::parse_timezone(Some(text)) {
                    // The path already says `timezone`.
                    let msg = msg
                        .strip_prefix("timezone ")
                        .map(str::to_string)
                        .unwrap_or(msg);
                    self.problem(path, msg);
                }
                return;
            }
            Some("template") => SiteKind::Template,
            Some("expression") => SiteKind::Expression,
            Some("forEach") => SiteKind::ForEach,
            _ => return,
        };
        self.sites.push(Site {
            path: path.clone(),
            kind,
            text: text.to_string(),
        });
    }

    fn check_array(&mut self, s: &'s Map<String, Value>, items: &[Value], path: &JPath) {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (items.len() as u64) < min {
                self.problem(path, format!("must have at least {min} item(s)"));
            }
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                self.check(item_schema, item, &path.index(i));
            }
        }
    }

    fn check_object(&mut self, s: &'s Map<String, Value>, obj: &Map<String, Value>, path: &JPath) {
        // A discriminator picks the one branch meant (a node's `type`), so problems are
        // reported against it rather than against every branch of the `oneOf`.
        let mut skip = None;
        if let Some(d) = s.get("discriminator") {
            let prop = d
                .get("propertyName")
                .and_then(Value::as_str)
                .unwrap_or("type");
            let mapping = d.get("mapping").and_then(Value::as_object);
            let tags: Vec<&str> = mapping
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            match obj.get(prop) {
                Some(Value::String(tag)) => {
                    let target = mapping
                        .and_then(|m| m.get(tag))
                        .and_then(Value::as_str)
                        .and_then(|r| self.resolve(r));
                    if let Some(branch) = target {
                        self.check(branch, &Value::Object(obj.clone()), path);
                        return;
                    }
                    let noun = d.get("x-noun").and_then(Value::as_str).unwrap_or(prop);
                    let msg = format!(
                        "unknown {noun} \"{tag}\"{} (types: {})",
                        suggestion(tag, tags.iter().copied()),
                        tags.join(", ")
                    );
                    self.problem(&path.key(prop), msg);
                }
                Some(other) => {
                    let msg = format!("expected one of {}, got {}", tags.join(", "), got(other));
                    self.problem(&path.key(prop), msg);
                }
                None => {
                    let msg = format!(
                        "missing required field \"{prop}\" (one of: {})",
                        tags.join(", ")
                    );
                    self.problem(path, msg);
                }
            }
            skip = Some(prop);
        }
        if let Some(required) = s.get("required").and_then(Value::as_array) {
            for field in required.iter().filter_map(Value::as_str) {
                if Some(field) != skip && !obj.contains_key(field) {
                    self.problem(path, format!("missing required field \"{field}\""));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        let additional = s.get("additionalProperties");
        for (key, value) in obj {
            if Some(key.as_str()) == skip {
                continue;
            }
            let child = path.key(key);
            if let Some(prop_schema) = props.and_then(|p| p.get(key)) {
                self.check(prop_schema, value, &child);
                continue;
            }
            match additional {
                Some(Value::Bool(false)) => {
                    let known: Vec<&str> = props
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    let hint = suggestion(key, known.iter().copied());
                    let msg = if hint.is_empty() {
                        format!("unknown field \"{key}\" (allowed: {})", known.join(", "))
                    } else {
                        format!("unknown field \"{key}\"{hint}")
                    };
                    self.problem(&child, msg);
                }
                Some(extra) => self.check(extra, value, &child),
                None => {}
            }
        }
    }

    /// Every string inside a JSON value (an http body) is a template.
    fn collect_json_templates(&mut self, v: &Value, path: &JPath) {
        match v {
            Value::String(text) => self.sites.push(Site {
                path: path.clone(),
                kind: SiteKind::Template,
                text: text.clone(),
            }),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.collect_json_templates(item, &path.index(i));
                }
            }
            Value::Object(obj) => {
                for (k, item) in obj {
                    self.collect_json_templates(item, &path.key(k));
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

/// The patterns the schema uses; a test checks the schema uses no other, so a pattern can
/// never be silently ignored.
pub(crate) const KNOWN_PATTERNS: [&str; 2] = [ID_PATTERN, super::schema::TAG_PATTERN];

fn check_pattern(pattern: &str, text: &str) -> Result<(), String> {
    debug_assert!(
        KNOWN_PATTERNS.contains(&pattern),
        "unknown pattern {pattern}"
    );
    if pattern == ID_PATTERN && !super::problem::is_identifier(text) {
        return Err(format!(
            "invalid id \"{text}\": use letters, digits and _ (not starting with a digit), \
             because templates read it as nodes.{text}.output"
        ));
    }
    if pattern == super::schema::TAG_PATTERN {
        let ok = (1..=64).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(format!(
                "invalid tag \"{text}\": use letters, digits, - and _ (at most 64), as in \
                 OMNIFLOW_TAGS=gpu,eu"
            ));
        }
    }
    Ok(())
}

fn type_matches(t: &Value, v: &Value) -> bool {
    match t {
        Value::String(name) => type_is(name, v),
        Value::Array(names) => names
            .iter()
            .filter_map(Value::as_str)
            .any(|name| type_is(name, v)),
        _ => true,
    }
}

fn type_is(name: &str, v: &Value) -> bool {
    match name {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn expected(s: &Map<String, Value>) -> String {
    if let Some(text) = s.get("x-expected").and_then(Value::as_str) {
        return text.to_string();
    }
    let phrase = |name: &str| match name {
        "string" => "a string",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "true or false",
        "object" => "an object",
        "array" => "an array",
        "null" => "null",
        _ => "a value",
    };
    match s.get("type") {
        Some(Value::String(name)) => phrase(name).to_string(),
        Some(Value::Array(names)) => names
            .iter()
            .filter_map(Value::as_str)
            .map(phrase)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "a value".to_string(),
    }
}

/// What a value is, for "got …": its type, and the value itself when it is short.
pub(crate) fn got(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) if n.is_i64() || n.is_u64() => format!("an integer ({n})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) if s.chars().count() <= 40 => format!("a string ({s:?})"),
        Value::String(_) => "a string".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

fn enum_message(options: &[Value], v: &Value) -> String {
    let names: Vec<&str> = options.iter().filter_map(Value::as_str).collect();
    let list = names.join(", ");
    match v {
        Value::String(s) => format!(
            "unknown value \"{s}\"{} (one of: {list})",
            suggestion(s, names.iter().copied())
        ),
        other => format!("expected one of: {list}, got {}", got(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blueprint::schema::schema;

    fn patterns(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "pattern" {
                        out.extend(x.as_str().map(str::to_string));
                    }
                    patterns(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| patterns(x, out)),
            _ => {}
        }
    }

    #[test]
    fn the_walker_knows_every_pattern_the_schema_uses() {
        let mut found = Vec::new();
        patterns(&schema(), &mut found);
        assert!(!found.is_empty());
        for p in found {
            assert!(KNOWN_PATTERNS.contains(&p.as_str()), "{p}");
        }
    }

    #[test]
    fn the_walker_knows_every_format_the_schema_uses() {
        fn formats(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    for (k, x) in m {
                        if k == "format" {
                            out.extend(x.as_str().map(str::to_string));
                        }
                        formats(x, out);
                    }
                }
                Value::Array(a) => a.iter().for_each(|x| formats(x, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        formats(&schema(), &mut found);
        for f in found {
            assert!(
                [
                    "duration",
                    "cron",
                    "timezone",
                    "template",
                    "expression",
                    "forEach",
                    "templateJson"
                ]
                .contains(&f.as_str()),
                "{f}"
            );
        }
    }
}
