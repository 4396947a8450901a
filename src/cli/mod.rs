//! The `omniflow` command line. Exit codes: 0 success, 1 the run failed, 2 bad input or
//! configuration, 3 interrupted or handed over (`omniflow resume` finishes the run).
//! Diagnostics and progress go to stderr; stdout carries results (`--json`: exactly one JSON
//! object).

/// `eprintln!` that cannot panic: after SIGHUP the terminal is gone and a write to it fails,
/// and a failed write must not turn an interrupted run into a crash.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that cannot panic (a closed pipe, `omniflow runs | head -1`, or a gone
/// terminal).
macro_rules! say_out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod commands;
// `omniflow daemon`.
mod daemon;
// `omniflow health`: the container healthcheck's probe.
mod health;
mod progress;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "omniflow",
    version,
    about = "Run LLM automations (blueprints) through a priority pool and watch them from a terminal.",
    after_help = "Without a command, opens the console on blueprints/.\nConfiguration: environment variables or .env (see .env.example).\n\nExit codes: 0 success · 1 the run failed · 2 bad input or configuration · 3 interrupted or handed over (SIGTERM, SIGHUP, Ctrl-C; `omniflow resume` finishes a handed-over run).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a command: the console's options (`omniflow --theme light`).
    #[command(flatten)]
    pub tui: TuiArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open the console (the default).
    Tui(TuiArgs),
    /// Run one blueprint (or every active one) headless, with progress on stderr.
    ///
    /// Exit codes: 0 every run succeeded · 1 a run failed · 2 bad input · 3 interrupted:
    /// SIGTERM or SIGHUP handed the run over (`omniflow resume <id>` finishes it), or Ctrl-C
    /// cancelled it.
    Run(RunArgs),
    /// Continue runs interrupted by a crash (or handed over by a shutdown).
    ///
    /// Exit codes: 0 every run succeeded · 1 a run failed · 2 bad input, or the run is held by
    /// a live process · 3 interrupted again (SIGTERM, SIGHUP, Ctrl-C).
    Resume(ResumeArgs),
    /// Check blueprint files and report every problem with its path.
    Validate(ValidateArgs),
    /// List runs from the history, newest first.
    Runs(RunsArgs),
    /// Show one run: its steps, attempts, errors, tokens and timings.
    Show(ShowArgs),
    /// Print the blueprint JSON Schema.
    Schema,
    /// Copy the history database consistently while it is in use.
    Backup(BackupArgs),
    /// Copy the SQLite history (DB_FILE) into PostgreSQL, to move a setup onto a shared
    /// database. Safe to run again: it adds only what is missing (and brings runs that were
    /// still in flight up to date), so an interrupted copy resumes.
    Migrate(MigrateArgs),
    /// Check the configuration, the model providers (live), the database and the log
    /// directory (creating neither); exit 0 when everything configured works, 2 when no
    /// provider is configured (nothing can run a model).
    Doctor(DoctorArgs),
    /// Export a blueprint as a standalone program: python, node, github-action or docker.
    Export(ExportArgs),
    /// Headless: fire the active blueprints' schedules through the pool until SIGTERM, SIGINT
    /// or SIGHUP (for systemd or Docker); exits 0 after handing unfinished runs over.
    Daemon(DaemonArgs),
    /// Probe a running daemon's or console's /healthz (or /readyz): exit 0 when it answers
    /// 200, 1 otherwise. For container healthchecks on images without curl.
    Health(HealthArgs),
}

/// `omniflow health`.
#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The URL to probe; default: /healthz on OMNIFLOW_LISTEN (0.0.0.0 is asked on 127.0.0.1).
    #[arg(long)]
    pub url: Option<String>,
    /// Probe /readyz instead of /healthz.
    #[arg(long, conflicts_with = "url")]
    pub ready: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

/// `--listen`: where `/metrics`, `/healthz` and `/readyz` are served (overrides
/// OMNIFLOW_LISTEN).
fn listen_arg(s: &str) -> Result<std::net::SocketAddr, String> {
    crate::config::parse_listen(s).map_err(|e| format!("expected {e}"))
}

/// Where `run --all-active` and `daemon` find the active blueprints.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// Supabase when SUPABASE_URL and SUPABASE_KEY are set, else --dir.
    #[default]
    Auto,
    /// The files in --dir.
    Dir,
    /// The `blueprints` table of SUPABASE_URL (rows with active = true).
    Supabase,
    /// Both.
    Both,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Where the blueprints are.
    #[arg(long, default_value = "blueprints")]
    pub dir: PathBuf,
    /// Where to find the active blueprints.
    #[arg(long, value_enum, default_value_t = Source::Auto)]
    pub source: Source,
    /// Run the scheduled blueprints in the sandbox (simulated model, notifications recorded
    /// and not sent): to try schedules safely.
    #[arg(long)]
    pub sandbox: bool,
    /// With --sandbox: make this fraction of model calls fail (0.3 = 30 %), to watch retries.
    #[arg(long, value_name = "RATE", requires = "sandbox")]
    pub simulate_failures: Option<f64>,
    /// Serve /metrics, /healthz and /readyz here: a port (loopback) or an address with a port
    /// (overrides OMNIFLOW_LISTEN; port 0 picks a free one, logged at start).
    #[arg(long, value_name = "ADDR", value_parser = listen_arg)]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug, Default)]
