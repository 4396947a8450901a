//! The console at two depths: state updates for every key action (synthetic keys, engine
//! events and background results into `App::update`, checking state and effects), and
//! rendering snapshots of known states into ratatui's `TestBackend` at 80×24 and 160×48.

use omniflow::events::{Event, RunStatus};
use omniflow::tui::app::{bindings, Confirm, Effect, Focus, FormField, Overlay, Screen};
use omniflow::tui::fixtures::{self, T0};
use omniflow::tui::state::{LevelFilter, LogEntry, PAGE};
use omniflow::tui::{ui, App, Bg, Msg};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

fn key(app: &mut App, code: KeyCode) -> Vec<Effect> {
    app.update(Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)))
}
fn ch(app: &mut App, c: char) -> Vec<Effect> {
    key(app, KeyCode::Char(c))
}
fn ctrl(app: &mut App, c: char) -> Vec<Effect> {
    app.update(Msg::Key(KeyEvent::new(
        KeyCode::Char(c),
        KeyModifiers::CONTROL,
    )))
}
fn typed(app: &mut App, s: &str) {
    for c in s.chars() {
        ch(app, c);
    }
}
fn focus(app: &mut App, f: Focus) {
    while app.focus != f {
        key(app, KeyCode::Tab);
    }
}

fn history_page(app: &mut App, rows: Vec<omniflow::store::RunRow>) {
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((rows, Some(100_000))),
    }));
}

// ---- state updates ----------------------------------------------------------------------

#[test]
fn start_loads_blueprints_and_the_first_history_page() {
    let mut app = fixtures::app();
    let fx = app.start();
    assert!(matches!(fx[0], Effect::LoadBlueprints));
    match &fx[1] {
        Effect::QueryHistory { filter, .. } => {
            assert_eq!(filter.before, None);
            assert_eq!(filter.limit, PAGE);
        }
        other => panic!("{other:?}"),
    }
    assert!(app.history.loading);
}

#[test]
fn help_opens_with_question_mark_and_any_key_closes_it() {
    let mut app = fixtures::busy_app();
    ch(&mut app, '?');
    assert!(matches!(app.overlay, Overlay::Help(0)));
    ch(&mut app, 'j');
    assert!(matches!(app.overlay, Overlay::Help(1)));
    key(&mut app, KeyCode::Esc);
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn q_quits_at_once_when_idle_and_asks_when_runs_are_in_flight() {
    let mut app = fixtures::app();
    assert!(matches!(ch(&mut app, 'q')[..], [Effect::Quit]));
    assert!(app.quit);

    let mut app = fixtures::busy_app();
    assert_eq!(app.in_flight(), 1);
    assert!(ch(&mut app, 'q').is_empty());
    assert!(matches!(
        app.overlay,
        Overlay::Confirm(Confirm::Quit { in_flight: 1 })
    ));
    ch(&mut app, 'n');
    assert!(!app.quit && matches!(app.overlay, Overlay::None));
    ch(&mut app, 'q');
    assert!(matches!(ch(&mut app, 'c')[..], [Effect::Quit]));
    assert!(app.quit);
    assert_eq!(app.quit_mode, omniflow::tui::app::QuitMode::Cancel);
}

#[test]
fn ctrl_c_quits_immediately() {
    let mut app = fixtures::busy_app();
    assert!(matches!(ctrl(&mut app, 'c')[..], [Effect::Quit]));
    assert!(app.quit);
    // Interrupted (exit 3), and the run in flight is handed over, not cancelled.
    assert!(app.interrupted);
    assert_eq!(app.quit_mode, omniflow::tui::app::QuitMode::HandOver);
}

#[test]
fn tab_and_shift_tab_cycle_the_panes() {
    let mut app = fixtures::app();
    assert_eq!(app.focus, Focus::Blueprints);
    key(&mut app, KeyCode::Tab);
    assert_eq!(app.focus, Focus::Workers);
    ch(&mut app, 'l');
    assert_eq!(app.focus, Focus::History);
    key(&mut app, KeyCode::Right);
    assert_eq!(app.focus, Focus::Logs);
    key(&mut app, KeyCode::Tab);
    assert_eq!(app.focus, Focus::Blueprints);
    key(&mut app, KeyCode::BackTab);
    assert_eq!(app.focus, Focus::Logs);
    ch(&mut app, 'h');
    assert_eq!(app.focus, Focus::History);
}

#[test]
fn arrows_and_jk_move_within_bounds() {
    let mut app = fixtures::busy_app();
    ch(&mut app, 'j');
    assert_eq!(app.bp_selected, 1);
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Down);
    assert_eq!(app.bp_selected, 2, "stops at the last blueprint");
    ch(&mut app, 'k');
    key(&mut app, KeyCode::Up);
    key(&mut app, KeyCode::Up);
    assert_eq!(app.bp_selected, 0);
    ch(&mut app, 'G');
    assert_eq!(app.bp_selected, 2);
    ch(&mut app, 'g');
    assert_eq!(app.bp_selected, 0);
}

