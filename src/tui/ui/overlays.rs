//! Overlays: help, confirmations, the search line, the sandbox-test form and the editor.

use super::{clip, popup_canvas};
use crate::tui::app::{short, App, Confirm, Editor, Focus, FormField, SandboxForm};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Paragraph, Wrap};
use ratatui::Frame;

/// The help overlay's width on a wide terminal.
const HELP_W: u16 = 96;

use crate::text::wrap as wrap_words;

fn frame<'a>(app: &App, title: &'a str) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Double)
        .border_style(app.theme.border(true))
        .title(Span::styled(format!(" {title} "), app.theme.title(true)))
}

/// `P`: every process on the database, from their heartbeats, this console first.
pub fn processes(f: &mut Frame, app: &App, top: u16, area: Rect) {
    let th = &app.theme;
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_millis(app.now_ms);
    let me = crate::store::process_id();
    let w = 100.min(area.width.saturating_sub(2));
    let text_w = (w as usize).saturating_sub(6).max(20);
    let mut lines: Vec<Line> = Vec::new();
    if let Some(p) = &app.processes_problem {
        lines.push(Line::from(Span::styled(
            format!("cannot read the processes: {p}"),
            Style::default().fg(th.error),
        )));
    }
    let mut rows: Vec<&crate::store::ProcessRow> = app.processes.iter().collect();
    // This console first, then the live ones, then the rest as recorded (newest first).
    rows.sort_by_key(|p| (p.id != me, !p.alive));
    if rows.is_empty() && app.processes_problem.is_none() {
        lines.push(Line::from(Span::styled(
            "reading the processes…",
            th.dimmed(),
        )));
    }
    for p in rows {
        let (mark, style) = match p.state() {
            "alive" => ("●", Style::default().fg(th.ok)),
            "stopped" => ("○", th.dimmed()),
            _ => ("✗", Style::default().fg(th.error)),
        };
        let mut text = p.describe(now);
        if p.id == me {
            text = format!("(this console) {text}");
        }
        for (i, row) in wrap_words(&text, text_w).into_iter().enumerate() {
            lines.push(Line::from(vec![
                Span::styled(
                    if i == 0 {
                        format!(" {mark} ")
                    } else {
                        "   ".into()
                    },
                    style,
                ),
                Span::styled(row, if p.alive { th.base() } else { th.dimmed() }),
            ]));
        }
    }
    let alive = app.processes.iter().filter(|p| p.alive).count();
    let total = lines.len() as u16;
    let r = popup_canvas(f, app, area, w, total + 2);
    let room = r.height.saturating_sub(2);
    let top = top.min(total.saturating_sub(room));
    let title = format!("Processes on this database · {alive} alive · any key closes");
    f.render_widget(
        Paragraph::new(lines)
            .scroll((top, 0))
            .block(frame(app, &title)),
        r,
    );
}

pub fn help(f: &mut Frame, app: &App, top: u16, area: Rect) {
    let th = &app.theme;
    let key_w = 22;
    // The popup's inner width; a long description wraps under itself, not under the keys,
    // and every row is counted, so scrolling reaches the last one.
    let inner_w = (HELP_W.min(area.width.saturating_sub(2)) as usize).saturating_sub(2);
    let text_w = inner_w.saturating_sub(key_w + 4).max(12);
    let mut lines = Vec::new();
    for (group, keys) in crate::tui::app::bindings::help_groups() {
        lines.push(Line::from(Span::styled(
            group.to_string(),
            th.title(false).add_modifier(Modifier::BOLD),
        )));
        for (k, what) in keys {
            for (i, row) in wrap_words(what, text_w).into_iter().enumerate() {
                let key = if i == 0 { k.as_str() } else { "" };
                lines.push(Line::from(vec![
                    Span::styled(format!("  {key:<key_w$} "), th.keycap()),
                    Span::styled(row, th.base()),
                ]));
            }
        }
    }
    let total = lines.len() as u16;
    let r = popup_canvas(f, app, area, HELP_W, total + 2);
    let room = r.height.saturating_sub(2);
    let top = top.min(total.saturating_sub(room));
    let title = if total > room {
        format!(
            "Keys ({}–{} of {total}, ↑↓ scroll)",
            top + 1,
            (top + room).min(total)
        )
    } else {
        "Keys (any key closes)".to_string()
    };
    f.render_widget(
        Paragraph::new(lines)
            .scroll((top, 0))
            .block(frame(app, &title)),
        r,
    );
}

