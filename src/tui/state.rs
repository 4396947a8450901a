//! The console's data: what each pane shows. Plain values, changed only by
//! [`App::update`](super::app::App::update), read by the renderer.

use crate::blueprint::{Blueprint, Priority};
use crate::events::{RunStatus, StepStatus};
use crate::logging::LogLine;
use crate::store::{AttemptRow, RunRow, StepRow};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

/// One file of the blueprint directory.
#[derive(Debug, Clone)]
pub struct BlueprintEntry {
    /// The blueprint's name, or the file stem when it does not load.
    pub name: String,
    pub file: PathBuf,
    /// `None` when the file is invalid; then `problems` says why.
    pub blueprint: Option<Arc<Blueprint>>,
    pub problems: Vec<String>,
}

impl BlueprintEntry {
    pub fn is_valid(&self) -> bool {
        self.blueprint.is_some()
    }
}

/// A worker's job as the workers pane shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSlot {
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    /// When the worker took the job (ms since the epoch).
    pub since_ms: u64,
    /// Tokens its model call has streamed so far (0: none yet, or not a streamed call).
    pub tokens: u64,
}

/// A step waiting for its next attempt (from `StepRetrying`).
#[derive(Debug, Clone, PartialEq)]
pub struct Retrying {
    pub run_id: String,
    pub step: String,
    /// The attempt that failed.
    pub attempt: u32,
    pub kind: String,
    pub message: String,
    /// When the next attempt is due (ms since the epoch).
    pub until_ms: u64,
    /// Not a failure: the step waits for its provider's rate limit (`kind` is the provider).
    pub waiting: bool,
    /// The step waits for a free place among its provider's calls in flight (this many of
    /// them); no countdown: it lasts until the step starts.
    pub slots: Option<usize>,
}

/// A run of this process, from the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveRun {
    pub run_id: String,
    pub blueprint: String,
    pub priority: Priority,
    pub status: RunStatus,
    pub sandbox: bool,
    pub steps_done: u32,
    pub steps_failed: u32,
}

/// Seconds kept by the sparklines.
pub const SPARK_SECONDS: usize = 180;

/// Per-second counts of finished steps and failed attempts over the last minutes.
#[derive(Debug, Clone, Default)]
pub struct Spark {
    /// Oldest first; the last bucket is the current second.
    pub done: VecDeque<u64>,
    pub failed: VecDeque<u64>,
    /// The second (since the epoch) of the last bucket.
    pub second: u64,
}

impl Spark {
    /// Moves the window to `now_ms`, opening empty buckets for the seconds that passed.
    pub fn advance(&mut self, now_ms: u64) {
        let sec = now_ms / 1000;
        if self.done.is_empty() {
            self.second = sec;
            self.done.push_back(0);
            self.failed.push_back(0);
            return;
        }
        let gap = sec.saturating_sub(self.second).min(SPARK_SECONDS as u64);
        for _ in 0..gap {
            self.done.push_back(0);
            self.failed.push_back(0);
        }
        self.second = self.second.max(sec);
        while self.done.len() > SPARK_SECONDS {
            self.done.pop_front();
            self.failed.pop_front();
        }
    }
    pub fn add_done(&mut self, now_ms: u64) {
        self.advance(now_ms);
        if let Some(b) = self.done.back_mut() {
            *b += 1;
        }
    }
    pub fn add_failed(&mut self, now_ms: u64) {
        self.advance(now_ms);
        if let Some(b) = self.failed.back_mut() {
            *b += 1;
        }
    }
    /// Totals over the last `secs` full seconds.
    pub fn recent(&self, secs: usize) -> (u64, u64) {
        let n = self.done.len();
        let from = n.saturating_sub(secs);
        (
            self.done.iter().skip(from).sum(),
            self.failed.iter().skip(from).sum(),
        )
    }
}

/// Which log lines the log pane shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelFilter {
    All,
    Info,
    Warn,
    Error,
}

