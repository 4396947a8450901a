//! Translates parsed templates ([`super::jinja`]) into Python or JavaScript source.
//!
//! Values keep minijinja's meaning through a handful of runtime helpers with the same names in
//! both languages (`get`, `text`, `truthy`, `eq`, `join`, …): `get` returns `UNDEF` for a missing
//! key and fails on a lookup *through* an undefined value (minijinja's semi-strict mode), `text`
//! prints like OmniFlow's formatter (`none` → empty, lists and maps → compact JSON, printing an
//! undefined value is an error).

use super::jinja::{BinOp, Expr, Key, Stmt};
use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Python,
    Js,
}

impl Lang {
    /// How this language writes the translated templates.
    fn dialect(self) -> &'static dyn Dialect {
        match self {
            Lang::Python => &Py,
            Lang::Js => &Js,
        }
    }
}

/// What differs between the languages in a translated template: literals, the operators
/// that short-circuit, and statements. The helpers called (`get`, `text`, `truthy`, …) have
/// the same names in both runtimes.
trait Dialect: Sync {
    fn none(&self) -> &'static str;
    /// A filter argument left out before one that is given.
    fn not_given(&self) -> &'static str;
    fn bool(&self, b: bool) -> &'static str;
    /// A float as Rust prints it (`1`, `1.5`, `1e20`), written as a float literal.
    fn float(&self, s: String) -> String;
    fn and(&self, l: &str, r: &str) -> String;
    fn or(&self, l: &str, r: &str) -> String;
    fn not(&self, x: &str) -> String;
    fn cond(&self, c: &str, a: &str, b: &str) -> String;
    fn negate(&self, call: &str) -> String;
    /// The first and last lines of a template's function body.
    fn body_start(&self, pad: &str) -> String;
    fn body_end(&self, pad: &str) -> String;
    fn push(&self, pad: &str, code: &str) -> String;
    fn assign(&self, pad: &str, ident: &str, code: &str) -> String;
    fn declare(&self, pad: &str, ident: &str, code: &str) -> String;
    /// The head of the `i`th branch of an `if`.
    fn if_head(&self, pad: &str, i: usize, c: &str) -> String;
    fn else_head(&self, pad: &str) -> String;
    /// What closes a block, if the language closes blocks.
    fn block_end(&self, pad: &str) -> Option<String>;
    fn for_head(&self, pad: &str, loop_ident: &str, v: &str, it: &str) -> String;
    /// What an empty body must hold, if anything.
    fn empty_body(&self, pad: &str) -> Option<String>;
}

struct Py;
struct Js;

impl Dialect for Py {
    fn none(&self) -> &'static str {
        "None"
    }
    fn not_given(&self) -> &'static str {
        "None"
    }
    fn bool(&self, b: bool) -> &'static str {
        if b {
            "True"
        } else {
            "False"
        }
    }
    fn float(&self, s: String) -> String {
        if !s.contains('.') && !s.contains('e') {
            format!("{s}.0")
        } else {
            s
        }
    }
    fn and(&self, l: &str, r: &str) -> String {
        format!("({l} and {r})")
    }
    fn or(&self, l: &str, r: &str) -> String {
        format!("({l} or {r})")
    }
    fn not(&self, x: &str) -> String {
        format!("(not truthy({x}))")
    }
    fn cond(&self, c: &str, a: &str, b: &str) -> String {
        format!("({a} if truthy({c}) else {b})")
    }
    fn negate(&self, call: &str) -> String {
        format!("(not {call})")
    }
    fn body_start(&self, pad: &str) -> String {
        format!("{pad}out = []")
    }
    fn body_end(&self, pad: &str) -> String {
        format!("{pad}return \"\".join(out)")
    }
    fn push(&self, pad: &str, code: &str) -> String {
        format!("{pad}out.append({code})")
    }
    fn assign(&self, pad: &str, ident: &str, code: &str) -> String {
        format!("{pad}{ident} = {code}")
    }
    fn declare(&self, pad: &str, ident: &str, code: &str) -> String {
        format!("{pad}{ident} = {code}")
    }
    fn if_head(&self, pad: &str, i: usize, c: &str) -> String {
        if i == 0 {
            format!("{pad}if truthy({c}):")
        } else {
            format!("{pad}elif truthy({c}):")
        }
    }
    fn else_head(&self, pad: &str) -> String {
        format!("{pad}else:")
    }
    fn block_end(&self, _pad: &str) -> Option<String> {
        None
    }
    fn for_head(&self, pad: &str, loop_ident: &str, v: &str, it: &str) -> String {
        format!("{pad}for {loop_ident}, {v} in with_loop({it}):")
    }
    fn empty_body(&self, pad: &str) -> Option<String> {
        Some(format!("{pad}pass"))
    }
}

