//! A private `redis-server` process: tests that kill or restart Redis, or
//! need one configured their own way (TLS, replicas, Sentinel, persistence),
//! never touch the machine's shared instance.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::wait_port;

/// A `redis-server` child process, SIGKILLed when dropped.
pub struct RedisServer {
    args: Vec<OsString>,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// An in-memory server (no snapshots, no append-only file) on a port
    /// that stays usable across [`RedisServer::restart`].
    pub async fn ephemeral() -> Result<Self> {
        Self::ephemeral_with(&[]).await
    }

    /// [`RedisServer::ephemeral`] with more arguments (a password, an
    /// eviction policy...).
    pub async fn ephemeral_with(extra: &[&str]) -> Result<Self> {
        let port = crate::restartable_port();
        let mut args = listen_args(port);
        args.extend(["--save", "", "--appendonly", "no"].map(OsString::from));
        args.extend(extra.iter().map(OsString::from));
        Self::start(args, port).await
    }

    /// A server that loses nothing it acknowledged to a `kill -9`: an
    /// append-only file in `dir`, fsynced on every write; with more
    /// arguments (`--replicaof`...).
    pub async fn durable(port: u16, dir: &Path, extra: &[&str]) -> Result<Self> {
        let mut args = listen_args(port);
        args.extend(
            [
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
            ]
            .map(OsString::from),
        );
        args.push(dir.into());
        args.extend(extra.iter().map(OsString::from));
        Self::start(args, port).await
    }

    /// `redis-server` with these arguments, once something listens on
    /// `port` (the plain or TLS port the arguments name).
    pub async fn start<I, S>(args: I, port: u16) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut server = Self {
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            port,
            child: None,
        };
        server.restart().await?;
        Ok(server)
    }

    /// Starts the process again with the same arguments (after
    /// [`RedisServer::kill9`]; a running one is killed first).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10), "redis-server").await
    }

    /// SIGKILL, as a crash would; waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Killed and not restarted since.
    pub fn is_down(&self) -> bool {
        self.child.is_none()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>` (meaningful for a plain listener).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// `--port <port> --bind 127.0.0.1`.
fn listen_args(port: u16) -> Vec<OsString> {
    ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .map(OsString::from)
        .into()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
