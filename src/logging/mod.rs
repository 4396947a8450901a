//! Logging: `tracing` events to daily-rolling JSON files in `LOG_DIR`, which the console's log
//! pane tails, with every secret removed before a byte reaches a file or stderr.
//!
//! # Files
//!
//! `LOG_DIR/omniflow.log.YYYY-MM-DD` (UTC date), a new file each day at midnight UTC, the 14
//! newest kept. [`log_files`] lists them oldest first. Writing goes through a background thread
//! (`tracing_appender::non_blocking`): a log call never waits on the disk, and when the thread
//! falls 128k lines behind, lines are dropped rather than stalling the engine. Keep the
//! [`LogGuard`] alive for the life of the program: dropping it flushes what is buffered.
//!
//! # Line shape (the console's log pane parses this)
//!
//! One JSON object per line (`\n`-terminated, no pretty-printing), always starting with these
//! four keys in this order (the order of the other fields is not part of the contract):
//!
//! ```text
//! {"timestamp":"2025-01-31T17:06:02.123456Z","level":"INFO","target":"omniflow::engine","message":"step finished","run_id":"r-7f3a","step":"summarize[3]","attempt":2,"duration_ms":1840}
//! ```
//!
//! - `timestamp`: RFC 3339, UTC, microseconds, always ending in `Z`;
//! - `level`: `TRACE` | `DEBUG` | `INFO` | `WARN` | `ERROR`;
//! - `target`: the module that logged (for events bridged from the `log` crate, e.g. reqwest,
//!   the crate's own target);
//! - `message`: the text (`""` when the event had none);
//! - then every other field, **flattened at top level**: the fields of the enclosing spans,
//!   outermost first, then the event's own (an event field wins over a span field of the same
//!   name). Numbers and booleans stay JSON numbers and booleans; strings stay strings; `?x`
//!   (Debug) and `%x` (Display) values become strings. A field named `timestamp`, `level`,
//!   `target` or `message` is written as `field_<name>` so it cannot shadow the fixed keys.
//!   Conventional names: `run_id`, `blueprint`, `step`, `attempt`, `kind` (an error kind),
//!   `duration_ms`, `wait_ms`, `worker`.
//!
//! [`LogLine::parse`] reads a line back.
//!
//! Secrets never appear: the writer passes each formatted line through a [`Redactor`] (see
//! [`redact`]) before it reaches the file, whatever a caller logged, so a secret is always
//! replaced by `[REDACTED]`.
//!
//! # Filtering
//!
//! `RUST_LOG` syntax ([`EnvFilter`]): `RUST_LOG` when set, else the `default_filter` given to
//! [`init`] (`"info"` when that is empty). With `stderr_level`, human-readable lines at that
//! level or above also go to stderr (for `omniflow daemon` under systemd or Docker).

pub mod capture;
pub mod redact;

mod json;

pub use json::LogLine;
pub use redact::{Redactor, REDACTED};

use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{Level, Subscriber};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log file names are `omniflow.log.YYYY-MM-DD`.
pub const LOG_FILE_PREFIX: &str = "omniflow.log";

/// How many daily files are kept; older ones are deleted when a new day starts.
const KEEP_FILES: usize = 14;

/// Keeps the background log writer alive; dropping it flushes every buffered line to the file.
/// Hold it in `main` until the program ends.
#[must_use = "dropping the LogGuard stops file logging"]
pub struct LogGuard {
    _worker: WorkerGuard,
    dir: PathBuf,
    problem: Problem,
}