#[test]
fn enter_on_a_blueprint_asks_then_starts_a_real_console_run() {
    let mut app = fixtures::busy_app();
    assert!(key(&mut app, KeyCode::Enter).is_empty());
    assert!(
        matches!(&app.overlay, Overlay::Confirm(Confirm::Run { blueprint }) if blueprint == "tech-digest")
    );
    let fx = ch(&mut app, 'y');
    match &fx[..] {
        [Effect::Start { blueprint, request }] => {
            assert_eq!(blueprint.name, "tech-digest");
            assert!(!request.sandbox);
            assert_eq!(request.trigger, omniflow::engine::Trigger::Console);
        }
        other => panic!("{other:?}"),
    }
    // n declines.
    key(&mut app, KeyCode::Enter);
    assert!(ch(&mut app, 'n').is_empty());
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn x_exports_the_selected_blueprint_to_the_chosen_target() {
    let mut app = fixtures::busy_app();
    assert!(ch(&mut app, 'X').is_empty());
    assert!(
        matches!(&app.overlay, Overlay::Confirm(Confirm::Export { blueprint }) if blueprint == "tech-digest")
    );
    // A key that names no target keeps asking.
    assert!(ch(&mut app, 'z').is_empty());
    assert!(matches!(
        &app.overlay,
        Overlay::Confirm(Confirm::Export { .. })
    ));
    match &ch(&mut app, 'o')[..] {
        [Effect::Export {
            blueprint,
            target,
            out,
        }] => {
            assert_eq!(blueprint.name, "tech-digest");
            assert_eq!(*target, omniflow::export::Target::Node);
            assert_eq!(out, &std::path::PathBuf::from("exports/tech-digest-node"));
        }
        other => panic!("{other:?}"),
    }
    // Esc leaves without exporting.
    ch(&mut app, 'X');
    assert!(key(&mut app, KeyCode::Esc).is_empty());
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn enter_on_an_invalid_blueprint_opens_it_with_its_problems() {
    let mut app = fixtures::busy_app();
    ch(&mut app, 'G');
    let fx = key(&mut app, KeyCode::Enter);
    assert!(matches!(&fx[..], [Effect::ReadFile(p)] if p.ends_with("broken.json")));
    match &app.overlay {
        Overlay::Editor(ed) => assert!(ed.problems[0].contains("did you mean")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn t_opens_the_sandbox_form_prefilled_and_ctrl_s_starts_a_sandbox_run() {
    let mut app = fixtures::busy_app();
    ch(&mut app, 't');
    match &app.overlay {
        Overlay::Sandbox(form) => {
            assert_eq!(form.vars.lines(), ["TOPICS=[\"x\",\"y\"]"]);
            assert_eq!(form.rate.lines(), ["30"]);
            assert_eq!(form.field, FormField::Vars);
        }
        other => panic!("{other:?}"),
    }
    // Change the rate to 100 %.
    key(&mut app, KeyCode::Tab);
    key(&mut app, KeyCode::Backspace);
    key(&mut app, KeyCode::Backspace);
    typed(&mut app, "100");
    let fx = ctrl(&mut app, 's');
    match &fx[..] {
        [Effect::Start { blueprint, request }] => {
            assert_eq!(blueprint.name, "tech-digest");
            assert!(request.sandbox);
            assert_eq!(request.simulate_failures, 1.0);
            assert_eq!(request.variables["TOPICS"], serde_json::json!(["x", "y"]));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn the_sandbox_form_refuses_unknown_variables_and_bad_rates() {
    let mut app = fixtures::busy_app();
    ch(&mut app, 't');
    key(&mut app, KeyCode::Enter);
    typed(&mut app, "NOPE=1");
    assert!(ctrl(&mut app, 's').is_empty());
    match &app.overlay {
        Overlay::Sandbox(form) => {
            let e = form.error.as_deref().unwrap_or("");
            assert!(e.contains("declares no variable NOPE"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(omniflow::tui::app::parse_rate("abc").is_err());
    assert!(omniflow::tui::app::parse_rate("150").is_err());
    assert_eq!(omniflow::tui::app::parse_rate("30%"), Ok(0.3));
    assert_eq!(omniflow::tui::app::parse_rate("0.5"), Ok(0.5));
    key(&mut app, KeyCode::Esc);
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn slash_filters_the_blueprints_and_esc_clears() {
    let mut app = fixtures::busy_app();
    ch(&mut app, '/');
    typed(&mut app, "tri");
    assert_eq!(app.visible_blueprints().len(), 1);
    key(&mut app, KeyCode::Enter);
    assert_eq!(app.bp_filter, "tri");
    assert_eq!(
        app.selected_blueprint().map(|b| b.name.as_str()),
        Some("triage")
    );
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.visible_blueprints().len(), 3);
}

#[test]
fn engine_events_fill_and_drain_the_live_panes() {
    let mut app = fixtures::busy_app();
    assert_eq!(app.busy_workers().len(), 2);
    assert_eq!(app.retrying.len(), 1);
    assert_eq!(app.retrying[0].until_ms, T0 + 2000);
    let run = "0mwz00000live".to_string();
    app.update(Msg::Engine(Event::StepStarted {
        run_id: run.clone(),
        step: "summarize[1]".into(),
        node: "summarize".into(),
        attempt: 2,
    }));
    assert!(
        app.retrying.is_empty(),
        "a retried step leaves the countdown list"
    );
    app.update(Msg::Engine(Event::WorkerIdle { worker: 0 }));
    app.update(Msg::Engine(Event::WorkerIdle { worker: 2 }));
    assert!(app.busy_workers().is_empty());
    app.update(Msg::Engine(Event::RunFinished {
        run_id: run,
        blueprint: "tech-digest".into(),
        status: RunStatus::Error,
        total_time_ms: 5000,
        error: Some("summarize[1] failed".into()),
    }));
    assert_eq!(app.in_flight(), 0);
    assert!(app.history.stale, "a finished run refreshes the history");
    let s = app
        .status
        .as_ref()
        .map(|s| format!("{} {}", s.text, s.keys.clone().unwrap_or_default()))
        .unwrap_or_default();
    assert!(s.contains("failed") && s.contains("r retry"), "{s}");
}

#[test]
fn a_step_waiting_for_the_rate_limit_shows_as_waiting_not_as_a_failure() {
    let mut app = fixtures::busy_app();
    let run = "0mwz00000live".to_string();
    app.update(Msg::Engine(Event::StepWaiting {
        run_id: run.clone(),
        step: "summarize[5]".into(),
        node: "summarize".into(),
        provider: "huggingface".into(),
        wait_ms: 12_000,
    }));
    let screen = render(&app, 160, 48);
    assert!(
        screen.contains("⧗ summarize[5] huggingface limit, 12.0s"),
        "{screen}"
    );
    assert!(screen.contains("1 retrying · 1 rate-limited"), "{screen}");
    // Its attempt starts: the countdown goes.
    app.update(Msg::Engine(Event::StepStarted {
        run_id: run,
        step: "summarize[5]".into(),
        node: "summarize".into(),
        attempt: 1,
    }));
    assert!(app.retrying.iter().all(|r| !r.waiting));

    // A big fan-out behind the limit is summed up in one line.
    for i in 0..5u64 {
        app.update(Msg::Engine(Event::StepWaiting {
            run_id: "0mwz00000live".into(),
            step: format!("summarize[{}]", 10 + i),
            node: "summarize".into(),
            provider: "huggingface".into(),
            wait_ms: 1000 * (i + 1),
        }));
    }
    let screen = render(&app, 160, 48);
    assert!(
        screen.contains(
            "⧗ 5 steps wait for huggingface's rate limit · next in 1.0s, last in 5.0s (no worker held)"
        ),
        "{screen}"
    );
    assert!(!screen.contains("⧗ summarize[12]"), "{screen}");
    assert!(screen.contains("5 rate-limited"), "{screen}");
}

fn process(
    id: &str,
    role: &str,
    pid: u32,
    alive: bool,
    stopped: bool,
) -> omniflow::store::ProcessRow {
    let at = |ms: u64| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    omniflow::store::ProcessRow {
        id: id.into(),
        host: Some("web1".into()),
        pid,
        role: role.into(),
        version: "0.1.0".into(),
        started_at: at(T0 - 3_600_000),
        heartbeat_at: at(if alive { T0 } else { T0 - 600_000 }),
        stopped_at: stopped.then(|| at(T0 - 600_000)),
        rss_mb: Some(41.0),
        memory_hold: false,
        paused: false,
        queued: 12,
        running: 3,
        completed: 100,
        failed: 2,
        concurrency: Some(32),
        alive,
    }
}

#[test]
fn the_header_says_who_fires_the_schedules() {
    let mut app = fixtures::busy_app();
    let s = render(&app, 80, 24);
    assert!(s.lines().next().unwrap().contains("schedules: off"), "{s}");
    // Nobody fires them: no countdown promising a run.
    let wide = render(&app, 160, 48);
    let row = wide.lines().find(|l| l.contains("tech-digest")).unwrap();
    assert!(
        row.contains(" 17 */6 * * *") && !row.contains(" in "),
        "{wide}"
    );
    app.schedules_here = true;
    let s = render(&app, 80, 24);
    assert!(
        s.lines()
            .next()
            .unwrap()
            .contains("schedules: this console"),
        "{s}"
    );
    let wide = render(&app, 160, 48);
    let row = wide.lines().find(|l| l.contains("tech-digest")).unwrap();
    assert!(row.contains(" in 2h16m"), "the countdown: {wide}");
    // A stopped daemon fires nothing.
    app.schedules_here = false;
    app.update(Msg::Bg(Bg::Processes(Ok(vec![process(
        "web1:9:1", "daemon", 9, false, true,
    )]))));
    assert!(render(&app, 80, 24).contains("schedules: off"));
}

#[test]
fn capital_p_lists_the_processes_on_the_database() {
    let mut app = fixtures::busy_app();
    let me = omniflow::store::process_id();
    app.update(Msg::Bg(Bg::Processes(Ok(vec![
        process("web1:9:1", "daemon", 9, true, false),
        process(me, "console", std::process::id(), true, false),
        process("web1:7:1", "run", 7, false, false),
        process("web1:5:1", "console", 5, false, true),
    ]))));
    let screen = render(&app, 160, 48);
    assert!(screen.contains("1 other process (P)"), "{screen}");
    // A live daemon fires the schedules, and the header says where it runs.
    assert!(screen.contains("schedules: daemon on web1"), "{screen}");
    assert!(
        render(&app, 80, 24).contains("schedules: daemon on web1"),
        "the header keeps who fires schedules at 80 columns"
    );
    ch(&mut app, 'P');
    assert!(matches!(app.overlay, Overlay::Processes(0)));
    let screen = render(&app, 160, 48);
    for needle in [
        "Processes on this database · 2 alive",
        "● daemon web1:9 up 1h00m, heartbeat 1s ago · 3/32 busy, 12 queued · 41 MB",
        "● (this console) console web1:",
        "✗ run web1:7 silent since 09:50:00 UTC (10m ago) — killed or crashed",
        "○ console web1:5 stopped at 09:50:00 UTC (10m ago)",
    ] {
        assert!(screen.contains(needle), "{needle:?} missing:\n{screen}");
    }
    // This console is listed first.
    let first = screen.find("this console").unwrap();
    assert!(first < screen.find("● daemon").unwrap(), "{screen}");
    ch(&mut app, 'x');
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn r_on_a_failed_run_offers_whole_or_failed_steps_only() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    ch(&mut app, 'j'); // row 1 is an error
    assert_eq!(
        app.history.selected_row().map(|r| r.status),
        Some(RunStatus::Error)
    );
    ch(&mut app, 'r');
    assert!(matches!(
        app.overlay,
        Overlay::Confirm(Confirm::Retry { .. })
    ));
    let fx = ch(&mut app, 'f');
    assert!(
        matches!(&fx[..], [Effect::Retry { only_failed: true, run_id }] if run_id == "0mwz00001abcd")
    );
    ch(&mut app, 'r');
    let fx = ch(&mut app, 'w');
    assert!(matches!(
        &fx[..],
        [Effect::Retry {
            only_failed: false,
            ..
        }]
    ));
    // A successful run is not retried.
    ch(&mut app, 'k');
    ch(&mut app, 'r');
    assert!(matches!(app.overlay, Overlay::None));
    assert!(app
        .status
        .as_ref()
        .is_some_and(|s| s.text.contains("only a failed")));
}

#[test]
fn a_run_announced_finished_is_retryable_before_the_history_is_read_again() {
    // The history query can land before the writer commits the run's end (the row still
    // says running); the RunFinished event updates that row at once, so `r` works on it.
    let mut app = fixtures::busy_app();
    let mut rows = fixtures::history_rows(3);
    rows[0].status = RunStatus::Running;
    rows[0].total_time_ms = None;
    rows[0].error = None;
    let id = rows[0].id.clone();
    let stale_rows = rows.clone();
    history_page(&mut app, rows);
    focus(&mut app, Focus::History);
    ch(&mut app, 'g');
    ch(&mut app, 'r');
    assert!(
        matches!(app.overlay, Overlay::None),
        "a running run is not retried"
    );
    app.update(Msg::Engine(Event::RunFinished {
        run_id: id.clone(),
        blueprint: "tech-digest".into(),
        status: RunStatus::Error,
        total_time_ms: 2500,
        error: Some("step summarize failed".into()),
    }));
    let row = app.history.selected_row().expect("the row");
    assert_eq!(row.id, id);
    assert_eq!(row.status, RunStatus::Error);
    assert_eq!(row.total_time_ms, Some(2500));
    // A query that was already running when the run finished lands now, still saying
    // `running`: the row keeps what the console saw happen.
    history_page(&mut app, stale_rows.clone());
    assert_eq!(
        app.history.selected_row().map(|r| r.status),
        Some(RunStatus::Error)
    );
    ch(&mut app, 'r');
    assert!(
        matches!(&app.overlay, Overlay::Confirm(Confirm::Retry { run_id, .. }) if *run_id == id),
        "{:?}",
        app.overlay
    );
    // Once the database agrees, the console forgets its note.
    let mut agreed = stale_rows;
    agreed[0].status = RunStatus::Error;
    history_page(&mut app, agreed);
    assert!(app.history.finished.is_empty());
}

#[test]
fn c_cancels_a_live_run_after_confirmation_and_refuses_others() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::Workers);
    ch(&mut app, 'c');
    assert!(
        matches!(&app.overlay, Overlay::Confirm(Confirm::Cancel { run_id, .. }) if run_id == "0mwz00000live")
    );
    let fx = ch(&mut app, 'y');
    assert!(matches!(&fx[..], [Effect::Cancel { run_id }] if run_id == "0mwz00000live"));
    // A run of another process (history row, not live) cannot be cancelled here.
    focus(&mut app, Focus::History);
    let mut row = fixtures::run_row(9, "triage", RunStatus::Running);
    row.id = "0otherproc00".into();
    history_page(&mut app, vec![row]);
    assert!(ch(&mut app, 'c').is_empty());
    assert!(matches!(app.overlay, Overlay::None));
    assert!(app
        .status
        .as_ref()
        .is_some_and(|s| s.error && s.text.contains("another process")));
}

#[test]
fn p_pauses_and_resumes_the_pool() {
    let mut app = fixtures::busy_app();
    assert!(matches!(ch(&mut app, 'p')[..], [Effect::SetPaused(true)]));
    assert!(app.pool.paused);
    assert!(matches!(ch(&mut app, 'p')[..], [Effect::SetPaused(false)]));
}

#[test]
fn plus_and_minus_change_a_live_runs_priority() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::Workers);
    let fx = ch(&mut app, '+');
    assert!(
        matches!(&fx[..], [Effect::SetPriority { priority, .. }] if *priority == omniflow::blueprint::Priority::High)
    );
    ch(&mut app, '-');
    let fx = ch(&mut app, '-');
    assert!(
        matches!(&fx[..], [Effect::SetPriority { priority, .. }] if *priority == omniflow::blueprint::Priority::Low)
    );
}

#[test]
fn history_filters_by_status_and_blueprint_and_pages_with_a_keyset_cursor() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    let fx = ch(&mut app, 's');
    assert!(
        matches!(&fx[..], [Effect::QueryHistory { filter, .. }] if filter.status == Some(RunStatus::Error))
    );
    let fx = ch(&mut app, 'b');
    assert!(
        matches!(&fx[..], [Effect::QueryHistory { filter, .. }] if filter.blueprint.as_deref() == Some("tech-digest"))
    );
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.history.status, None);
    assert_eq!(app.history.blueprint, None);
    // '/' types part of a blueprint name, applied on Enter.
    ch(&mut app, '/');
    typed(&mut app, "tri");
    let fx = key(&mut app, KeyCode::Enter);
    assert!(
        matches!(&fx[..], [Effect::QueryHistory { filter, .. }] if filter.name_contains.as_deref() == Some("tri") && filter.blueprint.is_none())
    );
    key(&mut app, KeyCode::Esc);

    history_page(&mut app, fixtures::history_rows(PAGE as u64));
    let last = app.history.rows[PAGE - 1].clone();
    let fx = key(&mut app, KeyCode::PageDown);
    match &fx[..] {
        [Effect::QueryHistory { filter, .. }] => assert_eq!(
            filter.before,
            omniflow::store::RunFilter::cursor_after(&last)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(app.history.page, 1);
    let fx = key(&mut app, KeyCode::PageUp);
    assert!(matches!(&fx[..], [Effect::QueryHistory { filter, .. }] if filter.before.is_none()));
    assert_eq!(app.history.page, 0);
}

#[test]
fn results_of_an_outdated_history_query_are_ignored() {
    let mut app = fixtures::busy_app();
    let old = app.history.generation;
    focus(&mut app, Focus::History);
    ch(&mut app, 's');
    app.update(Msg::Bg(Bg::History {
        generation: old,
        result: Ok((vec![], Some(0))),
    }));
    assert_eq!(app.history.rows.len(), 6, "stale result dropped");
    assert!(app.history.loading);
}

#[test]
fn the_history_refreshes_periodically_and_when_runs_change() {
    let mut app = fixtures::busy_app();
    // busy_app's events made the history stale: its tick queried.
    assert!(app.history.loading);
    history_page(&mut app, fixtures::history_rows(6));
    assert!(!app.history.loading);
    assert!(app.update(Msg::Tick(T0 + 1600)).is_empty());
    let fx = app.update(Msg::Tick(app.history.last_query_ms + 2000));
    assert!(matches!(&fx[..], [Effect::QueryHistory { .. }]));
}

#[test]
fn enter_opens_a_runs_detail_and_esc_goes_back() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    let fx = key(&mut app, KeyCode::Enter);
    let generation = match &fx[..] {
        [Effect::LoadDetail { generation, run_id }] => {
            assert_eq!(run_id, "0mwz00000abcd");
            *generation
        }
        other => panic!("{other:?}"),
    };
    app.update(Msg::Bg(Bg::Detail {
        generation,
        result: Ok(Box::new(fixtures::detail())),
    }));
    match &app.screen {
        Screen::Detail(d) => assert_eq!(d.data.as_ref().map(|x| x.steps.len()), Some(3)),
        Screen::Main => panic!("no detail"),
    }
    // It opens on the failed step; PgDn pages by the drawn pane (see the 80×24 test).
    render(&app, 80, 24);
    key(&mut app, KeyCode::PageDown);
    match &app.screen {
        Screen::Detail(d) => assert_eq!((d.selected, d.scroll > 0), (1, true)),
        Screen::Main => panic!("no detail"),
    }
    // The run keys act on the open run.
    ch(&mut app, 'r');
    assert!(matches!(
        app.overlay,
        Overlay::Confirm(Confirm::Retry { .. })
    ));
    key(&mut app, KeyCode::Esc);
    key(&mut app, KeyCode::Esc);
    assert!(matches!(app.screen, Screen::Main));
}

#[test]
fn log_keys_follow_filter_search_and_scroll() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::Logs);
    assert_eq!(app.logs.visible().len(), 3);
    ch(&mut app, 'v');
    ch(&mut app, 'v');
    assert_eq!(app.logs.level, LevelFilter::Warn);
    assert_eq!(app.logs.visible().len(), 1);
    ch(&mut app, 'v');
    ch(&mut app, 'v');
    assert_eq!(app.logs.level, LevelFilter::All);
    ch(&mut app, '/');
    typed(&mut app, "queued");
    assert_eq!(app.logs.visible().len(), 1);
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.logs.visible().len(), 3);
    ch(&mut app, 'f');
    assert!(!app.logs.follow);
    ch(&mut app, 'k');
    assert_eq!(app.logs.scroll, 1);
    // New lines while paused keep the view still.
    app.update(Msg::Bg(Bg::Logs(vec![LogEntry::from_line(
        "plain text line",
    )])));
    assert_eq!(app.logs.scroll, 2);
    ch(&mut app, 'f');
    assert!(app.logs.follow);
    // o: only the selected run's lines (from History).
    focus(&mut app, Focus::History);
    ch(&mut app, 'o');
    assert_eq!(app.logs.run_filter.as_deref(), Some("0mwz00000abcd"));
    ch(&mut app, 'o');
    assert_eq!(app.logs.run_filter, None);
}

/// Log lines of two runs: the detail fixture's run (`0mwz00001abcd`: summarize[0],
/// summarize[1] twice, digest, a node-level line and a run-level one) and another run's
/// summarize[1].
fn step_log_lines() -> Vec<LogEntry> {
    let line = |second: u32, level: &str, message: &str, run: &str, step: Option<&str>| {
        let step = step
            .map(|s| format!(r#","step":"{s}""#))
            .unwrap_or_default();
        LogEntry::from_line(&format!(
            r#"{{"timestamp":"2026-11-27T10:00:{second:02}.000000Z","level":"{level}","target":"omniflow::engine","message":"{message}","run_id":"{run}"{step}}}"#
        ))
    };
    let a = "0mwz00001abcd";
    let b = "0mwz00002abcd";
    vec![
        line(10, "INFO", "run started", a, None),
        line(11, "INFO", "step succeeded", a, Some("summarize[0]")),
        line(
            12,
            "WARN",
            "attempt failed, retrying",
            a,
            Some("summarize[1]"),
        ),
        line(
            13,
            "WARN",
            "attempt failed, retrying",
            b,
            Some("summarize[1]"),
        ),
        line(14, "WARN", "step did not succeed", a, Some("summarize[1]")),
        line(15, "INFO", "step skipped", a, Some("summarize")),
        line(16, "WARN", "step did not succeed", a, Some("digest")),
        line(17, "WARN", "run did not succeed", a, None),
    ]
}

fn visible_messages(app: &App) -> Vec<String> {
    app.logs
        .visible()
        .iter()
        .map(|l| format!("{} {}", l.message, l.step.as_deref().unwrap_or("-")))
        .collect()
}

fn status_text(app: &App) -> String {
    app.status
        .as_ref()
        .map(|s| s.text.clone())
        .unwrap_or_default()
}

#[test]
fn o_in_a_runs_detail_shows_only_the_selected_steps_log_lines() {
    let mut app = fixtures::busy_app();
    app.update(Msg::Bg(Bg::Logs(step_log_lines())));
    let every = app.logs.visible().len();
    assert_eq!(every, 3 + 8);
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    key(&mut app, KeyCode::Enter);
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(fixtures::detail())),
    }));
    // The second step, summarize[1], failed (the detail opens on it): o keeps its lines of
    // this run only — not the other run's summarize[1], not summarize[0], not the node-level
    // or run-level lines.
    ch(&mut app, 'o');
    assert_eq!(
        visible_messages(&app),
        [
            "attempt failed, retrying summarize[1]",
            "step did not succeed summarize[1]"
        ]
    );
    assert!(
        status_text(&app).starts_with("logs: only summarize[1] of run 0mwz00001a"),
        "{}",
        status_text(&app)
    );
    // Back on the main screen the Logs pane shows them and says why.
    key(&mut app, KeyCode::Esc);
    let s = render(&app, 80, 24);
    assert!(s.contains("summarize[1] of run 0mwz00001a"), "{s}");
    assert!(s.contains("step did not succeed"), "{s}");
    assert!(!s.contains("run started"), "{s}");
    insta::assert_snapshot!("logs_step_filter_80x24", s);
    let wide = render(&app, 160, 48);
    assert!(
        wide.contains("following · level all · summarize[1] of run 0mwz00001a"),
        "{wide}"
    );

    // Another step of the same run: o moves the filter to it.
    focus(&mut app, Focus::History);
    key(&mut app, KeyCode::Enter);
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(fixtures::detail())),
    }));
    key(&mut app, KeyCode::End);
    ch(&mut app, 'o');
    assert_eq!(visible_messages(&app), ["step did not succeed digest"]);
    assert!(status_text(&app).starts_with("logs: only digest of run 0mwz00001a"));
    // o again on the same step: every line.
    ch(&mut app, 'o');
    assert_eq!(app.logs.visible().len(), every);
    assert_eq!(status_text(&app), "logs: every run");
    assert_eq!(
        (&app.logs.run_filter, &app.logs.step_filter),
        (&None, &None)
    );
    // The help says so, and that the match is exact.
    ch(&mut app, '?');
    let mut s = String::new();
    for _ in 0..60 {
        s.push_str(&render(&app, 80, 24));
        ch(&mut app, 'j');
    }
    assert!(s.contains("║run detail"), "{s}");
    assert!(s.contains("exactly that step: summarize[1], not"), "{s}");
}