impl LevelFilter {
    pub fn next(self) -> LevelFilter {
        match self {
            LevelFilter::All => LevelFilter::Info,
            LevelFilter::Info => LevelFilter::Warn,
            LevelFilter::Warn => LevelFilter::Error,
            LevelFilter::Error => LevelFilter::All,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            LevelFilter::All => "all",
            LevelFilter::Info => "info+",
            LevelFilter::Warn => "warn+",
            LevelFilter::Error => "error",
        }
    }
    pub fn admits(self, level: &str) -> bool {
        let rank = match level {
            "ERROR" => 4,
            "WARN" => 3,
            "INFO" => 2,
            _ => 1,
        };
        rank >= match self {
            LevelFilter::All => 0,
            LevelFilter::Info => 2,
            LevelFilter::Warn => 3,
            LevelFilter::Error => 4,
        }
    }
}

/// One log line, reduced to what the pane shows.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// `HH:MM:SS` (UTC) or the raw timestamp.
    pub time: String,
    pub level: String,
    pub message: String,
    pub run_id: Option<String>,
    /// The step the line is about (its key, e.g. `summarize[1]`, or a node id), if any.
    pub step: Option<String>,
    /// The remaining fields as `key=value` (not the run id or the step).
    pub rest: String,
}

impl LogEntry {
    /// A line as written by [`crate::logging`]; anything else is shown raw.
    pub fn from_line(line: &str) -> LogEntry {
        match LogLine::parse(line) {
            Some(l) => {
                // Parsed, not cut by offsets: a timestamp in another shape is shown whole.
                let time = humantime::parse_rfc3339_weak(l.timestamp.trim_end_matches('Z'))
                    .map(|t| crate::store::utc_clock(t, false))
                    .unwrap_or_else(|_| l.timestamp.clone());
                let run_id = l
                    .fields
                    .get("run_id")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                let step = l
                    .fields
                    .get("step")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                let rest = l
                    .fields
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "run_id" | "step"))
                    .map(|(k, v)| match v.as_str() {
                        Some(s) => format!("{k}={s}"),
                        None => format!("{k}={v}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                LogEntry {
                    time,
                    level: l.level,
                    message: l.message,
                    run_id,
                    step,
                    rest,
                }
            }
            None => LogEntry {
                time: String::new(),
                level: "RAW".into(),
                message: line.trim_end().to_string(),
                run_id: None,
                step: None,
                rest: String::new(),
            },
        }
    }

    /// The text searched by `/`.
    pub fn haystack(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.level,
            self.message,
            self.step.as_deref().unwrap_or(""),
            self.run_id.as_deref().unwrap_or(""),
            self.rest
        )
        .to_lowercase()
    }
}

/// Log lines kept in memory (the files keep the rest).
pub const LOG_KEEP: usize = 5000;

#[derive(Debug, Clone)]
pub struct LogState {
    pub lines: VecDeque<LogEntry>,
    /// Why the log directory cannot be read or written, if so.
    pub problem: Option<String>,
    pub level: LevelFilter,
    pub search: String,
    /// Show only this run's lines.
    pub run_filter: Option<String>,
    /// With `run_filter`, show only the lines of this step of the run. Exact: `summarize[1]`
    /// matches neither `summarize[2]` nor the node's own lines (`step=summarize`).
    pub step_filter: Option<String>,
    /// Following new lines (false: paused, scrolled back).
    pub follow: bool,
    /// Visible lines above the bottom when not following.
    pub scroll: usize,
    /// Rows of the pane at the last frame, as the renderer reports them: scrolling stops
    /// with the oldest line at the top (a full pane), not with one line and blank rows.
    pub rows: std::cell::Cell<usize>,
    /// Lines pushed since the start (the newest line's number is `pushed - 1`).
    pub pushed: u64,
    /// Older lines of one run, read from the log files on `o` (the pane holds only the tail):
    /// (run id, its lines, the number of the first pushed line not already among them).
    pub older: Option<(String, Vec<LogEntry>, u64)>,
}

