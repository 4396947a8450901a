//! The size checks of a render: the checked operators the rewrite calls ([`super::guard`]),
//! checked versions of the builtin filters that allocate from an argument, and the bounded
//! writers that stop a render at `TEMPLATE_MAX_OUTPUT`.
//!
//! A render runs on one thread from start to end, so its running totals live in a
//! thread-local reset by [`RenderScope`] at the start of every render.

use crate::limits::{human_bytes, Limits};
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::sync::{Arc, LazyLock};

/// How many times `TEMPLATE_MAX_VALUE` one render may build in total: enough for any sane
/// loop, and a bound on the copying a loop of concatenations can do within its fuel.
pub const TOTAL_BUILT_FACTOR: usize = 64;

thread_local! {
    /// (bytes built by checked operations, bytes of captured raw text) in the current render.
    static SPENT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Resets the running totals for one render (and again when dropped).
pub struct RenderScope;

impl RenderScope {
    pub fn begin() -> RenderScope {
        SPENT.with(|s| s.set((0, 0)));
        RenderScope
    }
}

impl Drop for RenderScope {
    fn drop(&mut self) {
        SPENT.with(|s| s.set((0, 0)));
    }
}

fn value_error(limits: &Limits, what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "{what} would be larger than {} (TEMPLATE_MAX_VALUE); build less, or raise \
             TEMPLATE_MAX_VALUE",
            human_bytes(limits.template_max_value)
        ),
    )
}

/// The message of a render stopped by its output budget.
pub fn output_message(limits: &Limits) -> String {
    format!(
        "the template's output exceeded {} (TEMPLATE_MAX_OUTPUT); output less, or raise \
         TEMPLATE_MAX_OUTPUT",
        human_bytes(limits.template_max_output)
    )
}

/// Charges `bytes` to what this render has built in total.
fn charge(limits: &Limits, bytes: usize) -> Result<(), Error> {
    let total_cap = limits.template_max_value.saturating_mul(TOTAL_BUILT_FACTOR);
    let (before, now) = SPENT.with(|s| {
        let (built, captured) = s.get();
        let now = built.saturating_add(bytes);
        s.set((now, captured));
        (built, now)
    });
    let over = now > total_cap;
    // What a render builds is what it may hold: the measure of a growing render.
    crate::limits::memory::grown(before, now)
        .map_err(|m| Error::new(ErrorKind::InvalidOperation, m))?;
    if over {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the template built more than {} in total ({TOTAL_BUILT_FACTOR} × \
                 TEMPLATE_MAX_VALUE); a loop that grows a string with ~ copies it every time: \
                 collect the parts in a list and use join",
                human_bytes(total_cap)
            ),
        ));
    }
    Ok(())
}

/// Charges raw text emitted inside a captured block to the output budget.
fn charge_captured(limits: &Limits, bytes: usize) -> Result<(), Error> {
    let (before, now) = SPENT.with(|s| {
        let (built, captured) = s.get();
        let now = captured.saturating_add(bytes);
        s.set((built, now));
        (captured, now)
    });
    let over = now > limits.template_max_output;
    crate::limits::memory::grown(before, now)
        .map_err(|m| Error::new(ErrorKind::InvalidOperation, m))?;
    if over {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            output_message(limits),
        ));
    }
    Ok(())
}

/// The size of a value, counted up to just past `cap`: a string's bytes, 8 per number, 16
/// per list or map plus its items, and 8 more per item (the slot it takes: a list of a
/// million one-character strings costs tens of megabytes, not one).
pub fn weight(v: &Value, cap: usize) -> usize {
    fn walk(v: &Value, cap: usize, acc: &mut usize, depth: usize) {
        if *acc > cap {
            return;
        }
        match v.kind() {
            ValueKind::String => *acc += v.as_str().map_or(0, str::len),
            ValueKind::Bytes => *acc += v.as_bytes().map_or(0, <[u8]>::len),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map if depth < 200 => {
                *acc += 16;
                let is_map = v.kind() == ValueKind::Map;
                if let Ok(iter) = v.try_iter() {
                    for item in iter {
                        *acc += 8;
                        if *acc > cap {
                            return;
                        }
                        if is_map {
                            let value = v.get_item(&item).unwrap_or_default();
                            walk(&item, cap, acc, depth + 1);
                            walk(&value, cap, acc, depth + 1);
                        } else {
                            walk(&item, cap, acc, depth + 1);
                        }
                    }
                }
            }
            _ => *acc += 8,
        }
    }
    let mut acc = 0;
    walk(v, cap, &mut acc, 0);
    acc
}