#[test]
fn esc_in_the_logs_pane_clears_a_step_filter() {
    let mut app = fixtures::busy_app();
    app.update(Msg::Bg(Bg::Logs(step_log_lines())));
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    key(&mut app, KeyCode::Enter);
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(fixtures::detail())),
    }));
    ch(&mut app, 'g');
    ch(&mut app, 'o');
    assert_eq!(visible_messages(&app), ["step succeeded summarize[0]"]);
    key(&mut app, KeyCode::Esc);
    // On the main screen o clears it, like the run filter.
    ch(&mut app, 'o');
    assert_eq!(app.logs.visible().len(), 3 + 8);
    // And Esc in the Logs pane clears a step filter with the rest.
    focus(&mut app, Focus::History);
    key(&mut app, KeyCode::Enter);
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(fixtures::detail())),
    }));
    ch(&mut app, 'o');
    key(&mut app, KeyCode::Esc);
    focus(&mut app, Focus::Logs);
    // The failed step summarize[1] (where the detail opened): its two lines.
    assert_eq!(app.logs.visible().len(), 2);
    key(&mut app, KeyCode::Esc);
    assert_eq!(app.logs.visible().len(), 3 + 8);
    let s = render(&app, 80, 24);
    let title = s.lines().find(|l| l.contains(" Logs ")).unwrap_or_default();
    assert!(title.contains("following · level all ┓"), "{s}");
}

