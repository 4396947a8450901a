//! The PostgreSQL side of the store (`DATABASE_URL=postgres://…`): the same tables and
//! transitions as SQLite, for a fleet of processes on one database.

pub(crate) mod backend;
pub(crate) mod claims;
pub mod connect;
pub mod doctor;
pub mod events;
pub mod fleet_view;
pub mod import;
pub(crate) mod lease;
pub mod limits;
pub mod listen;
pub(crate) mod ops;
pub mod pool;
pub mod queue;
pub(crate) mod read;
pub mod schema;
#[doc(hidden)]
pub mod testing;

pub use connect::{is_postgres_url, PgTarget, Tls};
