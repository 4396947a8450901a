//! The validator: every problem of a blueprint document, each with its path.
//!
//! Two passes over the raw JSON (never the typed model, so a broken document still gets a full
//! report): the structural walk driven by the JSON Schema ([`super::walk`]), then the checks a
//! schema cannot express — unique ids, `needs` that name real nodes, cycles, templates that
//! parse and read only what exists when they run, declared test variables.

use super::problem::{did_you_mean, suggestion, JPath, Problem};
use super::schema::schema_ref;
use super::walk::{Site, SiteKind, Walker};
use crate::template::Templates;
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

/// What templates can read at their top level.
const CONTEXT_NAMES: [&str; 5] = ["vars", "nodes", "item", "index", "run"];
/// What `nodes.ID` holds.
const NODE_FIELDS: [&str; 2] = ["output", "status"];

/// Every problem of `doc`, in document order.
pub fn validate(doc: &Value) -> Vec<Problem> {
    super::problem::with_suggestion_budget(|| validate_within_budget(doc))
}

fn validate_within_budget(doc: &Value) -> Vec<Problem> {
    let mut walker = Walker::new(schema_ref());
    walker.run(doc);
    let mut found = walker.problems;
    if let Some(root) = doc.as_object() {
        let graph = Graph::new(root);
        graph.check(&mut found);
        let declared = declared_variables(root);
        TemplateCheck {
            templates: Templates::new(),
            graph: &graph,
            declared: &declared,
            stamp: vec![0; graph.nodes.len()],
            round: 0,
            stack: Vec::new(),
        }
        .run(&walker.sites, &mut found);
        check_test_variables(root, &declared, &mut found);
    }
    in_document_order(doc, found)
}

/// Parses a duration with a unit ("500ms", "30s", "5m", "1h 30m").
///
/// A bare number is refused with the fix: `"300"` → "add a unit: 300s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.parse::<f64>().is_ok() {
        return Err(format!("invalid duration \"{s}\": add a unit: {t}s"));
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration \"{s}\": {e} (e.g. 500ms, 30s, 5m, 1h 30m)"))?;
    if d > crate::limits::MAX_DURATION {
        return Err(format!(
            "duration \"{s}\" is longer than 30 days, the longest a blueprint may wait: use a \
             schedule for anything slower"
        ));
    }
    Ok(d)
}

/// Checks a `schedule`: 5 cron fields (or an `@daily`-style alias).
pub(crate) fn check_cron(expr: &str) -> Result<(), String> {
    const EXAMPLE: &str =
        "5 fields: minute hour day-of-month month day-of-week, e.g. \"17 */6 * * *\" (minute 17 of every 6th hour)";
    let t = expr.trim();
    if !t.starts_with('@') {
        let fields = t.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "invalid cron expression \"{expr}\": it has {fields} field(s), expected {EXAMPLE}"
            ));
        }
    }
    let cron = croner::Cron::new(t)
        .parse()
        .map_err(|e| format!("invalid cron expression \"{expr}\": {e}; expected {EXAMPLE}"))?;
    // A well-formed expression can name no real date ("0 0 30 2 *"): such a schedule would
    // never fire, silently, so it is refused here.
    let start = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    if cron.find_next_occurrence(&start, false).is_err() {
        return Err(format!(
            "cron expression \"{expr}\" never fires (no such date): fix its day-of-month and month fields"
        ));
    }
    Ok(())
}

/// The node graph as written (ids and needs), tolerant of any malformation.
struct Graph {
    /// Per node, in document order: its id (if a string) and its `needs` strings with their
    /// positions.
    nodes: Vec<NodeInfo>,
    /// Each id's first node.
    first: HashMap<String, usize>,
    /// Per node, the nodes it needs directly (known, not itself).
    deps: Vec<Vec<usize>>,
}

struct NodeInfo {
    id: Option<String>,
    needs: Vec<(usize, String)>,
    for_each: bool,
}

impl Graph {
    fn new(root: &Map<String, Value>) -> Self {
        let nodes: Vec<NodeInfo> = root
            .get("nodes")
            .and_then(Value::as_array)
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| NodeInfo {
                        id: n.get("id").and_then(Value::as_str).map(str::to_string),
                        needs: n
                            .get("needs")
                            .and_then(Value::as_array)
                            .map(|needs| {
                                needs
                                    .iter()
                                    .enumerate()
                                    .filter_map(|(i, x)| x.as_str().map(|s| (i, s.to_string())))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        for_each: n.get("forEach").is_some(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut first = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            if let Some(id) = &n.id {
                first.entry(id.clone()).or_insert(i);
            }
        }
        let deps = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.needs
                    .iter()
                    .filter_map(|(_, id)| first.get(id).copied())
                    .filter(|&d| d != i)
                    .collect()
            })
            .collect();
        Graph { nodes, first, deps }
    }

    fn ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().filter_map(|n| n.id.as_deref())
    }

