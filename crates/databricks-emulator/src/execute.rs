//! How an emulated run plays out: queued behind the job's
//! `max_concurrent_runs`, then PENDING → RUNNING → TERMINATING → TERMINATED,
//! its notebook calling back (`{url}/resolve?id=..&value=..`, exactly the
//! Resonate example notebook) or exiting with a value per task, and the
//! job's notifications sent on the way.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::model::{Emulator, Outcome, now_ms};

/// How often a queued run looks whether its turn came.
const QUEUE_POLL: Duration = Duration::from_millis(20);

/// A notebook's value computed from its parameters: `{{name}}` in the
/// job's value (tag `emulator.value`) becomes the run's parameter `name`,
/// so each run of one job can answer differently (a fan-out's children).
fn with_params(value: &str, params: &std::collections::BTreeMap<String, String>) -> String {
    if !value.contains("{{") {
        return value.to_owned();
    }
    params.iter().fold(value.to_owned(), |v, (k, p)| {
        v.replace(&format!("{{{{{k}}}}}"), p)
    })
}

impl Emulator {
    /// A queued run starts when a slot is free and it is the job's oldest
    /// queued run. `None`: it is no longer queued (cancelled).
    fn try_start(&self, run_id: u64) -> Option<bool> {
        let mut inner = self.lock();
        let run = inner.runs.get(&run_id)?;
        match run.life_cycle_state {
            "QUEUED" => {}
            // Cancelled (or skipped) before it started: it never runs.
            "TERMINATING" | "TERMINATED" | "SKIPPED" => return None,
            _ => return Some(true),
        }
        let Some(job_id) = run.job_id else {
            return Some(true);
        };
        let max = inner
            .jobs
            .get(&job_id)
            .map_or(u64::MAX, |j| j.max_concurrent_runs());
        if inner.oldest_queued(job_id) != Some(run_id) || inner.active_runs(job_id) >= max {
            return Some(false);
        }
        let run = inner.runs.get_mut(&run_id)?;
        run.life_cycle_state = "PENDING";
        run.queue_reason = None;
        inner.moved(Some(job_id), run_id, Some("QUEUED"), "PENDING");
        Some(true)
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
                tracing::debug!(
                    run_id,
                    "run has no url/promise_id parameter; nothing to call back"
                );
                return;
            };
            (
                url,
                id,
                with_params(&run.behaviour.value, &run.params),
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

    /// One progress update: `POST {url}/progress?id=..` with update `i` of
    /// `n` (percent, stage, a `rows` metric). Not retried: a lost update is
    /// superseded by the next.
    async fn send_progress(&self, run_id: u64, i: u32, n: u32) {
        let target = {
            let inner = self.lock();
            inner.runs.get(&run_id).and_then(|run| {
                Some((
                    run.params.get(&self.settings.url_param)?.clone(),
                    run.params.get(&self.settings.promise_param)?.clone(),
                ))
            })
        };
        let Some((url, id)) = target else { return };
        let body = json!({
            "percent": f64::from(i) * 100.0 / f64::from(n),
            "stage": format!("step {i} of {n}"),
            "metrics": {"rows": i},
        });
        if let Err(e) = self
            .http
            .post(format!("{url}/progress"))
            .query(&[("id", id.as_str())])
            .json(&body)
            .send()
            .await
        {
            tracing::debug!(run_id, error = %e, "progress update failed");
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

    /// Moves a run on. A finished run stays as it is; a terminal state
    /// settles its tasks too (a failed run's first task failed, the others
    /// were not run to success).
    pub fn set_state(
        &self,
        run_id: u64,
        life: &'static str,
        result: Option<&'static str>,
        message: &str,
    ) {
        let mut inner = self.lock();
        let Some(run) = inner.runs.get_mut(&run_id) else {
            return;
        };
        if matches!(run.life_cycle_state, "TERMINATED" | "SKIPPED") {
            return;
        }
        let was = run.life_cycle_state;
        run.life_cycle_state = life;
        run.result_state = result;
        run.state_message = message.to_owned();
        if life == "TERMINATED" {
            run.end_time = now_ms();
            // Tasks a repair did not rerun keep their result.
            let fail_task = run
                .behaviour
                .fail_task
                .clone()
                .filter(|k| run.tasks.iter().any(|t| &t.task_key == k));
            for (i, t) in run
                .tasks
                .iter_mut()
                .filter(|t| t.result_state.is_none())
                .enumerate()
            {
                t.result_state = match (result, &fail_task) {
                    (Some("FAILED"), Some(k)) if &t.task_key != k => Some("SUCCESS"),
                    (Some("FAILED"), None) if i > 0 => Some("UPSTREAM_FAILED"),
                    (other, _) => other,
                };
            }
        }
        let end_time = run.end_time;
        if let Some(r) = run.repairs.last_mut() {
            r.life_cycle_state = life;
            r.result_state = result;
            r.end_time = end_time;
        }
        let job = run.job_id;
        inner.moved(job, run_id, Some(was), life);
    }

    fn is_terminated(&self, run_id: u64) -> bool {
        self.lock()
            .runs
            .get(&run_id)
            .is_none_or(|r| matches!(r.life_cycle_state, "TERMINATED" | "SKIPPED"))
    }

    /// Databricks retries the run's first task (its `max_retries`): the
    /// failed attempt ends FAILED and a new attempt of the task is added
    /// with a new run id and the next `attempt_number`.
    fn retry_first_task(&self, run_id: u64) {
        let mut inner = self.lock();
        let next = inner.next_run_id + 1;
        let Some(r) = inner.runs.get_mut(&run_id) else {
            return;
        };
        let Some(key) = r.tasks.first().map(|t| t.task_key.clone()) else {
            return;
        };
        if let Some(t) = r
            .tasks
            .iter_mut()
            .rev()
            .find(|t| t.task_key == key && t.result_state.is_none())
        {
            t.result_state = Some("FAILED");
        }
        r.add_attempt(&key, next);
        r.attempt_number += 1;
        inner.next_run_id = next;
        inner.task_parent.insert(next, run_id);
    }

    /// Every task exits with its value (`emulator.value.<task_key>`, else
    /// the job's value): `dbutils.notebook.exit(value)`.
    fn exit_with_values(&self, run_id: u64) {
        let mut inner = self.lock();
        if let Some(r) = inner.runs.get_mut(&run_id) {
            let b = r.behaviour.clone();
            let value = with_params(&b.value, &r.params);
            r.exit_value = Some(value.clone());
            // The attempts of this play (earlier ones have ended).
            for t in r.tasks.iter_mut().filter(|t| t.result_state.is_none()) {
                t.exit_value = Some(
                    b.task_values
                        .get(&t.task_key)
                        .cloned()
                        .unwrap_or_else(|| value.clone()),
                );
            }
        }
    }

    /// Plays a run to its end, per its job's behaviour.
    pub async fn execute(self: Arc<Self>, run_id: u64, early_callback_done: bool) {
        let b = match self.lock().runs.get(&run_id) {
            Some(r) => r.behaviour.clone(),
            None => return,
        };
        let shutdown = self.shutdown();
        let sleep = |d: Duration| {
            let s = shutdown.clone();
            async move {
                tokio::select! {
                    _ = s.cancelled() => false,
                    _ = tokio::time::sleep(d) => true,
                }
            }
        };
        let ms = Duration::from_millis;
        loop {
            match self.try_start(run_id) {
                None => return,
                Some(true) => break,
                Some(false) => {
                    if !sleep(QUEUE_POLL).await {
                        return;
                    }
                }
            }
        }
        if !sleep(ms(10)).await {
            return;
        }
        self.set_state(run_id, "RUNNING", None, "");
        self.notify(run_id, "jobs.on_start");
        let failing = self.lock().runs.get(&run_id).is_some_and(|r| r.failing());
        if b.progress_updates > 0 {
            // A chatty notebook: update i at i/n of its run time (paced
            // by the clock, so slow answers do not stretch the run).
            let n = b.progress_updates;
            let start = tokio::time::Instant::now();
            for i in 1..=n {
                if self.is_terminated(run_id) {
                    return;
                }
                self.send_progress(run_id, i, n).await;
                let next = start + ms(b.delay_ms * u64::from(i) / u64::from(n));
                let left = next.saturating_duration_since(tokio::time::Instant::now());
                if !sleep(left).await {
                    return;
                }
            }
        } else if !sleep(ms(b.delay_ms)).await {
            return;
        }
        if self.is_terminated(run_id) {
            return;
        }
        let outcome = if failing { Outcome::Fail } else { b.outcome };
        let (result, message) = match outcome {
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
                ("FAILED", "Workload failed, see run output for details")
            }
            Outcome::CallbackThenFail => {
                self.call_back(run_id, "resolve").await;
                ("FAILED", "Workload failed, see run output for details")
            }
            Outcome::RetryThenCallback => {
                self.set_state(
                    run_id,
                    "WAITING_FOR_RETRY",
                    None,
                    "Attempt 0 failed; waiting to retry",
                );
                if !sleep(ms(b.delay_ms.max(1000))).await || self.is_terminated(run_id) {
                    return;
                }
                self.retry_first_task(run_id);
                self.set_state(run_id, "RUNNING", None, "");
                if !sleep(ms(b.delay_ms)).await || self.is_terminated(run_id) {
                    return;
                }
                self.call_back(run_id, "resolve").await;
                ("SUCCESS", "")
            }
            Outcome::RetryThenExit => {
                self.set_state(
                    run_id,
                    "WAITING_FOR_RETRY",
                    None,
                    "Attempt 0 failed; waiting to retry",
                );
                if !sleep(ms(b.delay_ms)).await || self.is_terminated(run_id) {
                    return;
                }
                self.retry_first_task(run_id);
                self.set_state(run_id, "RUNNING", None, "");
                if !sleep(ms(b.delay_ms)).await || self.is_terminated(run_id) {
                    return;
                }
                self.exit_with_values(run_id);
                ("SUCCESS", "")
            }
            // The message a real workspace gives a failed task (measured by
            // the Databricks CLI's test server).
            Outcome::Fail => ("FAILED", "Workload failed, see run output for details"),
            Outcome::SuccessNoCallback => {
                self.exit_with_values(run_id);
                ("SUCCESS", "")
            }
            Outcome::SuccessNoOutput => ("SUCCESS", ""),
            Outcome::NeverFinish => return,
        };
        if self.is_terminated(run_id) {
            return;
        }
        // Its task started, so TERMINATING already carries the result.
        self.set_state(run_id, "TERMINATING", Some(result), message);
        if !sleep(ms(5)).await {
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

#[cfg(test)]
mod tests {
    #[test]
    fn values_take_the_runs_parameters() {
        let params = [("n".to_string(), "7".to_string())].into();
        assert_eq!(super::with_params(r#"{"n":{{n}}}"#, &params), r#"{"n":7}"#);
        assert_eq!(super::with_params("{{other}}", &params), "{{other}}");
        assert_eq!(super::with_params("plain", &params), "plain");
    }
}
