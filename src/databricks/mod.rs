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
mod ratelimit;

use std::collections::BTreeMap;
use std::future::Future;

pub use client::{Client, ClientSettings, Credentials, WorkspaceSettings};
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

/// `{"error_code", "message"}`, Databricks's error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    #[serde(default)]
    pub error_code: String,
    #[serde(default)]
    pub message: String,
}

impl ApiErrorBody {
    /// An error answer's body; one that is not the documented JSON becomes
    /// the status's name and the body's first 500 characters. Pure, for the
    /// fuzz target `error_body`.
    pub fn from_answer(status: u16, bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes).unwrap_or_else(|_| ApiErrorBody {
            error_code: reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("ERROR")
                .replace(' ', "_")
                .to_uppercase(),
            message: String::from_utf8_lossy(bytes).chars().take(500).collect(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
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
        matches!(self, DatabricksError::Transient { .. })
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
}

/// Jobs API 2.2 `status` (newer than `state`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub termination_details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    #[serde(default)]
    pub task_key: String,
    #[serde(default)]
    pub run_id: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    #[serde(default)]
    pub life_cycle_state: Option<String>,
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
    /// Hold every call to `workspace` for `d` (after a 429).
    fn pause(
        &self,
        workspace: &str,
        d: std::time::Duration,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
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
    /// `runs/get-output`: the notebook's exit value (`notebook_output.result`).
    fn get_output(
        &self,
        workspace: &str,
        run: RunId,
    ) -> impl Future<Output = Result<Option<String>, DatabricksError>> + Send;
}
