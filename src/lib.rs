//! OmniFlow: run LLM automations (blueprints) through a priority pool, record every run in
//! SQLite, and watch it all from a terminal console. See `docs/architecture.md`.

pub mod blueprint;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod export;
pub mod ids;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod notify;
pub mod pool;
pub mod providers;
pub mod queue;
pub mod retry;
pub mod schedule;
pub mod store;
pub mod supabase;
pub mod telemetry;
pub mod template;
pub mod text;
pub mod tui;
