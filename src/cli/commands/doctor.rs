//! `omniflow doctor`: what is configured, and whether it works.

use super::*;

/// `omniflow doctor`: configuration, the provider chain with a live check of each
/// configured link, the database and the log directory. Exit 0 when everything configured
/// works, 1 otherwise.
pub fn doctor(args: DoctorArgs) -> Result<ExitCode, Failure> {
    let config = Arc::new(load_config()?);
    let location = config.database().map_err(Failure::input)?;
    let rt = runtime()?;
    let providers = crate::providers::Providers::new(config.clone());
    if let Some(model) = &args.pull {
        return rt.block_on(pull(&providers, model));
    }
    // A provider's error may quote the request back, headers and all: no secret is shown.
    let redactor = crate::logging::Redactor::new(config.secrets());
    let checks: Vec<_> = rt
        .block_on(providers.doctor())
        .into_iter()
        .map(|mut c| {
            c.detail = redactor.redact(&c.detail).into_owned();
            c
        })
        .collect();
    let settings = settings(&config, &location);
    let chain: Vec<&str> = checks
        .iter()
        .filter(|c| c.configured)
        .map(|c| c.provider)
        .collect();
    let database = Database::check(&config, &location);
    let logs = LogDir::check(&config.log_dir);

    let providers_ok = checks.iter().all(|c| c.ok != Some(false));
    // With no provider at all, nothing can run a model: that is not "everything works".
    let can_run_models = !chain.is_empty();
    let all_ok = can_run_models && providers_ok && database.ok && logs.result.is_ok();
    let report = Report {
        config: &config,
        settings,
        chain,
        checks: &checks,
        database,
        logs,
        can_run_models,
        all_ok,
    };
    if args.json {
        report.print_json();
    } else {
        report.print_text();
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else if !can_run_models {
        // A configuration problem (exit 2), not a failed check of something configured.
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    })
}

/// The settings shown, secrets as set/unset only.
fn settings(config: &Config, location: &crate::store::Location) -> Vec<(&'static str, String)> {
    let set = |o: &Option<String>| if o.is_some() { "set" } else { "unset" };
    let rate = |r: Option<crate::config::RateLimit>| {
        r.map(|r| r.to_string())
            .unwrap_or_else(|| "unlimited".into())
    };
    vec![
        ("HUGGINGFACE_TOKEN", set(&config.huggingface_token).into()),
        ("HF_INFERENCE_URL", config.hf_inference_url.clone()),
        ("USE_OLLAMA", config.use_ollama.to_string()),
        ("OLLAMA_URL", config.ollama_url.clone()),
        ("OLLAMA_MODEL", config.ollama_model.clone()),
        (
            "OPENAI_BASE_URL",
            config
                .openai_base_url
                .clone()
                .unwrap_or_else(|| "unset".into()),
        ),
        ("OPENAI_API_KEY", set(&config.openai_api_key).into()),
        ("MODEL_FAST", config.model_fast.clone()),
        ("MODEL_BETTER", config.model_better.clone()),
        ("MODEL_POWERFUL", config.model_powerful.clone()),
        (
            "REQUEST_TIMEOUT",
            format!("{}s", config.request_timeout.as_secs()),
        ),
        ("MAX_RETRIES", config.max_retries.to_string()),
        (
            "CACHE_TTL",
            if config.cache_ttl.is_zero() {
                "off".into()
            } else {
                humantime::format_duration(config.cache_ttl).to_string()
            },
        ),
        (
            "MAX_TOKENS_PER_RUN",
            config
                .max_tokens_per_run
                .map(|n| n.to_string())
                .unwrap_or_else(|| "unlimited".into()),
        ),
        ("HF_RATE_LIMIT", rate(config.hf_rate_limit)),
        ("OLLAMA_RATE_LIMIT", rate(config.ollama_rate_limit)),
        ("OPENAI_RATE_LIMIT", rate(config.openai_rate_limit)),
        ("CONCURRENCY", config.concurrency.to_string()),
        ("TELEGRAM_BOT_TOKEN", set(&config.telegram_bot_token).into()),
        ("DISCORD_WEBHOOK", set(&config.discord_webhook).into()),
        (
            "DATABASE_URL",
            match location {
                crate::store::Location::Postgres(t) => t.shown().to_string(),
                crate::store::Location::Sqlite(_) => "unset (SQLite at DB_FILE)".into(),
            },
        ),
    ]
}

