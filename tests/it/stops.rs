//! A clean stop is quiet: every long-running subcommand, stopped with
//! SIGINT or SIGTERM after it started, exits 0 and logs no WARN or ERROR
//! line on its way out.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

/// Runs `cmd`, waits until `ready` says so, sends `signal`, and returns the
/// exit code and the lines logged after the signal.
async fn stop_after_ready<F, Fut>(
    mut cmd: tokio::process::Command,
    signal: &str,
    ready: F,
) -> (i32, Vec<String>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut child = cmd
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runbridge runs");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    for out in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(out).lines();
            while let Ok(Some(l)) = r.next_line().await {
                lines.lock().unwrap().push(l);
            }
        });
    }
    eventually(Duration::from_secs(30), "started", || async {
        ready().await.then_some(())
    })
    .await;
    // Let it settle into its loops (consumers, leases, relays).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = lines.lock().unwrap().len();
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("stopped within 30 s")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = lines.lock().unwrap()[before..].to_vec();
    (status.code().unwrap_or(-1), after)
}

fn loud(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .collect()
}

#[tokio::test]
async fn clean_stops_log_no_warning_or_error() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    for (sub, signal) in [
        ("all", "-INT"),
        ("worker", "-TERM"),
        ("sidecar", "-INT"),
        ("emulate", "-TERM"),
    ] {
        let port = free_port();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_runbridge"));
        cmd.arg(sub)
            .envs(app.env_vars())
            .env("RUNBRIDGE__SIDECAR__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "RUNBRIDGE__SIDECAR__PUBLIC_URL",
                format!("http://127.0.0.1:{port}"),
            )
            .env("RUNBRIDGE__EMULATOR__LISTEN", format!("127.0.0.1:{port}"));
        if sub == "worker" {
            // The worker's only HTTP: its /metrics and /healthz.
            cmd.env(
                "RUNBRIDGE__WORKER__METRICS_LISTEN",
                format!("127.0.0.1:{port}"),
            );
        }
        let up = if sub == "emulate" {
            format!("http://127.0.0.1:{port}/emulator/stats")
        } else {
            format!("http://127.0.0.1:{port}/healthz")
        };
        let (code, after) = stop_after_ready(cmd, signal, || {
            let up = up.clone();
            async move {
                reqwest::get(&up)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        assert_eq!(code, 0, "runbridge {sub}: {after:#?}");
        assert!(
            loud(&after).is_empty(),
            "runbridge {sub} stopped with {signal} logged: {:#?}",
            loud(&after)
        );
    }
    app.stop().await;
}
