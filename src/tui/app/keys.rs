//! Key handling: what each key does in each place (main screen by focus, run detail,
//! overlays). Part of [`App::update`]; changes state and pushes effects, never does I/O.

use super::*;

impl App {
    // ---- keys ------------------------------------------------------------------------------

    pub(super) fn on_key(&mut self, k: KeyEvent, fx: &mut Vec<Effect>) {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && k.code == KeyCode::Char('c') && !matches!(self.overlay, Overlay::Editor(_)) {
            // Terminal habit: Ctrl-C leaves at once. Runs in flight are handed over (as on a
            // hang-up), not cancelled: a reflex must not destroy work. The exit status says
            // the console was interrupted.
            self.quit = true;
            self.quit_mode = QuitMode::HandOver;
            self.interrupted = true;
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
            Overlay::Processes(top) => {
                self.overlay = match k.code {
                    KeyCode::Down | KeyCode::Char('j') => Overlay::Processes(top.saturating_add(1)),
                    KeyCode::Up | KeyCode::Char('k') => Overlay::Processes(top.saturating_sub(1)),
                    _ => Overlay::None,
                };
            }
            // Any key closes the full message.
            Overlay::Message => {}
            Overlay::Confirm(c) => self.on_confirm_key(c, k, fx),
            Overlay::Search { target, text } => self.on_search_key(target, text, k, fx),
            Overlay::Sandbox(form) => self.on_sandbox_key(form, k, fx),
            Overlay::Editor(ed) => self.on_editor_key(ed, k, fx),
        }
    }

