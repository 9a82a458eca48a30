//! Configuration: `config/default.toml` (also compiled in), then
//! `config/<RUNBRIDGE_ENV>.toml`, then `RUNBRIDGE__SECTION__KEY` variables, then
//! the standard `DATABRICKS_HOST` / `DATABRICKS_TOKEN`.
//!
//! Secrets are `SecretString`s: their `Debug` prints `[REDACTED]`, so a
//! logged `Settings` shows none of them. [`Settings::validate`] turns every
//! mistake into a sentence an operator can act on, before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::databricks::Credentials;
use crate::keys::Keys;

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The development configuration committed with the source. Compiled in so
/// that its secrets, which anyone can read, are recognised and refused
/// outside development mode wherever they turn up.
const LOCAL_TOML: &str = include_str!("../config/local.toml");

/// Operator tokens and notification passwords shorter than this are
/// refused at start-up (callback secrets need 32 bytes).
pub const MIN_CREDENTIAL_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be loaded: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Development mode (`config/local.toml` sets it): the committed
    /// development secrets are accepted. Off everywhere else, where they
    /// and missing secrets are refused at start-up.
    #[serde(default)]
    pub development: bool,
    pub log: LogSettings,
    #[serde(default)]
    pub telemetry: TelemetrySection,
    pub redis: RedisSection,
    pub amqp: AmqpSection,
    pub worker: WorkerSection,
    pub relay: RelaySection,
    pub sidecar: SidecarSection,
    pub auth: AuthSection,
    pub databricks: DatabricksSection,
    pub emulator: EmulatorSection,
    pub reconciler: ReconcilerSection,
    /// `[workspaces.<name>]`: the same as `[databricks.workspaces.<name>]`
    /// (merged into it at load; a name in both is an error).
    #[serde(default)]
    pub workspaces: BTreeMap<String, WorkspaceSection>,
}

/// `[telemetry]`: trace export.
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySection {
    /// OTLP/HTTP collector base URL; empty: no export.
    #[serde(default)]
    pub otlp_endpoint: String,
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "runbridge".into()
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: default_service_name(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSection {
    pub url: SecretString,
    pub key_prefix: String,
    pub partitions: u32,
    pub pool_size: usize,
    pub response_timeout_ms: u64,
    pub retention_seconds: u64,
    /// PEM CA file for rediss:// (empty: the system's roots).
    #[serde(default)]
    pub tls_ca_file: String,
    #[serde(default)]
    pub mode: RedisMode,
    #[serde(default)]
    pub sentinels: Vec<SecretString>,
    /// Seed nodes of a Redis Cluster (any that answers gives the slot map).
    #[serde(default)]
    pub cluster_nodes: Vec<SecretString>,
    #[serde(default)]
    pub sentinel_master: String,
    /// Replicas each transition must reach (`WAIT`); 0: do not wait.
    #[serde(default)]
    pub wait_replicas: u64,
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
}

fn default_wait_timeout_ms() -> u64 {
    1000
}

/// `redis.mode`: which Redis deployment the store talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum RedisMode {
    /// The Redis at `url`.
    #[default]
    Standalone,
    /// The master that `sentinels` name `sentinel_master`.
    Sentinel,
    /// A Redis Cluster, found through `cluster_nodes` (else `url`).
    Cluster,
}

/// The enums of the configuration read from their names, with a message
/// that lists the names a value may take.
macro_rules! named {
    ($t:ty { $($name:literal => $v:expr),+ $(,)? }) => {
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($name => Ok($v),)+
                    _ => Err(format!(
                        "must be one of {}, got {s:?}",
                        [$(format!("{:?}", $name)),+].join(", ")
                    )),
                }
            }
        }
    };
}

named!(RedisMode { "standalone" => RedisMode::Standalone, "sentinel" => RedisMode::Sentinel, "cluster" => RedisMode::Cluster });
named!(LogFormat { "text" => LogFormat::Text, "json" => LogFormat::Json });
named!(DeadLetterQueueType { "auto" => DeadLetterQueueType::Auto, "classic" => DeadLetterQueueType::Classic, "quorum" => DeadLetterQueueType::Quorum });

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSection {
    pub url: SecretString,
    pub triggers_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// "classic" (browsing costs nothing), "quorum" (replicated), or
    /// "auto": quorum when `urls` names other nodes of a cluster.
    #[serde(default)]
    pub dead_letter_queue_type: DeadLetterQueueType,
    pub events_exchange: String,
    pub control_queue: String,
    pub delivery_limit: u32,
    pub prefetch: u16,
    /// More nodes of the same RabbitMQ cluster, tried when `url`'s is down.
    #[serde(default)]
    pub urls: Vec<SecretString>,
    /// PEM CA file for amqps:// (empty: the system's roots).
    #[serde(default)]
    pub tls_ca_file: String,
}

