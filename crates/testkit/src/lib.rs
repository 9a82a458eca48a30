//! What runbridge's integration tests (`tests/it`) and its harnesses
//! (`crates/harness`: `chaos`, `bench`) share, so that each lives once:
//!
//! - [`ports`]: free local ports, including ones safe to listen on again
//!   after a restart;
//! - [`wait`]: the bounded [`eventually`] poll and [`wait_port`];
//! - [`redis`]: a private `redis-server` process the caller may kill and
//!   restart;
//! - [`rabbit`]: `rabbitmqctl`, and a private RabbitMQ node (its own name,
//!   ports and data) for faults that kill or cluster brokers.
//!
//! Everything here is test tooling: it never runs in production, and its
//! errors are `anyhow` errors because each one ends the test or the run
//! that hit it.

pub mod ports;
pub mod rabbit;
pub mod redis;
pub mod wait;

pub use ports::{free_port, restartable_port};
pub use rabbit::{NodeTls, RabbitNode, rabbitmqctl};
pub use redis::RedisServer;
pub use wait::{eventually, wait_port};