    fn on_main_key(&mut self, k: KeyEvent, fx: &mut Vec<Effect>) {
        let detail = matches!(self.screen, Screen::Detail(_));
        let Some(action) = bindings::action_of(&k, detail, self.focus) else {
            return;
        };
        use bindings::Action as A;
        match action {
            A::Help => self.overlay = Overlay::Help(0),
            A::Quit => self.ask_quit(fx),
            A::Back => self.back(fx),
            A::NextPane => self.focus = self.focus.step(1),
            A::PrevPane => self.focus = self.focus.step(-1),
            A::Up => self.move_sel(-1, fx),
            A::Down => self.move_sel(1, fx),
            A::PageUp => self.page(-1, fx),
            A::PageDown => self.page(1, fx),
            A::Top => self.move_sel(-1_000_000, fx),
            A::Bottom => self.move_sel(1_000_000, fx),
            A::Open => self.open(fx),
            A::Search => {
                let text = match self.focus {
                    Focus::Blueprints => self.bp_filter.clone(),
                    Focus::History => self.history.name_contains.clone().unwrap_or_default(),
                    Focus::Logs | Focus::Workers => self.logs.search.clone(),
                };
                let target = if self.focus == Focus::Workers {
                    Focus::Logs
                } else {
                    self.focus
                };
                self.overlay = Overlay::Search { target, text };
            }
            A::Sandbox => self.sandbox_form(),
            A::Retry => self.ask_retry(),
            A::Cancel => self.ask_cancel(),
            A::Pause => {
                let pause = !self.pool.paused;
                self.pool.paused = pause;
                fx.push(Effect::SetPaused(pause));
                self.say(if pause {
                    "pool paused: running steps finish, queued ones wait (p resumes)"
                } else {
                    "pool resumed"
                });
            }
            A::PriorityUp => self.bump_priority(1, fx),
            A::PriorityDown => self.bump_priority(-1, fx),
            A::Edit => self.edit_blueprint(fx),
            A::Run => self.open(fx),
            A::Export => self.ask_export(),
            A::Reload => {
                fx.push(Effect::LoadBlueprints);
                self.say(format!("reloading blueprints from {}", self.dir.display()));
            }
            A::Theme => self.cycle_theme(),
            A::Processes => self.overlay = Overlay::Processes(0),
            A::StatusFilter => self.cycle_status_filter(fx),
            A::BlueprintFilter => self.toggle_blueprint_filter(fx),
            A::Level => {
                self.logs.level = self.logs.level.next();
                self.say(format!("log level: {}", self.logs.level.label()));
            }
            A::Follow => {
                self.logs.follow = !self.logs.follow;
                self.logs.scroll = 0;
                self.say(if self.logs.follow {
                    "logs: following new lines"
                } else {
                    "logs: paused (↑↓ PgUp PgDn scroll back, f follows again)"
                });
            }
            A::LogFilter => self.toggle_log_filter(fx),
            A::Message => self.overlay = Overlay::Message,
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
                if self.history.status.is_some()
                    || self.history.blueprint.is_some()
                    || self.history.name_contains.is_some()
                {
                    self.history.status = None;
                    self.history.blueprint = None;
                    self.history.name_contains = None;
                    self.query_history(fx);
                }
            }
            Focus::Logs | Focus::Workers => {
                self.logs.search.clear();
                self.logs.run_filter = None;
                self.logs.step_filter = None;
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
                let n = self.selectable_workers();
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
                let max = self.logs.max_scroll();
                self.logs.follow = false;
                let s = self.logs.scroll.min(max) as isize - by;
                self.logs.scroll = s.clamp(0, max as isize) as usize;
                if self.logs.scroll == 0 && by > 0 {
                    self.logs.follow = true;
                }
            }
        }
    }

    fn page(&mut self, by: isize, fx: &mut Vec<Effect>) {
        if let Screen::Detail(d) = &mut self.screen {
            // A page is the step pane's height (less a line kept for context); the last page
            // ends at the text's last line.
            let page = d.text_rows.get().saturating_sub(1).max(1);
            let last_top = d.text_total.get().saturating_sub(d.text_rows.get());
            d.scroll = if by > 0 {
                d.scroll.saturating_add(page).min(last_top)
            } else {
                d.scroll.min(last_top).saturating_sub(page)
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
            text_rows: std::cell::Cell::new(10),
            text_total: std::cell::Cell::new(0),
            generation,
            loading: true,
            stale: false,
            loaded_ms: self.now_ms,
        }));
    }

    fn ask_export(&mut self) {
        match self.selected_blueprint() {
            Some(b) if b.is_valid() => {
                let name = b.name.clone();
                self.overlay = Overlay::Confirm(Confirm::Export { blueprint: name });
            }
            Some(b) => {
                let n = b.name.clone();
                self.complain(format!("{n} is invalid: e shows its problems"));
            }
            None => self.say("select a blueprint in the Blueprints pane first (Tab)"),
        }
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
        self.open_sandbox(bp);
    }

    /// The sandbox form for `bp`, with the failure rate last used for it in this session.
    pub(super) fn open_sandbox(&mut self, bp: Arc<Blueprint>) {
        let mut form = SandboxForm::new(bp);
        if let Some(rate) = self.sandbox_rates.get(&form.blueprint.name) {
            form.set_rate(rate);
        }
        self.overlay = Overlay::Sandbox(Box::new(form));
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
        } else if !self.runs.contains_key(&run_id) && self.fleet.is_none() {
            self.complain(format!(
                "run {} is not running in this console (another process owns it)",
                short(&run_id)
            ));
        } else {
            // With a shared PostgreSQL history, another process's run is cancelled by its
            // driver, asked through the database.
            self.overlay = Overlay::Confirm(Confirm::Cancel { run_id, blueprint });
        }
    }

    fn bump_priority(&mut self, by: isize, fx: &mut Vec<Effect>) {
        let Some((run_id, _, status)) = self.selected_run() else {
            self.say("select a queued or running run to change its priority");
            return;
        };
        let Some(live) = self.runs.get_mut(&run_id) else {
            // Another process's run: its driver is asked (through the shared database).
            match (&self.fleet, self.known_priority(&run_id), status) {
                (Some(_), Some(now), Some(RunStatus::Queued | RunStatus::Running)) => {
                    let p = Priority::from_index((now.index() as isize + by).clamp(0, 3) as usize);
                    self.show_priority(&run_id, p);
                    fx.push(Effect::SetPriority {
                        run_id: run_id.clone(),
                        priority: p,
                    });
                    self.say(format!(
                        "run {} priority → {} (asked of its process)",
                        short(&run_id),
                        p.as_str()
                    ));
                }
                _ => self.say(format!(
                    "run {} is not queued or running in this console",
                    short(&run_id)
                )),
            }
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

    /// `o`: in a run's detail, only the selected step's lines of that run (again on the same
    /// step: every line); elsewhere, only the selected run's lines (again: every line).
    fn toggle_log_filter(&mut self, fx: &mut Vec<Effect>) {
        if let Screen::Detail(d) = &self.screen {
            let step = d
                .data
                .as_ref()
                .and_then(|x| x.steps.get(d.selected))
                .map(|s| s.step_key.clone());
            if let Some(step) = step {
                let run_id = d.run_id.clone();
                if self.logs.run_filter.as_deref() == Some(run_id.as_str())
                    && self.logs.step_filter.as_deref() == Some(step.as_str())
                {
                    self.clear_log_filter();
                } else {
                    self.say(format!(
                        "logs: only {step} of run {} (Esc: back to the Logs pane)",
                        short(&run_id)
                    ));
                    self.logs.run_filter = Some(run_id.clone());
                    self.logs.step_filter = Some(step);
                    self.find_run_logs(run_id, fx);
                }
                return;
            }
            // No steps read yet: the run is all there is to filter by.
        }
        if self.logs.run_filter.is_some() {
            self.clear_log_filter();
            return;
        }
        match self.selected_run() {
            Some((id, _, _)) => {
                self.say(format!(
                    "logs: only run {} (reading its older lines from the log files…)",
                    short(&id)
                ));
                self.logs.run_filter = Some(id.clone());
                self.find_run_logs(id, fx);
            }
            None => self.say("select a run (History or Workers) to filter the logs by it"),
        }
    }

    /// Reads `run_id`'s lines from every log file (the pane keeps only the newest ones).
    fn find_run_logs(&mut self, run_id: String, fx: &mut Vec<Effect>) {
        if self
            .logs
            .older
            .as_ref()
            .is_some_and(|(id, _, _)| *id == run_id)
        {
            return;
        }
        self.logs.older = None;
        fx.push(Effect::FindRunLogs {
            run_id,
            mark: self.logs.pushed,
        });
    }

    fn clear_log_filter(&mut self) {
        self.logs.run_filter = None;
        self.logs.step_filter = None;
        self.say("logs: every run");
    }

    fn on_confirm_key(&mut self, c: Confirm, k: KeyEvent, fx: &mut Vec<Effect>) {
        use bindings::Answer;
        let Some(answer) = bindings::answer_of(&c, &k) else {
            // Any other key (Enter too) leaves the question open.
            self.overlay = Overlay::Confirm(c);
            return;
        };
        let quit = |app: &mut App, fx: &mut Vec<Effect>, m: QuitMode| {
            app.quit_mode = m;
            app.quit = true;
            fx.push(Effect::Quit);
        };
        match (answer, c) {
            (Answer::Close, _) => {}
            (Answer::QuitCancel, _) => quit(self, fx, QuitMode::Cancel),
            (Answer::QuitHandOver, _) => quit(self, fx, QuitMode::HandOver),
            (Answer::QuitWait, _) => quit(self, fx, QuitMode::Finish),
            (Answer::CancelRun, Confirm::Cancel { run_id, .. }) => {
                fx.push(Effect::Cancel {
                    run_id: run_id.clone(),
                });
                self.say(format!("cancelling run {}…", short(&run_id)));
            }
            (Answer::RunIt, Confirm::Run { blueprint }) => match self.blueprint_named(&blueprint) {
                Some(bp) => fx.push(Effect::Start {
                    blueprint: bp,
                    request: Box::new(RunRequest {
                        trigger: crate::engine::Trigger::Console,
                        ..RunRequest::default()
                    }),
                }),
                None => self.complain(format!("{blueprint} is no longer loaded")),
            },
            (Answer::SandboxInstead, Confirm::Run { blueprint }) => {
                match self.blueprint_named(&blueprint) {
                    Some(bp) => self.open_sandbox(bp),
                    None => self.complain(format!("{blueprint} is no longer loaded")),
                }
            }
            (Answer::RetryWhole, Confirm::Retry { run_id, blueprint }) => {
                fx.push(Effect::Retry {
                    run_id,
                    only_failed: false,
                });
                self.say(format!("retrying {blueprint} (whole run)…"));
            }
            (Answer::RetryFailed, Confirm::Retry { run_id, blueprint }) => {
                fx.push(Effect::Retry {
                    run_id,
                    only_failed: true,
                });
                self.say(format!("retrying the failed steps of {blueprint}…"));
            }
            (
                a @ (Answer::ExportPython
                | Answer::ExportNode
                | Answer::ExportGithub
                | Answer::ExportDocker),
                Confirm::Export { blueprint },
            ) => {
                use crate::export::Target;
                let target = match a {
                    Answer::ExportPython => Target::Python,
                    Answer::ExportNode => Target::Node,
                    Answer::ExportGithub => Target::GithubAction,
                    _ => Target::Docker,
                };
                match self.blueprint_named(&blueprint) {
                    Some(bp) => {
                        let out = PathBuf::from("exports").join(format!(
                            "{}-{}",
                            bp.name,
                            target.as_str()
                        ));
                        self.say(format!("exporting {blueprint} to {}…", out.display()));
                        fx.push(Effect::Export {
                            blueprint: bp,
                            target,
                            out,
                        });
                    }
                    None => self.complain(format!("{blueprint} is no longer loaded")),
                }
            }
            // An answer of another dialog cannot come from `answer_of`.
            (_, c) => self.overlay = Overlay::Confirm(c),
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
                // Part of a blueprint name, any case: queried once, on Enter.
                if done {
                    let t = text.trim();
                    self.history.name_contains = (!t.is_empty()).then(|| t.to_string());
                    self.history.page = 0;
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
            KeyCode::Char('k') if ctrl => {
                // Clears the field (the whole test variables, or the rate).
                match form.field {
                    FormField::Vars => form.vars = forms::vars_area(Vec::new()),
                    FormField::Rate => form.set_rate(""),
                }
                form.error = None;
            }
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
        match form.request(self.limits.max_variable_bytes) {
            Ok(req) => {
                let name = form.blueprint.name.clone();
                self.sandbox_rates
                    .insert(name.clone(), form.rate.lines().join(""));
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
                    match crate::blueprint::load_str(&text, format, self.limits.max_blueprint_bytes)
                    {
                        Ok(_) => {
                            ed.problems.clear();
                            ed.note = Some("saving…".into());
                            fx.push(Effect::SaveFile {
                                path: ed.path.clone(),
                                text,
                            });
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
            KeyCode::Char('z') if ctrl => {
                if let Some(t) = &mut ed.text {
                    t.undo();
                }
            }
            KeyCode::Char('y') if ctrl => {
                if let Some(t) = &mut ed.text {
                    t.redo();
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
}