impl Dialect for Js {
    fn none(&self) -> &'static str {
        "null"
    }
    fn not_given(&self) -> &'static str {
        "undefined"
    }
    fn bool(&self, b: bool) -> &'static str {
        if b {
            "true"
        } else {
            "false"
        }
    }
    fn float(&self, s: String) -> String {
        s
    }
    fn and(&self, l: &str, r: &str) -> String {
        format!("and(() => {l}, () => {r})")
    }
    fn or(&self, l: &str, r: &str) -> String {
        format!("or(() => {l}, () => {r})")
    }
    fn not(&self, x: &str) -> String {
        format!("!truthy({x})")
    }
    fn cond(&self, c: &str, a: &str, b: &str) -> String {
        format!("(truthy({c}) ? {a} : {b})")
    }
    fn negate(&self, call: &str) -> String {
        format!("!{call}")
    }
    fn body_start(&self, pad: &str) -> String {
        format!("{pad}const out = [];")
    }
    fn body_end(&self, pad: &str) -> String {
        format!("{pad}return out.join(\"\");")
    }
    fn push(&self, pad: &str, code: &str) -> String {
        format!("{pad}out.push({code});")
    }
    fn assign(&self, pad: &str, ident: &str, code: &str) -> String {
        format!("{pad}{ident} = {code};")
    }
    fn declare(&self, pad: &str, ident: &str, code: &str) -> String {
        format!("{pad}let {ident} = {code};")
    }
    fn if_head(&self, pad: &str, i: usize, c: &str) -> String {
        if i == 0 {
            format!("{pad}if (truthy({c})) {{")
        } else {
            format!("{pad}}} else if (truthy({c})) {{")
        }
    }
    fn else_head(&self, pad: &str) -> String {
        format!("{pad}}} else {{")
    }
    fn block_end(&self, pad: &str) -> Option<String> {
        Some(format!("{pad}}}"))
    }
    fn for_head(&self, pad: &str, loop_ident: &str, v: &str, it: &str) -> String {
        format!("{pad}for (const [{loop_ident}, {v}] of withLoop({it})) {{")
    }
    fn empty_body(&self, _pad: &str) -> Option<String> {
        None
    }
}

