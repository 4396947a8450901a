//! Bounded fuzzing in the normal test run: templates generated from a grammar rendered over
//! generated values (3,000), blueprints generated and mutated through parse + validate
//! (1,000), and generated blueprints run by the engine on a real SQLite file (600, half of
//! them built to pass validation). A fixed seed and case counts keep it reproducible and
//! under a minute on two busy cores; `FUZZ_CASES` (one count for all three) and `FUZZ_SEED`
//! run it longer or elsewhere. A failure prints the seed and the input.
//!
//! What must hold for every input: no panic, and a verdict (a render's `Ok`/`Err`, a list of
//! problems). The budgets are small here, so a template that grows gets stopped quickly.
//!
//! A grammar-driven generator of our own rather than `proptest`: the inputs that matter are
//! shaped by Jinja's grammar and by the sizes that hurt (2**31, 18446744073709551615, 1e12),
//! which a hand-written generator states directly, and it costs no new dependency.

mod common;

use omniflow::blueprint::{load_value, validate};
use omniflow::limits::Limits;
use omniflow::template::Templates;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn cases(default: usize) -> usize {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0F_1A_5E_ED)
}

const BIG: [&str; 8] = [
    "2**31",
    "2**63",
    "18446744073709551615",
    "1000000000000",
    "100000",
    "0",
    "-1",
    "3",
];

fn pick<'a>(r: &mut StdRng, xs: &[&'a str]) -> &'a str {
    xs[r.gen_range(0..xs.len())]
}

fn atom(r: &mut StdRng) -> String {
    match r.gen_range(0..10) {
        0 => pick(r, &BIG).to_string(),
        1 => "'x'".into(),
        2 => "[1, 2, 3]".into(),
        3 => "[]".into(),
        4 => "vars.L".into(),
        5 => "vars.S".into(),
        6 => "vars.M".into(),
        7 => format!("range({})", pick(r, &["3", "100", "100000", "1000000"])),
        8 => "ns.v".into(),
        _ => "none".into(),
    }
}

fn expr(r: &mut StdRng, depth: u32) -> String {
    if depth == 0 || r.gen_bool(0.3) {
        return atom(r);
    }
    let d = depth - 1;
    match r.gen_range(0..8) {
        0..=2 => format!(
            "({} {} {})",
            expr(r, d),
            pick(r, &["~", "+", "*", "-", "//", "**", "==", "in", "and"]),
            expr(r, d)
        ),
        3..=5 => {
            let filter = match r.gen_range(0..16) {
                0 => format!("batch({})", pick(r, &BIG)),
                1 => format!("join({})", expr(r, d)),
                2 => "list".into(),
                3 => format!("slice({})", pick(r, &BIG)),
                4 => format!("indent({})", pick(r, &BIG)),
                5 => format!("replace('', {})", expr(r, d)),
                6 => format!("tojson(indent={})", pick(r, &BIG)),
                7 => format!("truncate({})", pick(r, &BIG)),
                8 => "length".into(),
                9 => "upper".into(),
                10 => "sort".into(),
                11 => "unique".into(),
                12 => "string".into(),
                13 => "first".into(),
                14 => format!("default({})", expr(r, d)),
                _ => "reverse".into(),
            };
            format!("({} | {filter})", expr(r, d))
        }
        6 => format!("{}[{}]", expr(r, d), pick(r, &["0", "-1", "1:", "::2"])),
        _ => format!("({} if {} else {})", expr(r, d), expr(r, d), expr(r, d)),
    }
}

fn template(r: &mut StdRng, depth: u32) -> String {
    let mut out = String::from("{% set ns = namespace(v='ab') %}");
    for _ in 0..r.gen_range(1..4) {
        let part = match r.gen_range(0..7) {
            0 => format!("{{{{ {} }}}}", expr(r, depth)),
            1 => format!(
                "{{% for i in {} %}}{}{{% endfor %}}",
                expr(r, 1),
                template_body(r, depth)
            ),
            2 => format!("{{% set ns.v = {} %}}", expr(r, depth)),
            3 => format!(
                "{{% set c %}}{}{{% endset %}}{{{{ c }}}}",
                template_body(r, depth)
            ),
            4 => format!(
                "{{% macro m(a) %}}{}{{% endmacro %}}{{{{ m({}) }}}}",
                template_body(r, depth),
                expr(r, 1)
            ),
            5 => format!(
                "{{% if {} %}}yes{{% else %}}{}{{% endif %}}",
                expr(r, depth),
                template_body(r, depth)
            ),
            _ => "raw text ".repeat(r.gen_range(1..50)),
        };
        out.push_str(&part);
    }
    out
}

