//! The console's view of a fleet (a shared PostgreSQL history), at the state level: other
//! processes' announcements are coalesced into one re-read at a time, laid over History and
//! the open run; the Workers pane groups workers by host; the header's queue is the shared
//! one; `c` and `+` act on another process's run. Rendered at 80×24 and 160×48.

use omniflow::blueprint::Priority;
use omniflow::events::RunStatus;
use omniflow::store::pg::events::Live;
use omniflow::store::pg::fleet_view::RunningAttempt;
use omniflow::store::{process_id, ProcessRow};
use omniflow::tui::app::{Confirm, Effect, Focus, Overlay, Screen};
use omniflow::tui::fixtures::{self, T0};
use omniflow::tui::state::FleetState;
use omniflow::tui::{ui, App, Bg, Msg};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use std::time::{Duration, UNIX_EPOCH};

fn fleet_app() -> App {
    let mut app = fixtures::busy_app();
    app.fleet = Some(FleetState::default());
    app.update(Msg::Bg(Bg::Live(Live::Connected)));
    app
}

fn runs(ids: &[&str]) -> Live {
    Live::Runs {
        runs: ids.iter().map(|s| s.to_string()).collect(),
        more: false,
    }
}

fn reloads(fx: &[Effect]) -> Vec<Vec<String>> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::ReloadRuns(ids) => Some(ids.clone()),
            _ => None,
        })
        .collect()
}

/// Answers the History query in flight with a small page.
fn answer_history(app: &mut App) {
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((fixtures::history_rows(6), Some(6))),
    }));
}

fn key(app: &mut App, code: KeyCode) -> Vec<Effect> {
    app.update(Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)))
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
    t.draw(|f| ui::draw(f, app)).expect("draw");
    let buf = t.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..h {
        for x in 0..w {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

fn process(id: &str, role: &str, concurrency: u64) -> ProcessRow {
    let mut parts = id.rsplitn(3, ':');
    let (_, pid, host) = (parts.next(), parts.next(), parts.next());
    let t = UNIX_EPOCH + Duration::from_millis(T0);
    ProcessRow {
        id: id.into(),
        host: host.map(str::to_string),
        pid: pid.and_then(|p| p.parse().ok()).unwrap_or(0),
        role: role.into(),
        version: "0.1.0".into(),
        started_at: t,
        heartbeat_at: t,
        stopped_at: None,
        rss_mb: Some(40.0),
        memory_hold: false,
        paused: false,
        queued: 0,
        running: 0,
        completed: 0,
        failed: 0,
        concurrency: Some(concurrency),
        alive: true,
    }
}

fn attempt(worker: &str, run: &str, step: &str) -> RunningAttempt {
    RunningAttempt {
        worker: worker.into(),
        run_id: run.into(),
        step_key: step.into(),
        attempt: 1,
        claimed_at: Some(UNIX_EPOCH + Duration::from_millis(T0 - 1200)),
    }
}

const GPU: &str = "gpu-box:4300:1700000000000";

/// A fleet console that knows a daemon on another host, running a step of run 1 (on the
/// History page, `running`).
fn with_remote_daemon() -> App {
    let mut app = fleet_app();
    let mut rows = fixtures::history_rows(6);
    rows[1].status = RunStatus::Running;
    rows[1].finished_at = None;
    rows[1].total_time_ms = None;
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((rows, Some(6))),
    }));
    app.update(Msg::Bg(Bg::Processes(Ok(vec![
        process(process_id(), "console", 4),
        process(GPU, "daemon", 8),
    ]))));
    app.update(Msg::Bg(Bg::Fleet(Ok((
        [0, 5, 2, 0],
        vec![attempt(
            GPU,
            &fixtures::run_row(1, "triage", RunStatus::Running).id,
            "classify[3]",
        )],
    )))));
    app
}

#[test]
fn a_burst_of_announcements_is_one_reread_at_a_time_with_everything_in_it() {
    let mut app = fleet_app();
    let fx = app.update(Msg::Bg(Bg::Live(runs(&["a", "b"]))));
    assert_eq!(reloads(&fx), vec![vec!["a".to_string(), "b".to_string()]]);
    // While that read is in flight, 1,000 more announcements: no new read.
    let mut fx = Vec::new();
    for i in 0..1000 {
        fx.extend(app.update(Msg::Bg(Bg::Live(runs(&["b", &format!("r{}", i % 7)])))));
    }
    assert!(reloads(&fx).is_empty(), "{fx:?}");
    // Its answer starts the next one, with every run announced meanwhile, each once.
    let fx = app.update(Msg::Bg(Bg::RunsReloaded(Ok(Vec::new()))));
    let next = reloads(&fx);
    assert_eq!(next.len(), 1, "{fx:?}");
    let mut want: Vec<String> = (0..7).map(|i| format!("r{i}")).collect();
    want.push("b".into());
    want.sort();
    assert_eq!(next[0], want);
    // Nothing announced since: the chain stops.
    assert!(reloads(&app.update(Msg::Bg(Bg::RunsReloaded(Ok(Vec::new()))))).is_empty());
}