#[test]
fn capital_t_cycles_the_themes() {
    let mut app = fixtures::app();
    ch(&mut app, 'T');
    assert_eq!(app.theme.name, "light");
    ch(&mut app, 'T');
    assert_eq!(app.theme.name, "high-contrast");
    ch(&mut app, 'T');
    assert_eq!(app.theme.name, "dark");
}

#[test]
fn e_edits_a_blueprint_and_saves_only_a_valid_one() {
    let mut app = fixtures::busy_app();
    let fx = ch(&mut app, 'e');
    let path = match &fx[..] {
        [Effect::ReadFile(p)] => p.clone(),
        other => panic!("{other:?}"),
    };
    app.update(Msg::Bg(Bg::EditorText {
        path: path.clone(),
        result: Ok(
            "{\"name\": \"tech-digest\", \"nodes\": [{\"id\": \"a\", \"type\": \"transform\", \"template\": \"x\"}]}\n"
                .into(),
        ),
    }));
    // Make it invalid: a syntax error at the end.
    key(&mut app, KeyCode::End);
    typed(&mut app, "oops");
    let fx = ctrl(&mut app, 's');
    assert!(fx.is_empty(), "an invalid blueprint is not written");
    match &app.overlay {
        Overlay::Editor(ed) => {
            assert!(!ed.problems.is_empty());
            assert!(ed.modified());
        }
        other => panic!("{other:?}"),
    }
    for _ in 0..4 {
        key(&mut app, KeyCode::Backspace);
    }
    let fx = ctrl(&mut app, 's');
    assert!(matches!(&fx[..], [Effect::SaveFile { path: p, .. }] if *p == path));
    let fx = app.update(Msg::Bg(Bg::Saved {
        path: path.clone(),
        result: Ok(Some("blueprints/tech-digest.json.bak".into())),
    }));
    assert!(
        matches!(fx[..], [Effect::LoadBlueprints]),
        "reloaded after the write"
    );
    match &app.overlay {
        Overlay::Editor(ed) => assert!(!ed.modified()),
        other => panic!("{other:?}"),
    }
    key(&mut app, KeyCode::Esc);
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn esc_with_unsaved_edits_warns_once_then_discards() {
    let mut app = fixtures::busy_app();
    ch(&mut app, 'e');
    app.update(Msg::Bg(Bg::EditorText {
        path: "blueprints/tech-digest.json".into(),
        result: Ok("{}".into()),
    }));
    ch(&mut app, 'x');
    key(&mut app, KeyCode::Esc);
    assert!(matches!(app.overlay, Overlay::Editor(_)));
    key(&mut app, KeyCode::Esc);
    assert!(matches!(app.overlay, Overlay::None));
}

#[test]
fn capital_r_reloads_the_blueprints() {
    let mut app = fixtures::busy_app();
    assert!(matches!(ch(&mut app, 'R')[..], [Effect::LoadBlueprints]));
}

#[test]
fn samples_update_memory_and_workers_and_redraw_only_on_change() {
    let mut app = fixtures::busy_app();
    let stats = app.pool.clone();
    app.dirty = false;
    app.update(Msg::Bg(Bg::Sample {
        rss: Some(120 << 20),
        stats: stats.clone(),
        workers: vec![],
    }));
    assert!(!app.dirty, "an unchanged sample causes no redraw");
    app.update(Msg::Bg(Bg::Sample {
        rss: Some(600 << 20),
        stats,
        workers: vec![],
    }));
    assert!(app.dirty);
}

/// A busy worker's model call shows the tokens it has streamed so far, live, where its row
/// has room whole (after the blueprint at 160 columns; at 80 the step keeps the room). The
/// pool's next sample of the same job keeps the count; the worker's next job starts at none.
#[test]
fn a_streaming_call_shows_its_tokens_on_its_worker() {
    let mut app = fixtures::busy_app();
    let (w0, w2) = {
        let busy = app.busy_workers();
        (busy[0].1.clone(), busy[1].1.clone())
    };
    let line_of = |screen: &str, step: &str| -> String {
        screen
            .lines()
            .find(|l| l.contains(&format!("▶ {step} ")))
            .unwrap_or_else(|| panic!("no worker line for {step}:\n{screen}"))
            .to_string()
    };
    app.dirty = false;
    app.update(Msg::Engine(Event::Tokens {
        run_id: w0.run_id.clone(),
        step: w0.step.clone(),
        tokens: 312,
    }));
    assert!(app.dirty, "a new count is drawn");
    let wide = render(&app, 160, 48);
    let line = line_of(&wide, &w0.step);
    assert!(
        line.contains("tech-digest") && line.contains("312 tok"),
        "{line}"
    );
    assert!(!line_of(&wide, &w2.step).contains("tok"), "{wide}");
    let narrow = render(&app, 80, 24);
    assert!(!line_of(&narrow, &w0.step).contains("tok"), "{narrow}");

    // Another step's tokens, or the same count again, change nothing.
    app.dirty = false;
    for (step, tokens) in [("summarize[9]", 5), (w0.step.as_str(), 312)] {
        app.update(Msg::Engine(Event::Tokens {
            run_id: w0.run_id.clone(),
            step: step.into(),
            tokens,
        }));
    }
    assert!(!app.dirty);
    assert_eq!(app.busy_workers()[1].1.tokens, 0);

    let job = |s: &omniflow::tui::state::WorkerSlot| omniflow::pool::WorkerJob {
        run_id: s.run_id.clone(),
        step: s.step.clone(),
        attempt: s.attempt,
        priority: omniflow::blueprint::Priority::Normal,
        since: std::time::UNIX_EPOCH + std::time::Duration::from_millis(s.since_ms),
    };
    let (rss, stats) = (app.memory.rss, app.pool.clone());
    let sample = |w0: omniflow::pool::WorkerJob, w2: &omniflow::tui::state::WorkerSlot| {
        Msg::Bg(Bg::Sample {
            rss,
            stats: stats.clone(),
            workers: vec![
                omniflow::pool::WorkerState {
                    id: 0,
                    job: Some(w0),
                },
                omniflow::pool::WorkerState {
                    id: 2,
                    job: Some(job(w2)),
                },
            ],
        })
    };
    let same = sample(job(&w0), &w2);
    app.update(same);
    assert_eq!(app.busy_workers()[0].1.tokens, 312, "the same job goes on");
    let mut next = job(&w0);
    next.attempt += 1;
    let next = sample(next, &w2);
    app.update(next);
    assert_eq!(app.busy_workers()[0].1.tokens, 0, "a new attempt");
    assert!(!line_of(&render(&app, 160, 48), &w0.step).contains("tok"));
}

/// A full disk and logs that stop being written are what the console's user must see: the
/// header says the pool holds and where to free space (from the pool's sample), and a log
/// write that failed after start stays on the status line.
#[test]
fn a_full_disk_and_failing_logs_are_on_screen() {
    let mut app = fixtures::busy_app();
    let mut stats = app.pool.clone();
    stats.disk_full = Some("/var/lib/omniflow".into());
    app.update(Msg::Bg(Bg::Sample {
        rss: Some(120 << 20),
        stats,
        workers: vec![],
    }));
    let screen = render(&app, 120, 30);
    assert!(
        screen
            .lines()
            .next()
            .unwrap()
            .contains("HOLDING (disk full: free space at /var/lib/omniflow)"),
        "{screen}"
    );
    app.update(Msg::Bg(Bg::LogWriteFailed(
        "logs: could not write to ./logs: No space left on device".into(),
    )));
    let screen = render(&app, 120, 30);
    assert!(
        screen.contains("could not write to ./logs: No space left on device"),
        "{screen}"
    );
}

// ---- rendering ---------------------------------------------------------------------------

fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
    t.draw(|f| ui::draw(f, app)).expect("draw");
    format!("{}", t.backend())
}

#[test]
fn snapshot_empty_console() {
    let mut app = fixtures::app();
    let _ = app.start();
    app.update(Msg::Bg(Bg::Blueprints(Ok(vec![]))));
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((vec![], Some(0))),
    }));
    let s = render(&app, 80, 24);
    assert!(
        s.contains("no blueprints in") && s.contains("see README"),
        "{s}"
    );
    assert!(
        s.contains("no runs yet in ./automation_runner.db"),
        "the database it read:\n{s}"
    );
    insta::assert_snapshot!("empty_80x24", s);
}

