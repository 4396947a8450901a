//! The sandbox stands in for the real thing faithfully: every bundled blueprint, run by the real
//! binary once with `--sandbox` and once for real against local fakes (a Hugging Face router, a
//! web server, Telegram, Discord), gives outputs of the same shape, so a template that works in
//! the sandbox works for real. Both runs are also read as a user reads them: exit status and the
//! human summary, not only `--json`.

mod common;
mod fake_provider;
mod fakes;

use fake_provider::{start, Reply, Seen};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const HF_TOKEN: &str = "hf_fidelitytoken0123456789";
const TG_TOKEN: &str = "123456:fidelity-telegram-token";

/// The fakes a real run talks to, and what the model answers a "one of" question with.
struct World {
    model: fake_provider::Fake,
    web: fake_provider::Fake,
    telegram: fakes::Fake,
    discord: fakes::Fake,
    label: Arc<Mutex<String>>,
}

/// The words of a chat completion's last user message.
fn prompt_of(req: &Seen) -> String {
    req.json()["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn world() -> World {
    let label = Arc::new(Mutex::new("normal".to_string()));
    let l = label.clone();
    // A model as a user meets one: a label when asked for one word, fenced JSON when the prompt
    // shows an object, prose otherwise.
    let model = start(move |req, _| {
        let prompt = prompt_of(req);
        let text = if prompt.contains("one of") {
            l.lock().unwrap().clone()
        } else if prompt.contains("{\"") {
            "```json\n{\"label\": \"billing\", \"confidence\": 0.75, \"tags\": [\"refund\"]}\n```"
                .to_string()
        } else {
            "- Rust ships a new release.\n- Builds are faster.\nWhy it matters: less waiting."
                .to_string()
        };
        let words: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        Reply::sse(&refs, Some(40), true)
    })
    .await;
    let web = start(|req, _| {
        if req.path.starts_with("/repos/") {
            Reply::json(
                200,
                json!([{
                    "tag_name": "1.90.0",
                    "name": "Rust 1.90.0",
                    "html_url": "https://example.invalid/releases/1.90.0",
                    "published_at": "2026-09-18T12:00:00Z",
                    "body": "## Language\n\n- Faster builds\n- New lints"
                }]),
            )
        } else {
            Reply::raw(
                200,
                "text/html",
                "<html><body><h1>Rust</h1><p>A language empowering everyone.</p></body></html>",
            )
        }
    })
    .await;
    World {
        model,
        web,
        telegram: fakes::telegram(TG_TOKEN).await,
        discord: fakes::discord().await,
        label,
    }
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = common::bin::omniflow(
            self.dir.path(),
            args,
            common::bin::private_files(self.dir.path(), "history.db"),
        );
        c.env("OMNIFLOW_TIME_SCALE", "0.001");
        c
    }

    /// The same command with every real service pointed at the fakes.
    fn real(&self, w: &World, args: &[&str]) -> Command {
        let mut c = self.cmd(args);
        c.env("HUGGINGFACE_TOKEN", HF_TOKEN)
            .env("HF_INFERENCE_URL", &w.model.url)
            .env("TELEGRAM_BOT_TOKEN", TG_TOKEN)
            .env("TELEGRAM_CHAT_ID", "42")
            .env("TELEGRAM_API_URL", &w.telegram.url)
            .env(
                "DISCORD_WEBHOOK",
                format!("{}/api/webhooks/1/abc", w.discord.url),
            );
        c
    }
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Runs a command off the async runtime (the fakes live on it).
async fn output(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

fn json_of(o: &Output) -> Value {
    let out = text(&o.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {out}\nstderr: {}",
            text(&o.stderr)
        )
    })
}

