//! The emulator's state: jobs, runs, idempotency tokens, faults.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What a job's notebook does when run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Calls `{url}/resolve` once, then succeeds.
    Callback,
    /// Calls back twice (a retried notebook cell), then succeeds.
    DuplicateCallback,
    /// Calls back before `run-now` has answered the bridge, then succeeds.
    EarlyCallback,
    /// Fails without calling back.
    Fail,
    /// Succeeds without calling back; `dbutils.notebook.exit(value)`.
    SuccessNoCallback,
    /// Succeeds without calling back and without an exit value.
    SuccessNoOutput,
    /// Stays RUNNING until cancelled.
    NeverFinish,
    /// Calls `{url}/reject` with the value as the error, then fails.
    RejectCallback,
    /// The first attempt fails; Databricks retries (WAITING_FOR_RETRY, a new
    /// attempt_number) and the second attempt calls back.
    RetryThenCallback,
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(Value::String(s.replace('-', "_")))
            .map_err(|_| format!("unknown outcome {s:?} (callback, duplicate_callback, early_callback, fail, success_no_callback, success_no_output, never_finish, reject_callback)"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Behaviour {
    pub outcome: Outcome,
    /// How long the notebook "runs" before its outcome.
    pub delay_ms: u64,
    /// The value the notebook resolves with (or exits with).
    pub value: String,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            outcome: Outcome::Callback,
            delay_ms: 200,
            value: "hello world".into(),
        }
    }
}

/// Random API faults, as fractions of calls (0.0-1.0).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    pub rate_429: f64,
    pub rate_503: f64,
    pub rate_slow: f64,
    pub slow_ms: u64,
    pub retry_after_s: u64,
    /// Extra latency on every `run-now` / `runs/submit` (benchmarks).
    pub launch_latency_ms: u64,
}

/// A scripted fault for the next call to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injected {
    /// 429 with `Retry-After: 1`.
    TooManyRequests,
    /// 503 before doing anything.
    Unavailable,
    /// Does the work (creates the run), then answers 503: the client must
    /// retry with the same idempotency token and get the same run back.
    UnavailableAfterCommit,
    /// Answers after 3 s.
    Slow,
}

#[derive(Debug, Clone)]
pub struct EmulatorSettings {
    /// The token clients must send; `None` accepts any bearer token.
    pub token: Option<String>,
    pub default_behaviour: Behaviour,
    pub jobs: BTreeMap<u64, Behaviour>,
    pub faults: Faults,
    /// Names of the parameters that carry the callback URL and promise id.
    pub url_param: String,
    pub promise_param: String,
    pub notify: Option<NotifyTarget>,
    /// A service principal for OAuth M2M (`POST /oidc/v1/token`); its access
    /// tokens are accepted as bearer tokens until they expire.
    pub oauth: Option<OAuthClient>,
    /// A PEM CA the "notebooks" trust when they call back an https sidecar
    /// signed by a private CA (the system's roots always apply).
    pub callback_ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: String,
    /// Lifetime of the access tokens it issues (`expires_in`).
    pub token_ttl: std::time::Duration,
}

impl Default for EmulatorSettings {
    fn default() -> Self {
        Self {
            token: None,
            default_behaviour: Behaviour::default(),
            jobs: BTreeMap::new(),
            faults: Faults::default(),
            url_param: "url".into(),
            promise_param: "promise_id".into(),
            notify: None,
            oauth: None,
            callback_ca_pem: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub job_id: u64,
    pub settings: Value,
    pub created_time: i64,
    #[serde(skip)]
    pub behaviour: Behaviour,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub run_id: u64,
    pub job_id: Option<u64>,
    pub run_name: String,
    pub run_type: &'static str,
    pub idempotency_token: Option<String>,
    pub life_cycle_state: &'static str,
    pub result_state: Option<&'static str>,
    pub state_message: String,
    pub start_time: i64,
    pub end_time: i64,
    pub params: BTreeMap<String, String>,
    pub job_parameters: Option<BTreeMap<String, String>>,
    pub notebook_params: Option<BTreeMap<String, String>>,
    pub exit_value: Option<String>,
    pub callbacks_sent: u32,
    pub callback_statuses: Vec<u16>,
    pub attempt_number: u32,
    /// The W3C `traceparent` header of the request that created the run
    /// (the emulator's record only; not part of the Jobs API's run object).
    pub traceparent: Option<String>,
    #[serde(skip)]
    pub behaviour: Behaviour,
}

#[derive(Default)]
pub struct Inner {
    pub jobs: BTreeMap<u64, Job>,
    pub runs: BTreeMap<u64, Run>,
    pub tokens: HashMap<String, u64>,
    pub next_job_id: u64,
    pub next_run_id: u64,
    pub calls: BTreeMap<String, u64>,
    pub inject: HashMap<String, VecDeque<Injected>>,
    /// Launch requests being handled right now, and the most ever at once:
    /// shows whether a client launches concurrently.
    pub launches_in_flight: u64,
    pub max_launches_in_flight: u64,
    /// Every API request: (endpoint, arrival in epoch ms, fault answered).
    pub call_log: Vec<(String, i64, Option<Injected>)>,
    /// OAuth access tokens issued, with their expiry (epoch ms).
    pub oauth_tokens: HashMap<String, i64>,
    /// API requests refused for an expired OAuth token.
    pub oauth_expired_refused: u64,
}

/// Where finished and started runs are announced, like a Databricks job's
/// `webhook_notifications` destination (HTTP Basic auth).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotifyTarget {
    pub url: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
}

pub struct Emulator {
    pub settings: EmulatorSettings,
    pub notify: Mutex<Option<NotifyTarget>>,
    pub inner: Mutex<Inner>,
    pub faults: Mutex<Faults>,
    pub http: reqwest::Client,
    pub base_url: Mutex<String>,
    shutdown: OnceLock<CancellationToken>,
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The client runs use to call the sidecar back.
fn callback_client(ca_pem: Option<&[u8]>) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    match ca_pem.map(reqwest::Certificate::from_pem) {
        Some(Ok(ca)) => b = b.add_root_certificate(ca),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "emulator: callback CA is not a PEM certificate; ignored")
        }
        None => {}
    }
    b.build().unwrap_or_default()
}

