//! The run detail screen: summary, steps in graph order with a timeline, and the selected
//! step's attempts, input and output.

use super::{clip, pane_block};
use crate::tui::app::{fmt_ms, short, App};
use crate::tui::state::{DetailState, RunDetail};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;
use std::time::UNIX_EPOCH;

fn ms_of(t: std::time::SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

pub fn draw(f: &mut Frame, app: &App, d: &DetailState, area: Rect) {
    let th = &app.theme;
    let title = format!("Run {}", d.run_id);
    let note = if d.loading {
        "loading…".to_string()
    } else {
        String::new()
    };
    let block = pane_block(app, &title, None, note);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(data) = &d.data else {
        let text = d
            .problem
            .clone()
            .unwrap_or_else(|| "reading the run from the history…".into());
        f.render_widget(
            Paragraph::new(text)
                .style(th.dimmed())
                .wrap(Wrap { trim: true }),
            inner,
        );
        return;
    };
    let lines = summary_lines(app, data);
    let summary_h = lines
        .iter()
        .map(|l| {
            let t: String = l.spans.iter().map(|s| s.content.as_ref()).collect();
            crate::text::wrap(&t, inner.width as usize).len() as u16
        })
        .sum::<u16>()
        .min(8);
    let [summary, body] =
        Layout::vertical([Constraint::Length(summary_h), Constraint::Min(4)]).areas(inner);
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), summary);

    // Side by side when there is room; stacked (steps above, the step below) on 80 columns.
    let (left, right) = if body.width >= 110 {
        let [l, r] = Layout::horizontal([Constraint::Length(64), Constraint::Min(30)]).areas(body);
        (l, r)
    } else {
        let steps_h = crate::tui::state::detail_steps_rows(body.height, data.steps.len());
        let [l, r] =
            Layout::vertical([Constraint::Length(steps_h), Constraint::Min(3)]).areas(body);
        (l, r)
    };
    steps_table(f, app, d, data, left);
    step_text(f, app, d, data, right);
}

/// The run's summary: title, figures, and the whole error.
fn summary_lines(app: &App, data: &RunDetail) -> Vec<Line<'static>> {
    let th = &app.theme;
    let r = &data.run;
    let mut l1 = vec![
        Span::styled(r.blueprint_name.clone(), th.title(true)),
        Span::raw("  "),
        Span::styled(
            r.status.as_str().to_uppercase(),
            th.run_status(r.status).add_modifier(Modifier::BOLD),
        ),
        Span::styled(
            format!("  {} · {}", r.trigger, r.priority.as_str()),
            th.dimmed(),
        ),
    ];
    if r.sandbox {
        l1.push(Span::styled(
            format!(
                "  sandbox, {:.0}% failures, seed {}",
                r.simulate_failures * 100.0,
                r.seed.map(|s| s.to_string()).unwrap_or_default()
            ),
            Style::default().fg(th.warn),
        ));
    }
    let l2 = Line::from(vec![
        Span::styled("started ", th.dimmed()),
        Span::raw(crate::store::iso8601(r.started_at.unwrap_or(r.queued_at))),
        Span::styled("  took ", th.dimmed()),
        Span::raw(r.total_time_ms.map(fmt_ms).unwrap_or_else(|| "—".into())),
        Span::styled("  steps ", th.dimmed()),
        Span::raw(step_counts(data)),
        Span::styled("  tokens ", th.dimmed()),
        Span::raw(r.tokens_used.to_string()),
        Span::styled(
            r.parent_run_id
                .as_deref()
                .map(|p| format!("  retry of {}", short(p)))
                .unwrap_or_default(),
            th.dimmed(),
        ),
    ]);
    // The whole error, wrapped (its rows are counted in `summary_rows`).
    let l3 = match &r.error {
        Some(e) => Line::from(vec![
            Span::styled(
                "error ",
                Style::default().fg(th.error).add_modifier(Modifier::BOLD),
            ),
            Span::styled(e.replace('\n', " "), Style::default().fg(th.error)),
        ]),
        None => Line::default(),
    };
    vec![Line::from(l1), l2, l3]
}

