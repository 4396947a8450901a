//! Rendering: reads [`App`], never changes it. One function per pane; the layout adapts from
//! 80×24 up, and a smaller terminal gets a message instead of a garbled screen.

mod detail;
mod overlays;
mod panes;

pub use overlays::HELP;

use super::app::{App, Focus, Overlay, Screen};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

/// The smallest terminal the console draws in.
pub const MIN_W: u16 = 60;
pub const MIN_H: u16 = 16;

/// Draws the whole console.
pub fn draw(f: &mut Frame, app: &App) {
    let area = f.area();
    let th = &app.theme;
    if area.width < MIN_W || area.height < MIN_H {
        let msg = format!(
            "Terminal too small: {}×{}.\nOmniFlow needs at least {MIN_W}×{MIN_H} (80×24 is comfortable).\nEnlarge the window, or press q to quit.",
            area.width, area.height
        );
        f.render_widget(
            Paragraph::new(msg)
                .style(th.base())
                .wrap(Wrap { trim: true }),
            area,
        );
        return;
    }
    let [header, body, status, hints] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(10),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(f, app, header);
    match &app.screen {
        Screen::Main => draw_main(f, app, body),
        Screen::Detail(d) => detail::draw(f, app, d, body),
    }
    draw_status(f, app, status);
    draw_hints(f, app, hints);
    match &app.overlay {
        Overlay::None => {}
        Overlay::Help(top) => overlays::help(f, app, *top, area),
        Overlay::Processes(top) => overlays::processes(f, app, *top, area),
        Overlay::Confirm(c) => overlays::confirm(f, app, c, area),
        Overlay::Search { target, text } => overlays::search(f, app, *target, text, status),
        Overlay::Sandbox(form) => overlays::sandbox(f, app, form, area),
        Overlay::Editor(ed) => overlays::editor(f, app, ed, area),
    }
}

fn draw_main(f: &mut Frame, app: &App, body: Rect) {
    let wide = body.width >= 120;
    let left_w = if wide { 46 } else { 28 };
    let [left, right] =
        Layout::horizontal([Constraint::Length(left_w), Constraint::Min(30)]).areas(body);
    let pool_h = if body.height >= 30 { 12 } else { 9 };
    let [bps, pool] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(pool_h)]).areas(left);
    panes::blueprints(f, app, bps);
    panes::pool(f, app, pool);
    let [workers, history, logs] = Layout::vertical([
        Constraint::Percentage(30),
        Constraint::Percentage(38),
        Constraint::Percentage(32),
    ])
    .areas(right);
    panes::workers(f, app, workers);
    panes::history(f, app, history);
    panes::logs(f, app, logs);
}

/// A pane's frame: title, focus highlight, and a right-aligned note.
pub(crate) fn pane_block<'a>(
    app: &App,
    title: &'a str,
    focus: Option<Focus>,
    note: String,
) -> Block<'a> {
    let th = &app.theme;
    let focused = focus.is_some_and(|f| f == app.focus) && matches!(app.screen, Screen::Main);
    let mut b = Block::default()
        .borders(Borders::ALL)
        .border_type(if focused {
            BorderType::Thick
        } else {
            BorderType::Plain
        })
        .border_style(th.border(focused))
        .title(Span::styled(format!(" {title} "), th.title(focused)));
    if !note.is_empty() {
        b = b.title_top(Line::from(Span::styled(format!(" {note} "), th.dimmed())).right_aligned());
    }
    b
}

