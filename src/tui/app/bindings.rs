//! The console's key bindings, in one table: what a key does (`App::on_main_key` looks the key
//! up here), the hint bar (the short label, in table order for the place) and the `?` help
//! (the long text, grouped by place) all read it, so a hint cannot name a key that does
//! something else. Dialogs have their own small tables (`confirm_keys`, `SANDBOX_KEYS`,
//! `EDITOR_KEYS`), read the same way by their handler, their hint line and the hint bar.

use super::{App, Confirm, Focus, Screen};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What a key on the main screen or the run detail does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Help,
    Quit,
    Back,
    NextPane,
    PrevPane,
    Up,
    Down,
    PageUp,
    PageDown,
    Top,
    Bottom,
    Open,
    Search,
    Sandbox,
    Retry,
    Cancel,
    Pause,
    PriorityUp,
    PriorityDown,
    Edit,
    Run,
    Export,
    Reload,
    Theme,
    Processes,
    StatusFilter,
    BlueprintFilter,
    Level,
    Follow,
    LogFilter,
    Message,
}

/// Where a binding applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// The main screen and the run detail.
    Everywhere,
    /// The main screen, any pane.
    Main,
    Blueprints,
    Workers,
    History,
    Logs,
    /// A run: History, Workers, or the run detail.
    Runs,
    Detail,
}

impl Where {
    pub fn applies(self, screen_detail: bool, focus: Focus) -> bool {
        match self {
            Where::Everywhere => true,
            Where::Main => !screen_detail,
            Where::Blueprints => !screen_detail && focus == Focus::Blueprints,
            Where::Workers => !screen_detail && focus == Focus::Workers,
            Where::History => !screen_detail && focus == Focus::History,
            Where::Logs => !screen_detail && focus == Focus::Logs,
            Where::Runs => {
                screen_detail || matches!(focus, Focus::History | Focus::Workers | Focus::Logs)
            }
            Where::Detail => screen_detail,
        }
    }

    /// The group's title in the help.
    pub fn title(self) -> &'static str {
        match self {
            Where::Everywhere => "everywhere",
            Where::Main => "main screen",
            Where::Blueprints => "blueprints",
            Where::Workers => "workers",
            Where::History => "history",
            Where::Logs => "logs",
            Where::Runs => "runs (History, Workers, run detail)",
            Where::Detail => "run detail",
        }
    }
}

/// One key binding.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub keys: &'static [KeyCode],
    pub action: Action,
    pub place: Where,
    /// The hint bar's label (`None`: help only).
    pub hint: Option<&'static str>,
    /// The help's text.
    pub help: &'static str,
}

const fn b(
    keys: &'static [KeyCode],
    action: Action,
    place: Where,
    hint: Option<&'static str>,
    help: &'static str,
) -> Binding {
    Binding {
        keys,
        action,
        place,
        hint,
        help,
    }
}

use Action as A;
use KeyCode as K;
use Where as W;