    fn check(&self, out: &mut Vec<(JPath, String)>) {
        let nodes = JPath::root().key("nodes");
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(id) = &n.id else { continue };
            if let Some(&f) = self.first.get(id) {
                if f != i {
                    let msg = format!("duplicate id \"{id}\" (first at nodes[{f}])");
                    out.push((nodes.index(i).key("id"), msg));
                }
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            for (k, need) in &n.needs {
                let path = nodes.index(i).key("needs").index(*k);
                if n.id.as_deref() == Some(need.as_str()) {
                    out.push((path, format!("node \"{need}\" needs itself")));
                } else if !self.first.contains_key(need) {
                    let msg = format!("unknown node \"{need}\"{}", suggestion(need, self.ids()));
                    out.push((path, msg));
                }
            }
        }
        for cycle in self.cycles() {
            let names: Vec<&str> = cycle
                .iter()
                .map(|&i| self.nodes[i].id.as_deref().unwrap_or("?"))
                .collect();
            let msg = format!(
                "cycle {} → {} (each needs the next, so none of them can start)",
                names.join(" → "),
                names.first().copied().unwrap_or("?")
            );
            out.push((nodes.clone(), msg));
        }
    }

    /// One cycle per strongly connected tangle, found by an iterative depth-first search (a
    /// recursive one could overflow the stack on a hostile 100,000-node chain).
    fn cycles(&self) -> Vec<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Color {
            White,
            Gray,
            Black,
        }
        let n = self.nodes.len();
        let deps = &self.deps;
        let mut color = vec![Color::White; n];
        let mut seen: HashSet<Vec<usize>> = HashSet::new();
        let mut cycles = Vec::new();
        for start in 0..n {
            if color[start] != Color::White {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            color[start] = Color::Gray;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                if let Some(&dep) = deps[node].get(*next) {
                    *next += 1;
                    match color[dep] {
                        Color::White => {
                            color[dep] = Color::Gray;
                            stack.push((dep, 0));
                        }
                        Color::Gray => {
                            let from = stack.iter().position(|&(x, _)| x == dep).unwrap_or(0);
                            let mut cycle: Vec<usize> =
                                stack[from..].iter().map(|&(x, _)| x).collect();
                            // Start each cycle at its first node in the document, so the
                            // same cycle is always told the same way.
                            if let Some(min_pos) = cycle
                                .iter()
                                .enumerate()
                                .min_by_key(|&(_, &x)| x)
                                .map(|(p, _)| p)
                            {
                                cycle.rotate_left(min_pos);
                            }
                            if seen.insert(cycle.clone()) {
                                cycles.push(cycle);
                            }
                        }
                        Color::Black => {}
                    }
                } else {
                    color[node] = Color::Black;
                    stack.pop();
                }
            }
        }
        cycles
    }
}

fn declared_variables(root: &Map<String, Value>) -> Vec<String> {
    root.get("variables")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Checks every template site: syntax, and that each name it reads will exist.
struct TemplateCheck<'g> {
    templates: Templates,
    graph: &'g Graph,
    declared: &'g [String],
    /// Per node, the search round that last visited it: a reachability search marks what it
    /// saw without allocating a set per node (a set of all upstream nodes cached per node
    /// made a 4,000-node chain cost 133 MB and seconds).
    stamp: Vec<u32>,
    round: u32,
    stack: Vec<usize>,
}

