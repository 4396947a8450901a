//! The terminal: raw mode, alternate screen, hidden cursor — and their restoration on every
//! path: a normal quit, Ctrl-C (a key in raw mode), an error (`Drop`), a panic (a hook that
//! restores before the default hook prints), and SIGTERM (the loop's `select!` ends and drops
//! the terminal). Restoring logs failures instead of panicking.

use super::app::App;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, BeginSynchronizedUpdate, EndSynchronizedUpdate,
    EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};
use std::io::{stdout, Stdout};
use std::sync::Once;

pub struct Terminal {
    inner: ratatui::Terminal<CrosstermBackend<Stdout>>,
    active: bool,
}

static HOOK: Once = Once::new();

/// Puts the terminal back as the shell expects it. Safe to call twice.
pub fn restore() {
    if let Err(e) = disable_raw_mode() {
        tracing::warn!("cannot leave raw mode: {e}");
    }
    if let Err(e) = execute!(stdout(), LeaveAlternateScreen, cursor::Show) {
        tracing::warn!("cannot leave the alternate screen: {e}");
    }
}

impl Terminal {
    pub fn enter() -> std::io::Result<Terminal> {
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        enable_raw_mode()?;
        let mut out = stdout();
        if let Err(e) = execute!(out, EnterAlternateScreen, cursor::Hide) {
            restore();
            return Err(e);
        }
        let inner = match ratatui::Terminal::new(CrosstermBackend::new(stdout())) {
            Ok(t) => t,
            Err(e) => {
                restore();
                return Err(e);
            }
        };
        Ok(Terminal {
            inner,
            active: true,
        })
    }

    /// Draws one frame inside a synchronized update (no tearing on a busy screen).
    pub fn draw(&mut self, app: &App) -> std::io::Result<()> {
        let _ = execute!(stdout(), BeginSynchronizedUpdate);
        let r = self.inner.draw(|f| super::ui::draw(f, app)).map(|_| ());
        let _ = execute!(stdout(), EndSynchronizedUpdate);
        r
    }

    pub fn autoresize(&mut self) -> std::io::Result<()> {
        self.inner.autoresize()
    }

    pub fn leave(&mut self) {
        if self.active {
            self.active = false;
            restore();
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(unix)]
pub type Sigterm = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub type Sigterm = ();

/// A SIGTERM listener (none where the platform has no such signal).
#[cfg(unix)]
pub fn sigterm() -> Sigterm {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::terminate()).ok()
}
#[cfg(not(unix))]
pub fn sigterm() -> Sigterm {}

/// Resolves when SIGTERM (or SIGHUP's cousin, a closed terminal, handled elsewhere) arrives.
#[cfg(unix)]
pub async fn recv(s: &mut Sigterm) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
#[cfg(not(unix))]
pub async fn recv(_: &mut Sigterm) {
    std::future::pending::<()>().await
}