/// Every binding. The first one that applies to a key wins, so place-specific entries come
/// before general ones for the same key.
pub const BINDINGS: &[Binding] = &[
    // Blueprints.
    b(&[K::Enter, K::Char('x')], A::Run, W::Blueprints, Some("run"), "run it (asks first; says so when no model provider is configured)"),
    b(&[K::Char('t')], A::Sandbox, W::Blueprints, Some("sandbox test"), "sandbox-test it: edit test variables, failure rate"),
    b(&[K::Char('e')], A::Edit, W::Blueprints, Some("edit"), "view / edit its file (Ctrl-S validates and saves)"),
    b(&[K::Char('R')], A::Reload, W::Blueprints, None, "reload the blueprints directory"),
    b(&[K::Char('X')], A::Export, W::Blueprints, None, "export it as code (python, node, github-action, docker)"),
    b(&[K::Char('b')], A::BlueprintFilter, W::Blueprints, None, "show only its runs in History"),
    b(&[K::Char('/')], A::Search, W::Blueprints, Some("filter"), "filter the blueprints by name (part of it)"),
    // Logs.
    b(&[K::Char('f'), K::Char(' ')], A::Follow, W::Logs, Some("follow/pause"), "follow new lines / pause and scroll back"),
    b(&[K::Char('v')], A::Level, W::Logs, Some("level"), "level filter: all, info+, warn+, error"),
    b(&[K::Char('/')], A::Search, W::Logs, Some("search"), "search the lines"),
    b(&[K::Char('o')], A::LogFilter, W::Logs, Some("run filter"), "only the selected run's lines (again: all)"),
    // History.
    b(&[K::Char('s')], A::StatusFilter, W::History, Some("status"), "cycle the status filter"),
    b(&[K::Char('b')], A::BlueprintFilter, W::History, Some("blueprint"), "only the selected run's blueprint"),
    b(&[K::Char('/')], A::Search, W::History, Some("name"), "only runs whose blueprint name contains the text"),
    b(&[K::Char('/')], A::Search, W::Workers, None, "search the logs"),
    // Runs.
    b(&[K::Enter], A::Open, W::Runs, Some("open"), "open the run: steps, attempts, input, output"),
    b(&[K::Char('r')], A::Retry, W::Runs, Some("retry"), "retry a failed run: w whole, f only failed steps"),
    b(&[K::Char('c')], A::Cancel, W::Runs, Some("cancel"), "cancel a queued or running run (asks first)"),
    b(&[K::Char('+'), K::Char('=')], A::PriorityUp, W::Runs, Some("priority"), "raise a queued or running run's priority"),
    b(&[K::Char('-')], A::PriorityDown, W::Runs, None, "lower a queued or running run's priority"),
    b(&[K::Char('t')], A::Sandbox, W::Runs, None, "sandbox-test the run's blueprint"),
    b(&[K::Char('o')], A::LogFilter, W::Detail, Some("step logs"), "Logs: only the selected step's lines of the run (again: all); exactly that step: summarize[1], not summarize[2]"),
    b(&[K::Char('o')], A::LogFilter, W::Runs, None, "Logs: only the selected run's lines (again: all)"),
    b(&[K::PageUp], A::PageUp, W::Detail, None, "scroll the step's text up a page"),
    b(&[K::PageDown], A::PageDown, W::Detail, Some("scroll"), "scroll the step's text down a page (the pane's height)"),
    // Everywhere.
    b(&[K::Esc], A::Back, W::Detail, Some("back"), "back to the main screen"),
    b(&[K::Char('?'), K::F(1)], A::Help, W::Everywhere, Some("help"), "this help"),
    b(&[K::Char('q')], A::Quit, W::Everywhere, Some("quit"), "quit; runs in flight: cancel, hand over or wait (asks)"),
    b(&[K::Esc], A::Back, W::Main, None, "close, or clear the focused pane's filters"),
    b(&[K::Tab, K::Right, K::Char('l')], A::NextPane, W::Main, Some("pane"), "next pane"),
    b(&[K::BackTab, K::Left, K::Char('h')], A::PrevPane, W::Main, None, "previous pane"),
    b(&[K::Up, K::Char('k')], A::Up, W::Everywhere, None, "move up"),
    b(&[K::Down, K::Char('j')], A::Down, W::Everywhere, Some("move"), "move down"),
    b(&[K::PageUp], A::PageUp, W::Main, None, "page up (History: newer runs)"),
    b(&[K::PageDown], A::PageDown, W::Main, Some("older"), "page down (History: older runs)"),
    b(&[K::Home, K::Char('g')], A::Top, W::Everywhere, None, "top (Logs: the oldest line loaded)"),
    b(&[K::End, K::Char('G')], A::Bottom, W::Everywhere, None, "bottom (Logs: follow the newest)"),
    b(&[K::Char('p')], A::Pause, W::Everywhere, Some("pause"), "pause / resume the pool"),
    b(&[K::Char('P')], A::Processes, W::Everywhere, None, "processes on this database: heartbeats, pools, memory"),
    b(&[K::Char('T')], A::Theme, W::Everywhere, None, "next theme"),
    b(&[K::Char('m')], A::Message, W::Everywhere, None, "the last message and the start-up problems in full (a long one is cut on the status line)"),
];

