//! A Databricks Jobs API 2.2 emulator (what it models, and from which
//! source: docs/databricks-fidelity.md in the runbridge repository), served
//! by `runbridge emulate` and by this crate's own `databricks-emulator`
//! binary.
//!
//! It is a stand-in for Databricks in demos, tests and benchmarks, not part
//! of the bridge: it serves HTTP (axum) and calls out (reqwest, to play the
//! notebook's callback). Nothing in the bridge's library uses it.
//!
//! Faithful where the bridge and the clients teams already run depend on it
//! (Databricks' SDK, Airflow's provider): request and response shapes of
//! `jobs/run-now`, `jobs/runs/submit`, `jobs/runs/get`, `jobs/runs/get-output`,
//! `jobs/runs/cancel`, `jobs/runs/cancel-all`, `jobs/runs/delete`,
//! `jobs/runs/repair`, `jobs/runs/list`, `jobs/create`, `jobs/get`,
//! `jobs/list`, `jobs/update`, `jobs/reset`, `jobs/delete`; requests read by
//! Databricks' JSON mapping (`request`); error bodies
//! `{"error_code", "message"}`; and `idempotency_token`: the same token always
//! returns the same `run_id`, never a second run (checked and inserted under
//! one lock).
//!
//! A run goes PENDING → RUNNING → TERMINATING → TERMINATED and "executes its
//! notebook" by calling `{url}/resolve?id=<promise_id>&value=<value>`, exactly
//! the Resonate example notebook. Per-job behaviour comes from the job's tags
//! (`emulator.outcome`, `emulator.delay_ms`, `emulator.value`) or from
//! `--job ID:OUTCOME[:DELAY_MS]`; API faults from `--fault-*` flags, from
//! `POST /emulator/faults`, or exactly scripted with `POST /emulator/inject`.

mod api;
pub mod cli;
mod control;
mod execute;
mod gate;
mod jobs;
mod launch;
mod model;
mod repair;
mod request;
mod runs;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;

pub use model::{
    Behaviour, Emulator, EmulatorSettings, Faults, NotifyTarget, OAuthClient, Outcome,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the emulator on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    emu: Arc<Emulator>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "databricks emulator listening");
    emu.set_shutdown(shutdown.clone());
    if let Ok(mut b) = emu.base_url.lock() {
        *b = format!("http://{addr}");
    }
    axum::serve(listener, api::router(emu))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
