//! The console's view of the fleet (`DATABASE_URL=postgres://…`): runs other processes
//! announce (`NOTIFY omniflow_events`) are re-read and laid over the History page and the
//! open run; the shared queue's depth and every process's running attempts are read on a
//! clock, sooner when something was announced. Part of [`App::update`]: no I/O here.
//!
//! No storm: announcements only add run ids to a set; one re-read is in flight at a time,
//! and everything announced meanwhile goes into the next one. So a burst of any size costs
//! one query per round trip, and a frame sees it whole.

use super::*;
use crate::store::pg::events::Live;
use crate::store::pg::fleet_view::RunningAttempt;

/// Most runs waiting to be re-read one by one; past this the page is re-read instead.
pub const PENDING_MAX: usize = 500;
/// Shortest time between two reads of the shared queue when something was announced.
pub const FLEET_READ_MS: u64 = 500;
/// How often the shared queue is read when nothing was announced.
pub const FLEET_REFRESH_MS: u64 = 2000;
/// How often the History page and an open run in flight are re-read unasked while the
/// `LISTEN` connection is up (announcements bring the rest; this only catches what a
/// notification could not say, such as a row edited by hand).
pub const LISTENING_REFRESH_MS: u64 = 10_000;

impl App {
    /// Every how many ms the History page (and an open run in flight) is re-read unasked:
    /// slowly while other processes' changes are announced, else [`HISTORY_REFRESH_MS`].
    pub fn refresh_ms(&self) -> u64 {
        if self.fleet.as_ref().is_some_and(|f| f.listening) {
            LISTENING_REFRESH_MS
        } else {
            HISTORY_REFRESH_MS
        }
    }

    pub(super) fn on_live(&mut self, live: Live, fx: &mut Vec<Effect>) {
        let Some(fl) = &mut self.fleet else {
            return;
        };
        match live {
            Live::Runs { runs, more } => {
                fl.stale = true;
                if let Screen::Detail(d) = &mut self.screen {
                    if more || runs.contains(&d.run_id) {
                        d.stale = true;
                    }
                }
                if more || fl.pending.len() + runs.len() > PENDING_MAX {
                    // Too many to read one by one: the page, once.
                    fl.pending.clear();
                    self.history.stale = true;
                } else {
                    fl.pending.extend(runs);
                }
                self.reload_announced(fx);
            }
            Live::Connected => {
                // Whatever changed while nobody listened was not announced: read once.
                let again = fl.listen_problem.take().is_some();
                fl.listening = true;
                fl.stale = true;
                self.history.stale = true;
                if let Screen::Detail(d) = &mut self.screen {
                    d.stale = true;
                }
                if again {
                    self.say(
                        "listening to the fleet again: other processes' runs show as they change",
                    );
                }
            }
            Live::Lost(e) => {
                fl.listening = false;
                fl.listen_problem = Some(e);
            }
        }
        self.dirty = true;
    }

    /// Starts the re-read of the announced runs, unless one is in flight (then they wait for
    /// it: one query for everything announced meanwhile).
    fn reload_announced(&mut self, fx: &mut Vec<Effect>) {
        let Some(fl) = &mut self.fleet else {
            return;
        };
        if fl.reloading || fl.pending.is_empty() {
            return;
        }
        fl.reloading = true;
        fx.push(Effect::ReloadRuns(
            std::mem::take(&mut fl.pending).into_iter().collect(),
        ));
    }

    pub(super) fn on_runs_reloaded(
        &mut self,
        result: Result<Vec<RunRow>, String>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(fl) = &mut self.fleet else {
            return;
        };
        fl.reloading = false;
        match result {
            Ok(rows) => {
                fl.reloaded += rows.len() as u64;
                for row in rows {
                    self.lay_run(row);
                }
                self.history.overlay_finished();
            }
            // The page's own refresh says what is wrong with the database.
            Err(_) => self.history.stale = true,
        }
        self.reload_announced(fx);
        self.clamp_selections();
    }

    /// A run's fresh row: replaces its row on the page, or, when it belongs on the page and
    /// is not there yet (a run another process just started), has the page read again.
    fn lay_run(&mut self, row: RunRow) {
        if let Some(slot) = self.history.rows.iter_mut().find(|r| r.id == row.id) {
            if let Some(fl) = &mut self.fleet {
                // Bounded: a long session forgets the oldest of these at once.
                if fl.fresh.len() >= 1024 {
                    fl.fresh.clear();
                }
                fl.fresh.insert(row.id.clone(), row.clone());
            }
            *slot = row;
        } else if self.belongs_on_page(&row) {
            self.history.stale = true;
        }
    }

