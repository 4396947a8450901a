//! `omniflow schema`, `omniflow backup` and `omniflow migrate`: the blueprint schema and the history database.

use super::*;

pub fn schema() -> Result<ExitCode, Failure> {
    say_out!(
        "{}",
        serde_json::to_string_pretty(&blueprint::schema()).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn backup(args: BackupArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    if let crate::store::Location::Postgres(target) = config.database().map_err(Failure::input)? {
        return Err(Failure::input(format!(
            "omniflow backup copies the SQLite file at DB_FILE; this omniflow uses PostgreSQL \
             at {} (DATABASE_URL): back it up with `pg_dump -Fc -f omniflow.dump \"$DATABASE_URL\"` \
             and restore with `pg_restore -d \"$DATABASE_URL\" omniflow.dump`",
            target.shown()
        )));
    }
    if !config.db_file.exists() {
        return Err(Failure::input(format!(
            "no history database at {} (DB_FILE); nothing to back up",
            config.db_file.display()
        )));
    }
    match Store::open(&config.db_file) {
        Ok(store) => store
            .backup(&args.file)
            .map_err(|e| Failure::input(e.to_string())),
        // A damaged file is not opened for writing; its pages are copied as they are.
        Err(crate::store::StoreError::Malformed { .. }) => {
            crate::store::backup_file(&config.db_file, &args.file).map_err(|e| {
                Failure::input(format!(
                    "{} is damaged and cannot be copied page by page ({e}); recover what can \
                     be read with `sqlite3 {} .recover > rescued.sql`, then point DB_FILE at a \
                     fresh file",
                    config.db_file.display(),
                    config.db_file.display()
                ))
            })
        }
        Err(e) => Err(Failure::input(e.to_string())),
    }?;
    say_err!(
        "backed up {} to {}",
        config.db_file.display(),
        args.file.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn migrate(args: crate::cli::MigrateArgs) -> Result<ExitCode, Failure> {
    let config = load_config()?;
    let url = args.to.clone().or_else(|| config.database_url.clone()).ok_or_else(|| {
        Failure::input(
            "migrate needs the PostgreSQL database to copy into: \
             omniflow migrate --to postgres://USER:PASSWORD@HOST:5432/DATABASE (or set DATABASE_URL)",
        )
    })?;
    let target = crate::store::PgTarget::parse(&url).map_err(Failure::input)?;
    let from = args.from.unwrap_or_else(|| config.db_file.clone());
    if !from.exists() {
        return Err(Failure::input(format!(
            "no SQLite history at {} (DB_FILE or --from): nothing to copy",
            from.display()
        )));
    }
    say_err!("copying {} into {} …", from.display(), target.shown());
    let copied = crate::store::pg::import::import_sqlite(&from, &target)
        .map_err(|e| Failure::input(e.to_string()))?;
    if args.json {
        say_out!(
            "{}",
            serde_json::to_string(&json!({
                "from": from,
                "to": target.shown(),
                "tables": copied,
            }))
            .unwrap_or_default()
        );
    } else {
        for c in &copied {
            let already = c.read.saturating_sub(c.written);
            say_out!(
                "  {:<20} {:>8} copied{}",
                c.label,
                c.written,
                if already > 0 {
                    format!(" ({already} already there)")
                } else {
                    String::new()
                }
            );
        }
        say_out!(
            "done: point every omniflow at it with DATABASE_URL (running it again copies only what is new)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