impl Default for LogState {
    fn default() -> Self {
        LogState {
            lines: VecDeque::new(),
            problem: None,
            level: LevelFilter::All,
            search: String::new(),
            run_filter: None,
            step_filter: None,
            follow: true,
            scroll: 0,
            rows: std::cell::Cell::new(0),
            pushed: 0,
            older: None,
        }
    }
}

impl LogState {
    pub fn push(&mut self, e: LogEntry) {
        self.lines.push_back(e);
        self.pushed += 1;
        if self.lines.len() > LOG_KEEP {
            self.lines.pop_front();
        }
    }

    /// Whether a line passes the filters.
    pub fn admits(&self, l: &LogEntry) -> bool {
        let needle = self.search.to_lowercase();
        (self.level.admits(&l.level) || l.level == "RAW")
            && match &self.run_filter {
                Some(r) => l.run_id.as_deref() == Some(r.as_str()),
                None => true,
            }
            && match &self.step_filter {
                Some(s) => l.step.as_deref() == Some(s.as_str()),
                None => true,
            }
            && (needle.is_empty() || l.haystack().contains(&needle))
    }

    /// The lines that pass the filters, oldest first: with a run filter, the run's older
    /// lines read from the files, then the ones that arrived since.
    pub fn visible(&self) -> Vec<&LogEntry> {
        let first = self.pushed.saturating_sub(self.lines.len() as u64);
        let (older, from): (&[LogEntry], u64) = match (&self.older, &self.run_filter) {
            (Some((id, lines, mark)), Some(r)) if id == r => (lines.as_slice(), *mark),
            _ => (&[], 0),
        };
        older
            .iter()
            .chain(
                self.lines
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| first + *i as u64 >= from)
                    .map(|(_, l)| l),
            )
            .filter(|l| self.admits(l))
            .collect()
    }

    /// The largest scroll that still fills the pane.
    pub fn max_scroll(&self) -> usize {
        self.visible().len().saturating_sub(self.rows.get().max(1))
    }
}

/// Rows per history page.
pub const PAGE: usize = 100;

#[derive(Debug, Clone)]
pub struct HistoryState {
    /// The current page, newest first.
    pub rows: Vec<RunRow>,
    /// Runs matching the filter, when counted.
    pub total: Option<u64>,
    /// `cursors[i]` is the keyset cursor of page `i` (`None` for the first).
    pub cursors: Vec<Option<crate::store::RunCursor>>,
    pub page: usize,
    pub selected: usize,
    pub status: Option<RunStatus>,
    /// Exactly this blueprint (`b`).
    pub blueprint: Option<String>,
    /// Blueprint names containing this text (`/`).
    pub name_contains: Option<String>,
    /// A query is in flight.
    pub loading: bool,
    /// Results of older queries are ignored.
    pub generation: u64,
    /// Why the database cannot be read, if so.
    pub problem: Option<String>,
    /// Something changed since the last query (a run finished, time passed).
    pub stale: bool,
    pub last_query_ms: u64,
    /// Set once a first page has arrived.
    pub loaded: bool,
    /// A problem with the database that does not stop the pane (e.g. a temporary fallback).
    pub banner: Option<String>,
    /// Ends of runs this console saw happen (`RunFinished`), laid over the rows a query
    /// returns until the database shows them too: a query that was already running when a
    /// run finished must not bring its row back as `running`.
    pub finished: std::collections::HashMap<String, (RunStatus, u64, Option<String>)>,
}

impl HistoryState {
    /// Lays the known run ends over `rows`; forgets those the database now agrees with.
    pub fn overlay_finished(&mut self) {
        for row in &mut self.rows {
            if row.status.is_final() {
                self.finished.remove(&row.id);
            } else if let Some((status, took, error)) = self.finished.get(&row.id) {
                row.status = *status;
                row.total_time_ms = Some(*took);
                row.error.clone_from(error);
            }
        }
    }
}

impl Default for HistoryState {
    fn default() -> Self {
        HistoryState {
            rows: Vec::new(),
            total: None,
            cursors: vec![None],
            page: 0,
            selected: 0,
            status: None,
            blueprint: None,
            name_contains: None,
            loading: false,
            generation: 0,
            problem: None,
            stale: true,
            last_query_ms: 0,
            loaded: false,
            banner: None,
            finished: std::collections::HashMap::new(),
        }
    }
}

