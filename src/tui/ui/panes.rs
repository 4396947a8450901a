//! The main screen's panes.

use super::{clip, pane_block};
use crate::blueprint::Priority;
use crate::tui::app::{fmt_ms, short, App, Focus};
use crate::tui::state::{LevelFilter, LogState, PAGE};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Cell, LineGauge, List, ListItem, ListState, Paragraph, Row, Sparkline, Table, TableState, Wrap,
};
use ratatui::Frame;

fn prio_short(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "crit",
        Priority::High => "high",
        Priority::Normal => "norm",
        Priority::Low => "low",
    }
}

fn empty(f: &mut Frame, app: &App, area: Rect, text: String, warn: bool) {
    let th = &app.theme;
    let style = if warn {
        Style::default().fg(th.warn)
    } else {
        th.dimmed()
    };
    f.render_widget(
        Paragraph::new(text).style(style).wrap(Wrap { trim: true }),
        area,
    );
}

pub fn blueprints(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let list = app.visible_blueprints();
    let invalid = app.blueprints.iter().filter(|b| !b.is_valid()).count();
    let mut note = format!("{}", app.blueprints.len());
    if invalid > 0 {
        note = format!("{note}, {invalid} invalid");
    }
    if !app.bp_filter.is_empty() {
        note = format!("/{} · {note}", app.bp_filter);
    }
    let block = pane_block(app, "Blueprints", Some(Focus::Blueprints), note);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if !app.blueprints_loaded {
        return empty(f, app, inner, "loading…".into(), false);
    }
    if let Some(p) = &app.blueprints_problem {
        return empty(f, app, inner, p.clone(), true);
    }
    if app.blueprints.is_empty() {
        return empty(
            f,
            app,
            inner,
            format!(
                "no blueprints in {}/ — see README (\"Blueprints\"), add a .json or .toml file, then R to reload",
                app.dir.display()
            ),
            false,
        );
    }
    if list.is_empty() {
        return empty(
            f,
            app,
            inner,
            "no blueprint matches the filter (Esc clears it)".into(),
            false,
        );
    }
    // Problems of the selected invalid blueprint go under the list.
    let sel = app.selected_blueprint();
    let problems: Vec<String> = sel.map(|b| b.problems.clone()).unwrap_or_default();
    let (list_area, problem_area) = if !problems.is_empty() && inner.height >= 6 {
        let w = inner.width.max(1) as usize;
        let need: usize = 1 + problems
            .iter()
            .map(|p| p.chars().count().div_ceil(w))
            .sum::<usize>();
        let h = (need as u16).min(inner.height / 2);
        let [a, b] = Layout::vertical([Constraint::Min(2), Constraint::Length(h)]).areas(inner);
        (a, Some(b))
    } else {
        (inner, None)
    };
    let w = list_area.width as usize;
    let wide = w >= 40;
    let name_w = if wide {
        18
    } else {
        w.saturating_sub(12).max(6)
    };
    let items: Vec<ListItem> = list
        .iter()
        .map(|(_, b)| match &b.blueprint {
            Some(bp) => {
                let mut spans = vec![
                    Span::styled("✓ ", Style::default().fg(th.ok)),
                    Span::styled(format!("{:<name_w$} ", clip(&b.name, name_w)), th.base()),
                    Span::styled(format!("{:<4} ", prio_short(bp.priority)), th.dimmed()),
                    if bp.active {
                        Span::styled("on ", Style::default().fg(th.ok))
                    } else {
                        Span::styled("off", th.dimmed())
                    },
                ];
                if wide {
                    let room = w.saturating_sub(name_w + 12);
                    spans.push(schedule_span(app, bp, room));
                }
                ListItem::new(Line::from(spans))
            }
            None => ListItem::new(Line::from(vec![
                Span::styled("✗ ", Style::default().fg(th.error)),
                Span::styled(
                    format!("{:<name_w$} ", clip(&b.name, name_w)),
                    Style::default().fg(th.error),
                ),
                Span::styled("invalid", Style::default().fg(th.error)),
            ])),
        })
        .collect();
    let mut state = ListState::default().with_selected(Some(app.bp_selected.min(list.len() - 1)));
    f.render_stateful_widget(
        List::new(items)
            .highlight_style(th.selected())
            .highlight_symbol("▸"),
        list_area,
        &mut state,
    );
    if let Some(pa) = problem_area {
        let mut lines = vec![Line::from(Span::styled(
            "problems (e to edit):",
            Style::default().fg(th.error).add_modifier(Modifier::BOLD),
        ))];
        for p in &problems {
            lines.push(Line::from(Span::styled(
                p.clone(),
                Style::default().fg(th.error),
            )));
        }
        f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), pa);
    }
}

