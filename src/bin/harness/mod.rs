//! What the two harness binaries (`chaos`, `bench`) share: talking to the
//! machine's RabbitMQ through `rabbitmqctl`, private RabbitMQ nodes (`node`;
//! the integration tests use it too), finding the runbridge binary, and
//! reading a process's memory.
//! (A folder without `main.rs`, so Cargo does not take it for a binary.)

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

// Not every harness binary starts private nodes (bench does not).
#[allow(dead_code)]
pub mod node;

/// `rabbitmqctl` against the shared node, or with `node` a private one.
pub fn rabbitmqctl(node: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new("rabbitmqctl");
    if let Some(n) = node {
        cmd.args(["-n", n]);
    }
    let out = cmd.args(args).output().context("running rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `runbridge` binary to run: the one given, or the one built next to
/// this harness; an error says how to build it.
pub fn runbridge_bin(given: Option<&PathBuf>, build: &str) -> Result<PathBuf> {
    let bin = match given {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("runbridge"),
    };
    if !bin.exists() {
        bail!("{} not found: build it first (`{build}`)", bin.display());
    }
    Ok(bin)
}

/// Resident memory of a process, KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
