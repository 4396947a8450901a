//! `omniflow export`: a blueprint as a standalone program its user owns — Python (stdlib only),
//! Node.js (built-in `fetch`, `better-sqlite3` for history), a GitHub Actions workflow running
//! the Python program, or a Docker image of it.
//!
//! The exported program *is* the blueprint: a runtime section (HTTP with the retry policy,
//! providers, notifications, history in `runner_executions`, the run driver) followed by one
//! function per node with its templates translated into the target language ([`jinja`] parses
//! the subset we can reproduce, [`emit`] writes the code). A template outside the subset is an
//! [`ExportError`] naming the node, the field and the construct; nothing is written then.

pub mod emit;
pub mod jinja;
mod package;
mod syntax;

use crate::blueprint::{
    Blueprint, DurationSpec, HttpNode, LlmNode, Node, NodeKind, Parse, ProviderName, RetrySpec,
};
use crate::providers::DEFAULT_MODEL;
use emit::{str_lit, value_lit, Emitter};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use syntax::{Entry, JavaScript, Python, Syntax};

/// What to export to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Python,
    Node,
    GithubAction,
    Docker,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Python,
        Target::Node,
        Target::GithubAction,
        Target::Docker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Target::Python => "python",
            Target::Node => "node",
            Target::GithubAction => "github-action",
            Target::Docker => "docker",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The language of the program: JavaScript for Node, else Python (the workflow and the
    /// image run the Python program).
    fn syntax(self) -> &'static dyn Syntax {
        match self {
            Target::Node => &JavaScript,
            _ => &Python,
        }
    }
}

/// Why an export failed. Nothing was written.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExportError {
    /// The blueprint uses something the target cannot express faithfully.
    #[error("{location}: {what} cannot be exported to {target}")]
    Unsupported {
        location: String,
        what: String,
        target: &'static str,
    },
    #[error("{0} is not empty; use --force to replace it")]
    NotEmpty(PathBuf),
    #[error("cannot write {path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// One generated file: its path relative to the output directory and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub path: PathBuf,
    pub text: String,
}

/// Generates every file of the export, in memory.
pub fn generate(bp: &Blueprint, target: Target) -> Result<Vec<File>, ExportError> {
    if target == Target::GithubAction {
        // GitHub Actions schedules are UTC only. Any spelling of UTC is fine; an offset or a
        // named zone would move the slots (and a zone's daylight saving cannot be written as
        // one UTC cron), so it is refused with what to do instead.
        let tz = bp.timezone.as_deref();
        if !crate::schedule::parse_timezone(tz).is_ok_and(|z| z.is_utc()) {
            return Err(ExportError::Unsupported {
                location: "timezone".into(),
                what: format!(
                    "a schedule in the timezone {:?} (GitHub Actions schedules are UTC only: \
                     write `schedule` in UTC and remove `timezone`)",
                    tz.unwrap_or_default()
                ),
                target: "github-action",
            });
        }
    }
    let program = Program::new(bp, target)?;
    let code = program.source()?;
    Ok(package::files(bp, target, code))
}

