//! What can go wrong with the history database, worded for the person who has to fix it.
//!
//! Backend-neutral: no SQLite or PostgreSQL type appears here. A driver's error is kept as a
//! [`DbError`] (its text and its [`StoreErrorKind`]), and [`StoreError::kind`] says what a caller
//! can do about a failure without knowing which database is behind the store.

use std::path::PathBuf;

/// What kind of failure a [`StoreError`] is, whichever database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// Another writer held the database for too long; trying again later may work.
    Busy,
    /// No room left where the database lives.
    Full,
    /// The database, or a row in it, is not what this build can read.
    Corrupt,
    /// The database cannot be reached or opened (server down, bad address, permissions).
    Unavailable,
    /// A newer omniflow migrated the database; this build refuses to touch it.
    Newer,
    /// No such run, or an id prefix that matches several.
    NotFound,
    /// What was asked does not apply to this database (an SQLite file copy on PostgreSQL).
    Unsupported,
    /// Anything else the database reported.
    Other,
}

/// A database driver's error, carried without its type: its message and its kind.
#[derive(Debug)]
pub struct DbError {
    kind: StoreErrorKind,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl DbError {
    pub(crate) fn new(
        kind: StoreErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> DbError {
        DbError {
            kind,
            source: source.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        use rusqlite::ErrorCode as C;
        let kind = match e.sqlite_error_code() {
            Some(C::DatabaseBusy | C::DatabaseLocked) => StoreErrorKind::Busy,
            Some(C::DiskFull) => StoreErrorKind::Full,
            Some(C::DatabaseCorrupt | C::NotADatabase) => StoreErrorKind::Corrupt,
            Some(C::CannotOpen | C::ReadOnly | C::PermissionDenied) => StoreErrorKind::Unavailable,
            _ => StoreErrorKind::Other,
        };
        DbError::new(kind, e)
    }
}

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
        source: DbError,
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
        source: DbError,
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
        "{place} holds a value this omniflow does not understand ({detail}): fix or delete that row, or point {setting} at another database"
    )]
    Corrupt {
        /// The file, or the PostgreSQL database as shown (without its password).
        place: String,
        /// `DB_FILE` or `DATABASE_URL`.
        setting: &'static str,
        detail: String,
    },

    /// `omniflow backup` could not write its copy.
    #[error("cannot back up {} to {}: {source}: check that the destination directory exists and is writable", from.display(), dest.display())]
    Backup {
        from: PathBuf,
        dest: PathBuf,
        #[source]
        source: BackupFailure,
    },

    /// PostgreSQL cannot be reached, or refused us: the message names the server (never the
    /// password) and the fix.
    #[error("{message}")]
    Unavailable { message: String },

    /// A PostgreSQL database migrated by a newer omniflow.
    #[error(
        "the PostgreSQL database {place} was migrated by a newer omniflow (migration {found}, this omniflow knows up to {known}): upgrade omniflow, or point DATABASE_URL at another database"
    )]
    NewerMigrations {
        place: String,
        found: i64,
        known: i64,
    },

    /// Something only an SQLite file has (a file copy, a page check), asked of PostgreSQL.
    #[error("{what} works on the SQLite file at DB_FILE; this omniflow uses PostgreSQL (DATABASE_URL): {instead}")]
    NotOnPostgres {
        what: &'static str,
        instead: &'static str,
    },

    /// The store's writer thread is gone (it stops only when the store is dropped, so it
    /// panicked): nothing more can be saved by this process.
    #[error(
        "database {place} failed while {doing}: the store's writer thread has stopped (the log says why), so nothing more is saved: restart omniflow"
    )]
    WriterStopped {
        /// The file, or the PostgreSQL database as shown (without its password).
        place: String,
        doing: &'static str,
    },

    /// Any other database failure, with what the store was doing.
    #[error("database {place} failed while {doing}: {source}")]
    Database {
        /// The file, or the PostgreSQL database as shown (without its password).
        place: String,
        doing: &'static str,
        #[source]
        source: DbError,
    },
}

impl StoreError {
    /// What kind of failure this is, the same for SQLite and PostgreSQL.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::NotADatabase { .. } | StoreError::Malformed { .. } => {
                StoreErrorKind::Corrupt
            }
            StoreError::Corrupt { .. } => StoreErrorKind::Corrupt,
            StoreError::NewerSchema { .. } | StoreError::NewerMigrations { .. } => {
                StoreErrorKind::Newer
            }
            StoreError::CreateDir { .. } | StoreError::Unwritable { .. } => {
                StoreErrorKind::Unavailable
            }
            StoreError::Unavailable { .. } | StoreError::WriterStopped { .. } => {
                StoreErrorKind::Unavailable
            }
            StoreError::DiskFull { .. } => StoreErrorKind::Full,
            StoreError::NotFound(_) | StoreError::Ambiguous { .. } => StoreErrorKind::NotFound,
            StoreError::NotOnPostgres { .. } => StoreErrorKind::Unsupported,
            StoreError::Backup { source, .. } => match source {
                BackupFailure::Database(e) => e.kind(),
                BackupFailure::Io(_) | BackupFailure::SameFile => StoreErrorKind::Other,
            },
            StoreError::Database { source, .. } => source.kind(),
        }
    }
}

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupFailure {
    #[error(transparent)]
    Database(DbError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the destination is the database itself")]
    SameFile,
}

impl From<rusqlite::Error> for BackupFailure {
    fn from(e: rusqlite::Error) -> BackupFailure {
        BackupFailure::Database(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller walking a store error's causes gets past the driver's message (already in
    /// the text) to the driver's own cause: here SQLite's error with its code.
    #[test]
    fn a_database_error_leads_to_the_driver_s_cause() {
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
            Some("attempt to write a readonly database".into()),
        );
        let err = StoreError::Database {
            place: "history.db".into(),
            doing: "saving",
            source: e.into(),
        };
        let db = std::error::Error::source(&err).expect("the database's error");
        let cause = db.source().expect("the driver's cause");
        let sqlite = cause
            .downcast_ref::<rusqlite::ffi::Error>()
            .unwrap_or_else(|| panic!("the cause is SQLite's error: {cause:?}"));
        assert_eq!(sqlite.code, rusqlite::ErrorCode::ReadOnly);
    }
}
