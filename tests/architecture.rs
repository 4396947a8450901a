//! The module arrows point one way: no top-level module of `src/` reaches back to a module
//! that (directly or through others) uses it. A cycle makes every change on it a change to
//! all of it; this test names the files of the first edge that closes one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// top-level module → the modules it uses → the files that use them.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn scan(root: &Path, dir: &Path, graph: &mut Graph) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            scan(root, &path, graph);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .to_string();
        let top = rel
            .split('/')
            .next()
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a source file is UTF-8");
        // A file's unit tests may use anything; only the code itself counts.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            let mut rest = line;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !used.is_empty() && used != top {
                    graph
                        .entry(top.clone())
                        .or_default()
                        .entry(used)
                        .or_default()
                        .insert(rel.clone());
                }
            }
        }
    }
}

/// A path of modules from `from` to `to`, if there is one.
fn path(graph: &Graph, from: &str, to: &str) -> Option<Vec<String>> {
    let mut stack = vec![(from.to_string(), vec![from.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, trail)) = stack.pop() {
        for next in graph.get(&node).map(|m| m.keys()).into_iter().flatten() {
            let mut t = trail.clone();
            t.push(next.clone());
            if next == to {
                return Some(t);
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), t));
            }
        }
    }
    None
}

fn cycles(root: &Path) -> (Graph, Vec<String>) {
    let mut graph = Graph::new();
    scan(root, root, &mut graph);
    let mut cycles = Vec::new();
    for (module, uses) in &graph {
        for (used, files) in uses {
            if let Some(back) = path(&graph, used, module) {
                cycles.push(format!(
                    "{module} → {used} (in {}) closes the cycle {}",
                    files.iter().cloned().collect::<Vec<_>>().join(", "),
                    back.join(" → ")
                ));
            }
        }
    }
    (graph, cycles)
}

#[test]
fn top_level_modules_have_no_import_cycles() {
    let (graph, cycles) = cycles(Path::new("src"));
    assert!(
        graph.get("engine").is_some_and(|m| m.contains_key("store")),
        "the scan found the engine's use of the store: it reads the source"
    );
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_check_finds_a_cycle_through_a_third_module_and_ignores_comments_and_tests() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("engine")).unwrap();
    std::fs::write(root.join("lib.rs"), "pub mod engine;").unwrap();
    std::fs::write(root.join("engine/mod.rs"), "use crate::store::Store;\n").unwrap();
    std::fs::write(
        root.join("store.rs"),
        "pub fn f() { crate::limits::x(); }\n",
    )
    .unwrap();
    std::fs::write(
        root.join("config.rs"),
        "// see crate::engine\n#[cfg(test)]\nmod tests { use crate::engine::Engine; }\n",
    )
    .unwrap();
    let (_, found) = cycles(root);
    assert!(found.is_empty(), "{found:?}");
    std::fs::write(
        root.join("limits.rs"),
        "pub type E = crate::engine::Engine;\n",
    )
    .unwrap();
    let (_, found) = cycles(root);
    assert!(
        found
            .iter()
            .any(|c| c.starts_with("limits → engine (in limits.rs)")),
        "{found:?}"
    );
    assert!(!found.iter().any(|c| c.starts_with("config")), "{found:?}");
}
