//! The PostgreSQL side of the store (`DATABASE_URL=postgres://…`): the same tables and
//! transitions as SQLite, for a fleet of processes on one database.

pub mod connect;
pub mod limits;
pub mod listen;
pub mod queue;
#[doc(hidden)]
pub mod testing;

pub use connect::{is_postgres_url, PgTarget, Tls};
