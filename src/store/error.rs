//! What can go wrong with the history database, worded for the person who has to fix it.

use std::path::PathBuf;

/// A store failure as a user sees it: each message names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `DB_FILE` exists but holds something else than an SQLite database.
    #[error(
        "{} is not an SQLite database (file is not a database): point DB_FILE at another file or move it away",
        path.display()
    )]
    NotADatabase { path: PathBuf },

    /// The database was migrated by a newer OmniFlow; this build refuses to touch it.
    #[error(
        "{} has schema version {found}, this omniflow knows up to {known}: upgrade omniflow or use another DB_FILE",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },

    /// The directory that should hold `DB_FILE` could not be created.
    #[error(
        "cannot create the directory {} for DB_FILE: {source}: create it or fix its permissions, or point DB_FILE elsewhere",
        dir.display()
    )]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The database file (or its `-wal`/`-shm` companions) cannot be created or written.
    #[error(
        "cannot open {} for writing ({source}): check the permissions of the file and its directory, or point DB_FILE elsewhere",
        path.display()
    )]
    Unwritable {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// SQLite found damaged pages (`PRAGMA quick_check`): nothing is written into such a file.
    #[error(
        "{} is damaged ({detail}); nothing was written to it. Copy out what can still be read \
         (`omniflow backup rescued.db`, or `sqlite3 {} .recover > rescued.sql`), then point \
         DB_FILE at a fresh file (or move this one away)",
        path.display(),
        path.display()
    )]
    Malformed { path: PathBuf, detail: String },

    /// The file system holding the database has no room left.
    #[error(
        "disk full: free space at {} (the history database {} cannot be written: {source})",
        dir.display(),
        path.display()
    )]
    DiskFull {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// No run has this id (and no run id starts with it).
    #[error("no run with id {0} — see `omniflow runs`")]
    NotFound(String),

    /// A prefix matches more than one run.
    #[error(
        "run id prefix {prefix} matches several runs ({}): type more of the id",
        ids.join(", ")
    )]
    Ambiguous {
        prefix: String,
        /// Up to five of the matching ids.
        ids: Vec<String>,
    },

    /// A row holds a value this build does not understand (edited by hand, or corrupted).
    #[error(
        "{} holds a value this omniflow does not understand ({detail}): fix or delete that row, or point DB_FILE at another file",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },

    /// `omniflow backup` could not write its copy.
    #[error("cannot back up {} to {}: {source}: check that the destination directory exists and is writable", from.display(), dest.display())]
    Backup {
        from: PathBuf,
        dest: PathBuf,
        #[source]
        source: BackupFailure,
    },

    /// Any other SQLite failure, with what the store was doing.
    #[error("database {} failed while {doing}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        doing: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupFailure {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the destination is the database itself")]
    SameFile,
}
