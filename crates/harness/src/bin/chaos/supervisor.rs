//! The runbridge processes under test: each is restarted whenever it exits
//! (killed by a fault, aborted at a crash point, or failed at start-up during
//! an outage) until the run stops them with SIGTERM, and every exit is
//! recorded for the invariant check.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use runbridge_harness::rss_kib;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// The processes, shared by the supervisor, the faults and the sampler.
pub type Procs = Arc<Mutex<Vec<Proc>>>;

/// A supervised child process: restarted whenever it exits, until stopped.
pub struct Proc {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub exits: Vec<String>,
    pub killed_by_us: usize,
    /// Armed for the next start only: a crash point that fires on first pass.
    pub next_failpoint: Option<String>,
}

impl Proc {
    /// A process not started yet.
    pub fn new(
        name: String,
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Self {
        Self {
            name,
            program,
            args,
            env,
            log,
            child: None,
            exits: vec![],
            killed_by_us: 0,
            next_failpoint: None,
        }
    }

    /// SIGKILL now (the supervisor restarts it), counted as ours.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
            self.killed_by_us += 1;
        }
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut env = self.env.clone();
        if let Some(fp) = self.next_failpoint.take() {
            env.retain(|(k, _)| k != "RUNBRIDGE_FAILPOINTS");
            env.push(("RUNBRIDGE_FAILPOINTS".into(), format!("{fp}=abort")));
        }
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }
}

fn exit_kind(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(9)) => "SIGKILL".into(),
        (_, Some(6)) => "SIGABRT".into(),
        (_, Some(n)) => format!("signal {n}"),
        _ => "unknown".into(),
    }
}

/// Restarts every exited process, every 400 ms, until `stop`.
pub async fn supervise(procs: Procs, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        {
            let mut ps = procs.lock().await;
            for p in ps.iter_mut() {
                let exited = match p.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => Some(exit_kind(&status)),
                    _ => None,
                };
                if let Some(kind) = exited {
                    p.exits.push(kind);
                    p.child = None;
                }
                if p.child.is_none()
                    && let Err(e) = p.spawn()
                {
                    eprintln!("[chaos] cannot restart {}: {e}", p.name);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

/// Worker memory: `VmRSS` of every live worker process every 2 s, until
/// `stop`, as (seconds since start, pid, KiB).
pub async fn sample_rss(procs: Procs, stop: Arc<AtomicBool>) -> Vec<(f64, u32, u64)> {
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for p in procs
            .lock()
            .await
            .iter()
            .filter(|p| p.name.starts_with("worker"))
        {
            if let Some(pid) = p.child.as_ref().and_then(Child::id)
                && let Some(kb) = rss_kib(pid)
            {
                samples.push((t0.elapsed().as_secs_f64(), pid, kb));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    samples
}

/// Stops every process with SIGTERM and records how each ended (a clean
/// stop is `final exit 0`).
pub async fn stop_all(ps: &mut [Proc]) {
    for p in ps.iter_mut() {
        if let Some(c) = p.child.as_mut()
            && let Some(pid) = c.id()
        {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for p in ps.iter_mut() {
        if let Some(mut c) = p.child.take() {
            match tokio::time::timeout(Duration::from_secs(30), c.wait()).await {
                Ok(Ok(s)) => p.exits.push(format!("final {}", exit_kind(&s))),
                _ => p.exits.push("final: did not stop on SIGTERM".into()),
            }
        }
    }
}