#[test]
fn snapshot_busy_console() {
    let app = fixtures::busy_app();
    insta::assert_snapshot!("busy_80x24", render(&app, 80, 24));
    insta::assert_snapshot!("busy_160x48", render(&app, 160, 48));
}

#[test]
fn snapshot_run_detail() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    key(&mut app, KeyCode::Enter);
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(fixtures::detail())),
    }));
    insta::assert_snapshot!("detail_80x24", render(&app, 80, 24));
    insta::assert_snapshot!("detail_160x48", render(&app, 160, 48));
}

#[test]
fn a_long_run_detail_shows_the_rows_around_the_selection_in_order() {
    // 2,000 steps: the table shows a screenful that keeps the selection on screen, scrolled as
    // little as possible, the rows in graph order.
    let mut detail = fixtures::detail();
    let template = detail.steps[0].clone();
    detail.steps = (0..2000)
        .map(|i| {
            let mut s = template.clone();
            s.step_key = format!("each[{i}]");
            s.node_id = "each".into();
            s.item_index = Some(i);
            s
        })
        .collect();
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    key(&mut app, KeyCode::Enter);
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(detail)),
    }));
    let select = |app: &mut App, i: usize| {
        if let omniflow::tui::app::Screen::Detail(d) = &mut app.screen {
            d.selected = i;
        }
    };
    // The table's rows on screen (a key followed by its status), top to bottom, and the one
    // marked selected; the selected step's own pane names it too, without a status after it.
    let shown = |screen: &str| -> (Vec<u32>, Option<u32>) {
        let mut keys = Vec::new();
        let mut marked = None;
        for line in screen.lines() {
            let Some(at) = line.find("each[") else {
                continue;
            };
            let rest = &line[at + 5..];
            let cell = rest.split('│').next().unwrap_or_default();
            let Some(n) = rest.split(']').next().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if !cell.contains("success") {
                continue;
            }
            if line[..at].contains('▸') {
                marked = Some(n);
            }
            keys.push(n);
        }
        (keys, marked)
    };
    for (pick, w, h) in [
        (0, 160, 48),
        (1500, 160, 48),
        (1999, 160, 48),
        (1234, 80, 24),
    ] {
        select(&mut app, pick);
        let screen = render(&app, w, h);
        let (rows, marked) = shown(&screen);
        assert_eq!(
            marked,
            Some(pick as u32),
            "{w}x{h}, selected {pick}:\n{screen}"
        );
        assert!(rows.len() >= 3, "{w}x{h}: a screenful of rows:\n{screen}");
        assert!(
            rows.windows(2).all(|p| p[1] == p[0] + 1),
            "{w}x{h}: contiguous, in order: {rows:?}"
        );
        if pick > 100 {
            assert_eq!(
                rows.last(),
                Some(&(pick as u32)),
                "{w}x{h}: past the first screen, the selection is the last row:\n{screen}"
            );
        } else {
            assert_eq!(rows.first(), Some(&0), "{w}x{h}: the top when near it");
        }
    }
}

#[test]
fn snapshot_overlays() {
    let mut app = fixtures::busy_app();
    ch(&mut app, '?');
    insta::assert_snapshot!("help_160x48", render(&app, 160, 48));
    insta::assert_snapshot!("help_80x24", render(&app, 80, 24));
    key(&mut app, KeyCode::Esc);
    ch(&mut app, 't');
    insta::assert_snapshot!("sandbox_80x24", render(&app, 80, 24));
    key(&mut app, KeyCode::Esc);
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    ch(&mut app, 'r');
    insta::assert_snapshot!("retry_80x24", render(&app, 80, 24));
}

#[test]
fn the_help_scrolls_to_its_last_key_with_long_lines_wrapped_under_their_text() {
    let mut app = fixtures::busy_app();
    ch(&mut app, '?');
    for _ in 0..200 {
        ch(&mut app, 'j');
    }
    let s = render(&app, 80, 24);
    let groups = bindings::help_groups();
    let last = groups.last().and_then(|(_, ks)| ks.last()).expect("a key");
    let start: String = last.1.chars().take(30).collect();
    assert!(s.contains(&start), "the last key is reachable:\n{s}");
    // A wrapped description continues in its own column, not under the keys.
    let pgdn = s
        .lines()
        .position(|l| l.contains("scroll the step's text down a page (the pane's"))
        .unwrap_or_else(|| panic!("PgDn in the help:\n{s}"));
    let cont = s.lines().nth(pgdn + 1).unwrap_or_default();
    assert!(cont.contains("║                         height)"), "{s}");
}

#[test]
fn problems_show_in_their_panes() {
    let mut app = fixtures::app();
    let _ = app.start();
    app.update(Msg::Bg(Bg::Blueprints(Err(
        "cannot read nowhere: No such file or directory (os error 2) — start omniflow where blueprints/ is, or pass --dir".into(),
    ))));
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Err(
            "cannot open the history database /nope/h.db: unable to open database file".into(),
        ),
    }));
    app.update(Msg::Bg(Bg::LogProblem(Some(
        "LOG_DIR /nope/logs does not exist or is not a directory: no logs to show".into(),
    ))));
    app.update(Msg::Bg(Bg::Blueprints(Ok(fixtures::entries()))));
    ch(&mut app, 'G');
    let s = render(&app, 80, 24);
    assert!(s.contains("history unavailable"), "{s}");
    assert!(s.contains("LOG_DIR /nope/logs"), "{s}");
    assert!(s.contains("unknown"), "{s}");
    insta::assert_snapshot!("problems_80x24", s);
}

#[test]
fn a_too_small_terminal_says_so() {
    let app = fixtures::busy_app();
    let s = render(&app, 50, 12);
    assert!(s.contains("Terminal too small: 50×12"), "{s}");
}

#[test]
fn every_fixed_key_is_in_the_help() {
    let keys: Vec<String> = bindings::help_groups()
        .into_iter()
        .flat_map(|(_, ks)| ks.into_iter().map(|(k, _)| k))
        .collect();
    for k in [
        "?",
        "q",
        "Esc",
        "Tab",
        "Shift-Tab",
        "↑",
        "↓",
        "k",
        "j",
        "Enter",
        "/",
        "t",
        "r",
        "c",
        "p",
    ] {
        assert!(
            keys.iter().any(|h| h.split(" / ").any(|x| x == k)),
            "{k} missing from help: {keys:?}"
        );
    }
}

/// The hint bar and the key handling read one table: in every place, each hint's key does
/// the thing the hint names (no earlier binding of the same key shadows it).
#[test]
fn every_hint_names_the_key_that_does_it() {
    for detail in [false, true] {
        for focus in Focus::ORDER {
            for action in bindings::hint_actions(detail, focus) {
                let b = bindings::binding_of(*action, detail, focus)
                    .unwrap_or_else(|| panic!("{action:?} has no binding in {focus:?}"));
                assert!(b.hint.is_some(), "{action:?} has no hint label");
                for code in b.keys {
                    let k = KeyEvent::new(*code, KeyModifiers::NONE);
                    assert_eq!(
                        bindings::action_of(&k, detail, focus),
                        Some(*action),
                        "{code:?} in {focus:?} (detail {detail})"
                    );
                }
            }
        }
    }
}

/// Each dialog's hint names its own keys, and no dialog acts on Enter: the default neither
/// destroys work nor writes files.
#[test]
fn dialogs_list_their_own_keys_and_enter_does_nothing() {
    let mut app = fixtures::busy_app();
    type Opener = fn(&mut App);
    let open: [(&str, Opener); 4] = [
        ("Quit?", |a| {
            ch(a, 'q');
        }),
        ("Run?", |a| {
            focus(a, Focus::Blueprints);
            key(a, KeyCode::Enter);
        }),
        ("Export as code", |a| {
            focus(a, Focus::Blueprints);
            ch(a, 'X');
        }),
        ("Retry run", |a| {
            focus(a, Focus::History);
            ch(a, 'j');
            ch(a, 'r');
        }),
    ];
    for (title, opener) in open {
        opener(&mut app);
        let s = render(&app, 80, 24);
        assert!(s.contains(title), "{title}:\n{s}");
        let Overlay::Confirm(c) = &app.overlay else {
            panic!("{title}: no dialog")
        };
        let hint = s.lines().last().unwrap().to_string();
        for (code, what, _) in bindings::confirm_keys(c) {
            let k = bindings::key_name(code);
            assert!(
                s.contains(&format!("{k} {what}")),
                "{title}: the dialog names {k} {what}:\n{s}"
            );
            if *code == KeyCode::Esc {
                assert!(
                    hint.contains("Esc"),
                    "{title}: the hint bar keeps Esc: {hint}"
                );
            }
        }
        assert!(!hint.contains("y/n"), "{hint}");
        assert!(
            key(&mut app, KeyCode::Enter).is_empty(),
            "{title}: Enter acts"
        );
        assert!(!app.quit);
        assert!(
            matches!(app.overlay, Overlay::Confirm(_)),
            "{title}: Enter leaves the question open"
        );
        // `n` and `q` only ever close a dialog (no export target behind `n`).
        assert!(ch(&mut app, 'n').is_empty(), "{title}: n acts");
        assert!(matches!(app.overlay, Overlay::None));
    }
    // The quit dialog's hand-over is a key of its own; nothing defaults to cancelling.
    ch(&mut app, 'q');
    assert!(ch(&mut app, 'y').is_empty());
    assert!(matches!(ch(&mut app, 'h')[..], [Effect::Quit]));
    assert_eq!(app.quit_mode, omniflow::tui::app::QuitMode::HandOver);
    let mut app = fixtures::busy_app();
    ch(&mut app, 'q');
    insta::assert_snapshot!("quit_80x24", render(&app, 80, 24));
}

