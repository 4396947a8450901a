//! Live progress of one headless run on stderr: each node's state, fan-out counts
//! (`agents 31/40`), retries with their wait and reason, elapsed time. On a terminal the block
//! is redrawn in place; otherwise (a pipe, a log file, cron) plain lines are printed as things
//! happen.

use crate::blueprint::Blueprint;
use crate::events::{Event, StepStatus, Subscriber};
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Default, Clone)]
struct NodeProgress {
    fan_out: bool,
    total: Option<usize>,
    started: bool,
    running: usize,
    done: usize,
    failed: usize,
    skipped: bool,
    cancelled: usize,
    retries: usize,
    /// Said that the node waits for its provider's rate limit (once per node).
    told_waiting: bool,
    finished: bool,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
}

/// Renders the progress of `run_id` until the run finishes.
pub struct Progress {
    run_id: String,
    blueprint: String,
    order: Vec<String>,
    nodes: HashMap<String, NodeProgress>,
    started: Instant,
    tty: bool,
    drawn_lines: usize,
    sandbox_note: String,
    frame: usize,
    /// Errors already printed, with the step that had them first: the same fix is said once
    /// (40 steps failing for one missing token are not 40 copies of its instructions).
    said: HashMap<String, String>,
}

impl Progress {
    pub fn new(bp: &Blueprint, run_id: &str, tty: bool, sandbox_note: String) -> Progress {
        let order: Vec<String> = bp.nodes.iter().map(|n| n.id.clone()).collect();
        let nodes = bp
            .nodes
            .iter()
            .map(|n| {
                let p = NodeProgress {
                    fan_out: n.for_each.is_some(),
                    total: n.for_each.is_none().then_some(1),
                    ..Default::default()
                };
                (n.id.clone(), p)
            })
            .collect();
        Progress {
            run_id: run_id.to_string(),
            blueprint: bp.name.clone(),
            order,
            nodes,
            started: Instant::now(),
            tty,
            drawn_lines: 0,
            sandbox_note,
            frame: 0,
            said: HashMap::new(),
        }
    }

    /// Consumes events until the run finishes.
    pub async fn follow(mut self, sub: Subscriber) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        if !self.tty {
            self.line(&format!(
                "{} run {} started{}",
                self.blueprint, self.run_id, self.sandbox_note
            ));
        }
        loop {
            tokio::select! {
                ev = sub.recv() => {
                    let Some(ev) = ev else { break };
                    if self.apply(ev) {
                        break;
                    }
                    // Drain a burst before drawing once.
                    let mut finished = false;
                    while let Some(ev) = sub.try_recv() {
                        if self.apply(ev) {
                            finished = true;
                            break;
                        }
                    }
                    if finished {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if self.tty {
                        self.redraw();
                    }
                }
            }
        }
        if self.tty {
            self.redraw();
        }
    }

