//! `omniflow doctor` on PostgreSQL: can we connect, is the server new enough, where the
//! migrations stand, and may our user create what the next migration needs. Read-only:
//! checking a database never migrates it. Everything shown names the server without its
//! password.

use super::connect::PgTarget;
use super::schema::LATEST;

/// The oldest server the SQL here runs on (`starts_with`, `make_interval`, `ON CONFLICT`).
const MIN_VERSION_NUM: i32 = 110_000;

/// One finding, with what to do when it is not fine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PgCheck {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// What `doctor` found about a PostgreSQL database.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PgReport {
    /// The database as shown (no password).
    pub database: String,
    pub checks: Vec<PgCheck>,
    /// The newest migration applied (0: none), when the database answered.
    pub migrated: Option<i64>,
    pub latest: i64,
}

impl PgReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// Whether `doctor` opens it to count runs and list processes: it answers and holds
    /// OmniFlow's tables (a database not migrated yet is left as it is, as a missing SQLite
    /// file is not created just to be checked).
    pub fn usable(&self) -> bool {
        self.checks
            .iter()
            .filter(|c| c.name == "connection" || c.name == "server")
            .all(|c| c.ok)
            && self.migrated.is_some_and(|m| (1..=LATEST).contains(&m))
    }
}

/// Checks `target` on a thread of its own (the driver must not run on a caller's runtime).
pub fn check(target: &PgTarget) -> PgReport {
    let t = target.clone();
    std::thread::spawn(move || check_here(&t))
        .join()
        .unwrap_or_else(|_| PgReport {
            database: target.shown().to_string(),
            checks: vec![PgCheck {
                name: "connection",
                ok: false,
                detail: "checking the database panicked".into(),
            }],
            migrated: None,
            latest: LATEST,
        })
}

