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

/// An engine of this process on `db`'s fleet with `concurrency` workers, on a runtime of its
/// own (the engine is built inside it, so its fleet's tasks run there). Keep the directory
/// (its logs) until the end.
pub(crate) fn fleet_engine(
    db: &crate::store::pg::testing::ScratchDb,
    concurrency: usize,
) -> (
    tokio::runtime::Runtime,
    crate::engine::Engine,
    tempfile::TempDir,
) {
    fleet_engine_with(db, concurrency, &[])
}

/// [`fleet_engine`] with more settings (`LEASE_TIMEOUT`, …).
pub(crate) fn fleet_engine_with(
    db: &crate::store::pg::testing::ScratchDb,
    concurrency: usize,
    settings: &[(&str, &str)],
) -> (
    tokio::runtime::Runtime,
    crate::engine::Engine,
    tempfile::TempDir,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut vars: std::collections::HashMap<String, String> = [
        ("DATABASE_URL", db.url().to_string()),
        ("LOG_DIR", dir.path().join("logs").display().to_string()),
        ("CONCURRENCY", concurrency.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    vars.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = crate::config::Config::from_vars(&vars).unwrap();
    let store = crate::store::Store::open_postgres(db.target()).unwrap();
    let engine = {
        let _in = rt.enter();
        crate::engine::Engine::new(
            std::sync::Arc::new(config),
            store,
            crate::events::EventBus::new(),
        )
    };
    (rt, engine, dir)
}