/// A blueprint's schedule in the Blueprints pane: when it fires next, then the
/// cron text as room allows; `—` without one.
fn schedule_span(app: &App, bp: &crate::blueprint::Blueprint, room: usize) -> Span<'static> {
    let th = &app.theme;
    let Some(cron) = bp.schedule.as_deref() else {
        return Span::styled(" —", th.dimmed());
    };
    if !bp.active {
        return Span::styled(format!(" {}", clip(cron, room)), th.dimmed());
    }
    if app.schedules_owner() == crate::tui::app::ScheduleOwner::Off {
        // Nobody fires it (the header says `schedules: off`): no countdown promising a run.
        return Span::styled(format!(" {}", clip(cron, room)), th.dimmed());
    }
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_millis(app.now_ms);
    match crate::schedule::next_fire_time(bp, now) {
        Ok(Some(next)) => {
            let left = next.duration_since(now).unwrap_or_default();
            let soon = format!(" in {}", crate::store::short_span(left));
            let full = format!("{soon} · {cron}");
            // The cron text only when it fits whole: a cut cron says nothing.
            let text = if full.chars().count() <= room + 1 {
                full
            } else {
                clip(&soon, room + 1)
            };
            Span::styled(text, Style::default().fg(th.running))
        }
        Ok(None) => Span::styled(format!(" {}", clip(cron, room)), th.dimmed()),
        Err(_) => Span::styled(
            format!(" {}", clip("schedule never fires", room)),
            Style::default().fg(th.error),
        ),
    }
}

/// A `⚠ text` banner wrapped at the top of `area`, leaving at least `keep` rows below it;
/// returns the rest of the area.
fn warning_banner(f: &mut Frame, app: &App, area: Rect, text: &str, keep: u16) -> Rect {
    let text = format!("⚠ {text}");
    // Counted as the paragraph wraps it (between words), so the end — often a path — shows.
    let need = crate::text::wrap(&text, area.width.max(1) as usize).len() as u16;
    let [top, rest] = Layout::vertical([
        Constraint::Length(need.min(area.height.saturating_sub(keep))),
        Constraint::Min(keep.saturating_sub(1)),
    ])
    .areas(area);
    f.render_widget(
        Paragraph::new(text)
            .style(Style::default().fg(app.theme.warn))
            .wrap(Wrap { trim: true }),
        top,
    );
    rest
}