#[test]
fn too_many_runs_or_more_rereads_the_page_once_instead() {
    let mut app = fleet_app();
    answer_history(&mut app);
    app.update(Msg::Tick(T0 + 2000)); // the re-read after connecting
    answer_history(&mut app);
    assert!(!app.history.stale);
    let fx = app.update(Msg::Bg(Bg::Live(Live::Runs {
        runs: vec!["x".into()],
        more: true,
    })));
    assert!(reloads(&fx).is_empty());
    assert!(app.history.stale, "the page is re-read at the next tick");
}

#[test]
fn a_reread_run_replaces_its_history_row_and_a_new_one_brings_the_page_back() {
    let mut app = with_remote_daemon();
    let id = app.history.rows[1].id.clone();
    app.update(Msg::Bg(Bg::Live(runs(&[&id]))));
    let mut row = app.history.rows[1].clone();
    row.status = RunStatus::Error;
    row.error = Some("classify[3]: model not found".into());
    app.history.stale = false;
    app.update(Msg::Bg(Bg::RunsReloaded(Ok(vec![row]))));
    assert_eq!(app.history.rows[1].status, RunStatus::Error);
    assert!(
        !app.history.stale,
        "a row on the page is replaced, not the page re-read"
    );

    // A run started by another process, newer than the page's rows: the page comes again.
    let mut new = fixtures::run_row(0, "triage", RunStatus::Running);
    new.id = "0mwzzzzzznew1".into();
    new.started_at = Some(UNIX_EPOCH + Duration::from_millis(T0 + 5000));
    app.update(Msg::Bg(Bg::Live(runs(&[&new.id]))));
    app.update(Msg::Bg(Bg::RunsReloaded(Ok(vec![new]))));
    assert!(app.history.stale);

    // An old run that is not on a full page does not (no page query per step of it).
    let mut app = with_remote_daemon();
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((fixtures::history_rows(100), Some(500))),
    }));
    app.history.stale = false;
    let old = fixtures::run_row(400, "triage", RunStatus::Running);
    app.update(Msg::Bg(Bg::Live(runs(&[&old.id]))));
    app.update(Msg::Bg(Bg::RunsReloaded(Ok(vec![old]))));
    assert!(!app.history.stale);
}

#[test]
fn an_announcement_about_the_open_run_reloads_it_at_the_next_tick() {
    let mut app = with_remote_daemon();
    let id = app.history.rows[1].id.clone();
    app.focus = Focus::History;
    app.history.selected = 1;
    key(&mut app, KeyCode::Enter);
    let generation = match &app.screen {
        Screen::Detail(d) => d.generation,
        _ => panic!("detail open"),
    };
    app.update(Msg::Bg(Bg::Detail {
        generation,
        result: Ok(Box::new(fixtures::detail())),
    }));
    // Another run's news does not touch it; its own does, at the next tick.
    app.update(Msg::Bg(Bg::Live(runs(&["someone-else"]))));
    let fx = app.update(Msg::Tick(T0 + 2000));
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::LoadDetail { .. })),
        "{fx:?}"
    );
    app.update(Msg::Bg(Bg::Live(runs(&[&id]))));
    let fx = app.update(Msg::Tick(T0 + 2250));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::LoadDetail { run_id, .. } if *run_id == id)),
        "{fx:?}"
    );
}

#[test]
fn while_listening_the_clock_rereads_slowly_and_fast_again_when_the_connection_drops() {
    let mut app = fleet_app();
    answer_history(&mut app);
    // The re-read after connecting, answered.
    app.update(Msg::Tick(T0 + 2000));
    answer_history(&mut app);
    let t = app.history.last_query_ms;
    assert_eq!(t, T0 + 2000);
    let queried = |fx: &[Effect]| fx.iter().any(|e| matches!(e, Effect::QueryHistory { .. }));
    assert!(
        !queried(&app.update(Msg::Tick(t + 3000))),
        "listening: no re-read at 3 s"
    );
    app.update(Msg::Bg(Bg::Live(Live::Lost(
        "the connection closed".into(),
    ))));
    assert!(
        queried(&app.update(Msg::Tick(t + 3250))),
        "not listening: every 2 s"
    );
}