pub fn confirm(f: &mut Frame, app: &App, c: &Confirm, area: Rect) {
    let th = &app.theme;
    let (title, text) = match c {
        Confirm::Quit { in_flight } => (
            "Quit?",
            format!(
                "{in_flight} run{} still in flight in this console. Cancel {} (recorded as cancelled), hand {} over (a daemon, the next console or `omniflow resume` continues), or wait until {}?",
                if *in_flight == 1 { " is" } else { "s are" },
                if *in_flight == 1 { "it" } else { "them" },
                if *in_flight == 1 { "it" } else { "them" },
                if *in_flight == 1 { "it finishes" } else { "they finish" }
            ),
        ),
        Confirm::Cancel { run_id, blueprint } => (
            "Cancel run?",
            if app.runs.contains_key(run_id) {
                format!("Cancel {blueprint} run {}? Its running steps stop now.", short(run_id))
            } else {
                // Another process drives it: the request goes through the shared database.
                format!(
                    "Cancel {blueprint} run {}? Another process drives it: it is asked to, and stops its steps.",
                    short(run_id)
                )
            },
        ),
        Confirm::Run { blueprint } => (
            "Run?",
            match app.no_provider.as_ref().filter(|_| app.uses_models(blueprint)) {
                Some(why) => format!(
                    "No model provider is configured, so {blueprint}'s model steps would fail at once: \
                     {why} Press t to sandbox-test it with the simulated model instead."
                ),
                None => format!(
                    "Run {blueprint} now, for real (real model providers; notifications are sent)? \
                     For a dry run press t (sandbox test) instead."
                ),
            },
        ),
        Confirm::Export { blueprint } => (
            "Export as code",
            format!(
                "Write {blueprint} as a standalone program you own, into exports/{blueprint}-<target>/ \
                 (an existing non-empty folder is not overwritten)."
            ),
        ),
        Confirm::Retry { run_id, blueprint } => (
            "Retry run",
            format!(
                "Retry {blueprint} run {} as a new run: the whole run, or only its failed steps \
                 (the successful steps' recorded outputs are reused)?",
                short(run_id)
            ),
        ),
    };
    let keys = crate::tui::app::bindings::confirm_keys(c)
        .iter()
        .map(|(k, what, _)| format!("{} {what}", crate::tui::app::bindings::key_name(k)))
        .collect::<Vec<_>>()
        .join(" · ");
    // Tall enough for the question (wrapped), a blank line and the keys (wrapped).
    let inner_w = 64usize.min(area.width.saturating_sub(4) as usize).max(1);
    let rows = wrap_words(&text, inner_w).len() + 1 + wrap_words(&keys, inner_w).len();
    let r = popup_canvas(f, app, area, 64, rows as u16 + 2);
    let lines = vec![
        Line::from(Span::styled(text, th.base())),
        Line::default(),
        Line::from(Span::styled(keys, th.keycap())),
    ];
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(frame(app, title)),
        r,
    );
}

pub fn search(f: &mut Frame, app: &App, target: Focus, text: &str, line: Rect) {
    let th = &app.theme;
    let what = match target {
        Focus::Blueprints => "filter blueprints",
        Focus::History => "history: part of a blueprint name (Enter applies)",
        Focus::Logs | Focus::Workers => "search logs",
    };
    f.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(format!(" {what}: /"), th.keycap()),
            Span::styled(text.to_string(), th.base().add_modifier(Modifier::BOLD)),
            Span::styled("▏", th.keycap()),
        ]))
        .style(th.base()),
        line,
    );
}