fn steps_table(f: &mut Frame, app: &App, d: &DetailState, data: &RunDetail, area: Rect) {
    let th = &app.theme;
    let block = pane_block(
        app,
        "Steps (graph order) · timeline",
        None,
        format!("{}", data.steps.len()),
    );
    let inner = block.inner(area);
    f.render_widget(block, area);
    if data.steps.is_empty() {
        f.render_widget(
            Paragraph::new("no steps recorded yet").style(th.dimmed()),
            inner,
        );
        return;
    }
    // The store's timestamps sort like time (ISO-8601 UTC, fixed width), so the run's first
    // start and last end are found without parsing every step's: a frame of a 10,000-step
    // run parses two timestamps here, and those of the rows it shows.
    let t0 = data
        .steps
        .iter()
        .filter_map(|s| s.started_at.and_then(ms_of))
        .min();
    let t1 = data
        .steps
        .iter()
        .filter_map(|s| s.finished_at.and_then(ms_of))
        .max();
    // step, status 9, attempts 3, took 6, [tokens 5], timeline: the name and the timeline
    // share what is left.
    let wide = inner.width >= 56;
    let fixed = 9 + 3 + 6 + 5 + if wide { 6 } else { 0 };
    let free = (inner.width as usize).saturating_sub(fixed + 2);
    let name_w = free.saturating_sub(6).clamp(8, 22);
    let bar_w = free.saturating_sub(name_w).max(4);
    let span = match (t0, t1) {
        (Some(a), Some(b)) if b > a => Some((a, b - a)),
        _ => None,
    };
    // Only the rows the table shows are built: the window ratatui's table would scroll to
    // with the selection on screen (the header takes one row, every step row one).
    let selected = d.selected.min(data.steps.len() - 1);
    let (first, shown) = visible_rows(selected, inner.height.saturating_sub(1) as usize);
    let rows: Vec<Row> = data
        .steps
        .iter()
        .skip(first)
        .take(shown)
        .map(|s| {
            let bar = match (span, s.started_at.and_then(ms_of)) {
                (Some((a, total)), Some(st)) => {
                    let en = s.finished_at.and_then(ms_of).unwrap_or(a + total);
                    let x0 = ((st.saturating_sub(a)) as f64 / total as f64 * bar_w as f64) as usize;
                    let x1 = ((en.saturating_sub(a)) as f64 / total as f64 * bar_w as f64).ceil()
                        as usize;
                    let x0 = x0.min(bar_w.saturating_sub(1));
                    let x1 = x1.clamp(x0 + 1, bar_w);
                    format!(
                        "{}{}{}",
                        " ".repeat(x0),
                        "█".repeat(x1 - x0),
                        " ".repeat(bar_w - x1)
                    )
                }
                _ => " ".repeat(bar_w),
            };
            let mut cells = vec![
                Cell::from(clip(&s.step_key, name_w)),
                Cell::from(s.status.as_str()).style(th.step_status(s.status)),
                Cell::from(s.attempts.to_string()),
                Cell::from(s.duration_ms.map(fmt_ms).unwrap_or_else(|| "—".into())),
            ];
            if wide {
                cells.push(Cell::from(s.tokens_used.to_string()).style(th.dimmed()));
            }
            cells.push(Cell::from(bar).style(th.step_status(s.status)));
            Row::new(cells)
        })
        .collect();
    let mut widths = vec![
        Constraint::Length(name_w as u16),
        Constraint::Length(9),
        Constraint::Length(3),
        Constraint::Length(6),
    ];
    let mut header = vec!["step", "status", "att", "took"];
    if wide {
        widths.push(Constraint::Length(5));
        header.push("tok");
    }
    widths.push(Constraint::Length(bar_w as u16));
    header.push("timeline");
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(th.dimmed()))
        .row_highlight_style(th.selected())
        .highlight_symbol("▸");
    let mut state = TableState::default().with_selected(Some(selected - first));
    f.render_stateful_widget(table, inner, &mut state);
}

