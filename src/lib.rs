//! tenant-operator: a Kubernetes operator for schema-per-tenant Postgres.
//!
//! The library holds everything; `main.rs` only parses flags and starts it.

pub mod api;
pub mod backup;
pub mod cli;
pub mod controller;
pub mod crypto;
pub mod keys;
pub mod leader;
pub mod names;
pub mod pg;
pub mod ratelimit_config;
pub(crate) mod sensitive;
pub mod telemetry;