fn draw_header(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let p = &app.pool;
    let state = if p.paused {
        Span::styled(
            "PAUSED",
            Style::default().fg(th.warn).add_modifier(Modifier::BOLD),
        )
    } else if let Some(dir) = &p.disk_full {
        Span::styled(
            format!("HOLDING (disk full: free space at {dir})"),
            Style::default().fg(th.error).add_modifier(Modifier::BOLD),
        )
    } else if p.memory_hold {
        Span::styled(
            "HOLDING (memory)",
            Style::default().fg(th.error).add_modifier(Modifier::BOLD),
        )
    } else {
        Span::styled("running", Style::default().fg(th.ok))
    };
    let mut spans = vec![
        Span::styled(
            " OmniFlow ",
            th.title(true).add_modifier(Modifier::REVERSED),
        ),
        Span::raw(" pool "),
        state,
        Span::styled(
            format!(
                " · {}/{} busy · {} queued · {} run{} in flight",
                p.running,
                p.concurrency,
                p.queued_total(),
                app.in_flight(),
                if app.in_flight() == 1 { "" } else { "s" }
            ),
            th.base(),
        ),
    ];
    let others = app
        .processes
        .iter()
        .filter(|p| p.alive && p.id != crate::store::process_id())
        .count();
    if others > 0 {
        spans.push(Span::styled(
            format!(
                " · {others} other process{} on this DB (P)",
                if others == 1 { "" } else { "es" }
            ),
            th.dimmed(),
        ));
    }
    if app.dropped_events > 0 {
        spans.push(Span::styled(
            format!(" · {} events skipped", app.dropped_events),
            Style::default().fg(th.warn),
        ));
    }
    spans.push(Span::styled(
        format!(" · theme {}", app.theme.name),
        th.dimmed(),
    ));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_status(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let line = if let Some(s) = &app.status {
        Line::from(Span::styled(
            format!(" {}", s.text),
            if s.error {
                Style::default().fg(th.error)
            } else {
                Style::default().fg(th.ok)
            },
        ))
    } else if let Some(p) = app.startup_problems.first() {
        Line::from(vec![
            Span::styled(" ⚠ ", Style::default().fg(th.warn)),
            Span::styled(p.clone(), Style::default().fg(th.warn)),
            Span::styled(
                if app.startup_problems.len() > 1 {
                    format!(" (+{} more; Esc dismisses)", app.startup_problems.len() - 1)
                } else {
                    " (Esc dismisses)".to_string()
                },
                th.dimmed(),
            ),
        ])
    } else {
        Line::default()
    };
    f.render_widget(Paragraph::new(line), area);
}

/// The one-line hint bar: the keys that matter where the focus is.
fn draw_hints(f: &mut Frame, app: &App, area: Rect) {
    let keys: &[(&str, &str)] = match (&app.overlay, &app.screen, app.focus) {
        (Overlay::Sandbox(_), _, _) => &[
            ("Tab", "field"),
            ("Ctrl-S", "start"),
            ("Enter", "start (in rate)"),
            ("Esc", "cancel"),
        ],
        (Overlay::Editor(_), _, _) => &[
            ("Ctrl-S", "validate+save"),
            ("Esc", "close"),
            ("Ctrl-Z", "undo"),
        ],
        (Overlay::Search { .. }, _, _) => &[("Enter", "apply"), ("Esc", "clear")],
        (Overlay::Help(_) | Overlay::Processes(_), _, _) => {
            &[("↑↓", "scroll"), ("any other key", "close")]
        }
        (Overlay::Confirm(_), _, _) => &[("y/n", "answer"), ("Esc", "close")],
        (_, Screen::Detail(_), _) => &[
            ("↑↓", "step"),
            ("PgUp/PgDn", "scroll"),
            ("r", "retry"),
            ("c", "cancel"),
            ("+/-", "priority"),
            ("t", "sandbox"),
            ("o", "step logs"),
            ("Esc", "back"),
            ("?", "help"),
        ],
        (_, _, Focus::Blueprints) => &[
            ("Enter", "run"),
            ("t", "sandbox test"),
            ("e", "edit"),
            ("/", "filter"),
            ("Tab", "pane"),
            ("p", "pause"),
            ("?", "help"),
            ("q", "quit"),
        ],
        (_, _, Focus::Workers) => &[
            ("Enter", "open run"),
            ("c", "cancel"),
            ("+/-", "priority"),
            ("Tab", "pane"),
            ("p", "pause"),
            ("?", "help"),
            ("q", "quit"),
        ],
        (_, _, Focus::History) => &[
            ("Enter", "open"),
            ("r", "retry"),
            ("c", "cancel"),
            ("s", "status"),
            ("b", "blueprint"),
            ("/", "name"),
            ("PgDn", "older"),
            ("?", "help"),
        ],
        (_, _, Focus::Logs) => &[
            ("f", "follow/pause"),
            ("v", "level"),
            ("/", "search"),
            ("o", "run filter"),
            ("↑↓", "scroll"),
            ("Tab", "pane"),
            ("?", "help"),
        ],
    };
    let th = &app.theme;
    let mut spans = Vec::new();
    let mut used = 0;
    for (k, what) in keys {
        // Whole hints only: one that does not fit is left out rather than cut.
        let n = k.chars().count() + what.chars().count() + 3;
        if used + n > area.width as usize {
            break;
        }
        used += n;
        spans.push(Span::styled(format!(" {k}"), th.keycap()));
        spans.push(Span::styled(format!(" {what} "), th.dimmed()));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// A centred rectangle of at most `w`×`h` inside `area`, cleared.
pub(crate) fn popup(f: &mut Frame, area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width.saturating_sub(2));
    let h = h.min(area.height.saturating_sub(2));
    let r = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    f.render_widget(Clear, r);
    r
}

/// Cuts `s` to `n` characters, marking the cut with `…`.
pub(crate) fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else if n == 0 {
        String::new()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