impl LogGuard {
    /// The directory the log files are written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first failure to write a log line since logging started (a full disk, a `LOG_DIR`
    /// taken away), worded with its fix: those lines are lost, and the user should hear so.
    pub fn write_problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

type Problem = Arc<std::sync::Mutex<Option<String>>>;

/// The problem slot of the process's logging, for the long-lived processes (the daemon, the
/// console, `/readyz`) that must say so when logs stop being written after start.
static PROCESS_PROBLEM: std::sync::OnceLock<Problem> = std::sync::OnceLock::new();

/// [`LogGuard::write_problem`] of the process's logging (none before [`init`]).
pub fn write_problem() -> Option<String> {
    PROCESS_PROBLEM
        .get()?
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The log file writer, keeping its first failure for [`LogGuard::write_problem`]: the
/// background thread that drives it drops a failed line without a word.
struct Reporting<W> {
    inner: W,
    dir: PathBuf,
    problem: Problem,
}

impl<W> Reporting<W> {
    fn note(&self, e: &io::Error) {
        let mut slot = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(format!(
                "could not write logs to {} ({}): lines were lost; free space there, or set LOG_DIR to a writable directory",
                self.dir.display(),
                io_reason(e)
            ));
        }
    }
}

impl<W: Write> Write for Reporting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.note(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|e| self.note(e))
    }
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Logging could not start. Every message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The directory cannot be created or written to.
    #[error(
        "cannot write logs to {} ({}): set LOG_DIR to a writable directory",
        .dir.display(),
        io_reason(.source)
    )]
    Unwritable {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The rolling file appender refused to start.
    #[error(
        "cannot open the log file in {} ({reason}): set LOG_DIR to a writable directory",
        .dir.display()
    )]
    Appender { dir: PathBuf, reason: String },
    /// The filter is not valid `RUST_LOG` syntax.
    #[error(
        "invalid log filter {spec:?} from {origin} ({reason}): use RUST_LOG syntax, e.g. \
         RUST_LOG=info or RUST_LOG=omniflow=debug,info"
    )]
    BadFilter {
        spec: String,
        origin: &'static str,
        reason: String,
    },
    /// [`init`] was called twice, or another global subscriber was set first.
    #[error("logging is already initialised in this process")]
    AlreadyInitialized,
}

/// An io error's text without the trailing "(os error 13)".
fn io_reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Starts logging for the whole process (see the module doc for files, line shape and
/// filtering). `secrets` are the values to redact ([`crate::config::Config::secrets`]).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = omniflow::config::Config::load()?;
/// let _guard = omniflow::logging::init(&config.log_dir, config.secrets(), "info", None)?;
/// tracing::info!(run_id = "r-1", "started");
/// # Ok(()) }
/// ```
pub fn init(
    log_dir: &Path,
    secrets: Vec<String>,
    default_filter: &str,
    stderr_level: Option<Level>,
) -> Result<LogGuard, LogError> {
    let (spec, origin) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
        _ => (default_filter.to_string(), "the default filter"),
    };
    let filter = parse_filter(&spec, origin)?;
    let stderr = stderr_level.map(|level| (level, io::stderr));
    let (subscriber, guard) = build(log_dir, secrets, filter, stderr)?;
    subscriber
        .try_init()
        .map_err(|_| LogError::AlreadyInitialized)?;
    let _ = PROCESS_PROBLEM.set(guard.problem.clone());
    Ok(guard)
}

/// Builds the subscriber [`init`] installs, without installing it: for tests
/// (`tracing::subscriber::with_default`) and programs that compose their own. `filter` is in
/// `RUST_LOG` syntax (`"info"`, `"omniflow=debug,warn"`); the environment is not read.
pub fn build_subscriber(
    log_dir: &Path,
    secrets: Vec<String>,
    filter: &str,
    stderr_level: Option<Level>,
) -> Result<(impl Subscriber + Send + Sync + 'static, LogGuard), LogError> {
    let filter = parse_filter(filter, "the filter argument")?;
    build(
        log_dir,
        secrets,
        filter,
        stderr_level.map(|level| (level, io::stderr)),
    )
}

fn parse_filter(spec: &str, origin: &'static str) -> Result<EnvFilter, LogError> {
    let spec = if spec.trim().is_empty() { "info" } else { spec };
    EnvFilter::try_new(spec).map_err(|e| LogError::BadFilter {
        spec: spec.to_string(),
        origin,
        reason: e.to_string(),
    })
}

