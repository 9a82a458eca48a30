//! Adoption: an operator makes a pending promise follow a run started
//! outside runbridge (a person re-ran the job from the Databricks UI,
//! another tool started it). From then on the promise follows that run as
//! if runbridge had launched it: the reconciler checks it, the deadline
//! holds, its exit value or callback settles the promise, and the event
//! names it. The run it followed before stays in its attempts.

use std::time::Duration;

use serde_json::json;

use crate::databricks::{DatabricksError, RunReader};
use crate::domain::{Promise, PromiseId, RunId, State};
use crate::store::{AdoptOutcome, Audits, PromiseStore, StoreError};

/// Why an adoption was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("no promise {0}")]
    NotFound(String),
    #[error("promise {id} is already settled ({state}): only a pending promise can adopt a run")]
    Settled { id: String, state: State },
    #[error("run {0} does not exist in the promise's workspace")]
    NoSuchRun(u64),
    #[error("run {run} is a run of {found}, and promise {id} runs {expected}")]
    OtherJob {
        id: String,
        run: u64,
        found: String,
        expected: String,
    },
    #[error("run {run} is already followed by promise {other}")]
    Taken { run: u64, other: String },
    #[error("promise {0} is launching its next attempt right now; try again in a moment")]
    Launching(String),
    #[error(transparent)]
    Databricks(DatabricksError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn what_runs(job_id: Option<u64>) -> String {
    match job_id {
        Some(j) => format!("job {j}"),
        None => "one-time runs (runs/submit)".into(),
    }
}

/// Adopts `run` for the pending promise `id`: the run must exist in the
/// promise's workspace and be a run of the promise's job (a one-time run
/// for a promise launched with `runs/submit`).
pub async fn adopt<S: PromiseStore + Audits>(
    store: &S,
    runs: &dyn RunReader,
    id: &PromiseId,
    run: RunId,
    first_poll: Duration,
) -> Result<Promise, AdoptError> {
    let p = store
        .get(id)
        .await?
        .ok_or_else(|| AdoptError::NotFound(id.to_string()))?;
    if p.state.is_settled() {
        return Err(AdoptError::Settled {
            id: id.to_string(),
            state: p.state,
        });
    }
    let info = match runs.read_run(&p.workspace, run).await {
        Ok(i) => i,
        Err(e) if e.is_unknown_run() => return Err(AdoptError::NoSuchRun(run.get())),
        Err(e) => return Err(AdoptError::Databricks(e)),
    };
    let one_time = info.run_type.as_deref() == Some("SUBMIT_RUN");
    let fits = match p.job_id {
        Some(j) => info.job_id == Some(j) && !one_time,
        None => one_time,
    };
    if !fits {
        return Err(AdoptError::OtherJob {
            id: id.to_string(),
            run: run.get(),
            found: if one_time {
                what_runs(None)
            } else {
                what_runs(info.job_id)
            },
            expected: what_runs(p.job_id),
        });
    }
    let replaced = json!({
        "attempt": "ATTEMPT",
        "run_id": "RUN",
        "ended_on": chrono::Utc::now().timestamp_millis(),
        "failure": {"reason": "replaced", "message": format!("replaced by the adopted run {run}")},
    })
    .to_string()
    // Numbers, placed by the script.
    .replace("\"ATTEMPT\"", "ATTEMPT")
    .replace("\"RUN\"", "RUN");
    match store.adopt_run(id, run, first_poll, &replaced).await? {
        AdoptOutcome::Adopted => {}
        AdoptOutcome::NotFound => return Err(AdoptError::NotFound(id.to_string())),
        AdoptOutcome::Settled(state) => {
            return Err(AdoptError::Settled {
                id: id.to_string(),
                state,
            });
        }
        AdoptOutcome::Launching => return Err(AdoptError::Launching(id.to_string())),
        AdoptOutcome::Taken(other) => {
            return Err(AdoptError::Taken {
                run: run.get(),
                other,
            });
        }
    }
    tracing::info!(promise.id = %id, run_id = run.get(), "run adopted by an operator");
    store
        .get(id)
        .await?
        .ok_or_else(|| AdoptError::NotFound(id.to_string()))
}