impl TemplateCheck<'_> {
    fn run(&mut self, sites: &[Site], out: &mut Vec<(JPath, String)>) {
        for site in sites {
            let parsed = match site.kind {
                SiteKind::Expression => self.templates.referenced_expr(&site.text),
                SiteKind::Template | SiteKind::ForEach => self.templates.referenced(&site.text),
            };
            let refs = match parsed {
                Ok(refs) => refs,
                Err(msg) => {
                    out.push((site.path.clone(), format!("template error: {msg}")));
                    continue;
                }
            };
            for r in &refs {
                if let Some(msg) = self.check_ref(r, &refs, site) {
                    out.push((site.path.clone(), msg));
                }
            }
        }
    }

    /// Whether `target` is among the transitive needs of `i`: the direct needs first (what
    /// nearly every template reads), then a search that stops as soon as it finds it.
    fn needs_transitively(&mut self, i: usize, target: usize) -> bool {
        let deps = &self.graph.deps;
        if deps[i].contains(&target) {
            return true;
        }
        self.round = self.round.wrapping_add(1);
        if self.round == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.round = 1;
        }
        let round = self.round;
        self.stack.clear();
        self.stack.extend(&deps[i]);
        while let Some(d) = self.stack.pop() {
            if d == target {
                return true;
            }
            if self.stamp[d] == round {
                continue;
            }
            self.stamp[d] = round;
            self.stack.extend(&deps[d]);
        }
        false
    }

    /// A message when `reference` (a dotted path) reads something that will not exist.
    fn check_ref(
        &mut self,
        reference: &str,
        all: &BTreeSet<String>,
        site: &Site,
    ) -> Option<String> {
        let mut segs = reference.split('.');
        let head = segs.next().unwrap_or_default();
        let node = site.path.node_index();
        match head {
            "vars" => {
                let name = segs.next()?;
                if self.declared.iter().any(|d| d == name) {
                    return None;
                }
                if self.declared.is_empty() {
                    return Some(format!(
                        "unknown variable \"{name}\" (no variables are declared: add it to \"variables\")"
                    ));
                }
                Some(format!(
                    "unknown variable \"{name}\"{} (declared: {})",
                    suggestion(name, self.declared.iter().map(String::as_str)),
                    self.declared.join(", ")
                ))
            }
            "nodes" => {
                let id = segs.next()?;
                // `nodes.x` alone is also reported when `nodes.x.output` is: say it once.
                // The names are sorted: any longer path with this prefix comes right after it.
                let prefix = format!("{reference}.");
                if all
                    .range(prefix.clone()..)
                    .next()
                    .is_some_and(|o| o.starts_with(&prefix))
                {
                    return None;
                }
                let Some(&target) = self.graph.first.get(id) else {
                    return Some(format!(
                        "unknown node \"{id}\"{}",
                        suggestion(id, self.graph.ids())
                    ));
                };
                if let Some(field) = segs.next() {
                    if !NODE_FIELDS.contains(&field) {
                        return Some(format!(
                            "unknown field \"{field}\" of nodes.{id}{} (a node has output and status)",
                            suggestion(field, NODE_FIELDS)
                        ));
                    }
                }
                let i = node?;
                if target == i {
                    return Some(format!(
                        "reads nodes.{id}, its own output, which does not exist while it runs"
                    ));
                }
                if !self.needs_transitively(i, target) {
                    return Some(format!(
                        "reads nodes.{id}, but \"{id}\" is not in this node's needs, so its output \
                         would not exist yet: add it to needs"
                    ));
                }
                None
            }
            "item" | "index" => {
                if site.kind == SiteKind::ForEach {
                    return Some(format!(
                        "forEach cannot read \"{head}\": it is what defines the items"
                    ));
                }
                let has_for_each = node
                    .and_then(|i| self.graph.nodes.get(i))
                    .is_some_and(|n| n.for_each);
                if has_for_each {
                    None
                } else {
                    Some(format!(
                        "\"{head}\" is only defined in a node with forEach (add forEach, or read vars / nodes instead)"
                    ))
                }
            }
            "run" => None,
            other => Some(format!(
                "unknown name \"{other}\"{} (templates can read vars, nodes, item, index and run)",
                suggestion(other, CONTEXT_NAMES)
            )),
        }
    }
}

fn check_test_variables(
    root: &Map<String, Value>,
    declared: &[String],
    out: &mut Vec<(JPath, String)>,
) {
    let Some(vars) = root
        .get("testConfig")
        .and_then(|t| t.get("variables"))
        .and_then(Value::as_array)
    else {
        return;
    };
    let base = JPath::root().key("testConfig").key("variables");
    for (i, v) in vars.iter().enumerate() {
        let Some(key) = v.get("key").and_then(Value::as_str) else {
            continue;
        };
        if declared.iter().any(|d| d == key) {
            continue;
        }
        let hint = did_you_mean(key, declared.iter().map(String::as_str))
            .map(|c| format!(" — did you mean \"{c}\"?"))
            .unwrap_or_default();
        let list = if declared.is_empty() {
            "no variables are declared".to_string()
        } else {
            format!("declared: {}", declared.join(", "))
        };
        out.push((
            base.index(i).key("key"),
            format!("\"{key}\" is not a declared variable{hint} ({list})"),
        ));
    }
}