/// The database: opens (migrating if needed), schema version, run count; then the health of
/// every process on it (their heartbeats) and runs left by a process that died. A database
/// that does not exist yet is not created just to be checked: the first run creates it (its
/// directory must be writable). On PostgreSQL: connection, server version, migrations and
/// privileges, checked without migrating; the store is opened only when it can be.
struct Database {
    pg: Option<crate::store::pg::doctor::PgReport>,
    exists: bool,
    /// Schema version and number of runs.
    db: Result<(i64, u64), Failure>,
    lease: std::time::Duration,
    processes: Vec<crate::store::ProcessRow>,
    orphaned: Vec<String>,
    dir_ok: bool,
    ok: bool,
}

impl Database {
    fn check(config: &Config, location: &crate::store::Location) -> Database {
        let pg = match location {
            crate::store::Location::Postgres(t) => Some(crate::store::pg::doctor::check(t)),
            crate::store::Location::Sqlite(_) => None,
        };
        let db_exists = match &pg {
            Some(report) => report.usable(),
            None => config.db_file.exists(),
        };
        let store = if db_exists {
            open_store(config)
        } else {
            Err(Failure::input("not created yet"))
        };
        let db = store
            .as_ref()
            .map_err(Failure::clone)
            .and_then(|s| Database::contents(config, s));
        let lease = config.scaled(config.lease_timeout);
        let processes = store
            .as_ref()
            .ok()
            .and_then(|s| s.processes(lease).ok())
            .unwrap_or_default();
        let orphaned = store
            .as_ref()
            .ok()
            .and_then(|s| s.orphaned_runs(lease).ok())
            .unwrap_or_default();
        let db_dir_ok = db_exists || writable(nearest_dir(&config.db_file)).is_ok();
        let db_ok = match &pg {
            Some(report) => report.ok() && db.is_ok(),
            None => db.is_ok() || (!db_exists && db_dir_ok),
        };
        Database {
            pg,
            exists: db_exists,
            db,
            lease,
            processes,
            orphaned,
            dir_ok: db_dir_ok,
            ok: db_ok,
        }
    }

    /// Schema version and run count, after a check of every page.
    fn contents(config: &Config, s: &Store) -> Result<(i64, u64), Failure> {
        let v = s
            .schema_version()
            .map_err(|e| Failure::input(e.to_string()))?;
        let n = s
            .count_runs(&RunFilter::default())
            .map_err(|e| Failure::input(e.to_string()))?;
        let problems = s
            .integrity_problems()
            .map_err(|e| Failure::input(e.to_string()))?;
        if !problems.is_empty() {
            return Err(Failure::input(format!(
                "damaged: integrity_check found {}{}. Copy out what can be read \
                 (`omniflow backup rescued.db`, or `sqlite3 {} .recover > rescued.sql`), then \
                 point DB_FILE at a fresh file",
                problems
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
                if problems.len() > 3 { "; …" } else { "" },
                config.db_file.display()
            )));
        }
        Ok((v, n))
    }

    /// The live processes, then the five most recent others.
    fn shown(&self) -> Vec<&crate::store::ProcessRow> {
        self.processes
            .iter()
            .filter(|p| p.alive)
            .chain(self.processes.iter().filter(|p| !p.alive).take(5))
            .collect()
    }
}

/// The log directory is writable, or (when it does not exist yet) the directory it would be
/// created in is: checked with a probe file that is removed, never by creating it.
struct LogDir {
    exists: bool,
    result: std::io::Result<()>,
}

impl LogDir {
    fn check(dir: &Path) -> LogDir {
        let exists = dir.is_dir();
        let result = if !exists && dir.exists() {
            // A file (or something else) where the directory should be: it cannot be created.
            Err(std::io::Error::other("it is a file, not a directory"))
        } else {
            writable(if exists { dir } else { nearest_dir(dir) })
        };
        LogDir { exists, result }
    }
}

