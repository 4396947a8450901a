//! `DATABASE_URL` through the real binary: PostgreSQL is used by every command that reads or
//! writes the history; a bad or unreachable URL is exit 2 with its fix, never a quiet fall
//! back to SQLite; and the URL's password shows nowhere — not on stdout or stderr, not in the
//! log files, not in the database.

mod common;

use omniflow::store::pg::testing::ScratchDb;
use omniflow::store::pg::PgTarget;
use std::path::PathBuf;
use std::process::{Command, Output};

const SECRET: &str = "Pa55w0rdNeverShown";

const BLUEPRINT: &str = r#"{
  "name": "url-check",
  "nodes": [
    { "id": "ask", "type": "llm", "forEach": "{{ vars.ITEMS }}", "prompt": "About {{ item }}." },
    { "id": "join", "type": "transform", "needs": ["ask"],
      "template": "{{ nodes.ask.output | join(', ') }}" }
  ],
  "variables": { "ITEMS": ["a", "b", "c"] }
}"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(env.dir.path().join("url-check.json"), BLUEPRINT).unwrap();
        env
    }

    fn run(&self, url: &str, args: &[&str]) -> Output {
        let mut c = self.cmd(args);
        c.env("DATABASE_URL", url);
        c.output().unwrap()
    }

    /// Without DATABASE_URL: SQLite at DB_FILE.
    fn run_sqlite(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = common::bin::omniflow(self.dir.path(), args, [("DB_FILE", self.sqlite())]);
        c.env("LOG_DIR", self.dir.path().join("logs"))
            .env("OMNIFLOW_TIME_SCALE", "0.01");
        c
    }

    fn sqlite(&self) -> PathBuf {
        self.dir.path().join("history.db")
    }

    /// Every log line written so far.
    fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) {
            for e in entries.flatten() {
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn with_password(url: &str) -> String {
    url.replacen("postgres@", &format!("postgres:{SECRET}@"), 1)
}

fn assert_hidden(what: &str, s: &str) {
    assert!(!s.contains(SECRET), "{what} shows the password:\n{s}");
}

#[test]
fn an_unreachable_or_bad_database_url_is_exit_2_with_its_fix_and_never_sqlite() {
    let env = Env::new();
    // Nothing listens on port 1.
    let closed = format!("postgres://postgres:{SECRET}@127.0.0.1:1/omniflow");
    for args in [
        &["runs"][..],
        &["show", "abc"],
        &["run", "url-check.json", "--sandbox"],
        &["resume", "abc"],
        &["daemon"],
        &["backup", "copy.db"],
    ] {
        let out = env.run(&closed, args);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert_hidden(&format!("{args:?}"), &all);
        if args[0] != "backup" {
            assert!(
                all.contains("postgres://postgres:***@127.0.0.1:1/omniflow")
                    && all.contains("check the host and port in DATABASE_URL"),
                "{args:?} names the server and the fix: {all}"
            );
        } else {
            assert!(all.contains("pg_dump"), "{all}");
        }
    }
    let out = env.run(&closed, &["doctor"]);
    let all = text(&out);
    assert_ne!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("✗ connection"), "{all}");
    assert_hidden("doctor", &all);
    assert_hidden("logs", &env.logs());
    assert!(
        !env.sqlite().exists(),
        "no SQLite database was made instead"
    );

    let out = env.run(&format!("mysql://root:{SECRET}@db/omniflow"), &["runs"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("not postgres://"), "{all}");
    assert_hidden("a bad scheme", &all);
    assert!(!env.sqlite().exists());
}

#[test]
fn every_command_uses_postgres_and_the_password_shows_nowhere() {
    let Some(db) = ScratchDb::new("database_url_cli") else {
        return;
    };
    let url = with_password(db.url());
    assert!(
        url.contains(SECRET),
        "the test's URL carries a password: {url}"
    );
    let env = Env::new();

    // A database nothing has written to yet: its owner may create OmniFlow's tables, so the
    // first run can, and doctor says so.
    let fresh = text(&env.run(&url, &["doctor"]));
    assert!(fresh.contains("✓ privileges"), "{fresh}");

    let out = env.run(&url, &["run", "url-check.json", "--sandbox", "--json"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert_hidden("run", &all);
    let out = env.run(&url, &["runs", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = runs["runs"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(runs["runs"][0]["status"], "success");
    assert!(
        runs["runs"][0]["started_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{runs}"
    );

    for args in [
        &["runs"][..],
        &["show", id.as_str()],
        &["show", id.as_str(), "--json"],
        &["doctor"],
        &["doctor", "--json"],
    ] {
        let out = env.run(&url, args);
        let all = text(&out);
        assert_hidden(&format!("{args:?}"), &all);
        if args[0] != "doctor" {
            assert_eq!(out.status.code(), Some(0), "{args:?}: {all}");
        }
    }
    let doctor = text(&env.run(&url, &["doctor"]));
    for check in ["✓ connection", "✓ server", "✓ migrations", "✓ privileges"] {
        assert!(doctor.contains(check), "{check}: {doctor}");
    }
    assert!(doctor.contains("postgres://postgres:***@"), "{doctor}");
    let out = env.run(&url, &["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["database"]["ok"], true,
        "every check passed: {}",
        report["database"]
    );
    let out = env.run(&url, &["backup", "copy.db"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("pg_dump"));
    assert_hidden("backup", &text(&out));

    assert_hidden("logs", &env.logs());
    assert!(!env.sqlite().exists(), "nothing went to SQLite");
    assert_hidden("the database", &dump(&db));
    // The run is in PostgreSQL, where the monitoring query finds it.
    assert!(dump(&db).contains("url-check"));
}

/// Every table's rows as text.
fn dump(db: &ScratchDb) -> String {
    let mut c = db.target().connect().unwrap();
    let mut all = String::new();
    for table in [
        "runner_executions",
        "runner_steps",
        "runner_attempts",
        "runner_processes",
        "notifications_sent",
        "schedule_slots",
        "provider_cache",
        "omniflow_migrations",
    ] {
        for m in c.simple_query(&format!("SELECT * FROM {table}")).unwrap() {
            if let postgres::SimpleQueryMessage::Row(r) = m {
                for i in 0..r.len() {
                    all.push_str(r.get(i).unwrap_or(""));
                    all.push('\t');
                }
                all.push('\n');
            }
        }
    }
    all
}

#[test]
fn migrate_copies_the_sqlite_history_once_and_resumes() {
    let Some(db) = ScratchDb::new("migrate_cli") else {
        return;
    };
    let url = with_password(db.url());
    let env = Env::new();
    for _ in 0..2 {
        let out = env.run_sqlite(&["run", "url-check.json", "--sandbox"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let sqlite_runs = env.run_sqlite(&["runs", "--json"]).stdout;

    let out = env.run_sqlite(&["migrate", "--to", &url]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert_hidden("migrate", &all);
    assert!(all.contains("runs") && all.contains("2 copied"), "{all}");

    // The same history, read back from PostgreSQL.
    let pg_runs = env.run(&url, &["runs", "--json"]).stdout;
    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(parse(&pg_runs), parse(&sqlite_runs));

    // Again, after one more run: only the new one is copied.
    env.run_sqlite(&["run", "url-check.json", "--sandbox"]);
    let out = env.run_sqlite(&["migrate", "--to", &url, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = parse(&out.stdout);
    let runs = &report["tables"][0];
    assert_eq!(
        (runs["read"].as_u64(), runs["written"].as_u64()),
        (Some(3), Some(1))
    );
    assert_hidden("migrate --json", &text(&out));
    let out = env.run(&url, &["runs", "--json"]);
    assert_eq!(parse(&out.stdout)["runs"].as_array().map(Vec::len), Some(3));

    let out = env.run_sqlite(&["migrate"]);
    assert_eq!(out.status.code(), Some(2), "no target: {}", text(&out));
}

#[test]
fn a_user_who_may_not_create_tables_is_told_the_grant() {
    let Some(db) = ScratchDb::new("database_url_grant") else {
        return;
    };
    let role = format!("omniflow_t_nocreate_{}", std::process::id());
    let mut admin = db.target().connect().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{SECRET}';
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             REVOKE CREATE ON SCHEMA public FROM {role};"
        ))
        .unwrap();
    let _role = DroppedRole {
        name: role.clone(),
        db: db.target().clone(),
    };
    let url = db
        .url()
        .replacen("postgres@", &format!("{role}:{SECRET}@"), 1);
    let env = Env::new();

    let doctor = env.run(&url, &["doctor"]);
    let all = text(&doctor);
    assert_ne!(doctor.status.code(), Some(0), "{all}");
    assert!(all.contains("✓ connection"), "{all}");
    assert!(all.contains("✗ privileges"), "{all}");
    assert!(
        all.contains(&format!("GRANT USAGE, CREATE ON SCHEMA public TO {role}")),
        "{all}"
    );
    assert_hidden("doctor", &all);

    let out = env.run(&url, &["runs"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("grant the user CREATE"), "{all}");
    assert_hidden("runs", &all);

    // Migrated by its owner, then the user may create tables and read one column of the
    // runs, but write none: the database answers (its runs are counted), and doctor's
    // verdict on it is still ✗, as its privileges line says.
    let out = env.run(db.url(), &["runs"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    admin
        .batch_execute(&format!(
            "GRANT CREATE ON SCHEMA public TO {role};
             GRANT SELECT ON omniflow_migrations TO {role};
             GRANT SELECT (id) ON runner_executions TO {role};"
        ))
        .unwrap();
    let out = env.run(&url, &["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let database = &report["database"];
    assert_eq!(database["runs"], 0, "{database}");
    let privileges = database["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "privileges")
        .unwrap();
    assert_eq!(privileges["ok"], false, "{database}");
    assert!(
        privileges["detail"]
            .as_str()
            .unwrap()
            .contains("cannot read and write OmniFlow's tables"),
        "{database}"
    );
    assert_eq!(database["ok"], false, "a check failed: {database}");
    assert_hidden("doctor --json", &text(&out));

    // Reading and writing every table of a migrated database, without CREATE on its schema:
    // doctor says that is fine for this build, and every command works.
    admin
        .batch_execute(&format!(
            "REVOKE CREATE ON SCHEMA public FROM {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};"
        ))
        .unwrap();
    let doctor = env.run(&url, &["doctor"]);
    let all = text(&doctor);
    assert!(all.contains("✓ privileges"), "{all}");
    assert!(all.contains("it may not create tables"), "{all}");
    let out = env.run(&url, &["runs"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// A role made for one test: it outlives the database, so it is dropped with what it was
/// granted there, when the test fails too, and the server is left as found.
struct DroppedRole {
    name: String,
    db: PgTarget,
}

impl Drop for DroppedRole {
    fn drop(&mut self) {
        if let Ok(mut c) = self.db.connect() {
            let name = &self.name;
            let _ = c.batch_execute(&format!("DROP OWNED BY {name}; DROP ROLE IF EXISTS {name}"));
        }
    }
}

/// `migrate --from FILE` copies that SQLite file, not the one `DB_FILE` names.
#[test]
fn migrate_from_copies_the_named_file() {
    let Some(db) = ScratchDb::new("migrate_from") else {
        return;
    };
    let url = db.url().to_string();
    let env = Env::new();
    let other = env.dir.path().join("elsewhere.db");
    let out = env
        .cmd(&["run", "url-check.json", "--sandbox", "--json"])
        .env("DB_FILE", &other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["runId"]
        .as_str()
        .unwrap()
        .to_string();
    // DB_FILE's own history has a run of its own, which must stay behind.
    let out = env.run_sqlite(&["run", "url-check.json", "--sandbox"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let out = env.run_sqlite(&["migrate", "--to", &url, "--from", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&url, &["runs", "--json"]);
    let runs = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    let ids: Vec<&str> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()], "{runs:#}");

    let out = env.run_sqlite(&["migrate", "--to", &url, "--from", "missing.db"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("missing.db"), "{}", text(&out));
}
