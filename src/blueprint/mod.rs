//! Blueprints: the typed model, loading from JSON and TOML, the JSON Schema and the validator.
//!
//! ```no_run
//! use omniflow::blueprint::{load_file, resolve};
//! use std::path::Path;
//! let max_bytes = omniflow::limits::DEFAULT_MAX_BLUEPRINT_BYTES; // MAX_BLUEPRINT_BYTES
//! let path = resolve("tech-digest", Path::new("blueprints"), max_bytes)?;
//! let blueprint = load_file(&path, max_bytes)?;
//! # Ok::<(), omniflow::blueprint::LoadError>(())
//! ```

// User input must never panic: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod load;
mod model;
mod problem;
mod schema;
mod validate;
mod walk;
mod zone;

pub(crate) use load::json_outside_strings;
pub use load::{
    check_size, count_values, load_dir, load_file, load_str, load_value, parse_document, read_text,
    resolve, Format, LoadError, Oversize,
};
pub use model::*;
pub use problem::Problem;
pub use schema::{schema, ProviderName, CHANNELS, HTTP_METHODS, ID_PATTERN, NODE_TYPES, PROVIDERS};
pub use validate::{parse_duration, validate};
pub use zone::{parse_timezone, Zone};
// The scheduler checks a schedule the way the validator does, and suggests time
// zone names the way the validator suggests field names.
pub(crate) use problem::did_you_mean;
pub(crate) use validate::check_cron;
