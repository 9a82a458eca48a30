//! What a run's `runs/get` answer means for its promise, as pure functions:
//! [`classify`] reads where the run is (Jobs API 2.2 `status` first, the
//! deprecated `state` as the fallback), [`verdict`] decides how a finished
//! run settles its promise. The reconciler calls them; the tests and the
//! fuzz target `run_info` call them directly.

use serde_json::{Value, json};

use super::ReconcilerSettings;
use crate::config::NoCallbackPolicy;
use crate::databricks::RunInfo;
use crate::domain::Payload;

/// Where a run is, as far as the promise cares.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// Not finished (including Databricks' own retries).
    Running,
    /// Waiting in the job's queue (`max_concurrent_runs` reached, queueing
    /// on): it has not started, so it cannot heartbeat yet.
    Queued { reason: String },
    /// Finished with this result state.
    Ended {
        result: String,
        message: String,
        details: Value,
        end_time: i64,
    },
    /// A lifecycle state this version does not know: treated as running.
    Unknown(String),
}

/// `status.state` values of a run that has not ended (Jobs API 2.2,
/// `RunLifecycleStateV2State` in Databricks' SDK), QUEUED aside.
const V2_NOT_ENDED: &[&str] = &["PENDING", "RUNNING", "TERMINATING", "BLOCKED", "WAITING"];

/// The deprecated `state.life_cycle_state` values of a run that has not
/// ended, for answers without `status`.
const LEGACY_NOT_ENDED: &[&str] = &[
    "PENDING",
    "RUNNING",
    "TERMINATING",
    "WAITING_FOR_RETRY",
    "BLOCKED",
    "WAITING",
];

/// A termination code as a result state, when `state.result_state` is
/// absent (only `status` sent).
fn result_of_code(code: &str) -> String {
    match code {
        "USER_CANCELED" | "CANCELED" => "CANCELED".into(),
        "" => "UNKNOWN".into(),
        other => other.into(),
    }
}

/// Reads `runs/get` (pure; unit-tested). The 2.2 `status` comes first, with
/// `termination_details` as the reason; the deprecated `state` is the
/// fallback for answers without it.
pub fn classify(run: &RunInfo) -> RunOutcome {
    let status = run.status.as_ref();
    let details = status
        .and_then(|s| s.termination_details.clone())
        .unwrap_or(Value::Null);
    let legacy_message = run
        .state
        .as_ref()
        .and_then(|s| s.state_message.clone())
        .unwrap_or_default();
    let detail_message = details
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let message = if detail_message.is_empty() {
        legacy_message
    } else {
        detail_message
    };
    let result_state = run.state.as_ref().and_then(|s| s.result_state.clone());
    let ended = |result: String| RunOutcome::Ended {
        result,
        message: message.clone(),
        details: details.clone(),
        end_time: run.end_time,
    };
    if let Some(state) = status.and_then(|s| s.state.as_deref()) {
        return match state {
            "QUEUED" => RunOutcome::Queued {
                reason: status
                    .and_then(|s| s.queue_details.as_ref())
                    .and_then(|q| q.get("code"))
                    .and_then(Value::as_str)
                    .or_else(|| run.state.as_ref().and_then(|s| s.queue_reason.as_deref()))
                    .unwrap_or("")
                    .to_owned(),
            },
            s if V2_NOT_ENDED.contains(&s) => RunOutcome::Running,
            "TERMINATED" => ended(result_state.unwrap_or_else(|| {
                result_of_code(details.get("code").and_then(Value::as_str).unwrap_or(""))
            })),
            other => RunOutcome::Unknown(other.to_owned()),
        };
    }
    let life = run
        .state
        .as_ref()
        .and_then(|s| s.life_cycle_state.clone())
        .unwrap_or_default();
    match life.as_str() {
        "QUEUED" => RunOutcome::Queued {
            reason: run
                .state
                .as_ref()
                .and_then(|s| s.queue_reason.clone())
                .unwrap_or_default(),
        },
        l if LEGACY_NOT_ENDED.contains(&l) => RunOutcome::Running,
        "TERMINATED" => ended(result_state.unwrap_or_else(|| "UNKNOWN".into())),
        "SKIPPED" | "INTERNAL_ERROR" => ended(result_state.unwrap_or_else(|| life.clone())),
        other => RunOutcome::Unknown(other.to_owned()),
    }
}