pub fn pool(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let (done, failed) = app.spark.recent(60);
    let rate = if done + failed > 0 {
        failed as f64 * 100.0 / (done + failed) as f64
    } else {
        0.0
    };
    let block = pane_block(app, "Queue · Memory", None, String::new());
    let inner = block.inner(area);
    f.render_widget(block, area);
    let p = &app.pool;
    let tall = inner.height >= 9;
    let spark_h = if tall { 2 } else { 1 };
    let [queue, l1, s1, l2, s2, summary, mem, hold] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(spark_h),
        Constraint::Length(1),
        Constraint::Length(spark_h),
        Constraint::Length(0),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(inner);
    let _ = summary;
    // With a fleet, the shared queue (one source per figure: `Queue::depth`); this pool's
    // own queue is in the header when it has any.
    let (label, queued) = match &app.fleet {
        Some(fl) => ("fleet queue", fl.depth.unwrap_or_default()),
        None => ("queued", p.queued.map(|n| n as u64)),
    };
    let total = match &app.fleet {
        Some(fl) => fl
            .depth_total()
            .map_or_else(|| "?".to_string(), |n| n.to_string()),
        None => p.queued_total().to_string(),
    };
    // By priority: the words when they fit (`crit 0 high 1 …`), else their initials.
    let words = inner.width >= 38 + if app.fleet.is_some() { 6 } else { 0 };
    let label = if words {
        label
    } else {
        label.trim_end_matches(" queue")
    };
    let mut q = vec![Span::styled(format!("{label} {total} "), th.dimmed())];
    for pr in [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ] {
        let n = queued[pr.index()];
        let tag = if words {
            format!("{} ", prio_short(pr))
        } else {
            prio_short(pr)[..1].to_string()
        };
        q.push(Span::styled(
            format!("{tag}{n} "),
            if n > 0 {
                Style::default().fg(th.queued).add_modifier(Modifier::BOLD)
            } else {
                th.dimmed()
            },
        ));
    }
    f.render_widget(Paragraph::new(Line::from(q)), queue);
    f.render_widget(
        Paragraph::new(Line::from(vec![
            // The sparklines count this process's steps (its event bus), named so with a fleet.
            Span::styled(
                if app.fleet.is_some() {
                    "done here       "
                } else {
                    "steps done      "
                },
                th.dimmed(),
            ),
            Span::styled(format!("{done}/min"), Style::default().fg(th.spark_ok)),
        ])),
        l1,
    );
    let w = s1.width as usize;
    let tail = |v: &std::collections::VecDeque<u64>| -> Vec<u64> {
        let n = v.len();
        v.iter().skip(n.saturating_sub(w)).copied().collect()
    };
    f.render_widget(
        Sparkline::default()
            .data(tail(&app.spark.done))
            .style(Style::default().fg(th.spark_ok)),
        s1,
    );
    // The figure keeps its units; the label gets shorter first.
    let figure = format!("{failed}/min ({rate:.0}%)");
    let cols = inner.width as usize;
    let label = if 16 + figure.len() <= cols {
        if app.fleet.is_some() {
            "failed here     "
        } else {
            "attempts failed "
        }
    } else {
        "failed "
    };
    f.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(label, th.dimmed()),
            Span::styled(
                figure,
                Style::default().fg(if failed > 0 { th.spark_err } else { th.text }),
            ),
        ])),
        l2,
    );
    f.render_widget(
        Sparkline::default()
            .data(tail(&app.spark.failed))
            .style(Style::default().fg(th.spark_err)),
        s2,
    );
    let limit = app.memory.threshold_mb.max(1);
    let (ratio, label) = match app.memory.rss {
        Some(rss) => {
            let mb = rss as f64 / (1024.0 * 1024.0);
            (
                (mb / limit as f64).clamp(0.0, 1.0),
                format!("RSS {mb:.0}/{limit} MB"),
            )
        }
        None => (0.0, "RSS not measured yet".to_string()),
    };
    let colour = if p.memory_hold {
        th.gauge_hold
    } else {
        th.gauge
    };
    f.render_widget(
        LineGauge::default()
            .ratio(ratio)
            .label(Span::styled(label, th.base()))
            .filled_style(Style::default().fg(colour))
            .unfilled_style(th.dimmed()),
        mem,
    );
    if p.memory_hold {
        f.render_widget(
            Paragraph::new(Span::styled(
                "holding back: memory above MEMORY_THRESHOLD_MB",
                Style::default().fg(th.error).add_modifier(Modifier::BOLD),
            )),
            hold,
        );
    } else if p.paused {
        f.render_widget(
            Paragraph::new(Span::styled(
                "paused: queued steps wait (p resumes)",
                Style::default().fg(th.warn),
            )),
            hold,
        );
    }
}

