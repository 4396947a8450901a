//! Panics while the console owns the terminal, to prove the panic path restores it.
//!
//! Enters raw mode and the alternate screen through the console's own [`Terminal`], draws one
//! console frame with a recognisable status line. `b` panics on another thread (as a step or a
//! background task would): the console must keep the screen and go on. Any other key panics
//! on the console's own thread with the terminal still held.
//! `tests/console_e2e.rs` runs this in tmux and checks that the shell gets back a cooked tty
//! on the normal screen with the cursor shown and the panic message readable. It is an
//! example, not a switch in the binary: users cannot make the console panic on purpose.
//!
//! Run it by hand in a terminal: `cargo run --example console_panic`.

use omniflow::tui::app::Status;
use omniflow::tui::terminal::Terminal;
use omniflow::tui::theme::Theme;
use omniflow::tui::App;
use ratatui::crossterm::event::{self, Event, KeyCode};
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let mut app = App::new(PathBuf::from("blueprints"), Theme::default(), Vec::new(), 2);
    app.status = Some(Status {
        text: "PANIC-EXAMPLE-DRAWN: press a key to panic".into(),
        keys: None,
        error: false,
        until_ms: u64::MAX,
    });
    let mut term = Terminal::enter()?;
    term.draw(&app)?;
    // Keys are read raw, as the console does, so the caller can see each frame first.
    loop {
        let Event::Key(k) = event::read()? else {
            continue;
        };
        if k.code != KeyCode::Char('b') {
            break;
        }
        let caught = std::thread::spawn(|| panic!("BACKGROUND-PANIC-TEXT: a worker panicked"))
            .join()
            .is_err();
        app.status = Some(Status {
            text: format!(
                "BACKGROUND-PANIC-SURVIVED caught={caught} counted={}",
                omniflow::tui::terminal::background_panics()
            ),
            keys: None,
            error: false,
            until_ms: u64::MAX,
        });
        term.draw(&app)?;
    }
    panic!("console_panic: deliberate panic with the terminal held");
}