pub fn sandbox(f: &mut Frame, app: &App, form: &SandboxForm, area: Rect) {
    let th = &app.theme;
    let r = popup_canvas(f, app, area, 90, 18);
    let title = format!("Sandbox test: {}", form.blueprint.name);
    let outer = frame(app, &title);
    let inner = outer.inner(r);
    f.render_widget(outer, r);
    let [intro, vars, rate, err] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(3),
        Constraint::Length(3),
        Constraint::Length(2),
    ])
    .areas(inner);
    f.render_widget(
        Paragraph::new(
            "Runs against the simulated model; nothing leaves the machine. Test variables \
             (KEY=VALUE, value as JSON when it parses) override the blueprint's.",
        )
        .style(th.dimmed())
        .wrap(Wrap { trim: true }),
        intro,
    );
    let field_block = |t: &'static str, on: bool| {
        Block::default()
            .borders(Borders::ALL)
            .border_style(th.border(on))
            .title(Span::styled(t, th.title(on)))
    };
    let mut v = form.vars.clone();
    v.set_block(field_block(
        " test variables ",
        form.field == FormField::Vars,
    ));
    v.set_cursor_line_style(Style::default());
    if form.field != FormField::Vars {
        v.set_cursor_style(Style::default());
    }
    f.render_widget(&v, vars);
    let mut rt = form.rate.clone();
    rt.set_block(field_block(
        " simulated failures, % of model calls ",
        form.field == FormField::Rate,
    ));
    if form.field != FormField::Rate {
        rt.set_cursor_style(Style::default());
    }
    f.render_widget(&rt, rate);
    let msg = match &form.error {
        Some(e) => Line::from(Span::styled(e.clone(), Style::default().fg(th.error))),
        None => key_line(app, crate::tui::app::bindings::SANDBOX_KEYS),
    };
    f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: true }), err);
}

pub fn editor(f: &mut Frame, app: &App, ed: &Editor, area: Rect) {
    let th = &app.theme;
    let r = popup_canvas(
        f,
        app,
        area,
        area.width.saturating_sub(4),
        area.height.saturating_sub(2),
    );
    let title = format!(
        "{}{}",
        ed.path.display(),
        if ed.modified() { " (modified)" } else { "" }
    );
    let outer = frame(app, &title);
    let inner = outer.inner(r);
    f.render_widget(outer, r);
    let ph = if ed.problems.is_empty() && ed.note.is_none() {
        1
    } else {
        (ed.problems.len() as u16 + 2).min(inner.height / 3).max(2)
    };
    let [text, probs] = Layout::vertical([Constraint::Min(3), Constraint::Length(ph)]).areas(inner);
    match &ed.text {
        Some(t) => f.render_widget(t, text),
        None => f.render_widget(Paragraph::new("reading the file…").style(th.dimmed()), text),
    }
    let mut lines = Vec::new();
    if let Some(n) = &ed.note {
        lines.push(Line::from(Span::styled(
            n.clone(),
            Style::default().fg(if ed.problems.is_empty() {
                th.ok
            } else {
                th.warn
            }),
        )));
    }
    for p in &ed.problems {
        lines.push(Line::from(Span::styled(
            clip(p, inner.width as usize * 2),
            Style::default().fg(th.error),
        )));
    }
    if lines.is_empty() {
        let mut l = key_line(app, crate::tui::app::bindings::EDITOR_KEYS);
        l.spans.push(Span::styled(
            " (only a valid blueprint is written; a changed file's old version is kept as .bak)",
            th.dimmed(),
        ));
        lines.push(l);
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), probs);
}

/// `Ctrl-S start · Tab next field · …` from a dialog's key table.
fn key_line(app: &App, keys: &[(&str, &str)]) -> Line<'static> {
    let th = &app.theme;
    let mut spans = Vec::new();
    for (i, (k, what)) in keys.iter().enumerate() {
        if i > 0 {
            spans.push(Span::styled(" · ", th.dimmed()));
        }
        spans.push(Span::styled(k.to_string(), th.keycap()));
        spans.push(Span::styled(format!(" {what}"), th.dimmed()));
    }
    Line::from(spans)
}

/// `m`: the last message and the start-up problems, whole.
pub fn message(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let w = 90.min(area.width.saturating_sub(2));
    let text_w = (w as usize).saturating_sub(2).max(10);
    let mut lines: Vec<Line> = Vec::new();
    if let Some(s) = &app.last_status {
        let style = if s.error {
            Style::default().fg(th.error)
        } else {
            th.base()
        };
        for row in wrap_words(&s.text, text_w) {
            lines.push(Line::from(Span::styled(row, style)));
        }
    }
    for p in &app.startup_problems {
        lines.push(Line::default());
        for row in wrap_words(&format!("⚠ {p}"), text_w) {
            lines.push(Line::from(Span::styled(row, Style::default().fg(th.warn))));
        }
    }
    if lines.is_empty() {
        lines.push(Line::from(Span::styled("no message yet", th.dimmed())));
    }
    let r = popup_canvas(f, app, area, w, lines.len() as u16 + 2);
    f.render_widget(
        Paragraph::new(lines).block(frame(app, "Message · any key closes")),
        r,
    );
}
