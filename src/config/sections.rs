//! The sections of the configuration, one struct per `[section]` of
//! `config/default.toml` (which documents every key), and the named values
//! (`redis.mode`, `log.format`, `amqp.dead_letter_queue_type`) parsed into
//! enums with errors that list what is accepted.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::ConfigError;
use crate::databricks::Credentials;
use crate::domain::retry::{RetryDefaults, RetryMessage};

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
    /// A trigger's `reply_to` must name a queue starting with this (or a
    /// server-named queue, or RabbitMQ's direct reply-to).
    #[serde(default = "default_reply_to_prefix")]
    pub reply_to_prefix: String,
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
    pub fn dead_letter_queue_type(&self) -> QueueType {
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
    /// The most children one parent trigger may have.
    #[serde(default = "default_max_children")]
    pub max_children: usize,
}

fn default_max_children() -> usize {
    1000
}

fn default_body_timeout_ms() -> u64 {
    10_000
}

fn default_header_timeout_ms() -> u64 {
    10_000
}

fn default_login_failures_per_client() -> u32 {
    10
}

fn default_login_failures_overall() -> u32 {
    100
}

fn default_reply_to_prefix() -> String {
    "runbridge.reply.".into()
}

fn default_max_connections() -> usize {
    1024
}

fn default_max_connections_per_client() -> usize {
    256
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
    /// One client address's share of `max_connections`: past it, an
    /// address is refused while fewer than a share of slots are free.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Serve HTTP/2 over plain HTTP (h2c); HTTPS offers HTTP/2 by ALPN.
    #[serde(default)]
    pub allow_h2c: bool,
    /// Where the operator routes (API, console, metrics) are served; empty:
    /// on `listen` with the notebook's.
    #[serde(default)]
    pub operator_listen: String,
    /// Failed console logins a minute from one client address, and from
    /// all together, before logins are refused for the rest of the minute.
    #[serde(default = "default_login_failures_per_client")]
    pub login_failures_per_client: u32,
    #[serde(default = "default_login_failures_overall")]
    pub login_failures_overall: u32,
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
    /// At most one `promise.progress` event per promise per this many ms
    /// (the latest update wins).
    #[serde(default = "default_progress_interval_ms")]
    pub progress_interval_ms: u64,
    /// Progress updates kept on a promise for the console's timeline.
    #[serde(default = "default_progress_history")]
    pub progress_history: u32,
}

fn default_progress_interval_ms() -> u64 {
    1000
}

fn default_progress_history() -> u32 {
    20
}

/// `[retry]`: retry policies for triggers that give none of their own.
/// A job's beats its workspace's, which beats the default.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RetrySection {
    #[serde(default)]
    pub default: Option<RetryMessage>,
    /// `[retry.workspaces.<name>]`
    #[serde(default)]
    pub workspaces: BTreeMap<String, RetryMessage>,
    /// `[retry.jobs.<job id>]`
    #[serde(default)]
    pub jobs: BTreeMap<String, RetryMessage>,
}

impl RetrySection {
    pub fn policies(&self) -> Result<RetryDefaults, String> {
        RetryDefaults::parse(self.default.as_ref(), &self.workspaces, &self.jobs)
    }
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

/// What the audit does with a finding (`[audit.actions]`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FindingAction {
    /// Nothing but the report (event, metric, console).
    Report,
    /// The run is cancelled through the reconciler's cancel schedule.
    Cancel,
    /// The promise's run check is made due now: the reconciler settles it
    /// from its run.
    Settle,
}

impl FindingAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingAction::Report => "report",
            FindingAction::Cancel => "cancel",
            FindingAction::Settle => "settle",
        }
    }
}

/// A RabbitMQ queue type, as `x-queue-type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Not replicated, durable on its node; a message returned unacked
    /// keeps its place and gains no delivery count, so the console can
    /// browse it for free.
    Classic,
    /// Replicated (Raft). Before RabbitMQ 4.3 every return of a message,
    /// browsing included, raises its delivery count.
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditActionsSection {
    pub orphan: FindingAction,
    pub duplicate: FindingAction,
    pub mismatch: FindingAction,
    pub lost: FindingAction,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditSection {
    pub enabled: bool,
    pub interval_ms: u64,
    pub lookback_ms: u64,
    pub overlap_ms: u64,
    pub grace_ms: u64,
    pub lost_after_ms: u64,
    pub max_pages: usize,
    pub max_checks: usize,
    pub keep_ms: u64,
    pub max_findings: usize,
    pub actions: AuditActionsSection,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmulatorSection {
    pub listen: String,
}
