//! Sandboxed Jinja templating (minijinja) for prompts, texts, URLs, `forEach` and conditions.
//!
//! Templates are data, never code: the environment has no loader (so `{% include %}`,
//! `{% import %}` and `{% extends %}` fail), no function that reads the environment, files or
//! the network, and the `debug` global is removed. Every render is bounded by a fuel limit
//! (`TEMPLATE_FUEL` instructions) and minijinja's recursion limit, so a template cannot loop
//! forever, and by size budgets (`TEMPLATE_MAX_OUTPUT` for what it outputs,
//! `TEMPLATE_MAX_VALUE` for any value it builds), so it cannot exhaust memory: see [`guard`]
//! for how `*`, `+` and `~` are put under those checks, and `checked.rs` for the checks.
//!
//! # Context
//! Templates read one JSON object:
//! ```json
//! { "vars":  { "TOPICS": ["rust", "wasm"] },
//!   "nodes": { "summarize": { "output": ["…", "…"], "status": "success" } },
//!   "item":  "rust",          // only inside a forEach node: the current item
//!   "index": 0,               // only inside a forEach node: its position (from 0)
//!   "run":   { "id": "…", "blueprint": "tech-digest" } }
//! ```
//!
//! # Undefined values
//! [`minijinja::UndefinedBehavior::SemiStrict`]: printing or iterating an undefined value is
//! an error at run time (`{{ vars.MISSING }}` fails with a message naming `vars.MISSING`)
//! instead of silently producing an empty prompt; `default` still works
//! (`{{ vars.X | default('y') }}`), and so do `is defined` and `{% if item.optional %}` (an
//! undefined value is false there — full `Strict` would fail on that common pattern). The
//! validator catches unknown references before a run starts, so this is a second line of
//! defence for data that is only known at run time (fields of a node's output).
//!
//! # Rendering values
//! Lists and objects printed with `{{ value }}` render as compact JSON (`["a","b"]`), so a
//! node's structured output pasted into a prompt stays readable; `none` (a JSON `null`, e.g.
//! the output of a failed `continueOnError` node) renders as an empty string. Use `tojson`
//! for pretty or explicit JSON and `join` for text.
//!
//! # Filters
//! minijinja's builtins (`join`, `tojson`, `default`, `length`, `upper`, `lower`, `trim`,
//! `replace`, `first`, `last`, `map`, `select`, `sort`, `unique`, …) plus two of ours:
//! `truncate(length=255, killwords=false, end='...', leeway=5)` with Jinja2's semantics, and
//! `fromjson` (parse a JSON string into a value).

// User input must never panic: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod checked;
pub mod guard;