pub fn workers(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let busy = app.busy_workers();
    let for_slot = app.retrying.iter().filter(|r| r.slots.is_some()).count();
    let waiting = app.retrying.iter().filter(|r| r.waiting).count() - for_slot;
    let retrying = app.retrying.len() - waiting - for_slot;
    let fleet = app.fleet.is_some();
    let mut note = if fleet {
        super::fleet::note(app)
    } else {
        format!("{}/{} busy", busy.len(), app.workers.len())
    };
    if retrying > 0 {
        note.push_str(&format!(" · {retrying} retrying"));
    }
    if waiting > 0 {
        note.push_str(&format!(" · {waiting} rate-limited"));
    }
    if for_slot > 0 {
        note.push_str(&format!(" · {for_slot} wait for a slot"));
    }
    let block = pane_block(app, "Workers", Some(Focus::Workers), note);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if busy.is_empty() && app.retrying.is_empty() && !fleet {
        let text = if app.pool.queued_total() > 0 && app.pool.paused {
            "pool paused: work is queued — p resumes".to_string()
        } else {
            format!(
                "all {} workers idle — Enter on a blueprint runs it, t sandbox-tests it",
                app.workers.len()
            )
        };
        return empty(f, app, inner, text, false);
    }
    let w = inner.width as usize;
    // With a fleet, this process's workers come under their host's line.
    let mut items: Vec<ListItem> = Vec::new();
    if fleet {
        items.push(super::fleet::my_host_line(app, w));
    }
    let first = items.len();
    items.extend(busy.iter().map(|(i, s)| {
        let elapsed = app.now_ms.saturating_sub(s.since_ms);
        let bp = app
            .runs
            .get(&s.run_id)
            .map(|r| r.blueprint.as_str())
            .unwrap_or("");
        let wide = w >= 70;
        let step_w = w.saturating_sub(if wide { 44 } else { 30 }).clamp(8, 30);
        let mut spans = vec![
            Span::styled(format!("w{i:<3}"), th.dimmed()),
            Span::styled("▶ ", Style::default().fg(th.running)),
            Span::styled(format!("{:<step_w$} ", clip(&s.step, step_w)), th.base()),
            Span::styled(
                format!("#{:<2} ", s.attempt),
                if s.attempt > 1 {
                    Style::default().fg(th.warn)
                } else {
                    th.dimmed()
                },
            ),
            Span::styled(format!("{:>6} ", fmt_ms(elapsed)), th.base()),
            Span::styled(short(&s.run_id).to_string(), th.dimmed()),
        ];
        if wide {
            spans.push(Span::styled(format!(" {:<13}", clip(bp, 13)), th.dimmed()));
            // Last in priority: only where the row has room for it whole.
            if s.tokens > 0 && w >= step_w + 51 {
                spans.push(Span::styled(format!(" {:>8}", tokens(s.tokens)), th.base()));
            }
        }
        ListItem::new(Line::from(spans))
    }));
    let selectable = items.len() - first;
    // The other processes' attempts, under their hosts, selectable after this process's;
    // the waits below hold no worker, so they come after every host's workers.
    let remote = if fleet {
        super::fleet::remote_lines(app, w, &mut items)
    } else {
        Vec::new()
    };
    let mut retrying: Vec<_> = app.retrying.iter().collect();
    retrying.sort_by_key(|r| r.until_ms);
    // Steps waiting for a free place among a provider's calls in flight: one line per
    // provider (they have no countdown).
    let mut by_slots: Vec<(&str, usize, usize)> = Vec::new();
    for r in retrying.iter() {
        if let Some(limit) = r.slots {
            match by_slots.iter_mut().find(|(p, _, _)| *p == r.kind) {
                Some((_, _, n)) => *n += 1,
                None => by_slots.push((r.kind.as_str(), limit, 1)),
            }
        }
    }
    for (provider, limit, n) in &by_slots {
        let text = format!(
            "⧗ {n} step{} wait{} for a free {provider} slot ({limit} in flight at most; no worker held)",
            if *n == 1 { "" } else { "s" },
            if *n == 1 { "s" } else { "" },
        );
        items.push(ListItem::new(Line::from(Span::styled(
            clip(&text, w.saturating_sub(1)),
            Style::default().fg(th.warn),
        ))));
    }
    let retrying: Vec<_> = retrying.into_iter().filter(|r| r.slots.is_none()).collect();
    // A big fan-out behind a rate limit is one line per provider, not one per step.
    let mut by_provider: Vec<(&str, Vec<u64>)> = Vec::new();
    for r in retrying.iter().filter(|r| r.waiting) {
        match by_provider.iter_mut().find(|(p, _)| *p == r.kind) {
            Some((_, v)) => v.push(r.until_ms),
            None => by_provider.push((r.kind.as_str(), vec![r.until_ms])),
        }
    }
    for (provider, untils) in by_provider.iter().filter(|(_, v)| v.len() > 3) {
        let next = untils.iter().min().copied().unwrap_or(0);
        let last = untils.iter().max().copied().unwrap_or(0);
        let text = format!(
            "⧗ {} steps wait for {provider}'s rate limit · next in {}, last in {} (no worker held)",
            untils.len(),
            fmt_ms(next.saturating_sub(app.now_ms)),
            fmt_ms(last.saturating_sub(app.now_ms))
        );
        items.push(ListItem::new(Line::from(Span::styled(
            clip(&text, w.saturating_sub(1)),
            Style::default().fg(th.warn),
        ))));
    }
    let grouped = |r: &&crate::tui::state::Retrying| {
        r.waiting && by_provider.iter().any(|(p, v)| *p == r.kind && v.len() > 3)
    };
    for r in retrying.iter().filter(|r| !grouped(r)) {
        let left = r.until_ms.saturating_sub(app.now_ms);
        let head = if r.waiting {
            format!("⧗ {} {} limit, {} ", r.step, r.kind, fmt_ms(left))
        } else {
            format!(
                "↻ {} retry in {} (#{} {}) ",
                r.step,
                fmt_ms(left),
                r.attempt,
                r.kind
            )
        };
        let rest = w.saturating_sub(head.chars().count());
        items.push(ListItem::new(Line::from(vec![
            Span::styled(head, Style::default().fg(th.warn)),
            Span::styled(clip(&r.message, rest), th.dimmed()),
        ])));
    }
    // Idle workers in one line, when the pane has room for it.
    let idle: Vec<String> = app
        .workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.is_none())
        .map(|(i, _)| format!("w{i}"))
        .collect();
    // (With a fleet, each host's line counts its busy workers instead.)
    if !fleet && !idle.is_empty() && items.len() + 1 < inner.height as usize {
        items.push(ListItem::new(Line::from(Span::styled(
            clip(&format!("idle: {}", idle.join(" ")), w.saturating_sub(1)),
            th.dimmed(),
        ))));
    }
    let mut state = ListState::default();
    let sel = app.worker_selected;
    if app.focus == Focus::Workers {
        if sel < selectable {
            state.select(Some(first + sel));
        } else if let Some(i) = remote.get(sel - selectable).or(remote.last()) {
            state.select(Some(*i));
        } else if selectable > 0 {
            state.select(Some(first + selectable - 1));
        }
    }
    f.render_stateful_widget(
        List::new(items)
            .highlight_style(th.selected())
            .highlight_symbol("▸"),
        inner,
        &mut state,
    );
}