#[test]
fn the_shared_queue_is_read_on_the_clock_and_sooner_after_an_announcement() {
    let mut app = fleet_app();
    let loads = |fx: &[Effect]| fx.iter().filter(|e| matches!(e, Effect::LoadFleet)).count();
    assert_eq!(loads(&app.update(Msg::Tick(T0 + 10_000))), 1);
    assert_eq!(
        loads(&app.update(Msg::Tick(T0 + 10_250))),
        0,
        "one in flight"
    );
    app.update(Msg::Bg(Bg::Fleet(Ok(([0, 0, 0, 0], Vec::new())))));
    assert_eq!(
        loads(&app.update(Msg::Tick(T0 + 10_750))),
        0,
        "nothing announced"
    );
    app.update(Msg::Bg(Bg::Live(runs(&["a"]))));
    assert_eq!(
        loads(&app.update(Msg::Tick(T0 + 10_750))),
        1,
        "announced: after 500 ms"
    );
}

#[test]
fn another_process_s_run_can_be_cancelled_and_reprioritised_from_history() {
    let mut app = with_remote_daemon();
    let id = app.history.rows[1].id.clone();
    app.focus = Focus::History;
    app.history.selected = 1;
    key(&mut app, KeyCode::Char('c'));
    match &app.overlay {
        Overlay::Confirm(Confirm::Cancel { run_id, .. }) => assert_eq!(*run_id, id),
        other => panic!("{other:?}"),
    }
    let fx = key(&mut app, KeyCode::Char('y'));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Cancel { run_id } if *run_id == id)),
        "{fx:?}"
    );
    let fx = key(&mut app, KeyCode::Char('+'));
    assert!(
        fx.iter().any(|e| matches!(e, Effect::SetPriority { run_id, priority: Priority::High } if *run_id == id)),
        "{fx:?}"
    );
    assert_eq!(app.history.rows[1].priority, Priority::High);
}

#[test]
fn without_a_fleet_another_process_s_run_is_still_refused() {
    let mut app = fixtures::busy_app();
    let mut rows = fixtures::history_rows(3);
    rows[1].status = RunStatus::Running;
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((rows, Some(3))),
    }));
    app.focus = Focus::History;
    app.history.selected = 1;
    key(&mut app, KeyCode::Char('c'));
    assert!(matches!(app.overlay, Overlay::None));
    assert!(app
        .status
        .as_ref()
        .is_some_and(|s| s.text.contains("another process owns it")));
}

#[test]
fn workers_are_grouped_by_host_and_a_remote_attempt_is_selectable() {
    let mut app = with_remote_daemon();
    let my_host = process_id().rsplitn(3, ':').nth(2).unwrap().to_string();
    for (w, h) in [(160, 48), (80, 24)] {
        let s = render(&app, w, h);
        assert!(s.contains(&format!("{my_host} · console")), "{w}x{h}:\n{s}");
        assert!(s.contains("gpu-box · daemon 4300 1/8"), "{w}x{h}:\n{s}");
        // The shared queue's depth (narrow: without the word "queue").
        assert!(
            s.contains(if w < 100 {
                "fleet 7 c0 h2 n5 l0"
            } else {
                "fleet queue 7 crit 0 high 2 norm 5"
            }),
            "{w}x{h}:\n{s}"
        );
        assert!(s.contains("2/4 busy here"), "{w}x{h}:\n{s}");
    }
    let s = render(&app, 160, 48);
    assert!(s.contains("7 queued in the fleet"), "{s}");
    assert!(s.contains("p4300"), "{s}");
    assert!(s.contains("classify[3]"), "{s}");
    // Past this process's two busy workers: the daemon's attempt, whose run `c` cancels.
    app.focus = Focus::Workers;
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Down);
    let (run, bp, status) = app.selected_run().unwrap();
    assert_eq!(run, app.history.rows[1].id);
    assert_eq!(bp, "triage");
    assert_eq!(status, Some(RunStatus::Running));
}

#[test]
fn on_sqlite_the_panes_say_what_they_said() {
    let app = fixtures::busy_app();
    let s = render(&app, 160, 48);
    assert!(
        !s.contains("in the fleet") && !s.contains("busy here"),
        "{s}"
    );
    assert!(s.contains("4 queued"), "{s}");
}

