//! The real `omniflow` binary, run the way a user runs it but isolated: in a directory of the
//! test's own, with nothing from the caller's environment except `PATH` (no `.env` of ours, no
//! developer settings leaking in), stdin closed, stdout and stderr captured. Every test that
//! runs the binary builds its command here, so how a test isolates it is decided once.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `omniflow ARGS` in `dir`, with exactly the settings in `vars`.
pub fn omniflow<K, V>(dir: &Path, args: &[&str], vars: impl IntoIterator<Item = (K, V)>) -> Command
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut c = Command::new(env!("CARGO_BIN_EXE_omniflow"));
    c.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A coverage run (cargo llvm-cov) counts the binary's own lines only if it is told where
    // to write them.
    if let Some(v) = std::env::var_os("LLVM_PROFILE_FILE") {
        c.env("LLVM_PROFILE_FILE", v);
    }
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// `DB_FILE` and `LOG_DIR` inside `dir`: a run's history and logs stay in the test's directory.
pub fn private_files(dir: &Path, db: &str) -> [(&'static str, PathBuf); 2] {
    [("DB_FILE", dir.join(db)), ("LOG_DIR", dir.join("logs"))]
}
