//! What one thread logs, kept as text while a guard lives: for tests that check what a user
//! reads in the log (a warning that must come, or must not), in this crate's unit tests and
//! in the integration tests alike.

use std::sync::{Arc, Mutex};

/// The lines logged on this thread at `level` and above while it lives, in the plain (not
/// JSON) format a terminal shows. Only this thread's events: it is the thread's default
/// subscriber, so other threads log as before.
pub struct Captured {
    text: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Starts keeping this thread's lines at `level` and above.
    pub fn start(level: tracing::Level) -> Captured {
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(text.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        Captured {
            text,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// Everything kept so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Everything kept so far, a line each.
    pub fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_string).collect()
    }
}