impl HistoryState {
    pub fn selected_row(&self) -> Option<&RunRow> {
        self.rows.get(self.selected)
    }
}

/// One run as the detail screen shows it.
#[derive(Debug, Clone)]
pub struct RunDetail {
    pub run: RunRow,
    pub steps: Vec<StepRow>,
    pub attempts: Vec<AttemptRow>,
}

impl RunDetail {
    pub fn attempts_of<'a>(&'a self, step: &'a str) -> impl Iterator<Item = &'a AttemptRow> + 'a {
        self.attempts.iter().filter(move |a| a.step_key == step)
    }
    pub fn failed_steps(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.status, StepStatus::Error | StepStatus::Cancelled))
            .count()
    }
}

#[derive(Debug, Clone)]
pub struct DetailState {
    pub run_id: String,
    pub data: Option<RunDetail>,
    pub problem: Option<String>,
    pub selected: usize,
    /// Lines scrolled in the step's text panel.
    pub scroll: u16,
    /// Rows of the step's text panel at the last frame, as the renderer reports them (like
    /// ratatui's widget states): PgUp/PgDn move by this much.
    pub text_rows: std::cell::Cell<u16>,
    /// Rows of the step's text at the last frame (wrapped): scrolling stops at its end.
    pub text_total: std::cell::Cell<u16>,
    pub generation: u64,
    pub loading: bool,
    /// An event about this run arrived since the last load.
    pub stale: bool,
    /// When the data last arrived (a run still in flight is re-read every 2 s, so a run of
    /// another process moves too).
    pub loaded_ms: u64,
}

/// Rows of the steps table when it is stacked above the step's text (narrow terminals).
pub fn detail_steps_rows(body_h: u16, steps: usize) -> u16 {
    // Saturating: a run of more than 65,532 steps must not wrap to a tiny table.
    u16::try_from(steps)
        .unwrap_or(u16::MAX)
        .saturating_add(3)
        .min(body_h * 2 / 5)
        .max(4)
}

/// Process memory as the memory pane shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    /// Resident set size in bytes, when the platform tells.
    pub rss: Option<u64>,
    pub threshold_mb: u64,
}

/// What the console knows of the fleet beyond its own process (`DATABASE_URL=postgres://…`;
/// absent on SQLite): runs other processes announced, the shared queue, the attempts every
/// process is running.
#[derive(Debug, Clone, Default)]
pub struct FleetState {
    /// The `LISTEN` connection is up: other processes' changes arrive as they commit, and the
    /// periodic re-reads slow down.
    pub listening: bool,
    /// Why it is not, when it dropped.
    pub listen_problem: Option<String>,
    /// Runs announced by other processes and not re-read yet (coalesced: one read for all
    /// that arrived while the previous one was in flight).
    pub pending: std::collections::BTreeSet<String>,
    /// A re-read of single runs is in flight.
    pub reloading: bool,
    /// Runs re-read because another process announced them (for the curious and the tests).
    pub reloaded: u64,
    /// The rows re-read last, laid over a page that was read before them (see
    /// `App::overlay_fresh`).
    pub fresh: std::collections::HashMap<String, crate::store::RunRow>,
    /// The shared queue's rows waiting to be claimed, by `Priority::index` (`Queue::depth`).
    pub depth: Option<[u64; 4]>,
    /// Attempts running on every process, oldest claim first.
    pub running: Vec<crate::store::pg::fleet_view::RunningAttempt>,
    /// Why the shared queue cannot be read, if so.
    pub problem: Option<String>,
    /// A read of the queue is in flight.
    pub loading: bool,
    /// Something was announced since the last read of the queue.
    pub stale: bool,
    /// When the queue was last read (ms since the epoch).
    pub loaded_ms: u64,
}

impl FleetState {
    pub fn depth_total(&self) -> Option<u64> {
        self.depth.map(|d| d.iter().sum())
    }
}
