//! Whether a failed attempt gets another (docs/contracts.md, retries): the
//! rule, as pure functions, and the one step that records the failure and
//! schedules the next attempt. The reconciler (a run that ended) and the
//! sidecar (a notebook's `reject` that is not `final`) both call
//! [`fail_or_retry`]; when it answers `false` they settle as they always
//! did. The next attempt itself is launched by `worker::retry`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::domain::Promise;
use crate::store::{AttemptOutcome, Attempts, StoreError};

/// The wait before the next attempt, if `p`'s policy retries an attempt
/// that ended with any of `endings` (result state, termination code,
/// `NOTEBOOK_REJECTED`): attempts remain, and the next would start before
/// the promise's deadline (else the failure settles it now, rather than a
/// timeout later).
pub fn retry_delay(p: &Promise, endings: &[&str], now_ms: i64) -> Option<Duration> {
    let policy = p.retry.policy.as_ref()?;
    if p.parent.is_none() && p.family.is_some() {
        return None;
    }
    if p.retry.attempt >= policy.max_attempts() || !policy.retries(endings) {
        return None;
    }
    let delay = policy.backoff(p.retry.attempt);
    let due = now_ms.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    (due < p.timeout).then_some(delay)
}

/// The record of the current attempt, failed with `failure`.
pub fn failed_attempt(p: &Promise, failure: &Value, now_ms: i64) -> Value {
    json!({
        "attempt": p.retry.attempt,
        "run_id": p.run_id.map(|r| r.get()),
        "repair_id": p.retry.repair_id,
        "started_on": p.activity.launched_on,
        "ended_on": now_ms,
        "failure": failure,
    })
}

/// If `p`'s policy retries this ending, records the failed attempt and
/// schedules the next: `true`, and the promise stays PENDING. `false`: the
/// caller settles as without a policy. A repeat for an attempt already
/// handled (or superseded) is `true` too: nothing to settle from it.
pub async fn fail_or_retry<S: Attempts>(
    store: &S,
    p: &Promise,
    endings: &[&str],
    failure: &Value,
) -> Result<bool, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    // Waiting for the next attempt, or starting it: this report is of an
    // attempt already handled.
    if p.retry.next_at.is_some() || p.retry.launching {
        return Ok(true);
    }
    let Some(delay) = retry_delay(p, endings, now) else {
        return Ok(false);
    };
    let record = failed_attempt(p, failure, now);
    let outcome = store
        .attempt_failed(&p.id, p.retry.attempt, &record, delay)
        .await?;
    if outcome == AttemptOutcome::Done {
        metrics::counter!("runbridge_retries_total", "mode" => p.retry.policy.as_ref().map(|r| r.mode().as_str()).unwrap_or("")).increment(1);
        tracing::info!(promise.id = %p.id, attempt = p.retry.attempt, delay_ms = delay.as_millis() as u64, "attempt failed; the next is scheduled");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::retry::{RetryMessage, RetryPolicy};
    use crate::domain::{PromiseId, State};
    use std::collections::HashMap;

    fn promise(policy: Value, attempt: u32, timeout: i64) -> Promise {
        let m: RetryMessage = serde_json::from_value(policy).unwrap();
        let mut f = HashMap::new();
        f.insert("id".to_string(), "p".to_string());
        f.insert("state".to_string(), "PENDING".to_string());
        f.insert("timeout".to_string(), timeout.to_string());
        f.insert("an".to_string(), attempt.to_string());
        f.insert(
            "rt".to_string(),
            RetryPolicy::parse(&m, true).unwrap().to_stored(),
        );
        let p = Promise::from_fields(&f).unwrap();
        assert_eq!(p.id, PromiseId::parse("p").unwrap());
        assert_eq!(p.state, State::Pending);
        p
    }

    #[test]
    fn retries_what_the_policy_names_while_attempts_and_time_remain() {
        let policy = json!({"max_attempts": 3, "backoff": {"initial_seconds": 1}});
        let p = promise(policy.clone(), 1, 1_000_000);
        assert_eq!(
            retry_delay(&p, &["FAILED"], 0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(retry_delay(&p, &["CANCELED", "USER_CANCELED"], 0), None);
        let p2 = promise(policy.clone(), 2, 1_000_000);
        assert_eq!(
            retry_delay(&p2, &["FAILED"], 0),
            Some(Duration::from_secs(2))
        );
        let p3 = promise(policy.clone(), 3, 1_000_000);
        assert_eq!(retry_delay(&p3, &["FAILED"], 0), None, "exhausted");
        let late = promise(policy, 1, 500);
        assert_eq!(
            retry_delay(&late, &["FAILED"], 0),
            None,
            "past the deadline"
        );
    }
}
