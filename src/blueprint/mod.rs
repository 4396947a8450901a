//! Blueprints: the typed model, loading from JSON and TOML, the JSON Schema and the validator.

mod model;

pub use model::*;
