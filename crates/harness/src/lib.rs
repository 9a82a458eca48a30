//! What the two harness binaries (`chaos`, `bench`) share beyond the test
//! kit: where the repository's configuration is, finding the `runbridge`
//! binary they drive, and reading a process's memory.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// The repository's `config/` folder (the harnesses run the `local`
/// environment, as the tests do).
pub fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config")
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