/// The first row and the number of rows a table `height` rows high shows with `selected` on
/// screen, scrolled as little as possible from the top (as ratatui's table scrolls from a
/// fresh state): the selection on the last line once it is past the first screen.
fn visible_rows(selected: usize, height: usize) -> (usize, usize) {
    let height = height.max(1);
    (selected.saturating_sub(height - 1), height)
}

fn step_text(f: &mut Frame, app: &App, d: &DetailState, data: &RunDetail, area: Rect) {
    let th = &app.theme;
    let Some(s) = data.steps.get(d.selected) else {
        let block = pane_block(app, "Step", None, String::new());
        f.render_widget(block, area);
        return;
    };
    let block = pane_block(app, &s.step_key, None, String::new());
    let inner = block.inner(area);
    f.render_widget(block, area);
    let label = |t: &str| Span::styled(format!("{t} "), th.dimmed());
    let mut lines = vec![
        Line::from(vec![
            label("status"),
            Span::styled(s.status.as_str(), th.step_status(s.status)),
            label("  node"),
            Span::raw(s.node_id.clone()),
            label("  attempts"),
            Span::raw(s.attempts.to_string()),
            label("  tokens"),
            Span::raw(format!(
                "{}{}",
                s.tokens_used,
                if s.cached { " (cached)" } else { "" }
            )),
        ]),
        model_line(s, th, label),
    ];
    // With a fleet: which process runs the step now (the queue's claimed row).
    let running_on = app.fleet.as_ref().and_then(|fl| {
        fl.running
            .iter()
            .find(|a| a.run_id == s.run_id && a.step_key == s.step_key)
    });
    if let Some(a) = running_on {
        let here = a.worker == crate::store::process_id();
        lines.push(Line::from(vec![
            label("running on"),
            Span::styled(
                format!(
                    "{} (pid {}{}) · attempt {}",
                    crate::tui::app::host_of(&a.worker),
                    crate::tui::app::pid_of(&a.worker),
                    if here { ", this console" } else { "" },
                    a.attempt
                ),
                Style::default().fg(th.running),
            ),
        ]));
    }
    lines.extend([Line::from(vec![
        label("queued"),
        Span::raw(
            s.queued_at
                .map(|t| crate::store::utc_clock(t, true))
                .unwrap_or_else(|| "—".into()),
        ),
        label("  started"),
        Span::raw(
            s.started_at
                .map(|t| crate::store::utc_clock(t, true))
                .unwrap_or_else(|| "—".into()),
        ),
        label("  finished"),
        Span::raw(
            s.finished_at
                .map(|t| crate::store::utc_clock(t, true))
                .unwrap_or_else(|| "—".into()),
        ),
        label("  took"),
        Span::raw(s.duration_ms.map(fmt_ms).unwrap_or_else(|| "—".into())),
    ])]);
    if let Some(e) = &s.error {
        lines.push(Line::from(vec![
            Span::styled(
                "error ",
                Style::default().fg(th.error).add_modifier(Modifier::BOLD),
            ),
            Span::styled(
                format!(
                    "{}{e}",
                    s.error_kind
                        .map(|k| format!("{}: ", k.as_str()))
                        .unwrap_or_default()
                ),
                Style::default().fg(th.error),
            ),
        ]));
    }
    lines.push(Line::from(Span::styled(
        "attempts",
        th.title(false).add_modifier(Modifier::BOLD),
    )));
    let mut any = false;
    for a in data.attempts_of(&s.step_key) {
        any = true;
        let what = if a.ok {
            Span::styled("ok", Style::default().fg(th.ok))
        } else {
            Span::styled(
                format!(
                    "{}: {}",
                    a.error_kind.map_or("error", |k| k.as_str()),
                    a.error.as_deref().unwrap_or("")
                ),
                Style::default().fg(th.error),
            )
        };
        let mut spans = vec![
            Span::styled(format!("  #{} ", a.attempt), th.dimmed()),
            Span::raw(format!("{:>6} ", fmt_ms(a.duration_ms))),
            what,
        ];
        if let Some(w) = a.wait_ms {
            spans.push(Span::styled(
                format!(" → waited {} before the next", fmt_ms(w)),
                Style::default().fg(th.warn),
            ));
        }
        lines.push(Line::from(spans));
    }
    if !any {
        lines.push(Line::from(Span::styled("  none recorded", th.dimmed())));
    }
    let pretty = |v: &Option<serde_json::Value>| -> Vec<String> {
        match v {
            None => vec!["—".into()],
            Some(serde_json::Value::String(s)) => s.lines().map(str::to_string).collect(),
            Some(v) => serde_json::to_string_pretty(v)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect(),
        }
    };
    lines.push(Line::from(Span::styled(
        "input",
        th.title(false).add_modifier(Modifier::BOLD),
    )));
    for l in pretty(&s.input) {
        lines.push(Line::from(Span::raw(l)));
    }
    lines.push(Line::from(Span::styled(
        "output",
        th.title(false).add_modifier(Modifier::BOLD),
    )));
    for l in pretty(&s.output) {
        lines.push(Line::from(Span::raw(l)));
    }
    // Report the pane's size and the text's wrapped length, so PgUp/PgDn move by a page and
    // stop at the end.
    let total: usize = lines
        .iter()
        .map(|l| {
            let t: String = l.spans.iter().map(|s| s.content.as_ref()).collect();
            crate::text::wrap(&t, inner.width as usize).len()
        })
        .sum();
    d.text_rows.set(inner.height.max(1));
    d.text_total.set(total.min(u16::MAX as usize) as u16);
    let last_top = (total as u16).saturating_sub(inner.height);
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .scroll((d.scroll.min(last_top), 0)),
        inner,
    );
}