/// A `String` that refuses to grow past `cap` bytes.
pub struct CappedString {
    pub text: String,
    cap: usize,
    pub over: bool,
}

impl CappedString {
    pub fn new(cap: usize) -> Self {
        CappedString {
            text: String::new(),
            cap,
            over: false,
        }
    }
}

impl fmt::Write for CappedString {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.text.len().saturating_add(s.len()) > self.cap {
            self.over = true;
            return Err(fmt::Error);
        }
        self.text.push_str(s);
        Ok(())
    }
}

/// The same for `io::Write` (JSON serialization, the render's output).
pub struct CappedBytes<W> {
    pub inner: W,
    written: usize,
    cap: usize,
    pub over: bool,
    /// Set when the memory emergency stopped the writer (the message for the step).
    pub memory: Option<String>,
    /// Whether what is written stays in memory (not for a sink that only counts).
    holds: bool,
}

impl<W> CappedBytes<W> {
    pub fn new(inner: W, cap: usize) -> Self {
        CappedBytes {
            inner,
            written: 0,
            cap,
            over: false,
            memory: None,
            holds: true,
        }
    }

    /// For a writer that keeps nothing (a size count): its size says nothing about memory.
    pub fn holding_nothing(mut self) -> Self {
        self.holds = false;
        self
    }
}

impl<W: std::io::Write> std::io::Write for CappedBytes<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written.saturating_add(buf.len()) > self.cap {
            self.over = true;
            return Err(std::io::Error::other("output budget exceeded"));
        }
        let before = self.written;
        self.written += buf.len();
        let grown = if self.holds {
            crate::limits::memory::grown(before, self.written)
        } else {
            Ok(())
        };
        if let Err(m) = grown {
            self.memory = Some(m);
            return Err(std::io::Error::other("memory emergency"));
        }
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// minijinja's own arithmetic, for the operands the checks let through (numbers, and lists
/// already known to be small).
static PLAIN: LazyLock<Environment<'static>> = LazyLock::new(Environment::new);

fn plain_op(expr: &'static str, a: Value, b: Value) -> Result<Value, Error> {
    let compiled = PLAIN.compile_expression(expr)?;
    compiled.eval(minijinja::context! { a => a, b => b })
}

fn as_count(v: &Value) -> Option<usize> {
    if v.kind() == ValueKind::Number && v.is_integer() {
        usize::try_from(v.clone()).ok()
    } else {
        None
    }
}

