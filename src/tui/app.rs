//! The console's state machine: every input (a key, an engine event, a background result, a
//! clock tick) is a [`Msg`]; [`App::update`] is the only place state changes, and it returns
//! [`Effect`]s — work for the background (queries, starting runs, file IO) that the runtime
//! carries out and answers with a [`Bg`] message. `update` itself does no I/O, so every key
//! action is testable with synthetic messages and a fixed clock.

use super::state::*;
use super::theme::Theme;
use crate::blueprint::{parse_var_value, Blueprint, Format, Priority};
use crate::engine::RunRequest;
use crate::events::{Event, PoolStats, RunStatus, StepStatus};
use crate::pool::WorkerState;
use crate::store::{RunFilter, RunRow};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui_textarea::{CursorMove, TextArea};
use serde_json::Map;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

pub mod bindings;
mod fleet;
mod forms;
mod keys;

pub use fleet::{host_of, pid_of};

use forms::editor_area;
pub use forms::{parse_rate, DISCARD_NOTE};

/// Everything that can change the console's state.
#[derive(Debug)]
pub enum Msg {
    Key(KeyEvent),
    Engine(Event),
    Bg(Bg),
    /// The clock moved (ms since the epoch); drives countdowns, sparklines and refreshes.
    Tick(u64),
}

/// Results of background work, and periodic samples.
#[derive(Debug)]
pub enum Bg {
    Blueprints(Result<Vec<BlueprintEntry>, String>),
    History {
        generation: u64,
        result: Result<(Vec<RunRow>, Option<u64>), String>,
    },
    Detail {
        generation: u64,
        result: Result<Box<RunDetail>, String>,
    },
    Logs(Vec<LogEntry>),
    /// A run's lines from the log files (`Effect::FindRunLogs`).
    RunLogs {
        run_id: String,
        mark: u64,
        result: Result<Vec<LogEntry>, String>,
    },
    LogProblem(Option<String>),
    /// Writing the log files failed after start: lines are being lost.
    LogWriteFailed(String),
    /// Pool state and process memory, sampled a few times a second.
    Sample {
        rss: Option<u64>,
        stats: PoolStats,
        workers: Vec<WorkerState>,
    },
    /// A run was started by an action.
    Started {
        run_id: String,
        what: String,
    },
    /// An action could not be done; the text says why.
    Failed(String),
    Notice(String),
    EditorText {
        path: PathBuf,
        result: Result<String, String>,
    },
    /// A blueprint file was written; the text names the backup (`None`: it was unchanged,
    /// nothing written).
    Saved {
        path: PathBuf,
        result: Result<Option<String>, String>,
    },
    /// The event subscription lost lifecycle events (the console fell far behind).
    Lagged(u64),
    /// Every process on the database, with its health from its heartbeats.
    Processes(Result<Vec<crate::store::ProcessRow>, String>),
    /// From the fleet's `LISTEN` connection: runs another process changed, or the
    /// connection's state.
    Live(crate::store::pg::events::Live),
    /// The rows of runs another process announced, read again (`Effect::ReloadRuns`).
    RunsReloaded(Result<Vec<RunRow>, String>),
    /// The shared queue: its depth by priority and the attempts every process runs.
    Fleet(Result<([u64; 4], Vec<crate::store::pg::fleet_view::RunningAttempt>), String>),
}

/// Work for the runtime (never done by `update` itself).
#[derive(Debug)]
pub enum Effect {
    LoadBlueprints,
    QueryHistory {
        generation: u64,
        filter: RunFilter,
    },
    LoadDetail {
        generation: u64,
        run_id: String,
    },
    Start {
        blueprint: Arc<Blueprint>,
        request: Box<RunRequest>,
    },
    /// Writes the blueprint as a standalone program (`omniflow export`) to `out`.
    Export {
        blueprint: Arc<Blueprint>,
        target: crate::export::Target,
        out: PathBuf,
    },
    /// Retry a run as a new run: whole, or reusing the outputs of its successful steps.
    Retry {
        run_id: String,
        only_failed: bool,
    },
    Cancel {
        run_id: String,
    },
    SetPriority {
        run_id: String,
        priority: Priority,
    },
    SetPaused(bool),
    /// Reads every line about `run_id` from the log files; `mark` is the number of the next
    /// line the tailer will push (those are not read again).
    FindRunLogs {
        run_id: String,
        mark: u64,
    },
    ReadFile(PathBuf),
    /// Writes `text` to `path` after copying the old file to `path.bak`.
    SaveFile {
        path: PathBuf,
        text: String,
    },
    /// Reads these runs' rows again (other processes announced changes to them).
    ReloadRuns(Vec<String>),
    /// Reads the shared queue's depth and the attempts every process runs.
    LoadFleet,
    Quit,
}