/// The hint bar, per place: these actions, in this order (each shown with its binding's keys
/// and label). `Quit` and `Back` are kept when the bar is too narrow; the rest drop from the end.
pub fn hint_actions(detail: bool, focus: Focus) -> &'static [Action] {
    if detail {
        return &[
            A::Back,
            A::Down,
            A::PageDown,
            A::Retry,
            A::Cancel,
            A::LogFilter,
            A::Help,
        ];
    }
    match focus {
        Focus::Blueprints => &[
            A::Run,
            A::Sandbox,
            A::Edit,
            A::Search,
            A::NextPane,
            A::Pause,
            A::Help,
            A::Quit,
        ],
        Focus::Workers => &[
            A::Open,
            A::Cancel,
            A::PriorityUp,
            A::NextPane,
            A::Pause,
            A::Help,
            A::Quit,
        ],
        Focus::History => &[
            A::Open,
            A::Retry,
            A::Search,
            A::StatusFilter,
            A::BlueprintFilter,
            A::PageDown,
            A::Help,
            A::Quit,
        ],
        Focus::Logs => &[
            A::Follow,
            A::LogFilter,
            A::Search,
            A::Level,
            A::NextPane,
            A::Help,
            A::Quit,
        ],
    }
}

/// The binding that applies to `action` in this place (for its keys and label).
pub fn binding_of(action: Action, detail: bool, focus: Focus) -> Option<&'static Binding> {
    BINDINGS
        .iter()
        .find(|b| b.action == action && b.place.applies(detail, focus))
}

/// The action `k` triggers in this place, if any.
pub fn action_of(k: &KeyEvent, detail: bool, focus: Focus) -> Option<Action> {
    if k.modifiers
        .intersects(KeyModifiers::CONTROL | KeyModifiers::ALT)
    {
        return None;
    }
    BINDINGS
        .iter()
        .find(|b| b.keys.contains(&k.code) && b.place.applies(detail, focus))
        .map(|b| b.action)
}

/// How a key is written in hints and the help.
pub fn key_name(k: &KeyCode) -> String {
    match k {
        K::Char(' ') => "Space".into(),
        K::Char(c) => c.to_string(),
        K::Enter => "Enter".into(),
        K::Esc => "Esc".into(),
        K::Tab => "Tab".into(),
        K::BackTab => "Shift-Tab".into(),
        K::Up => "↑".into(),
        K::Down => "↓".into(),
        K::Left => "←".into(),
        K::Right => "→".into(),
        K::PageUp => "PgUp".into(),
        K::PageDown => "PgDn".into(),
        K::Home => "Home".into(),
        K::End => "End".into(),
        K::F(n) => format!("F{n}"),
        other => format!("{other:?}"),
    }
}

/// The keys of a binding as the help lists them (`↑ / k`).
pub fn keys_text(b: &Binding) -> String {
    b.keys.iter().map(key_name).collect::<Vec<_>>().join(" / ")
}

/// The key the hint bar shows for a binding: its first.
pub fn hint_key(b: &Binding) -> String {
    b.keys.first().map(key_name).unwrap_or_default()
}

/// The `?` help: every binding grouped by place (in a fixed order), plus the keys that are
/// not in the table because they work in every state (Ctrl-C).
pub fn help_groups() -> Vec<(&'static str, Vec<(String, &'static str)>)> {
    let order = [
        W::Everywhere,
        W::Main,
        W::Blueprints,
        W::Runs,
        W::Detail,
        W::History,
        W::Workers,
        W::Logs,
    ];
    let mut groups = Vec::new();
    for place in order {
        let mut rows: Vec<(String, &'static str)> = BINDINGS
            .iter()
            .filter(|b| b.place == place)
            .map(|b| (keys_text(b), b.help))
            .collect();
        if place == W::Everywhere {
            rows.push((
                "Ctrl-C".into(),
                "quit now, handing runs in flight over (as on a hang-up); exit status 3 (interrupted)",
            ));
        }
        if !rows.is_empty() {
            groups.push((place.title(), rows));
        }
    }
    groups.push((
        "reading the panes",
        vec![
            (
                "c h n l".into(),
                "Queue: queued steps by priority — critical, high, normal, low (the words on a wide pane)",
            ),
            (
                "↻ ⧗".into(),
                "Workers: a step waiting to retry / waiting for its provider's rate limit (no worker held)",
            ),
        ],
    ));
    groups
}

/// What a dialog key does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Close the dialog, doing nothing.
    Close,
    QuitCancel,
    QuitHandOver,
    QuitWait,
    CancelRun,
    RunIt,
    SandboxInstead,
    RetryWhole,
    RetryFailed,
    ExportPython,
    ExportNode,
    ExportGithub,
    ExportDocker,
}

