//! The emulator's state: jobs, runs, idempotency tokens, faults.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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
    /// Calls `{url}/resolve` once, then fails: a later cell raised after
    /// the notebook reported success (the promise says resolved, the run
    /// says FAILED; what the audit reports as a mismatch).
    CallbackThenFail,
    /// The first attempt fails; Databricks retries (WAITING_FOR_RETRY, a new
    /// attempt_number) and the second attempt calls back.
    RetryThenCallback,
    /// The first attempt of the task fails; Databricks retries it (a new
    /// task run, the next `attempt_number`) and the second attempt exits
    /// with the value without calling back.
    RetryThenExit,
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(Value::String(s.replace('-', "_")))
            .map_err(|_| format!("unknown outcome {s:?} (callback, duplicate_callback, early_callback, fail, success_no_callback, success_no_output, never_finish, reject_callback, callback_then_fail, retry_then_callback, retry_then_exit)"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Behaviour {
    pub outcome: Outcome,
    /// How long the notebook "runs" before its outcome.
    pub delay_ms: u64,
    /// The value the notebook resolves with (or exits with).
    pub value: String,
    /// Per task key, the exit value of that task (tags
    /// `emulator.value.<task_key>`); other tasks exit with `value`.
    #[serde(default)]
    pub task_values: BTreeMap<String, String>,
    /// The first this many attempts for one promise fail without calling
    /// back (tag `emulator.fail_attempts`): an attempt is a run (runs with
    /// the same promise id count in order) or a repair of one.
    #[serde(default)]
    pub fail_attempts: u32,
    /// On a failing attempt, only this task fails and the others succeed
    /// (tag `emulator.fail_task`); else the first task fails and the rest
    /// are `UPSTREAM_FAILED`.
    #[serde(default)]
    pub fail_task: Option<String>,
    /// Progress updates the notebook sends while it runs, spread over its
    /// delay (tag `emulator.progress`): `POST {url}/progress?id=..`.
    #[serde(default)]
    pub progress_updates: u32,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            outcome: Outcome::Callback,
            delay_ms: 200,
            value: "hello world".into(),
            task_values: BTreeMap::new(),
            fail_attempts: 0,
            fail_task: None,
            progress_updates: 0,
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
    /// 403 `PERMISSION_DENIED`, as for a caller without permission on the job.
    PermissionDenied,
    /// 400 `INVALID_STATE`: the workspace's hourly quota of created runs.
    JobQuota,
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
    pub token_param: String,
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
            token_param: "callback_token".into(),
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

impl Job {
    /// Job-level parameters: (name, default).
    pub fn parameters(&self) -> Vec<(String, String)> {
        self.settings
            .get("parameters")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        Some((
                            p.get("name")?.as_str()?.to_owned(),
                            p.get("default")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The job's tasks; a job defined without any has one notebook task
    /// (an emulator simplification).
    pub fn tasks(&self) -> Vec<Value> {
        match self.settings.get("tasks").and_then(Value::as_array) {
            Some(t) if !t.is_empty() => t.clone(),
            _ => vec![
                json!({"task_key": "notebook", "notebook_task": {"notebook_path": "/notebook"}}),
            ],
        }
    }

    /// `max_concurrent_runs`: 1 unless the job sets it (`jobs/create` fills
    /// the default in, so this reads what `jobs/get` shows).
    pub fn max_concurrent_runs(&self) -> u64 {
        self.settings
            .get("max_concurrent_runs")
            .and_then(Value::as_u64)
            .unwrap_or(1)
    }

    /// Whether runs past the limit queue (the 2.2 default) or are skipped.
    pub fn queue_enabled(&self) -> bool {
        self.settings
            .pointer("/queue/enabled")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    /// What a run's notebook sees: the job's parameters (their defaults,
    /// overridden by `jp`) when it defines any, else its notebook task's
    /// `base_parameters` overridden by `np`. An undefined name in `jp` is
    /// accepted (as the Databricks CLI's test server accepts it) but reaches
    /// no notebook. A run-now and a repair alike: a repair runs with the
    /// job's settings and the repair's own parameters, not the original
    /// run's.
    pub fn notebook_sees(
        &self,
        jp: Option<&BTreeMap<String, String>>,
        np: Option<&BTreeMap<String, String>>,
    ) -> BTreeMap<String, String> {
        let defined = self.parameters();
        if !defined.is_empty() {
            return defined
                .into_iter()
                .map(|(name, default)| {
                    let v = jp.and_then(|p| p.get(&name)).cloned().unwrap_or(default);
                    (name, v)
                })
                .collect();
        }
        let mut p: BTreeMap<String, String> = self
            .tasks()
            .iter()
            .find_map(|t| {
                t.get("notebook_task")?
                    .get("base_parameters")?
                    .as_object()
                    .cloned()
            })
            .map(|m| {
                m.into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        p.extend(np.cloned().unwrap_or_default());
        p
    }
}

/// The defaults `jobs/create` fills in and `jobs/get` then shows: Jobs API
/// 2.2 queues by default and runs one run of a job at a time (the SDK's
/// `JobSettings` docstrings: `max_concurrent_runs` "This value cannot
/// exceed 1000. Setting this value to 0 causes all new runs to be
/// skipped", defaulting to 1; "Updating from Jobs API 2.1 to 2.2": queueing
/// is on by default).
pub fn with_defaults(
    mut settings: serde_json::Map<String, Value>,
) -> serde_json::Map<String, Value> {
    settings
        .entry("max_concurrent_runs")
        .or_insert_with(|| json!(1));
    settings
        .entry("queue")
        .or_insert_with(|| json!({"enabled": true}));
    settings
}

/// A task's kind: the name of its `*_task` field.
pub fn task_kind(task: &Value) -> String {
    task.as_object()
        .and_then(|o| o.keys().find(|k| k.ends_with("_task")).cloned())
        .unwrap_or_else(|| "unknown".into())
}

/// One task of a run, with its own run id (Jobs API 2.1+: outputs are read
/// per task run).
#[derive(Debug, Clone, Serialize)]
pub struct TaskRun {
    pub task_key: String,
    pub run_id: u64,
    /// 0 for a task's first attempt; each retry or repair of the task adds
    /// an entry with the next number.
    pub attempt_number: u32,
    /// `notebook_task`, `spark_python_task`, ...
    pub kind: String,
    pub result_state: Option<&'static str>,
    pub exit_value: Option<String>,
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
    pub tasks: Vec<TaskRun>,
    /// Why a QUEUED run waits (`MAX_CONCURRENT_RUNS_REACHED`).
    pub queue_reason: Option<String>,
    /// The W3C `traceparent` header of the request that created the run
    /// (the emulator's record only; not part of the Jobs API's run object).
    pub traceparent: Option<String>,
    /// How many runs for the same promise id came before this one (for
    /// `Behaviour::fail_attempts`).
    pub earlier_runs: u32,
    /// The run as first played, once it has been repaired (`repair_history`
    /// item `ORIGINAL`), and each repair since, oldest first.
    pub original: Option<RepairRecord>,
    pub repairs: Vec<RepairRecord>,
    #[serde(skip)]
    pub behaviour: Behaviour,
}

/// One item of a run's `repair_history`.
#[derive(Debug, Clone, Serialize)]
pub struct RepairRecord {
    /// `None` for the original run.
    pub id: Option<u64>,
    pub start_time: i64,
    pub end_time: i64,
    pub life_cycle_state: &'static str,
    pub result_state: Option<&'static str>,
    pub task_run_ids: Vec<u64>,
}

impl Run {
    /// Each task's latest attempt, in the job's task order.
    pub fn latest_tasks(&self) -> Vec<&TaskRun> {
        let mut latest: Vec<&TaskRun> = Vec::new();
        for t in &self.tasks {
            match latest.iter_mut().find(|l| l.task_key == t.task_key) {
                Some(l) if t.attempt_number >= l.attempt_number => *l = t,
                Some(_) => {}
                None => latest.push(t),
            }
        }
        latest
    }

    /// Adds the next attempt of `key`'s task with run id `run_id`.
    pub fn add_attempt(&mut self, key: &str, run_id: u64) {
        let Some(last) = self
            .latest_tasks()
            .into_iter()
            .find(|t| t.task_key == key)
            .cloned()
        else {
            return;
        };
        self.tasks.push(TaskRun {
            run_id,
            attempt_number: last.attempt_number + 1,
            result_state: None,
            exit_value: None,
            ..last
        });
    }

    /// This play of the run counted among its promise's attempts (0 first).
    pub fn attempt_index(&self) -> u32 {
        self.earlier_runs + self.repairs.len() as u32
    }

    /// The run as played so far, as its `repair_history` item `ORIGINAL`.
    pub fn as_played(&self) -> RepairRecord {
        RepairRecord {
            id: None,
            start_time: self.start_time,
            end_time: self.end_time,
            life_cycle_state: self.life_cycle_state,
            result_state: self.result_state,
            task_run_ids: self.tasks.iter().map(|t| t.run_id).collect(),
        }
    }

    /// Does this play fail, per `Behaviour::fail_attempts`?
    pub fn failing(&self) -> bool {
        self.attempt_index() < self.behaviour.fail_attempts
    }
}

#[derive(Default)]
pub struct Inner {
    pub jobs: BTreeMap<u64, Job>,
    pub runs: BTreeMap<u64, Run>,
    pub tokens: HashMap<String, u64>,
    pub next_job_id: u64,
    pub next_run_id: u64,
    pub next_repair_id: u64,
    /// Runs created per promise id (the run's promise parameter).
    pub runs_per_promise: HashMap<String, u32>,
    /// Task run id → its parent run.
    pub task_parent: HashMap<u64, u64>,
    /// Tokens Databricks no longer accepts (revoked or expired PATs), and
    /// whether to answer with the older HTML page instead of JSON.
    pub refused_tokens: HashMap<String, bool>,
    /// Per job, the most runs it ever had active at once.
    pub max_active: BTreeMap<u64, u64>,
    /// Per job, its runs holding a concurrent slot now, and its queued runs
    /// in order, kept in step with every state change ([`Inner::moved`]):
    /// admitting, starting and counting then cost no walk over every run
    /// (which made each state change cost the number of runs so far).
    pub active: HashMap<u64, u64>,
    pub queued: HashMap<u64, BTreeSet<u64>>,
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

/// Lifecycle states of a run that holds one of its job's concurrent slots.
pub const ACTIVE: &[&str] = &["PENDING", "RUNNING", "TERMINATING", "WAITING_FOR_RETRY"];

impl Inner {
    /// A run of `job` went from `from` (`None`: it is new) to `to`.
    pub fn moved(&mut self, job: Option<u64>, run_id: u64, from: Option<&str>, to: &str) {
        let Some(job) = job else { return };
        let was = from.is_some_and(|f| ACTIVE.contains(&f));
        let is = ACTIVE.contains(&to);
        let active = self.active.entry(job).or_default();
        match (was, is) {
            (false, true) => *active += 1,
            (true, false) => *active = active.saturating_sub(1),
            _ => {}
        }
        if from == Some("QUEUED")
            && to != "QUEUED"
            && let Some(q) = self.queued.get_mut(&job)
        {
            q.remove(&run_id);
        }
        if to == "QUEUED" && from != Some("QUEUED") {
            self.queued.entry(job).or_default().insert(run_id);
        }
        if to == "RUNNING" {
            let now = self.active.get(&job).copied().unwrap_or(0);
            let m = self.max_active.entry(job).or_default();
            *m = (*m).max(now);
        }
    }

    /// Runs of `job` holding a concurrent slot.
    pub fn active_runs(&self, job: u64) -> u64 {
        self.active.get(&job).copied().unwrap_or(0)
    }

    /// The job's oldest queued run.
    pub fn oldest_queued(&self, job: u64) -> Option<u64> {
        self.queued.get(&job).and_then(|q| q.first().copied())
    }
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
            next_repair_id: 500_000,
            ..Default::default()
        };
        // Preconfigured jobs are set up as runbridge's docs say: job
        // parameters for the three callback values, one notebook task.
        for (id, b) in &settings.jobs {
            let params: Vec<Value> = [
                &settings.promise_param,
                &settings.url_param,
                &settings.token_param,
            ]
            .iter()
            .map(|n| json!({"name": n, "default": ""}))
            .collect();
            inner.jobs.insert(*id, Job {
                job_id: *id,
                settings: json!({
                    "name": format!("emulated job {id}"),
                    "tags": {"emulator.outcome": b.outcome},
                    "parameters": params,
                    "tasks": [{"task_key": "notebook", "notebook_task": {"notebook_path": "/Shared/runbridge/notebook"}}],
                    // A limit of their own, the highest Databricks allows:
                    // these jobs serve suites that run many at once.
                    "max_concurrent_runs": 1000,
                    "queue": {"enabled": true},
                }),
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
            let number = |k: &str| {
                tags.get(k)
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<u32>().ok())
            };
            if let Some(n) = number("emulator.fail_attempts") {
                b.fail_attempts = n;
            }
            if let Some(n) = number("emulator.progress") {
                b.progress_updates = n;
            }
            if let Some(t) = tags.get("emulator.fail_task").and_then(Value::as_str) {
                b.fail_task = Some(t.to_owned());
            }
            for (k, v) in tags {
                if let (Some(task), Some(v)) = (k.strip_prefix("emulator.value."), v.as_str()) {
                    b.task_values.insert(task.to_owned(), v.to_owned());
                }
            }
        }
        b
    }
}