/// Who fires the active blueprints' schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleOwner {
    /// A live `omniflow daemon` on this database, on this host.
    Daemon(String),
    /// This console (started with `--schedules`).
    ThisConsole,
    /// Nobody: schedules do not fire while only this console runs.
    Off,
}

impl ScheduleOwner {
    pub fn label(&self) -> String {
        match self {
            ScheduleOwner::Daemon(h) => format!("schedules: daemon on {h}"),
            ScheduleOwner::ThisConsole => "schedules: this console".into(),
            ScheduleOwner::Off => "schedules: off".into(),
        }
    }
}

/// What quitting does with the runs still in flight in this console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuitMode {
    /// Cancel them (recorded `cancelled`).
    #[default]
    Cancel,
    /// Hand them over: left unfinished with no owner, for a daemon, the next console or
    /// `omniflow resume` to continue.
    HandOver,
    /// Wait until they finish, then quit.
    Finish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Blueprints,
    Workers,
    History,
    Logs,
}

impl Focus {
    pub const ORDER: [Focus; 4] = [
        Focus::Blueprints,
        Focus::Workers,
        Focus::History,
        Focus::Logs,
    ];
    fn step(self, by: isize) -> Focus {
        let i = Focus::ORDER.iter().position(|f| *f == self).unwrap_or(0) as isize;
        let n = Focus::ORDER.len() as isize;
        Focus::ORDER[((i + by).rem_euclid(n)) as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormField {
    Vars,
    Rate,
}

/// The sandbox-test form.
#[derive(Debug)]
pub struct SandboxForm {
    pub blueprint: Arc<Blueprint>,
    pub vars: TextArea<'static>,
    pub rate: TextArea<'static>,
    pub field: FormField,
    pub error: Option<String>,
}

/// The blueprint editor.
#[derive(Debug)]
pub struct Editor {
    pub path: PathBuf,
    /// `None` while the file is being read.
    pub text: Option<TextArea<'static>>,
    pub original: String,
    /// Problems found at the last save (or at load, for an invalid file).
    pub problems: Vec<String>,
    pub note: Option<String>,
}

impl Editor {
    pub fn modified(&self) -> bool {
        self.text
            .as_ref()
            .is_some_and(|t| t.lines().join("\n") != self.original.trim_end_matches('\n'))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Confirm {
    Quit {
        in_flight: usize,
    },
    Cancel {
        run_id: String,
        blueprint: String,
    },
    Run {
        blueprint: String,
    },
    Retry {
        run_id: String,
        blueprint: String,
    },
    /// Export a blueprint as code: the target is the key pressed.
    Export {
        blueprint: String,
    },
}

#[derive(Debug)]
pub enum Overlay {
    None,
    /// The key list, scrolled by this many lines.
    Help(u16),
    /// The processes on the database (`P`), scrolled by this many lines.
    Processes(u16),
    /// The status message and the start-up problems in full (`m`).
    Message,
    Confirm(Confirm),
    /// Typing a search or filter for the focused pane.
    Search {
        target: Focus,
        text: String,
    },
    Sandbox(Box<SandboxForm>),
    Editor(Box<Editor>),
}

#[derive(Debug)]
pub enum Screen {
    Main,
    Detail(Box<DetailState>),
}

/// A message on the status line.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub text: String,
    /// Keys that act on what the message is about (`r retry`): kept whole at the end of the
    /// line when the text has to be cut.
    pub keys: Option<String>,
    pub error: bool,
    pub until_ms: u64,
}

/// The whole console state.
#[derive(Debug)]
pub struct App {
    pub now_ms: u64,
    pub dir: PathBuf,
    pub theme: Theme,
    /// Themes the theme key cycles through (loaded at start).
    pub themes: Vec<Theme>,
    pub blueprints: Vec<BlueprintEntry>,
    pub blueprints_loaded: bool,
    pub blueprints_problem: Option<String>,
    pub bp_selected: usize,
    pub bp_filter: String,
    pub pool: PoolStats,
    pub workers: Vec<Option<WorkerSlot>>,
    pub worker_selected: usize,
    pub retrying: Vec<Retrying>,
    pub runs: BTreeMap<String, LiveRun>,
    pub spark: Spark,
    pub memory: Memory,
    pub logs: LogState,
    pub history: HistoryState,
    pub focus: Focus,
    pub screen: Screen,
    pub overlay: Overlay,
    pub status: Option<Status>,
    /// The last status message, kept after it leaves the status line (`m` shows it in full).
    pub last_status: Option<Status>,
    /// Problems found at start (database, logging, theme), shown until dismissed.
    pub startup_problems: Vec<String>,
    pub dropped_events: u64,
    /// The processes on the database, newest heartbeat first (refreshed every 2 s).
    pub processes: Vec<crate::store::ProcessRow>,
    pub processes_problem: Option<String>,
    pub db_path: String,
    /// This console fires the active blueprints' schedules (started with `--schedules`).
    pub schedules_here: bool,
    pub quit: bool,
    /// What quitting does with runs still in flight.
    pub quit_mode: QuitMode,
    /// Why no model provider can answer (`None`: at least one is configured). Said before a
    /// real run starts.
    pub no_provider: Option<String>,
    /// Left with Ctrl-C (the exit status says so).
    pub interrupted: bool,
    /// The sandbox failure rate last started per blueprint in this session (the form's text).
    pub sandbox_rates: std::collections::HashMap<String, String>,
    /// Something visible changed since the last frame.
    pub dirty: bool,
    /// The fleet beyond this process, when the history is a shared PostgreSQL database.
    pub fleet: Option<FleetState>,
    /// The size budgets: the editor checks a blueprint against `MAX_BLUEPRINT_BYTES`, the
    /// sandbox form a variable's text against `MAX_VARIABLE_BYTES`, before parsing them.
    pub limits: crate::limits::Limits,
}

/// How often the history is re-read (runs from other processes appear).
pub const HISTORY_REFRESH_MS: u64 = 2000;
/// How long a status message stays.
const STATUS_MS: u64 = 6000;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl App {
    pub fn new(dir: PathBuf, theme: Theme, themes: Vec<Theme>, concurrency: usize) -> App {
        App {
            now_ms: 0,
            dir,
            theme,
            themes,
            blueprints: Vec::new(),
            blueprints_loaded: false,
            blueprints_problem: None,
            bp_selected: 0,
            bp_filter: String::new(),
            pool: PoolStats {
                concurrency,
                ..PoolStats::default()
            },
            workers: vec![None; concurrency],
            worker_selected: 0,
            retrying: Vec::new(),
            runs: BTreeMap::new(),
            spark: Spark::default(),
            memory: Memory {
                rss: None,
                threshold_mb: 500,
            },
            logs: LogState::default(),
            history: HistoryState::default(),
            focus: Focus::Blueprints,
            screen: Screen::Main,
            overlay: Overlay::None,
            status: None,
            last_status: None,
            startup_problems: Vec::new(),
            dropped_events: 0,
            processes: Vec::new(),
            processes_problem: None,
            db_path: String::new(),
            schedules_here: false,
            quit: false,
            quit_mode: QuitMode::Cancel,
            interrupted: false,
            no_provider: None,
            sandbox_rates: std::collections::HashMap::new(),
            dirty: true,
            fleet: None,
            limits: crate::limits::Limits::default(),
        }
    }

    /// The effects to run once at start.
    pub fn start(&mut self) -> Vec<Effect> {
        let mut fx = vec![Effect::LoadBlueprints];
        self.query_history(&mut fx);
        fx
    }

    /// Runs (of this process) not finished yet.
    pub fn in_flight(&self) -> usize {
        self.runs.values().filter(|r| !r.status.is_final()).count()
    }

    /// The blueprints that pass the name filter, with their index in `blueprints`.
    pub fn visible_blueprints(&self) -> Vec<(usize, &BlueprintEntry)> {
        let f = self.bp_filter.to_lowercase();
        self.blueprints
            .iter()
            .enumerate()
            .filter(|(_, b)| f.is_empty() || b.name.to_lowercase().contains(&f))
            .collect()
    }

    pub fn selected_blueprint(&self) -> Option<&BlueprintEntry> {
        self.visible_blueprints()
            .get(self.bp_selected)
            .map(|(_, b)| *b)
    }

    /// Busy workers, in worker order (what the workers pane lists and selects).
    pub fn busy_workers(&self) -> Vec<(usize, &WorkerSlot)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().map(|w| (i, w)))
            .collect()
    }

    /// The run the run keys (`r`, `c`, `+`, `-`, `s`) act on: the open run, else the selection
    /// of the focused pane.
    pub fn selected_run(&self) -> Option<(String, String, Option<RunStatus>)> {
        if let Screen::Detail(d) = &self.screen {
            let (bp, st) = match &d.data {
                Some(x) => (x.run.blueprint_name.clone(), Some(x.run.status)),
                None => self
                    .runs
                    .get(&d.run_id)
                    .map(|r| (r.blueprint.clone(), Some(r.status)))
                    .unwrap_or_default(),
            };
            return Some((d.run_id.clone(), bp, st));
        }
        match self.focus {
            Focus::History | Focus::Logs => self
                .history
                .selected_row()
                .map(|r| (r.id.clone(), r.blueprint_name.clone(), Some(r.status))),
            Focus::Workers => {
                let busy = self.busy_workers();
                let run_id = match busy.get(self.worker_selected) {
                    Some((_, w)) => w.run_id.clone(),
                    // Past this process's workers: the attempts other processes run.
                    None => self
                        .remote_attempts()
                        .get(self.worker_selected - busy.len())?
                        .run_id
                        .clone(),
                };
                let live = self.runs.get(&run_id);
                let row = self.history.rows.iter().find(|r| r.id == run_id);
                Some((
                    run_id.clone(),
                    live.map(|r| r.blueprint.clone())
                        .or_else(|| row.map(|r| r.blueprint_name.clone()))
                        .unwrap_or_default(),
                    live.map(|r| r.status)
                        .or(row.map(|r| r.status))
                        .or(Some(RunStatus::Running)),
                ))
            }
            Focus::Blueprints => None,
        }
    }

    /// Whether the loaded blueprint `name` has a model step (unknown: assume it does).
    pub fn uses_models(&self, name: &str) -> bool {
        self.blueprints
            .iter()
            .find(|b| b.name == name)
            .and_then(|b| b.blueprint.as_ref())
            .is_none_or(|bp| {
                bp.nodes
                    .iter()
                    .any(|n| matches!(n.kind, crate::blueprint::NodeKind::Llm(_)))
            })
    }

    /// Who fires the schedules, as the header says it: a live daemon on the database (from
    /// the heartbeats in `runner_processes`), this console (`--schedules`), or nobody.
    pub fn schedules_owner(&self) -> ScheduleOwner {
        let me = crate::store::process_id();
        let daemon = self
            .processes
            .iter()
            .find(|p| p.alive && p.role == "daemon" && p.id != me);
        match daemon {
            Some(d) => ScheduleOwner::Daemon(d.host.clone().unwrap_or_else(|| d.id.clone())),
            None if self.schedules_here => ScheduleOwner::ThisConsole,
            None => ScheduleOwner::Off,
        }
    }

    fn say(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            keys: None,
            error: false,
            until_ms: self.now_ms + STATUS_MS,
        });
        self.last_status.clone_from(&self.status);
    }

