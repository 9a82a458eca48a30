//! The emulator's command line, shared by its own binary and by
//! `runbridge emulate` (which passes its configured parameter names and
//! listen address as the defaults).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Behaviour, Emulator, EmulatorSettings, Faults, NotifyTarget, OAuthClient, Outcome};

/// The emulator's command line (`databricks-emulator`, `runbridge emulate`).
// No `Debug`: it holds the OAuth client secret and the notification password.
#[derive(clap::Args)]
pub struct Args {
    /// host:port to listen on (default: 127.0.0.1:8089, or runbridge's emulator.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Pre-created job: ID:OUTCOME[:DELAY_MS[:VALUE]], e.g. 1:callback:300:ok (repeatable).
    #[arg(long = "job", value_name = "SPEC")]
    pub jobs: Vec<String>,
    /// A job whose first N attempts per promise fail (a run, or a repair
    /// of one): ID=N (the tag `emulator.fail_attempts` of a created job).
    #[arg(long = "job-fail-attempts", value_name = "ID=N")]
    pub job_fail_attempts: Vec<String>,
    /// A job whose notebook sends N progress updates while it runs: ID=N
    /// (the tag `emulator.progress`).
    #[arg(long = "job-progress", value_name = "ID=N")]
    pub job_progress: Vec<String>,
    /// Required bearer token (default: any).
    #[arg(long)]
    pub token: Option<String>,
    /// Outcome of jobs created through jobs/create without emulator tags.
    #[arg(long, default_value = "callback")]
    pub default_outcome: String,
    #[arg(long, default_value_t = 200)]
    pub default_delay_ms: u64,
    /// Fraction of API calls answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub fault_429_rate: f64,
    /// Fraction of API calls answered 503.
    #[arg(long, default_value_t = 0.0)]
    pub fault_503_rate: f64,
    /// Fraction of API calls answered slowly.
    #[arg(long, default_value_t = 0.0)]
    pub fault_slow_rate: f64,
    #[arg(long, default_value_t = 3000)]
    pub fault_slow_ms: u64,
    /// Extra latency on every run-now / runs/submit.
    #[arg(long, default_value_t = 0)]
    pub launch_latency_ms: u64,
    /// Send job notifications (on_start/on_success/on_failure) to this URL,
    /// e.g. http://127.0.0.1:8080/databricks/notifications.
    #[arg(long)]
    pub notify_url: Option<String>,
    #[arg(long, default_value = "databricks")]
    pub notify_user: String,
    /// A PEM CA to trust when runs call back an https sidecar with a
    /// private certificate (the system's roots always apply).
    #[arg(long, value_name = "PEM_FILE")]
    pub callback_ca_file: Option<std::path::PathBuf>,
    /// OAuth M2M: a service principal's client id (POST /oidc/v1/token).
    #[arg(long)]
    pub oauth_client_id: Option<String>,
    #[arg(
        long,
        env = "RUNBRIDGE_EMULATOR_OAUTH_CLIENT_SECRET",
        default_value = ""
    )]
    pub oauth_client_secret: String,
    /// Lifetime of the OAuth access tokens it issues.
    #[arg(long, default_value_t = 3600)]
    pub oauth_token_ttl_seconds: u64,
    #[arg(long, env = "RUNBRIDGE_EMULATOR_NOTIFY_PASSWORD", default_value = "")]
    pub notify_password: String,
}

/// Names of the parameters a run's "notebook" reads its callback from.
#[derive(Debug, Clone)]
pub struct ParamNames {
    pub url: String,
    pub promise_id: String,
    pub callback_token: String,
}

impl Default for ParamNames {
    fn default() -> Self {
        Self {
            url: "url".into(),
            promise_id: "promise_id".into(),
            callback_token: "callback_token".into(),
        }
    }
}

/// `ID:OUTCOME[:DELAY_MS[:VALUE]]`.
pub fn parse_job(spec: &str) -> Result<(u64, Behaviour), String> {
    let mut parts = spec.splitn(4, ':');
    let id: u64 = parts
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|_| format!("--job {spec:?}: ID must be a number"))?;
    let mut b = Behaviour::default();
    if let Some(o) = parts.next() {
        b.outcome = o.parse::<Outcome>()?;
    }
    if let Some(d) = parts.next() {
        b.delay_ms = d
            .parse()
            .map_err(|_| format!("--job {spec:?}: DELAY_MS must be a number"))?;
    }
    if let Some(v) = parts.next() {
        b.value = v.to_owned();
    }
    Ok((id, b))
}

/// Serves the emulator as `a` says until `shutdown`; a message naming the
/// flag on bad input.
pub async fn run(
    a: Args,
    default_listen: &str,
    names: ParamNames,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let mut jobs = BTreeMap::new();
    for spec in &a.jobs {
        let (id, b) = parse_job(spec)?;
        jobs.insert(id, b);
    }
    for (flag, specs) in [
        ("--job-fail-attempts", &a.job_fail_attempts),
        ("--job-progress", &a.job_progress),
    ] {
        for spec in specs {
            let (id, n) = spec
                .split_once('=')
                .and_then(|(i, n)| Some((i.parse::<u64>().ok()?, n.parse::<u32>().ok()?)))
                .ok_or_else(|| format!("{flag} {spec:?}: expected ID=N"))?;
            let b = jobs
                .get_mut(&id)
                .ok_or_else(|| format!("{flag} {spec:?}: no --job {id}"))?;
            if flag == "--job-fail-attempts" {
                b.fail_attempts = n;
            } else {
                b.progress_updates = n;
            }
        }
    }
    let settings = EmulatorSettings {
        token: a.token,
        default_behaviour: Behaviour {
            outcome: a.default_outcome.parse::<Outcome>()?,
            delay_ms: a.default_delay_ms,
            ..Default::default()
        },
        jobs,
        oauth: a.oauth_client_id.clone().map(|client_id| OAuthClient {
            client_id,
            client_secret: a.oauth_client_secret.clone(),
            token_ttl: Duration::from_secs(a.oauth_token_ttl_seconds),
        }),
        faults: Faults {
            rate_429: a.fault_429_rate,
            rate_503: a.fault_503_rate,
            rate_slow: a.fault_slow_rate,
            slow_ms: a.fault_slow_ms,
            retry_after_s: 1,
            launch_latency_ms: a.launch_latency_ms,
        },
        url_param: names.url,
        promise_param: names.promise_id,
        token_param: names.callback_token,
        notify: a.notify_url.map(|url| NotifyTarget {
            url,
            username: a.notify_user,
            password: a.notify_password,
        }),
        callback_ca_pem: a
            .callback_ca_file
            .map(|f| {
                std::fs::read(&f).map_err(|e| format!("--callback-ca-file {}: {e}", f.display()))
            })
            .transpose()?,
    };
    let listen = a.listen.unwrap_or_else(|| default_listen.to_owned());
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("emulator: cannot listen on {listen}: {e}"))?;
    crate::serve(listener, Emulator::new(settings), shutdown)
        .await
        .map_err(|e| format!("emulator: {e}"))
}
