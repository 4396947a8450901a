//! The terminal: raw mode, alternate screen, hidden cursor — and their restoration on every
//! path: a normal quit, Ctrl-C (a key in raw mode), an error (`Drop`), a panic of the console's
//! thread (a hook that restores before the default hook prints), and SIGTERM (the loop's
//! `select!` ends and drops the terminal). A panic on any other thread is caught where it
//! happened; the hook logs and counts it and leaves the screen alone. Restoring logs failures
//! instead of panicking.
//!
//! Restoring happens once: a second "leave the alternate screen" is not harmless, terminals
//! (xterm, tmux) then move the cursor back to where it was saved on entering, and the next
//! output overwrites whatever was printed since — after a panic, the panic message.

use super::app::App;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, BeginSynchronizedUpdate, EndSynchronizedUpdate,
    EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};
use std::io::{stdout, Stdout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::thread::ThreadId;

/// The console's hold on the terminal: while it lives, the terminal is in raw mode on the
/// alternate screen with the cursor hidden. Dropping it (or [`Terminal::leave`]) restores it.
pub struct Terminal {
    /// Never dropped: ratatui's own drop shows the cursor again and reports a failure with
    /// `eprintln!`, which panics when the terminal is gone (a dropped SSH session) — in the
    /// middle of handing runs over. [`restore`] already shows the cursor, logging failures.
    inner: std::mem::ManuallyDrop<ratatui::Terminal<CrosstermBackend<Stdout>>>,
}

static HOOK: Once = Once::new();
/// Whether the terminal is in the console's modes and not yet restored.
static ENTERED: AtomicBool = AtomicBool::new(false);
/// The thread that took the terminal: the console's loop, whose panic ends the console.
static UI_THREAD: OnceLock<ThreadId> = OnceLock::new();
/// Panics caught elsewhere while the console ran (a step, a background task).
static BACKGROUND_PANICS: AtomicU64 = AtomicU64::new(0);

/// How many panics happened off the console's thread while it held the terminal. Each was
/// caught where it happened (a step fails as an internal error) and written to the log.
pub fn background_panics() -> u64 {
    BACKGROUND_PANICS.load(Ordering::Relaxed)
}

/// Puts the terminal back as the shell expects it: cooked mode, the normal screen, the cursor
/// shown. Does nothing unless [`Terminal::enter`] changed it and it has not been restored
/// since, so the panic hook, [`Terminal::leave`] and `Drop` can all call it.
pub fn restore() {
    if !ENTERED.swap(false, Ordering::SeqCst) {
        return;
    }
    if let Err(e) = disable_raw_mode() {
        tracing::warn!("cannot leave raw mode: {e}");
    }
    // The alternate screen is cleared before it is left: after the terminal grew, tmux (and
    // others) otherwise bring part of it back above the prompt.
    if let Err(e) = execute!(
        stdout(),
        ratatui::crossterm::terminal::Clear(ratatui::crossterm::terminal::ClearType::All),
        cursor::MoveTo(0, 0),
        LeaveAlternateScreen,
        cursor::Show
    ) {
        tracing::warn!("cannot leave the alternate screen: {e}");
    }
}

impl Terminal {
    /// Takes the terminal as the console does: raw mode, the alternate screen, the cursor
    /// hidden. The first call also installs a panic hook that restores the terminal before the
    /// previous hook prints the message, so a panic is readable on the normal screen.
    pub fn enter() -> std::io::Result<Terminal> {
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let on_ui = UI_THREAD.get() == Some(&std::thread::current().id());
                if ENTERED.load(Ordering::SeqCst) && !on_ui {
                    // Off the console's thread the panic is caught where it happened (the pool
                    // turns a step's into an internal error) and the console goes on: its
                    // message goes to the log, not over the screen, which stays as it is.
                    BACKGROUND_PANICS.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(panic = %info, "internal error: a background task panicked (please report it)");
                    return;
                }
                restore();
                previous(info);
            }));
        });
        let _ = UI_THREAD.set(std::thread::current().id());
        enable_raw_mode()?;
        ENTERED.store(true, Ordering::SeqCst);
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
            inner: std::mem::ManuallyDrop::new(inner),
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

    /// Restores the terminal now (the console leaves before waiting for runs to stop).
    pub fn leave(&mut self) {
        restore();
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.leave();
    }
}

/// SIGTERM and SIGHUP listeners. SIGHUP is what an SSH session that drops sends: without a
/// handler it would kill the console at once, leaving its runs to wait out their lease; with
/// one, the console hands them over like on SIGTERM.
#[cfg(unix)]
pub type Sigterm = [Option<tokio::signal::unix::Signal>; 2];
#[cfg(not(unix))]
pub type Sigterm = ();

/// The listeners (none where the platform has no such signals).
#[cfg(unix)]
pub fn sigterm() -> Sigterm {
    use tokio::signal::unix::{signal, SignalKind};
    [
        signal(SignalKind::terminate()).ok(),
        signal(SignalKind::hangup()).ok(),
    ]
}
#[cfg(not(unix))]
pub fn sigterm() -> Sigterm {}

/// Resolves when SIGTERM or SIGHUP arrives.
#[cfg(unix)]
pub async fn recv(s: &mut Sigterm) {
    let [term, hup] = s;
    tokio::select! {
        _ = one_signal(term) => {}
        _ = one_signal(hup) => {}
    }
}

#[cfg(unix)]
async fn one_signal(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
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
