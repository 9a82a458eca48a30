//! The Databricks Jobs API 2.2 client (the only module that uses reqwest for
//! Databricks).
//!
//! [`Jobs`] is what the worker sees. [`Client`] implements it over HTTP with:
//! - one bearer token per configured workspace, kept in a `SecretString`;
//! - retries with jittered exponential backoff (backon) on 429 (honouring
//!   `Retry-After`), 5xx, `COULD_NOT_ACQUIRE_LOCK`-style error codes, timeouts
//!   and connection errors. A retry of `run-now` or `runs/submit` resends the
//!   same `idempotency_token`, so it can never start a second run;
//! - a token-bucket rate limit shared by every task of the process, per
//!   workspace.
//!
//! Anything else (400, 403, 404, ...) is [`DatabricksError::Permanent`] and
//! carries Databricks's own error body for the promise's rejection.

mod client;
mod endpoints;
mod errors;
mod ratelimit;

use std::collections::BTreeMap;
use std::future::Future;

pub use client::{Client, ClientSettings, Credentials, WorkspaceSettings};
pub use errors::{ApiErrorBody, ErrorClass, classify, is_unknown_run};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{IdempotencyToken, RunId};

#[derive(Debug, Clone, PartialEq)]
pub enum LaunchRequest {
    RunNow {
        job_id: u64,
        job_parameters: Option<BTreeMap<String, String>>,
        notebook_params: Option<BTreeMap<String, String>>,
    },
    /// A `runs/submit` body (without the idempotency token, added here).
    Submit(serde_json::Map<String, Value>),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DatabricksError {
    /// Databricks refused the request for good (400, 403, 404, ...).
    #[error("databricks refused {endpoint}: HTTP {status} {}: {}", body.error_code, body.message)]
    Permanent {
        endpoint: &'static str,
        status: u16,
        body: ApiErrorBody,
    },
    /// Still failing after the retries (429, 5xx, lock, timeout, connection).
    #[error("databricks {endpoint} unavailable after retries: {reason}")]
    Transient {
        endpoint: &'static str,
        reason: String,
    },
    /// The workspace refused its credentials (401, or a 403 that is not a
    /// `PERMISSION_DENIED` on the resource): an expired or revoked token. The
    /// work waits for the operator, nothing is rejected.
    #[error("databricks refused the credentials of workspace {workspace:?} on {endpoint}: HTTP {status} {}: {}", body.error_code, body.message)]
    Credentials {
        workspace: String,
        endpoint: &'static str,
        status: u16,
        body: ApiErrorBody,
    },
    #[error("unknown workspace {0:?}: not configured under [databricks.workspaces]")]
    UnknownWorkspace(String),
    #[error("databricks {endpoint}: unexpected response: {reason}")]
    Protocol {
        endpoint: &'static str,
        reason: String,
    },
}

impl DatabricksError {
    /// Should the caller try again later (requeue), rather than give up?
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DatabricksError::Transient { .. } | DatabricksError::Credentials { .. }
        )
    }

    /// Did Databricks say the run does not exist (400 "Run N does not
    /// exist", or 404)?
    pub fn is_unknown_run(&self) -> bool {
        matches!(self, DatabricksError::Permanent { status, body, .. } if is_unknown_run(*status, body))
    }
}

/// A run as `jobs/runs/get` reports it (the fields the bridge uses; the rest
/// is ignored, so new fields in the API do not break parsing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: u64,
    #[serde(default)]
    pub job_id: Option<u64>,
    #[serde(default)]
    pub run_page_url: Option<String>,
    #[serde(default)]
    pub state: Option<RunState>,
    #[serde(default)]
    pub status: Option<RunStatus>,
    /// Epoch ms; 0 while running.
    #[serde(default)]
    pub end_time: i64,
    #[serde(default)]
    pub attempt_number: u32,
    #[serde(default)]
    pub tasks: Vec<TaskRun>,
    /// Jobs API 2.2 pages `tasks` 100 at a time; the client follows the
    /// pages, so a `RunInfo` it returns has every task and no token.
    #[serde(default)]
    pub next_page_token: Option<String>,
    /// Only with `include_history=true` ([`Jobs::get_run_history`]).
    #[serde(default)]
    pub repair_history: Vec<RepairHistoryItem>,
    /// `JOB_RUN`, `WORKFLOW_RUN` or `SUBMIT_RUN` (a one-time run).
    #[serde(default)]
    pub run_type: Option<String>,
    /// Epoch ms.
    #[serde(default)]
    pub start_time: i64,
    /// The run's job parameters (`JobParameter`: name, default, value).
    #[serde(default)]
    pub job_parameters: Vec<RunJobParameter>,
    /// What `run-now` overrode (`RunParameters`): the task parameters.
    #[serde(default)]
    pub overriding_parameters: Option<RunParameters>,
}

/// One of a run's job parameters as `runs/get` and `runs/list` show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunJobParameter {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