/// The editor's hint says Ctrl-Z undoes and Ctrl-Y redoes: it does.
#[test]
fn the_editor_undoes_with_ctrl_z_and_redoes_with_ctrl_y() {
    let mut app = fixtures::busy_app();
    ch(&mut app, 'e');
    app.update(Msg::Bg(Bg::EditorText {
        path: "blueprints/tech-digest.json".into(),
        result: Ok("{}".into()),
    }));
    let text = |app: &App| match &app.overlay {
        Overlay::Editor(ed) => ed.text.as_ref().unwrap().lines().join("\n"),
        _ => panic!("editor closed"),
    };
    typed(&mut app, "ab");
    assert_eq!(text(&app), "ab{}");
    ctrl(&mut app, 'z');
    assert_ne!(text(&app), "ab{}", "Ctrl-Z undoes");
    ctrl(&mut app, 'y');
    assert_eq!(text(&app), "ab{}", "Ctrl-Y redoes");
    let s = render(&app, 80, 24);
    assert!(
        s.contains("Ctrl-Z undo") && s.contains("Ctrl-Y redo"),
        "{s}"
    );
}

#[test]
fn an_open_run_in_flight_is_re_read_until_it_ends() {
    let mut app = fixtures::busy_app();
    app.open_detail("0mwz00000abcd".into(), &mut Vec::new());
    let mut d = fixtures::detail();
    d.run.status = RunStatus::Running;
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(d)),
    }));
    let fx = app.update(Msg::Tick(app.now_ms + 2500));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::LoadDetail { generation: 2, .. })),
        "{fx:?}"
    );
    // A lifecycle event of the open run also triggers a reload on the next tick.
    app.update(Msg::Bg(Bg::Detail {
        generation: 2,
        result: Ok(Box::new(fixtures::detail())),
    }));
    app.update(Msg::Engine(Event::StepStarted {
        run_id: "0mwz00000abcd".into(),
        step: "digest".into(),
        node: "digest".into(),
        attempt: 1,
    }));
    let fx = app.update(Msg::Tick(app.now_ms + 300));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::LoadDetail { generation: 3, .. })),
        "{fx:?}"
    );
}

// ---- background work ---------------------------------------------------------------------

#[path = "common/mod.rs"]
mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_only_failed_steps_reuses_the_recorded_outputs() {
    let env = common::engine(&[], 4);
    let bp = common::blueprint(serde_json::json!({
        "name": "two-steps",
        "variables": { "WHO": "the default" },
        "nodes": [
            { "id": "a", "type": "transform", "template": "from a" },
            { "id": "b", "type": "llm", "needs": ["a"], "prompt": "{{ nodes.a.output }}",
              "retry": { "attempts": 1 } }
        ]
    }));
    let mut first = common::sandbox(1.0, 1);
    first
        .variables
        .insert("WHO".into(), serde_json::json!("given at the start"));
    let failed = common::run(&env, &bp, first).await;
    assert_eq!(failed.status, RunStatus::Error);
    let store = env.store.clone();
    let id = failed.run_id.clone();
    let (plan_bp, mut req) =
        tokio::task::spawn_blocking(move || omniflow::engine::retry_plan(&store, &id, true))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(plan_bp.name, "two-steps");
    assert_eq!(req.trigger, omniflow::engine::Trigger::Retry);
    assert_eq!(req.parent_run_id.as_deref(), Some(failed.run_id.as_str()));
    assert_eq!(
        req.reuse.keys().collect::<Vec<_>>(),
        ["a"],
        "only the successful step is reused"
    );
    assert_eq!(req.reuse["a"], serde_json::json!("from a"));
    // The retry runs as the run did: its variables as given, in the sandbox.
    assert_eq!(
        req.variables["WHO"],
        serde_json::json!("given at the start")
    );
    assert!(req.sandbox);
    // The retry succeeds once the model stops failing; step a is not run again.
    req.simulate_failures = 0.0;
    let retried = env.engine.start(plan_bp, req).unwrap().wait().await;
    assert_eq!(retried.status, RunStatus::Success);
    // A whole retry reuses nothing; a successful run is not retried.
    let store = env.store.clone();
    let (id, ok_id) = (failed.run_id.clone(), retried.run_id.clone());
    let (whole, refused) = tokio::task::spawn_blocking(move || {
        (
            omniflow::engine::retry_plan(&store, &id, false),
            omniflow::engine::retry_plan(&store, &ok_id, false),
        )
    })
    .await
    .unwrap();
    assert!(whole.unwrap().1.reuse.is_empty());
    assert!(refused
        .unwrap_err()
        .contains("only a failed or cancelled run"));
}

#[test]
fn the_log_tailer_follows_new_lines_and_reports_a_missing_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut tail = omniflow::tui::runtime::Tail::default();
    let missing = dir.path().join("nope");
    assert!(tail.poll(&missing).unwrap_err().contains("does not exist"));
    assert!(tail.poll(dir.path()).unwrap().is_empty());
    let file = dir.path().join("omniflow.log.2026-11-27");
    std::fs::write(
        &file,
        "{\"timestamp\":\"2026-11-27T10:00:01.000000Z\",\"level\":\"INFO\",\"target\":\"t\",\"message\":\"one\",\"run_id\":\"r1\"}\n{\"timestamp\":\"2026-11-27T10:00:02.000000Z\",\"level\":\"WARN\",\"target\":\"t\",\"message\":\"half",
    )
    .unwrap();
    let got = tail.poll(dir.path()).unwrap();
    assert_eq!(got.len(), 1, "a partial line waits for its end");
    assert_eq!(got[0].message, "one");
    assert_eq!(got[0].run_id.as_deref(), Some("r1"));
    assert_eq!(got[0].time, "10:00:01");
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    writeln!(f, "\"}}").unwrap();
    let got = tail.poll(dir.path()).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].level.as_str(), got[0].message.as_str()),
        ("WARN", "half")
    );
    // A newer day's file is followed from its start.
    std::fs::write(dir.path().join("omniflow.log.2026-11-28"), "not json\n").unwrap();
    let got = tail.poll(dir.path()).unwrap();
    assert_eq!(got[0].level, "RAW");
}

#[test]
fn saving_keeps_a_backup_of_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.json");
    std::fs::write(&p, "old").unwrap();
    let bak = omniflow::tui::runtime::save_with_backup(&p, "new")
        .unwrap()
        .expect("a backup");
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
    assert_eq!(std::fs::read_to_string(&bak).unwrap(), "old");
    // Saving the same text again writes nothing and leaves the backup as it was.
    std::fs::remove_file(&bak).unwrap();
    assert_eq!(
        omniflow::tui::runtime::save_with_backup(&p, "new").unwrap(),
        None
    );
    assert!(
        !std::path::Path::new(&bak).exists(),
        "no .bak for an unchanged file"
    );
}

#[test]
fn blueprints_load_with_their_problems() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"name": "bad", "nodes": [{"id": "a", "type": "llm"}]}"#,
    )
    .unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/blueprints/triage.toml"),
        dir.path().join("triage.toml"),
    )
    .unwrap();
    let list = omniflow::tui::runtime::load_blueprints(
        dir.path(),
        omniflow::limits::DEFAULT_MAX_BLUEPRINT_BYTES,
    )
    .unwrap();
    assert_eq!(list.len(), 2);
    assert!(!list[0].is_valid());
    assert!(!list[0].problems.is_empty());
    assert!(list[1].is_valid());
    let e = omniflow::tui::runtime::load_blueprints(
        &dir.path().join("none"),
        omniflow::limits::DEFAULT_MAX_BLUEPRINT_BYTES,
    )
    .unwrap_err();
    assert!(e.contains("pass --dir"), "{e}");
}

/// With no model provider configured, the run question says so and how to fix it, and
/// offers the sandbox test; a run that fails at once says so on the status line, and the
/// late "queued" does not replace that.
#[test]
fn running_without_a_provider_says_so_first_and_a_failed_run_says_why() {
    let mut app = fixtures::busy_app();
    app.no_provider = Some("set HUGGINGFACE_TOKEN in .env.".into());
    key(&mut app, KeyCode::Enter);
    let s = render(&app, 80, 24);
    assert!(s.contains("No model provider is configured"), "{s}");
    assert!(s.contains("HUGGINGFACE_TOKEN"), "{s}");
    assert!(s.contains("t sandbox test instead"), "{s}");
    insta::assert_snapshot!("no_provider_80x24", s);
    // t: the sandbox form instead, nothing started.
    assert!(ch(&mut app, 't').is_empty());
    assert!(matches!(app.overlay, Overlay::Sandbox(_)));
    key(&mut app, KeyCode::Esc);

    // y anyway: the run fails in 0 ms; the engine's end arrives before the start's answer.
    key(&mut app, KeyCode::Enter);
    assert!(matches!(ch(&mut app, 'y')[..], [Effect::Start { .. }]));
    let id = "0mwz0000zzzzz".to_string();
    app.update(Msg::Engine(Event::RunQueued {
        run_id: id.clone(),
        blueprint: "tech-digest".into(),
        priority: omniflow::blueprint::Priority::Normal,
        sandbox: false,
    }));
    app.update(Msg::Engine(Event::RunFinished {
        run_id: id.clone(),
        blueprint: "tech-digest".into(),
        status: RunStatus::Error,
        total_time_ms: 0,
        error: Some("summarize[0]: no model provider is configured: set HUGGINGFACE_TOKEN".into()),
    }));
    app.update(Msg::Bg(Bg::Started {
        run_id: id,
        what: "tech-digest".into(),
    }));
    let line = status_text(&app);
    assert!(
        line.contains("failed after 0ms") && line.contains("no model provider is configured"),
        "{line}"
    );
}

/// The sandbox form opens with the first variable in view, Ctrl-K clears a field, and the
/// failure rate last used for a blueprint is kept for the session.
#[test]
fn the_sandbox_form_starts_at_the_first_variable_clears_and_keeps_the_rate() {
    let mut app = fixtures::busy_app();
    ch(&mut app, 't');
    let Overlay::Sandbox(form) = &app.overlay else {
        panic!("no form")
    };
    assert_eq!(form.vars.cursor(), (0, 0), "opens at the start");
    ctrl(&mut app, 'k');
    let Overlay::Sandbox(form) = &app.overlay else {
        panic!("no form")
    };
    assert_eq!(form.vars.lines(), [""], "Ctrl-K cleared the variables");
    key(&mut app, KeyCode::Tab);
    ctrl(&mut app, 'k');
    typed(&mut app, "55");
    match &ctrl(&mut app, 's')[..] {
        [Effect::Start { request, .. }] => {
            assert!(request.variables.is_empty());
            assert!((request.simulate_failures - 0.55).abs() < 1e-9);
        }
        other => panic!("{other:?}"),
    }
    ch(&mut app, 't');
    let Overlay::Sandbox(form) = &app.overlay else {
        panic!("no form")
    };
    assert_eq!(form.rate.lines(), ["55"], "the last rate is kept");
    let s = render(&app, 80, 24);
    assert!(s.contains("TOPICS="), "{s}");
    assert!(s.contains("Ctrl-K clear field"), "{s}");
}