impl Emulator {
    pub fn new(settings: EmulatorSettings) -> Arc<Self> {
        let mut inner = Inner {
            next_job_id: 1000,
            next_run_id: 100_000,
            ..Default::default()
        };
        for (id, b) in &settings.jobs {
            inner.jobs.insert(*id, Job {
                job_id: *id,
                settings: json!({"name": format!("emulated job {id}"), "tags": {"emulator.outcome": b.outcome}}),
                created_time: now_ms(),
                behaviour: b.clone(),
            });
        }
        let faults = settings.faults.clone();
        let http = callback_client(settings.callback_ca_pem.as_deref());
        Arc::new(Self {
            notify: Mutex::new(settings.notify.clone()),
            settings,
            inner: Mutex::new(inner),
            faults: Mutex::new(faults),
            http,
            base_url: Mutex::new("http://127.0.0.1".into()),
            shutdown: OnceLock::new(),
        })
    }

    pub fn set_shutdown(&self, t: CancellationToken) {
        let _ = self.shutdown.set(t);
    }

    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.get().cloned().unwrap_or_default()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in the emulator; keep
        // serving rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Next scripted fault for an endpoint, else a random one by the rates.
    pub fn fault_for(&self, endpoint: &str) -> Option<Injected> {
        let mut inner = self.lock();
        *inner.calls.entry(endpoint.to_owned()).or_default() += 1;
        let fault = match inner.inject.get_mut(endpoint).and_then(VecDeque::pop_front) {
            Some(f) => Some(f),
            None => {
                let f = self.faults();
                let x: f64 = rand::rng().random();
                if x < f.rate_429 {
                    Some(Injected::TooManyRequests)
                } else if x < f.rate_429 + f.rate_503 {
                    Some(Injected::Unavailable)
                } else if x < f.rate_429 + f.rate_503 + f.rate_slow {
                    Some(Injected::Slow)
                } else {
                    None
                }
            }
        };
        inner.call_log.push((endpoint.to_owned(), now_ms(), fault));
        fault
    }

    pub fn behaviour_of_job(&self, settings: &Value) -> Behaviour {
        let mut b = self.settings.default_behaviour.clone();
        if let Some(tags) = settings.get("tags").and_then(Value::as_object) {
            if let Some(o) = tags
                .get("emulator.outcome")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
            {
                b.outcome = o;
            }
            if let Some(d) = tags
                .get("emulator.delay_ms")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
            {
                b.delay_ms = d;
            }
            if let Some(v) = tags.get("emulator.value").and_then(Value::as_str) {
                b.value = v.to_owned();
            }
        }
        b
    }

