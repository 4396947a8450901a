//! The deployment files parse and say what they must (no Docker engine or GitHub runner here):
//! the GitHub Actions workflow, docker-compose.yml, the Dockerfile, the systemd unit and the
//! Grafana dashboard.

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
    // Healthchecks: the runner through `omniflow health` (no curl in the image), which asks
    // /healthz on OMNIFLOW_LISTEN; the port is published on the host's loopback only.
    let hc = &runner["healthcheck"];
    assert_eq!(hc["test"][0], "CMD");
    assert_eq!(hc["test"][1], "omniflow");
    assert_eq!(hc["test"][2], "health");
    for k in ["interval", "timeout", "retries", "start_period"] {
        assert!(hc.get(k).is_some(), "healthcheck.{k}");
    }
    let listen = runner["environment"]["OMNIFLOW_LISTEN"].as_str().unwrap();
    let port = listen.rsplit(':').next().unwrap();
    let ports: Vec<&str> = runner["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        ports.contains(&format!("127.0.0.1:{port}:{port}").as_str()),
        "{ports:?}"
    );
    assert!(ollama["healthcheck"]["test"].is_array());
}

#[test]
fn compose_has_a_postgres_profile_with_two_daemons_on_one_database() {
    let c = yaml("docker-compose.yml");
    let pg = &c["services"]["postgres"];
    assert_eq!(pg["profiles"], serde_json::json!(["postgres"]));
    assert!(pg["image"].as_str().unwrap().starts_with("postgres:"));
    assert_eq!(pg["healthcheck"]["test"][1], "pg_isready");
    assert!(
        pg.get("ports").is_none(),
        "the database is not published on the host"
    );
    let user = pg["environment"]["POSTGRES_USER"].as_str().unwrap();
    let db = pg["environment"]["POSTGRES_DB"].as_str().unwrap();

    let fleet = &c["services"]["omniflow-fleet"];
    assert_eq!(fleet["profiles"], serde_json::json!(["postgres"]));
    assert_eq!(fleet["command"], serde_json::json!(["omniflow", "daemon"]));
    assert_eq!(fleet["deploy"]["replicas"], 2);
    assert!(
        fleet.get("container_name").is_none(),
        "replicas cannot share a container name"
    );
    assert!(
        fleet.get("ports").is_none(),
        "two replicas cannot publish one port"
    );
    assert_eq!(
        fleet["depends_on"]["postgres"]["condition"],
        "service_healthy"
    );
    // The URL names the compose service, its user and database, and parses as OmniFlow
    // parses DATABASE_URL (with compose's default for the password filled in).
    let url = fleet["environment"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .replace("${POSTGRES_PASSWORD:-omniflow}", "omniflow");
    let target = omniflow::store::pg::PgTarget::parse(&url).expect("DATABASE_URL parses");
    assert_eq!(
        target.shown(),
        format!("postgres://{user}:***@postgres:5432/{db}")
    );
    assert!(fleet.get("healthcheck").is_some());
    // The single runner stays SQLite and out of the profile: the fleet is started by name.
    assert!(c["services"]["omniflow-runner"].get("profiles").is_none());
    assert!(c["services"]["omniflow-runner"]["environment"]
        .get("DATABASE_URL")
        .is_none());
    assert!(c["volumes"].get("omniflow-postgres").is_some());
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
    // The runtime stage has no curl or wget; the healthcheck is the binary's own probe, and
    // the listener it asks is configured in the image.
    assert!(!runtime
        .iter()
        .any(|l| l.contains("curl") || l.contains("wget")));
    let hc = runtime
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    assert!(hc.contains(r#"CMD ["omniflow", "health""#), "{hc}");
    assert!(runtime
        .iter()
        .any(|l| l.starts_with("ENV ") && l.contains("OMNIFLOW_LISTEN=0.0.0.0:9464")));
    assert!(runtime.contains(&"EXPOSE 9464"));
    // Everything the build copies exists, and .dockerignore keeps target/ out.
    for p in ["Cargo.toml", "Cargo.lock", "src", "benches", "blueprints"] {
        assert!(std::path::Path::new(p).exists(), "{p}");
    }
    let ignore = std::fs::read_to_string(".dockerignore").unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"));
    assert!(ignore.lines().any(|l| l.trim() == ".env"));
}

/// `[Section]` → key → values (a key may repeat, as `Environment=` does).
fn unit_file(path: &str) -> std::collections::HashMap<String, Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out: std::collections::HashMap<String, Vec<(String, String)>> = Default::default();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{path}: not key=value: {line}"));
        assert!(!section.is_empty(), "{path}: {line} outside a section");
        out.entry(section.clone())
            .or_default()
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    out
}

#[test]
fn the_systemd_unit_restarts_on_failure_and_waits_out_the_shutdown_grace() {
    let u = unit_file("deploy/systemd/omniflow.service");
    let one = |section: &str, key: &str| -> String {
        let vals: Vec<&String> = u[section]
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(vals.len(), 1, "[{section}] {key}: {vals:?}");
        vals[0].clone()
    };
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert_eq!(one("Service", "KillSignal"), "SIGTERM");
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");
    assert!(one("Service", "ExecStart").contains("omniflow daemon"));
    assert!(!one("Service", "User").is_empty() && one("Service", "User") != "root");
    let env: std::collections::HashMap<String, String> = u["Service"]
        .iter()
        .filter(|(k, _)| k == "Environment")
        .filter_map(|(_, v)| v.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The stop timeout covers the grace period plus the hand-over, so systemd's SIGKILL never
    // comes while steps in flight may still finish.
    let grace: u64 = env["SHUTDOWN_GRACE"].parse().unwrap();
    let stop: u64 = one("Service", "TimeoutStopSec").parse().unwrap();
    assert!(
        stop > grace && stop <= grace + 60,
        "TimeoutStopSec={stop}, SHUTDOWN_GRACE={grace}"
    );
    // Metrics on loopback.
    assert!(env["OMNIFLOW_LISTEN"].starts_with("127.0.0.1:"), "{env:?}");
}

#[test]
fn the_grafana_dashboard_imports_and_shows_what_operators_look_for() {
    let text = std::fs::read_to_string("deploy/grafana/omniflow.json").unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "omniflow");
    assert!(
        d["__inputs"][0]["pluginId"] == "prometheus",
        "a data source to pick on import"
    );
    let panels = d["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    for e in &exprs {
        assert!(e.contains("omniflow_"), "{e}");
        assert_eq!(e.matches('(').count(), e.matches(')').count(), "{e}");
        // Per-process series add up across a fleet: every query filters by host and role.
        assert!(
            e.contains("host=~\"$host\"") && e.contains("role=~\"$role\""),
            "{e}"
        );
    }
    // What the issue asks a dashboard to show.
    for metric in [
        "omniflow_runs_finished_total",
        "omniflow_queue_depth",
        "omniflow_workers",
        "omniflow_retries_total",
        "omniflow_model_call_duration_seconds_bucket",
        "omniflow_memory_rss_bytes",
        "omniflow_memory_threshold_bytes",
        // A fleet's health: how many attempts the shared queue takes in, hands out, and fences.
        "omniflow_fleet_attempts_total",
    ] {
        assert!(exprs.iter().any(|e| e.contains(metric)), "{metric}");
    }
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["host", "role"]);
}
