//! What a template may be before minijinja compiles it, and the rewrite that puts every
//! growing operator under a size check.
//!
//! minijinja's fuel counts instructions, not bytes, and its operators cannot be hooked:
//! `'x' ~ s` doubles a string per instruction, `[1] * 2**31` makes a lazy list that spins
//! for minutes in one instruction when printed, and the compiler folds constant operands
//! (`'a' ~ ([1] * 2**31)`) while it compiles, before any fuel is spent — which is why even
//! `validate` used to hang on it. So before compiling, each template is parsed and its `*`,
//! `+` and `~` are rewritten into calls of checked functions (`template/checked.rs`):
//! `a ~ b * c` becomes `__of_cat(a, __of_mul(b, c))`. A call is never constant-folded, so
//! compiling (and validating) never evaluates anything, and each operation checks the size
//! of what it builds against `TEMPLATE_MAX_VALUE` first. Raw text inside blocks whose output
//! is captured into a value (`{% set %}…{% endset %}`, `{% filter %}`, macros, `{% call %}`)
//! is charged to the output budget through an inserted `__of_tick(n)` (the final output is
//! bounded by the writer; a capture is not written anywhere until it is used).
//!
//! The rewrite only inserts text within a line, so the line numbers of errors stay true.
//!
//! Before any of that, a linear scan bounds what a parser or compiler would recurse on: the
//! size of a template and the number of operators in one tag (a 30,000-term `1 ~ 1 ~ …`
//! nests 30,000 deep in the syntax tree and would overflow the stack of whoever walks it).

use minijinja::machinery::ast::{self, CallArg, Expr, Stmt};
use minijinja::machinery::{self, Token, WhitespaceConfig};
use std::borrow::Cow;

/// The largest template (one prompt, URL, body string, condition) accepted.
pub const MAX_TEMPLATE_BYTES: usize = 1024 * 1024;
/// Operators, filters, attribute and item accesses in one `{{ … }}` or `{% … %}`: each one
/// nests the syntax tree a level deeper.
pub const MAX_TAG_OPERATORS: usize = 500;

/// `*`, `+` and `~` in one tag (a chain of one operator becomes one call; mixed ones nest,
/// and minijinja's parser nests at most 150 deep).
pub const MAX_TAG_GROWING: usize = 200;

/// Names of the checked functions the rewrite calls; not reported as references.
pub const HELPERS: [&str; 4] = ["__of_mul", "__of_add", "__of_cat", "__of_tick"];