#[test]
fn a_page_read_before_an_announced_end_does_not_bring_the_run_back_as_running() {
    let mut app = with_remote_daemon();
    app.update(Msg::Tick(T0 + 2000)); // a page query goes out…
    assert!(app.history.loading);
    let id = app.history.rows[1].id.clone();
    let before = app.history.rows.clone();
    // …the run ends meanwhile, announced and re-read…
    app.update(Msg::Bg(Bg::Live(runs(&[&id]))));
    let mut done = before[1].clone();
    done.status = RunStatus::Success;
    done.total_time_ms = Some(9000);
    app.update(Msg::Bg(Bg::RunsReloaded(Ok(vec![done]))));
    // …and the page, read before that, lands: the row stays ended.
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((before.clone(), Some(6))),
    }));
    assert_eq!(app.history.rows[1].status, RunStatus::Success);
    // A later page that agrees is taken as it is (the overlay is forgotten).
    let mut agreed = before.clone();
    agreed[1].status = RunStatus::Success;
    agreed[1].total_time_ms = Some(9100);
    app.history.loading = false;
    app.update(Msg::Tick(T0 + 20_000));
    let generation = app.history.generation;
    app.update(Msg::Bg(Bg::History {
        generation,
        result: Ok((agreed, Some(6))),
    }));
    assert_eq!(app.history.rows[1].total_time_ms, Some(9100));
}

#[test]
fn the_detail_says_which_process_runs_a_step_now() {
    let mut app = with_remote_daemon();
    let run = app.history.rows[1].id.clone();
    app.update(Msg::Bg(Bg::Fleet(Ok((
        [0, 0, 0, 0],
        vec![attempt(GPU, &run, "summarize[1]")],
    )))));
    app.focus = Focus::History;
    app.history.selected = 1;
    key(&mut app, KeyCode::Enter);
    let generation = match &app.screen {
        Screen::Detail(d) => d.generation,
        _ => panic!("detail open"),
    };
    app.update(Msg::Bg(Bg::Detail {
        generation,
        result: Ok(Box::new(fixtures::detail())),
    }));
    for (w, h) in [(160, 48), (80, 24)] {
        let s = render(&app, w, h);
        assert!(s.contains("running on gpu-box (pid 4300)"), "{w}x{h}:\n{s}");
    }
}

#[test]
fn the_highlighted_remote_line_is_the_run_the_keys_act_on() {
    let mut app = with_remote_daemon();
    let me = process_id();
    let my_host = me.rsplitn(3, ':').nth(2).unwrap().to_string();
    let sibling = format!("{my_host}:9999:1");
    // A host whose name sorts before this one, this host's other process, and the GPU box.
    app.update(Msg::Bg(Bg::Processes(Ok(vec![
        process(me, "console", 4),
        process(GPU, "daemon", 8),
        process("aaa-box:7777:1", "daemon", 2),
        process(&sibling, "daemon", 2),
    ]))));
    app.update(Msg::Bg(Bg::Fleet(Ok((
        [0, 0, 0, 0],
        vec![
            attempt(GPU, "0mwzgpu000001", "g[0]"),
            attempt("aaa-box:7777:1", "0mwzaaa000001", "a[0]"),
            attempt(&sibling, "0mwzsib000001", "s[0]"),
        ],
    )))));
    app.focus = Focus::Workers;
    // Past this process's two workers: this host first, then by host name.
    let mut seen = Vec::new();
    for i in 0..5 {
        app.worker_selected = i;
        let (run, _, _) = app.selected_run().unwrap();
        let s = render(&app, 160, 48);
        let line = s
            .lines()
            .find(|l| l.contains('▸') && l.contains(" ▶ "))
            .unwrap_or("");
        assert!(
            line.contains(&run[..10]),
            "selection {i} is {run}, highlighted: {line}\n{s}"
        );
        seen.push(run[..7].to_string());
    }
    assert_eq!(&seen[2..], ["0mwzsib", "0mwzaaa", "0mwzgpu"]);
}

#[test]
fn a_queue_that_cannot_be_read_is_said_once() {
    let mut app = fleet_app();
    let e = "cannot reach the fleet database at postgres://x@db/omniflow".to_string();
    app.update(Msg::Bg(Bg::Fleet(Err(e.clone()))));
    let said = app.status.clone().expect("said");
    assert!(said.error && said.text.contains(&e), "{said:?}");
    app.status = None;
    app.update(Msg::Bg(Bg::Fleet(Err(e))));
    assert_eq!(app.status, None, "not again for the same problem");
    app.update(Msg::Bg(Bg::Fleet(Ok(([1, 0, 0, 0], Vec::new())))));
    assert_eq!(app.fleet.as_ref().unwrap().depth_total(), Some(1));
    assert_eq!(app.fleet.as_ref().unwrap().problem, None);
}