/// `amqp.dead_letter_queue_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum DeadLetterQueueType {
    /// Quorum with other nodes in `amqp.urls` (a cluster: dead letters
    /// survive a node), else classic (one node: browsing costs nothing).
    #[default]
    Auto,
    Classic,
    Quorum,
}

impl AmqpSection {
    pub fn dead_letter_queue_type(&self) -> crate::broker::QueueType {
        use crate::broker::QueueType;
        match self.dead_letter_queue_type {
            DeadLetterQueueType::Classic => QueueType::Classic,
            DeadLetterQueueType::Quorum => QueueType::Quorum,
            DeadLetterQueueType::Auto if self.urls.is_empty() => QueueType::Classic,
            DeadLetterQueueType::Auto => QueueType::Quorum,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSection {
    pub default_timeout_seconds: u64,
    pub max_timeout_seconds: u64,
    pub requeue_delay_ms: u64,
    pub retries_in_place: u32,
    pub drain_timeout_seconds: u64,
    /// host:port of the worker's `/metrics`; empty: none.
    #[serde(default)]
    pub metrics_listen: String,
    /// How long a partition lease lasts unrenewed (renewed every third).
    #[serde(default = "default_partition_lease_ms")]
    pub partition_lease_ms: u64,
}

fn default_body_timeout_ms() -> u64 {
    10_000
}

fn default_header_timeout_ms() -> u64 {
    10_000
}

fn default_max_connections() -> usize {
    1024
}

fn default_session_idle_seconds() -> u64 {
    1800
}

fn default_session_max_seconds() -> u64 {
    43_200
}

fn default_partition_lease_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
pub struct RelaySection {
    pub batch: usize,
    pub block_ms: u64,
    pub reclaim_idle_ms: u64,
    pub reclaim_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SidecarSection {
    pub listen: String,
    pub public_url: String,
    pub body_limit_bytes: usize,
    /// How long a client may take to send its request body.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// How long a client may take to send a request's head (and, on a
    /// kept-alive connection, to start its next request).
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Connections served at once; more are closed when accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    pub max_wait_seconds: u64,
    /// A console session ends after this long unused, and after
    /// `session_max_seconds` in all.
    #[serde(default = "default_session_idle_seconds")]
    pub session_idle_seconds: u64,
    #[serde(default = "default_session_max_seconds")]
    pub session_max_seconds: u64,
    /// PEM certificate chain and key for HTTPS (both or neither).
    #[serde(default)]
    pub tls_cert_file: String,
    #[serde(default)]
    pub tls_key_file: String,
}

/// PEM files read at start-up, so a missing or unreadable file is a
/// configuration error that names its key.
pub fn read_pem(key: &str, path: &str) -> Result<Option<Vec<u8>>, ConfigError> {
    if path.is_empty() {
        return Ok(None);
    }
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::Invalid(format!("{key}: cannot read {path:?}: {e}")))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::Invalid(format!(
            "{key}: {path:?} is not a PEM file (no -----BEGIN line)"
        )));
    }
    Ok(Some(bytes))
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSection {
    #[serde(default)]
    pub callback_secrets: Vec<SecretString>,
    #[serde(default)]
    pub operator_tokens: Vec<SecretString>,
    /// Basic-auth credentials of Databricks job notification destinations.
    #[serde(default)]
    pub notification_username: String,
    #[serde(default)]
    pub notification_password: Option<SecretString>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkspaceSection {
    pub host: String,
    /// Personal access token (`DATABRICKS_TOKEN`); or OAuth M2M below.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// OAuth machine-to-machine: a service principal's client id and secret
    /// (`DATABRICKS_CLIENT_ID` / `DATABRICKS_CLIENT_SECRET`).
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<SecretString>,
}

impl WorkspaceSection {
    /// The credentials to use: a token, or else a client id and secret;
    /// `None` if neither is complete.
    pub fn auth(&self) -> Option<Credentials> {
        let some = |s: &Option<SecretString>| s.clone().filter(|t| !t.expose_secret().is_empty());
        if let Some(t) = some(&self.token) {
            return Some(Credentials::Token(t));
        }
        match (
            self.client_id.clone().filter(|c| !c.is_empty()),
            some(&self.client_secret),
        ) {
            (Some(client_id), Some(client_secret)) => Some(Credentials::OAuth {
                client_id,
                client_secret,
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabricksSection {
    pub default_workspace: String,
    pub request_timeout_ms: u64,
    pub retry_min_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub retry_max_times: usize,
    pub launch_per_second: f64,
    pub poll_per_second: f64,
    pub cancel_per_second: f64,
    pub burst: u32,
    pub param_promise_id: String,
    pub param_url: String,
    pub param_callback_token: String,
    #[serde(default)]
    pub workspaces: BTreeMap<String, WorkspaceSection>,
}

/// What to do when a run succeeded but nobody called back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoCallbackPolicy {
    /// `REJECTED`, reason `completed_without_callback`.
    Reject,
    /// `RESOLVED` with a null value.
    ResolveNull,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReconcilerSection {
    pub enabled: bool,
    pub tick_ms: u64,
    pub batch: usize,
    pub lease_ms: u64,
    pub first_poll_ms: u64,
    pub max_poll_ms: u64,
    pub grace_ms: u64,
    pub success_without_output: NoCallbackPolicy,
    pub success_with_failures: NoCallbackPolicy,
    #[serde(default)]
    pub output_task_key: String,
    pub cancel_retry_max_ms: u64,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmulatorSection {
    pub listen: String,
}

/// Which parts a subcommand needs validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    Sidecar,
    Client,
}

impl Settings {
    /// Loads the layered configuration from the process environment.
    /// Without `RUNBRIDGE_ENV` the environment is `production`: development
    /// mode is always asked for by name (`RUNBRIDGE_ENV=local`).
    pub fn load() -> Result<Self, ConfigError> {
        let env = std::env::var("RUNBRIDGE_ENV").unwrap_or_else(|_| "production".into());
        let dir = std::env::var("RUNBRIDGE_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| "config".into());
        Self::load_from(&dir, &env, &[])
    }

    /// The compiled-in defaults alone (`config/default.toml`), with no file,
    /// variable or profile applied: what the generated documents describe.
    pub fn defaults() -> Result<Self, ConfigError> {
        Ok(Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .build()?
            .try_deserialize()?)
    }

    /// Loads with explicit overrides (highest priority), as tests do.
    pub fn load_from(
        dir: &std::path::Path,
        env: &str,
        overrides: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        if !env
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || env.is_empty()
        {
            return Err(ConfigError::Invalid(format!(
                "RUNBRIDGE_ENV must be a plain name, got {env:?}"
            )));
        }
        let mut b = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .add_source(File::from(dir.join("default.toml")).required(false))
            .add_source(File::from(dir.join(format!("{env}.toml"))).required(false))
            .add_source(
                Environment::with_prefix("RUNBRIDGE")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("auth.callback_secrets")
                    .with_list_parse_key("auth.operator_tokens")
                    .with_list_parse_key("amqp.urls")
                    .with_list_parse_key("redis.sentinels")
                    .with_list_parse_key("redis.cluster_nodes")
                    .try_parsing(true),
            );
        // The Databricks CLI/SDK conventions, for the default workspace: a
        // profile of ~/.databrickscfg (DATABRICKS_CONFIG_PROFILE, file at
        // DATABRICKS_CONFIG_FILE), then DATABRICKS_* variables over it.
        if let Ok(profile) = std::env::var("DATABRICKS_CONFIG_PROFILE") {
            let file = std::env::var("DATABRICKS_CONFIG_FILE")
                .map(std::path::PathBuf::from)
                .or_else(|_| {
                    std::env::var("HOME")
                        .map(|h| std::path::Path::new(&h).join(".databrickscfg"))
                })
                .map_err(|_| {
                    ConfigError::Invalid(
                        "DATABRICKS_CONFIG_PROFILE is set but neither DATABRICKS_CONFIG_FILE nor HOME is".into(),
                    )
                })?;
            for (k, v) in databricks_profile(&file, &profile)? {
                b = b.set_override(format!("databricks.workspaces.default.{k}"), v)?;
            }
        }
        for (var, key) in [
            ("DATABRICKS_HOST", "host"),
            ("DATABRICKS_TOKEN", "token"),
            ("DATABRICKS_CLIENT_ID", "client_id"),
            ("DATABRICKS_CLIENT_SECRET", "client_secret"),
        ] {
            if let Ok(v) = std::env::var(var) {
                b = b.set_override(format!("databricks.workspaces.default.{key}"), v)?;
            }
        }
        for (k, v) in overrides {
            b = b.set_override(*k, v.clone())?;
        }
        let mut s: Settings = b.build()?.try_deserialize()?;
        for (name, w) in std::mem::take(&mut s.workspaces) {
            if s.databricks.workspaces.contains_key(&name) {
                return Err(ConfigError::Invalid(format!(
                    "workspace {name:?} is configured both under [workspaces] and [databricks.workspaces]"
                )));
            }
            s.databricks.workspaces.insert(name, w);
        }
        Ok(s)
    }

    pub fn keys(&self) -> Result<Keys, ConfigError> {
        Keys::new(&self.redis.key_prefix, self.redis.partitions)
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.redis.retention_seconds)
    }

    pub fn public_url(&self) -> Result<url::Url, ConfigError> {
        let u = url::Url::parse(&self.sidecar.public_url).map_err(|e| {
            ConfigError::Invalid(format!(
                "sidecar.public_url {:?}: {e}",
                self.sidecar.public_url
            ))
        })?;
        if !matches!(u.scheme(), "http" | "https") || u.query().is_some() {
            return Err(ConfigError::Invalid(format!(
                "sidecar.public_url must be an http(s) URL without a query, got {:?}",
                self.sidecar.public_url
            )));
        }
        Ok(u)
    }

    pub fn listen_addr(s: &str, key: &str) -> Result<SocketAddr, ConfigError> {
        s.parse()
            .map_err(|e| ConfigError::Invalid(format!("{key} {s:?} is not host:port: {e}")))
    }

    /// Checks everything the given role uses, with messages that name the key.
    pub fn validate(&self, role: Role) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        self.keys()?;
        if self.worker.partition_lease_ms < 300 {
            return bad(format!(
                "worker.partition_lease_ms must be at least 300 (it is renewed every third), got {}",
                self.worker.partition_lease_ms
            ));
        }
        if self.relay.block_ms.saturating_mul(2) >= self.worker.partition_lease_ms {
            // A relay round lasts up to block_ms; a worker whose relay made no
            // round for a lease period gives its partitions up.
            return bad(format!(
                "relay.block_ms ({}) must be under half of worker.partition_lease_ms ({})",
                self.relay.block_ms, self.worker.partition_lease_ms
            ));
        }
        if self.redis.mode == RedisMode::Sentinel
            && (self.redis.sentinels.is_empty() || self.redis.sentinel_master.is_empty())
        {
            return bad("redis.mode = \"sentinel\" needs redis.sentinels (their URLs) and redis.sentinel_master (the master's name)".into());
        }
        let amqp_urls = self
            .amqp
            .urls
            .iter()
            .map(|u| ("amqp.urls", u.expose_secret()));
        let sentinels = self
            .redis
            .sentinels
            .iter()
            .map(|u| ("redis.sentinels", u.expose_secret()))
            .chain(
                self.redis
                    .cluster_nodes
                    .iter()
                    .map(|u| ("redis.cluster_nodes", u.expose_secret())),
            );
        for (key, url, schemes) in [
            (
                "redis.url",
                self.redis.url.expose_secret(),
                &["redis", "rediss", "redis+unix", "unix"][..],
            ),
            (
                "amqp.url",
                self.amqp.url.expose_secret(),
                &["amqp", "amqps"][..],
            ),
        ]
        .into_iter()
        .chain(amqp_urls.map(|(k, u)| (k, u, &["amqp", "amqps"][..])))
        .chain(sentinels.map(|(k, u)| (k, u, &["redis", "rediss"][..])))
        {
            match url::Url::parse(url) {
                Ok(u) if schemes.contains(&u.scheme()) => {}
                // The scheme only: a URL may carry a password.
                Ok(u) => return bad(format!("{key} must use {schemes:?}, got {:?}", u.scheme())),
                Err(e) => return bad(format!("{key} is not a URL: {e}")),
            }
        }
        if !self.telemetry.otlp_endpoint.is_empty() {
            match url::Url::parse(&self.telemetry.otlp_endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return bad(format!(
                        "telemetry.otlp_endpoint must be an http(s) URL (OTLP/HTTP), got {:?}",
                        self.telemetry.otlp_endpoint
                    ));
                }
            }
        }
        for (key, file, url, scheme) in [
            (
                "redis.tls_ca_file",
                &self.redis.tls_ca_file,
                &self.redis.url,
                "rediss",
            ),
            (
                "amqp.tls_ca_file",
                &self.amqp.tls_ca_file,
                &self.amqp.url,
                "amqps",
            ),
        ] {
            if !file.is_empty() && !url.expose_secret().starts_with(&format!("{scheme}://")) {
                return bad(format!(
                    "{key} is set, but the url is not {scheme}://: it would not be used"
                ));
            }
            read_pem(key, file)?;
        }
        if self.redis.wait_replicas > 0
            && (self.redis.wait_timeout_ms == 0
                || self.redis.wait_timeout_ms >= self.redis.response_timeout_ms)
        {
            return bad("redis.wait_timeout_ms must be positive and below redis.response_timeout_ms (a WAIT must answer before the command times out)".into());
        }
        if self.redis.pool_size == 0 || self.redis.response_timeout_ms == 0 {
            return bad("redis.pool_size and redis.response_timeout_ms must be positive".into());
        }
        if role == Role::Client {
            return Ok(());
        }
        self.validate_credentials()?;
        self.public_url()?;
        match role {
            Role::Worker => {
                if self.amqp.prefetch == 0 {
                    return bad("amqp.prefetch must be at least 1".into());
                }
                if self.amqp.delivery_limit == 0 {
                    return bad("amqp.delivery_limit must be at least 1".into());
                }
                if self.databricks.workspaces.is_empty() {
                    return bad("no Databricks workspace configured: set DATABRICKS_HOST and DATABRICKS_TOKEN (or [databricks.workspaces.<name>])".into());
                }
                if !self
                    .databricks
                    .workspaces
                    .contains_key(&self.databricks.default_workspace)
                {
                    return bad(format!(
                        "databricks.default_workspace {:?} is not configured; configured: {:?}",
                        self.databricks.default_workspace,
                        self.databricks.workspaces.keys().collect::<Vec<_>>()
                    ));
                }
                for (name, w) in &self.databricks.workspaces {
                    if name.is_empty()
                        || name.len() > 64
                        || !name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return bad(format!(
                            "workspace name {name:?} must be 1-64 characters of [A-Za-z0-9_-]"
                        ));
                    }
                    match url::Url::parse(&w.host) {
                        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                        _ => {
                            return bad(format!(
                                "databricks.workspaces.{name}.host {:?} is not an http(s) URL",
                                w.host
                            ));
                        }
                    }
                    if w.auth().is_none() {
                        return bad(format!(
                            "databricks.workspaces.{name} has no credentials: set a token (DATABRICKS_TOKEN) or client_id and client_secret for OAuth M2M (DATABRICKS_CLIENT_ID / DATABRICKS_CLIENT_SECRET)"
                        ));
                    }
                }
                if self.worker.default_timeout_seconds == 0
                    || self.worker.default_timeout_seconds > self.worker.max_timeout_seconds
                {
                    return bad("worker.default_timeout_seconds must be between 1 and worker.max_timeout_seconds".into());
                }
            }
            Role::Sidecar => {
                Self::listen_addr(&self.sidecar.listen, "sidecar.listen")?;
                if self.sidecar.body_limit_bytes == 0 {
                    return bad("sidecar.body_limit_bytes must be positive".into());
                }
                if self.sidecar.header_timeout_ms == 0 || self.sidecar.max_connections == 0 {
                    return bad(
                        "sidecar.header_timeout_ms and sidecar.max_connections must be positive"
                            .into(),
                    );
                }
                if self.sidecar.session_idle_seconds == 0
                    || self.sidecar.session_idle_seconds > self.sidecar.session_max_seconds
                {
                    return bad(format!(
                        "sidecar.session_idle_seconds ({}) must be positive and at most sidecar.session_max_seconds ({})",
                        self.sidecar.session_idle_seconds, self.sidecar.session_max_seconds
                    ));
                }
                let (cert, key) = (&self.sidecar.tls_cert_file, &self.sidecar.tls_key_file);
                if cert.is_empty() != key.is_empty() {
                    return bad("sidecar.tls_cert_file and sidecar.tls_key_file go together: set both for HTTPS, or neither".into());
                }
                read_pem("sidecar.tls_cert_file", cert)?;
                read_pem("sidecar.tls_key_file", key)?;
            }
            Role::Client => {}
        }
        Ok(())
    }
}

impl Settings {
    /// The credentials every serving role shares: present, long enough,
    /// no empty list item, and none of the committed development secrets
    /// outside development mode.
    fn validate_credentials(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let dev_hint = if self.development {
            ""
        } else {
            " (for development with the committed secrets: RUNBRIDGE_ENV=local)"
        };
        if self.auth.callback_secrets.is_empty() {
            return bad(format!(
                "auth.callback_secrets is empty: set RUNBRIDGE__AUTH__CALLBACK_SECRETS (32+ bytes each){dev_hint}"
            ));
        }
        for (key, list, min) in [
            ("auth.callback_secrets", &self.auth.callback_secrets, 32),
            (
                "auth.operator_tokens",
                &self.auth.operator_tokens,
                MIN_CREDENTIAL_LEN,
            ),
        ] {
            let var = format!("RUNBRIDGE__{}", key.to_uppercase().replace('.', "__"));
            for (i, s) in list.iter().enumerate() {
                let len = s.expose_secret().len();
                if len == 0 {
                    return bad(format!(
                        "{key} entry {} is empty (a trailing or doubled comma in {var}?): an empty credential is never accepted",
                        i + 1
                    ));
                }
                if len < min {
                    return bad(format!(
                        "{key} entry {} is {len} bytes; each must be at least {min}",
                        i + 1
                    ));
                }
            }
        }
        if let Some(p) = &self.auth.notification_password {
            let len = p.expose_secret().len();
            if len < MIN_CREDENTIAL_LEN {
                return bad(format!(
                    "auth.notification_password is {len} bytes; it must be at least {MIN_CREDENTIAL_LEN} (or unset: the notification route then refuses every request)"
                ));
            }
        }
        if self.development {
            return Ok(());
        }
        let committed = committed_development_secrets();
        let is_committed = |s: &SecretString| committed.iter().any(|c| c == s.expose_secret());
        let mut found: Vec<String> = Vec::new();
        for (key, list) in [
            ("auth.callback_secrets", &self.auth.callback_secrets),
            ("auth.operator_tokens", &self.auth.operator_tokens),
        ] {
            if list.iter().any(is_committed) {
                found.push(key.into());
            }
        }
        if self
            .auth
            .notification_password
            .as_ref()
            .is_some_and(is_committed)
        {
            found.push("auth.notification_password".into());
        }
        for (name, w) in &self.databricks.workspaces {
            if w.token.as_ref().is_some_and(is_committed)
                || w.client_secret.as_ref().is_some_and(is_committed)
            {
                found.push(format!("databricks.workspaces.{name}"));
            }
        }
        if !found.is_empty() {
            return bad(format!(
                "{} hold the development secrets committed in config/local.toml, which anyone can read; outside development mode (RUNBRIDGE_ENV=local) set your own, e.g. RUNBRIDGE__AUTH__CALLBACK_SECRETS and RUNBRIDGE__AUTH__OPERATOR_TOKENS",
                found.join(", ")
            ));
        }
        Ok(())
    }
}

/// Every secret in the committed `config/local.toml` (callback secrets,
/// operator tokens, passwords, workspace tokens).
fn committed_development_secrets() -> Vec<String> {
    fn walk(v: &config::Value, key: &str, out: &mut Vec<String>) {
        match &v.kind {
            config::ValueKind::Table(t) => {
                for (k, v) in t {
                    walk(v, k, out);
                }
            }
            config::ValueKind::Array(a) => {
                for v in a {
                    walk(v, key, out);
                }
            }
            config::ValueKind::String(s)
                if ["secret", "token", "password"]
                    .iter()
                    .any(|w| key.contains(w)) =>
            {
                out.push(s.clone());
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(c) = Config::builder()
        .add_source(File::from_str(LOCAL_TOML, FileFormat::Toml))
        .build()
    {
        walk(&c.cache, "", &mut out);
    }
    out
}

/// The keys runbridge uses (`host`, `token`, `client_id`, `client_secret`)
/// of one profile of a Databricks config file (INI, as the Databricks CLI
/// and SDKs write it). A named profile that is missing is an error.
fn databricks_profile(
    file: &std::path::Path,
    profile: &str,
) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError::Invalid(format!(
            "DATABRICKS_CONFIG_PROFILE={profile}: cannot read {}: {e}",
            file.display()
        ))
    })?;
    let mut section: Option<&str> = None;
    let mut found = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim());
            found |= name.trim() == profile;
            continue;
        }
        if section != Some(profile) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let key = match k.trim() {
                "host" => "host",
                "token" => "token",
                "client_id" => "client_id",
                "client_secret" => "client_secret",
                _ => continue,
            };
            out.push((key, v.trim().to_owned()));
        }
    }
    if !found {
        return Err(ConfigError::Invalid(format!(
            "DATABRICKS_CONFIG_PROFILE={profile}: no [{profile}] section in {}",
            file.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_mode_and_sentinels_are_checked() {
        let check = |f: &dyn Fn(&mut Settings)| {
            let mut s = Settings::defaults().unwrap();
            f(&mut s);
            s.validate(Role::Client).err().map(|e| e.to_string())
        };
        assert_eq!(check(&|_| {}), None);
        let e = load(&[("redis.mode", "cluster-ish".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis.mode") && e.contains("cluster-ish"), "{e}");
        let e = check(&|s| s.redis.mode = RedisMode::Sentinel).unwrap();
        assert!(e.contains("redis.sentinels"), "{e}");
        let e = check(&|s| {
            s.redis.mode = RedisMode::Sentinel;
            s.redis.sentinel_master = "m".into();
            s.redis.sentinels = vec!["http://s1:26379".to_string().into()];
        })
        .unwrap();
        assert!(e.contains("redis.sentinels must use"), "{e}");
        assert_eq!(
            check(&|s| {
                s.redis.mode = RedisMode::Sentinel;
                s.redis.sentinel_master = "m".into();
                s.redis.sentinels = vec!["redis://s1:26379".to_string().into()];
            }),
            None
        );
        assert_eq!(check(&|s| s.redis.mode = RedisMode::Cluster), None);
        let e = check(&|s| {
            s.redis.mode = RedisMode::Cluster;
            s.redis.cluster_nodes = vec![
                "redis://:pw@n1:7000".to_string().into(),
                "n2:7000".to_string().into(),
            ];
        })
        .unwrap();
        assert!(e.contains("redis.cluster_nodes must use"), "{e}");
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn databricks_profile_reads_one_section() {
        let dir = std::env::temp_dir().join(format!("rb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(".databrickscfg");
        std::fs::write(
            &f,
            "[DEFAULT]\nhost = https://a.example\ntoken = dapi-a\n\n\
             # a service principal\n[sp]\nhost = https://b.example\n\
             client_id = abc\nclient_secret = s3cret\nauth_type = oauth-m2m\n",
        )
        .unwrap();
        let got = databricks_profile(&f, "sp").unwrap();
        assert_eq!(
            got,
            vec![
                ("host", "https://b.example".to_string()),
                ("client_id", "abc".to_string()),
                ("client_secret", "s3cret".to_string()),
            ]
        );
        let err = databricks_profile(&f, "nope").unwrap_err().to_string();
        assert!(err.contains("no [nope] section"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn oauth_credentials_or_token_are_required() {
        let ws = |token: Option<&str>, id: Option<&str>, secret: Option<&str>| WorkspaceSection {
            host: "https://x".into(),
            token: token.map(|t| SecretString::from(t.to_string())),
            client_id: id.map(str::to_owned),
            client_secret: secret.map(|t| SecretString::from(t.to_string())),
        };
        assert!(matches!(
            ws(Some("dapi"), None, None).auth(),
            Some(Credentials::Token(_))
        ));
        assert!(matches!(
            ws(Some(""), Some("id"), Some("s")).auth(),
            Some(Credentials::OAuth { .. })
        ));
        assert!(ws(None, Some("id"), None).auth().is_none());
        assert!(ws(Some(""), None, None).auth().is_none());
    }

    fn load(overrides: &[(&str, String)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .as_path(),
            "local",
            overrides,
        )
    }

    #[test]
    fn local_config_is_valid_for_every_role() {
        let s = load(&[]).unwrap();
        for role in [Role::Worker, Role::Sidecar, Role::Client] {
            s.validate(role).unwrap();
        }
        assert_eq!(s.redis.partitions, 16);
        assert_eq!(s.sidecar.body_limit_bytes, 256 * 1024);
    }

    #[test]
    fn committed_development_secrets_are_refused_outside_development() {
        let committed = committed_development_secrets();
        assert!(committed.contains(&"local-dev-callback-secret-0123456789abcdef".to_string()));
        assert!(committed.contains(&"local-dev-operator-token".to_string()));
        assert!(committed.contains(&"dapi-local-emulator".to_string()));
        // local.toml itself, with development mode turned off...
        let mut s = load(&[]).unwrap();
        s.development = false;
        let e = s.validate(Role::Sidecar).unwrap_err().to_string();
        assert!(e.contains("config/local.toml"), "{e}");
        assert!(e.contains("auth.callback_secrets"), "{e}");
        // ...or one committed secret copied into another environment.
        s.auth.callback_secrets = vec!["a-secret-of-my-own-0123456789abcdef".to_string().into()];
        s.auth.operator_tokens = vec!["an-operator-token-of-my-own".to_string().into()];
        let e = s.validate(Role::Worker).unwrap_err().to_string();
        assert!(e.contains("databricks.workspaces.default"), "{e}");
        assert!(!e.contains("auth.callback_secrets"), "{e}");
        s.databricks.workspaces.get_mut("default").unwrap().token =
            Some("dapi-of-my-own".to_string().into());
        s.validate(Role::Worker).unwrap();
        s.validate(Role::Sidecar).unwrap();
    }

    #[test]
    fn the_dead_letter_queue_is_quorum_on_a_cluster_by_default() {
        use crate::broker::QueueType;
        let mut s = load(&[]).unwrap();
        assert_eq!(s.amqp.dead_letter_queue_type, DeadLetterQueueType::Auto);
        assert_eq!(s.amqp.dead_letter_queue_type(), QueueType::Classic);
        s.amqp.urls = vec!["amqp://guest:guest@rabbit-2:5672/%2f".to_string().into()];
        assert_eq!(s.amqp.dead_letter_queue_type(), QueueType::Quorum);
        s.amqp.dead_letter_queue_type = DeadLetterQueueType::Classic;
        assert_eq!(s.amqp.dead_letter_queue_type(), QueueType::Classic);
    }

    #[test]
    fn empty_and_short_credentials_are_refused() {
        let check = |f: &dyn Fn(&mut Settings)| {
            let mut s = load(&[]).unwrap();
            f(&mut s);
            s.validate(Role::Sidecar).err().map(|e| e.to_string())
        };
        let list = |v: &[&str]| v.iter().map(|t| t.to_string().into()).collect::<Vec<_>>();
        let e = check(&|s| s.auth.operator_tokens = list(&["tokA-0123456789abcdef", ""])).unwrap();
        assert!(e.contains("entry 2 is empty"), "{e}");
        let e = check(&|s| s.auth.operator_tokens = list(&["x"])).unwrap();
        assert!(e.contains("at least 16"), "{e}");
        let e = check(&|s| {
            s.auth.callback_secrets = list(&["", "local-dev-callback-secret-0123456789abcdef"])
        })
        .unwrap();
        assert!(e.contains("entry 1 is empty"), "{e}");
        let e = check(&|s| s.auth.notification_password = Some(String::new().into())).unwrap();
        assert!(e.contains("notification_password"), "{e}");
        let e =
            check(&|s| s.auth.notification_password = Some("short".to_string().into())).unwrap();
        assert!(e.contains("at least 16"), "{e}");
        assert_eq!(
            check(&|s| s.auth.operator_tokens = list(&["tokA-0123456789abcdef"])),
            None
        );
    }

    #[test]
    fn embedded_defaults_alone_load() {
        let s = Settings::load_from(std::path::Path::new("/nonexistent"), "local", &[]).unwrap();
        assert_eq!(s.amqp.triggers_queue, "runbridge.triggers");
        // No secret by default: the worker must refuse to start.
        let e = s.validate(Role::Worker).unwrap_err().to_string();
        assert!(e.contains("callback_secrets"), "{e}");
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = load(&[("redis.key_prefix", "bad*".into())])
            .unwrap()
            .validate(Role::Worker)
            .unwrap_err();
        assert!(e.to_string().contains("key_prefix"), "{e}");
        let e = load(&[("log.format", "xml".into())]).unwrap_err();
        assert!(e.to_string().contains("log.format"), "{e}");
        let e = load(&[("sidecar.public_url", "ftp://x".into())])
            .unwrap()
            .validate(Role::Sidecar)
            .unwrap_err();
        assert!(e.to_string().contains("public_url"), "{e}");
        let e = load(&[("databricks.default_workspace", "nope".into())])
            .unwrap()
            .validate(Role::Worker)
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn top_level_workspaces_are_merged() {
        let s = load(&[
            (
                "workspaces.analytics.host",
                "https://adb-1.azuredatabricks.net".into(),
            ),
            ("workspaces.analytics.token", "dapi-x".into()),
        ])
        .unwrap();
        assert_eq!(
            s.databricks.workspaces["analytics"].host,
            "https://adb-1.azuredatabricks.net"
        );
        s.validate(Role::Worker).unwrap();
        let e = load(&[
            ("workspaces.default.host", "https://x".into()),
            ("workspaces.default.token", "t".into()),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = load(&[("redis.url", "redis://:hunter2@127.0.0.1:6379".into())]).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("local-dev-callback-secret"));
        assert!(!shown.contains("dapi-local-emulator"));
    }
}