fn check_here(target: &PgTarget) -> PgReport {
    let mut report = PgReport {
        database: target.shown().to_string(),
        checks: Vec::new(),
        migrated: None,
        latest: LATEST,
    };
    let mut client = match target.connect() {
        Ok(c) => c,
        Err(message) => {
            report.checks.push(PgCheck {
                name: "connection",
                ok: false,
                detail: message,
            });
            return report;
        }
    };
    let describe = |e: postgres::Error, doing: &str| super::connect::describe(&e, target, doing);
    let who = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
    report.checks.push(match who {
        Ok((user, db)) => PgCheck {
            name: "connection",
            ok: true,
            detail: format!(
                "connected to database {db} as {user} (sslmode={})",
                match target.tls() {
                    super::connect::Tls::Disable => "disable",
                    super::connect::Tls::Prefer => "prefer",
                    super::connect::Tls::Require => "require",
                    super::connect::Tls::Verify { .. } => "verify",
                }
            ),
        },
        Err(e) => PgCheck {
            name: "connection",
            ok: false,
            detail: describe(e, "query"),
        },
    });

    let version = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)));
    report.checks.push(match version {
        Ok((num, text)) if num >= MIN_VERSION_NUM => PgCheck {
            name: "server",
            ok: true,
            detail: format!("PostgreSQL {text}"),
        },
        Ok((_, text)) => PgCheck {
            name: "server",
            ok: false,
            detail: format!("PostgreSQL {text} is too old: OmniFlow needs PostgreSQL 11 or newer"),
        },
        Err(e) => PgCheck {
            name: "server",
            ok: false,
            detail: describe(e, "read the version"),
        },
    });

    let migrated = client
        .query_one("SELECT to_regclass('omniflow_migrations') IS NOT NULL", &[])
        .and_then(|r| {
            if r.get::<_, bool>(0) {
                super::schema::applied(&mut client)
            } else {
                Ok(0)
            }
        });
    report.checks.push(match migrated {
        Ok(m) => {
            report.migrated = Some(m);
            if m == LATEST {
                PgCheck {
                    name: "migrations",
                    ok: true,
                    detail: format!("{m} of {LATEST} applied"),
                }
            } else if m < LATEST {
                // Not a problem: the next omniflow that opens it applies them.
                PgCheck {
                    name: "migrations",
                    ok: true,
                    detail: format!(
                        "{m} of {LATEST} applied; the next omniflow command applies the rest \
                         (its user needs CREATE on the schema)"
                    ),
                }
            } else {
                PgCheck {
                    name: "migrations",
                    ok: false,
                    detail: format!(
                        "migrated by a newer omniflow ({m}, this one knows up to {LATEST}): \
                         upgrade omniflow on this host"
                    ),
                }
            }
        }
        Err(e) => PgCheck {
            name: "migrations",
            ok: false,
            detail: describe(e, "read the migrations"),
        },
    });

    let privileges = client
        .query_one(
            "SELECT current_user::text, current_schema()::text,
                    has_schema_privilege(current_schema(), 'CREATE'),
                    has_schema_privilege(current_schema(), 'USAGE'),
                    to_regclass('runner_executions') IS NULL
                        OR has_table_privilege('runner_executions', 'SELECT, INSERT, UPDATE')",
            &[],
        )
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, bool>(2),
                r.get::<_, bool>(3),
                r.get::<_, bool>(4),
            )
        });
    let fully = report.migrated == Some(LATEST);
    report.checks.push(match privileges {
        Ok((user, schema, create, usage, tables)) => {
            let schema = schema.unwrap_or_else(|| "public".into());
            let fix = format!(
                "run as the database's owner: GRANT USAGE, CREATE ON SCHEMA {schema} TO {user};"
            );
            if !usage || !tables {
                PgCheck {
                    name: "privileges",
                    ok: false,
                    detail: format!(
                        "{user} cannot read and write OmniFlow's tables in schema {schema}: {fix} \
                         and GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {user};"
                    ),
                }
            } else if !create && !fully {
                PgCheck {
                    name: "privileges",
                    ok: false,
                    detail: format!(
                        "{user} may not create tables in schema {schema}, so the migrations cannot \
                         be applied: {fix}"
                    ),
                }
            } else {
                PgCheck {
                    name: "privileges",
                    ok: true,
                    detail: if create {
                        format!("{user} may create tables in schema {schema} (migrations)")
                    } else {
                        format!(
                            "{user} reads and writes the tables; it may not create tables, so a \
                             later omniflow's migrations need the owner once: {fix}"
                        )
                    },
                }
            }
        }
        Err(e) => PgCheck {
            name: "privileges",
            ok: false,
            detail: describe(e, "read the privileges"),
        },
    });
    // Dropped here, on this thread: dropping a client drives the driver's runtime.
    drop(client);
    report
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::pg::testing::ScratchDb;

    fn server(report: &PgReport) -> PgCheck {
        report
            .checks
            .iter()
            .find(|c| c.name == "server")
            .cloned()
            .unwrap()
    }

    /// A server older than PostgreSQL 11 is named as too old (the SQL here would fail on
    /// it), and the database is not used; this one is fine. The old server is this one made
    /// to report 9.6: in the scratch database, `current_setting` of `public`, looked up
    /// before the catalog's, says so.
    #[test]
    fn doctor_names_a_server_older_than_11_too_old() {
        let Some(db) = ScratchDb::new("doctor_old_server") else {
            return;
        };
        let report = check(db.target());
        let now = server(&report);
        assert!(now.ok, "{}", now.detail);
        assert!(now.detail.starts_with("PostgreSQL "), "{}", now.detail);

        // Migrated, so that only the server's age can keep `doctor` from using it.
        let mut c = db.target().connect().unwrap();
        crate::store::pg::schema::migrate(&mut c, db.target()).unwrap();
        assert!(check(db.target()).usable());
        c.batch_execute(&format!(
            "CREATE FUNCTION public.current_setting(text) RETURNS text LANGUAGE sql AS $$
                 SELECT CASE $1 WHEN 'server_version_num' THEN '90624'
                                WHEN 'server_version' THEN '9.6.24'
                                ELSE pg_catalog.current_setting($1) END $$;
             ALTER DATABASE \"{}\" SET search_path = public, pg_catalog",
            db.name()
        ))
        .unwrap();
        drop(c);
        let report = check(db.target());
        let old = server(&report);
        assert!(!old.ok, "a 9.6 server passed: {}", old.detail);
        assert_eq!(
            old.detail,
            "PostgreSQL 9.6.24 is too old: OmniFlow needs PostgreSQL 11 or newer"
        );
        assert!(!report.ok());
        assert!(!report.usable());
    }
}