/// A value's shape: its type, an object's keys with their shapes, an array's element shape.
fn shape(v: &Value) -> Value {
    match v {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("bool"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(a) => json!({ "array of": a.first().map(shape) }),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

/// Shapes agree; an empty array agrees with an array of anything (a sandbox sends nothing, so
/// its `messageIds` is empty where a real delivery has ids).
fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) if x.contains_key("array of") => {
            match (&x["array of"], y.get("array of")) {
                (Value::Null, Some(_)) | (_, Some(Value::Null)) => true,
                (p, Some(q)) => same_shape(p, q),
                (_, None) => false,
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_shape(v, w)))
        }
        _ => a == b,
    }
}

/// Runs `name` in the sandbox and for real; returns both `--json` reports after checking the
/// exit status, and checks the human output of a real run too.
async fn both(w: &World, name: &str, vars: &[&str]) -> (Value, Value) {
    let dir = bundled();
    let mut args = vec!["run", name, "--dir", dir.to_str().unwrap()];
    for v in vars {
        args.push("--var");
        args.push(v);
    }

    let d = Dir::new();
    let mut sandbox_args = args.clone();
    sandbox_args.extend(["--sandbox", "--simulate-failures", "0", "--json"]);
    let o = output(d.cmd(&sandbox_args)).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{name} --sandbox: {}",
        text(&o.stderr)
    );
    let sandbox = json_of(&o);
    assert_eq!(sandbox["status"], "success", "{name} sandbox: {sandbox}");

    // What the sandbox's model picked, the real one answers too, so both take the same branch.
    if let Some(label) = sandbox["outputs"]["classify"].as_str() {
        *w.label.lock().unwrap() = label.to_string();
    }

    let d = Dir::new();
    let mut real_args = args.clone();
    real_args.push("--json");
    let o = output(d.real(w, &real_args)).await;
    assert_eq!(o.status.code(), Some(0), "{name} real: {}", text(&o.stderr));
    let real = json_of(&o);
    assert_eq!(real["status"], "success", "{name} real: {real}");

    // The same real run as a person (or cron) sees it: exit 0, a success line, the output.
    let d = Dir::new();
    let o = output(d.real(w, &args)).await;
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{name} real, human output: {err}");
    assert!(err.contains("succeeded"), "{name}: {err}");
    assert!(
        !err.contains("panicked"),
        "{name}: a panic reached the user: {err}"
    );
    (sandbox, real)
}

