//! A parser for the subset of Jinja that exported programs can reproduce faithfully.
//!
//! Anything outside the subset is an [`Unsupported`] error naming the construct, so an export
//! never silently changes what a template means. The subset: text, `{{ expr }}`, `{# #}`,
//! whitespace control (`{%-`, `-%}`), `{% if/elif/else %}`, `{% for x in expr %}` (with
//! `loop.index0`, `loop.index`, `loop.first`, `loop.last`, `loop.length`), `{% set x = expr %}`;
//! expressions: names, `.attr`, `[index]`, `[start:stop]`, string/number/bool/none literals,
//! list literals, `~`, `+`, `-`, comparisons, `in`/`not in`, `and`/`or`/`not`,
//! `a if c else b`, `is defined`/`is none` (and their negations), and the filters in
//! [`FILTERS`].

/// Filters the translator knows, with the number of arguments each accepts (at most).
pub const FILTERS: [(&str, usize); 14] = [
    ("join", 1),
    ("tojson", 1),
    ("fromjson", 0),
    ("default", 1),
    ("truncate", 4),
    ("upper", 0),
    ("lower", 0),
    ("trim", 0),
    ("replace", 2),
    ("length", 0),
    ("first", 0),
    ("last", 0),
    ("lines", 0),
    ("string", 0),
];

/// Keyword arguments `truncate` accepts, in positional order.
pub const TRUNCATE_ARGS: [&str; 4] = ["length", "killwords", "end", "leeway"];

/// A construct the translator cannot reproduce (or a syntax error).
#[derive(Debug, Clone, PartialEq)]
pub struct Unsupported(pub String);

type R<T> = Result<T, Unsupported>;

fn bad<T>(msg: impl Into<String>) -> R<T> {
    Err(Unsupported(msg.into()))
}