/// A run's `overriding_parameters` (`RunParameters`), the part the bridge
/// sends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunParameters {
    #[serde(default)]
    pub notebook_params: BTreeMap<String, String>,
}

/// A task's notebook, as a one-time run's tasks show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NotebookTask {
    #[serde(default)]
    pub base_parameters: BTreeMap<String, String>,
}

/// One page of `runs/list` (`ListRunsResponse`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunsPage {
    #[serde(default)]
    pub runs: Vec<RunInfo>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub next_page_token: Option<String>,
}

/// What `runs/list` is asked for: runs of every job and one-time runs,
/// active ones (whenever they started) or those started since `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunsQuery {
    /// `active_only`: every run not yet ended.
    Active,
    /// `start_time_from`: every run started at or after this (epoch ms).
    StartedSince(i64),
}

/// One play of a run: the original (`type` ORIGINAL, no id) or a repair
/// (`REPAIR`, its id), as `repair_history` lists them
/// (`RepairHistoryItem` in Databricks' Python SDK).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepairHistoryItem {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub start_time: i64,
}

impl RunInfo {
    /// The id of the run's latest repair, if it was ever repaired.
    pub fn latest_repair_id(&self) -> Option<u64> {
        self.repair_history
            .iter()
            .filter(|r| r.kind.as_deref() == Some("REPAIR"))
            .filter_map(|r| r.id)
            .next_back()
    }
}

/// Jobs API 2.2 `status` (newer than `state`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub termination_details: Option<serde_json::Value>,
    /// Why a QUEUED run waits (`{code, message}`).
    #[serde(default)]
    pub queue_details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    #[serde(default)]
    pub task_key: String,
    #[serde(default)]
    pub run_id: u64,
    #[serde(default)]
    pub state: Option<RunState>,
    /// 0 for a task's first attempt. A task's retry (`max_retries`) and
    /// each repair add an entry to `tasks` with the same `task_key`, a new
    /// `run_id` and the next number.
    #[serde(default)]
    pub attempt_number: u32,
    /// A one-time run's notebook task (with its `base_parameters`).
    #[serde(default)]
    pub notebook_task: Option<NotebookTask>,
}

impl RunInfo {
    /// A parameter the run was given, by name, wherever the bridge puts
    /// it: a job parameter (its value, else its default), a task parameter
    /// of `run-now`, or a notebook task's base parameter (one-time runs).
    /// Empty values count as absent (a job defines the callback parameters
    /// with empty defaults).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        let job = self
            .job_parameters
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.value.as_deref().or(p.default.as_deref()));
        let notebook = || {
            self.overriding_parameters
                .as_ref()
                .and_then(|o| o.notebook_params.get(name))
                .map(String::as_str)
        };
        let task = || {
            self.tasks
                .iter()
                .filter_map(|t| t.notebook_task.as_ref())
                .find_map(|n| n.base_parameters.get(name))
                .map(String::as_str)
        };
        job.filter(|v| !v.is_empty())
            .or_else(|| notebook().filter(|v| !v.is_empty()))
            .or_else(|| task().filter(|v| !v.is_empty()))
    }

    /// Each task's latest attempt (the highest `attempt_number` of its
    /// `task_key`; the later entry on a tie), in the order the tasks
    /// first appear.
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
}

