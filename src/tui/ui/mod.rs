//! Rendering: reads [`App`], never changes it. One function per pane; the layout adapts from
//! 80×24 up, and a smaller terminal gets a message instead of a garbled screen.

mod detail;
mod fleet;
mod overlays;
mod panes;

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
    // The theme's canvas under everything (its own background, when it has one).
    f.render_widget(Block::default().style(th.canvas()), area);
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
        Overlay::Message => overlays::message(f, app, area),
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
        part(
            "PAUSED",
            Style::default().fg(th.warn).add_modifier(Modifier::BOLD),
            0,
        )
    } else if let Some(dir) = &p.disk_full {
        part(
            format!("HOLDING (disk full: free space at {dir})"),
            Style::default().fg(th.error).add_modifier(Modifier::BOLD),
            0,
        )
    } else if p.memory_hold {
        part(
            "HOLDING (memory)",
            Style::default().fg(th.error).add_modifier(Modifier::BOLD),
            0,
        )
    } else {
        part("running", Style::default().fg(th.ok), 0)
    };
    let sched = app.schedules_owner();
    let sched_style = match sched {
        crate::tui::app::ScheduleOwner::ThisConsole => Style::default().fg(th.warn),
        _ => th.dimmed(),
    };
    let busy = app.busy_workers().len();
    let in_flight = app.in_flight();
    let mut parts = vec![
        part(
            " OmniFlow ",
            th.title(true).add_modifier(Modifier::REVERSED),
            0,
        ),
        part(" pool ", th.base(), 3),
        state,
        part(
            format!(
                " · {busy}/{} busy{}",
                app.workers.len(),
                if app.fleet.is_some() { " here" } else { "" }
            ),
            th.base(),
            0,
        ),
        // With a fleet, the queue is the shared one; this pool's own queue (claimed rows
        // waiting for a worker, sandbox steps) is named apart, and only when it has any.
        match &app.fleet {
            Some(fl) => part(
                format!(
                    " · {} queued in the fleet",
                    fl.depth_total()
                        .map_or_else(|| "?".to_string(), |n| n.to_string())
                ),
                th.base(),
                1,
            ),
            None => part(format!(" · {} queued", p.queued_total()), th.base(), 1),
        },
        part(
            format!(
                " · {in_flight} run{} in flight",
                if in_flight == 1 { "" } else { "s" }
            ),
            th.base(),
            2,
        ),
        part(format!(" · {}", sched.label()), sched_style, 0),
    ];
    let others = app
        .processes
        .iter()
        .filter(|p| p.alive && p.id != crate::store::process_id())
        .count();
    if others > 0 {
        parts.push(part(
            format!(
                " · {others} other process{} (P)",
                if others == 1 { "" } else { "es" }
            ),
            th.dimmed(),
            4,
        ));
    }
    if app.fleet.is_some() && p.queued_total() > 0 {
        parts.push(part(
            format!(" · {} queued here", p.queued_total()),
            th.base(),
            3,
        ));
    }
    if app.dropped_events > 0 {
        parts.push(part(
            format!(" · {} events skipped", app.dropped_events),
            Style::default().fg(th.warn),
            3,
        ));
    }
    parts.push(part(format!(" · theme {}", app.theme.name), th.dimmed(), 5));
    f.render_widget(Paragraph::new(fit(parts, area.width as usize)), area);
}

fn draw_status(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let cols = area.width as usize;
    // A message too long for the line keeps its start and its keys, and says how to read
    // the rest.
    let line = if let Some(s) = &app.status {
        let style = if s.error {
            Style::default().fg(th.error)
        } else {
            Style::default().fg(th.ok)
        };
        let text = format!(" {}", s.text);
        let keys = s
            .keys
            .as_deref()
            .map(|k| format!(" ({k})"))
            .unwrap_or_default();
        if crate::text::width(&text) + crate::text::width(&keys) <= cols {
            Line::from(vec![
                Span::styled(text, style),
                Span::styled(keys, th.dimmed()),
            ])
        } else {
            let keys = match s.keys.as_deref() {
                Some(k) => format!(" ({k} · m all)"),
                None => " (m: all)".to_string(),
            };
            let room = cols.saturating_sub(crate::text::width(&keys));
            Line::from(vec![
                Span::styled(clip(&text, room), style),
                Span::styled(keys, th.dimmed()),
            ])
        }
    } else if let Some(p) = app.startup_problems.first() {
        let suffix = if app.startup_problems.len() > 1 {
            format!(
                " (+{} more; m shows all, Esc dismisses)",
                app.startup_problems.len() - 1
            )
        } else {
            " (m: all, Esc dismisses)".to_string()
        };
        let text = format!(" ⚠ {p}");
        let room = cols.saturating_sub(crate::text::width(&suffix));
        Line::from(vec![
            Span::styled(clip(&text, room), Style::default().fg(th.warn)),
            Span::styled(suffix, th.dimmed()),
        ])
    } else {
        Line::default()
    };
    f.render_widget(Paragraph::new(line), area);
}