/// What a finished run means for its promise.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Resolve(Payload),
    Reject(Value),
}

fn policy(p: NoCallbackPolicy, result: &str) -> Verdict {
    match p {
        NoCallbackPolicy::ResolveNull => Verdict::Resolve(Payload::data("null")),
        NoCallbackPolicy::Reject => Verdict::Reject(json!({
            "reason": "completed_without_callback",
            "result_state": result,
            "message": "the run finished without calling back and without an exit value",
        })),
    }
}

/// Decides a finished run's promise (pure; unit-tested). `output` is the
/// notebook's exit value, asked for only on success.
pub fn verdict(
    s: &ReconcilerSettings,
    result: &str,
    message: &str,
    details: &Value,
    output: Option<String>,
) -> Verdict {
    match (result, output) {
        ("SUCCESS" | "SUCCESS_WITH_FAILURES", Some(v)) => Verdict::Resolve(Payload::data(v)),
        ("SUCCESS", None) => policy(s.success_without_output, result),
        ("SUCCESS_WITH_FAILURES", None) => policy(s.success_with_failures, result),
        _ => Verdict::Reject(json!({
            "reason": "run_failed",
            "result_state": result,
            "state_message": message,
            "termination_details": details,
        })),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::databricks::{RunState, RunStatus};

    fn settings() -> ReconcilerSettings {
        ReconcilerSettings {
            tick: Duration::from_secs(1),
            batch: 10,
            lease: Duration::from_secs(30),
            first_poll: Duration::from_secs(30),
            max_poll: Duration::from_secs(600),
            grace: Duration::from_secs(30),
            success_without_output: NoCallbackPolicy::Reject,
            success_with_failures: NoCallbackPolicy::Reject,
            output_task_key: None,
            cancel_retry_max: Duration::from_secs(60),
            concurrency: 4,
        }
    }

    fn run(life: &str, result: Option<&str>) -> RunInfo {
        RunInfo {
            run_id: 1,
            state: Some(RunState {
                life_cycle_state: Some(life.into()),
                result_state: result.map(Into::into),
                state_message: Some("msg".into()),
                ..Default::default()
            }),
            status: Some(RunStatus {
                state: None,
                termination_details: Some(json!({"code": "RUN_EXECUTION_ERROR"})),
                ..Default::default()
            }),
            end_time: 5,
            ..Default::default()
        }
    }

    #[test]
    fn lifecycle_states_classify() {
        assert_eq!(
            classify(&run("QUEUED", None)),
            RunOutcome::Queued { reason: "".into() }
        );
        for l in [
            "PENDING",
            "RUNNING",
            "TERMINATING",
            "WAITING_FOR_RETRY",
            "BLOCKED",
        ] {
            assert_eq!(classify(&run(l, None)), RunOutcome::Running, "{l}");
        }
        assert!(
            matches!(classify(&run("TERMINATED", Some("FAILED"))), RunOutcome::Ended { result, .. } if result == "FAILED")
        );
        assert!(
            matches!(classify(&run("INTERNAL_ERROR", None)), RunOutcome::Ended { result, .. } if result == "INTERNAL_ERROR")
        );
        assert!(
            matches!(classify(&run("SKIPPED", Some("SKIPPED"))), RunOutcome::Ended { result, .. } if result == "SKIPPED")
        );
        assert_eq!(
            classify(&run("TELEPORTING", None)),
            RunOutcome::Unknown("TELEPORTING".into())
        );
        // Only the newer `status` block present.
        let r = RunInfo {
            run_id: 1,
            status: Some(RunStatus {
                state: Some("TERMINATED".into()),
                termination_details: Some(json!({"code": "SUCCESS"})),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(classify(&r), RunOutcome::Ended { result, .. } if result == "SUCCESS"));
    }

    fn v2(state: &str, details: Value, queue: Value) -> RunInfo {
        RunInfo {
            run_id: 1,
            status: Some(RunStatus {
                state: Some(state.into()),
                termination_details: Some(details),
                queue_details: Some(queue),
            }),
            ..Default::default()
        }
    }

    /// Jobs API 2.2: `status` first (its states are those of the SDK's
    /// `RunLifecycleStateV2State`), `termination_details` the reason.
    #[test]
    fn status_comes_first() {
        for s in ["PENDING", "RUNNING", "TERMINATING", "BLOCKED", "WAITING"] {
            assert_eq!(
                classify(&v2(s, Value::Null, Value::Null)),
                RunOutcome::Running,
                "{s}"
            );
        }
        assert_eq!(
            classify(&v2(
                "QUEUED",
                Value::Null,
                json!({"code": "MAX_CONCURRENT_RUNS_REACHED", "message": "m"})
            )),
            RunOutcome::Queued {
                reason: "MAX_CONCURRENT_RUNS_REACHED".into()
            }
        );
        // Only `status`: the code is the result, its message the reason.
        match classify(&v2(
            "TERMINATED",
            json!({"code": "RUN_EXECUTION_ERROR", "type": "CLIENT_ERROR", "message": "Task a failed"}),
            Value::Null,
        )) {
            RunOutcome::Ended {
                result, message, ..
            } => {
                assert_eq!(result, "RUN_EXECUTION_ERROR");
                assert_eq!(message, "Task a failed");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(&v2("TERMINATED", json!({"code": "USER_CANCELED"}), Value::Null)),
            RunOutcome::Ended { result, .. } if result == "CANCELED"
        ));
        // A failed task: the deprecated state says INTERNAL_ERROR while
        // status says TERMINATED; status wins, the result state is kept.
        let mut r = v2(
            "TERMINATED",
            json!({"code": "RUN_EXECUTION_ERROR", "message": "Task t failed with message: Workload failed."}),
            Value::Null,
        );
        r.state = Some(RunState {
            life_cycle_state: Some("INTERNAL_ERROR".into()),
            result_state: Some("FAILED".into()),
            ..Default::default()
        });
        assert!(
            matches!(classify(&r), RunOutcome::Ended { result, message, .. }
            if result == "FAILED" && message.starts_with("Task t failed"))
        );
        assert_eq!(
            classify(&v2("WAITING_FOR_RETRY", Value::Null, Value::Null)),
            RunOutcome::Unknown("WAITING_FOR_RETRY".into())
        );
    }

    #[test]
    fn verdicts() {
        let s = settings();
        assert_eq!(
            verdict(&s, "SUCCESS", "", &Value::Null, Some("42".into())),
            Verdict::Resolve(Payload::data("42"))
        );
        assert!(
            matches!(verdict(&s, "SUCCESS", "", &Value::Null, None), Verdict::Reject(v) if v["reason"] == "completed_without_callback")
        );
        let mut s2 = settings();
        s2.success_without_output = NoCallbackPolicy::ResolveNull;
        assert_eq!(
            verdict(&s2, "SUCCESS", "", &Value::Null, None),
            Verdict::Resolve(Payload::data("null"))
        );
        match verdict(
            &s,
            "FAILED",
            "Workload failed",
            &json!({"code": "RUN_EXECUTION_ERROR"}),
            None,
        ) {
            Verdict::Reject(v) => {
                assert_eq!(v["state_message"], "Workload failed");
                assert_eq!(v["termination_details"]["code"], "RUN_EXECUTION_ERROR");
                assert_eq!(v["result_state"], "FAILED");
            }
            other => panic!("{other:?}"),
        }
        for r in [
            "TIMEDOUT",
            "CANCELED",
            "INTERNAL_ERROR",
            "SKIPPED",
            "UPSTREAM_FAILED",
            "UPSTREAM_CANCELED",
        ] {
            assert!(
                matches!(verdict(&s, r, "", &Value::Null, None), Verdict::Reject(_)),
                "{r}"
            );
        }
        assert!(matches!(
            verdict(&s, "SUCCESS_WITH_FAILURES", "", &Value::Null, None),
            Verdict::Reject(_)
        ));
    }
}