/// Everything `doctor` found, for either output.
struct Report<'a> {
    config: &'a Config,
    settings: Vec<(&'static str, String)>,
    chain: Vec<&'static str>,
    checks: &'a [crate::providers::doctor::LinkCheck],
    database: Database,
    logs: LogDir,
    can_run_models: bool,
    all_ok: bool,
}

impl Report<'_> {
    fn print_json(&self) {
        let Report {
            config,
            settings,
            chain,
            checks,
            database,
            logs,
            can_run_models,
            all_ok,
        } = self;
        let (pg, db, db_exists, db_ok, db_dir_ok) = (
            &database.pg,
            &database.db,
            database.exists,
            database.ok,
            database.dir_ok,
        );
        let (logs, logs_exist) = (&logs.result, logs.exists);
        let shown = database.shown();
        let orphaned = &database.orphaned;
        let v = json!({
            "ok": all_ok,
            "settings": settings.iter().map(|(k, v)| (k.to_string(), Value::String(v.clone()))).collect::<Map<_, _>>(),
            "chain": chain,
            "providers": checks,
            "canRunModels": can_run_models,
            "database": match (&pg, &db) {
                (Some(report), db) => json!({
                    "ok": db_ok,
                    "url": report.database,
                    "checks": report.checks,
                    "migrations": report.migrated,
                    "latestMigration": report.latest,
                    "runs": db.as_ref().ok().map(|(_, n)| *n),
                    "error": db.as_ref().err().filter(|_| report.usable()).map(|e| e.message.clone()),
                }),
                (None, Ok((v, n))) => json!({ "ok": true, "path": config.db_file, "schemaVersion": v, "runs": n }),
                (None, Err(_)) if !db_exists => json!({ "ok": db_dir_ok, "path": config.db_file, "exists": false }),
                (None, Err(e)) => json!({ "ok": false, "path": config.db_file, "error": e.message }),
            },
            "logDir": match &logs {
                Ok(()) => json!({ "ok": true, "path": config.log_dir, "exists": logs_exist }),
                Err(e) => json!({ "ok": false, "path": config.log_dir, "error": e.to_string() }),
            },
            "processes": shown.iter().map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                v["state"] = p.state().into();
                v
            }).collect::<Vec<_>>(),
            "orphanedRuns": orphaned,
        });
        say_out!("{}", serde_json::to_string(&v).unwrap_or_default());
    }

    fn print_text(&self) {
        say_out!("configuration (secrets are shown as set/unset only)");
        for (k, v) in &self.settings {
            say_out!("  {k:<20} {v}");
        }
        say_out!();
        self.print_providers();
        say_out!();
        self.print_database();
        self.print_log_dir();
        if self.database.db.is_ok() {
            say_out!();
            self.print_processes();
        }
        say_out!();
        say_out!(
            "{}",
            if !self.can_run_models {
                "nothing can run a model: no provider is configured — set HUGGINGFACE_TOKEN (a free \
                 read token from https://huggingface.co/settings/tokens) in .env, or USE_OLLAMA=true \
                 with `ollama serve`, or OPENAI_BASE_URL; until then only sandbox runs work \
                 (`omniflow run NAME --sandbox`, `t` in the console)"
            } else if self.all_ok {
                "everything configured works"
            } else {
                "something configured does not work: see ✗ above"
            }
        );
    }

    fn print_providers(&self) {
        if self.chain.is_empty() {
            say_out!("provider chain (auto): none configured — set HUGGINGFACE_TOKEN, or USE_OLLAMA=true, or OPENAI_BASE_URL; or run blueprints with --sandbox");
        } else {
            say_out!("provider chain (auto): {}", self.chain.join(" → "));
        }
        for c in self.checks {
            let mark = match c.ok {
                Some(true) => "✓",
                Some(false) => "✗",
                None => "-",
            };
            say_out!("  {mark} {:<12} {}", c.provider, c.detail);
            if !c.configured {
                say_out!("    needs: {}", c.needs);
            }
        }
    }

    fn print_database(&self) {
        let config = self.config;
        let Database {
            pg,
            exists: db_exists,
            db,
            dir_ok: db_dir_ok,
            ok: db_ok,
            ..
        } = &self.database;
        if let Some(report) = pg {
            let mark = if *db_ok { "✓" } else { "✗" };
            match db {
                Ok((_, n)) => say_out!("{mark} database {}  {n} run(s)", report.database),
                Err(e) if report.usable() => {
                    say_out!("✗ database {}  {}", report.database, e.message)
                }
                Err(_) => say_out!("{mark} database {}", report.database),
            }
            for c in &report.checks {
                let mark = if c.ok { "✓" } else { "✗" };
                say_out!("  {mark} {:<12} {}", c.name, c.detail);
            }
        }
        match db {
            _ if pg.is_some() => {}
            Ok((v, n)) => say_out!(
                "✓ database {}  schema v{v}, {n} run(s)",
                config.db_file.display()
            ),
            Err(_) if !db_exists && *db_dir_ok => say_out!(
                "✓ database {}  does not exist yet: the first run creates it",
                config.db_file.display()
            ),
            Err(_) if !db_exists => say_out!(
                "✗ database {}  does not exist and its directory is not writable; set DB_FILE",
                config.db_file.display()
            ),
            Err(e) => say_out!("✗ database {}  {}", config.db_file.display(), e.message),
        }
    }

    fn print_log_dir(&self) {
        let config = self.config;
        match &self.logs.result {
            Ok(()) if !self.logs.exists => say_out!(
                "✓ log directory {} does not exist yet: it is created on first use",
                config.log_dir.display()
            ),
            Ok(()) => say_out!("✓ log directory {} is writable", config.log_dir.display()),
            Err(e) => say_out!(
                "✗ log directory {} is not writable ({e}); set LOG_DIR to a writable directory",
                config.log_dir.display()
            ),
        }
    }

    fn print_processes(&self) {
        let database = &self.database;
        let shown = database.shown();
        let alive = database.processes.iter().filter(|p| p.alive).count();
        say_out!(
            "processes on this database: {alive} alive (each heartbeats every 10 s; silent for {}s = gone)",
            database.lease.as_secs()
        );
        if shown.is_empty() {
            say_out!("  none has run here yet (the console, `omniflow daemon` and `omniflow run` record themselves)");
        }
        let now = std::time::SystemTime::now();
        for p in &shown {
            let mark = match p.state() {
                "alive" => "●",
                "stopped" => "○",
                _ => "✗",
            };
            say_out!("  {mark} {}", p.describe(now));
        }
        if !database.orphaned.is_empty() {
            say_out!(
                "  ! {} unfinished run(s) whose process is gone: a console or daemon takes them over, or `omniflow resume --all`",
                database.orphaned.len()
            );
        }
    }
}