/// Generates the export and writes it to `out` atomically: into a temporary directory next to
/// `out`, renamed at the end. A non-empty `out` is refused unless `force`.
pub fn export(
    bp: &Blueprint,
    target: Target,
    out: &Path,
    force: bool,
) -> Result<Vec<PathBuf>, ExportError> {
    let files = generate(bp, target)?;
    let io = |path: &Path, e: std::io::Error| ExportError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let exists = out.exists();
    if exists {
        let non_empty = std::fs::read_dir(out)
            .map_err(|e| io(out, e))?
            .next()
            .is_some();
        if non_empty && !force {
            return Err(ExportError::NotEmpty(out.to_path_buf()));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "export".into());
    let tmp = parent.join(format!(".{name}.omniflow-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let write_all = || -> Result<(), ExportError> {
        for f in &files {
            let path = tmp.join(&f.path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            }
            std::fs::write(&path, &f.text).map_err(|e| io(&path, e))?;
        }
        Ok(())
    };
    if let Err(e) = write_all() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if exists {
        // Replace: move the old directory aside, move the new one in, then delete the old.
        let old = parent.join(format!(".{name}.omniflow-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&old);
        if let Err(e) = std::fs::rename(out, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(out, e));
        }
        if let Err(e) = std::fs::rename(&tmp, out) {
            let _ = std::fs::rename(&old, out);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(out, e));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io(out, e));
    }
    Ok(files.iter().map(|f| out.join(&f.path)).collect())
}

/// The program of one blueprint in one language.
struct Program<'a> {
    bp: &'a Blueprint,
    syn: &'static dyn Syntax,
    target: Target,
}

fn float_lit(f: f64) -> String {
    format!("{f:?}")
}

impl<'a> Program<'a> {
    fn new(bp: &'a Blueprint, target: Target) -> Result<Self, ExportError> {
        Ok(Program {
            bp,
            syn: target.syntax(),
            target,
        })
    }

    fn unsupported(&self, location: String, what: impl Into<String>) -> ExportError {
        ExportError::Unsupported {
            location,
            what: what.into(),
            target: self.syn.name(),
        }
    }

    fn null(&self) -> &'static str {
        self.syn.null()
    }

    fn duration(&self, d: &DurationSpec) -> f64 {
        d.get().as_secs_f64()
    }

    fn retry_lit(&self, spec: Option<&RetrySpec>) -> String {
        let Some(r) = spec else {
            return self.null().into();
        };
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some(a) = r.attempts {
            fields.push(("attempts", a.to_string()));
        }
        if let Some(b) = &r.backoff {
            fields.push(("backoff", float_lit(self.duration(b))));
        }
        if let Some(f) = r.factor {
            fields.push(("factor", float_lit(f)));
        }
        if let Some(m) = &r.max_delay {
            fields.push(("max_delay", float_lit(self.duration(m))));
        }
        if let Some(j) = r.jitter {
            fields.push(("jitter", float_lit(j)));
        }
        self.syn.retry(&fields)
    }

    /// The whole program's source.
    fn source(&self) -> Result<String, ExportError> {
        let bp = self.bp;
        let mut nodes_code = String::new();
        let mut table = Vec::new();
        for (i, node) in bp.nodes.iter().enumerate() {
            let (code, entry) = self.node(i, node)?;
            nodes_code.push_str(&code);
            table.push(entry);
        }
        let snapshot = serde_json::to_string(bp).unwrap_or_default();
        let variables = Value::Object(bp.variables.clone());
        let run_timeout = bp.timeout.as_ref().map(|t| {
            (
                self.duration(t),
                humantime::format_duration(t.get()).to_string(),
            )
        });
        let default_timeout = match &bp.defaults.timeout {
            Some(t) => float_lit(self.duration(t)),
            None => self.null().into(),
        };
        let default_retry = self.retry_lit(bp.defaults.retry.as_ref());
        let schema = crate::store::schema_v1_sql();
        let mut s = String::new();
        let syn = self.syn;
        let c = syn.comment();
        s.push_str(syn.shebang());
        let _ = writeln!(
            s,
            "{c} {} — exported from OmniFlow (`omniflow export {} --target {}`).",
            bp.name,
            bp.name,
            self.target.as_str()
        );
        if let Some(d) = &bp.description {
            let _ = writeln!(s, "{c} {d}");
        }
        let _ = writeln!(
            s,
            "{c}\n{c} Run: {} [--var KEY=VALUE]... [--json]   (exit 0 success, 1 the run failed, 2 bad input)\n{c} Configuration comes from the environment or .env (see .env.example); no secret is stored here.",
            syn.run_command()
        );
        s.push_str(&syn.runtime());
        let bar = "─".repeat(93);
        let _ = writeln!(s, "\n\n{c} {bar}\n{c} Blueprint: {}\n{c} {bar}\n", bp.name);
        let _ = writeln!(s, "{}", syn.constant("BLUEPRINT_NAME", &str_lit(&bp.name)));
        let _ = writeln!(
            s,
            "{}",
            syn.constant("PRIORITY", &str_lit(bp.priority.as_str()))
        );
        let _ = writeln!(
            s,
            "{c} Variables and their defaults; --var KEY=VALUE overrides them."
        );
        let _ = writeln!(
            s,
            "{}",
            syn.constant("VARIABLES", &value_lit(syn.lang(), &variables))
        );
        let _ = writeln!(s, "{}", syn.constant("DEFAULT_RETRY", &default_retry));
        let _ = writeln!(
            s,
            "{c} Seconds per attempt when a node sets none ({} = REQUEST_TIMEOUT).",
            self.null()
        );
        let _ = writeln!(s, "{}", syn.constant("DEFAULT_TIMEOUT", &default_timeout));
        let (secs, text) = match run_timeout {
            Some((secs, text)) => (float_lit(secs), str_lit(&text)),
            None => (self.null().to_string(), "\"\"".to_string()),
        };
        let _ = writeln!(s, "{}", syn.constant("RUN_TIMEOUT", &secs));
        let _ = writeln!(s, "{}", syn.constant("RUN_TIMEOUT_TEXT", &text));
        let _ = writeln!(
            s,
            "{c} The blueprint as OmniFlow records it in runner_executions.blueprint."
        );
        let _ = writeln!(s, "{}", syn.constant("BLUEPRINT_JSON", &str_lit(&snapshot)));
        let _ = writeln!(
            s,
            "{c} OmniFlow's history schema (version 1), created when DB_FILE is new."
        );
        let _ = writeln!(s, "{}\n", syn.constant("SCHEMA", &str_lit(schema)));
        s.push_str(&nodes_code);
        let _ = writeln!(s, "\n{c} The graph, in the blueprint's order.");
        s.push_str(&syn.program_end(&table));
        Ok(s)
    }

    /// A template field: (prelude functions, the expression computing it).
    fn template(
        &self,
        node: &Node,
        field: &str,
        src: &str,
        helpers: &mut String,
    ) -> Result<String, ExportError> {
        let stmts = jinja::parse_template(src)
            .map_err(|e| self.unsupported(format!("nodes[{}].{field}", self.index(node)), e.0))?;
        let mut em = Emitter::new(self.syn.lang());
        if Emitter::is_simple(&stmts) {
            return Ok(em.simple(&stmts));
        }
        let fname = format!("{}__{}", ident(&node.id), ident(field));
        let body = em.body(&stmts, 4);
        helpers.push_str(&self.syn.template_function(&fname, &body));
        Ok(format!("{fname}(ctx)"))
    }

    fn expression(&self, node: &Node, field: &str, src: &str) -> Result<String, ExportError> {
        let e = jinja::parse_expr(src)
            .map_err(|e| self.unsupported(format!("nodes[{}].{field}", self.index(node)), e.0))?;
        Ok(Emitter::new(self.syn.lang()).expr(&e))
    }

    /// The node's position, for error messages only (a scan of the nodes).
    fn index(&self, node: &Node) -> usize {
        self.bp
            .nodes
            .iter()
            .position(|n| n.id == node.id)
            .unwrap_or(0)
    }

    /// A value whose strings are templates (an http body).
    fn value_template(
        &self,
        node: &Node,
        field: &str,
        v: &Value,
        helpers: &mut String,
    ) -> Result<String, ExportError> {
        Ok(match v {
            Value::String(s) => self.template(node, field, s, helpers)?,
            Value::Array(a) => {
                let mut items = Vec::new();
                for (i, x) in a.iter().enumerate() {
                    items.push(self.value_template(node, &format!("{field}[{i}]"), x, helpers)?);
                }
                format!("[{}]", items.join(", "))
            }
            Value::Object(o) => {
                let mut items = Vec::new();
                for (k, x) in o {
                    let code = self.value_template(node, &format!("{field}.{k}"), x, helpers)?;
                    items.push(format!("{}: {code}", str_lit(k)));
                }
                format!("{{{}}}", items.join(", "))
            }
            other => value_lit(self.syn.lang(), other),
        })
    }

    /// One node: its functions, and its entry in the NODES table.
    fn node(&self, i: usize, node: &Node) -> Result<(String, String), ExportError> {
        let mut body = Body::new(self.syn);
        let extra_timeout = self.node_body(i, node, &mut body)?;
        let for_each = self.for_each_items(i, node, &mut body.helpers)?;
        let code = self.node_function(node, body);
        let entry = self.table_entry(node, &for_each, extra_timeout);
        Ok((code, entry))
    }

    /// The statements of the node's prepare function, by node type. Returns the time an
    /// attempt needs beyond its timeout (a delay's own duration).
    fn node_body(&self, i: usize, node: &Node, body: &mut Body) -> Result<f64, ExportError> {
        let id = &node.id;
        match &node.kind {
            NodeKind::Llm(l) => self.llm_body(i, node, l, body)?,
            NodeKind::Http(h) => self.http_body(node, h, body)?,
            NodeKind::Transform(t) => {
                let code = self.template(node, "template", &t.template, &mut body.helpers)?;
                body.bind("value", &format!("{id}.template"), &code);
                let v = if t.parse != Parse::Json {
                    "value"
                } else {
                    let (line, var) = self.syn.parse_json_text(id);
                    body.lines.push(line);
                    var
                };
                body.ret_value(v);
            }
            NodeKind::Condition(c) => {
                let code = format!(
                    "truthy({})",
                    self.expression(node, "expression", &c.expression)?
                );
                let name = format!("{id}.expression: in expression `{}`", c.expression);
                body.bind("value", &name, &code);
                body.ret_value("value");
            }
            NodeKind::Notify(n) => {
                let code = self.template(node, "text", &n.text, &mut body.helpers)?;
                body.bind("message", &format!("{id}.text"), &code);
                let call = format!(
                    "{}({}, message, {}, timeout)",
                    self.syn.name_of("notify_node"),
                    str_lit(n.channel.as_str()),
                    n.parse_mode
                        .as_deref()
                        .map(str_lit)
                        .unwrap_or_else(|| self.null().into())
                );
                body.ret(call);
            }
            NodeKind::Delay(d) => {
                let secs = self.duration(&d.duration);
                body.ret(format!(
                    "{}({})",
                    self.syn.name_of("delay_node"),
                    float_lit(secs)
                ));
                return Ok(secs);
            }
        }
        Ok(0.0)
    }

    fn llm_body(
        &self,
        i: usize,
        node: &Node,
        l: &LlmNode,
        body: &mut Body,
    ) -> Result<(), ExportError> {
        let id = &node.id;
        let null = self.null();
        let provider = l
            .provider
            .clone()
            .or_else(|| self.bp.defaults.provider.clone())
            .unwrap_or_else(|| "auto".into());
        // The exported runtimes speak these; hf-inference and the simulated model are not
        // ported.
        if !matches!(
            ProviderName::parse(&provider),
            Some(
                ProviderName::Auto
                    | ProviderName::HuggingFace
                    | ProviderName::Ollama
                    | ProviderName::OpenAi
            )
        ) {
            return Err(self.unsupported(
                format!("nodes[{i}].provider"),
                format!("the provider {provider:?}"),
            ));
        }
        let model = l
            .model
            .clone()
            .or_else(|| self.bp.defaults.model.clone())
            .unwrap_or_else(|| DEFAULT_MODEL.into());
        let system = match &l.system {
            Some(s) => {
                let code = self.template(node, "system", s, &mut body.helpers)?;
                body.bind("system", &format!("{id}.system"), &code);
                "system".to_string()
            }
            None => null.into(),
        };
        let code = self.template(node, "prompt", &l.prompt, &mut body.helpers)?;
        body.bind("prompt", &format!("{id}.prompt"), &code);
        let call = format!(
            "{}({}, {}, {system}, prompt, {}, {}, {}, timeout)",
            self.syn.name_of("llm_node"),
            str_lit(&provider),
            str_lit(&model),
            l.temperature.map(float_lit).unwrap_or_else(|| null.into()),
            l.max_tokens
                .map(|m| m.to_string())
                .unwrap_or_else(|| null.into()),
            str_lit(if l.parse == Parse::Json {
                "json"
            } else {
                "text"
            }),
        );
        body.ret(call);
        Ok(())
    }

    fn http_body(&self, node: &Node, h: &HttpNode, body: &mut Body) -> Result<(), ExportError> {
        let id = &node.id;
        let code = self.template(node, "url", &h.url, &mut body.helpers)?;
        body.bind("url", &format!("{id}.url"), &code);
        let mut hs = Vec::new();
        for (k, v) in &h.headers {
            let code = match v {
                Value::String(s) => {
                    self.template(node, &format!("headers.{k}"), s, &mut body.helpers)?
                }
                other => str_lit(&other.to_string()),
            };
            hs.push(format!("{}: {code}", str_lit(k)));
        }
        body.bind(
            "headers",
            &format!("{id}.headers"),
            &format!("{{{}}}", hs.join(", ")),
        );
        let request_body = match &h.body {
            Some(b) => {
                let code = self.value_template(node, "body", b, &mut body.helpers)?;
                body.bind("body", &format!("{id}.body"), &code);
                "body".to_string()
            }
            None => self.null().into(),
        };
        let call = format!(
            "{}({}, url, headers, {request_body}, {}, timeout)",
            self.syn.name_of("http_node"),
            str_lit(&h.method.to_ascii_uppercase()),
            str_lit(h.response.as_deref().unwrap_or("auto")),
        );
        body.ret(call);
        Ok(())
    }

    /// The name of the function listing the node's forEach items (written into `helpers`),
    /// or the language's null when the node has no forEach.
    fn for_each_items(
        &self,
        i: usize,
        node: &Node,
        helpers: &mut String,
    ) -> Result<String, ExportError> {
        let Some(fe) = &node.for_each else {
            return Ok(self.null().to_string());
        };
        let items = match fe {
            Value::Array(_) => value_lit(self.syn.lang(), fe),
            Value::String(s) => {
                let inner = match jinja::single_expression(s) {
                    Some(expr) => self.expression(node, "forEach", expr)?,
                    None => self.template(node, "forEach", s, helpers)?,
                };
                format!("{}({inner})", self.syn.name_of("as_list"))
            }
            _ => {
                return Err(self.unsupported(
                    format!("nodes[{i}].forEach"),
                    "a forEach that is neither a list nor a template",
                ))
            }
        };
        let id = &node.id;
        let fname = format!("node_{}_items", ident(id));
        helpers.push_str(&self.syn.items_function(&fname, id, &items));
        Ok(fname)
    }

    /// The node's section of the program: a heading, its helper functions, and its prepare
    /// function.
    fn node_function(&self, node: &Node, body: Body) -> String {
        let id = &node.id;
        let f = format!("node_{}", ident(id));
        let mut code = String::new();
        let mut heading = format!("{id} · {}", node.kind.type_name());
        if !node.needs.is_empty() {
            heading.push_str(&format!(" · needs {}", node.needs.join(", ")));
        }
        if node.for_each.is_some() {
            heading.push_str(" · one step per forEach item, all at once");
        }
        let c = self.syn.comment();
        let _ = writeln!(
            code,
            "{c} ── {heading} {}",
            "─".repeat(80usize.saturating_sub(heading.chars().count()))
        );
        code.push_str(&body.helpers);
        let doc = node.description.clone().unwrap_or_else(|| {
            format!("Prepares one step of {id}; the returned function is one attempt.")
        });
        code.push_str(&self.syn.prepare_function(&f, &doc, &body.lines));
        code
    }

    /// The node's entry in the NODES table.
    fn table_entry(&self, node: &Node, for_each: &str, extra_timeout: f64) -> String {
        let id = &node.id;
        let f = format!("node_{}", ident(id));
        let kind = node.kind.type_name();
        let needs: Vec<String> = node.needs.iter().map(|n| str_lit(n)).collect();
        let retry = self.retry_lit(node.retry.as_ref());
        let timeout = match &node.timeout {
            Some(t) => float_lit(self.duration(t)),
            None => self.null().into(),
        };
        self.syn.table_entry(&Entry {
            id,
            kind,
            prepare: &f,
            needs: &needs,
            for_each,
            retry: &retry,
            timeout: &timeout,
            continue_on_error: node.continue_on_error,
            extra_timeout: &float_lit(extra_timeout),
        })
    }
}