fn template_body(r: &mut StdRng, depth: u32) -> String {
    match r.gen_range(0..3) {
        0 => format!("{{{{ {} }}}}", expr(r, depth.saturating_sub(1))),
        1 => format!("{{% set ns.v = ns.v ~ {} %}}", expr(r, 1)),
        _ => "0123456789".repeat(r.gen_range(1..20)),
    }
}

#[test]
fn generated_templates_render_or_fail_cleanly() {
    let n = cases(3000);
    let seed = seed();
    let t = Templates::with_limits(Limits {
        template_fuel: 100_000,
        template_max_output: 256 * 1024,
        template_max_value: 256 * 1024,
        ..Limits::default()
    });
    let ctx = json!({ "vars": { "L": [1, 2, 3], "S": "hello", "M": { "a": [1, {"b": "c"}] } } });
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut ok, mut failed) = (0, 0);
    for case in 0..n {
        let src = template(&mut rng, 3);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = t.referenced(&src);
            t.render(&src, &ctx)
        }));
        match result {
            Ok(Ok(out)) => {
                assert!(out.len() <= 256 * 1024, "case {case} (seed {seed}): {src}");
                ok += 1;
            }
            Ok(Err(_)) => failed += 1,
            Err(_) => panic!("case {case} (seed {seed}) panicked: {src}"),
        }
    }
    eprintln!("{n} generated templates: {ok} rendered, {failed} failed cleanly");
    assert_eq!(ok + failed, n);
}

fn duration(r: &mut StdRng) -> Value {
    json!(pick(
        r,
        &[
            "1s",
            "213503982334601d",
            "18446744073709551615s",
            "0s",
            "300",
            "-1s",
            "1y",
            "30d",
            "31d",
            "",
            "1.5h"
        ]
    ))
}

fn node(r: &mut StdRng, i: usize, n: usize) -> Value {
    let id = format!("n{i}");
    let mut needs = Vec::new();
    for _ in 0..r.gen_range(0..3) {
        needs.push(json!(format!("n{}", r.gen_range(0..n.max(1) + 1))));
    }
    let mut node = match r.gen_range(0..6) {
        0 => json!({ "type": "transform", "template": template(r, 2) }),
        1 => {
            json!({ "type": "llm", "prompt": template(r, 1), "retry": { "attempts": 3, "backoff": duration(r) } })
        }
        2 => json!({ "type": "delay", "duration": duration(r) }),
        3 => json!({ "type": "condition", "expression": expr(r, 2) }),
        4 => {
            json!({ "type": "transform", "template": "x", "forEach": format!("{{{{ {} }}}}", expr(r, 2)) })
        }
        _ => json!({ "type": pick(r, &["http", "notify", "bogus"]), "url": "{{ vars.S }}" }),
    };
    node["id"] = json!(id);
    node["needs"] = json!(needs);
    if r.gen_bool(0.2) {
        node["timeout"] = duration(r);
    }
    node
}

fn mutate(r: &mut StdRng, doc: &mut Value) {
    match r.gen_range(0..6) {
        0 => doc["nodes"] = json!("not a list"),
        1 => doc["timeout"] = duration(r),
        2 => {
            let mut deep = json!(1);
            for _ in 0..r.gen_range(1..60) {
                deep = json!([deep]);
            }
            doc["variables"]["D"] = deep;
        }
        3 => doc["name"] = json!(null),
        4 => doc["schedule"] = json!(pick(r, &["* * * * *", "0 0 30 2 *", "nonsense", "@daily"])),
        _ => {}
    }
}

/// A generated blueprint: mostly a handful of nodes, one in ten a few hundred, then mutated.
fn blueprint(rng: &mut StdRng, case: usize) -> Value {
    let count = match rng.gen_range(0..10) {
        0 => rng.gen_range(100..400),
        _ => rng.gen_range(0..8),
    };
    let nodes: Vec<Value> = (0..count).map(|i| node(rng, i, count)).collect();
    let mut doc = json!({
        "name": format!("fuzz-{case}"),
        "variables": { "L": [1, 2, 3], "S": "s", "M": {} },
        "nodes": nodes,
    });
    mutate(rng, &mut doc);
    doc
}

#[test]
fn generated_blueprints_validate_without_panicking() {
    let n = cases(1000);
    let seed = seed() ^ 0xB1;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rejected = 0;
    for case in 0..n {
        let doc = blueprint(&mut rng, case);
        let text = doc.to_string();
        let result = std::panic::catch_unwind(|| {
            let problems = validate(&doc);
            let loaded = load_value(doc.clone());
            (problems, loaded.is_ok())
        });
        match result {
            Ok((problems, loaded)) => {
                assert_eq!(
                    problems.is_empty(),
                    loaded,
                    "case {case} (seed {seed}): validate and load disagree: {problems:?}"
                );
                if !problems.is_empty() {
                    rejected += 1;
                }
            }
            Err(_) => panic!(
                "case {case} (seed {seed}) panicked on: {}",
                &text[..text.len().min(2000)]
            ),
        }
    }
    eprintln!("{n} generated blueprints: {rejected} rejected with problems, none panicked");
}

