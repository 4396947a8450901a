use super::*;
use serde_json::Value;
use std::sync::Mutex;

const TG_TOKEN: &str = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";

/// Runs `f` with a subscriber writing to a fresh directory, then returns every line written.
fn logged_lines(secrets: &[&str], filter: &str, f: impl FnOnce()) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets.iter().map(|s| s.to_string()).collect();
    let (subscriber, guard) = build_subscriber(dir.path(), secrets, filter, None).unwrap();
    tracing::subscriber::with_default(subscriber, f);
    // Dropping the guard flushes the background writer.
    drop(guard);
    let files = log_files(dir.path());
    assert_eq!(files.len(), 1, "one file per day: {files:?}");
    fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn parse(line: &str) -> serde_json::Map<String, Value> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(map)) => map,
        other => panic!("not a JSON object: {line}: {other:?}"),
    }
}

#[test]
fn a_secret_never_reaches_the_file() {
    let secret = "hf_NotARealTokenButLongEnough123";
    let key = "plain-secret-value";
    let lines = logged_lines(&[secret, key], "info", || {
        tracing::info!("calling with token {secret}");
        tracing::info!(token = secret, header = %format!("Bearer {key}"), "field");
        tracing::warn!(config = ?vec![key], "debug-formatted");
        let span = tracing::info_span!("run", api_key = key);
        let _e = span.enter();
        tracing::error!("inside a span holding a secret");
    });
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let all = lines.join("\n");
    assert!(!all.contains(secret), "{all}");
    assert!(!all.contains(key), "{all}");
    assert!(all.contains(REDACTED), "{all}");
    assert_eq!(parse(&lines[1])["token"], REDACTED);
    assert_eq!(parse(&lines[3])["api_key"], REDACTED);
}

#[test]
fn telegram_and_discord_urls_are_redacted_even_when_not_listed() {
    let lines = logged_lines(&[], "info", || {
        tracing::warn!(
            url = %format!("https://api.telegram.org/bot{TG_TOKEN}/sendMessage"),
            "telegram send failed"
        );
        tracing::warn!(
            "POST https://discord.com/api/webhooks/112233445566778899/Zx_9-abcDEF123ghiJKL failed"
        );
    });
    let all = lines.join("\n");
    assert!(!all.contains(TG_TOKEN), "{all}");
    assert!(!all.contains("Zx_9-abcDEF123ghiJKL"), "{all}");
    assert_eq!(
        parse(&lines[0])["url"],
        "https://api.telegram.org/bot[REDACTED]/sendMessage"
    );
    assert_eq!(
        parse(&lines[1])["message"],
        "POST https://discord.com/api/webhooks/[REDACTED] failed"
    );
}

#[test]
fn lines_are_flat_json_with_the_documented_keys() {
    let lines = logged_lines(&[], "info", || {
        let span = tracing::info_span!("run", run_id = "r-1", blueprint = "tech-digest");
        let _e = span.enter();
        tracing::info!(
            step = "summarize[3]",
            attempt = 2u32,
            ok = true,
            "step finished"
        );
        tracing::info!(run_id = "r-override", level = "mine", "event field wins");
    });
    assert_eq!(lines.len(), 2);
    let first = parse(&lines[0]);
    let keys: Vec<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(
        &keys[..4],
        ["timestamp", "level", "target", "message"],
        "{}",
        lines[0]
    );
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["target"], "omniflow::logging::tests");
    assert_eq!(first["message"], "step finished");
    assert_eq!(first["run_id"], "r-1");
    assert_eq!(first["blueprint"], "tech-digest");
    assert_eq!(first["step"], "summarize[3]");
    assert_eq!(first["attempt"], 2);
    assert_eq!(first["ok"], true);

    let ts = first["timestamp"].as_str().unwrap();
    // RFC 3339 UTC: 2025-01-31T17:06:02.123456Z
    assert!(
        ts.len() >= 20 && ts.ends_with('Z') && &ts[10..11] == "T",
        "{ts}"
    );
    assert!(is_date(&ts[..10]), "{ts}");

    let read_back = LogLine::parse(&lines[0]).expect("a log line parses");
    assert_eq!(read_back.level, "INFO");
    assert_eq!(read_back.message, "step finished");
    assert_eq!(read_back.fields["run_id"], "r-1");
    assert!(!read_back.fields.contains_key("message"));
    assert_eq!(LogLine::parse("not json"), None);
    assert_eq!(LogLine::parse(r#"{"level":"INFO"}"#), None);

    let second = parse(&lines[1]);
    assert_eq!(second["run_id"], "r-override");
    assert_eq!(second["level"], "INFO");
    assert_eq!(second["field_level"], "mine");
}

#[test]
fn the_filter_decides_what_is_written() {
    let lines = logged_lines(&[], "warn,omniflow::logging=debug", || {
        tracing::trace!("too fine");
        tracing::debug!("kept by the module directive");
        tracing::info!(target: "hyper", "dropped by the default level");
        tracing::warn!(target: "hyper", "kept");
    });
    let messages: Vec<Value> = lines.iter().map(|l| parse(l)["message"].clone()).collect();
    assert_eq!(messages, ["kept by the module directive", "kept"]);
}

#[test]
fn a_bad_filter_says_how_to_write_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = build_subscriber(dir.path(), vec![], "info,=[", None)
        .err()
        .expect("invalid filter");
    assert!(matches!(err, LogError::BadFilter { .. }), "{err:?}");
    assert!(err.to_string().contains("RUST_LOG="), "{err}");
}

