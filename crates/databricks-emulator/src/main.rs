//! `databricks-emulator`: the Jobs API 2.2 emulator on its own, for anyone
//! testing a Databricks integration. Stops on SIGINT or SIGTERM.

use clap::Parser;
use databricks_emulator::cli::{self, ParamNames};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "databricks-emulator",
    version,
    about = "A Databricks Jobs API 2.2 emulator"
)]
struct Cli {
    #[command(flatten)]
    args: cli::Args,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        on_signal.cancel();
    });
    match cli::run(
        Cli::parse().args,
        "127.0.0.1:8089",
        ParamNames::default(),
        shutdown,
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