    /// The callback a notebook makes: `POST {url}/{verb}?id=..&value=..`.
    pub async fn call_back(&self, run_id: u64, verb: &str) {
        let (url, id, value, traceparent) = {
            let inner = self.lock();
            let Some(run) = inner.runs.get(&run_id) else {
                return;
            };
            let (Some(url), Some(id)) = (
                run.params.get(&self.settings.url_param).cloned(),
                run.params.get(&self.settings.promise_param).cloned(),
            ) else {
                tracing::warn!(
                    run_id,
                    "run has no url/promise_id parameter; nothing to call back"
                );
                return;
            };
            (
                url,
                id,
                run.behaviour.value.clone(),
                run.traceparent.clone(),
            )
        };
        let key = if verb == "reject" { "error" } else { "value" };
        // Like a notebook cell with a simple retry: connection errors and 5xx
        // are tried a few times.
        let mut status = 0u16;
        for attempt in 0..5u32 {
            // The notebook sends back the trace it was started in, as the
            // Python helper does with $TRACEPARENT.
            let mut req = self
                .http
                .post(format!("{url}/{verb}"))
                .query(&[("id", id.as_str()), (key, value.as_str())]);
            if let Some(tp) = &traceparent {
                req = req.header("traceparent", tp);
            }
            match req.send().await {
                Ok(r) => {
                    status = r.status().as_u16();
                    if !r.status().is_server_error() {
                        break;
                    }
                }
                Err(e) => tracing::debug!(run_id, error = %e, "callback failed"),
            }
            tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt))).await;
        }
        let mut inner = self.lock();
        if let Some(run) = inner.runs.get_mut(&run_id) {
            run.callbacks_sent += 1;
            run.callback_statuses.push(status);
        }
    }

    /// Sends a job notification (`jobs.on_start`, `jobs.on_success`,
    /// `jobs.on_failure`) in the background, if a destination is set.
    pub fn notify(&self, run_id: u64, event_type: &'static str) {
        let Some(target) = self.notify.lock().ok().and_then(|n| n.clone()) else {
            return;
        };
        let (job_id, name) = match self.lock().runs.get(&run_id) {
            Some(r) => (r.job_id, r.run_name.clone()),
            None => return,
        };
        let body = json!({
            "event_type": event_type,
            "workspace_id": "1234567890123456",
            "run": {"run_id": run_id},
            "job": {"job_id": job_id, "name": name},
        });
        let http = self.http.clone();
        tokio::spawn(async move {
            let r = http
                .post(&target.url)
                .basic_auth(&target.username, Some(&target.password))
                .json(&body)
                .send()
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "notification not delivered");
            }
        });
    }

    pub fn set_state(
        &self,
        run_id: u64,
        life: &'static str,
        result: Option<&'static str>,
        message: &str,
    ) {
        let mut inner = self.lock();
        if let Some(run) = inner.runs.get_mut(&run_id) {
            // A cancelled or finished run stays as it is.
            if run.life_cycle_state == "TERMINATED" {
                return;
            }
            run.life_cycle_state = life;
            run.result_state = result;
            run.state_message = message.to_owned();
            if life == "TERMINATED" {
                run.end_time = now_ms();
            }
        }
    }

    fn is_terminated(&self, run_id: u64) -> bool {
        self.lock()
            .runs
            .get(&run_id)
            .is_none_or(|r| r.life_cycle_state == "TERMINATED")
    }

    /// Plays a run to its end, per its job's behaviour.
    pub async fn execute(self: Arc<Self>, run_id: u64, early_callback_done: bool) {
        let b = match self.lock().runs.get(&run_id) {
            Some(r) => r.behaviour.clone(),
            None => return,
        };
        let shutdown = self.shutdown();
        let sleep = |ms: u64| {
            let s = shutdown.clone();
            async move {
                tokio::select! {
                    _ = s.cancelled() => false,
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
                }
            }
        };
        if !sleep(10).await {
            return;
        }
        self.set_state(run_id, "RUNNING", None, "");
        self.notify(run_id, "jobs.on_start");
        if !sleep(b.delay_ms).await || self.is_terminated(run_id) {
            return;
        }
        let (result, message) = match b.outcome {
            Outcome::Callback => {
                self.call_back(run_id, "resolve").await;
                ("SUCCESS", "")
            }
            Outcome::DuplicateCallback => {
                self.call_back(run_id, "resolve").await;
                self.call_back(run_id, "resolve").await;
                ("SUCCESS", "")
            }
            Outcome::EarlyCallback => {
                if !early_callback_done {
                    self.call_back(run_id, "resolve").await;
                }
                ("SUCCESS", "")
            }
            Outcome::RejectCallback => {
                self.call_back(run_id, "reject").await;
                ("FAILED", "Notebook rejected its promise")
            }
            Outcome::RetryThenCallback => {
                self.set_state(
                    run_id,
                    "WAITING_FOR_RETRY",
                    None,
                    "Attempt 0 failed; waiting to retry",
                );
                if !sleep(b.delay_ms.max(1000)).await || self.is_terminated(run_id) {
                    return;
                }
                if let Some(r) = self.lock().runs.get_mut(&run_id) {
                    r.attempt_number = 1;
                }
                self.set_state(run_id, "RUNNING", None, "");
                if !sleep(b.delay_ms).await || self.is_terminated(run_id) {
                    return;
                }
                self.call_back(run_id, "resolve").await;
                ("SUCCESS", "")
            }
            Outcome::Fail => ("FAILED", "Workload failed, see run output for details"),
            Outcome::SuccessNoCallback => {
                if let Some(r) = self.lock().runs.get_mut(&run_id) {
                    r.exit_value = Some(b.value.clone());
                }
                ("SUCCESS", "")
            }
            Outcome::SuccessNoOutput => ("SUCCESS", ""),
            Outcome::NeverFinish => return,
        };
        if self.is_terminated(run_id) {
            return;
        }
        self.set_state(run_id, "TERMINATING", None, "");
        if !sleep(5).await {
            return;
        }
        self.set_state(run_id, "TERMINATED", Some(result), message);
        self.notify(
            run_id,
            if result == "SUCCESS" {
                "jobs.on_success"
            } else {
                "jobs.on_failure"
            },
        );
    }
}