/// Refuses a template (or expression) that is too large or nests too deep, with the fix.
pub fn check_shape(source: &str, in_expr: bool) -> Result<(), String> {
    if source.len() > MAX_TEMPLATE_BYTES {
        return Err(format!(
            "the template is {} bytes, more than the limit of {} MiB: move large text into a \
             variable or a node's output",
            source.len(),
            MAX_TEMPLATE_BYTES >> 20
        ));
    }
    if !source.contains("{{") && !source.contains("{%") && !in_expr {
        return Ok(());
    }
    // Every operator is at least a character: tags all shorter than the smallest limit
    // cannot exceed one, and need no tokenizing (most templates).
    let longest = if in_expr {
        source.len()
    } else {
        super::tags(source)
            .iter()
            .map(|t| t.len())
            .max()
            .unwrap_or(0)
    };
    if longest <= MAX_TAG_GROWING {
        return Ok(());
    }
    let mut operators = 0usize;
    let mut growing = 0usize;
    for token in machinery::tokenize(source, in_expr, Default::default(), ws()) {
        let Ok((token, span)) = token else {
            // A syntax error: the parser reports it with its line.
            return Ok(());
        };
        match token {
            Token::VariableStart | Token::BlockStart => {
                operators = 0;
                growing = 0;
            }
            Token::Plus | Token::Mul | Token::Tilde if growing >= MAX_TAG_GROWING => {
                return Err(format!(
                    "an expression at line {} has more than {MAX_TAG_GROWING} of ~, + and *; \
                     split it with {{% set %}} into smaller steps, or join a list",
                    span.start_line
                ));
            }
            Token::Plus | Token::Mul | Token::Tilde => {
                growing += 1;
                operators += 1;
            }
            Token::Minus
            | Token::Div
            | Token::FloorDiv
            | Token::Pow
            | Token::Mod
            | Token::Dot
            | Token::Pipe
            | Token::Eq
            | Token::Ne
            | Token::Gt
            | Token::Gte
            | Token::Lt
            | Token::Lte
            | Token::BracketOpen
            | Token::ParenOpen
            | Token::BraceOpen
            | Token::Ident("and" | "or" | "not" | "in" | "is" | "if") => {
                operators += 1;
                if operators > MAX_TAG_OPERATORS {
                    return Err(format!(
                        "an expression at line {} has more than {MAX_TAG_OPERATORS} operators \
                         and filters; split it with {{% set %}} into smaller steps",
                        span.start_line
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn ws() -> WhitespaceConfig {
    WhitespaceConfig {
        keep_trailing_newline: true,
        ..Default::default()
    }
}

/// The template with its growing operators rewritten into checked calls (see the module
/// docs). Borrowed unchanged when there is nothing to rewrite. A syntax error is left for
/// minijinja's compiler to report.
pub fn rewrite_template(source: &str) -> Result<Cow<'_, str>, String> {
    check_shape(source, false)?;
    if !needs_rewrite(source) {
        return Ok(Cow::Borrowed(source));
    }
    let Ok(tree) = machinery::parse(source, "<template>", Default::default(), ws()) else {
        return Ok(Cow::Borrowed(source));
    };
    let mut edits = Edits::new(source);
    edits.stmt(&tree, false);
    Ok(edits.apply(source))
}

/// Whether a template can hold anything the rewrite changes: a growing operator, or a block
/// that captures output. Most prompts (`{{ vars.X }}`) hold neither and skip the parse.
fn needs_rewrite(source: &str) -> bool {
    if !source.contains("{{") && !source.contains("{%") {
        return false;
    }
    source.contains(['*', '+', '~'])
        || (source.contains("{%")
            && ["set", "filter", "macro", "call"]
                .iter()
                .any(|w| source.contains(w)))
}

/// Like [`rewrite_template`], for a bare expression (a condition, a `forEach`).
pub fn rewrite_expr(source: &str) -> Result<Cow<'_, str>, String> {
    check_shape(source, true)?;
    if !source.contains(['*', '+', '~']) {
        return Ok(Cow::Borrowed(source));
    }
    let Ok(expr) = machinery::parse_expr(source) else {
        return Ok(Cow::Borrowed(source));
    };
    let mut edits = Edits::new(source);
    edits.expr(&expr);
    Ok(edits.apply(source))
}

/// Text insertions at byte offsets of the source, and operator characters replaced by `,`.
struct Edits<'s> {
    src: &'s str,
    /// (offset, order, text): at one offset, closings (order 0, innermost first) go before
    /// openings (order 1, outermost first).
    inserts: Vec<(usize, i64, String)>,
    /// Byte ranges replaced by `,`.
    commas: Vec<(usize, usize)>,
    seq: i64,
}

impl<'s> Edits<'s> {
    fn new(src: &'s str) -> Self {
        Edits {
            src,
            inserts: Vec::new(),
            commas: Vec::new(),
            seq: 0,
        }
    }

    fn apply(mut self, source: &'s str) -> Cow<'s, str> {
        if self.inserts.is_empty() && self.commas.is_empty() {
            return Cow::Borrowed(source);
        }
        self.inserts.sort_by_key(|(at, order, _)| (*at, *order));
        self.commas.sort();
        let mut out = String::with_capacity(source.len() + self.inserts.len() * 10);
        let mut pos = 0;
        let mut inserts = self.inserts.into_iter().peekable();
        let mut commas = self.commas.into_iter().peekable();
        loop {
            let next_insert = inserts.peek().map(|(at, _, _)| *at);
            let next_comma = commas.peek().map(|(from, _)| *from);
            match (next_insert, next_comma) {
                (None, None) => break,
                (Some(i), c) if c.is_none_or(|c| i <= c) => {
                    if let Some((at, _, text)) = inserts.next() {
                        out.push_str(&source[pos..at.max(pos)]);
                        pos = pos.max(at);
                        out.push_str(&text);
                    }
                }
                _ => {
                    if let Some((from, to)) = commas.next() {
                        out.push_str(&source[pos..from.max(pos)]);
                        out.push(',');
                        pos = pos.max(to);
                    }
                }
            }
        }
        out.push_str(&source[pos..]);
        Cow::Owned(out)
    }

    fn call(&mut self, name: &str, span: machinery::Span) {
        self.seq += 1;
        self.inserts.push((
            span.start_offset as usize,
            1_000_000_000 + self.seq,
            format!("{name}("),
        ));
        // Closings at one offset: the innermost (visited later, larger seq) first.
        self.inserts
            .push((span.end_offset as usize, -self.seq, ")".to_string()));
    }

    fn body(&mut self, body: &[Stmt<'_>], captured: bool) {
        for s in body {
            self.stmt(s, captured);
        }
    }

    fn stmt(&mut self, s: &Stmt<'_>, captured: bool) {
        match s {
            Stmt::Template(t) => self.body(&t.children, captured),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::EmitRaw(r) => {
                if captured && !r.raw.is_empty() {
                    let at = r.span().start_offset as usize;
                    self.seq += 1;
                    self.inserts.push((
                        at,
                        1_000_000_000 + self.seq,
                        format!("{{{{ __of_tick({}) }}}}", r.raw.len()),
                    ));
                }
            }
            Stmt::ForLoop(f) => {
                self.expr(&f.target);
                self.expr(&f.iter);
                if let Some(e) = &f.filter_expr {
                    self.expr(e);
                }
                self.body(&f.body, captured);
                self.body(&f.else_body, captured);
            }
            Stmt::IfCond(c) => {
                self.expr(&c.expr);
                self.body(&c.true_body, captured);
                self.body(&c.false_body, captured);
            }
            Stmt::WithBlock(w) => {
                for (a, b) in &w.assignments {
                    self.expr(a);
                    self.expr(b);
                }
                self.body(&w.body, captured);
            }
            Stmt::Set(s) => {
                self.expr(&s.target);
                self.expr(&s.expr);
            }
            Stmt::SetBlock(s) => {
                self.expr(&s.target);
                if let Some(f) = &s.filter {
                    self.expr(f);
                }
                self.body(&s.body, true);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.body(&a.body, captured);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.body(&f.body, true);
            }
            Stmt::Block(b) => self.body(&b.body, captured),
            Stmt::Import(i) => {
                self.expr(&i.expr);
                self.expr(&i.name);
            }
            Stmt::FromImport(i) => {
                self.expr(&i.expr);
                for (a, b) in &i.names {
                    self.expr(a);
                    if let Some(b) = b {
                        self.expr(b);
                    }
                }
            }
            Stmt::Extends(e) => self.expr(&e.name),
            Stmt::Include(i) => self.expr(&i.name),
            Stmt::Macro(m) => self.macro_decl(m),
            Stmt::CallBlock(c) => {
                self.call_node(&c.call);
                self.macro_decl(&c.macro_decl);
            }
            Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::Do(d) => self.call_node(&d.call),
        }
    }

    fn macro_decl(&mut self, m: &ast::Macro<'_>) {
        for a in &m.args {
            self.expr(a);
        }
        for d in &m.defaults {
            self.expr(d);
        }
        self.body(&m.body, true);
    }

    fn call_node(&mut self, c: &ast::Call<'_>) {
        self.expr(&c.expr);
        self.args(&c.args);
    }

    fn args(&mut self, args: &[CallArg<'_>]) {
        for a in args {
            match a {
                CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) => self.expr(e),
                CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    /// A growing operator becomes a call; a left-leaning chain of the same operator
    /// (`a ~ b ~ c`) becomes one call with every operand (`__of_cat(a, b, c)`), so a long
    /// chain does not nest calls deeper than minijinja's parser allows.
    fn binop(&mut self, b: &ast::Spanned<ast::BinOp<'_>>, in_chain: bool) {
        let name = match b.op {
            ast::BinOpKind::Mul => Some(("__of_mul", '*')),
            ast::BinOpKind::Add => Some(("__of_add", '+')),
            ast::BinOpKind::Concat => Some(("__of_cat", '~')),
            _ => None,
        };
        let Some((name, op)) = name else {
            self.expr(&b.left);
            self.expr(&b.right);
            return;
        };
        // The operator lies between the operands, with only parentheses and blanks around
        // it.
        let from = b.left.span().end_offset as usize;
        let to = b.right.span().start_offset as usize;
        let at = self
            .src
            .get(from..to)
            .and_then(|gap| gap.find(op))
            .map(|i| from + i);
        let Some(at) = at else {
            self.expr(&b.left);
            self.expr(&b.right);
            return;
        };
        if !in_chain {
            self.call(name, b.span());
        }
        self.commas.push((at, at + 1));
        // The left operand continues the chain only when it is the same operator written
        // without parentheses around it: then its span starts where this one does (a
        // parenthesised one starts after the parenthesis).
        match &b.left {
            Expr::BinOp(inner)
                if std::mem::discriminant(&inner.op) == std::mem::discriminant(&b.op)
                    && inner.span().start_offset == b.span().start_offset =>
            {
                self.binop(inner, true)
            }
            other => self.expr(other),
        }
        self.expr(&b.right);
    }

    fn expr(&mut self, e: &Expr<'_>) {
        match e {
            Expr::Var(_) | Expr::Const(_) => {}
            Expr::Slice(s) => {
                self.expr(&s.expr);
                for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(part);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => self.binop(b, false),
            Expr::Compare(c) => {
                self.expr(&c.expr);
                for op in &c.ops {
                    self.expr(&op.expr);
                }
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr);
                self.expr(&i.true_expr);
                if let Some(f) = &i.false_expr {
                    self.expr(f);
                }
            }
            Expr::Filter(f) => {
                if let Some(e) = &f.expr {
                    self.expr(e);
                }
                self.args(&f.args);
            }
            Expr::Test(t) => {
                self.expr(&t.expr);
                self.args(&t.args);
            }
            Expr::GetAttr(g) => self.expr(&g.expr),
            Expr::GetItem(g) => {
                self.expr(&g.expr);
                self.expr(&g.subscript_expr);
            }
            Expr::Call(c) => self.call_node(c),
            Expr::List(l) => {
                for i in &l.items {
                    self.expr(i);
                }
            }
            Expr::Map(m) => {
                for (k, v) in m.keys.iter().zip(&m.values) {
                    self.expr(k);
                    self.expr(v);
                }
            }
        }
    }
}
