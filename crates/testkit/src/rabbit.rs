//! `rabbitmqctl`, and a private RabbitMQ node: the chaos harness kills one,
//! the TLS tests give one an `amqps` listener, the scale tests cluster three.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::restartable_port;

/// `rabbitmqctl` against the machine's shared node, or with `node` a
/// private one; an error carries its stderr.
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

/// A private RabbitMQ node for the fault that kills the broker itself: its
/// own node name, AMQP and distribution ports bound to 127.0.0.1, data and
/// log directories under the run's folder, no plugins. It runs as the
/// `rabbitmq` user like the packaged server (which is how `rabbitmqctl -n`
/// reaches it with the installed Erlang cookie), so starting it needs root.
/// Its quorum queues live on disk: a `kill -9` loses nothing confirmed.
///
/// With [`NodeTls`] it listens for AMQP over TLS only (no plain listener):
/// `port` is then the `amqps://` port.
pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// PEM files for a node's TLS listener (copied into its directory, which the
/// `rabbitmq` user owns).
pub struct NodeTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl RabbitNode {
    const SERVER: &'static str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

    /// `name` is the node name's first part (`<name>@localhost`).
    pub fn new(name: &str, dir: PathBuf, tls: Option<&NodeTls>) -> Result<Self> {
        if !std::path::Path::new(Self::SERVER).exists() {
            bail!(
                "the node fault needs a local RabbitMQ installation ({} not found); \
                 leave it out with --faults",
                Self::SERVER
            );
        }
        let uid = std::process::Command::new("id").arg("-u").output()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            bail!(
                "the node fault runs a private RabbitMQ node as the rabbitmq user, \
                 which needs root; leave it out with --faults"
            );
        }
        for d in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let port = restartable_port();
        let conf = match tls {
            None => format!("listeners.tcp.1 = 127.0.0.1:{port}\n"),
            Some(t) => {
                for (from, to) in [
                    (&t.ca_file, "ca.pem"),
                    (&t.cert_file, "server.pem"),
                    (&t.key_file, "server.key"),
                ] {
                    std::fs::copy(from, dir.join(to))
                        .with_context(|| format!("copying {}", from.display()))?;
                }
                let d = dir.display();
                format!(
                    "listeners.tcp = none\n\
                     listeners.ssl.1 = 127.0.0.1:{port}\n\
                     ssl_options.cacertfile = {d}/ca.pem\n\
                     ssl_options.certfile = {d}/server.pem\n\
                     ssl_options.keyfile = {d}/server.key\n\
                     ssl_options.verify = verify_none\n\
                     ssl_options.fail_if_no_peer_cert = false\n"
                )
            }
        };
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        // An empty env file: the packaged one pins the shared node's name.
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let chown = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()?;
        if !chown.success() {
            bail!("chown of {} to the rabbitmq user failed", dir.display());
        }
        Ok(Self {
            name: format!("{name}@localhost"),
            port,
            dist_port: restartable_port(),
            dir,
            child: None,
        })
    }

    pub async fn start(&mut self) -> Result<()> {
        let d = self.dir.display();
        let script = format!(
            "cd /var/lib/rabbitmq && \
             RABBITMQ_CONF_ENV_FILE={d}/rabbitmq-env.conf RABBITMQ_NODENAME={name} \
             RABBITMQ_NODE_PORT={port} RABBITMQ_DIST_PORT={dist} \
             RABBITMQ_CONFIG_FILE={d}/rabbitmq.conf RABBITMQ_MNESIA_BASE={d}/mnesia \
             RABBITMQ_LOG_BASE={d}/log RABBITMQ_ENABLED_PLUGINS_FILE={d}/enabled_plugins \
             RABBITMQ_PID_FILE={d}/pid ERL_EPMD_ADDRESS=127.0.0.1 \
             ERL_FLAGS='-kernel inet_dist_use_interface {{127,0,0,1}}' \
             exec {server}",
            name = self.name,
            port = self.port,
            dist = self.dist_port,
            server = Self::SERVER,
        );
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))?;
        let child = Command::new("su")
            .args(["rabbitmq", "-s", "/bin/sh", "-c", &script])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the private RabbitMQ node")?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(90) {
            if rabbitmqctl(Some(&self.name), &["await_startup", "-t", "2"]).is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "private RabbitMQ node {} did not start; see {}/stdout.log",
            self.name,
            d
        )
    }

    /// Killed (or never started) and not restarted since.
    pub fn is_down(&self) -> bool {
        self.child.is_none()
    }

    /// Makes this (started) node a member of `other`'s cluster. The nodes
    /// share the `rabbitmq` user's Erlang cookie; this node's own data is
    /// reset first.
    pub fn join(&self, other: &RabbitNode) -> Result<()> {
        rabbitmqctl(Some(&self.name), &["stop_app"])?;
        rabbitmqctl(Some(&self.name), &["reset"])?;
        rabbitmqctl(Some(&self.name), &["join_cluster", &other.name])?;
        rabbitmqctl(Some(&self.name), &["start_app"])?;
        rabbitmqctl(Some(&self.name), &["await_startup", "-t", "60"])?;
        Ok(())
    }

    /// The AMQP URL of this node for the default vhost.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node that leads a quorum queue, asked of this node.
    pub fn queue_leader(&self, queue: &str) -> Result<String> {
        let out = rabbitmqctl(
            Some(&self.name),
            &["list_queues", "-q", "--no-table-headers", "name", "leader"],
        )?;
        out.lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .with_context(|| format!("no leader reported for {queue}: {out}"))
    }

    /// The Erlang VM, not the `su` wrapper: SIGKILL, as a crash would.
    pub fn kill9_now(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status();
        }
    }

    pub async fn kill9(&mut self) {
        self.kill9_now();
        if let Some(mut c) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
        let _ = std::fs::remove_file(self.dir.join("pid"));
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.kill9_now();
    }
}
