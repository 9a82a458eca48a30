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
use serde::Deserialize;

use crate::keys::Keys;

mod profile;
mod sections;
mod validate;

pub use sections::*;

pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The development configuration committed with the source. Compiled in so
/// that its secrets, which anyone can read, are recognised and refused
/// outside development mode wherever they turn up.
const LOCAL_TOML: &str = include_str!("../../config/local.toml");

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
    pub audit: AuditSection,
    #[serde(default)]
    pub retry: RetrySection,
    /// `[workspaces.<name>]`: the same as `[databricks.workspaces.<name>]`
    /// (merged into it at load; a name in both is an error).
    #[serde(default)]
    pub workspaces: BTreeMap<String, WorkspaceSection>,
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
            for (k, v) in profile::databricks_profile(&file, &profile)? {
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
        // The committed secrets are accepted only where they were asked for
        // by name: a stray RUNBRIDGE__DEVELOPMENT=true in production must
        // not turn them on.
        if s.development && env != "local" {
            return Err(ConfigError::Invalid(format!(
                "development = true (from a config file or RUNBRIDGE__DEVELOPMENT) is honoured only with RUNBRIDGE_ENV=local, and RUNBRIDGE_ENV is {env:?}: remove it, or run with RUNBRIDGE_ENV=local for development"
            )));
        }
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
}

#[cfg(test)]
mod tests {
    use super::validate::committed_development_secrets;
    use super::*;
    use crate::databricks::Credentials;
    use secrecy::SecretString;

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
    fn development_mode_is_only_for_runbridge_env_local() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for env in ["production", "staging"] {
            let e = Settings::load_from(&dir, env, &[("development", "true".into())])
                .expect_err("development mode outside RUNBRIDGE_ENV=local");
            assert!(e.to_string().contains("RUNBRIDGE_ENV=local"), "{e}");
        }
        assert!(Settings::load_from(&dir, "production", &[]).is_ok());
        assert!(load(&[]).unwrap().development);
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
    fn retry_policies_from_the_configuration() {
        let s = load(&[
            ("retry.default.max_attempts", "2".into()),
            ("retry.jobs.7.max_attempts", "4".into()),
            ("retry.jobs.7.mode", "repair".into()),
            ("retry.workspaces.default.max_attempts", "3".into()),
        ])
        .unwrap();
        s.validate(Role::Worker).unwrap();
        let p = s.retry.policies().unwrap();
        let job = p.lookup("default", Some(7)).unwrap();
        assert_eq!((job.max_attempts(), job.mode().as_str()), (4, "repair"));
        assert_eq!(p.lookup("default", Some(8)).unwrap().max_attempts(), 3);
        assert_eq!(p.lookup("other", Some(8)).unwrap().max_attempts(), 2);
        // A one-time run skips the job's repair policy (there is none for it).
        assert_eq!(p.lookup("other", None).unwrap().max_attempts(), 2);
        for (k, v, why) in [
            ("retry.jobs.seven.max_attempts", "2", "retry.jobs.seven"),
            ("retry.default.max_attempts", "0", "retry.default"),
        ] {
            let e = load(&[(k, v.into())])
                .unwrap()
                .validate(Role::Worker)
                .unwrap_err();
            assert!(e.to_string().contains(why), "{k}: {e}");
        }
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