/// `2026-11-27T09:44:38.123Z` → `11-27 09:44:38` (or just the time when narrow).
fn when(t: std::time::SystemTime, narrow: bool) -> String {
    if narrow {
        crate::store::utc_clock(t, false)
    } else {
        crate::store::utc_month_day_time(t)
    }
}

pub fn history(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let h = &app.history;
    let first = h.page * PAGE;
    let mut note = if h.rows.is_empty() {
        String::new()
    } else {
        let total = h
            .total
            .map(|t| format!(" of {}", group(t)))
            .unwrap_or_default();
        format!(
            "{}–{}{total}",
            group((first + 1) as u64),
            group((first + h.rows.len()) as u64)
        )
    };
    let mut filters = Vec::new();
    if let Some(s) = h.status {
        filters.push(s.as_str().to_string());
    }
    if let Some(b) = &h.blueprint {
        filters.push(b.clone());
    }
    if let Some(part) = &h.name_contains {
        filters.push(format!("/{part}"));
    }
    // Parts joined by ` · `, none left dangling when a part is empty.
    if !filters.is_empty() {
        note = [filters.join(", "), note]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(" · ");
    }
    if h.loading && !h.loaded {
        note = format!("loading… {note}").trim_end().to_string();
    }
    let block = pane_block(app, "History", Some(Focus::History), note);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if let Some(p) = &h.problem {
        return empty(f, app, inner, format!("history unavailable: {p}"), true);
    }
    let inner = match &h.banner {
        Some(b) => warning_banner(f, app, inner, b, 2),
        None => inner,
    };
    if h.rows.is_empty() {
        let text = if !h.loaded {
            "reading the history…".to_string()
        } else if filters.is_empty() {
            format!(
                "no runs yet in {} — press Enter on a blueprint or t to sandbox-test it \
                 (DB_FILE sets where the history is)",
                app.db_path
            )
        } else {
            format!(
                "no runs in {} match the filter — s changes the status, b the blueprint, Esc clears",
                app.db_path
            )
        };
        return empty(f, app, inner, text, false);
    }
    let narrow = inner.width < 90;
    let rows: Vec<Row> = h
        .rows
        .iter()
        .map(|r| {
            let took = r.total_time_ms.map(fmt_ms).unwrap_or_else(|| "—".into());
            let steps = r.steps_done.map(|d| d.to_string()).unwrap_or_default();
            let mut cells = vec![
                Cell::from(short(&r.id).to_string()).style(th.dimmed()),
                Cell::from(r.blueprint_name.clone()),
                Cell::from(r.status.as_str()).style(th.run_status(r.status)),
                Cell::from(when(r.started_at.unwrap_or(r.queued_at), narrow)),
                Cell::from(took),
                Cell::from(steps),
            ];
            if !narrow {
                let mut trig = r.trigger.clone();
                if r.sandbox {
                    trig.push_str(" sbx");
                }
                cells.push(Cell::from(trig).style(th.dimmed()));
                cells.push(
                    Cell::from(
                        r.error
                            .as_deref()
                            .map(crate::tui::app::first_line)
                            .unwrap_or("")
                            .to_string(),
                    )
                    .style(Style::default().fg(th.error)),
                );
            }
            Row::new(cells)
        })
        .collect();
    let widths: Vec<Constraint> = if narrow {
        vec![
            Constraint::Length(10),
            Constraint::Min(10),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(6),
        ]
    } else {
        vec![
            Constraint::Length(10),
            Constraint::Length(16),
            Constraint::Length(9),
            Constraint::Length(14),
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(14),
            Constraint::Min(10),
        ]
    };
    let header: Vec<&str> = if narrow {
        vec!["run", "blueprint", "status", "started", "took"]
    } else {
        vec![
            "run",
            "blueprint",
            "status",
            "started",
            "took",
            "steps",
            "trigger",
            "error",
        ]
    };
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(th.dimmed().add_modifier(Modifier::BOLD)))
        .row_highlight_style(th.selected())
        .highlight_symbol("▸");
    let mut state = TableState::default().with_selected(Some(h.selected.min(h.rows.len() - 1)));
    f.render_stateful_widget(table, inner, &mut state);
}

