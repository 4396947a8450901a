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
    LogProblem(Option<String>),
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
    /// A blueprint file was written; the text names the backup.
    Saved {
        path: PathBuf,
        result: Result<String, String>,
    },
    /// The event subscription lost lifecycle events (the console fell far behind).
    Lagged(u64),
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
    ReadFile(PathBuf),
    /// Writes `text` to `path` after copying the old file to `path.bak`.
    SaveFile {
        path: PathBuf,
        text: String,
    },
    Quit,
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
    Quit { in_flight: usize },
    Cancel { run_id: String, blueprint: String },
    Run { blueprint: String },
    Retry { run_id: String, blueprint: String },
}

#[derive(Debug)]
pub enum Overlay {
    None,
    /// The key list, scrolled by this many lines.
    Help(u16),
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
    /// Problems found at start (database, logging, theme), shown until dismissed.
    pub startup_problems: Vec<String>,
    pub dropped_events: u64,
    pub db_path: String,
    pub quit: bool,
    /// Something visible changed since the last frame.
    pub dirty: bool,
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
            startup_problems: Vec::new(),
            dropped_events: 0,
            db_path: String::new(),
            quit: false,
            dirty: true,
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
                let (_, w) = busy.get(self.worker_selected)?;
                let live = self.runs.get(&w.run_id);
                Some((
                    w.run_id.clone(),
                    live.map(|r| r.blueprint.clone()).unwrap_or_default(),
                    live.map(|r| r.status).or(Some(RunStatus::Running)),
                ))
            }
            Focus::Blueprints => None,
        }
    }

    fn say(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: false,
            until_ms: self.now_ms + STATUS_MS,
        });
    }

    fn complain(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: true,
            until_ms: self.now_ms + STATUS_MS * 2,
        });
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
            Msg::Bg(bg) => self.on_bg(bg),
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
        self.retrying.retain(|r| r.until_ms + 30_000 > now);
        let due = now.saturating_sub(self.history.last_query_ms) >= HISTORY_REFRESH_MS;
        if !self.history.loading && (self.history.stale || due) {
            self.refresh_history(fx);
        }
        if let Screen::Detail(d) = &mut self.screen {
            let live = d.data.as_ref().is_some_and(|x| !x.run.status.is_final());
            if live && now.saturating_sub(d.loaded_ms) >= HISTORY_REFRESH_MS {
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
            } => {
                if let Some(r) = self.runs.get_mut(&run_id) {
                    r.status = status;
                }
                // Finished runs leave the live list; history has them.
                self.runs.remove(&run_id);
                self.retrying.retain(|r| r.run_id != run_id);
                let took = fmt_ms(total_time_ms);
                match (status, error) {
                    (RunStatus::Success, _) => {
                        self.say(format!("{blueprint} {} finished in {took}", short(&run_id)))
                    }
                    (s, e) => self.complain(format!(
                        "{blueprint} {} {} after {took}{} — Enter on it in history for details, r to retry",
                        short(&run_id),
                        s.as_str(),
                        e.map(|e| format!(": {}", first_line(&e))).unwrap_or_default()
                    )),
                }
                self.history.stale = true;
                self.dirty = true;
            }
            Event::FanOut { .. } => {}
            Event::StepStarted { run_id, step, .. } => {
                self.retrying
                    .retain(|r| !(r.run_id == run_id && r.step == step));
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
                self.retrying
                    .retain(|r| !(r.run_id == run_id && r.step == step));
                self.retrying.push(Retrying {
                    run_id,
                    step,
                    attempt,
                    kind: kind.to_string(),
                    message,
                    until_ms: self.now_ms + wait_ms,
                });
                self.dirty = true;
            }
            Event::StepFinished {
                run_id,
                step,
                status,
                ..
            } => {
                self.retrying
                    .retain(|r| !(r.run_id == run_id && r.step == step));
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
            Event::Tokens { .. } => {}
        }
        self.clamp_selections();
    }

    // ---- background results ----------------------------------------------------------------

    fn on_bg(&mut self, bg: Bg) {
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
                                d.data = Some(*data);
                                d.problem = None;
                            }
                            Err(e) => d.problem = Some(e),
                        }
                    }
                }
            }
            Bg::Logs(lines) => {
                let added = lines.len();
                for l in lines {
                    self.logs.push(l);
                }
                if !self.logs.follow {
                    // Keep the same lines on screen while paused.
                    self.logs.scroll += added;
                }
                self.logs.problem = None;
            }
            Bg::LogProblem(p) => self.logs.problem = p,
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
                    let new = w.job.map(|j| WorkerSlot {
                        run_id: j.run_id,
                        step: j.step,
                        attempt: j.attempt,
                        since_ms: j
                            .since
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(self.now_ms),
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
                self.say(format!("{what}: run {} queued", short(&run_id)));
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
                        if let Overlay::Editor(ed) = &mut self.overlay {
                            if ed.path == path {
                                if let Some(t) = &ed.text {
                                    ed.original = t.lines().join("\n");
                                }
                                ed.problems.clear();
                                ed.note = Some(format!("saved; previous version in {backup}"));
                            }
                        }
                        self.say(format!("saved {} (backup {backup})", path.display()));
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
        }
    }

    // ---- keys ------------------------------------------------------------------------------

    fn on_key(&mut self, k: KeyEvent, fx: &mut Vec<Effect>) {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && k.code == KeyCode::Char('c') && !matches!(self.overlay, Overlay::Editor(_)) {
            // Terminal habit: Ctrl-C leaves at once (runs in flight are cancelled on the way out).
            self.quit = true;
            fx.push(Effect::Quit);
            return;
        }
        match std::mem::replace(&mut self.overlay, Overlay::None) {
            Overlay::None => self.on_main_key(k, fx),
            Overlay::Help(top) => {
                // Arrows scroll a help taller than the terminal; any other key closes it.
                self.overlay = match k.code {
                    KeyCode::Down | KeyCode::Char('j') => Overlay::Help(top.saturating_add(1)),
                    KeyCode::PageDown => Overlay::Help(top.saturating_add(10)),
                    KeyCode::Up | KeyCode::Char('k') => Overlay::Help(top.saturating_sub(1)),
                    KeyCode::PageUp => Overlay::Help(top.saturating_sub(10)),
                    _ => Overlay::None,
                };
            }
            Overlay::Confirm(c) => self.on_confirm_key(c, k, fx),
            Overlay::Search { target, text } => self.on_search_key(target, text, k, fx),
            Overlay::Sandbox(form) => self.on_sandbox_key(form, k, fx),
            Overlay::Editor(ed) => self.on_editor_key(ed, k, fx),
        }
    }

    fn on_main_key(&mut self, k: KeyEvent, fx: &mut Vec<Effect>) {
        let detail = matches!(self.screen, Screen::Detail(_));
        match k.code {
            KeyCode::Char('?') | KeyCode::F(1) => self.overlay = Overlay::Help(0),
            KeyCode::Char('q') => self.ask_quit(fx),
            KeyCode::Esc => self.back(fx),
            KeyCode::Tab | KeyCode::Right | KeyCode::Char('l') if !detail => {
                self.focus = self.focus.step(1)
            }
            KeyCode::BackTab | KeyCode::Left | KeyCode::Char('h') if !detail => {
                self.focus = self.focus.step(-1)
            }
            KeyCode::Up | KeyCode::Char('k') => self.move_sel(-1, fx),
            KeyCode::Down | KeyCode::Char('j') => self.move_sel(1, fx),
            KeyCode::PageUp => self.page(-1, fx),
            KeyCode::PageDown => self.page(1, fx),
            KeyCode::Home | KeyCode::Char('g') => self.move_sel(-1_000_000, fx),
            KeyCode::End | KeyCode::Char('G') => self.move_sel(1_000_000, fx),
            KeyCode::Enter => self.open(fx),
            KeyCode::Char('/') if !detail => {
                let text = match self.focus {
                    Focus::Blueprints => self.bp_filter.clone(),
                    Focus::History => self.history.blueprint.clone().unwrap_or_default(),
                    Focus::Logs | Focus::Workers => self.logs.search.clone(),
                };
                let target = if self.focus == Focus::Workers {
                    Focus::Logs
                } else {
                    self.focus
                };
                self.overlay = Overlay::Search { target, text };
            }
            KeyCode::Char('t') => self.sandbox_form(),
            KeyCode::Char('r') => self.ask_retry(),
            KeyCode::Char('c') => self.ask_cancel(),
            KeyCode::Char('p') => {
                let pause = !self.pool.paused;
                self.pool.paused = pause;
                fx.push(Effect::SetPaused(pause));
                self.say(if pause {
                    "pool paused: running steps finish, queued ones wait (p resumes)"
                } else {
                    "pool resumed"
                });
            }
            KeyCode::Char('+') | KeyCode::Char('=') => self.bump_priority(1, fx),
            KeyCode::Char('-') => self.bump_priority(-1, fx),
            KeyCode::Char('e') => self.edit_blueprint(fx),
            KeyCode::Char('x') => self.ask_run(),
            KeyCode::Char('R') => {
                fx.push(Effect::LoadBlueprints);
                self.say(format!("reloading blueprints from {}", self.dir.display()));
            }
            KeyCode::Char('T') => self.cycle_theme(),
            KeyCode::Char('s') => self.cycle_status_filter(fx),
            KeyCode::Char('b') => self.toggle_blueprint_filter(fx),
            KeyCode::Char('v') => {
                self.logs.level = self.logs.level.next();
                self.say(format!("log level: {}", self.logs.level.label()));
            }
            KeyCode::Char('f') | KeyCode::Char(' ') => {
                self.logs.follow = !self.logs.follow;
                self.logs.scroll = 0;
                self.say(if self.logs.follow {
                    "logs: following new lines"
                } else {
                    "logs: paused (↑↓ PgUp PgDn scroll back, f follows again)"
                });
            }
            KeyCode::Char('o') => self.toggle_log_run_filter(),
            _ => {}
        }
    }

    fn ask_quit(&mut self, fx: &mut Vec<Effect>) {
        let n = self.in_flight();
        if n > 0 {
            self.overlay = Overlay::Confirm(Confirm::Quit { in_flight: n });
        } else {
            self.quit = true;
            fx.push(Effect::Quit);
        }
    }

    fn back(&mut self, fx: &mut Vec<Effect>) {
        if matches!(self.screen, Screen::Detail(_)) {
            self.screen = Screen::Main;
            return;
        }
        // Esc on the main screen clears the focused pane's filters.
        match self.focus {
            Focus::Blueprints => self.bp_filter.clear(),
            Focus::History => {
                if self.history.status.is_some() || self.history.blueprint.is_some() {
                    self.history.status = None;
                    self.history.blueprint = None;
                    self.query_history(fx);
                }
            }
            Focus::Logs | Focus::Workers => {
                self.logs.search.clear();
                self.logs.run_filter = None;
                self.logs.follow = true;
                self.logs.scroll = 0;
            }
        }
        self.startup_problems.clear();
    }

    fn move_sel(&mut self, by: isize, fx: &mut Vec<Effect>) {
        if let Screen::Detail(d) = &mut self.screen {
            let n = d.data.as_ref().map(|x| x.steps.len()).unwrap_or(0);
            d.selected = add_clamped(d.selected, by, n);
            d.scroll = 0;
            return;
        }
        match self.focus {
            Focus::Blueprints => {
                let n = self.visible_blueprints().len();
                self.bp_selected = add_clamped(self.bp_selected, by, n);
            }
            Focus::Workers => {
                let n = self.busy_workers().len();
                self.worker_selected = add_clamped(self.worker_selected, by, n);
            }
            Focus::History => {
                let n = self.history.rows.len();
                let h = &mut self.history;
                // Walking off either end of the page turns the page.
                if by == 1 && n > 0 && h.selected + 1 == n && n == PAGE {
                    self.page(1, fx);
                } else if by == -1 && h.selected == 0 && h.page > 0 {
                    self.page(-1, fx);
                    self.history.selected = PAGE - 1;
                } else {
                    h.selected = add_clamped(h.selected, by, n);
                }
            }
            Focus::Logs => {
                let n = self.logs.visible().len();
                self.logs.follow = false;
                let s = self.logs.scroll as isize - by;
                self.logs.scroll = s.clamp(0, n.saturating_sub(1) as isize) as usize;
                if self.logs.scroll == 0 && by > 0 {
                    self.logs.follow = true;
                }
            }
        }
    }

    fn page(&mut self, by: isize, fx: &mut Vec<Effect>) {
        if let Screen::Detail(d) = &mut self.screen {
            d.scroll = if by > 0 {
                d.scroll.saturating_add(10)
            } else {
                d.scroll.saturating_sub(10)
            };
            return;
        }
        match self.focus {
            Focus::History => {
                let h = &mut self.history;
                if by > 0 {
                    if h.rows.len() < PAGE {
                        h.selected = h.rows.len().saturating_sub(1);
                        return;
                    }
                    let Some(cursor) = h.rows.last().and_then(RunFilter::cursor_after) else {
                        return;
                    };
                    h.cursors.truncate(h.page + 1);
                    h.cursors.push(Some(cursor));
                    h.page += 1;
                } else {
                    if h.page == 0 {
                        h.selected = 0;
                        return;
                    }
                    h.page -= 1;
                }
                h.selected = 0;
                self.query_history(fx);
            }
            Focus::Logs => self.move_sel(by * 10, fx),
            _ => self.move_sel(by * 10, fx),
        }
    }

    fn open(&mut self, fx: &mut Vec<Effect>) {
        if matches!(self.screen, Screen::Detail(_)) {
            return;
        }
        match self.focus {
            Focus::Blueprints => match self.selected_blueprint() {
                Some(b) if b.is_valid() => self.ask_run(),
                Some(_) => self.edit_blueprint(fx),
                None => self.say(format!(
                    "no blueprints in {} — add a .json or .toml file (see README), then R to reload",
                    self.dir.display()
                )),
            },
            Focus::History | Focus::Workers | Focus::Logs => {
                if let Some((run_id, _, _)) = self.selected_run() {
                    self.open_detail(run_id, fx);
                }
            }
        }
    }

    pub fn open_detail(&mut self, run_id: String, fx: &mut Vec<Effect>) {
        let generation = 1;
        fx.push(Effect::LoadDetail {
            generation,
            run_id: run_id.clone(),
        });
        self.screen = Screen::Detail(Box::new(DetailState {
            run_id,
            data: None,
            problem: None,
            selected: 0,
            scroll: 0,
            generation,
            loading: true,
            stale: false,
            loaded_ms: self.now_ms,
        }));
    }

    fn ask_run(&mut self) {
        match self.selected_blueprint() {
            Some(b) if b.is_valid() => {
                let name = b.name.clone();
                self.overlay = Overlay::Confirm(Confirm::Run { blueprint: name });
            }
            Some(b) => {
                let n = b.name.clone();
                self.complain(format!("{n} is invalid: e shows its problems"));
            }
            None => self.say("select a blueprint in the Blueprints pane first (Tab)"),
        }
    }

    fn blueprint_named(&self, name: &str) -> Option<Arc<Blueprint>> {
        self.blueprints
            .iter()
            .find(|b| b.name == name)
            .and_then(|b| b.blueprint.clone())
    }

    fn sandbox_form(&mut self) {
        let bp = match (&self.screen, self.focus) {
            (Screen::Main, Focus::Blueprints) => match self.selected_blueprint() {
                Some(b) => match &b.blueprint {
                    Some(bp) => bp.clone(),
                    None => {
                        let n = b.name.clone();
                        self.complain(format!("{n} is invalid: e shows its problems"));
                        return;
                    }
                },
                None => {
                    self.say("no blueprint selected — add one to the blueprints directory");
                    return;
                }
            },
            _ => {
                let Some((_, name, _)) = self.selected_run() else {
                    self.say("select a blueprint (or a run of one) to sandbox-test");
                    return;
                };
                match self.blueprint_named(&name) {
                    Some(b) => b,
                    None => {
                        self.complain(format!("no valid blueprint named {name} is loaded"));
                        return;
                    }
                }
            }
        };
        self.overlay = Overlay::Sandbox(Box::new(SandboxForm::new(bp)));
    }

    fn ask_retry(&mut self) {
        let Some((run_id, blueprint, status)) = self.selected_run() else {
            self.say("select a failed run in History (Tab) to retry it");
            return;
        };
        match status {
            Some(RunStatus::Error) | Some(RunStatus::Cancelled) => {
                self.overlay = Overlay::Confirm(Confirm::Retry { run_id, blueprint })
            }
            Some(s) => self.say(format!(
                "run {} is {}: only a failed or cancelled run can be retried",
                short(&run_id),
                s.as_str()
            )),
            None => self.say("that run's status is not known yet"),
        }
    }

    fn ask_cancel(&mut self) {
        let Some((run_id, blueprint, status)) = self.selected_run() else {
            self.say("select a run (History or Workers) to cancel it");
            return;
        };
        if status.is_some_and(RunStatus::is_final) {
            self.say(format!(
                "run {} has already ended ({})",
                short(&run_id),
                status.map(RunStatus::as_str).unwrap_or("")
            ));
        } else if !self.runs.contains_key(&run_id) {
            self.complain(format!(
                "run {} is not running in this console (another process owns it)",
                short(&run_id)
            ));
        } else {
            self.overlay = Overlay::Confirm(Confirm::Cancel { run_id, blueprint });
        }
    }

    fn bump_priority(&mut self, by: isize, fx: &mut Vec<Effect>) {
        let Some((run_id, _, _)) = self.selected_run() else {
            self.say("select a queued or running run to change its priority");
            return;
        };
        let Some(live) = self.runs.get_mut(&run_id) else {
            self.say(format!(
                "run {} is not queued or running in this console",
                short(&run_id)
            ));
            return;
        };
        let i = (live.priority.index() as isize + by).clamp(0, 3) as usize;
        let p = Priority::from_index(i);
        live.priority = p;
        fx.push(Effect::SetPriority {
            run_id: run_id.clone(),
            priority: p,
        });
        self.say(format!("run {} priority → {}", short(&run_id), p.as_str()));
    }

    fn edit_blueprint(&mut self, fx: &mut Vec<Effect>) {
        let Some(b) = self
            .selected_blueprint()
            .filter(|_| self.focus == Focus::Blueprints)
        else {
            self.say("select a blueprint in the Blueprints pane to edit it");
            return;
        };
        let path = b.file.clone();
        let problems = b.problems.clone();
        fx.push(Effect::ReadFile(path.clone()));
        self.overlay = Overlay::Editor(Box::new(Editor {
            path,
            text: None,
            original: String::new(),
            problems,
            note: None,
        }));
    }

    fn cycle_theme(&mut self) {
        if self.themes.is_empty() {
            return;
        }
        let i = self
            .themes
            .iter()
            .position(|t| t.name == self.theme.name)
            .map(|i| (i + 1) % self.themes.len())
            .unwrap_or(0);
        self.theme = self.themes[i].clone();
        self.say(format!("theme: {}", self.theme.name));
    }

    fn cycle_status_filter(&mut self, fx: &mut Vec<Effect>) {
        if self.focus != Focus::History || matches!(self.screen, Screen::Detail(_)) {
            return;
        }
        self.history.status = match self.history.status {
            None => Some(RunStatus::Error),
            Some(RunStatus::Error) => Some(RunStatus::Success),
            Some(RunStatus::Success) => Some(RunStatus::Running),
            Some(RunStatus::Running) => Some(RunStatus::Queued),
            Some(RunStatus::Queued) => Some(RunStatus::Cancelled),
            Some(RunStatus::Cancelled) => None,
        };
        self.query_history(fx);
    }

    fn toggle_blueprint_filter(&mut self, fx: &mut Vec<Effect>) {
        if matches!(self.screen, Screen::Detail(_)) {
            return;
        }
        let name = match self.focus {
            Focus::History => self
                .history
                .selected_row()
                .map(|r| r.blueprint_name.clone()),
            Focus::Blueprints => self.selected_blueprint().map(|b| b.name.clone()),
            _ => return,
        };
        self.history.blueprint = if self.history.blueprint.is_some() {
            None
        } else {
            name
        };
        self.query_history(fx);
    }

    fn toggle_log_run_filter(&mut self) {
        if self.logs.run_filter.is_some() {
            self.logs.run_filter = None;
            self.say("logs: every run");
            return;
        }
        match self.selected_run() {
            Some((id, _, _)) => {
                self.say(format!("logs: only run {}", short(&id)));
                self.logs.run_filter = Some(id);
            }
            None => self.say("select a run (History or Workers) to filter the logs by it"),
        }
    }

    fn on_confirm_key(&mut self, c: Confirm, k: KeyEvent, fx: &mut Vec<Effect>) {
        let yes = matches!(k.code, KeyCode::Char('y') | KeyCode::Char('Y'));
        let no = matches!(
            k.code,
            KeyCode::Char('n') | KeyCode::Esc | KeyCode::Char('q')
        );
        match c {
            Confirm::Retry { run_id, blueprint } => match k.code {
                KeyCode::Char('w') | KeyCode::Char('y') | KeyCode::Enter => {
                    fx.push(Effect::Retry {
                        run_id,
                        only_failed: false,
                    });
                    self.say(format!("retrying {blueprint} (whole run)…"));
                }
                KeyCode::Char('f') => {
                    fx.push(Effect::Retry {
                        run_id,
                        only_failed: true,
                    });
                    self.say(format!("retrying the failed steps of {blueprint}…"));
                }
                KeyCode::Esc | KeyCode::Char('n') | KeyCode::Char('q') => {}
                _ => self.overlay = Overlay::Confirm(Confirm::Retry { run_id, blueprint }),
            },
            _ if no => {}
            c if !yes && k.code != KeyCode::Enter => self.overlay = Overlay::Confirm(c),
            Confirm::Quit { .. } => {
                self.quit = true;
                fx.push(Effect::Quit);
            }
            Confirm::Cancel { run_id, .. } => {
                fx.push(Effect::Cancel {
                    run_id: run_id.clone(),
                });
                self.say(format!("cancelling run {}…", short(&run_id)));
            }
            Confirm::Run { blueprint } => match self.blueprint_named(&blueprint) {
                Some(bp) => fx.push(Effect::Start {
                    blueprint: bp,
                    request: Box::new(RunRequest {
                        trigger: "console".into(),
                        ..RunRequest::default()
                    }),
                }),
                None => self.complain(format!("{blueprint} is no longer loaded")),
            },
        }
    }

    fn on_search_key(
        &mut self,
        target: Focus,
        mut text: String,
        k: KeyEvent,
        fx: &mut Vec<Effect>,
    ) {
        match k.code {
            KeyCode::Esc => {
                // Leaving the search clears it.
                text.clear();
                self.apply_search(target, &text, true, fx);
                return;
            }
            KeyCode::Enter => {
                self.apply_search(target, &text, true, fx);
                return;
            }
            KeyCode::Backspace => {
                text.pop();
            }
            KeyCode::Char(c) if !k.modifiers.contains(KeyModifiers::CONTROL) => text.push(c),
            _ => {}
        }
        self.apply_search(target, &text, false, fx);
        self.overlay = Overlay::Search { target, text };
    }

    fn apply_search(&mut self, target: Focus, text: &str, done: bool, fx: &mut Vec<Effect>) {
        match target {
            Focus::Blueprints => {
                self.bp_filter = text.to_string();
                self.bp_selected = 0;
            }
            Focus::Logs | Focus::Workers => self.logs.search = text.to_string(),
            Focus::History => {
                // The history filter is an exact blueprint name: query once, on Enter.
                if done {
                    let t = text.trim();
                    self.history.blueprint = (!t.is_empty()).then(|| t.to_string());
                    self.query_history(fx);
                }
            }
        }
    }

    fn on_sandbox_key(&mut self, mut form: Box<SandboxForm>, k: KeyEvent, fx: &mut Vec<Effect>) {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        match k.code {
            KeyCode::Esc => return,
            KeyCode::Tab | KeyCode::BackTab => {
                form.field = match form.field {
                    FormField::Vars => FormField::Rate,
                    FormField::Rate => FormField::Vars,
                };
            }
            KeyCode::Char('s') if ctrl => return self.submit_sandbox(form, fx),
            KeyCode::Enter if form.field == FormField::Rate => {
                return self.submit_sandbox(form, fx)
            }
            _ => {
                let input = ratatui_textarea::Input::from(k);
                match form.field {
                    FormField::Vars => {
                        form.vars.input(input);
                    }
                    FormField::Rate => {
                        form.rate.input(input);
                    }
                }
                form.error = None;
            }
        }
        self.overlay = Overlay::Sandbox(form);
    }

    fn submit_sandbox(&mut self, mut form: Box<SandboxForm>, fx: &mut Vec<Effect>) {
        match form.request() {
            Ok(req) => {
                let name = form.blueprint.name.clone();
                fx.push(Effect::Start {
                    blueprint: form.blueprint.clone(),
                    request: Box::new(req),
                });
                self.say(format!("sandbox test of {name} starting…"));
            }
            Err(e) => {
                form.error = Some(e);
                self.overlay = Overlay::Sandbox(form);
            }
        }
    }

    fn on_editor_key(&mut self, mut ed: Box<Editor>, k: KeyEvent, fx: &mut Vec<Effect>) {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        match k.code {
            KeyCode::Esc => {
                if ed.modified() && ed.note.as_deref() != Some(DISCARD_NOTE) {
                    ed.note = Some(DISCARD_NOTE.to_string());
                } else {
                    return; // closed
                }
            }
            KeyCode::Char('s') if ctrl => {
                if let Some(t) = &ed.text {
                    let text = t.lines().join("\n") + "\n";
                    let format = Format::from_path(&ed.path).unwrap_or(Format::Json);
                    match crate::blueprint::load_str(&text, format) {
                        Ok(_) => {
                            ed.problems.clear();
                            ed.note = Some("saving…".into());
                            fx.push(Effect::SaveFile {
                                path: ed.path.clone(),
                                text,
                            });
                            fx.push(Effect::LoadBlueprints);
                        }
                        Err(problems) => {
                            ed.note = Some(format!(
                                "not saved: {} problem{} — fix them and save again, or Esc twice to discard",
                                problems.len(),
                                if problems.len() == 1 { "" } else { "s" }
                            ));
                            ed.problems = problems.iter().map(ToString::to_string).collect();
                        }
                    }
                }
            }
            _ => {
                if let Some(t) = &mut ed.text {
                    if t.input(ratatui_textarea::Input::from(k)) {
                        ed.note = None;
                    }
                }
            }
        }
        self.overlay = Overlay::Editor(ed);
    }

    // ---- history queries ---------------------------------------------------------------------

    fn filter(&self) -> RunFilter {
        RunFilter {
            status: self.history.status,
            blueprint: self.history.blueprint.clone(),
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
        let n = self.busy_workers().len();
        if self.worker_selected >= n {
            self.worker_selected = n.saturating_sub(1);
        }
        let n = self.history.rows.len();
        if self.history.selected >= n {
            self.history.selected = n.saturating_sub(1);
        }
    }
}