/// A string literal valid in both Python and JavaScript (JSON escaping).
pub fn str_lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A JSON value as a literal of the language.
pub fn value_lit(lang: Lang, v: &Value) -> String {
    match v {
        Value::Null => lang.dialect().none().into(),
        Value::Bool(b) => lang.dialect().bool(*b).into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => str_lit(s),
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(|x| value_lit(lang, x)).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{}: {}", str_lit(k), value_lit(lang, x)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// Generates code for one template or expression, tracking local names.
pub struct Emitter {
    d: &'static dyn Dialect,
    scopes: Vec<HashMap<String, String>>,
    counter: usize,
    /// Loop nesting depth: `loop` of depth d is `loop{d}`.
    depth: usize,
}

impl Emitter {
    pub fn new(lang: Lang) -> Self {
        Emitter {
            d: lang.dialect(),
            scopes: vec![HashMap::new()],
            counter: 0,
            depth: 0,
        }
    }

    fn local(&self, name: &str) -> Option<&String> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    fn bind(&mut self, name: &str) -> String {
        let taken = self
            .scopes
            .iter()
            .any(|s| s.values().any(|v| v == &format!("l_{name}")));
        let ident = if taken {
            self.counter += 1;
            format!("l_{name}{}", self.counter)
        } else {
            format!("l_{name}")
        };
        if let Some(s) = self.scopes.last_mut() {
            s.insert(name.to_string(), ident.clone());
        }
        ident
    }

    /// An expression's code.
    pub fn expr(&self, e: &Expr) -> String {
        match e {
            Expr::Name(n) => match self.local(n) {
                Some(l) => l.clone(),
                None => format!("get(ctx, {})", str_lit(n)),
            },
            Expr::Get(base, keys) => {
                let mut args = Vec::new();
                let base_code = match &**base {
                    Expr::Name(n) if self.local(n).is_none() => {
                        args.push(str_lit(n));
                        "ctx".to_string()
                    }
                    other => self.expr(other),
                };
                for k in keys {
                    args.push(match k {
                        Key::Attr(a) => str_lit(a),
                        Key::Index(i) => self.expr(i),
                    });
                }
                format!("get({base_code}, {})", args.join(", "))
            }
            Expr::Slice(base, start, stop) => {
                let none = self.d.none();
                format!(
                    "slice_of({}, {}, {})",
                    self.expr(base),
                    start.as_ref().map(|s| self.expr(s)).unwrap_or(none.into()),
                    stop.as_ref().map(|s| self.expr(s)).unwrap_or(none.into())
                )
            }
            Expr::Str(s) => str_lit(s),
            Expr::Int(i) => i.to_string(),
            Expr::Float(f) => self.d.float(f.to_string()),
            Expr::Bool(b) => self.d.bool(*b).into(),
            Expr::None => self.d.none().into(),
            Expr::List(items) => {
                let items: Vec<String> = items.iter().map(|i| self.expr(i)).collect();
                format!("[{}]", items.join(", "))
            }
            Expr::Filter(base, name, args) => {
                let none = self.d.not_given();
                let mut parts = vec![self.expr(base)];
                // Trailing missing arguments are left out; a gap before a given one is passed
                // as "not given".
                let last = args
                    .iter()
                    .rposition(Option::is_some)
                    .map(|p| p + 1)
                    .unwrap_or(0);
                for a in &args[..last] {
                    parts.push(a.as_ref().map(|x| self.expr(x)).unwrap_or(none.into()));
                }
                let f = match name.as_str() {
                    "default" => "default_",
                    "string" => "display",
                    other => other,
                };
                format!("{f}({})", parts.join(", "))
            }
            Expr::Bin(op, l, r) => {
                let f = match op {
                    BinOp::Eq => "eq",
                    BinOp::Ne => "ne",
                    BinOp::Lt => "lt",
                    BinOp::Le => "le",
                    BinOp::Gt => "gt",
                    BinOp::Ge => "ge",
                    BinOp::In => "contains",
                    BinOp::NotIn => "not_contains",
                    BinOp::Concat => "concat",
                    BinOp::Add => "add",
                    BinOp::Sub => "sub",
                };
                // `a in b` is contains(b, a).
                let (x, y) = match op {
                    BinOp::In | BinOp::NotIn => (self.expr(r), self.expr(l)),
                    _ => (self.expr(l), self.expr(r)),
                };
                format!("{f}({x}, {y})")
            }
            Expr::And(l, r) => self.d.and(&self.expr(l), &self.expr(r)),
            Expr::Or(l, r) => self.d.or(&self.expr(l), &self.expr(r)),
            Expr::Not(x) => self.d.not(&self.expr(x)),
            Expr::Neg(x) => format!("neg({})", self.expr(x)),
            Expr::Cond(c, a, b) => self.d.cond(&self.expr(c), &self.expr(a), &self.expr(b)),
            Expr::Test(x, test, negated) => {
                let f = match test.as_str() {
                    "defined" => "is_defined",
                    "undefined" => "is_undefined",
                    _ => "is_none",
                };
                let call = format!("{f}({})", self.expr(x));
                if *negated {
                    self.d.negate(&call)
                } else {
                    call
                }
            }
        }
    }

    /// True when the template is only text and `{{ }}` (it becomes one expression).
    pub fn is_simple(stmts: &[Stmt]) -> bool {
        stmts
            .iter()
            .all(|s| matches!(s, Stmt::Text(_) | Stmt::Out(_)))
    }

    /// A simple template as one string expression.
    pub fn simple(&self, stmts: &[Stmt]) -> String {
        if stmts.is_empty() {
            return "\"\"".into();
        }
        let parts: Vec<String> = stmts
            .iter()
            .map(|s| match s {
                Stmt::Text(t) => str_lit(t),
                Stmt::Out(e) => format!("text({})", self.expr(e)),
                _ => String::new(),
            })
            .collect();
        parts.join(" + ")
    }

    /// A template as the body of a function of `ctx` returning its text (lines indented by
    /// `indent`).
    pub fn body(&mut self, stmts: &[Stmt], indent: usize) -> Vec<String> {
        let mut out = Vec::new();
        let pad = " ".repeat(indent);
        out.push(self.d.body_start(&pad));
        self.stmts(stmts, indent, &mut out);
        out.push(self.d.body_end(&pad));
        out
    }

    fn stmts(&mut self, stmts: &[Stmt], indent: usize, out: &mut Vec<String>) {
        let pad = " ".repeat(indent);
        let d = self.d;
        let mut wrote = false;
        for s in stmts {
            wrote = true;
            match s {
                Stmt::Text(t) => out.push(d.push(&pad, &str_lit(t))),
                Stmt::Out(e) => out.push(d.push(&pad, &format!("text({})", self.expr(e)))),
                Stmt::Set(name, e) => {
                    let code = self.expr(e);
                    let existing = self.scopes.last().and_then(|s| s.get(name)).cloned();
                    match existing {
                        Some(ident) => out.push(d.assign(&pad, &ident, &code)),
                        None => {
                            let ident = self.bind(name);
                            out.push(d.declare(&pad, &ident, &code));
                        }
                    }
                }
                Stmt::If(branches, other) => {
                    for (i, (cond, body)) in branches.iter().enumerate() {
                        let c = self.expr(cond);
                        out.push(d.if_head(&pad, i, &c));
                        self.scopes.push(HashMap::new());
                        self.stmts(body, indent + 4, out);
                        self.scopes.pop();
                    }
                    if let Some(body) = other {
                        out.push(d.else_head(&pad));
                        self.scopes.push(HashMap::new());
                        self.stmts(body, indent + 4, out);
                        self.scopes.pop();
                    }
                    out.extend(d.block_end(&pad));
                }
                Stmt::For(var, iter, body) => {
                    let it = self.expr(iter);
                    self.depth += 1;
                    let loop_ident = if self.depth == 1 {
                        "loop".to_string()
                    } else {
                        format!("loop{}", self.depth)
                    };
                    self.scopes.push(HashMap::new());
                    if let Some(s) = self.scopes.last_mut() {
                        s.insert("loop".into(), loop_ident.clone());
                    }
                    let v = self.bind(var);
                    out.push(d.for_head(&pad, &loop_ident, &v, &it));
                    self.stmts(body, indent + 4, out);
                    out.extend(d.block_end(&pad));
                    self.scopes.pop();
                    self.depth -= 1;
                }
            }
        }
        if !wrote {
            out.extend(d.empty_body(&pad));
        }
    }
}
