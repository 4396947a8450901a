//! Engines for the engine's own unit tests.

/// An engine on a SQLite history in `dir` with `concurrency` workers, its store, and the
/// history's path.
pub(crate) fn sqlite_engine(
    dir: &std::path::Path,
    concurrency: usize,
) -> (
    crate::engine::Engine,
    crate::store::Store,
    std::path::PathBuf,
) {
    let path = dir.join("history.db");
    let vars: std::collections::HashMap<String, String> = [
        ("DB_FILE", path.display().to_string()),
        ("LOG_DIR", dir.join("logs").display().to_string()),
        ("CONCURRENCY", concurrency.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = crate::config::Config::from_vars(&vars).unwrap();
    let store = crate::store::Store::open(&path).unwrap();
    let engine = crate::engine::Engine::new(
        std::sync::Arc::new(config),
        store.clone(),
        crate::events::EventBus::new(),
    );
    (engine, store, path)
}
