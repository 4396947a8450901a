//! The deployment files parse and say what they must (no Docker engine or GitHub runner here):
//! the GitHub Actions workflow, docker-compose.yml and the Dockerfile.

use serde_json::Value;

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let v: serde_norway::Value =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::to_value(v).unwrap()
}

#[test]
fn the_workflow_runs_all_active_every_6_hours_with_the_secrets() {
    let w = yaml(".github/workflows/omniflow-runner-hf.yml");
    // `on` must stay a string key (YAML 1.1 would read it as `true`).
    let on = &w["on"];
    let cron = on["schedule"][0]["cron"].as_str().unwrap();
    let fields: Vec<&str> = cron.split_whitespace().collect();
    assert_eq!(fields.len(), 5);
    assert_eq!(fields[1], "*/6", "every 6 hours: {cron}");
    assert!(on.get("workflow_dispatch").is_some());
    assert_eq!(w["permissions"]["contents"], "read");

    let steps = w["jobs"]["run"]["steps"].as_array().unwrap();
    let uses: Vec<&str> = steps.iter().filter_map(|s| s["uses"].as_str()).collect();
    assert!(uses.contains(&"actions/checkout@v6"), "{uses:?}");
    assert!(
        uses.iter().any(|u| u.starts_with("Swatinem/rust-cache@")),
        "cargo cache: {uses:?}"
    );
    let runs: Vec<&str> = steps.iter().filter_map(|s| s["run"].as_str()).collect();
    assert!(
        runs.iter().any(|r| r.contains("cargo build --release")),
        "{runs:?}"
    );
    let main = steps
        .iter()
        .find(|s| {
            s["run"]
                .as_str()
                .is_some_and(|r| r.contains("omniflow run --all-active"))
        })
        .expect("a step runs omniflow run --all-active");
    for secret in [
        "HUGGINGFACE_TOKEN",
        "TELEGRAM_BOT_TOKEN",
        "TELEGRAM_CHAT_ID",
        "DISCORD_WEBHOOK",
        "SUPABASE_URL",
        "SUPABASE_KEY",
    ] {
        assert_eq!(
            main["env"][secret].as_str(),
            Some(format!("${{{{ secrets.{secret} }}}}").as_str()),
            "{secret}"
        );
    }
}

#[test]
fn compose_has_the_runner_and_an_optional_ollama() {
    let c = yaml("docker-compose.yml");
    let runner = &c["services"]["omniflow-runner"];
    assert_eq!(runner["build"], ".");
    assert_eq!(runner["env_file"], ".env");
    assert_eq!(runner["command"], serde_json::json!(["omniflow", "daemon"]));
    let vols: Vec<&str> = runner["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(vols.iter().any(|v| v.ends_with(":/app/data")), "{vols:?}");
    assert!(vols.iter().any(|v| v.ends_with(":/app/logs")), "{vols:?}");
    assert_eq!(
        runner["environment"]["DB_FILE"],
        "/app/data/automation_runner.db"
    );
    let ollama = &c["services"]["ollama"];
    assert!(ollama["image"]
        .as_str()
        .unwrap()
        .starts_with("ollama/ollama"));
    assert_eq!(ollama["profiles"], serde_json::json!(["ollama"]));
    for v in ["omniflow-data", "omniflow-logs", "ollama-models"] {
        assert!(c["volumes"].get(v).is_some(), "{v}");
    }
}

#[test]
fn the_dockerfile_builds_in_a_rust_stage_and_runs_small_and_non_root() {
    let text = std::fs::read_to_string("Dockerfile").unwrap();
    // Instructions, with continuation lines joined.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS builder"),
        "{froms:?}"
    );
    assert!(
        froms[1].contains("debian:") && froms[1].contains("-slim"),
        "{froms:?}"
    );
    let stage2 = lines.iter().position(|l| *l == froms[1]).unwrap();
    let (build, runtime) = lines.split_at(stage2);
    assert!(build
        .iter()
        .any(|l| l.starts_with("RUN cargo build --release --locked")));
    assert!(build
        .iter()
        .any(|l| l.starts_with("COPY Cargo.toml Cargo.lock")));
    assert!(runtime
        .iter()
        .any(|l| l.starts_with("COPY --from=builder ") && l.contains("target/release/omniflow")));
    let user = runtime
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER");
    assert!(!user.contains("root") && *user != "USER 0", "{user}");
    assert!(runtime.iter().any(|l| l.contains("useradd")));
    assert_eq!(
        runtime.last().copied(),
        Some(r#"CMD ["omniflow", "daemon"]"#)
    );
    // Everything the build copies exists, and .dockerignore keeps target/ out.
    for p in ["Cargo.toml", "Cargo.lock", "src", "benches", "blueprints"] {
        assert!(std::path::Path::new(p).exists(), "{p}");
    }
    let ignore = std::fs::read_to_string(".dockerignore").unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"));
    assert!(ignore.lines().any(|l| l.trim() == ".env"));
}