#[test]
fn an_unwritable_directory_is_an_error_with_the_fix() {
    // Tests run as root, so permissions do not stop them: a path under a regular file does.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "x").unwrap();
    let err = build_subscriber(&file.join("logs"), vec![], "info", None)
        .err()
        .expect("a directory under a file cannot exist");
    assert!(matches!(err, LogError::Unwritable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("not-a-dir/logs"), "{msg}");
    assert!(msg.contains("set LOG_DIR to a writable directory"), "{msg}");
    assert!(!msg.contains("os error"), "{msg}");
}

#[test]
fn log_files_lists_only_omniflow_logs_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "omniflow.log.2025-03-02",
        "omniflow.log.2024-12-31",
        "omniflow.log.2025-01-15",
        "omniflow.log.bak",
        "other.log.2025-01-01",
    ] {
        fs::write(dir.path().join(name), "").unwrap();
    }
    fs::create_dir(dir.path().join("omniflow.log.2025-01-01")).unwrap();
    let names: Vec<String> = log_files(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "omniflow.log.2024-12-31",
            "omniflow.log.2025-01-15",
            "omniflow.log.2025-03-02"
        ]
    );
    assert!(log_files(&dir.path().join("missing")).is_empty());
}

/// A `MakeWriter` into shared memory, standing in for stderr.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn stderr_gets_redacted_human_lines_at_its_level() {
    let dir = tempfile::tempdir().unwrap();
    let captured = Captured::default();
    let sink = captured.clone();
    let (subscriber, guard) = build(
        dir.path(),
        vec!["stderr-secret".into()],
        parse_filter("info", "test").unwrap(),
        Some((Level::WARN, move || sink.clone())),
    )
    .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!("file only");
        tracing::warn!(token = "stderr-secret", "to both");
    });
    drop(guard);
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("to both"), "{text}");
    assert!(!text.contains("file only"), "{text}");
    assert!(!text.contains("stderr-secret"), "{text}");
    assert!(text.contains(REDACTED), "{text}");
    assert!(
        !text.trim_start().starts_with('{'),
        "human-readable: {text}"
    );
}

#[test]
fn a_failed_log_write_is_kept_with_log_dir_and_its_fix() {
    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    use std::io::Write as _;
    let problem = super::Problem::default();
    let mut w = super::Reporting {
        inner: Full,
        dir: std::path::PathBuf::from("/var/log/omniflow"),
        problem: problem.clone(),
    };
    assert!(w.write(b"a line\n").is_err());
    assert!(w.write(b"another\n").is_err());
    let told = problem
        .lock()
        .unwrap()
        .clone()
        .expect("the failure is kept");
    assert!(told.contains("/var/log/omniflow"), "{told}");
    assert!(told.contains("No space left on device"), "{told}");
    assert!(
        told.contains("set LOG_DIR to a writable directory"),
        "{told}"
    );
}