pub fn logs(f: &mut Frame, app: &App, area: Rect) {
    let th = &app.theme;
    let l = &app.logs;
    let visible = l.visible();
    let note = logs_note(l, area.width);
    let block = pane_block(app, "Logs", Some(Focus::Logs), note);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let mut lines: Vec<Line> = Vec::new();
    let inner = match &l.problem {
        Some(p) => warning_banner(f, app, inner, p, 1),
        None => inner,
    };
    let room = (inner.height as usize).saturating_sub(lines.len());
    if visible.is_empty() {
        if l.problem.is_some() {
            return;
        }
        let text = if l.lines.is_empty() {
            "no log lines yet — they appear here as runs work".to_string()
        } else {
            "no line matches (Esc clears the search and filters)".to_string()
        };
        return empty(f, app, inner, text, false);
    }
    // Scrolled back at most until the oldest line is at the top of a full pane.
    l.rows.set(room);
    let scroll = if l.follow {
        0
    } else {
        l.scroll.min(visible.len().saturating_sub(room))
    };
    let end = visible.len().saturating_sub(scroll);
    let start = end.saturating_sub(room);
    let w = inner.width as usize;
    for e in &visible[start..end] {
        let head = format!("{} {:<5} ", e.time, e.level);
        // What matters first — the message, the step, the reason — and the run id last, where
        // a narrow pane cuts it.
        let step = e
            .step
            .as_deref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        let rest = if e.rest.is_empty() {
            String::new()
        } else {
            format!(" {}", e.rest)
        };
        let run = e
            .run_id
            .as_deref()
            .map(|r| format!(" run={}", short(r)))
            .unwrap_or_default();
        let body = format!("{}{step}{rest}{run}", e.message);
        let rest = w.saturating_sub(head.chars().count());
        lines.push(Line::from(vec![
            Span::styled(head, th.level(&e.level)),
            Span::styled(clip(&body, rest), th.base()),
        ]));
    }
    f.render_widget(Paragraph::new(lines), inner);
}