/// One source per figure: the header's busy count is the Workers pane's, and a retry that is
/// due (back in the queue, counted there) leaves the countdowns instead of showing `0ms`.
#[test]
fn header_and_workers_agree_and_due_retries_leave_the_countdowns() {
    let mut app = fixtures::busy_app();
    // The pool's own counter says 1 while the workers list 2: the frame shows one number.
    app.pool.running = 1;
    let s = render(&app, 80, 24);
    let busy = app.busy_workers().len();
    assert!(
        s.lines()
            .next()
            .unwrap()
            .contains(&format!("{busy}/4 busy")),
        "{s}"
    );
    assert!(s.contains(&format!("{busy}/4 busy · 1 retrying")), "{s}");
    // Paused: the retry falls due and goes back to the queue.
    ch(&mut app, 'p');
    app.update(Msg::Tick(app.now_ms + 10_000));
    let s = render(&app, 80, 24);
    assert!(!s.contains("retry in 0ms"), "{s}");
    assert!(!s.contains("· 1 retrying") && !s.contains("↻"), "{s}");
}

/// Run detail at 80×24: it opens on the first failed step, the run's whole error is on
/// screen (wrapped), PgDn moves by the step pane's height (one line kept for context) and
/// reaches the end, so every attempt can be read; the footer keeps `Esc back`.
#[test]
fn run_detail_at_80x24_opens_on_the_failure_and_pages_by_the_pane() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    key(&mut app, KeyCode::Enter);
    let mut d = fixtures::detail();
    // Forty steps, the failure far down the list.
    let template = d.steps[0].clone();
    let mut steps = Vec::new();
    for i in 0..40 {
        let mut s = template.clone();
        s.step_key = format!("summarize[{i}]");
        steps.push(s);
    }
    let mut failed = d.steps[1].clone();
    failed.step_key = "summarize[1]".into();
    steps[27] = failed;
    d.steps = steps;
    let long =
        "summarize[1]: rate limit reached (simulated 429; the provider asks for a 2s wait); \
                a local model has no limit: USE_OLLAMA=true (gave up after 4 attempts)";
    d.run.error = Some(long.into());
    let prompt: String = (0..30)
        .map(|i| format!("line {i} of the prompt\n"))
        .collect();
    d.steps[27].input = Some(serde_json::json!(prompt));
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(d)),
    }));
    let Screen::Detail(det) = &app.screen else {
        panic!()
    };
    assert_eq!(det.selected, 27, "opens on the failed step");
    let s = render(&app, 80, 24);
    let flat: String = s
        .lines()
        .map(|l| l.trim_matches('"').trim_matches('│').trim())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        flat.contains("(gave up after 4 attempts)"),
        "the whole error:\n{s}"
    );
    assert!(s.lines().last().unwrap().contains("Esc back"), "{s}");
    insta::assert_snapshot!("detail_failed_80x24", s);

    // Page through the step's text: consecutive pages overlap by one line, and the last
    // page shows the end.
    let pane = |s: &str| -> Vec<String> {
        let lines: Vec<&str> = s.lines().collect();
        let top = lines
            .iter()
            .position(|l| l.contains("┌ summarize[1] "))
            .expect("the step pane");
        lines[top + 1..]
            .iter()
            .take_while(|l| !l.contains("└"))
            .map(|l| l.to_string())
            .collect()
    };
    let mut page = pane(&s);
    let rows = page.len();
    assert!(rows >= 3, "{s}");
    let mut seen = page.clone();
    for _ in 0..20 {
        key(&mut app, KeyCode::PageDown);
        let next = pane(&render(&app, 80, 24));
        if next == page {
            break;
        }
        assert_eq!(next[0], page[rows - 1], "one line of context between pages");
        seen.extend(next.iter().cloned());
        page = next;
    }
    let all = seen.join("\n");
    assert!(
        all.contains("#1 ") && all.contains("#2 "),
        "every attempt:\n{all}"
    );
    assert!(
        all.contains("line 29 of the prompt"),
        "the end of the input:\n{all}"
    );
    assert!(all.contains("output"), "{all}");
    // PgUp comes back to the top.
    for _ in 0..20 {
        key(&mut app, KeyCode::PageUp);
    }
    assert_eq!(pane(&render(&app, 80, 24)), pane(&s));
}

/// At 80 columns nothing is cut mid-unit: the failure figure keeps its `%`, a long status
/// message keeps its start and says `m` shows it all, the theme name is dropped whole rather
/// than cut, and the temporary-database warning shows the path.
#[test]
fn eighty_columns_cut_by_priority_and_m_shows_the_whole_message() {
    let mut app = fixtures::busy_app();
    app.spark.add_failed(app.now_ms);
    let s = render(&app, 80, 24);
    assert!(s.contains("failed 2/min (100%)"), "{s}");
    assert!(
        !s.contains("theme"),
        "the theme part is dropped whole, not cut: {s}"
    );
    // A run fails with a long error.
    let long = "model mistralai/Mistral-7B-Instruct-v0.2 is not supported by any provider \
                configured: pick another model or set OPENAI_BASE_URL";
    app.update(Msg::Engine(Event::RunFinished {
        run_id: "0mwz00000abcd".into(),
        blueprint: "tech-digest".into(),
        status: RunStatus::Error,
        total_time_ms: 12,
        error: Some(long.into()),
    }));
    let s = render(&app, 80, 24);
    let status = s.lines().nth(22).unwrap();
    assert!(
        status.contains("tech-digest 0mwz00000a failed after 12ms"),
        "{status}"
    );
    assert!(
        status.contains("(r retry · Enter details · m all)"),
        "{status}"
    );
    ch(&mut app, 'm');
    let s = render(&app, 80, 24);
    let flat: String = s
        .lines()
        .map(|l| l.trim_matches('"').trim_matches('║').trim())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(flat.contains("OPENAI_BASE_URL"), "m shows it whole:\n{s}");
    ch(&mut app, 'x');
    assert!(matches!(app.overlay, Overlay::None));
    // The unwritable database's warning ends with the temporary database's path.
    app.history.banner = Some(
        "cannot open the history database /srv/omniflow/history.db: attempt to write a readonly \
         database — until then, runs go to a temporary database (/tmp/omniflow-console-4242.db)"
            .into(),
    );
    let s = render(&app, 80, 24);
    assert!(s.contains("/tmp/omniflow-console-4242.db)"), "{s}");
    insta::assert_snapshot!("banner_80x24", s);
}

fn log_line(second: u32, message: &str, run: &str, step: &str) -> String {
    format!(
        r#"{{"timestamp":"2026-11-27T10:{:02}:{:02}.000000Z","level":"WARN","target":"omniflow::engine","message":"{message}","run_id":"{run}","step":"{step}","kind":"rate_limited"}}"#,
        second / 60,
        second % 60
    )
}

/// The Logs pane: g/Home shows a full first page, a filtered pane scrolls without going
/// blank, and at 80 columns the step and the reason come before the run id.
#[test]
fn logs_scroll_to_the_top_fill_the_pane_and_show_the_step_first() {
    let mut app = fixtures::app();
    let _ = app.start();
    let lines: Vec<LogEntry> = (0..60)
        .map(|i| {
            let run = if i % 2 == 0 {
                "0mwz00001abcd"
            } else {
                "0mwz00002abcd"
            };
            LogEntry::from_line(&log_line(
                i,
                &format!("line {i}"),
                run,
                &format!("summarize[{i}]"),
            ))
        })
        .collect();
    app.update(Msg::Bg(Bg::Logs(lines)));
    focus(&mut app, Focus::Logs);
    render(&app, 80, 24);
    let pane = |s: &str| -> Vec<String> {
        let rows: Vec<&str> = s.lines().collect();
        let top = rows.iter().position(|l| l.contains(" Logs ")).unwrap();
        rows[top + 1..]
            .iter()
            .take_while(|l| !l.contains("┗") && !l.contains("└"))
            .map(|l| l.to_string())
            .collect()
    };
    ch(&mut app, 'g');
    let s = render(&app, 80, 24);
    let p = pane(&s);
    assert!(p[0].contains("line 0 "), "the oldest line at the top:\n{s}");
    assert!(
        p.iter().all(|l| l.contains("line ")),
        "a full pane, no blank rows:\n{s}"
    );
    // The step and the reason before the run id.
    assert!(p[0].contains("line 0 summarize[0] kind=rate_limi"), "{s}");
    let wide = render(&app, 160, 48);
    assert!(
        wide.contains("line 0 summarize[0] kind=rate_limited run=0mwz00001a"),
        "{wide}"
    );
    // A run filter, then g and ↓↓: still a full pane of that run's lines.
    app.logs.run_filter = Some("0mwz00002abcd".into());
    render(&app, 80, 24);
    ch(&mut app, 'g');
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Down);
    let s = render(&app, 80, 24);
    let p = pane(&s);
    assert!(p.iter().all(|l| l.contains("line ")), "{s}");
    assert!(
        p[0].contains("line 5 "),
        "two lines down from the top:\n{s}"
    );
    // New lines while scrolled back keep the same lines on screen.
    app.update(Msg::Bg(Bg::Logs(vec![
        LogEntry::from_line(&log_line(100, "other run", "0mwz00001abcd", "x")),
        LogEntry::from_line(&log_line(101, "this run", "0mwz00002abcd", "x")),
    ])));
    assert_eq!(pane(&render(&app, 80, 24)), p);
    insta::assert_snapshot!("logs_top_80x24", s);
}

