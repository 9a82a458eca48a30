//! runbridge: RabbitMQ triggers → Databricks runs → durable promises in Redis →
//! completion events on RabbitMQ. See ARCHITECTURE.md for the map.
//!
//! Boundary modules (each the only one importing its client library):
//! `broker` (lapin), `store` (redis), `databricks` (reqwest), `sidecar` (axum).
//! The core (`domain`, `worker`, `relay`) works through their traits.

pub mod audit;
pub mod broker;
pub mod check;
pub mod config;
pub mod databricks;
pub mod domain;
/// The Databricks emulator (`runbridge emulate`), a crate of its own.
pub use databricks_emulator as emulator;
pub mod failpoint;
pub mod join;
pub mod keys;
pub mod partitions;
pub mod reconciler;
pub mod redact;
pub mod relay;
pub mod retry;
pub mod schemas;
pub mod shutdown;
pub mod sidecar;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod worker;