/// The Logs pane's title note: following or paused, the level, the search, and the run or step
/// filter. Where it does not fit beside the title, the parts that only say "the default"
/// (following, level all) go first, then the rest is cut.
fn logs_note(l: &LogState, width: u16) -> String {
    // Borders, " Logs ", a dash of space, and the note's own padding.
    let room = (width as usize).saturating_sub(11);
    let mut parts: Vec<(String, bool)> = vec![
        if l.follow {
            ("following".to_string(), true)
        } else {
            ("PAUSED".to_string(), false)
        },
        (
            format!("level {}", l.level.label()),
            l.level == LevelFilter::All,
        ),
    ];
    if !l.search.is_empty() {
        parts.push((format!("/{}", l.search), false));
    }
    match (&l.run_filter, &l.step_filter) {
        (Some(r), Some(step)) => parts.push((format!("{step} of run {}", short(r)), false)),
        (Some(r), None) => parts.push((format!("run {}", short(r)), false)),
        _ => {}
    }
    let join = |parts: &[(String, bool)]| {
        parts
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(" · ")
    };
    while join(&parts).chars().count() > room {
        match parts.iter().position(|(_, default)| *default) {
            Some(i) => {
                parts.remove(i);
            }
            None => break,
        }
    }
    clip(&join(&parts), room)
}

/// `100000` → `100,000`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A streamed token count in at most 8 characters: `312 tok`, `48k tok`, `1.2M tok`
/// (rounded down, so it never says more than came).
fn tokens(n: u64) -> String {
    match n {
        0..10_000 => format!("{n} tok"),
        10_000..1_000_000 => format!("{}k tok", n / 1000),
        1_000_000..10_000_000 => format!("{}.{}M tok", n / 1_000_000, n / 100_000 % 10),
        10_000_000..1_000_000_000 => format!("{}M tok", n / 1_000_000),
        _ => "1G+ tok".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_token_count_fits_eight_characters_and_never_rounds_up() {
        for (n, shown) in [
            (1, "1 tok"),
            (9_999, "9999 tok"),
            (10_000, "10k tok"),
            (999_999, "999k tok"),
            (1_000_000, "1.0M tok"),
            (9_999_999, "9.9M tok"),
            (10_000_000, "10M tok"),
            (999_999_999, "999M tok"),
            (u64::MAX, "1G+ tok"),
        ] {
            assert_eq!(super::tokens(n), shown);
            assert!(shown.chars().count() <= 8);
        }
    }
}