/// The one place the layers are put together; `stderr` is generic so tests can capture it.
fn build<W>(
    log_dir: &Path,
    secrets: Vec<String>,
    filter: EnvFilter,
    stderr: Option<(Level, W)>,
) -> Result<(impl Subscriber + Send + Sync + 'static, LogGuard), LogError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    check_writable(log_dir)?;
    let appender = RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(LOG_FILE_PREFIX)
        .max_log_files(KEEP_FILES)
        .build(log_dir)
        .map_err(|e| LogError::Appender {
            dir: log_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    let problem = Problem::default();
    let (file_writer, worker) = NonBlockingBuilder::default()
        .thread_name("omniflow-log")
        .finish(Reporting {
            // Lines are written in blocks: the background thread flushes whenever it has
            // written all it was sent, so a line still reaches the file (and the console's
            // log pane) as soon as the thread is idle, without a system call per line.
            inner: io::BufWriter::with_capacity(64 * 1024, appender),
            dir: log_dir.to_path_buf(),
            problem: problem.clone(),
        });

    let redactor = Arc::new(Redactor::new(secrets));
    let file_layer = tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(json::FlatJson)
        .with_ansi(false)
        .with_writer(RedactingMakeWriter::new(file_writer, redactor.clone()));
    let stderr_layer = stderr.map(|(level, writer)| {
        tracing_subscriber::fmt::layer()
            .with_ansi(io::stderr().is_terminal())
            .with_writer(RedactingMakeWriter::new(writer, redactor))
            .with_filter(LevelFilter::from_level(level))
    });
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(file_layer)
        .with(stderr_layer);
    let guard = LogGuard {
        _worker: worker,
        dir: log_dir.to_path_buf(),
        problem,
    };
    Ok((subscriber, guard))
}

/// Creates the directory and proves a file can be written in it, so an unusable `LOG_DIR` is
/// reported at start with its fix instead of failing (or panicking) later.
fn check_writable(dir: &Path) -> Result<(), LogError> {
    let unwritable = |source| LogError::Unwritable {
        dir: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(unwritable)?;
    let probe = dir.join(format!(".omniflow-write-test-{}", std::process::id()));
    fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"ok"))
        .map_err(unwritable)?;
    // A probe left behind is harmless; failing to remove it is not worth an error.
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// The omniflow log files in `log_dir` (`omniflow.log.YYYY-MM-DD`), oldest first. Empty when
/// the directory does not exist or cannot be read.
pub fn log_files(log_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(log_dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, PathBuf)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let date = name.strip_prefix(LOG_FILE_PREFIX)?.strip_prefix('.')?;
            (is_date(date) && entry.file_type().ok()?.is_file()).then(|| (name, entry.path()))
        })
        .collect();
    // ISO dates sort chronologically as text.
    files.sort();
    files.into_iter().map(|(_, path)| path).collect()
}

/// `YYYY-MM-DD`.
fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// A [`MakeWriter`] whose writers redact each formatted line before passing it on.
///
/// The fmt layer formats a whole event into a buffer and writes it with one `write_all`, then
/// drops the writer; [`RedactingWriter`] collects what it is given and redacts it as one piece
/// on flush or drop, so a secret is caught even if the bytes arrive in several writes.
#[derive(Debug, Clone)]
pub struct RedactingMakeWriter<M> {
    inner: M,
    redactor: Arc<Redactor>,
}

impl<M> RedactingMakeWriter<M> {
    pub fn new(inner: M, redactor: Arc<Redactor>) -> Self {
        RedactingMakeWriter { inner, redactor }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMakeWriter<M> {
    type Writer = RedactingWriter<'a, M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter {
            inner: self.inner.make_writer(),
            redactor: &self.redactor,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        RedactingWriter {
            inner: self.inner.make_writer_for(meta),
            redactor: &self.redactor,
            buf: Vec::new(),
        }
    }
}

/// See [`RedactingMakeWriter`].
pub struct RedactingWriter<'a, W: Write> {
    inner: W,
    redactor: &'a Redactor,
    buf: Vec<u8>,
}

impl<W: Write> RedactingWriter<'_, W> {
    fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&self.buf);
        let clean = self.redactor.redact(&text);
        let result = self.inner.write_all(clean.as_bytes());
        self.buf.clear();
        result
    }
}

impl<W: Write> Write for RedactingWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.inner.flush()
    }
}

impl<W: Write> Drop for RedactingWriter<'_, W> {
    fn drop(&mut self) {
        // Nowhere to report a failure from a drop; the non-blocking writer counts its own.
        let _ = self.write_out();
    }
}

#[cfg(test)]
mod tests;
