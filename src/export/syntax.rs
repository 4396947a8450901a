//! How each language of an exported program writes what the program says: one
//! implementation of [`Syntax`] per language. What the program does, and in which order, is
//! written once, in `mod.rs`; the templates' translation is `emit.rs`.

use super::emit::{str_lit, Lang};
use std::fmt::Write as _;

/// A node's entry in the program's table of nodes, its parts already written.
pub(super) struct Entry<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    /// The node's prepare function.
    pub prepare: &'a str,
    /// The ids it needs, as literals.
    pub needs: &'a [String],
    pub for_each: &'a str,
    pub retry: &'a str,
    pub timeout: &'a str,
    pub continue_on_error: bool,
    pub extra_timeout: &'a str,
}

/// What differs between the languages of an exported program.
pub(super) trait Syntax: Sync {
    /// The language the templates are translated into.
    fn lang(&self) -> Lang;
    /// As error messages name it: "… cannot be exported to {name}".
    fn name(&self) -> &'static str;
    fn null(&self) -> &'static str;
    /// What starts a line comment.
    fn comment(&self) -> &'static str;
    /// The program's first line.
    fn shebang(&self) -> &'static str;
    /// How a user runs the program.
    fn run_command(&self) -> &'static str;
    /// What follows the program's header: the runtime.
    fn runtime(&self) -> String;
    /// A name of the runtime or of a field, given in snake case.
    fn name_of(&self, snake: &str) -> String;
    /// A top-level constant.
    fn constant(&self, name: &str, value: &str) -> String;
    /// A retry policy from its set fields (snake-case names and values).
    fn retry(&self, fields: &[(&str, String)]) -> String;
    /// A function of `ctx` computing a template, from its statements.
    fn template_function(&self, name: &str, body: &[String]) -> String;
    /// The function listing a node's `forEach` items.
    fn items_function(&self, name: &str, id: &str, items: &str) -> String;
    /// A node's prepare function: its description and its statements.
    fn prepare_function(&self, name: &str, doc: &str, lines: &[String]) -> String;
    /// Binds a field's value to a variable, with the field named in any error it raises.
    fn bind(&self, var: &str, field: &str, code: &str) -> Vec<String>;
    /// Returns the attempt: a function of the timeout making `call`.
    fn ret(&self, call: &str) -> String;
    /// Parses a transform's text as JSON: the statement, and the variable holding the value.
    fn parse_json_text(&self, id: &str) -> (String, &'static str);
    fn table_entry(&self, e: &Entry<'_>) -> String;
    /// The program's end: the table of nodes and the call of `main`.
    fn program_end(&self, table: &[String]) -> String;
}

/// Python 3, standard library only.
pub(super) struct Python;

/// Node.js, as an ES module.
pub(super) struct JavaScript;

const PY_RUNTIME: &str = include_str!("runtime.py");
const JS_RUNTIME: &str = include_str!("runtime.js");

impl Syntax for Python {
    fn lang(&self) -> Lang {
        Lang::Python
    }

    fn name(&self) -> &'static str {
        "python"
    }

    fn null(&self) -> &'static str {
        "None"
    }

    fn comment(&self) -> &'static str {
        "#"
    }

    fn shebang(&self) -> &'static str {
        "#!/usr/bin/env python3\n"
    }

    fn run_command(&self) -> &'static str {
        "python3 main.py"
    }

    fn runtime(&self) -> String {
        format!("\nfrom __future__ import annotations\n\n{PY_RUNTIME}")
    }

    fn name_of(&self, snake: &str) -> String {
        snake.to_string()
    }

    fn constant(&self, name: &str, value: &str) -> String {
        format!("{name} = {value}")
    }

    fn retry(&self, fields: &[(&str, String)]) -> String {
        let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("Retry({})", parts.join(", "))
    }

    fn template_function(&self, name: &str, body: &[String]) -> String {
        format!("def {name}(ctx):\n{}\n\n", body.join("\n"))
    }

    fn items_function(&self, name: &str, id: &str, items: &str) -> String {
        format!(
            "def {name}(ctx):\n    \"\"\"The items of {id}'s forEach: one step per item.\"\"\"\n    with field(None):\n        return {items}\n\n"
        )
    }

    fn prepare_function(&self, name: &str, doc: &str, lines: &[String]) -> String {
        let mut code = String::new();
        let _ = writeln!(
            code,
            "def {name}(ctx):\n    \"\"\"{}\"\"\"",
            doc.replace('\\', "\\\\").replace("\"\"\"", "\\\"\\\"\\\"")
        );
        code.push_str(&lines.join("\n"));
        code.push_str("\n\n\n");
        code
    }

    fn bind(&self, var: &str, field: &str, code: &str) -> Vec<String> {
        vec![
            format!("    with field({}):", str_lit(field)),
            format!("        {var} = {code}"),
        ]
    }

    fn ret(&self, call: &str) -> String {
        format!("    return lambda timeout: {call}")
    }

    fn parse_json_text(&self, id: &str) -> (String, &'static str) {
        (
            format!("    value = parse_json_text({}, value)", str_lit(id)),
            "value",
        )
    }

    fn table_entry(&self, e: &Entry<'_>) -> String {
        format!(
            "    Node({}, {}, {}, needs=[{}], for_each={}, retry={}, timeout={}, continue_on_error={}, extra_timeout={}),",
            str_lit(e.id),
            str_lit(e.kind),
            e.prepare,
            e.needs.join(", "),
            e.for_each,
            e.retry,
            e.timeout,
            if e.continue_on_error { "True" } else { "False" },
            e.extra_timeout
        )
    }

    fn program_end(&self, table: &[String]) -> String {
        format!(
            "NODES = [\n{}\n]\n\n\nif __name__ == \"__main__\":\n    sys.exit(main())\n",
            table.join("\n")
        )
    }
}