pub struct TuiArgs {
    /// Colour theme: dark, light, high-contrast, or another file in themes/ (without .toml).
    #[arg(long, env = "OMNIFLOW_THEME")]
    pub theme: Option<String>,
    /// Where the blueprints are.
    #[arg(long, default_value = "blueprints")]
    pub dir: PathBuf,
    /// Fire the active blueprints' schedules from this console too. Off by default: schedules
    /// belong to `omniflow daemon`, and opening a console never starts real runs by itself.
    #[arg(long)]
    pub schedules: bool,
    /// Serve /metrics, /healthz and /readyz here while the console runs (overrides
    /// OMNIFLOW_LISTEN).
    #[arg(long, value_name = "ADDR", value_parser = listen_arg)]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A blueprint file, or the name of one in --dir.
    #[arg(required_unless_present = "all_active")]
    pub blueprint: Option<String>,
    /// Run every active blueprint in --dir, in priority order, through one pool.
    #[arg(long, conflicts_with = "blueprint")]
    pub all_active: bool,
    /// Where blueprints are looked up by name.
    #[arg(long, default_value = "blueprints")]
    pub dir: PathBuf,
    /// With --all-active: where to find the active blueprints.
    #[arg(long, value_enum, default_value_t = Source::Auto, requires = "all_active")]
    pub source: Source,
    /// Set a variable: KEY=VALUE (VALUE is JSON when it parses as JSON, else text). Repeatable.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// Use the simulated model; record notifications instead of sending them.
    #[arg(long)]
    pub sandbox: bool,
    /// In a sandbox run, make this fraction of model calls fail (0.3 = 30 %).
    #[arg(long, value_name = "RATE")]
    pub simulate_failures: Option<f64>,
    /// Reproduce a sandbox run's injected failures.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the blueprint's priority: critical, high, normal or low.
    #[arg(long)]
    pub priority: Option<String>,
    /// Print exactly one JSON object with the outcome on stdout.
    #[arg(long)]
    pub json: bool,
    /// In a sandbox run, answer model calls with the recorded outputs of this earlier run's
    /// steps (by step key); steps it did not record get the simulated model.
    #[arg(long, value_name = "RUN_ID")]
    pub replay: Option<String>,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Pull this model into Ollama (at OLLAMA_URL) with a progress display, then exit.
    #[arg(long, value_name = "MODEL")]
    pub pull: Option<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// A run id, or a unique prefix of one.
    #[arg(required_unless_present = "all")]
    pub run_id: Option<String>,
    /// Every interrupted run whose process is gone.
    #[arg(long, conflicts_with = "run_id")]
    pub all: bool,
    /// Print exactly one JSON object with the outcome(s) on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Blueprint files (.json or .toml).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print the problems as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    /// Only runs with this status: queued, running, success, error, cancelled.
    #[arg(long)]
    pub status: Option<String>,
    /// Only runs of this blueprint.
    #[arg(long)]
    pub blueprint: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// A run id, or a unique prefix of one.
    pub run_id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Where to write the copy.
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The PostgreSQL database to copy into (`postgres://USER:PASSWORD@HOST:5432/DB`);
    /// default: DATABASE_URL.
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// The SQLite history to copy; default: DB_FILE.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Print what was copied as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A blueprint file, or the name of one in --dir.
    pub blueprint: String,
    /// python, node, github-action or docker.
    #[arg(long)]
    pub target: String,
    /// The directory to write (created; refused if not empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    pub force: bool,
    /// Where blueprints are looked up by name.
    #[arg(long, default_value = "blueprints")]
    pub dir: PathBuf,
}

/// An error that ends the command: its message and exit code.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Bad input: exit 2.
    pub fn input(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Names this process's PostgreSQL connections (`pg_stat_activity.application_name`).
    crate::store::pg::connect::set_command(match &cli.command {
        None | Some(Command::Tui(_)) => "tui",
        Some(Command::Run(_)) => "run",
        Some(Command::Resume(_)) => "resume",
        Some(Command::Validate(_)) => "validate",
        Some(Command::Runs(_)) => "runs",
        Some(Command::Show(_)) => "show",
        Some(Command::Schema) => "schema",
        Some(Command::Backup(_)) => "backup",
        Some(Command::Migrate(_)) => "migrate",
        Some(Command::Export(_)) => "export",
        Some(Command::Daemon(_)) => "daemon",
        Some(Command::Doctor(_)) => "doctor",
        Some(Command::Health(_)) => "health",
    });
    let result = match cli.command {
        None => commands::tui(cli.tui),
        Some(Command::Tui(a)) => commands::tui(a),
        Some(Command::Run(a)) => commands::run(a),
        Some(Command::Resume(a)) => commands::resume(a),
        Some(Command::Validate(a)) => commands::validate(a),
        Some(Command::Runs(a)) => commands::runs(a),
        Some(Command::Show(a)) => commands::show(a),
        Some(Command::Schema) => commands::schema(),
        Some(Command::Backup(a)) => commands::backup(a),
        Some(Command::Migrate(a)) => commands::migrate(a),
        Some(Command::Export(a)) => commands::export(a),
        Some(Command::Daemon(a)) => daemon::daemon(a),
        Some(Command::Doctor(a)) => commands::doctor(a),
        Some(Command::Health(a)) => health::health(a),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            if !f.message.is_empty() {
                // Not eprintln!: with the terminal gone it would panic.
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}