/// `o` on a run whose lines are older than the pane's tail reads them from the log files.
#[test]
fn o_on_an_older_run_reads_its_lines_from_the_log_files() {
    let dir = tempfile::tempdir().unwrap();
    let old: String = (0..5)
        .map(|i| log_line(i, &format!("old {i}"), "0mwz00001abcd", "summarize[0]") + "\n")
        .collect::<String>()
        + &log_line(9, "another run", "0mwz00009abcd", "x")
        + "\n";
    std::fs::write(dir.path().join("omniflow.log.2026-11-26"), old).unwrap();
    std::fs::write(
        dir.path().join("omniflow.log.2026-11-27"),
        log_line(30, "old 5", "0mwz00001abcd", "digest") + "\n",
    )
    .unwrap();
    let found = omniflow::tui::runtime::run_lines(dir.path(), "0mwz00001abcd").unwrap();
    let msgs: Vec<&str> = found.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(msgs, ["old 0", "old 1", "old 2", "old 3", "old 4", "old 5"]);

    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    let fx = ch(&mut app, 'o');
    let mark = match &fx[..] {
        [Effect::FindRunLogs { run_id, mark }] => {
            assert_eq!(run_id, "0mwz00001abcd");
            *mark
        }
        other => panic!("{other:?}"),
    };
    app.update(Msg::Bg(Bg::RunLogs {
        run_id: "0mwz00001abcd".into(),
        mark,
        result: Ok(found),
    }));
    // A line that arrives afterwards is shown after them, once.
    app.update(Msg::Bg(Bg::Logs(vec![LogEntry::from_line(&log_line(
        200,
        "new",
        "0mwz00001abcd",
        "digest",
    ))])));
    let msgs: Vec<String> = app
        .logs
        .visible()
        .iter()
        .map(|l| l.message.clone())
        .collect();
    assert_eq!(
        msgs,
        ["old 0", "old 1", "old 2", "old 3", "old 4", "old 5", "new"]
    );
    assert!(
        status_text(&app).contains("6 lines from the log files"),
        "{}",
        status_text(&app)
    );
}

/// History's `/` finds runs by part of their blueprint's name, in any case, in a real store.
#[test]
fn the_history_filter_matches_part_of_a_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = omniflow::store::Store::open(&dir.path().join("h.db")).unwrap();
    for (i, name) in ["triage", "tech-digest", "Triage-EU"].iter().enumerate() {
        store.insert_run(omniflow::store::NewRun {
            id: format!("0run{i:09}"),
            blueprint_name: name.to_string(),
            priority: omniflow::blueprint::Priority::Normal,
            trigger: "cli".into(),
            sandbox: true,
            seed: None,
            simulate_failures: 0.0,
            variables: serde_json::json!({}),
            blueprint: serde_json::Value::Null,
            parent_run_id: None,
            queued_at: std::time::UNIX_EPOCH + std::time::Duration::from_millis(T0 + i as u64),
        });
    }
    store.flush_blocking();
    let filter = omniflow::store::RunFilter {
        name_contains: Some("tri".into()),
        ..omniflow::store::RunFilter::default()
    };
    let mut names: Vec<String> = store
        .list_runs(&filter)
        .unwrap()
        .into_iter()
        .map(|r| r.blueprint_name)
        .collect();
    names.sort();
    assert_eq!(names, ["Triage-EU", "triage"]);
    assert_eq!(store.count_runs(&filter).unwrap(), 2);
}

/// A pane title never ends with a dangling separator (a filter with no rows).
#[test]
fn titles_have_no_stray_separator() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    ch(&mut app, 's');
    history_page(&mut app, vec![]);
    let s = render(&app, 80, 24);
    let title = s.lines().find(|l| l.contains(" History ")).unwrap();
    assert!(title.contains(" error ┓"), "{title}");
    assert!(!s.contains("· ┓") && !s.contains("· ┐"), "{s}");
}

/// `T` to the light theme on a dark terminal: every cell is painted on the theme's own light
/// background, so black text is never drawn on the terminal's (possibly dark) background.
#[test]
fn the_light_theme_paints_its_own_background() {
    use ratatui::style::Color;
    let mut app = fixtures::busy_app();
    while app.theme.name != "light" {
        ch(&mut app, 'T');
    }
    for overlay in [None, Some('?'), Some('t')] {
        if let Some(c) = overlay {
            ch(&mut app, c);
        }
        for (w, h) in [(80, 24), (160, 48)] {
            let mut t = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
            t.draw(|f| ui::draw(f, &app)).expect("draw");
            let buf = t.backend().buffer();
            let bare = buf
                .content()
                .iter()
                .filter(|c| c.bg == Color::Reset)
                .count();
            assert_eq!(
                bare, 0,
                "{bare} cells on the terminal's background ({w}×{h}, {overlay:?})"
            );
        }
        key(&mut app, KeyCode::Esc);
    }
    // The dark theme keeps the terminal's own background.
    let mut app = fixtures::busy_app();
    assert_eq!(app.theme.background, Color::Reset);
    ch(&mut app, 'T');
    assert_eq!(app.theme.name, "light");
}

#[test]
fn steps_waiting_for_a_free_provider_slot_show_as_one_line_until_they_start() {
    let mut app = fixtures::busy_app();
    for i in 0..3u64 {
        app.update(Msg::Engine(Event::StepWaitingSlot {
            run_id: "0mwz00000live".into(),
            step: format!("summarize[{}]", 10 + i),
            node: "summarize".into(),
            provider: "openai".into(),
            limit: 4,
        }));
    }
    let screen = render(&app, 160, 48);
    assert!(
        screen.contains(
            "⧗ 3 steps wait for a free openai slot (4 in flight at most; no worker held)"
        ),
        "{screen}"
    );
    assert!(screen.contains("3 wait for a slot"), "{screen}");
    assert!(!screen.contains("rate-limited"), "{screen}");
    // No countdown runs out: still waiting a minute later.
    app.update(Msg::Tick(app.now_ms + 60_000));
    assert_eq!(app.retrying.iter().filter(|r| r.slots.is_some()).count(), 3);
    app.update(Msg::Engine(Event::StepStarted {
        run_id: "0mwz00000live".into(),
        step: "summarize[10]".into(),
        node: "summarize".into(),
        attempt: 1,
    }));
    let screen = render(&app, 160, 48);
    assert!(
        screen.contains("⧗ 2 steps wait for a free openai slot"),
        "{screen}"
    );
}

#[test]
fn the_step_detail_warns_of_another_answering_model_and_a_cut_off_answer() {
    let mut app = fixtures::busy_app();
    focus(&mut app, Focus::History);
    ch(&mut app, 'j');
    key(&mut app, KeyCode::Enter);
    let mut d = fixtures::detail();
    d.steps[0].reply_model = Some("llama-3.2-1b-q4".into());
    d.steps[0].finish_reason = Some("length".into());
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(d)),
    }));
    // The detail opens on the failed step; the model's answer is the first step's.
    key(&mut app, KeyCode::Home);
    let screen = render(&app, 160, 48);
    assert!(screen.contains("answered by llama-3.2-1b-q4"), "{screen}");
    assert!(
        screen.contains("truncated (finish_reason: length)"),
        "{screen}"
    );
    // The same model under another spelling is no warning.
    let mut d = fixtures::detail();
    d.steps[0].reply_model = d.steps[0].model.clone();
    d.steps[0].finish_reason = Some("stop".into());
    app.update(Msg::Bg(Bg::Detail {
        generation: 1,
        result: Ok(Box::new(d)),
    }));
    // The detail opens on the failed step; the model's answer is the first step's.
    key(&mut app, KeyCode::Home);
    let screen = render(&app, 160, 48);
    assert!(!screen.contains("answered by"), "{screen}");
    assert!(!screen.contains("truncated"), "{screen}");
}

/// The console lists a blueprint over `MAX_BLUEPRINT_BYTES` with that problem, unparsed, and
/// loads the others.
#[test]
fn an_oversized_blueprint_is_listed_with_its_problem() {
    let dir = tempfile::tempdir().unwrap();
    let numbers = format!("[{}1]", "1,".repeat(50_000));
    std::fs::write(
        dir.path().join("big.json"),
        format!(r#"{{"name": "big", "variables": {{"L": {numbers}}}, "nodes": []}}"#),
    )
    .unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/blueprints/triage.toml"),
        dir.path().join("triage.toml"),
    )
    .unwrap();
    let list = omniflow::tui::runtime::load_blueprints(dir.path(), 64 * 1024).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].name, "big");
    assert!(!list[0].is_valid());
    assert!(
        list[0].problems[0].contains("big.json is 100.1 kB, over MAX_BLUEPRINT_BYTES (64 KiB)"),
        "{:?}",
        list[0].problems
    );
    assert!(list[1].is_valid());
}

/// A variable's text in the sandbox form is measured against `MAX_VARIABLE_BYTES` before it
/// is parsed (it may come from a blueprint's `testConfig`, where the blueprint's own size
/// check does not count values inside strings).
#[test]
fn the_sandbox_form_measures_a_variable_before_parsing_it() {
    let mut app = fixtures::busy_app();
    app.limits.max_variable_bytes = 1024;
    ch(&mut app, 't');
    key(&mut app, KeyCode::End);
    key(&mut app, KeyCode::Enter);
    // 100 numbers: 200 bytes of text, 1,800 counting 16 bytes for each.
    typed(&mut app, &format!("TOPICS=[{}1]", "1,".repeat(99)));
    assert!(ctrl(&mut app, 's').is_empty());
    match &app.overlay {
        Overlay::Sandbox(form) => {
            let e = form.error.as_deref().unwrap_or("");
            assert!(
                e.starts_with("line 2: TOPICS is 201 bytes holding 100 values, 1.8 kB counting")
                    && e.contains("over MAX_VARIABLE_BYTES (1 KiB)"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    app.limits.max_variable_bytes = omniflow::limits::DEFAULT_MAX_VARIABLE_BYTES;
    match &ctrl(&mut app, 's')[..] {
        [Effect::Start { request, .. }] => {
            assert_eq!(request.variables["TOPICS"].as_array().unwrap().len(), 100);
        }
        other => panic!("{other:?}"),
    }
}