pub const DISCARD_NOTE: &str = "unsaved changes: Esc again discards them, Ctrl-S saves";

fn editor_area(text: &str) -> TextArea<'static> {
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut t = TextArea::new(if lines.is_empty() {
        vec![String::new()]
    } else {
        lines
    });
    t.set_line_number_style(ratatui::style::Style::default().fg(ratatui::style::Color::DarkGray));
    t
}

impl SandboxForm {
    /// The form for `bp`, pre-filled from its `testConfig` (variables as `KEY=VALUE` lines,
    /// the failure rate in percent, 30 when absent).
    pub fn new(bp: Arc<Blueprint>) -> SandboxForm {
        let tc = bp.test_config.clone().unwrap_or_default();
        let mut lines: Vec<String> = tc
            .variables
            .iter()
            .map(|v| format!("{}={}", v.key, v.value))
            .collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        let rate = tc.simulate_failures.unwrap_or(0.3);
        let mut vars = TextArea::new(lines);
        vars.set_placeholder_text("KEY=VALUE, one per line (empty: the blueprint's variables)");
        vars.move_cursor(CursorMove::Bottom);
        vars.move_cursor(CursorMove::End);
        let mut rate = TextArea::new(vec![format!("{}", (rate * 100.0).round())]);
        rate.move_cursor(CursorMove::End);
        SandboxForm {
            blueprint: bp,
            vars,
            rate,
            field: FormField::Vars,
            error: None,
        }
    }