/// The directory `path` is in, or would be created in: its nearest existing ancestor.
fn nearest_dir(path: &Path) -> &Path {
    let mut p = path;
    loop {
        match p.parent() {
            Some(parent) if parent.as_os_str().is_empty() => return Path::new("."),
            Some(parent) if parent.is_dir() => return parent,
            Some(parent) => p = parent,
            None => return Path::new("."),
        }
    }
}

/// Whether files can be written in `dir` (a probe file, removed at once).
fn writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".omniflow-doctor-{}", std::process::id()));
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)
}

/// `doctor --pull MODEL`: Ollama's `/api/pull` with a progress display on stderr.
async fn pull(providers: &crate::providers::Providers, model: &str) -> Result<ExitCode, Failure> {
    let url = providers.config().ollama_url.clone();
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let result = crate::providers::ollama::pull(providers.http(), &url, model, |st| {
        let line = match (st.completed, st.total) {
            (Some(c), Some(t)) if t > 0 => format!(
                "{}  {:>3}%  {:.1}/{:.1} MB",
                st.status,
                c * 100 / t,
                c as f64 / 1e6,
                t as f64 / 1e6
            ),
            _ => st.status.clone(),
        };
        if tty {
            {
                use std::io::Write as _;
                let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
            }
        } else if st.status != last {
            // In a pipe, one line per status, not one per progress tick.
            say_err!("{line}");
        }
        last = st.status.clone();
    })
    .await;
    if tty {
        say_err!();
    }
    match result {
        Ok(()) => {
            say_err!("pulled {model} into Ollama at {url}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(Failure {
            code: 1,
            message: format!("{}: {}", e.kind, e.message),
        }),
    }
}