fn is_list(v: &Value) -> bool {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// `a * b`: strings and lists repeated only while the result fits, eagerly (a lazy repeat
/// costs nothing to make and spins for minutes when printed).
fn of_mul(limits: &Limits, a: Value, b: Value) -> Result<Value, Error> {
    let max = limits.template_max_value;
    let (thing, n) = if let Some(n) = as_count(&b) {
        (&a, n)
    } else if let Some(n) = as_count(&a) {
        (&b, n)
    } else {
        return plain_op("a * b", a, b);
    };
    if let Some(s) = thing.as_str() {
        let len = s.len().saturating_mul(n);
        if len > max {
            return Err(value_error(limits, "a repeated string"));
        }
        charge(limits, len)?;
        return Ok(Value::from(s.repeat(n)));
    }
    if is_list(thing) {
        if n == 0 || thing.len() == Some(0) {
            return Ok(Value::from(Vec::<Value>::new()));
        }
        let cap = max / n;
        if weight(thing, cap) > cap {
            return Err(value_error(limits, "a repeated list"));
        }
        let items: Vec<Value> = thing.try_iter()?.collect();
        charge(limits, items.len().saturating_mul(16).saturating_mul(n))?;
        let mut out = Vec::with_capacity(items.len() * n);
        for _ in 0..n {
            out.extend(items.iter().cloned());
        }
        return Ok(Value::from(out));
    }
    plain_op("a * b", a, b)
}

/// `a + b`: strings and lists joined only while the result fits.
fn of_add(limits: &Limits, a: Value, b: Value) -> Result<Value, Error> {
    let max = limits.template_max_value;
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        let len = x.len().saturating_add(y.len());
        if len > max {
            return Err(value_error(limits, "a string made with +"));
        }
        charge(limits, len)?;
        return Ok(Value::from([x, y].concat()));
    }
    if is_list(&a) && is_list(&b) {
        let wa = weight(&a, max);
        let wb = weight(&b, max);
        if wa.saturating_add(wb) > max {
            return Err(value_error(limits, "a list made with +"));
        }
        charge(limits, wa + wb)?;
        // Made at once: a lazy concatenation of concatenations would make every later
        // walk over it pay for each level.
        let mut out: Vec<Value> = a.try_iter()?.collect();
        out.extend(b.try_iter()?);
        return Ok(Value::from(out));
    }
    plain_op("a + b", a, b)
}

/// `a ~ b`: both printed into a string that may not grow past the budget.
fn of_cat(limits: &Limits, a: Value, b: Value) -> Result<Value, Error> {
    // As minijinja's own `~` under the semi-strict mode: printing undefined is an error.
    if a.is_undefined() || b.is_undefined() {
        return Err(Error::from(ErrorKind::UndefinedError));
    }
    let mut out = CappedString::new(limits.template_max_value);
    if write!(out, "{a}{b}").is_err() {
        return Err(value_error(limits, "a string made with ~"));
    }
    charge(limits, out.text.len())?;
    Ok(Value::from(out.text))
}

/// The size of `v` printed, counted up to just past `cap`.
fn printed_len(v: &Value, cap: usize) -> usize {
    struct Count(usize, usize);
    impl fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 = self.0.saturating_add(s.len());
            if self.0 > self.1 {
                Err(fmt::Error)
            } else {
                Ok(())
            }
        }
    }
    let mut c = Count(0, cap);
    let _ = write!(c, "{v}");
    c.0
}

/// `join` with a bounded result.
fn join(limits: &Limits, value: &Value, joiner: Option<String>) -> Result<Value, Error> {
    let joiner = joiner.unwrap_or_default();
    let iter = value.try_iter().map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot join value of type {}", value.kind()),
        )
        .with_source(e)
    })?;
    let mut out = CappedString::new(limits.template_max_value);
    for (i, item) in iter.enumerate() {
        let ok = if i > 0 {
            out.write_str(&joiner).is_ok()
        } else {
            true
        };
        let ok = ok
            && match item.as_str() {
                Some(s) => out.write_str(s).is_ok(),
                None => write!(out, "{item}").is_ok(),
            };
        if !ok {
            return Err(value_error(limits, "the joined string"));
        }
    }
    charge(limits, out.text.len())?;
    Ok(Value::from(out.text))
}

fn count_limit(limits: &Limits) -> usize {
    limits.template_max_value / 16
}

fn check_count(limits: &Limits, filter: &str, count: usize) -> Result<(), Error> {
    if count > count_limit(limits) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "{filter}({count}): at most {} (TEMPLATE_MAX_VALUE / 16)",
                count_limit(limits)
            ),
        ));
    }
    Ok(())
}

/// Registers minijinja's own filter `$name`, which collects its input into a new list, behind
/// a check that the input counted as a list (a string's characters as items, see
/// `check_list`) stays within `TEMPLATE_MAX_VALUE`; `$what` names it in the error.
macro_rules! collecting {
    ($env:ident, $limits:ident, $name:literal, $what:literal;
     ($state:ident, $value:ident $(, $arg:ident: $ty:ty)*) => $call:expr) => {{
        let l = $limits.clone();
        $env.add_filter($name, move |$state: &State, $value: Value $(, $arg: $ty)*| {
            check_list(&l, $what, &$value)?;
            $call
        });
    }};
}

