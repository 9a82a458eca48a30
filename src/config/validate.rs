//! [`Settings::validate`]: every mistake becomes a sentence an operator can
//! act on, naming the key (and the variable that sets it), before anything
//! starts; outside development mode, missing secrets and the development
//! secrets committed in `config/local.toml` are refused.

use secrecy::{ExposeSecret, SecretString};

use super::{ConfigError, LOCAL_TOML, MIN_CREDENTIAL_LEN, RedisMode, Role, Settings, read_pem};
use config::{Config, File, FileFormat};

impl Settings {
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
                if self.amqp.reply_to_prefix.is_empty()
                    || self.amqp.reply_to_prefix.starts_with("amq.")
                {
                    return bad(format!(
                        "amqp.reply_to_prefix must be a queue name prefix of your own (not empty, not amq.), got {:?}",
                        self.amqp.reply_to_prefix
                    ));
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
                if let Err(e) = self.retry.policies() {
                    return bad(e);
                }
                self.validate_audit()?;
                if !(1..=100_000).contains(&self.worker.max_children) {
                    return bad(format!(
                        "worker.max_children must be between 1 and 100000, got {}",
                        self.worker.max_children
                    ));
                }
            }
            Role::Sidecar => {
                let listen = Self::listen_addr(&self.sidecar.listen, "sidecar.listen")?;
                if !self.sidecar.operator_listen.is_empty() {
                    let operator = Self::listen_addr(
                        &self.sidecar.operator_listen,
                        "sidecar.operator_listen",
                    )?;
                    if operator == listen && listen.port() != 0 {
                        return bad(format!(
                            "sidecar.operator_listen must differ from sidecar.listen ({listen}): it is where the operator routes go instead"
                        ));
                    }
                }
                if self.sidecar.progress_history == 0 || self.sidecar.progress_history > 1000 {
                    return bad("sidecar.progress_history must be between 1 and 1000".into());
                }
                if self.sidecar.body_limit_bytes == 0 {
                    return bad("sidecar.body_limit_bytes must be positive".into());
                }
                if self.sidecar.header_timeout_ms == 0
                    || self.sidecar.max_connections == 0
                    || self.sidecar.max_connections_per_client == 0
                {
                    return bad(
                        "sidecar.header_timeout_ms, sidecar.max_connections and sidecar.max_connections_per_client must be positive"
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
                if let Some(why) = weak_credential(s.expose_secret()) {
                    return bad(format!("{key} entry {} {why}", i + 1));
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
            if let Some(why) = weak_credential(p.expose_secret()) {
                return bad(format!("auth.notification_password {why}"));
            }
        }
        for (name, w) in &self.databricks.workspaces {
            for (what, secret) in [("token", &w.token), ("client_secret", &w.client_secret)] {
                if secret
                    .as_ref()
                    .is_some_and(|s| s.expose_secret().chars().any(invisible))
                {
                    return bad(format!(
                        "databricks.workspaces.{name}.{what} holds whitespace or a control character (a line break from a secret file?)"
                    ));
                }
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

/// At least this many different characters in a credential of runbridge's
/// own: "aaaaaaaaaaaaaaaa" or "abababababababab" is long enough and guessable.
/// A random one passes: 16 random hex digits have fewer than 6 different
/// ones about once in 50,000 draws; `openssl rand -hex 32` never does.
const MIN_DISTINCT_CHARS: usize = 6;

fn invisible(c: char) -> bool {
    c.is_whitespace() || c.is_control()
}

/// Why a credential is refused beyond its length, if it is: whitespace or a
/// control character (a padded value, or a line break from a secret file,
/// that a client would never send), or too few different characters.
fn weak_credential(s: &str) -> Option<String> {
    if s.chars().any(invisible) {
        return Some(
            "holds whitespace or a control character (a line break from a secret file?); credentials are visible characters only".into(),
        );
    }
    let distinct = s.chars().collect::<std::collections::BTreeSet<_>>().len();
    (distinct < MIN_DISTINCT_CHARS).then(|| {
        format!(
            "has {distinct} different characters; at least {MIN_DISTINCT_CHARS} are required (a random value, e.g. openssl rand -hex 32)"
        )
    })
}

/// Every secret in the committed `config/local.toml` (callback secrets,
/// operator tokens, passwords, workspace tokens).
pub(super) fn committed_development_secrets() -> Vec<String> {
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

impl Settings {
    /// `[audit]`: positive intervals, and each kind's action one it can take.
    pub(crate) fn validate_audit(&self) -> Result<(), ConfigError> {
        use super::FindingAction::{Cancel, Report, Settle};
        let a = &self.audit;
        if a.interval_ms < 100 || a.max_pages == 0 || a.max_findings == 0 {
            return Err(ConfigError::Invalid(
                "audit.interval_ms must be at least 100, audit.max_pages and audit.max_findings positive".into(),
            ));
        }
        for (kind, action, allowed) in [
            ("orphan", a.actions.orphan, &[Report, Cancel][..]),
            ("duplicate", a.actions.duplicate, &[Report, Cancel][..]),
            ("mismatch", a.actions.mismatch, &[Report][..]),
            ("lost", a.actions.lost, &[Report, Settle][..]),
        ] {
            if !allowed.contains(&action) {
                let names: Vec<&str> = allowed.iter().map(|x| x.as_str()).collect();
                return Err(ConfigError::Invalid(format!(
                    "audit.actions.{kind} must be one of {names:?}, got {:?}",
                    action.as_str()
                )));
            }
        }
        Ok(())
    }
}