use crate::error::{ErrorKind, StepError};
use crate::limits::Limits;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{
    Environment, Error as MjError, Output, State, UndefinedBehavior, Value as MjValue,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Instructions one render may execute by default: far beyond any sensible prompt (a loop
/// over 10,000 items with a few filters each), far below "forever" (`TEMPLATE_FUEL`).
pub const FUEL: u64 = crate::limits::DEFAULT_TEMPLATE_FUEL;

/// Globals minijinja provides that are functions, not context: never reported as references.
const BUILTIN_GLOBALS: [&str; 3] = ["range", "dict", "namespace"];

/// A template context converted to minijinja's values once, shared cheaply: every item of a
/// fan-out gets `item` and `index` layered over the same converted base.
#[derive(Clone, Debug)]
pub struct Context {
    value: MjValue,
    item: Option<(Value, usize)>,
}

impl Context {
    /// Converts `json` (`{vars, nodes, run}`) once.
    pub fn new(json: Value) -> Context {
        Context::from_value(MjValue::from_serialize(&json))
    }

    /// A context the caller built from minijinja values: the engine converts a run's
    /// variables once and lends `nodes` as a lazy view of the finished nodes, so a step's
    /// context costs the same whatever the run's size.
    pub fn from_value(value: MjValue) -> Context {
        Context { value, item: None }
    }

    /// The same context with `item` and `index` for one fan-out item (the base is shared,
    /// not copied).
    pub fn with_item(&self, item: Value, index: usize) -> Context {
        let value = minijinja::context! {
            item => MjValue::from_serialize(&item),
            index => index,
            ..self.value.clone()
        };
        Context {
            value,
            item: Some((item, index)),
        }
    }

    /// The fan-out item, if any.
    pub fn item(&self) -> Option<&Value> {
        self.item.as_ref().map(|(v, _)| v)
    }

    /// The whole context as JSON (a full copy: for error messages and tests only).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.value).unwrap_or(Value::Null)
    }
}

/// Counts bytes written to it and stops past a cap: the size of a value serialized, without
/// building it.
pub struct SizeCounter(checked::CappedBytes<std::io::Sink>);

impl SizeCounter {
    pub fn new(cap: usize) -> Self {
        // Holds nothing: not a measure of memory.
        SizeCounter(checked::CappedBytes::new(std::io::sink(), cap).holding_nothing())
    }
}

impl std::io::Write for SizeCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The sandboxed template environment. Cheap to clone (shared), `Send + Sync`.
#[derive(Clone)]
pub struct Templates {
    env: Arc<Environment<'static>>,
    limits: Arc<Limits>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").finish_non_exhaustive()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

impl Templates {
    /// Builds the environment once with the default budgets ([`Limits::default`]).
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// Builds the environment once: semi-strict undefined, the budgets of `limits` (fuel,
    /// output, value sizes), our filters, no loader.
    pub fn with_limits(limits: Limits) -> Self {
        let limits = Arc::new(limits);
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_fuel(Some(limits.template_fuel));
        // Prompts are text, not HTML: never escape.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_keep_trailing_newline(true);
        env.remove_global("debug");
        let cap = limits.template_max_output;
        env.set_formatter(move |out, state, value| format_value(out, state, value, cap));
        env.add_filter("truncate", truncate);
        env.add_filter("fromjson", fromjson);
        checked::install(&mut env, &limits);
        Templates {
            env: Arc::new(env),
            limits,
        }
    }

    /// The budgets renders run under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A render's failure: the output budget's message when the writer stopped it.
    fn render_error(&self, e: &MjError, over: bool, template: &str, ctx: &Context) -> StepError {
        if over {
            return StepError::new(ErrorKind::Template, checked::output_message(&self.limits));
        }
        let missing = self
            .referenced(template)
            .map(|refs| first_missing(&refs, &ctx.value))
            .unwrap_or_default();
        StepError::new(ErrorKind::Template, describe(e, missing.as_deref()))
    }

    /// Renders `template` against `ctx` (see the module docs for its shape).
    ///
    /// Errors are [`ErrorKind::Template`] with the line and, for an undefined value, the
    /// reference that is missing.
    pub fn render(&self, template: &str, ctx: &Value) -> Result<String, StepError> {
        self.render_in(template, &Context::new(ctx.clone()))
    }

    /// Like [`Templates::render`], against a context converted once ([`Context`]): what the
    /// engine uses, so a 10,000-item fan-out does not convert its variables 10,000 times.
    pub fn render_in(&self, template: &str, ctx: &Context) -> Result<String, StepError> {
        let source = guard::rewrite_template(template)
            .map_err(|msg| StepError::new(ErrorKind::Template, msg))?;
        let _scope = checked::RenderScope::begin();
        let compiled = self
            .env
            .template_from_str(&source)
            .map_err(|e| self.render_error(&e, false, template, ctx))?;
        let mut out = checked::CappedBytes::new(Vec::new(), self.limits.template_max_output);
        if let Err(e) = compiled.render_captured_to(ctx.value.clone(), &mut out) {
            if let Some(m) = out.memory.take() {
                return Err(StepError::new(ErrorKind::Template, m));
            }
            return Err(self.render_error(&e, out.over, template, ctx));
        }
        String::from_utf8(out.inner).map_err(|_| {
            StepError::new(
                ErrorKind::Template,
                "the template's output is not valid UTF-8",
            )
        })
    }

    /// Evaluates a Jinja expression (no braces), e.g. `nodes.classify.output == "urgent"`.
    pub fn eval_expr(&self, expr: &str, ctx: &Value) -> Result<Value, StepError> {
        self.eval_expr_in(expr, &Context::new(ctx.clone()))
    }

    /// Like [`Templates::eval_expr`], against a converted [`Context`].
    pub fn eval_expr_in(&self, expr: &str, ctx: &Context) -> Result<Value, StepError> {
        let template_err = |e: &MjError, missing: Option<&str>| {
            StepError::new(
                ErrorKind::Template,
                format!("in expression `{expr}`: {}", describe(e, missing)),
            )
        };
        let source = guard::rewrite_expr(expr).map_err(|msg| {
            StepError::new(
                ErrorKind::Template,
                format!("in expression `{expr}`: {msg}"),
            )
        })?;
        let _scope = checked::RenderScope::begin();
        let compiled = self
            .env
            .compile_expression(&source)
            .map_err(|e| template_err(&e, None))?;
        let value = compiled.eval(ctx.value.clone()).map_err(|e| {
            let refs = names_of(compiled.undeclared_variables(true), expr);
            template_err(&e, first_missing(&refs, &ctx.value).as_deref())
        })?;
        to_json(&value)
    }

    /// The items of a `forEach`:
    /// - a literal JSON array: its items;
    /// - a string that is exactly one `{{ expr }}`: the expression's value, which must be a
    ///   list (a string holding a JSON array is parsed);
    /// - any other string: rendered, and the text parsed as a JSON array.
    pub fn eval_list(&self, for_each: &Value, ctx: &Value) -> Result<Vec<Value>, StepError> {
        self.eval_list_in(for_each, &Context::new(ctx.clone()))
    }

    /// Like [`Templates::eval_list`], against a converted [`Context`].
    pub fn eval_list_in(&self, for_each: &Value, ctx: &Context) -> Result<Vec<Value>, StepError> {
        let list_err = |got: &str| {
            StepError::new(
                ErrorKind::Template,
                format!("forEach must yield a list, got {got}"),
            )
        };
        match for_each {
            Value::Array(items) => Ok(items.clone()),
            Value::String(text) => {
                let value = match single_expression(text) {
                    Some(expr) => self.eval_expr_in(expr, ctx)?,
                    None => Value::String(self.render_in(text, ctx)?),
                };
                match value {
                    Value::Array(items) => Ok(items),
                    Value::String(s) => match serde_json::from_str::<Value>(s.trim()) {
                        Ok(Value::Array(items)) => Ok(items),
                        _ => Err(list_err(&format!(
                            "a string that is not a JSON array ({})",
                            short(&s)
                        ))),
                    },
                    other => Err(list_err(json_type(&other))),
                }
            }
            other => Err(list_err(json_type(other))),
        }
    }

    /// Truthiness with Jinja's rules: `null`, `false`, `0`, `""`, `[]` and `{}` are false.
    pub fn is_truthy(v: &Value) -> bool {
        match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }

    /// Checks a template's syntax without rendering it.
    pub fn check_syntax(&self, template: &str) -> Result<(), String> {
        let source = guard::rewrite_template(template)?;
        self.env
            .template_from_str(&source)
            .map(|_| ())
            .map_err(|e| describe(&e, None))
    }

    /// Checks an expression's syntax without evaluating it.
    pub fn check_expr_syntax(&self, expr: &str) -> Result<(), String> {
        let source = guard::rewrite_expr(expr)?;
        self.env
            .compile_expression(&source)
            .map(|_| ())
            .map_err(|e| describe(&e, None))
    }

    /// The names a template reads from its context, as dotted paths:
    /// `{"vars.TOPICS", "nodes.summarize.output", "item"}`.
    ///
    /// Built on minijinja's `undeclared_variables(true)`, which follows `a.b.c` chains only;
    /// constant subscripts (`nodes['x'].output`, `vars["X"]`) are found by a scan of the
    /// template's tags and reported as `nodes.x` / `vars.X`. A dynamic subscript
    /// (`nodes[name]`) is reported as the bare `nodes` and cannot be checked.
    ///
    /// Nothing is evaluated: the growing operators are rewritten into calls first
    /// ([`guard`]), so the compiler has no constant to fold.
    pub fn referenced(&self, template: &str) -> Result<BTreeSet<String>, String> {
        let source = guard::rewrite_template(template)?;
        let compiled = self
            .env
            .template_from_str(&source)
            .map_err(|e| describe(&e, None))?;
        Ok(names_of(compiled.undeclared_variables(true), template))
    }

    /// Like [`Templates::referenced`], for an expression (a condition).
    pub fn referenced_expr(&self, expr: &str) -> Result<BTreeSet<String>, String> {
        let source = guard::rewrite_expr(expr)?;
        let compiled = self
            .env
            .compile_expression(&source)
            .map_err(|e| describe(&e, None))?;
        let mut names = names_of(compiled.undeclared_variables(true), "");
        names.extend(subscript_refs(expr));
        Ok(names)
    }
}

/// Merges minijinja's undeclared names with constant subscripts found in `source`'s tags,
/// dropping builtin globals.
fn names_of(found: std::collections::HashSet<String>, source: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = found
        .into_iter()
        .filter(|n| {
            let head = n.split('.').next().unwrap_or(n);
            !BUILTIN_GLOBALS.contains(&head) && !guard::HELPERS.contains(&head)
        })
        .collect();
    for tag in tags(source) {
        names.extend(subscript_refs(tag));
    }
    names
}

/// The insides of `{{ … }}` and `{% … %}` in a template, in one pass (each search starts
/// where the last ended, so 100,000 tags cost 100,000 steps, not their square).
fn tags(source: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(brace) = rest.find('{') {
        let after = &rest[brace + 1..];
        let close = if after.starts_with('{') {
            "}}"
        } else if after.starts_with('%') {
            "%}"
        } else {
            rest = after;
            continue;
        };
        let body = &after[1..];
        match body.find(close) {
            Some(end) => {
                out.push(&body[..end]);
                rest = &body[end + 2..];
            }
            None => {
                out.push(body);
                break;
            }
        }
    }
    out
}

/// `nodes['x']`, `nodes["x"]`, `vars['X']` in an expression → `nodes.x`, `vars.X`.
fn subscript_refs(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for root in ["nodes", "vars"] {
        let mut from = 0;
        while let Some(pos) = expr[from..].find(root) {
            let start = from + pos;
            from = start + root.len();
            let before_ok = expr[..start]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'));
            if !before_ok {
                continue;
            }
            let rest = expr[from..].trim_start();
            let Some(rest) = rest.strip_prefix('[') else {
                continue;
            };
            let rest = rest.trim_start();
            let Some(quote) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                continue;
            };
            let inner = &rest[1..];
            if let Some(end) = inner.find(quote) {
                let key = &inner[..end];
                if inner[end + 1..].trim_start().starts_with(']') {
                    out.insert(format!("{root}.{key}"));
                }
            }
        }
    }
    out
}

/// `{{ expr }}` (with optional whitespace control) and nothing else → `expr`.
fn single_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

/// The first referenced path that `ctx` does not hold, for "undefined value" messages.
/// Walks the context as templates see it (the engine's `nodes` is a lazy view), never a copy.
fn first_missing(refs: &BTreeSet<String>, ctx: &MjValue) -> Option<String> {
    refs.iter()
        .find(|path| {
            let mut cur = ctx.clone();
            for seg in path.split('.') {
                match cur.get_attr(seg) {
                    Ok(next) if !next.is_undefined() => cur = next,
                    _ => return true,
                }
            }
            false
        })
        .cloned()
}

/// One line for a minijinja error: what, the detail, the line, and the missing reference.
fn describe(e: &MjError, missing: Option<&str>) -> String {
    let mut msg = e.kind().to_string();
    if let Some(detail) = e.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    if e.kind() == minijinja::ErrorKind::UndefinedError {
        if let Some(name) = missing {
            msg.push_str(&format!(" (`{name}` is not defined)"));
        }
    }
    if e.kind() == minijinja::ErrorKind::OutOfFuel {
        msg.push_str(" (TEMPLATE_FUEL: do less in one template, or raise TEMPLATE_FUEL)");
    }
    if let Some(line) = e.line() {
        msg.push_str(&format!(" at line {line}"));
    }
    msg
}

fn to_json(value: &MjValue) -> Result<Value, StepError> {
    if value.is_undefined() {
        return Ok(Value::Null);
    }
    serde_json::to_value(value).map_err(|e| {
        StepError::new(
            ErrorKind::Template,
            format!("the value cannot be represented as JSON: {e}"),
        )
    })
}

/// The JSON type of a value, with an article, for messages.
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn short(s: &str) -> String {
    let mut t: String = s.chars().take(40).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

/// Lists and maps print as compact JSON, `none` as nothing; the rest as minijinja does.
fn format_value(
    out: &mut Output,
    state: &State,
    value: &MjValue,
    cap: usize,
) -> Result<(), MjError> {
    match value.kind() {
        ValueKind::None => Ok(()),
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => {
            // Printed into a bounded buffer: a large list stops at the output budget
            // instead of being serialized whole first.
            let mut buf = checked::CappedBytes::new(Vec::new(), cap);
            if let Err(e) = serde_json::to_writer(&mut buf, value) {
                let msg = if buf.over {
                    format!("printing this value would exceed the output budget of {cap} bytes (TEMPLATE_MAX_OUTPUT)")
                } else {
                    format!("cannot print this value as JSON: {e}")
                };
                return Err(MjError::new(minijinja::ErrorKind::BadSerialization, msg));
            }
            out.write_str(&String::from_utf8_lossy(&buf.inner))
                .map_err(MjError::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Jinja2's `truncate(s, length=255, killwords=False, end='...', leeway=5)`.
fn truncate(
    s: String,
    length: Option<usize>,
    killwords: Option<bool>,
    end: Option<String>,
    kwargs: Kwargs,
) -> Result<String, MjError> {
    let length = match length {
        Some(l) => l,
        None => kwargs.get::<Option<usize>>("length")?.unwrap_or(255),
    };
    let killwords = match killwords {
        Some(k) => k,
        None => kwargs.get::<Option<bool>>("killwords")?.unwrap_or(false),
    };
    let end = match end {
        Some(e) => e,
        None => kwargs
            .get::<Option<String>>("end")?
            .unwrap_or_else(|| "...".to_string()),
    };
    let leeway = kwargs.get::<Option<usize>>("leeway")?.unwrap_or(5);
    kwargs.assert_all_used()?;
    let end_len = end.chars().count();
    if length < end_len {
        return Err(MjError::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("truncate: length {length} is shorter than the end marker {end:?}"),
        ));
    }
    // Counted without collecting: a length near usize::MAX must neither wrap nor allocate.
    if s.chars().count() <= length.saturating_add(leeway) {
        return Ok(s);
    }
    let head: String = s.chars().take(length - end_len).collect();
    if killwords {
        return Ok(head + &end);
    }
    let head = match head.rfind(' ') {
        Some(pos) => head[..pos].to_string(),
        None => head,
    };
    Ok(head + &end)
}

/// Parses a JSON string into a value: `{{ (nodes.api.output | fromjson).items }}`.
fn fromjson(s: String) -> Result<MjValue, MjError> {
    serde_json::from_str::<Value>(&s)
        .map(|v| MjValue::from_serialize(&v))
        .map_err(|e| {
            MjError::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("fromjson: not valid JSON: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({
            "vars": { "TOPICS": ["rust", "wasm"], "NAME": "Ada" },
            "nodes": {
                "fetch": { "output": { "items": [{ "title": "First" }, { "title": "Second" }] },
                           "status": "success" },
                "summarize": { "output": ["one", "two"], "status": "success" },
                "failed": { "output": null, "status": "error" },
                "raw": { "output": "[\"x\",\"y\"]", "status": "success" }
            },
            "run": { "id": "r1", "blueprint": "demo" }
        })
    }

    #[test]
    fn renders_vars_and_nested_node_outputs() {
        let t = Templates::new();
        assert_eq!(t.render("Hi {{ vars.NAME }}", &ctx()).unwrap(), "Hi Ada");
        assert_eq!(
            t.render("{{ nodes.fetch.output.items[0].title }}", &ctx())
                .unwrap(),
            "First"
        );
        assert_eq!(
            t.render("{{ nodes['fetch'].output['items'][1].title }}", &ctx())
                .unwrap(),
            "Second"
        );
    }

    #[test]
    fn lists_print_as_json_and_none_as_nothing() {
        let t = Templates::new();
        assert_eq!(
            t.render("{{ vars.TOPICS }}", &ctx()).unwrap(),
            r#"["rust","wasm"]"#
        );
        assert_eq!(
            t.render("[{{ nodes.failed.output }}]", &ctx()).unwrap(),
            "[]"
        );
        assert_eq!(
            t.render("{{ nodes.fetch.output.items[0] }}", &ctx())
                .unwrap(),
            r#"{"title":"First"}"#
        );
    }

    #[test]
    fn builtin_and_own_filters() {
        let t = Templates::new();
        let c = ctx();
        let r = |s: &str| t.render(s, &c).unwrap();
        assert_eq!(
            r("{{ nodes.summarize.output | join('\n\n') }}"),
            "one\n\ntwo"
        );
        assert_eq!(r("{{ vars.TOPICS | tojson }}"), r#"["rust","wasm"]"#);
        assert_eq!(r("{{ vars.MISSING | default('y') }}"), "y");
        assert_eq!(
            r("{{ vars.NAME | upper }}-{{ vars.NAME | lower }}"),
            "ADA-ada"
        );
        assert_eq!(r("{{ '  x ' | trim }}{{ vars.TOPICS | length }}"), "x2");
        assert_eq!(r("{{ 'a-b' | replace('-', '+') }}"), "a+b");
        assert_eq!(r("{{ (nodes.raw.output | fromjson)[1] }}"), "y");
        assert_eq!(
            r("{{ 'hello world foo' | truncate(9, leeway=0) }}"),
            "hello..."
        );
        assert_eq!(
            r("{{ 'hello world foo' | truncate(9, true, leeway=0) }}"),
            "hello ..."
        );
        assert_eq!(
            r("{{ 'hello world foo' | truncate(length=9, end='!', leeway=0) }}"),
            "hello!"
        );
        // Within the leeway nothing is cut (Jinja2's default leeway is 5).
        assert_eq!(r("{{ 'hello world' | truncate(9) }}"), "hello world");
        assert_eq!(r("{{ 'short' | truncate }}"), "short");
        assert!(t.render("{{ 'abc' | truncate(1) }}", &c).is_err());
    }

    #[test]
    fn undefined_is_an_error_naming_the_reference() {
        let t = Templates::new();
        let e = t.render("line1\n{{ vars.MISSING }}", &ctx()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Template);
        assert!(e.message.contains("vars.MISSING"), "{}", e.message);
        assert!(e.message.contains("line 2"), "{}", e.message);
        let r = t.render("{% if vars.MISSING %}x{% else %}y{% endif %}", &ctx());
        assert_eq!(r.unwrap(), "y");
        assert!(t
            .render("{% for x in vars.MISSING %}{% endfor %}", &ctx())
            .is_err());
        assert!(t.render("{{ vars.MISSING.deeper }}", &ctx()).is_err());
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let t = Templates::new();
        let e = t.check_syntax("ok\n{{ vars.X ").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(t
            .check_syntax("{% for x in y %}{{ x }}{% endfor %}")
            .is_ok());
        assert!(t.check_expr_syntax("a ==").is_err());
        assert!(t.check_expr_syntax("nodes.a.output == 'x'").is_ok());
    }

    #[test]
    fn no_files_env_or_network() {
        let t = Templates::new();
        let c = ctx();
        assert!(t.render("{% include 'secret.txt' %}", &c).is_err());
        assert!(t.render("{% import 'x' as y %}", &c).is_err());
        assert!(t.render("{% extends '/etc/passwd' %}", &c).is_err());
        assert!(t.render("{{ env.HOME }}", &c).is_err());
        assert!(t.render("{{ debug() }}", &c).is_err());
        assert!(t.render("{{ lookup('env', 'HOME') }}", &c).is_err());
    }

    #[test]
    fn endless_templates_run_out_of_fuel() {
        let t = Templates::new();
        let e = t
            .render(
                "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                &ctx(),
            )
            .unwrap_err();
        assert!(e.message.contains("fuel"), "{}", e.message);
    }

    #[test]
    fn item_and_index_in_for_each() {
        let t = Templates::new();
        let mut c = ctx();
        c["item"] = json!({"name": "rust"});
        c["index"] = json!(3);
        assert_eq!(
            t.render("{{ index }}: {{ item.name }}", &c).unwrap(),
            "3: rust"
        );
    }

    #[test]
    fn expressions_and_truthiness() {
        let t = Templates::new();
        let c = ctx();
        assert_eq!(
            t.eval_expr("nodes.summarize.output | length == 2", &c)
                .unwrap(),
            json!(true)
        );
        assert_eq!(t.eval_expr("vars.TOPICS[1]", &c).unwrap(), json!("wasm"));
        assert!(t.eval_expr("vars.NOPE == 1", &c).is_err());
        assert!(!Templates::is_truthy(&json!(null)));
        assert!(!Templates::is_truthy(&json!("")));
        assert!(!Templates::is_truthy(&json!(0)));
        assert!(!Templates::is_truthy(&json!([])));
        assert!(!Templates::is_truthy(&json!({})));
        assert!(Templates::is_truthy(&json!("no")));
        assert!(Templates::is_truthy(&json!([0])));
        assert!(Templates::is_truthy(&json!(0.5)));
    }

    #[test]
    fn eval_list_accepts_three_forms() {
        let t = Templates::new();
        let c = ctx();
        assert_eq!(
            t.eval_list(&json!([1, 2]), &c).unwrap(),
            vec![json!(1), json!(2)]
        );
        assert_eq!(
            t.eval_list(&json!("{{ vars.TOPICS }}"), &c).unwrap(),
            vec![json!("rust"), json!("wasm")]
        );
        assert_eq!(
            t.eval_list(&json!("{{- nodes.raw.output -}}"), &c).unwrap(),
            vec![json!("x"), json!("y")]
        );
        assert_eq!(
            t.eval_list(&json!("[{% for t in vars.TOPICS %}\"{{ t }}!\"{% if not loop.last %},{% endif %}{% endfor %}]"), &c)
                .unwrap(),
            vec![json!("rust!"), json!("wasm!")]
        );
        let e = t.eval_list(&json!("{{ vars.NAME }}"), &c).unwrap_err();
        assert!(
            e.message
                .contains("forEach must yield a list, got a string"),
            "{}",
            e.message
        );
        let e = t.eval_list(&json!(5), &c).unwrap_err();
        assert!(e.message.contains("got an integer"), "{}", e.message);
    }

    #[test]
    fn referenced_names() {
        let t = Templates::new();
        let refs = t
            .referenced("{% for x in vars.TOPICS %}{{ x }} {{ nodes.summarize.output | join(',') }}{% endfor %}{{ item }}{{ range(3) }}")
            .unwrap();
        let want: BTreeSet<String> = ["vars.TOPICS", "nodes.summarize.output", "item"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(refs, want);
        let refs = t
            .referenced("{{ nodes['fetch'].output }}{{ vars[\"X\"] }}")
            .unwrap();
        assert!(refs.contains("nodes.fetch"), "{refs:?}");
        assert!(refs.contains("vars.X"), "{refs:?}");
        let refs = t.referenced_expr("nodes.a.output == vars.B").unwrap();
        assert!(
            refs.contains("nodes.a.output") && refs.contains("vars.B"),
            "{refs:?}"
        );
    }

    #[test]
    fn templates_is_send_sync_clone() {
        fn assert_traits<T: Send + Sync + Clone>() {}
        assert_traits::<Templates>();
    }
}

#[cfg(test)]
mod budget_tests {
    //! Hostile templates: each fails its render with the budget's name, quickly and without
    //! taking memory (the test process would abort if one allocated gigabytes).
    use super::*;
    use serde_json::json;

    fn small() -> Templates {
        Templates::with_limits(Limits {
            template_max_output: 1 << 20,
            template_max_value: 1 << 20,
            ..Limits::default()
        })
    }

    fn fails_with(t: &Templates, template: &str, budget: &str) {
        let c = json!({"vars": {"L": [1, 2, 3]}});
        let e = t
            .render(template, &c)
            .expect_err(&format!("{template} should fail"));
        assert!(
            e.message.contains(budget),
            "{template}: {} (expected {budget})",
            e.message
        );
    }

    #[test]
    fn growing_values_fail_with_the_value_budget() {
        let t = small();
        for template in [
            "{{ [1] | batch(1000000000000) | list | length }}x",
            "{% set s = namespace(v='x') %}{% for i in range(40) %}{% set s.v = s.v ~ s.v %}{% endfor %}",
            "{{ range(100000) | join(' ' * 100000) | length }}",
            "{{ [1] * 2**31 }}",
            "{{ 'a' ~ ([1] * 2**31) }}",
            "{{ vars.L * 18446744073709551615 }}",
            "{{ 'x' * 1000000000 }}",
            "{{ 'ab' | indent(2**31) }}",
            "{{ [1, 2] | slice(2**31) | length }}",
            "{{ 'abc' | replace('', 'x' * 1000000) }}",
            "{{ {'a': 1} | tojson(indent=2**31) }}",
            "{{ '%2000000000s' | format('x') }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}",
            "{% set s = namespace(v='x' * 1000) %}{% for i in range(40) %}{% set s.v = s.v + s.v %}{% endfor %}",
        ] {
            let e = t
                .render(template, &json!({"vars": {"L": [1, 2, 3]}}))
                .expect_err(template);
            assert!(
                e.message.contains("TEMPLATE_MAX_VALUE") || e.message.contains("at most"),
                "{template}: {}",
                e.message
            );
        }
    }

    #[test]
    fn an_empty_list_repeated_forever_is_empty_at_once() {
        let t = small();
        assert_eq!(
            t.eval_expr("([] * 2**62) | length", &json!({})).unwrap(),
            json!(0)
        );
    }

    #[test]
    fn output_is_bounded_even_inside_captures() {
        let t = small();
        fails_with(
            &t,
            "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
            "TEMPLATE_MAX_OUTPUT",
        );
        fails_with(
            &t,
            "{% for i in range(100000) %}0123456789012345678901234567890123456789{% endfor %}",
            "TEMPLATE_MAX_OUTPUT",
        );
        fails_with(
            &t,
            "{% set x %}{% for i in range(100000) %}0123456789012345678901234567890123456789{% endfor %}{% endset %}{{ x | length }}",
            "TEMPLATE_MAX_OUTPUT",
        );
    }

    #[test]
    fn truncate_with_a_huge_length_keeps_the_text() {
        let t = Templates::new();
        assert_eq!(
            t.render("{{ 'abc' | truncate(18446744073709551615) }}", &json!({}))
                .unwrap(),
            "abc"
        );
    }

    #[test]
    fn ordinary_arithmetic_and_text_still_work() {
        let t = Templates::new();
        let c = json!({"vars": {"L": [1, 2], "N": 3, "S": "ab"}});
        let r = |s: &str| t.render(s, &c).unwrap();
        assert_eq!(
            r("{{ 2 * 3 }}|{{ 1 + 2 }}|{{ 1.5 * 2 }}|{{ 'a' ~ 1 ~ true }}"),
            "6|3|3.0|a1True"
        );
        assert_eq!(
            r("{{ vars.S * 2 }}{{ 2 * vars.S }}{{ '-' * vars.N }}"),
            "abababab---"
        );
        assert_eq!(
            r("{{ vars.L * 2 }}{{ vars.L + [3] }}{{ (1 + 2) * 3 }}"),
            "[1,2,1,2][1,2,3]9"
        );
        assert_eq!(r("{{ ((vars.N)) * (2 + 1) ~ 'x' }}"), "9x");
        assert_eq!(
            r("{{ ('a' ~ 'b') ~ 'c' }}|{{ 'a' ~ ('b' ~ 'c') ~ 'd' }}|{{ 2 * 3 + 4 * 5 }}"),
            "abc|abcd|26"
        );
        assert_eq!(
            r("{{ (1, 2) }}|{{ [1 + 1, 'a' ~ 'b'] }}|{{ {'k': 2 * 2} }}"),
            "[1,2]|[2,\"ab\"]|{\"k\":4}"
        );
        assert_eq!(
            r("{{ vars.L | join(', ') }}|{{ [1,2,3] | batch(2) | list }}"),
            "1, 2|[[1,2],[3]]"
        );
        assert_eq!(r("{{ 'a\nb\n\nc' | indent(2) }}"), "a\n  b\n\n  c");
        assert_eq!(r("{{ 'a\nb' | indent(2, true) }}"), "  a\n  b");
        assert_eq!(r("{{ 'aXbX' | replace('X', '--') }}"), "a--b--");
        assert_eq!(
            r("{{ {'a': [1]} | tojson(indent=2) }}"),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
        assert_eq!(r("{{ '%05d' | format(42) }}"), "00042");
        assert_eq!(
            r("{% set x %}hi {{ vars.S }}{% endset %}[{{ x }}]"),
            "[hi ab]"
        );
        assert_eq!(
            r("{% for i in [1, 2] -%}\n  {{ i * 2 }} {%- endfor %}"),
            "24"
        );
        assert_eq!(
            r("{% macro m(a, b=1 + 1) %}<{{ a ~ b }}>{% endmacro %}{{ m('x') }}"),
            "<x2>"
        );
        assert_eq!(r("{{ [1, 2] | slice(2) | list }}"), "[[1],[2]]");
        assert_eq!(r("{{ 'x' if vars.N * 2 == 6 else 'y' }}"), "x");
        assert_eq!(t.eval_expr("vars.N * 2 + 1", &c).unwrap(), json!(7));
        // An undefined operand fails as before.
        assert!(t.render("{{ vars.MISSING * 2 }}", &c).is_err());
    }

    #[test]
    fn validation_refuses_oversized_or_too_deep_templates() {
        let t = Templates::new();
        let chain = format!("{{{{ 1{} }}}}", " ~ 1".repeat(30_000));
        let e = t.referenced(&chain).unwrap_err();
        assert!(e.contains("~, + and *"), "{e}");
        let filters = format!("{{{{ 'x'{} }}}}", " | upper".repeat(100_000));
        let e = t.referenced(&filters).unwrap_err();
        assert!(e.contains("operators"), "{e}");
        let big = "x".repeat(guard::MAX_TEMPLATE_BYTES + 1);
        assert!(t.referenced(&big).unwrap_err().contains("MiB"));
        // Up to the limit, the deepest chain still compiles on a small thread stack.
        let deepest = format!(
            "{{{{ 'x'{}{} }}}}",
            " ~ 'x'".repeat(guard::MAX_TAG_GROWING),
            " | upper".repeat(guard::MAX_TAG_OPERATORS - guard::MAX_TAG_GROWING)
        );
        let t2 = t.clone();
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                assert!(t2.referenced(&deepest).is_ok());
                assert!(t2.render(&deepest, &json!({})).is_ok());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn validation_never_evaluates() {
        let t = Templates::new();
        // Compiling used to fold this constant, printing a 2^31-item list.
        let refs = t
            .referenced("{{ 'a' ~ ([1] * 2**31) }}{{ vars.X }}")
            .unwrap();
        assert!(refs.contains("vars.X"), "{refs:?}");
        assert!(t.check_expr_syntax("[] * 2**63").is_ok());
    }

    #[test]
    fn fuel_is_a_setting() {
        let t = Templates::with_limits(Limits {
            template_fuel: 100,
            ..Limits::default()
        });
        let e = t
            .render("{% for i in range(1000) %}{{ i }}{% endfor %}", &json!({}))
            .unwrap_err();
        assert!(e.message.contains("fuel"), "{}", e.message);
    }
}