impl Syntax for JavaScript {
    fn lang(&self) -> Lang {
        Lang::Js
    }

    fn name(&self) -> &'static str {
        "node"
    }

    fn null(&self) -> &'static str {
        "null"
    }

    fn comment(&self) -> &'static str {
        "//"
    }

    fn shebang(&self) -> &'static str {
        "#!/usr/bin/env node\n"
    }

    fn run_command(&self) -> &'static str {
        "node main.js"
    }

    fn runtime(&self) -> String {
        format!("\n{JS_RUNTIME}")
    }

    fn name_of(&self, snake: &str) -> String {
        let mut out = String::with_capacity(snake.len());
        let mut upper = false;
        for c in snake.chars() {
            if c == '_' {
                upper = true;
            } else if upper {
                out.extend(c.to_uppercase());
                upper = false;
            } else {
                out.push(c);
            }
        }
        out
    }

    fn constant(&self, name: &str, value: &str) -> String {
        format!("const {name} = {value};")
    }

    fn retry(&self, fields: &[(&str, String)]) -> String {
        let parts: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}: {v}", self.name_of(k)))
            .collect();
        format!("{{ {} }}", parts.join(", "))
    }

    fn template_function(&self, name: &str, body: &[String]) -> String {
        format!("function {name}(ctx) {{\n{}\n}}\n\n", body.join("\n"))
    }

    fn items_function(&self, name: &str, id: &str, items: &str) -> String {
        format!(
            "/** The items of {id}'s forEach: one step per item. */\nfunction {name}(ctx) {{\n  return field(null, () => {items});\n}}\n\n"
        )
    }

    fn prepare_function(&self, name: &str, doc: &str, lines: &[String]) -> String {
        let mut code = String::new();
        let _ = writeln!(
            code,
            "/** {} */\nfunction {name}(ctx) {{",
            doc.replace("*/", "*\\/")
        );
        code.push_str(&lines.join("\n"));
        code.push_str("\n}\n\n");
        code
    }

    fn bind(&self, var: &str, field: &str, code: &str) -> Vec<String> {
        vec![format!(
            "  const {var} = field({}, () => ({code}));",
            str_lit(field)
        )]
    }

    fn ret(&self, call: &str) -> String {
        format!("  return (timeout) => {call};")
    }

    fn parse_json_text(&self, id: &str) -> (String, &'static str) {
        (
            format!("  const parsed = parseJsonText({}, value);", str_lit(id)),
            "parsed",
        )
    }

    fn table_entry(&self, e: &Entry<'_>) -> String {
        format!(
            "  {{ id: {}, kind: {}, prepare: {}, needs: [{}], forEach: {}, retry: {}, timeout: {}, continueOnError: {}, extraTimeout: {} }},",
            str_lit(e.id),
            str_lit(e.kind),
            e.prepare,
            e.needs.join(", "),
            e.for_each,
            e.retry,
            e.timeout,
            e.continue_on_error,
            e.extra_timeout
        )
    }

    fn program_end(&self, table: &[String]) -> String {
        format!(
            "const NODES = [\n{}\n];\n\n\nprocess.exitCode = await main();\n",
            table.join("\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn javascript_names_are_camel_case() {
        for (snake, camel) in [
            ("llm_node", "llmNode"),
            ("parse_json_text", "parseJsonText"),
            ("max_delay", "maxDelay"),
            ("as_list", "asList"),
            ("attempts", "attempts"),
        ] {
            assert_eq!(JavaScript.name_of(snake), camel);
            assert_eq!(Python.name_of(snake), snake);
        }
    }
}