    /// Lays rows re-read after an announcement over a page whose query was already under
    /// way when they were read (it would bring a finished run back as `running`), and
    /// forgets those the page has caught up with.
    pub(super) fn overlay_fresh(&mut self) {
        let Some(fl) = &mut self.fleet else {
            return;
        };
        for row in &mut self.history.rows {
            let Some(fresh) = fl.fresh.get(&row.id) else {
                continue;
            };
            let ahead = !row.status.is_final()
                && (fresh.status.is_final() || fresh.steps_done > row.steps_done);
            if ahead {
                *row = fresh.clone();
            } else {
                fl.fresh.remove(&row.id);
            }
        }
    }

    /// Whether a run missing from the page would be on it: the first page, the filters
    /// admit it, and it is newer than the page's last row (or the page has room).
    fn belongs_on_page(&self, row: &RunRow) -> bool {
        let h = &self.history;
        if h.page != 0 {
            return false;
        }
        let admitted = h.status.is_none_or(|s| s == row.status)
            && h.blueprint
                .as_ref()
                .is_none_or(|b| *b == row.blueprint_name)
            && h.name_contains.as_ref().is_none_or(|n| {
                row.blueprint_name
                    .to_lowercase()
                    .contains(&n.to_lowercase())
            });
        let key = |r: &RunRow| (r.started_at, r.id.clone());
        admitted && (h.rows.len() < PAGE || h.rows.last().is_none_or(|last| key(row) > key(last)))
    }

    /// Reads the shared queue on the clock, sooner when something was announced.
    pub(super) fn fleet_tick(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let Some(fl) = &mut self.fleet else {
            return;
        };
        let since = now.saturating_sub(fl.loaded_ms);
        let due = since >= FLEET_REFRESH_MS || (fl.stale && since >= FLEET_READ_MS);
        if due && !fl.loading {
            fl.loading = true;
            fl.stale = false;
            fl.loaded_ms = now;
            fx.push(Effect::LoadFleet);
        }
    }

    pub(super) fn on_fleet_sample(
        &mut self,
        result: Result<([u64; 4], Vec<RunningAttempt>), String>,
    ) {
        let Some(fl) = &mut self.fleet else {
            return;
        };
        fl.loading = false;
        match result {
            Ok((depth, running)) => {
                fl.depth = Some(depth);
                fl.running = running;
                fl.problem = None;
            }
            Err(e) => {
                // Said once per problem, not at every read.
                if fl.problem.as_ref() != Some(&e) {
                    fl.problem = Some(e.clone());
                    self.complain(format!(
                        "cannot read the fleet's queue (Workers and the queue depth wait): {e}"
                    ));
                }
            }
        }
        self.clamp_selections();
    }

    /// Attempts other processes are running: this host's first, then by host name, by
    /// process, oldest first. The Workers pane lists them in this order after this process's
    /// own, so the line selected is the run the keys act on.
    pub fn remote_attempts(&self) -> Vec<&RunningAttempt> {
        let me = crate::store::process_id();
        let my_host = host_of(me);
        let mut v: Vec<&RunningAttempt> = match &self.fleet {
            Some(fl) => fl.running.iter().filter(|a| a.worker != me).collect(),
            None => Vec::new(),
        };
        let key = |a: &RunningAttempt| {
            let host = host_of(&a.worker);
            (
                host != my_host,
                host.to_string(),
                a.worker.clone(),
                a.claimed_at,
            )
        };
        v.sort_by_key(|a| key(a));
        v
    }

    /// Lines the Workers pane can select: this process's busy workers, then the attempts
    /// other processes run.
    pub fn selectable_workers(&self) -> usize {
        self.busy_workers().len() + self.remote_attempts().len()
    }

    /// The priority a run has as far as this console knows (its live state, its row).
    pub(super) fn known_priority(&self, run_id: &str) -> Option<Priority> {
        if let Some(r) = self.runs.get(run_id) {
            return Some(r.priority);
        }
        if let Screen::Detail(d) = &self.screen {
            if let Some(x) = d.data.as_ref().filter(|x| x.run.id == run_id) {
                return Some(x.run.priority);
            }
        }
        self.history
            .rows
            .iter()
            .find(|r| r.id == run_id)
            .map(|r| r.priority)
    }

    /// Shows a priority asked of another process's run on its row at once.
    pub(super) fn show_priority(&mut self, run_id: &str, p: Priority) {
        for r in self.history.rows.iter_mut().filter(|r| r.id == run_id) {
            r.priority = p;
        }
        if let Screen::Detail(d) = &mut self.screen {
            if let Some(x) = d.data.as_mut().filter(|x| x.run.id == run_id) {
                x.run.priority = p;
            }
        }
    }
}

/// The host part of a process id (`host:pid:start`).
pub fn host_of(worker: &str) -> &str {
    let mut parts = worker.rsplitn(3, ':');
    let (_, _, host) = (parts.next(), parts.next(), parts.next());
    host.unwrap_or(worker)
}

/// The pid part of a process id (`host:pid:start`).
pub fn pid_of(worker: &str) -> &str {
    worker.rsplit(':').nth(1).unwrap_or("")
}
