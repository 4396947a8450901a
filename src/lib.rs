//! OmniFlow: run LLM automations (blueprints) through a priority pool, record every run in
//! SQLite, and watch it all from a terminal console. See `docs/architecture.md`.

pub mod blueprint;
pub mod config;
pub mod error;
pub mod events;
pub mod template;
