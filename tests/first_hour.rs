//! What a new user meets in the first hour, through the real binary: messages that do not
//! contradict themselves, a doctor that says when nothing can run a model and leaves no files
//! behind, and history commands that say which database they read.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary in an empty temporary directory (no .env, no blueprints/), with fast waits.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = common::bin::omniflow(self.path(), args, [("HOME", self.path())]);
        c.env("OMNIFLOW_TIME_SCALE", "0.001");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run omniflow")
    }
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("blueprints")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// A step that used all its attempts says so, and nothing in its message claims a wait that
/// did not happen, or a 300 s timeout for an attempt that took milliseconds.
#[test]
fn a_failed_sandbox_step_does_not_contradict_itself() {
    let d = Dir::new();
    let dir = bundled();
    let o = d.run(&[
        "run",
        "tech-digest",
        "--dir",
        dir.to_str().unwrap(),
        "--sandbox",
        "--simulate-failures",
        "1",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let errors: Vec<String> = v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["error"].as_str().map(str::to_string))
        .collect();
    assert!(!errors.is_empty(), "{v:#}");
    for e in &errors {
        if e.contains("gave up after") {
            assert!(
                !e.contains("waiting") && !e.contains("retry after"),
                "a final error that still promises a wait: {e}"
            );
        }
        assert!(!e.contains("timed out after"), "{e}");
    }
    assert!(
        errors
            .iter()
            .any(|e| e.contains("gave up after 4 attempts")),
        "{errors:#?}"
    );
}

/// With nothing configured, `doctor` says that nothing can run a model and exits non-zero
/// (2: configuration), and it creates no database and no log directory to check them.
#[test]
fn doctor_with_nothing_configured_says_so_and_creates_nothing() {
    let d = Dir::new();
    let o = d.run(&["doctor"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}{}", text(&o.stderr));
    assert!(out.contains("nothing can run a model"), "{out}");
    assert!(!out.contains("everything configured works"), "{out}");
    assert!(
        out.contains("automation_runner.db  does not exist yet"),
        "{out}"
    );
    let left: Vec<String> = std::fs::read_dir(d.path())
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(left.is_empty(), "doctor left files behind: {left:?}");

    let o = d.run(&["doctor", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["ok"], false);
    assert_eq!(v["canRunModels"], false);
    assert_eq!(v["database"]["exists"], false);
}

/// With a provider configured (an OpenAI-compatible server that is not there), the verdict is
/// about that provider, not "nothing can run a model".
#[test]
fn doctor_with_a_provider_configured_checks_it() {
    let d = Dir::new();
    let o = d
        .cmd(&["doctor"])
        .env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        .output()
        .expect("run");
    let out = text(&o.stdout);
    assert!(!out.contains("nothing can run a model"), "{out}");
    assert_eq!(o.status.code(), Some(1), "{out}");
}

/// Without a token, 40 steps fail for one reason: the fix is printed once, not once a step.
#[test]
fn one_missing_token_is_explained_once() {
    let d = Dir::new();
    let dir = bundled();
    let o = d.run(&["run", "tech-digest", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    let step_lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("  ✗") && l.contains(" failed after "))
        .collect();
    assert!(step_lines.len() > 1, "{err}");
    let with_fix = step_lines
        .iter()
        .filter(|l| l.contains("HUGGINGFACE_TOKEN"))
        .count();
    assert_eq!(with_fix, 1, "{err}");
    assert!(
        step_lines
            .iter()
            .skip(1)
            .all(|l| l.contains("the same error as")),
        "{err}"
    );
}