fn check_list(limits: &Limits, what: &str, value: &Value) -> Result<(), Error> {
    if weight(value, limits.template_max_value) > limits.template_max_value {
        return Err(value_error(limits, what));
    }
    // A string given to a filter that collects its items becomes one value per character:
    // about 16 bytes each beyond the text, so a 16 MiB string would be a list of hundreds of
    // megabytes.
    if let Some(text) = value.as_str() {
        check_pieces(limits, what, text, text.chars().count())?;
    }
    Ok(())
}

/// `text` cut into `pieces` strings (characters, words, lines): within the budget, counting
/// each piece's slot.
fn check_pieces(limits: &Limits, what: &str, text: &str, pieces: usize) -> Result<(), Error> {
    if pieces.saturating_mul(16).saturating_add(text.len()) > limits.template_max_value {
        return Err(value_error(limits, what));
    }
    Ok(())
}

/// Jinja's `indent(width=4, first=false, blank=false)`: every line but the first (unless
/// `first`) gets `width` spaces; blank lines stay blank (unless `blank`).
fn indent(text: &str, width: usize, first: bool, blank: bool) -> String {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    let pad = " ".repeat(width);
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let skip = (i == 0 && !first) || (line.is_empty() && !blank);
        if !skip {
            out.push_str(&pad);
        }
        out.push_str(line);
    }
    out
}