/// Sorts problems by where their path first appears in the document (a preorder walk); a path
/// that does not exist (a missing field) sorts at its nearest existing ancestor. Stable, so
/// problems at one place keep the order they were found in.
///
/// Only the places on the way to a problem are numbered (the walk enters no other subtree), so
/// the cost follows the problems, not the document: a valid 4 MB blueprint costs nothing here.
fn in_document_order(doc: &Value, found: Vec<(JPath, String)>) -> Vec<Problem> {
    if found.is_empty() {
        return Vec::new();
    }
    // Every problem's path and its ancestors.
    let mut wanted: HashSet<JPath> = HashSet::new();
    for (p, _) in &found {
        let mut cur = Some(p.clone());
        while let Some(c) = cur {
            cur = c.parent();
            if !wanted.insert(c) {
                break; // its ancestors are in already
            }
        }
    }
    let mut order: HashMap<JPath, usize> = HashMap::new();
    let mut todo = vec![(JPath::root(), doc)];
    while let Some((path, v)) = todo.pop() {
        // Push children in reverse so they pop in document order; numbering only the visited
        // places keeps their relative document order, which is all the sort needs.
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate().rev() {
                    let child = path.index(i);
                    if wanted.contains(&child) {
                        todo.push((child, item));
                    }
                }
            }
            Value::Object(obj) => {
                let children: Vec<_> = obj.iter().collect();
                for (k, item) in children.into_iter().rev() {
                    let child = path.key(k);
                    if wanted.contains(&child) {
                        todo.push((child, item));
                    }
                }
            }
            _ => {}
        }
        let n = order.len();
        order.insert(path, n);
    }
    let rank = |p: &JPath| -> usize {
        let mut cur = Some(p.clone());
        while let Some(c) = cur {
            if let Some(&r) = order.get(&c) {
                return r;
            }
            cur = c.parent();
        }
        0
    };
    let mut ranked: Vec<(usize, JPath, String)> =
        found.into_iter().map(|(p, m)| (rank(&p), p, m)).collect();
    ranked.sort_by_key(|(r, _, _)| *r);
    ranked
        .into_iter()
        .map(|(_, p, m)| Problem::new(p.to_string(), m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(doc: Value) -> Vec<String> {
        validate(&doc).iter().map(ToString::to_string).collect()
    }

    fn base() -> Value {
        json!({
            "name": "t",
            "variables": { "TOPICS": ["a"] },
            "nodes": [
                { "id": "a", "type": "transform", "template": "{{ vars.TOPICS }}" },
                { "id": "b", "type": "transform", "needs": ["a"], "template": "{{ nodes.a.output }}" }
            ]
        })
    }

    #[test]
    fn a_good_document_has_no_problems() {
        assert_eq!(messages(base()), Vec::<String>::new());
    }

    #[test]
    fn durations_need_units() {
        assert!(parse_duration("300")
            .unwrap_err()
            .contains("add a unit: 300s"));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cron_needs_five_valid_fields() {
        assert!(check_cron("17 */6 * * *").is_ok());
        assert!(check_cron("@daily").is_ok());
        let e = check_cron("17 */6 * *").unwrap_err();
        assert!(e.contains("\"17 */6 * *\"") && e.contains("e.g."), "{e}");
        assert!(check_cron("0 0 0 * * *").is_err());
        assert!(check_cron("99 * * * *").is_err());
        for weird in [
            "",
            "@",
            "@nope",
            "* * * * ,",
            "-/-",
            "*/0 * * * *",
            "L L L L L",
            "# # # # #",
        ] {
            let _ = check_cron(weird); // must not panic
        }
    }

    #[test]
    fn cycles_are_named_in_order() {
        let mut doc = base();
        doc["nodes"] = json!([
            { "id": "a", "type": "delay", "duration": "1s", "needs": ["c"] },
            { "id": "b", "type": "delay", "duration": "1s", "needs": ["a"] },
            { "id": "c", "type": "delay", "duration": "1s", "needs": ["b"] }
        ]);
        let m = messages(doc);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("nodes: cycle a → c → b → a"), "{m:?}");
    }

    #[test]
    fn long_chains_do_not_overflow_the_stack() {
        let nodes: Vec<Value> = (0..20_000)
            .map(|i| {
                let needs = if i > 0 {
                    vec![format!("n{}", i - 1)]
                } else {
                    vec![]
                };
                json!({ "id": format!("n{i}"), "type": "delay", "duration": "1s", "needs": needs })
            })
            .collect();
        let doc = json!({ "name": "long", "nodes": nodes });
        assert!(validate(&doc).is_empty());
    }
}