/// A node's prepare function as it is written: its statements, and the helper functions
/// (templates too large for one expression) written above it.
struct Body {
    syn: &'static dyn Syntax,
    lines: Vec<String>,
    helpers: String,
}

impl Body {
    fn new(syn: &'static dyn Syntax) -> Body {
        Body {
            syn,
            lines: Vec::new(),
            helpers: String::new(),
        }
    }

    /// Binds a field's value to a variable, with the field named in any error it raises:
    /// Python `with field(..): x = code`, JavaScript `const x = field(.., () => code)`.
    fn bind(&mut self, var: &str, name: &str, code: &str) {
        let lines = self.syn.bind(var, name, code);
        self.lines.extend(lines);
    }

    /// Returns the attempt: a function of the timeout making `call`.
    fn ret(&mut self, call: String) {
        let line = self.syn.ret(&call);
        self.lines.push(line);
    }

    /// Returns an attempt that answers a value computed while preparing.
    fn ret_value(&mut self, var: &str) {
        self.ret(var.to_string());
    }
}

/// A node id or field as an identifier fragment.
fn ident(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduled(tz: Option<&str>) -> Blueprint {
        let mut v = serde_json::json!({
            "name": "x", "schedule": "0 9 * * *",
            "nodes": [{ "id": "a", "type": "transform", "template": "x" }]
        });
        if let Some(tz) = tz {
            v["timezone"] = tz.into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn github_actions_take_any_spelling_of_utc_and_refuse_other_zones() {
        for tz in [
            None,
            Some("UTC"),
            Some("utc"),
            Some("Z"),
            Some("GMT"),
            Some("Etc/UTC"),
            Some("+00:00"),
        ] {
            let files = generate(&scheduled(tz), Target::GithubAction)
                .unwrap_or_else(|e| panic!("{tz:?}: {e}"));
            assert!(
                files.iter().any(|f| f.text.contains("- cron: '0 9 * * *'")),
                "{tz:?}"
            );
        }
        for tz in ["Europe/Berlin", "+02:00", "UTC-5", "Etc/GMT+5"] {
            let e = generate(&scheduled(Some(tz)), Target::GithubAction)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("timezone: a schedule in the timezone \"{tz}\""))
                    && e.contains("UTC only")
                    && e.contains("write `schedule` in UTC and remove `timezone`")
                    && e.ends_with("cannot be exported to github-action"),
                "{e}"
            );
        }
        // The other targets run the cron wherever the user puts it: no refusal there, and
        // their README says the host's cron reads the line in the host's zone.
        let readme = |tz: Option<&str>| {
            generate(&scheduled(tz), Target::Python)
                .unwrap()
                .into_iter()
                .find(|f| f.path.ends_with("README.md"))
                .unwrap()
                .text
        };
        assert!(readme(Some("Europe/Berlin")).contains("`CRON_TZ=Europe/Berlin`"));
        assert!(!readme(Some("UTC")).contains("CRON_TZ"));
        assert!(!readme(None).contains("CRON_TZ"));
    }
}