/// The one-line hint bar: the keys that matter here, from the same tables that handle them.
/// Whole hints only; when the bar is too narrow the last ones drop, but the keys to leave
/// (`q`, `Esc`) stay.
fn draw_hints(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let hints = app.hints();
    let n = hints.len();
    let mut parts = Vec::new();
    for (i, (k, what, keep)) in hints.into_iter().enumerate() {
        // Later hints matter less; the keys to leave never drop.
        let rank = if keep { 0 } else { (1 + i).min(250) as u8 };
        let _ = n;
        parts.push(part(format!(" {k}"), th.keycap(), rank));
        parts.push(part(format!(" {what} "), th.dimmed(), rank));
    }
    f.render_widget(Paragraph::new(fit_pairs(parts, area.width as usize)), area);
}

/// [`fit`] for hints given as (key, label) pairs of parts with the same rank: a pair is
/// dropped whole.
fn fit_pairs(parts: Vec<Part>, cols: usize) -> Line<'static> {
    let mut pairs: Vec<(Part, Part)> = Vec::new();
    let mut it = parts.into_iter();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        pairs.push((a, b));
    }
    let w = |p: &(Part, Part)| crate::text::width(&p.0.text) + crate::text::width(&p.1.text);
    while pairs.iter().map(w).sum::<usize>() > cols {
        let worst = pairs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.0.rank > 0)
            .max_by_key(|(i, p)| (p.0.rank, *i))
            .map(|(i, _)| i);
        match worst {
            Some(i) => {
                pairs.remove(i);
            }
            None => break,
        }
    }
    fit(pairs.into_iter().flat_map(|(a, b)| [a, b]).collect(), cols)
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

/// [`popup`], painted with the theme's canvas (a cleared cell would show the terminal's own
/// background through a theme that has one).
pub(crate) fn popup_canvas(f: &mut Frame, app: &App, area: Rect, w: u16, h: u16) -> Rect {
    let r = popup(f, area, w, h);
    f.render_widget(Block::default().style(app.theme.canvas()), r);
    r
}

pub(crate) use crate::text::clip;

/// One part of a line fitted by [`fit`]: its text, style, and how much it matters (0 = keep
/// always; higher goes first when the line is too wide).
pub(crate) struct Part {
    pub text: String,
    pub style: Style,
    pub rank: u8,
}

pub(crate) fn part(text: impl Into<String>, style: Style, rank: u8) -> Part {
    Part {
        text: text.into(),
        style,
        rank,
    }
}

/// The parts that fit in `cols` columns, in their order: whole parts are dropped, least
/// important first, until the rest fits; only then is the last part kept cut (with `…`).
/// So a unit, a key hint or a path is either shown whole or not at all.
pub(crate) fn fit(mut parts: Vec<Part>, cols: usize) -> Line<'static> {
    let total = |p: &[Part]| p.iter().map(|x| crate::text::width(&x.text)).sum::<usize>();
    while total(&parts) > cols {
        let worst = parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.rank > 0)
            .max_by_key(|(i, p)| (p.rank, *i))
            .map(|(i, _)| i);
        match worst {
            Some(i) => {
                parts.remove(i);
            }
            None => break,
        }
    }
    let mut used = 0;
    let mut spans = Vec::new();
    for p in parts {
        let room = cols.saturating_sub(used);
        let text = clip(&p.text, room);
        used += crate::text::width(&text);
        spans.push(Span::styled(text, p.style));
    }
    Line::from(spans)
}
