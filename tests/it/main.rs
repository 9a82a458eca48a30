//! Integration tests: one binary, real RabbitMQ + Redis + the emulator over HTTP.

// Test helpers panic on purpose: a failed set-up step is the test's failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod auth;
mod budget;
mod callbacks;
mod capabilities;
mod check;
mod connections;
mod core_loop;
mod costs;
mod documents;
mod fanout;
mod faults;
mod fidelity;
mod helpers;
mod hostile;
mod lifecycle;
mod listeners;
mod metrics;
mod model;
mod otlp;
mod resonate;
mod retries;
mod scale;
mod search;
mod security;
mod stops;
mod tls;
mod traces;
mod ui;
