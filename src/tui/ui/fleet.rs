//! The Workers pane's fleet part (`DATABASE_URL=postgres://…`): workers grouped by host,
//! each host's line naming its live processes with their busy workers, and the attempts the
//! other processes run (the shared queue's claimed rows) under their host.

use super::clip;
use crate::store::ProcessRow;
use crate::tui::app::{fmt_ms, host_of, pid_of, short, App};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::ListItem;
use std::time::UNIX_EPOCH;

/// A host and its live processes: this host first, then the others by name.
fn hosts<'a>(app: &'a App) -> Vec<(String, Vec<&'a ProcessRow>)> {
    let me = crate::store::process_id();
    let my_host = host_of(me).to_string();
    let mut out: Vec<(String, Vec<&'a ProcessRow>)> = vec![(my_host.clone(), Vec::new())];
    let mut add = |host: &str, p: Option<&'a ProcessRow>| {
        let i = match out.iter().position(|(h, _)| h == host) {
            Some(i) => i,
            None => {
                out.push((host.to_string(), Vec::new()));
                out.len() - 1
            }
        };
        if let Some(p) = p {
            if !out[i].1.iter().any(|q| q.id == p.id) {
                out[i].1.push(p);
            }
        }
    };
    for p in app.processes.iter().filter(|p| p.alive) {
        add(host_of(&p.id), Some(p));
    }
    // A process whose heartbeat has not been read yet still shows with its attempts.
    for a in app.remote_attempts() {
        add(host_of(&a.worker), None);
    }
    out[1..].sort_by(|a, b| a.0.cmp(&b.0));
    for (_, ps) in &mut out {
        // This process first, then by pid.
        ps.sort_by_key(|p| (p.id != me, p.pid));
    }
    out
}

/// Busy workers of a process: this one's own pool, another's claimed rows.
fn busy_of(app: &App, id: &str) -> usize {
    if id == crate::store::process_id() {
        app.busy_workers().len()
    } else {
        app.fleet
            .as_ref()
            .map_or(0, |f| f.running.iter().filter(|a| a.worker == id).count())
    }
}

fn size_of(app: &App, p: &ProcessRow) -> String {
    if p.id == crate::store::process_id() {
        return app.workers.len().to_string();
    }
    p.concurrency
        .map(|c| c.to_string())
        .unwrap_or_else(|| "?".into())
}

/// `host · console 4242 (here) 1/4 · daemon 4300 2/8`.
fn host_line(app: &App, host: &str, procs: &[&ProcessRow], w: usize) -> ListItem<'static> {
    let th = &app.theme;
    let me = crate::store::process_id();
    let mut text = format!("{host} ");
    for p in procs {
        text.push_str(&format!(
            "· {} {}{} {}/{} ",
            p.role,
            p.pid,
            if p.id == me { " (here)" } else { "" },
            busy_of(app, &p.id),
            size_of(app, p)
        ));
    }
    if procs.is_empty() {
        text.push_str("· (heartbeat not read yet)");
    }
    ListItem::new(Line::from(Span::styled(
        clip(text.trim_end(), w.saturating_sub(1)),
        Style::default().fg(th.title).add_modifier(Modifier::BOLD),
    )))
}

/// The line heading this host's group, above this process's workers.
pub(super) fn my_host_line(app: &App, w: usize) -> ListItem<'static> {
    let hs = hosts(app);
    let (host, procs) = &hs[0];
    host_line(app, host, procs, w)
}

/// Appends the other processes' attempts under their hosts (this host's first, without a
/// new heading) and returns the item index of each, in [`App::remote_attempts`] order.
pub(super) fn remote_lines(app: &App, w: usize, items: &mut Vec<ListItem<'static>>) -> Vec<usize> {
    let th = &app.theme;
    let remote = app.remote_attempts();
    let mut at = Vec::with_capacity(remote.len());
    let my_host = host_of(crate::store::process_id());
    let now = UNIX_EPOCH + std::time::Duration::from_millis(app.now_ms);
    for (host, procs) in hosts(app) {
        if host != my_host {
            items.push(host_line(app, &host, &procs, w));
        }
        for a in remote.iter().filter(|a| host_of(&a.worker) == host) {
            let elapsed = a
                .claimed_at
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0, |d| d.as_millis() as u64);
            let bp = app
                .history
                .rows
                .iter()
                .find(|r| r.id == a.run_id)
                .map(|r| r.blueprint_name.as_str())
                .unwrap_or("");
            let wide = w >= 70;
            let step_w = w.saturating_sub(if wide { 46 } else { 32 }).clamp(8, 30);
            let mut spans = vec![
                Span::styled(format!("p{:<7}", pid_of(&a.worker)), th.dimmed()),
                Span::styled("▶ ", Style::default().fg(th.running)),
                Span::styled(
                    format!("{:<step_w$} ", clip(&a.step_key, step_w)),
                    th.base(),
                ),
                Span::styled(
                    format!("#{:<2} ", a.attempt),
                    if a.attempt > 1 {
                        Style::default().fg(th.warn)
                    } else {
                        th.dimmed()
                    },
                ),
                Span::styled(format!("{:>6} ", fmt_ms(elapsed)), th.base()),
                Span::styled(short(&a.run_id).to_string(), th.dimmed()),
            ];
            if wide {
                spans.push(Span::styled(format!(" {}", clip(bp, 13)), th.dimmed()));
            }
            // Remote attempts are listed in hosts' order, which is `remote_attempts`' order.
            at.push(items.len());
            items.push(ListItem::new(Line::from(spans)));
        }
    }
    at
}

/// The pane's note: this process's workers, then the fleet's, each named.
pub(super) fn note(app: &App) -> String {
    let busy = app.busy_workers().len();
    let mut s = format!("{busy}/{} busy here", app.workers.len());
    let Some(fl) = &app.fleet else {
        return s;
    };
    let me = crate::store::process_id();
    let others: Vec<&ProcessRow> = app
        .processes
        .iter()
        .filter(|p| p.alive && p.id != me)
        .collect();
    if !others.is_empty() {
        let size: u64 =
            others.iter().filter_map(|p| p.concurrency).sum::<u64>() + app.workers.len() as u64;
        let remote = fl.running.iter().filter(|a| a.worker != me).count();
        s.push_str(&format!(" · fleet {}/{size}", busy + remote));
    }
    if !fl.listening {
        s.push_str(" · not listening");
    }
    s
}