/// `3 (1 ok, 1 error, 1 cancelled)`.
fn step_counts(d: &RunDetail) -> String {
    use crate::events::StepStatus;
    const SHOWN: [(StepStatus, &str); 7] = [
        (StepStatus::Success, "ok"),
        (StepStatus::Error, "error"),
        (StepStatus::Running, "running"),
        (StepStatus::Retrying, "retrying"),
        (StepStatus::Pending, "pending"),
        (StepStatus::Skipped, "skipped"),
        (StepStatus::Cancelled, "cancelled"),
    ];
    // One pass over the steps, whatever their number.
    let mut counts = [0usize; SHOWN.len()];
    for s in &d.steps {
        if let Some(i) = SHOWN.iter().position(|(st, _)| *st == s.status) {
            counts[i] += 1;
        }
    }
    let mut parts = Vec::new();
    for ((_, label), n) in SHOWN.iter().zip(counts) {
        if n > 0 {
            parts.push(format!("{n} {label}"));
        }
    }
    format!("{} ({})", d.steps.len(), parts.join(", "))
}

/// Provider and model; the model that answered when the server named another one, and a cut-off
/// answer, both in the warning colour.
fn model_line<'a>(
    s: &crate::store::StepRow,
    th: &crate::tui::theme::Theme,
    label: impl Fn(&str) -> Span<'a>,
) -> Line<'a> {
    let mut spans = vec![
        label("provider"),
        Span::raw(s.provider.clone().unwrap_or_else(|| "—".into())),
        label("  model"),
        Span::raw(s.model.clone().unwrap_or_else(|| "—".into())),
    ];
    if let Some(m) = s.other_reply_model() {
        spans.push(label("  answered by"));
        spans.push(Span::styled(m.to_string(), th.level("WARN")));
    }
    if s.truncated() {
        spans.push(Span::styled(
            "  truncated (finish_reason: length)",
            th.level("WARN"),
        ));
    }
    Line::from(spans)
}