/// A dialog's keys: (key, label, what it does). The dialog's own hint line and the hint bar
/// show exactly these; Enter is bound only where it destroys no work and writes no file.
pub fn confirm_keys(c: &Confirm) -> &'static [(KeyCode, &'static str, Answer)] {
    match c {
        Confirm::Quit { .. } => &[
            (K::Char('h'), "hand over", Answer::QuitHandOver),
            (K::Char('w'), "wait", Answer::QuitWait),
            (K::Char('c'), "cancel runs", Answer::QuitCancel),
            (K::Esc, "stay", Answer::Close),
        ],
        Confirm::Cancel { .. } => &[
            (K::Char('y'), "cancel it", Answer::CancelRun),
            (K::Esc, "keep it", Answer::Close),
        ],
        Confirm::Run { .. } => &[
            (K::Char('y'), "run", Answer::RunIt),
            (K::Char('t'), "sandbox test instead", Answer::SandboxInstead),
            (K::Esc, "back", Answer::Close),
        ],
        Confirm::Retry { .. } => &[
            (K::Char('w'), "whole run", Answer::RetryWhole),
            (K::Char('f'), "failed steps only", Answer::RetryFailed),
            (K::Esc, "back", Answer::Close),
        ],
        Confirm::Export { .. } => &[
            (K::Char('p'), "python", Answer::ExportPython),
            (K::Char('o'), "node", Answer::ExportNode),
            (K::Char('g'), "github-action", Answer::ExportGithub),
            (K::Char('d'), "docker", Answer::ExportDocker),
            (K::Esc, "back", Answer::Close),
        ],
    }
}

/// The answer `k` gives in dialog `c`. `q` and `n` also close (never "no" meaning something
/// else: no dialog binds them to an action).
pub fn answer_of(c: &Confirm, k: &KeyEvent) -> Option<Answer> {
    let code = match k.code {
        K::Char(ch) => K::Char(ch.to_ascii_lowercase()),
        other => other,
    };
    if let Some((_, _, a)) = confirm_keys(c).iter().find(|(key, _, _)| *key == code) {
        return Some(*a);
    }
    matches!(code, K::Char('q') | K::Char('n')).then_some(Answer::Close)
}

/// The sandbox form's keys (handled in `on_sandbox_key`).
pub const SANDBOX_KEYS: &[(&str, &str)] = &[
    ("Ctrl-S", "start"),
    ("Tab", "next field"),
    ("Ctrl-K", "clear field"),
    ("Esc", "cancel"),
];

/// The editor's keys beyond typing (handled in `on_editor_key`).
pub const EDITOR_KEYS: &[(&str, &str)] = &[
    ("Ctrl-S", "validate+save"),
    ("Ctrl-Z", "undo"),
    ("Ctrl-Y", "redo"),
    ("Esc", "close"),
];

impl App {
    /// The hint bar's entries for the current place: (key, label), and whether it must stay.
    pub fn hints(&self) -> Vec<(String, String, bool)> {
        use super::Overlay;
        let fixed = |t: &[(&str, &str)]| {
            t.iter()
                .map(|(k, w)| (k.to_string(), w.to_string(), *k == "Esc"))
                .collect()
        };
        match &self.overlay {
            Overlay::Sandbox(_) => return fixed(SANDBOX_KEYS),
            Overlay::Editor(_) => return fixed(EDITOR_KEYS),
            Overlay::Search { .. } => return fixed(&[("Enter", "apply"), ("Esc", "clear")]),
            Overlay::Help(_) | Overlay::Processes(_) | Overlay::Message => {
                return fixed(&[("↑↓", "scroll"), ("Esc", "close")])
            }
            Overlay::Confirm(c) => {
                return confirm_keys(c)
                    .iter()
                    .map(|(k, w, a)| (key_name(k), w.to_string(), *a == Answer::Close))
                    .collect()
            }
            Overlay::None => {}
        }
        let detail = matches!(self.screen, Screen::Detail(_));
        hint_actions(detail, self.focus)
            .iter()
            .filter_map(|a| binding_of(*a, detail, self.focus))
            .filter_map(|b| {
                b.hint.map(|h| {
                    (
                        hint_key(b),
                        h.to_string(),
                        matches!(b.action, A::Quit | A::Back),
                    )
                })
            })
            .collect()
    }
}