    /// The sandbox run this form describes, or what is wrong with it.
    pub fn request(&self) -> Result<RunRequest, String> {
        let mut variables = Map::new();
        for (i, line) in self.vars.lines().iter().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let Some((k, v)) = t.split_once('=') else {
                return Err(format!(
                    "line {}: expected KEY=VALUE, e.g. TOPICS=[\"rust\",\"wasm\"]",
                    i + 1
                ));
            };
            let k = k.trim();
            if !self.blueprint.variables.contains_key(k) {
                let declared: Vec<&str> = self
                    .blueprint
                    .variables
                    .keys()
                    .map(String::as_str)
                    .collect();
                return Err(format!(
                    "line {}: {} declares no variable {k} (declared: {})",
                    i + 1,
                    self.blueprint.name,
                    if declared.is_empty() {
                        "none".to_string()
                    } else {
                        declared.join(", ")
                    }
                ));
            }
            variables.insert(k.to_string(), parse_var_value(v));
        }
        let rate_text = self.rate.lines().join("");
        let rate = parse_rate(&rate_text)?;
        Ok(RunRequest {
            variables,
            sandbox: true,
            simulate_failures: rate,
            trigger: "console".into(),
            ..RunRequest::default()
        })
    }
}

/// `30`, `30%` or `0.3` → 0.3.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let t = text.trim().trim_end_matches('%').trim();
    let bad = || {
        format!("failure rate {text:?}: give a percentage from 0 to 100 (30 = 30 % of model calls fail)")
    };
    let v: f64 = t.parse().map_err(|_| bad())?;
    let v = if v > 1.0 || text.contains('%') {
        v / 100.0
    } else {
        v
    };
    if !(0.0..=1.0).contains(&v) || v.is_nan() {
        return Err(bad());
    }
    Ok(v)
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