/// A blueprint generated to pass validation (needs point back, durations are valid) so that
/// its templates, fan-outs, conditions, delays and retries reach the engine.
fn runnable(r: &mut StdRng, case: usize) -> Value {
    let count = match r.gen_range(0..10) {
        0 => r.gen_range(20..60),
        _ => r.gen_range(1..8),
    };
    let wait = |r: &mut StdRng| json!(pick(r, &["0s", "10ms", "1s", "1h", "30d"]));
    let nodes: Vec<Value> = (0..count)
        .map(|i| {
            let mut node = match r.gen_range(0..7) {
                0 | 1 => json!({ "type": "transform", "template": template(r, 2) }),
                2 => json!({ "type": "llm", "prompt": template(r, 1),
                             "retry": { "attempts": r.gen_range(1..4), "backoff": wait(r),
                                        "factor": pick(r, &["1", "2", "1e300"]).parse::<f64>().unwrap() } }),
                3 => json!({ "type": "delay", "duration": wait(r) }),
                // `ns` is set by a template's first tag; outside one it does not exist.
                4 => json!({ "type": "condition",
                             "expression": expr(r, 2).replace("ns.v", "vars.S") }),
                5 => json!({ "type": "transform", "template": "{{ item }}",
                             "forEach": format!("{{{{ {} }}}}", expr(r, 2).replace("ns.v", "vars.S")) }),
                _ => json!({ "type": "notify", "channel": "telegram", "text": template(r, 1) }),
            };
            node["id"] = json!(format!("n{i}"));
            if i > 0 {
                let needs: Vec<String> = (0..r.gen_range(0..3))
                    .map(|_| format!("n{}", r.gen_range(0..i)))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                node["needs"] = json!(needs);
            }
            if r.gen_bool(0.2) {
                node["timeout"] = wait(r);
            }
            if r.gen_bool(0.2) {
                node["continueOnError"] = json!(true);
            }
            node
        })
        .collect();
    let mut doc = json!({
        "name": format!("run-{case}"),
        "variables": { "L": [1, 2, 3], "S": "s", "M": {} },
        "nodes": nodes,
    });
    if r.gen_bool(0.2) {
        doc["timeout"] = wait(r);
    }
    doc
}

/// The generated blueprints that validate, run: sandboxed, with 30 % injected failures, waits
/// scaled down ten million times (a 30-day delay takes a quarter of a second) and small
/// budgets. Every run must end with a verdict (a hang fails the test after a minute) and none
/// may end in a contained panic: the engine turns a panic into the run's failure, and the
/// message names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_blueprints_run_to_a_verdict() {
    use omniflow::engine::RunRequest;
    use omniflow::events::RunStatus;
    let n = cases(600);
    let seed = seed() ^ 0x5A;
    let env = common::engine(
        &[
            ("OMNIFLOW_TIME_SCALE", "0.0000001"),
            ("TEMPLATE_FUEL", "100000"),
            ("TEMPLATE_MAX_OUTPUT", "262144"),
            ("TEMPLATE_MAX_VALUE", "262144"),
            ("MAX_ITEMS", "1000"),
        ],
        8,
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut rejected, mut refused, mut success, mut failed) = (0, 0, 0, 0);
    for case in 0..n {
        // Half mutated (mostly refused), half built to pass validation.
        let doc = if case % 2 == 0 {
            blueprint(&mut rng, case)
        } else {
            runnable(&mut rng, case)
        };
        let text = doc.to_string();
        let Ok(bp) = load_value(doc) else {
            rejected += 1;
            continue;
        };
        let req = RunRequest {
            sandbox: true,
            simulate_failures: 0.3,
            seed: Some(case as u64),
            ..Default::default()
        };
        let handle = match env.engine.start(std::sync::Arc::new(bp), req) {
            Ok(h) => h,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), handle.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "case {case} (seed {seed}) hung: {}",
                    &text[..text.len().min(2000)]
                )
            });
        let errors: Vec<&str> = outcome
            .error
            .iter()
            .map(String::as_str)
            .chain(outcome.steps.iter().filter_map(|s| s.error.as_deref()))
            .collect();
        assert!(
            !errors.iter().any(|e| e.contains("panicked")),
            "case {case} (seed {seed}) panicked: {errors:?} on {}",
            &text[..text.len().min(2000)]
        );
        match outcome.status {
            RunStatus::Success => success += 1,
            _ => failed += 1,
        }
    }
    eprintln!(
        "{n} generated blueprints run: {rejected} rejected by validate, {refused} refused at \
         start, {success} succeeded, {failed} failed with a verdict, none panicked or hung"
    );
    assert_eq!(rejected + refused + success + failed, n);
}