    fn complain(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            keys: None,
            error: true,
            until_ms: self.now_ms + STATUS_MS * 2,
        });
        self.last_status.clone_from(&self.status);
    }

    /// The one place state changes.
    pub fn update(&mut self, msg: Msg) -> Vec<Effect> {
        let mut fx = Vec::new();
        match msg {
            Msg::Key(k) => {
                if k.kind == KeyEventKind::Press || k.kind == KeyEventKind::Repeat {
                    self.dirty = true;
                    self.on_key(k, &mut fx);
                }
            }
            Msg::Engine(ev) => self.on_event(ev),
            Msg::Bg(bg) => self.on_bg(bg, &mut fx),
            Msg::Tick(now) => self.on_tick(now, &mut fx),
        }
        fx
    }

    // ---- clock -----------------------------------------------------------------------------

    fn on_tick(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let old_sec = self.now_ms / 1000;
        self.now_ms = now;
        self.spark.advance(now);
        if now / 1000 != old_sec {
            // Elapsed times, countdowns and sparklines move once a second.
            self.dirty = true;
        }
        if self.status.as_ref().is_some_and(|s| s.until_ms <= now) {
            self.status = None;
            self.dirty = true;
        }
        // A retry that is due is back in the pool's queue (the header counts it there), so it
        // leaves the Workers pane's countdowns: one place per figure. A slot wait has no
        // deadline: it ends when its step starts or finishes.
        let before = self.retrying.len();
        self.retrying
            .retain(|r| r.slots.is_some() || r.until_ms > now);
        if self.retrying.len() != before {
            self.dirty = true;
        }
        let every = self.refresh_ms();
        let due = now.saturating_sub(self.history.last_query_ms) >= every;
        if !self.history.loading && (self.history.stale || due) {
            self.refresh_history(fx);
        }
        self.fleet_tick(now, fx);
        if let Screen::Detail(d) = &mut self.screen {
            let live = d.data.as_ref().is_some_and(|x| !x.run.status.is_final());
            if live && now.saturating_sub(d.loaded_ms) >= every {
                d.stale = true;
            }
            if d.stale && !d.loading {
                d.stale = false;
                d.loading = true;
                d.generation += 1;
                fx.push(Effect::LoadDetail {
                    generation: d.generation,
                    run_id: d.run_id.clone(),
                });
            }
        }
    }

    // ---- engine events ---------------------------------------------------------------------

    fn on_event(&mut self, ev: Event) {
        if let (Screen::Detail(d), Some(id)) = (&mut self.screen, ev.run_id()) {
            if id == d.run_id && ev.is_lifecycle() {
                d.stale = true;
            }
        }
        match ev {
            Event::RunQueued {
                run_id,
                blueprint,
                priority,
                sandbox,
            } => {
                self.runs.insert(
                    run_id.clone(),
                    LiveRun {
                        run_id,
                        blueprint,
                        priority,
                        status: RunStatus::Queued,
                        sandbox,
                        steps_done: 0,
                        steps_failed: 0,
                    },
                );
                self.history.stale = true;
                self.dirty = true;
            }
            Event::RunStarted { run_id, .. } => {
                if let Some(r) = self.runs.get_mut(&run_id) {
                    r.status = RunStatus::Running;
                }
                self.history.stale = true;
                self.dirty = true;
            }
            Event::RunFinished {
                run_id,
                blueprint,
                status,
                total_time_ms,
                error,
            } => self.on_run_finished(run_id, blueprint, status, total_time_ms, error),
            Event::RunReleased { run_id, blueprint } => {
                // Handed over by a shutdown: another process (or `omniflow resume`) continues it.
                self.runs.remove(&run_id);
                self.retrying.retain(|r| r.run_id != run_id);
                self.say(format!(
                    "{blueprint} {} handed over unfinished; a daemon or `omniflow resume` continues it",
                    short(&run_id)
                ));
                self.history.stale = true;
                self.dirty = true;
            }
            Event::FanOut { .. } => {}
            Event::StepStarted { run_id, step, .. } => {
                self.clear_retrying(&run_id, &step);
                self.dirty = true;
            }
            Event::StepRetrying {
                run_id,
                step,
                attempt,
                kind,
                message,
                wait_ms,
                ..
            } => {
                self.spark.add_failed(self.now_ms);
                self.show_retrying(Retrying {
                    run_id,
                    step,
                    attempt,
                    kind: kind.to_string(),
                    message,
                    until_ms: self.now_ms + wait_ms,
                    waiting: false,
                    slots: None,
                });
                self.dirty = true;
            }
            Event::StepWaiting {
                run_id,
                step,
                provider,
                wait_ms,
                ..
            } => {
                // Shown with the retry countdowns, but not counted as a failure.
                self.show_retrying(Retrying {
                    run_id,
                    step,
                    attempt: 0,
                    kind: provider,
                    message: "waiting for the provider's rate limit (no worker held)".into(),
                    until_ms: self.now_ms + wait_ms,
                    waiting: true,
                    slots: None,
                });
                self.dirty = true;
            }
            Event::StepWaitingSlot {
                run_id,
                step,
                provider,
                limit,
                ..
            } => {
                self.show_retrying(Retrying {
                    run_id,
                    step,
                    attempt: 0,
                    message: format!(
                        "waiting for one of {provider}'s {limit} slots (calls in flight; no worker held)"
                    ),
                    kind: provider,
                    until_ms: self.now_ms,
                    waiting: true,
                    slots: Some(limit),
                });
                self.dirty = true;
            }
            Event::StepFinished {
                run_id,
                step,
                status,
                ..
            } => {
                self.clear_retrying(&run_id, &step);
                match status {
                    StepStatus::Success => self.spark.add_done(self.now_ms),
                    StepStatus::Error => self.spark.add_failed(self.now_ms),
                    _ => {}
                }
                if let Some(r) = self.runs.get_mut(&run_id) {
                    r.steps_done += 1;
                    if status == StepStatus::Error {
                        r.steps_failed += 1;
                    }
                }
                self.dirty = true;
            }
            Event::WorkerBusy {
                worker,
                run_id,
                step,
                attempt,
            } => {
                if let Some(slot) = self.workers.get_mut(worker) {
                    *slot = Some(WorkerSlot {
                        run_id,
                        step,
                        attempt,
                        since_ms: self.now_ms,
                        tokens: 0,
                    });
                    self.dirty = true;
                }
            }
            Event::WorkerIdle { worker } => {
                if let Some(slot) = self.workers.get_mut(worker) {
                    *slot = None;
                    self.dirty = true;
                }
            }
            Event::Pool(stats) => {
                if stats != self.pool {
                    self.pool = stats;
                    self.dirty = true;
                }
            }
            Event::Tokens {
                run_id,
                step,
                tokens,
            } => {
                for s in self.workers.iter_mut().flatten() {
                    if s.run_id == run_id && s.step == step && s.tokens != tokens {
                        s.tokens = tokens;
                        self.dirty = true;
                    }
                }
            }
            Event::AttemptFinished(_) => {}
        }
        self.clamp_selections();
    }

    /// A step's countdown (a retry's backoff, a rate limit's or a slot's wait) replaces the
    /// one it had.
    fn show_retrying(&mut self, r: Retrying) {
        self.retrying
            .retain(|x| !(x.run_id == r.run_id && x.step == r.step));
        self.retrying.push(r);
    }

    fn clear_retrying(&mut self, run_id: &str, step: &str) {
        self.retrying
            .retain(|r| !(r.run_id == run_id && r.step == step));
    }

    fn on_run_finished(
        &mut self,
        run_id: String,
        blueprint: String,
        status: RunStatus,
        total_time_ms: u64,
        error: Option<String>,
    ) {
        if let Some(r) = self.runs.get_mut(&run_id) {
            r.status = status;
        }
        // Finished runs leave the live list; history has them. The row on screen is
        // updated now, so `r` works on it before the next history query lands.
        self.runs.remove(&run_id);
        // Best effort, bounded: a long session forgets the oldest of these at once.
        if self.history.finished.len() >= 1024 {
            self.history.finished.clear();
        }
        self.history
            .finished
            .insert(run_id.clone(), (status, total_time_ms, error.clone()));
        self.history.overlay_finished();
        self.retrying.retain(|r| r.run_id != run_id);
        let took = fmt_ms(total_time_ms);
        match (status, error) {
            (RunStatus::Success, _) => {
                self.say(format!("{blueprint} {} finished in {took}", short(&run_id)))
            }
            // What happened first, the error after it (a narrow status line cuts
            // it there; m shows it whole), the keys kept at the end.
            (s, e) => {
                self.complain(format!(
                    "{blueprint} {} {} after {took}{}",
                    short(&run_id),
                    if s == RunStatus::Error {
                        "failed"
                    } else {
                        s.as_str()
                    },
                    e.map(|e| format!(": {}", first_line(&e)))
                        .unwrap_or_default()
                ));
                if let Some(st) = &mut self.status {
                    st.keys = Some("r retry · Enter details".into());
                }
            }
        }
        self.history.stale = true;
        self.dirty = true;
    }

    // ---- background results ----------------------------------------------------------------

    fn on_bg(&mut self, bg: Bg, fx: &mut Vec<Effect>) {
        self.dirty = true;
        match bg {
            Bg::Blueprints(Ok(list)) => {
                self.blueprints = list;
                self.blueprints_loaded = true;
                self.blueprints_problem = None;
            }
            Bg::Blueprints(Err(e)) => {
                self.blueprints = Vec::new();
                self.blueprints_loaded = true;
                self.blueprints_problem = Some(e);
            }
            Bg::History { generation, result } => {
                if generation != self.history.generation {
                    return;
                }
                self.history.loading = false;
                self.history.loaded = true;
                match result {
                    Ok((rows, total)) => {
                        let keep = self.history.selected_row().map(|r| r.id.clone());
                        self.history.rows = rows;
                        self.history.overlay_finished();
                        self.overlay_fresh();
                        if total.is_some() {
                            self.history.total = total;
                        }
                        if let Some(id) = keep {
                            if let Some(i) = self.history.rows.iter().position(|r| r.id == id) {
                                self.history.selected = i;
                            }
                        }
                        self.history.problem = None;
                    }
                    Err(e) => self.history.problem = Some(e),
                }
            }
            Bg::Detail { generation, result } => {
                if let Screen::Detail(d) = &mut self.screen {
                    if d.generation == generation {
                        d.loading = false;
                        d.loaded_ms = self.now_ms;
                        match result {
                            Ok(data) => {
                                // First load: open on the first step that failed, which is
                                // what a failed run is opened for.
                                if d.data.is_none() {
                                    if let Some(i) = data
                                        .steps
                                        .iter()
                                        .position(|s| s.status == StepStatus::Error)
                                    {
                                        d.selected = i;
                                    }
                                }
                                d.data = Some(*data);
                                d.problem = None;
                            }
                            Err(e) => d.problem = Some(e),
                        }
                    }
                }
            }
            Bg::Logs(lines) => {
                // Keep the same lines on screen while paused: move up by the new lines that
                // pass the filters (only those are on screen).
                let added = lines.iter().filter(|l| self.logs.admits(l)).count();
                for l in lines {
                    self.logs.push(l);
                }
                if !self.logs.follow {
                    self.logs.scroll += added;
                }
                self.logs.problem = None;
            }
            Bg::RunLogs {
                run_id,
                mark,
                result,
            } => match result {
                Ok(lines) => {
                    if self.logs.run_filter.as_deref() == Some(run_id.as_str()) {
                        let n = lines.len();
                        self.logs.older = Some((run_id.clone(), lines, mark));
                        self.say(format!(
                            "logs: only run {} ({n} line{} from the log files)",
                            short(&run_id),
                            if n == 1 { "" } else { "s" }
                        ));
                    }
                }
                Err(e) => self.complain(format!("cannot read the log files: {e}")),
            },
            Bg::LogProblem(p) => self.logs.problem = p,
            Bg::LogWriteFailed(p) => {
                self.complain(p.clone());
                // Kept on the status line (like a start-up problem) until dismissed.
                self.startup_problems.push(p);
            }
            Bg::Sample {
                rss,
                stats,
                workers,
            } => {
                let changed =
                    self.memory.rss.map(|r| r >> 20) != rss.map(|r| r >> 20) || self.pool != stats;
                self.memory.rss = rss;
                self.pool = stats;
                let mut workers_changed = false;
                for w in workers {
                    let Some(slot) = self.workers.get_mut(w.id) else {
                        continue;
                    };
                    let new = w.job.map(|j| {
                        // The same job goes on: its streamed tokens are not in the sample.
                        let tokens = slot
                            .as_ref()
                            .filter(|s| {
                                s.run_id == j.run_id && s.step == j.step && s.attempt == j.attempt
                            })
                            .map_or(0, |s| s.tokens);
                        WorkerSlot {
                            run_id: j.run_id,
                            step: j.step,
                            attempt: j.attempt,
                            since_ms: j
                                .since
                                .duration_since(UNIX_EPOCH)
                                .map(|d| d.as_millis() as u64)
                                .unwrap_or(self.now_ms),
                            tokens,
                        }
                    });
                    if *slot != new {
                        *slot = new;
                        workers_changed = true;
                    }
                }
                self.dirty = changed || workers_changed;
                self.clamp_selections();
            }
            Bg::Started { run_id, what } => {
                // A run that failed at once has already said so (how and why): the late
                // "queued" must not replace that.
                if !self.history.finished.contains_key(&run_id) {
                    self.say(format!("{what}: run {} queued", short(&run_id)));
                }
                self.history.stale = true;
            }
            Bg::Failed(e) => self.complain(e),
            Bg::Notice(n) => self.say(n),
            Bg::EditorText { path, result } => {
                if let Overlay::Editor(ed) = &mut self.overlay {
                    if ed.path == path {
                        match result {
                            Ok(text) => {
                                ed.text = Some(editor_area(&text));
                                ed.original = text;
                            }
                            Err(e) => {
                                ed.text = Some(editor_area(""));
                                ed.problems = vec![e];
                            }
                        }
                    }
                }
            }
            Bg::Saved { path, result } => {
                match result {
                    Ok(backup) => {
                        let note = match &backup {
                            Some(b) => format!("saved; previous version in {b}"),
                            None => "no change: the file already says this (nothing written)"
                                .to_string(),
                        };
                        if let Overlay::Editor(ed) = &mut self.overlay {
                            if ed.path == path {
                                if let Some(t) = &ed.text {
                                    ed.original = t.lines().join("\n");
                                }
                                ed.problems.clear();
                                ed.note = Some(note);
                            }
                        }
                        match backup {
                            Some(b) => self.say(format!("saved {} (backup {b})", path.display())),
                            None => self.say(format!("{} unchanged", path.display())),
                        }
                        // Re-read the directory once the new text is on disk.
                        fx.push(Effect::LoadBlueprints);
                    }
                    Err(e) => {
                        if let Overlay::Editor(ed) = &mut self.overlay {
                            ed.note = Some(format!("not saved: {e}"));
                        }
                        self.complain(format!("not saved: {e}"));
                    }
                };
            }
            Bg::Lagged(n) => {
                self.dropped_events = n;
                self.history.stale = true;
            }
            Bg::Processes(Ok(rows)) => {
                self.processes = rows;
                self.processes_problem = None;
            }
            Bg::Processes(Err(e)) => self.processes_problem = Some(e),
            Bg::Live(live) => self.on_live(live, fx),
            Bg::RunsReloaded(result) => self.on_runs_reloaded(result, fx),
            Bg::Fleet(result) => self.on_fleet_sample(result),
        }
    }

    // ---- history queries ---------------------------------------------------------------------

    fn filter(&self) -> RunFilter {
        RunFilter {
            status: self.history.status,
            blueprint: self.history.blueprint.clone(),
            name_contains: self.history.name_contains.clone(),
            limit: PAGE,
            before: self
                .history
                .cursors
                .get(self.history.page)
                .cloned()
                .flatten(),
        }
    }

    /// A new query for the current filter and page (replacing any in flight).
    fn query_history(&mut self, fx: &mut Vec<Effect>) {
        if self.history.page == 0 {
            self.history.cursors.truncate(1);
        }
        let filter = self.filter();
        let h = &mut self.history;
        if h.page == 0 && h.cursors.is_empty() {
            h.cursors.push(None);
        }
        h.generation += 1;
        h.loading = true;
        h.stale = false;
        h.last_query_ms = self.now_ms;
        fx.push(Effect::QueryHistory {
            generation: h.generation,
            filter,
        });
    }

    /// Re-reads the current page (periodic; a changed filter resets the page instead).
    fn refresh_history(&mut self, fx: &mut Vec<Effect>) {
        self.query_history(fx);
    }

    fn clamp_selections(&mut self) {
        let n = self.selectable_workers();
        if self.worker_selected >= n {
            self.worker_selected = n.saturating_sub(1);
        }
        let n = self.history.rows.len();
        if self.history.selected >= n {
            self.history.selected = n.saturating_sub(1);
        }
    }
}

fn add_clamped(i: usize, by: isize, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    (i as isize + by).clamp(0, n as isize - 1) as usize
}

/// The first 10 characters of a run id: its 9 time characters and one random one, enough to
/// tell apart runs started in the same second (ids are prefix-addressable).
pub fn short(id: &str) -> &str {
    id.get(..10).unwrap_or(id)
}

pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// `850ms`, `3.2s`, `4m05s`.
pub fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}