#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    Text(String),
    Out(Expr),
    If(Vec<(Expr, Vec<Stmt>)>, Option<Vec<Stmt>>),
    For(String, Expr, Vec<Stmt>),
    Set(String, Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    Attr(String),
    Index(Expr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    Concat,
    Add,
    Sub,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Name(String),
    /// `base.a[0]["b"]`: a lookup path (Undefined-aware).
    Get(Box<Expr>, Vec<Key>),
    Slice(Box<Expr>, Option<Box<Expr>>, Option<Box<Expr>>),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
    List(Vec<Expr>),
    /// A filter call; arguments are positional after keyword arguments were placed.
    Filter(Box<Expr>, String, Vec<Option<Expr>>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `x is defined` / `x is none` (negated: `is not`).
    Test(Box<Expr>, String, bool),
}

// ---------------------------------------------------------------------------------------------
// Template level

enum Piece {
    Text(String),
    Expr(String),
    Tag(String),
}

/// Splits a template into text, `{{ }}` and `{% %}` pieces, applying whitespace control.
fn pieces(src: &str) -> R<Vec<Piece>> {
    let mut out: Vec<Piece> = Vec::new();
    let mut rest = src;
    let mut strip_next = false;
    loop {
        let open = ["{{", "{%", "{#"].iter().filter_map(|o| rest.find(o)).min();
        let Some(open) = open else {
            let t = if strip_next { rest.trim_start() } else { rest };
            if !t.is_empty() {
                out.push(Piece::Text(t.to_string()));
            }
            return Ok(out);
        };
        let kind = &rest[open..open + 2];
        let close = match kind {
            "{{" => "}}",
            "{%" => "%}",
            _ => "#}",
        };
        let body_start = open + 2;
        let Some(end) = rest[body_start..].find(close) else {
            return bad(format!("an unclosed `{kind}`"));
        };
        let mut body = &rest[body_start..body_start + end];
        let mut text = &rest[..open];
        if strip_next {
            text = text.trim_start();
        }
        if let Some(b) = body.strip_prefix('-') {
            text = text.trim_end();
            body = b;
        } else if let Some(b) = body.strip_prefix('+') {
            body = b;
        }
        strip_next = false;
        if let Some(b) = body.strip_suffix('-') {
            strip_next = true;
            body = b;
        } else if let Some(b) = body.strip_suffix('+') {
            body = b;
        }
        if !text.is_empty() {
            out.push(Piece::Text(text.to_string()));
        }
        match kind {
            "{{" => out.push(Piece::Expr(body.trim().to_string())),
            "{%" => out.push(Piece::Tag(body.trim().to_string())),
            _ => {}
        }
        rest = &rest[body_start + end + 2..];
    }
}

/// Parses a whole template.
pub fn parse_template(src: &str) -> R<Vec<Stmt>> {
    let ps = pieces(src)?;
    let mut pos = 0;
    let (body, end) = parse_block(&ps, &mut pos, &[])?;
    if let Some(end) = end {
        return bad(format!("an unexpected `{{% {end} %}}`"));
    }
    Ok(body)
}

/// Parses statements until one of `until` (a tag keyword) or the end; returns the body and
/// the tag that ended it.
fn parse_block(ps: &[Piece], pos: &mut usize, until: &[&str]) -> R<(Vec<Stmt>, Option<String>)> {
    let mut out = Vec::new();
    while *pos < ps.len() {
        let p = &ps[*pos];
        *pos += 1;
        match p {
            Piece::Text(t) => out.push(Stmt::Text(t.clone())),
            Piece::Expr(e) => out.push(Stmt::Out(parse_expr(e)?)),
            Piece::Tag(tag) => {
                let word = tag.split_whitespace().next().unwrap_or("");
                if until.contains(&word) {
                    return Ok((out, Some(tag.clone())));
                }
                match word {
                    "if" => out.push(parse_if(ps, pos, tag[2..].trim())?),
                    "for" => out.push(parse_for(ps, pos, tag[3..].trim())?),
                    "set" => out.push(parse_set(tag[3..].trim())?),
                    "elif" | "else" | "endif" | "endfor" => {
                        return bad(format!("an unexpected `{{% {word} %}}`"))
                    }
                    other => return bad(format!("the tag `{{% {other} %}}`")),
                }
            }
        }
    }
    if until.is_empty() {
        Ok((out, None))
    } else {
        bad(format!("a missing `{{% {} %}}`", until[until.len() - 1]))
    }
}

fn parse_if(ps: &[Piece], pos: &mut usize, cond: &str) -> R<Stmt> {
    let mut branches = Vec::new();
    let mut cond = parse_expr(cond)?;
    loop {
        let (body, end) = parse_block(ps, pos, &["elif", "else", "endif"])?;
        branches.push((cond, body));
        let end = end.unwrap_or_default();
        if end == "endif" {
            return Ok(Stmt::If(branches, None));
        }
        if end == "else" {
            let (body, end) = parse_block(ps, pos, &["endif"])?;
            if end.as_deref() != Some("endif") {
                return bad("a missing `{% endif %}`");
            }
            return Ok(Stmt::If(branches, Some(body)));
        }
        let rest = end.strip_prefix("elif").unwrap_or("").trim();
        if rest.is_empty() {
            return bad(format!("the tag `{{% {end} %}}`"));
        }
        cond = parse_expr(rest)?;
    }
}

fn parse_for(ps: &[Piece], pos: &mut usize, spec: &str) -> R<Stmt> {
    let mut toks = Lexer::new(spec).all()?;
    toks.reverse();
    let var = match toks.pop() {
        Some(Tok::Name(n)) => n,
        _ => return bad("a `for` loop that does not start with a variable name"),
    };
    match toks.pop() {
        Some(Tok::Name(n)) if n == "in" => {}
        Some(Tok::Op(o)) if o == "," => {
            return bad("a `for` loop over several variables (`for a, b in …`)")
        }
        _ => return bad("a `for` loop without `in`"),
    }
    toks.reverse();
    let mut p = Parser { toks, pos: 0 };
    let iter = p.expr_no_cond()?;
    if p.peek_name("if") {
        return bad("a filtered `for` loop (`for x in y if …`)");
    }
    if p.peek_name("recursive") {
        return bad("a recursive `for` loop");
    }
    p.end()?;
    let (body, end) = parse_block(ps, pos, &["else", "endfor"])?;
    if end.as_deref() == Some("else") {
        return bad("`{% else %}` inside a `for` loop");
    }
    Ok(Stmt::For(var, iter, body))
}

fn parse_set(spec: &str) -> R<Stmt> {
    let Some((name, value)) = spec.split_once('=') else {
        return bad("a block `{% set %}` (use `{% set x = … %}`)");
    };
    let name = name.trim();
    if name.is_empty()
        || !name.chars().all(|c| c.is_alphanumeric() || c == '_')
        || name.chars().next().is_some_and(|c| c.is_ascii_digit())
    {
        return bad(format!(
            "`{{% set {name} = … %}}` (only a plain name can be set)"
        ));
    }
    Ok(Stmt::Set(name.to_string(), parse_expr(value.trim())?))
}

// ---------------------------------------------------------------------------------------------
// Expressions

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Str(String),
    Int(i64),
    Float(f64),
    Op(String),
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl<'a> Lexer<'a> {
    fn new(s: &'a str) -> Self {
        Lexer {
            chars: s.chars().peekable(),
        }
    }

    fn all(&mut self) -> R<Vec<Tok>> {
        let mut out = Vec::new();
        while let Some(&c) = self.chars.peek() {
            if c.is_whitespace() {
                self.chars.next();
            } else if c.is_alphabetic() || c == '_' {
                let mut s = String::new();
                while let Some(&c) = self.chars.peek() {
                    if c.is_alphanumeric() || c == '_' {
                        s.push(c);
                        self.chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Name(s));
            } else if c.is_ascii_digit() {
                let mut s = String::new();
                while let Some(&c) = self.chars.peek() {
                    if c.is_ascii_digit() || c == '.' || c == '_' {
                        s.push(c);
                        self.chars.next();
                    } else {
                        break;
                    }
                }
                let s = s.replace('_', "");
                if s.contains('.') {
                    match s.parse::<f64>() {
                        Ok(f) => out.push(Tok::Float(f)),
                        Err(_) => return bad(format!("the number `{s}`")),
                    }
                } else {
                    match s.parse::<i64>() {
                        Ok(i) => out.push(Tok::Int(i)),
                        Err(_) => return bad(format!("the number `{s}`")),
                    }
                }
            } else if c == '\'' || c == '"' {
                self.chars.next();
                let mut s = String::new();
                loop {
                    match self.chars.next() {
                        None => return bad("an unclosed string literal"),
                        Some(ch) if ch == c => break,
                        Some('\\') => match self.chars.next() {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some('r') => s.push('\r'),
                            Some('\\') => s.push('\\'),
                            Some('\'') => s.push('\''),
                            Some('"') => s.push('"'),
                            Some(o) => {
                                return bad(format!("the string escape `\\{o}`"));
                            }
                            None => return bad("an unclosed string literal"),
                        },
                        Some(ch) => s.push(ch),
                    }
                }
                out.push(Tok::Str(s));
            } else {
                self.chars.next();
                let two = self.chars.peek().map(|n| format!("{c}{n}"));
                let op = match two.as_deref() {
                    Some("==" | "!=" | "<=" | ">=" | "//" | "**") => {
                        self.chars.next();
                        two.unwrap_or_default()
                    }
                    _ => c.to_string(),
                };
                out.push(Tok::Op(op));
            }
        }
        Ok(out)
    }
}

/// Parses an expression (a condition, or the inside of `{{ }}`).
pub fn parse_expr(src: &str) -> R<Expr> {
    let toks = Lexer::new(src).all()?;
    if toks.is_empty() {
        return bad("an empty expression");
    }
    let mut p = Parser { toks, pos: 0 };
    let e = p.expr()?;
    p.end()?;
    Ok(e)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn peek_op(&self, op: &str) -> bool {
        matches!(self.peek(), Some(Tok::Op(o)) if o == op)
    }

    fn peek_name(&self, n: &str) -> bool {
        matches!(self.peek(), Some(Tok::Name(x)) if x == n)
    }

    fn eat_op(&mut self, op: &str) -> bool {
        if self.peek_op(op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_name(&mut self, n: &str) -> bool {
        if self.peek_name(n) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_op(&mut self, op: &str) -> R<()> {
        if self.eat_op(op) {
            Ok(())
        } else {
            bad(format!("a missing `{op}`"))
        }
    }

    fn end(&self) -> R<()> {
        match self.peek() {
            None => Ok(()),
            Some(t) => bad(format!("unexpected {}", describe(t))),
        }
    }

    fn expr(&mut self) -> R<Expr> {
        let e = self.or()?;
        if self.eat_name("if") {
            let cond = self.or()?;
            let other = if self.eat_name("else") {
                self.expr()?
            } else {
                // Jinja: `a if c` is undefined when c is false; we print nothing for it.
                return bad("`a if c` without `else`");
            };
            return Ok(Expr::Cond(Box::new(cond), Box::new(e), Box::new(other)));
        }
        Ok(e)
    }

    /// An expression without a trailing `if` (the iterable of a `for`).
    fn expr_no_cond(&mut self) -> R<Expr> {
        self.or()
    }

    fn or(&mut self) -> R<Expr> {
        let mut l = self.and()?;
        while self.eat_name("or") {
            let r = self.and()?;
            l = Expr::Or(Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn and(&mut self) -> R<Expr> {
        let mut l = self.not()?;
        while self.eat_name("and") {
            let r = self.not()?;
            l = Expr::And(Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn not(&mut self) -> R<Expr> {
        if self.eat_name("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.compare()
    }

    fn compare(&mut self) -> R<Expr> {
        let mut l = self.concat()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(o)) => match o.as_str() {
                    "==" => BinOp::Eq,
                    "!=" => BinOp::Ne,
                    "<" => BinOp::Lt,
                    "<=" => BinOp::Le,
                    ">" => BinOp::Gt,
                    ">=" => BinOp::Ge,
                    _ => break,
                },
                Some(Tok::Name(n)) if n == "in" => BinOp::In,
                Some(Tok::Name(n))
                    if n == "not"
                        && matches!(self.toks.get(self.pos + 1), Some(Tok::Name(m)) if m == "in") =>
                {
                    self.pos += 1;
                    BinOp::NotIn
                }
                _ => break,
            };
            self.pos += 1;
            let r = self.concat()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn concat(&mut self) -> R<Expr> {
        let mut l = self.add()?;
        while self.eat_op("~") {
            let r = self.add()?;
            l = Expr::Bin(BinOp::Concat, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn add(&mut self) -> R<Expr> {
        let mut l = self.mul()?;
        loop {
            let op = if self.eat_op("+") {
                BinOp::Add
            } else if self.eat_op("-") {
                BinOp::Sub
            } else {
                break;
            };
            let r = self.mul()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }

    fn mul(&mut self) -> R<Expr> {
        let e = self.unary()?;
        for op in ["*", "/", "//", "%", "**"] {
            if self.peek_op(op) {
                return bad(format!("the operator `{op}`"));
            }
        }
        Ok(e)
    }

    fn unary(&mut self) -> R<Expr> {
        if self.eat_op("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        let mut e = self.postfix()?;
        // Filters, then tests.
        while self.eat_op("|") {
            e = self.filter(e)?;
        }
        if self.eat_name("is") {
            let negated = self.eat_name("not");
            let test = match self.peek() {
                Some(Tok::Name(n)) => n.clone(),
                _ => return bad("`is` without a test name"),
            };
            self.pos += 1;
            let test = match test.as_str() {
                "defined" | "undefined" | "none" => test,
                other => return bad(format!("the test `is {other}`")),
            };
            if self.peek_op("(") {
                return bad(format!("the test `is {test}(…)` with arguments"));
            }
            e = Expr::Test(Box::new(e), test, negated);
        }
        Ok(e)
    }

    fn filter(&mut self, e: Expr) -> R<Expr> {
        let name = match self.peek() {
            Some(Tok::Name(n)) => n.clone(),
            _ => return bad("`|` without a filter name"),
        };
        self.pos += 1;
        let Some(&(_, max)) = FILTERS.iter().find(|(n, _)| *n == name) else {
            return bad(format!("the filter `{name}`"));
        };
        let mut args: Vec<Option<Expr>> = Vec::new();
        if self.eat_op("(") {
            let mut kw: Vec<(String, Expr)> = Vec::new();
            while !self.eat_op(")") {
                let is_kw = matches!(self.peek(), Some(Tok::Name(_)))
                    && matches!(self.toks.get(self.pos + 1), Some(Tok::Op(o)) if o == "=");
                if is_kw {
                    let k = match self.peek() {
                        Some(Tok::Name(n)) => n.clone(),
                        _ => String::new(),
                    };
                    self.pos += 2;
                    kw.push((k, self.expr()?));
                } else {
                    if !kw.is_empty() {
                        return bad("a positional argument after a keyword argument");
                    }
                    args.push(Some(self.expr()?));
                }
                if !self.eat_op(",") {
                    self.expect_op(")")?;
                    break;
                }
            }
            for (k, v) in kw {
                let idx = match (name.as_str(), k.as_str()) {
                    ("truncate", k) => TRUNCATE_ARGS.iter().position(|a| *a == k),
                    ("tojson", "indent") => Some(0),
                    ("join", "d") => Some(0),
                    ("default", "default_value") => Some(0),
                    _ => None,
                };
                let Some(idx) = idx else {
                    return bad(format!("the argument `{k}=` of the filter `{name}`"));
                };
                while args.len() <= idx {
                    args.push(None);
                }
                if args[idx].is_some() {
                    return bad(format!("the argument `{k}` given twice to `{name}`"));
                }
                args[idx] = Some(v);
            }
        }
        if args.len() > max {
            return bad(format!(
                "the filter `{name}` with {} arguments (at most {max})",
                args.len()
            ));
        }
        Ok(Expr::Filter(Box::new(e), name, args))
    }

    fn postfix(&mut self) -> R<Expr> {
        let mut e = self.primary()?;
        let mut keys: Vec<Key> = Vec::new();
        loop {
            if self.eat_op(".") {
                match self.peek() {
                    Some(Tok::Name(n)) => {
                        keys.push(Key::Attr(n.clone()));
                        self.pos += 1;
                    }
                    Some(Tok::Int(i)) => {
                        keys.push(Key::Index(Expr::Int(*i)));
                        self.pos += 1;
                    }
                    _ => return bad("`.` without an attribute name"),
                }
            } else if self.eat_op("[") {
                let start = if self.peek_op(":") {
                    None
                } else {
                    Some(self.expr()?)
                };
                if self.eat_op(":") {
                    let stop = if self.peek_op("]") {
                        None
                    } else {
                        Some(Box::new(self.expr()?))
                    };
                    if self.peek_op(":") {
                        return bad("a slice with a step (`[a:b:c]`)");
                    }
                    self.expect_op("]")?;
                    if !keys.is_empty() {
                        e = Expr::Get(Box::new(e), std::mem::take(&mut keys));
                    }
                    e = Expr::Slice(Box::new(e), start.map(Box::new), stop);
                } else {
                    self.expect_op("]")?;
                    match start {
                        Some(s) => keys.push(Key::Index(s)),
                        None => return bad("an empty subscript `[]`"),
                    }
                }
            } else if self.peek_op("(") {
                return bad("a function or method call");
            } else {
                break;
            }
        }
        if !keys.is_empty() {
            e = Expr::Get(Box::new(e), keys);
        }
        Ok(e)
    }

    fn primary(&mut self) -> R<Expr> {
        let t = match self.peek() {
            Some(t) => t.clone(),
            None => return bad("an expression that ends too early"),
        };
        self.pos += 1;
        Ok(match t {
            Tok::Str(s) => {
                // Adjacent string literals concatenate.
                let mut s = s;
                while let Some(Tok::Str(n)) = self.peek() {
                    s.push_str(n);
                    self.pos += 1;
                }
                Expr::Str(s)
            }
            Tok::Int(i) => Expr::Int(i),
            Tok::Float(f) => Expr::Float(f),
            Tok::Name(n) => match n.as_str() {
                "true" | "True" => Expr::Bool(true),
                "false" | "False" => Expr::Bool(false),
                "none" | "None" => Expr::None,
                "range" | "dict" | "namespace" | "caller" | "super" | "self" => {
                    return bad(format!("the global `{n}`"))
                }
                _ => Expr::Name(n),
            },
            Tok::Op(o) if o == "(" => {
                let e = self.expr()?;
                if self.peek_op(",") {
                    return bad("a tuple");
                }
                self.expect_op(")")?;
                e
            }
            Tok::Op(o) if o == "[" => {
                let mut items = Vec::new();
                while !self.eat_op("]") {
                    items.push(self.expr()?);
                    if !self.eat_op(",") {
                        self.expect_op("]")?;
                        break;
                    }
                }
                Expr::List(items)
            }
            Tok::Op(o) if o == "{" => return bad("a map literal `{…}`"),
            other => return bad(format!("unexpected {}", describe(&other))),
        })
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Name(n) => format!("`{n}`"),
        Tok::Str(s) => format!("the string {s:?}"),
        Tok::Int(i) => format!("`{i}`"),
        Tok::Float(f) => format!("`{f}`"),
        Tok::Op(o) => format!("`{o}`"),
    }
}

/// `{{ expr }}` and nothing else (whitespace control allowed) → `expr`, as the engine's
/// `forEach` reads it.
pub fn single_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_bundled_constructs() {
        for t in [
            "{% for text in nodes.summarize.output %}▪ {{ vars.TOPICS[loop.index0] }}\n{{ text | trim }}{% if not loop.last %}\n\n{% endif %}{% endfor %}",
            "{% set release = nodes.fetch.output[0] %}{{ release.name or release.tag_name }} ({{ (release.body or 'No release notes.')[:6000] }})",
            "{{ nodes.classify.output | trim | lower | replace(\".\", \"\") }}",
            "{{ nodes.notes.output | lines | first }}",
            "{{ x | truncate(10, end='…') }}",
        ] {
            parse_template(t).unwrap();
        }
        parse_expr("nodes.label.output == \"urgent\" and not (a in b)").unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_translate() {
        let e = parse_template("{{ x | wordcount }}").unwrap_err();
        assert_eq!(e.0, "the filter `wordcount`");
        assert!(parse_template("{% macro m() %}{% endmacro %}").is_err());
        assert!(parse_template("{{ x.upper() }}").is_err());
        assert!(parse_template("{% for a in b %}{% else %}{% endfor %}").is_err());
    }
}
