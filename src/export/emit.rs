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

/// A string literal valid in both Python and JavaScript (JSON escaping).
pub fn str_lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A JSON value as a literal of the language.
pub fn value_lit(lang: Lang, v: &Value) -> String {
    match (lang, v) {
        (Lang::Python, Value::Null) => "None".into(),
        (Lang::Python, Value::Bool(b)) => if *b { "True" } else { "False" }.into(),
        (_, Value::Null) => "null".into(),
        (_, Value::Bool(b)) => b.to_string(),
        (_, Value::Number(n)) => n.to_string(),
        (_, Value::String(s)) => str_lit(s),
        (_, Value::Array(a)) => {
            let items: Vec<String> = a.iter().map(|x| value_lit(lang, x)).collect();
            format!("[{}]", items.join(", "))
        }
        (_, Value::Object(o)) => {
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
    lang: Lang,
    scopes: Vec<HashMap<String, String>>,
    counter: usize,
    /// Loop nesting depth: `loop` of depth d is `loop{d}`.
    depth: usize,
}

impl Emitter {
    pub fn new(lang: Lang) -> Self {
        Emitter {
            lang,
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

    fn py(&self) -> bool {
        self.lang == Lang::Python
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
                let none = if self.py() { "None" } else { "null" };
                format!(
                    "slice_of({}, {}, {})",
                    self.expr(base),
                    start.as_ref().map(|s| self.expr(s)).unwrap_or(none.into()),
                    stop.as_ref().map(|s| self.expr(s)).unwrap_or(none.into())
                )
            }
            Expr::Str(s) => str_lit(s),
            Expr::Int(i) => i.to_string(),
            Expr::Float(f) => {
                let s = f.to_string();
                if self.py() && !s.contains('.') && !s.contains('e') {
                    format!("{s}.0")
                } else {
                    s
                }
            }
            Expr::Bool(b) => match (self.py(), b) {
                (true, true) => "True".into(),
                (true, false) => "False".into(),
                (false, b) => b.to_string(),
            },
            Expr::None => if self.py() { "None" } else { "null" }.into(),
            Expr::List(items) => {
                let items: Vec<String> = items.iter().map(|i| self.expr(i)).collect();
                format!("[{}]", items.join(", "))
            }
            Expr::Filter(base, name, args) => {
                let none = if self.py() { "None" } else { "undefined" };
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
            Expr::And(l, r) => {
                if self.py() {
                    format!("({} and {})", self.expr(l), self.expr(r))
                } else {
                    format!("and(() => {}, () => {})", self.expr(l), self.expr(r))
                }
            }
            Expr::Or(l, r) => {
                if self.py() {
                    format!("({} or {})", self.expr(l), self.expr(r))
                } else {
                    format!("or(() => {}, () => {})", self.expr(l), self.expr(r))
                }
            }
            Expr::Not(x) => {
                if self.py() {
                    format!("(not truthy({}))", self.expr(x))
                } else {
                    format!("!truthy({})", self.expr(x))
                }
            }
            Expr::Neg(x) => format!("neg({})", self.expr(x)),
            Expr::Cond(c, a, b) => {
                if self.py() {
                    format!(
                        "({} if truthy({}) else {})",
                        self.expr(a),
                        self.expr(c),
                        self.expr(b)
                    )
                } else {
                    format!(
                        "(truthy({}) ? {} : {})",
                        self.expr(c),
                        self.expr(a),
                        self.expr(b)
                    )
                }
            }
            Expr::Test(x, test, negated) => {
                let f = match test.as_str() {
                    "defined" => "is_defined",
                    "undefined" => "is_undefined",
                    _ => "is_none",
                };
                let call = format!("{f}({})", self.expr(x));
                match (negated, self.py()) {
                    (false, _) => call,
                    (true, true) => format!("(not {call})"),
                    (true, false) => format!("!{call}"),
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
        if self.py() {
            out.push(format!("{pad}out = []"));
        } else {
            out.push(format!("{pad}const out = [];"));
        }
        self.stmts(stmts, indent, &mut out);
        if self.py() {
            out.push(format!("{pad}return \"\".join(out)"));
        } else {
            out.push(format!("{pad}return out.join(\"\");"));
        }
        out
    }

    fn stmts(&mut self, stmts: &[Stmt], indent: usize, out: &mut Vec<String>) {
        let pad = " ".repeat(indent);
        let py = self.py();
        let semi = if py { "" } else { ";" };
        let push = if py { "out.append" } else { "out.push" };
        let mut wrote = false;
        for s in stmts {
            wrote = true;
            match s {
                Stmt::Text(t) => out.push(format!("{pad}{push}({}){semi}", str_lit(t))),
                Stmt::Out(e) => out.push(format!("{pad}{push}(text({})){semi}", self.expr(e))),
                Stmt::Set(name, e) => {
                    let code = self.expr(e);
                    let existing = self.scopes.last().and_then(|s| s.get(name)).cloned();
                    match existing {
                        Some(ident) => out.push(format!("{pad}{ident} = {code}{semi}")),
                        None => {
                            let ident = self.bind(name);
                            if py {
                                out.push(format!("{pad}{ident} = {code}"));
                            } else {
                                out.push(format!("{pad}let {ident} = {code};"));
                            }
                        }
                    }
                }
                Stmt::If(branches, other) => {
                    for (i, (cond, body)) in branches.iter().enumerate() {
                        let c = self.expr(cond);
                        let head = match (py, i) {
                            (true, 0) => format!("{pad}if truthy({c}):"),
                            (true, _) => format!("{pad}elif truthy({c}):"),
                            (false, 0) => format!("{pad}if (truthy({c})) {{"),
                            (false, _) => format!("{pad}}} else if (truthy({c})) {{"),
                        };
                        out.push(head);
                        self.scopes.push(HashMap::new());
                        self.stmts(body, indent + 4, out);
                        self.scopes.pop();
                    }
                    if let Some(body) = other {
                        out.push(if py {
                            format!("{pad}else:")
                        } else {
                            format!("{pad}}} else {{")
                        });
                        self.scopes.push(HashMap::new());
                        self.stmts(body, indent + 4, out);
                        self.scopes.pop();
                    }
                    if !py {
                        out.push(format!("{pad}}}"));
                    }
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
                    out.push(if py {
                        format!("{pad}for {loop_ident}, {v} in with_loop({it}):")
                    } else {
                        format!("{pad}for (const [{loop_ident}, {v}] of withLoop({it})) {{")
                    });
                    self.stmts(body, indent + 4, out);
                    if !py {
                        out.push(format!("{pad}}}"));
                    }
                    self.scopes.pop();
                    self.depth -= 1;
                }
            }
        }
        if !wrote && py {
            out.push(format!("{pad}pass"));
        }
    }
}