/// Registers the checked operators and filters on `env`.
pub fn install(env: &mut Environment<'static>, limits: &Arc<Limits>) {
    fn fold(
        limits: &Limits,
        values: Rest<Value>,
        op: fn(&Limits, Value, Value) -> Result<Value, Error>,
    ) -> Result<Value, Error> {
        let mut items = values.0.into_iter();
        let mut acc = items
            .next()
            .ok_or_else(|| Error::from(ErrorKind::MissingArgument))?;
        for next in items {
            acc = op(limits, acc, next)?;
        }
        Ok(acc)
    }
    let l = limits.clone();
    env.add_function("__of_mul", move |v: Rest<Value>| fold(&l, v, of_mul));
    let l = limits.clone();
    env.add_function("__of_add", move |v: Rest<Value>| fold(&l, v, of_add));
    let l = limits.clone();
    env.add_function("__of_cat", move |v: Rest<Value>| fold(&l, v, of_cat));
    let l = limits.clone();
    env.add_function("__of_tick", move |n: usize| {
        charge_captured(&l, n).map(|_| Value::from(""))
    });

    let l = limits.clone();
    env.add_filter("join", move |value: &Value, joiner: Option<String>| {
        join(&l, value, joiner)
    });
    let l = limits.clone();
    env.add_filter(
        "batch",
        move |state: &State, value: Value, count: usize, fill: Option<Value>| {
            check_count(&l, "batch", count)?;
            check_list(&l, "the batched list", &value)?;
            minijinja::filters::batch(state, value, count, fill)
        },
    );
    let l = limits.clone();
    env.add_filter(
        "slice",
        move |state: &State, value: Value, count: usize, fill: Option<Value>| {
            check_count(&l, "slice", count)?;
            check_list(&l, "the sliced list", &value)?;
            minijinja::filters::slice(state, value, count, fill)
        },
    );
    collecting!(env, limits, "list", "the list";
        (state, value) => minijinja::filters::list(state, value));
    collecting!(env, limits, "map", "the mapped list";
        (state, value, args: Rest<Value>) => minijinja::filters::map(state, value, args));
    collecting!(env, limits, "select", "the selected list";
        (state, value, test: Option<String>, args: Rest<Value>) =>
            minijinja::filters::select(state, value, test.map(Into::into), args));
    collecting!(env, limits, "reject", "the selected list";
        (state, value, test: Option<String>, args: Rest<Value>) =>
            minijinja::filters::reject(state, value, test.map(Into::into), args));
    collecting!(env, limits, "sort", "the sorted list";
        (state, value, kwargs: Kwargs) => minijinja::filters::sort(state, value, kwargs));
    collecting!(env, limits, "unique", "the list of unique items";
        (state, value, kwargs: Kwargs) => minijinja::filters::unique(state, value, kwargs));
    let l = limits.clone();
    env.add_filter(
        "split",
        move |value: &Value, sep: Option<Arc<str>>, maxsplits: Option<i64>| {
            if let Some(text) = value.as_str() {
                let pieces = match sep.as_deref() {
                    None => text.split_whitespace().count(),
                    Some("") => text.len() + 1,
                    Some(sep) => text.matches(sep).count() + 1,
                };
                // `split(sep, n)` stops after n cuts.
                let pieces = match maxsplits.and_then(|n| usize::try_from(n).ok()) {
                    Some(n) => pieces.min(n.saturating_add(1)),
                    None => pieces,
                };
                check_pieces(&l, "the split text", text, pieces)?;
            }
            minijinja::filters::split(value, sep, maxsplits)
        },
    );
    let l = limits.clone();
    env.add_filter("fromjson", move |text: String| {
        // Every JSON value becomes a template value of its own: each is preceded by a comma,
        // a colon or an opening bracket, or is the first (16 MB of `1,` was 8 million
        // numbers, and 900 MB).
        let pieces = text
            .bytes()
            .filter(|b| matches!(b, b',' | b':' | b'[' | b'{'))
            .count()
            + 1;
        check_pieces(&l, "the parsed JSON", &text, pieces)?;
        super::fromjson(text)
    });
    collecting!(env, limits, "selectattr", "the selected list";
        (state, value, attr: String, test: Option<String>, args: Rest<Value>) =>
            minijinja::filters::selectattr(state, value, attr.into(), test.map(Into::into), args));
    collecting!(env, limits, "rejectattr", "the selected list";
        (state, value, attr: String, test: Option<String>, args: Rest<Value>) =>
            minijinja::filters::rejectattr(state, value, attr.into(), test.map(Into::into), args));
    let l = limits.clone();
    env.add_filter("lines", move |value: &Value| {
        if let Some(text) = value.as_str() {
            check_pieces(&l, "the text's lines", text, text.lines().count())?;
        }
        minijinja::filters::lines(value)
    });
    let l = limits.clone();
    env.add_filter(
        "indent",
        move |value: String,
              width: Option<usize>,
              first: Option<bool>,
              blank: Option<bool>,
              kwargs: Kwargs| {
            let w = match width {
                Some(w) => w,
                None => kwargs.peek::<Option<usize>>("width")?.unwrap_or(4),
            };
            let lines = value.bytes().filter(|&b| b == b'\n').count() + 1;
            if w.saturating_mul(lines).saturating_add(value.len()) > l.template_max_value {
                return Err(value_error(&l, "the indented text"));
            }
            let first = match first {
                Some(f) => f,
                None => kwargs.get::<Option<bool>>("first")?.unwrap_or(false),
            };
            let blank = match blank {
                Some(b) => b,
                None => kwargs.get::<Option<bool>>("blank")?.unwrap_or(false),
            };
            let _ = kwargs.get::<Option<usize>>("width")?;
            kwargs.assert_all_used()?;
            Ok::<_, Error>(Value::from(indent(&value, w, first, blank)))
        },
    );
    let l = limits.clone();
    env.add_filter(
        "replace",
        move |state: &State, value: String, from: String, to: String| {
            let hits = if from.is_empty() {
                value.chars().count() + 1
            } else {
                value.matches(from.as_str()).count()
            };
            let grows = to.len().saturating_sub(from.len());
            if hits.saturating_mul(grows).saturating_add(value.len()) > l.template_max_value {
                return Err(value_error(&l, "the replaced text"));
            }
            let _ = state;
            Ok::<_, Error>(Value::from(value.replace(from.as_str(), &to)))
        },
    );
    let l = limits.clone();
    env.add_filter(
        "tojson",
        move |value: &Value, indent: Option<Value>, kwargs: Kwargs| {
            let given = match &indent {
                Some(i) => Some(i.clone()),
                None => kwargs.peek::<Option<Value>>("indent")?,
            };
            if let Some(n) = given.as_ref().and_then(as_count) {
                if n > 16 {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson(indent={n}): an indent of at most 16"),
                    ));
                }
            }
            check_list(&l, "the value given to tojson", value)?;
            let out = minijinja::filters::tojson(value, indent, kwargs)?;
            if out.as_str().map_or(0, str::len) > l.template_max_value {
                return Err(value_error(&l, "the JSON text"));
            }
            Ok(out)
        },
    );
    let l = limits.clone();
    env.add_filter(
        "format",
        move |state: &State, format: &Value, args: Rest<Value>| {
            // A width or precision is a number in the format string: bound them all.
            let text = format.as_str().unwrap_or_default();
            let widest = text
                .split(|c: char| !c.is_ascii_digit())
                .filter(|run| !run.is_empty())
                .map(|run| run.parse::<usize>().unwrap_or(usize::MAX))
                .max()
                .unwrap_or(0);
            if widest > 100_000 {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "format: a width or precision of {widest} is too large (at most 100000)"
                    ),
                ));
            }
            for a in args.iter() {
                if printed_len(a, l.template_max_value) > l.template_max_value {
                    return Err(value_error(&l, "a formatted argument"));
                }
            }
            minijinja::filters::format(state, format, args)
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_stops_past_the_cap() {
        let big = Value::from((0..1_000_000).collect::<Vec<i64>>());
        let w = weight(&big, 1000);
        assert!((1000..1100).contains(&w), "{w}");
        assert_eq!(weight(&Value::from("abc"), 10), 3);
    }

    /// A string whose characters a filter collects costs a slot per character: a 2 MB
    /// string is refused as a list under a 16 MiB budget (32 MB of values), a 500 KB one
    /// is not.
    #[test]
    fn a_string_collected_into_a_list_is_counted_per_character() {
        let t = crate::template::Templates::with_limits(Limits::default());
        let ctx = serde_json::json!({});
        for filter in [
            "list",
            "map('upper') | list",
            "sort",
            "unique | list",
            "select | list",
        ] {
            let src = format!("{{{{ ('x' * 2000000) | {filter} | length }}}}");
            let e = t.render(&src, &ctx).expect_err(&src);
            assert!(
                e.message.contains("TEMPLATE_MAX_VALUE"),
                "{src}: {}",
                e.message
            );
        }
        for filter in ["split", "lines"] {
            let sep = if filter == "split" { "x " } else { "x\\n" };
            let src = format!("{{{{ ('{sep}' * 1000000) | {filter} | length }}}}");
            let e = t.render(&src, &ctx).expect_err(&src);
            assert!(
                e.message.contains("TEMPLATE_MAX_VALUE"),
                "{src}: {}",
                e.message
            );
        }
        let ok = "{{ ('x' * 500000) | list | length }}";
        assert_eq!(t.render(ok, &ctx).unwrap(), "500000");
        let ok = "{{ ('a b ' * 100000) | split | length }}";
        assert_eq!(t.render(ok, &ctx).unwrap(), "200000");
        let ok = "{{ ('x,' * 2000000) | split(',', 1) | length }}";
        assert_eq!(t.render(ok, &ctx).unwrap(), "2");
        for src in [
            "{{ ('x' * 2000000) | selectattr('a', 'undefined') | list | length }}",
            "{{ ('[' ~ ('1,' * 1000000) ~ '1]') | fromjson | length }}",
        ] {
            let e = t.render(src, &ctx).expect_err(src);
            assert!(
                e.message.contains("TEMPLATE_MAX_VALUE"),
                "{src}: {}",
                e.message
            );
        }
        let ok = "{{ ('[' ~ ('1,' * 100000) ~ '1]') | fromjson | length }}";
        assert_eq!(t.render(ok, &ctx).unwrap(), "100001");
    }

    #[test]
    fn capped_string_refuses_past_its_cap() {
        let mut s = CappedString::new(4);
        assert!(s.write_str("abcd").is_ok());
        assert!(s.write_str("e").is_err());
        assert!(s.over);
        assert_eq!(s.text, "abcd");
    }
}