fn assert_same_outputs(name: &str, sandbox: &Value, real: &Value) {
    let (s, r) = (&sandbox["outputs"], &real["outputs"]);
    let s_nodes: Vec<&String> = s.as_object().unwrap().keys().collect();
    let r_nodes: Vec<&String> = r.as_object().unwrap().keys().collect();
    assert_eq!(s_nodes, r_nodes, "{name}: different nodes ran");
    for node in s_nodes {
        let (a, b) = (shape(&s[node]), shape(&r[node]));
        assert!(
            same_shape(&a, &b),
            "{name}: node {node} has another shape in the sandbox than for real\n sandbox: {a}\n real:    {b}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bundled_blueprint_has_the_same_output_shapes_in_the_sandbox_and_for_real() {
    let w = world().await;
    let page = format!("URL={}/page", w.web.url);
    let api = format!("GITHUB_API={}", w.web.url);
    let cases: [(&str, Vec<&str>); 4] = [
        ("tech-digest", vec!["TOPICS=[\"rust\",\"wasm\",\"llm\"]"]),
        ("page-summary", vec![&page]),
        ("release-notes", vec![&api]),
        (
            "triage",
            vec!["MESSAGE=The checkout page returns 500 for every customer"],
        ),
    ];
    for (name, vars) in &cases {
        let (sandbox, real) = both(&w, name, vars).await;
        assert_same_outputs(name, &sandbox, &real);
    }
    // The real runs really went out: the page and the release were fetched, the model asked,
    // and the notifications delivered.
    let paths: Vec<String> = w.web.requests().iter().map(|r| r.path.clone()).collect();
    assert!(paths.iter().any(|p| p == "/page"), "{paths:?}");
    assert!(
        paths
            .iter()
            .any(|p| p == "/repos/ratatui/ratatui/releases?per_page=1"),
        "{paths:?}"
    );
    assert!(w.model.count() > 0);
    assert!(!w.telegram.requests().is_empty());
    assert!(!w.discord.requests().is_empty());
}

const JSON_NODE: &str = r#"{
  "name": "classify-json",
  "variables": { "MESSAGE": "I was charged twice" },
  "nodes": [
    { "id": "classify", "type": "llm", "parse": "json", "provider": "huggingface",
      "model": "Qwen/Qwen2.5-7B-Instruct",
      "prompt": "Classify: {{ vars.MESSAGE }}. Answer with JSON only, like {\"label\": \"billing\", \"confidence\": 0.9, \"tags\": [\"refund\"]}" },
    { "id": "route", "type": "transform", "needs": ["classify"],
      "template": "{{ nodes.classify.output.label }} at {{ nodes.classify.output.confidence }} ({{ nodes.classify.output.tags | length }} tags)" }
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_parsing_node_gets_json_in_the_sandbox_and_strips_a_real_models_fence() {
    let w = world().await;
    let d = Dir::new();
    let file = d.dir.path().join("classify-json.json");
    std::fs::write(&file, JSON_NODE).unwrap();
    let f = file.to_str().unwrap();

    let o = output(d.cmd(&["run", f, "--sandbox", "--json"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let sandbox = json_of(&o);
    let c = &sandbox["outputs"]["classify"];
    assert!(c["label"].is_string(), "{sandbox}");
    assert!(c["confidence"].is_number(), "{sandbox}");
    assert!(c["tags"].is_array(), "{sandbox}");
    assert!(
        sandbox["outputs"]["route"]
            .as_str()
            .unwrap()
            .contains(" tags)"),
        "{sandbox}"
    );

    let o = output(d.real(&w, &["run", f, "--json"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let real = json_of(&o);
    // The fake wraps its JSON in ```json … ```, as real models often do.
    assert_eq!(
        real["outputs"]["classify"],
        json!({"label": "billing", "confidence": 0.75, "tags": ["refund"]})
    );
    assert_eq!(real["outputs"]["route"], "billing at 0.75 (1 tags)");
    assert_same_outputs("classify-json", &sandbox, &real);

    // And as a person reads it.
    let o = output(d.real(&w, &["run", f])).await;
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("succeeded"), "{err}");
    assert!(
        text(&o.stdout).contains("billing at 0.75"),
        "{}",
        text(&o.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_post_sends_its_rendered_body_and_headers() {
    let server = start(|_, _| Reply::json(201, json!({"id": 7, "ok": true}))).await;
    let d = Dir::new();
    let bp = json!({
        "name": "post-it",
        "variables": { "TITLE": "Build \"broken\"", "LEVEL": 3 },
        "nodes": [{
            "id": "create", "type": "http", "method": "POST",
            "url": format!("{}/api/issues?source={{{{ run.blueprint }}}}", server.url),
            "headers": { "X-Title": "{{ vars.TITLE | upper }}", "Content-Type": "application/json" },
            "body": { "title": "{{ vars.TITLE }}", "level": "{{ vars.LEVEL }}", "fixed": [1, 2] },
            "response": "json"
        }]
    });
    let file = d.dir.path().join("post-it.json");
    std::fs::write(&file, bp.to_string()).unwrap();
    let o = output(d.cmd(&["run", file.to_str().unwrap(), "--json"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let report = json_of(&o);
    assert_eq!(report["outputs"]["create"], json!({"id": 7, "ok": true}));

    let seen = server.requests();
    assert_eq!(seen.len(), 1, "one request, no retry");
    let r = &seen[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/api/issues?source=post-it");
    assert_eq!(r.header("x-title"), Some("BUILD \"BROKEN\""));
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let body = r.json();
    assert_eq!(body["title"], "Build \"broken\"");
    assert_eq!(body["fixed"], json!([1, 2]));
    assert!(
        body["level"] == json!(3) || body["level"] == json!("3"),
        "{body}"
    );
}