/// A job as `jobs/get` reports it: what the bridge needs to launch it right
/// (how it takes parameters) and what `runbridge check` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub job_id: u64,
    #[serde(default)]
    pub settings: JobSettings,
    /// `jobs/get` pages `tasks` 100 at a time; followed by the client.
    #[serde(default)]
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobSettings {
    #[serde(default)]
    pub name: Option<String>,
    /// Job-level parameters. A job that defines any takes only
    /// `job_parameters` on `run-now`; one that defines none takes only task
    /// parameters (`notebook_params`).
    #[serde(default)]
    pub parameters: Vec<JobParameterDefinition>,
    #[serde(default)]
    pub tasks: Vec<JobTask>,
    #[serde(default)]
    pub max_concurrent_runs: Option<u64>,
    #[serde(default)]
    pub queue: Option<QueueSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobParameterDefinition {
    pub name: String,
    #[serde(default)]
    pub default: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueSettings {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobTask {
    #[serde(default)]
    pub task_key: String,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

impl JobTask {
    /// The task's kind: the name of its `*_task` field (`notebook_task`, ...).
    pub fn kind(&self) -> &str {
        self.rest
            .keys()
            .find(|k| k.ends_with("_task"))
            .map(String::as_str)
            .unwrap_or("unknown")
    }
}

/// How a job receives the bridge's three values (promise id, callback URL,
/// callback token), learnt from its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParameterStyle {
    /// The job defines job parameters: only `job_parameters` are accepted,
    /// and a value reaches the notebook only under a defined name.
    Job { defined: Vec<String> },
    /// The job defines none: task parameters (`notebook_params`) only.
    Task,
}

impl JobSettings {
    pub fn parameter_style(&self) -> ParameterStyle {
        if self.parameters.is_empty() {
            ParameterStyle::Task
        } else {
            ParameterStyle::Job {
                defined: self.parameters.iter().map(|p| p.name.clone()).collect(),
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    #[serde(default)]
    pub life_cycle_state: Option<String>,
    #[serde(default)]
    pub queue_reason: Option<String>,
    #[serde(default)]
    pub result_state: Option<String>,
    #[serde(default)]
    pub state_message: Option<String>,
}

/// Which budget a call draws from: launches, run checks and cancellations are
/// limited separately, so a burst of triggers cannot starve cancellations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallClass {
    Launch,
    Poll,
    Cancel,
}

impl CallClass {
    pub fn as_str(self) -> &'static str {
        match self {
            CallClass::Launch => "launch",
            CallClass::Poll => "poll",
            CallClass::Cancel => "cancel",
        }
    }
}

/// A request budget shared by every worker of a deployment (implemented on
/// Redis by `store`). Object-safe, so the client holds it as `Arc<dyn _>`.
pub trait RateBudget: Send + Sync + 'static {
    /// `Ok(ZERO)`: go now (a token was taken); `Ok(d)`: ask again after `d`.
    fn try_acquire(
        &self,
        workspace: &str,
        class: CallClass,
        rate: f64,
        burst: u32,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<std::time::Duration, String>> + Send + '_>>;
    /// Hold every call of `class` to `workspace` for `d` (after a 429).
    fn pause(
        &self,
        workspace: &str,
        class: CallClass,
        d: std::time::Duration,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// `runs/get` alone, object-safe: what the sidecar holds (as `Arc<dyn _>`)
/// to check a run an operator adopts. Every [`Jobs`] is one.
pub trait RunReader: Send + Sync + 'static {
    fn read_run<'a>(
        &'a self,
        workspace: &'a str,
        run: RunId,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<RunInfo, DatabricksError>> + Send + 'a>>;
}

impl<J: Jobs> RunReader for J {
    fn read_run<'a>(
        &'a self,
        workspace: &'a str,
        run: RunId,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<RunInfo, DatabricksError>> + Send + 'a>> {
        Box::pin(self.get_run(workspace, run))
    }
}

/// The Jobs API operations the bridge uses.
pub trait Jobs: Clone + Send + Sync + 'static {
    /// `run-now` or `runs/submit` with the token; the run id Databricks gave.
    /// `traceparent` (W3C) goes along as a header, so the trigger's trace
    /// covers the launch.
    fn launch(
        &self,
        workspace: &str,
        req: &LaunchRequest,
        token: &IdempotencyToken,
        traceparent: Option<&str>,
    ) -> impl Future<Output = Result<RunId, DatabricksError>> + Send;
    /// `runs/get`, every page of tasks.
    fn get_run(
        &self,
        workspace: &str,
        run: RunId,
    ) -> impl Future<Output = Result<RunInfo, DatabricksError>> + Send;
    fn cancel_run(
        &self,
        workspace: &str,
        run: RunId,
    ) -> impl Future<Output = Result<(), DatabricksError>> + Send;
    /// `runs/repair` of a finished run, rerunning every failed task
    /// (`rerun_all_failed_tasks`). `latest_repair_id` is the run's latest
    /// repair (none for the first): Databricks refuses a stale one, which
    /// is what keeps two repairs from answering one failure. `launch` is
    /// the run's launch, whose parameters the repair carries again (a
    /// repair runs with the job's settings, not the run's overrides). The
    /// repair id.
    fn repair_run(
        &self,
        workspace: &str,
        run: RunId,
        latest_repair_id: Option<u64>,
        launch: &LaunchRequest,
    ) -> impl Future<Output = Result<u64, DatabricksError>> + Send;
    /// `runs/get` with `include_history=true` (first page): the run with
    /// its `repair_history`.
    fn get_run_history(
        &self,
        workspace: &str,
        run: RunId,
    ) -> impl Future<Output = Result<RunInfo, DatabricksError>> + Send;
    /// `jobs/get`, every page of tasks.
    fn get_job(
        &self,
        workspace: &str,
        job_id: u64,
    ) -> impl Future<Output = Result<JobInfo, DatabricksError>> + Send;
    /// One page of `runs/list` (25 runs, tasks expanded, so a one-time
    /// run's parameters show), from `page_token` (none: the first).
    fn list_runs(
        &self,
        workspace: &str,
        query: &RunsQuery,
        page_token: Option<&str>,
    ) -> impl Future<Output = Result<RunsPage, DatabricksError>> + Send;
    /// `runs/get-output` of one task run: the notebook's exit value
    /// (`notebook_output.result`). Databricks refuses it for the parent of a
    /// run with several tasks: ask each task run.
    fn get_output(
        &self,
        workspace: &str,
        run: RunId,
    ) -> impl Future<Output = Result<Option<String>, DatabricksError>> + Send;
}