    /// Updates state; returns true when the run finished.
    fn apply(&mut self, ev: Event) -> bool {
        if ev.run_id() != Some(self.run_id.as_str()) {
            return false;
        }
        let now = Instant::now();
        match ev {
            Event::FanOut { node, items, .. } => {
                if let Some(p) = self.nodes.get_mut(&node) {
                    p.total = Some(items);
                }
                if !self.tty {
                    self.line(&format!("  {node}: fan-out into {items} agents"));
                }
            }
            Event::StepStarted {
                node,
                step,
                attempt,
                ..
            } => {
                let first = {
                    let p = self.nodes.entry(node.clone()).or_default();
                    let first = !p.started;
                    p.started = true;
                    p.first_start.get_or_insert(now);
                    if attempt == 1 {
                        p.running += 1;
                    }
                    first
                };
                let _ = step;
                if first && !self.tty {
                    self.line(&format!("  {node}: running"));
                }
            }
            Event::StepRetrying {
                step,
                node,
                attempt,
                kind,
                message,
                wait_ms,
                ..
            } => {
                if let Some(p) = self.nodes.get_mut(&node) {
                    p.retries += 1;
                }
                let text = format!(
                    "  ↻ {step} attempt {attempt} failed ({kind}), retrying in {:.1}s: {message}",
                    wait_ms as f64 / 1000.0
                );
                // On a terminal a wrapped line would break the redrawn block: keep it to one.
                let text = if self.tty {
                    crate::text::clip(&text, 100)
                } else {
                    text
                };
                self.line(&text);
            }
            Event::StepFinished {
                node,
                status,
                step,
                error,
                attempts,
                ..
            } => {
                let (line, finished) = {
                    let p = self.nodes.entry(node.clone()).or_default();
                    if p.running > 0 {
                        p.running -= 1;
                    }
                    match status {
                        StepStatus::Success => p.done += 1,
                        StepStatus::Skipped => p.skipped = true,
                        StepStatus::Cancelled => p.cancelled += 1,
                        _ => p.failed += 1,
                    }
                    p.last_end = Some(now);
                    let total = p.total.unwrap_or(1);
                    let finished = p.skipped || p.done + p.failed + p.cancelled >= total;
                    p.finished = finished;
                    let line = match status {
                        StepStatus::Error => {
                            let e = error.as_deref().unwrap_or("");
                            let what = match self.said.get(e) {
                                Some(first) => format!("the same error as {first}"),
                                None => {
                                    self.said.insert(e.to_string(), step.clone());
                                    e.to_string()
                                }
                            };
                            Some(format!(
                                "  ✗ {step} failed after {attempts} attempt{}: {what}",
                                if attempts == 1 { "" } else { "s" },
                            ))
                        }
                        StepStatus::Skipped => Some(format!(
                            "  - {node}: {}",
                            error.as_deref().unwrap_or("skipped")
                        )),
                        _ => None,
                    };
                    (line, finished)
                };
                if let Some(l) = line {
                    self.line(&l);
                }
                if finished && !self.tty && status != StepStatus::Skipped {
                    let summary = self.node_line(&node);
                    self.line(&summary);
                }
            }
            Event::StepWaiting {
                node,
                provider,
                wait_ms,
                ..
            } => {
                let first = self
                    .nodes
                    .get_mut(&node)
                    .is_some_and(|p| !std::mem::replace(&mut p.told_waiting, true));
                if first {
                    self.line(&format!(
                        "  ⧗ {node}: waiting {:.1}s for {provider}'s rate limit (holding no worker)",
                        wait_ms as f64 / 1000.0
                    ));
                }
            }
            Event::StepWaitingSlot {
                node,
                provider,
                limit,
                ..
            } => {
                let first = self
                    .nodes
                    .get_mut(&node)
                    .is_some_and(|p| !std::mem::replace(&mut p.told_waiting, true));
                if first {
                    self.line(&format!(
                        "  ⧗ {node}: waiting for a free {provider} slot ({limit} calls in flight at most; holding no worker)"
                    ));
                }
            }
            Event::RunFinished { .. } | Event::RunReleased { .. } => return true,
            _ => {}
        }
        false
    }

    fn node_line(&self, id: &str) -> String {
        let Some(p) = self.nodes.get(id) else {
            return String::new();
        };
        let total = p.total;
        let (icon, state) = if p.skipped {
            ("-", "skipped".to_string())
        } else if p.finished && p.failed > 0 {
            ("✗", "failed".to_string())
        } else if p.finished && p.cancelled > 0 {
            ("■", "cancelled".to_string())
        } else if p.finished {
            ("✓", "done".to_string())
        } else if p.started {
            (SPINNER[self.frame % SPINNER.len()], "running".to_string())
        } else {
            ("·", "waiting".to_string())
        };
        let mut s = format!("  {icon} {id:<18} {state:<9}");
        if p.fan_out {
            if let Some(t) = total {
                s.push_str(&format!(
                    " agents {}/{}",
                    p.done + p.failed + p.cancelled,
                    t
                ));
                if p.running > 0 && !p.finished {
                    s.push_str(&format!(" ({} in flight)", p.running));
                }
            }
        }
        if p.retries > 0 {
            s.push_str(&format!(
                "  {} retr{}",
                p.retries,
                if p.retries == 1 { "y" } else { "ies" }
            ));
        }
        if p.failed > 0 && total.unwrap_or(1) > 1 {
            s.push_str(&format!("  {} failed", p.failed));
        }
        if let (Some(a), Some(b)) = (p.first_start, p.last_end.filter(|_| p.finished)) {
            s.push_str(&format!("  {:.1}s", b.duration_since(a).as_secs_f64()));
        } else if let Some(a) = p.first_start {
            s.push_str(&format!("  {:.1}s", a.elapsed().as_secs_f64()));
        }
        s
    }

    /// A permanent line (above the live block on a terminal).
    fn line(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            clear_block(&mut err, self.drawn_lines);
            self.drawn_lines = 0;
        }
        let _ = writeln!(err, "{text}");
        let _ = err.flush();
    }

    fn redraw(&mut self) {
        self.frame += 1;
        let mut lines = vec![format!(
            "{}  run {}{}  elapsed {:.1}s",
            self.blueprint,
            self.run_id,
            self.sandbox_note,
            self.started.elapsed().as_secs_f64()
        )];
        for id in &self.order {
            lines.push(self.node_line(id));
        }
        let mut err = std::io::stderr().lock();
        clear_block(&mut err, self.drawn_lines);
        for l in &lines {
            let _ = writeln!(err, "{l}");
        }
        let _ = err.flush();
        self.drawn_lines = lines.len();
    }
}

const SPINNER: [&str; 8] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧"];

fn clear_block(w: &mut impl Write, lines: usize) {
    if lines > 0 {
        // Up `lines`, to column 0, clear to the end of the screen.
        let _ = write!(w, "\x1b[{lines}A\r\x1b[J");
    }
}
