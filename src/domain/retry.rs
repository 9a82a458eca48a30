//! Retry policies: how a promise whose run failed gets another attempt
//! without another trigger (docs/contracts.md, retries).
//!
//! A policy comes from the trigger's `retry` or, failing that, from the
//! configuration (`[retry]`: per job, per workspace, a default). It is
//! stored on the promise when the promise is created, so a change of
//! configuration never changes what a running promise was promised.
//!
//! - `rerun`: each attempt is a new run, launched with the idempotency
//!   token of the promise *and the attempt* ([`IdempotencyToken::for_attempt`]),
//!   so a crash during a relaunch finds the same run again;
//! - `repair`: each attempt repairs the same run (`runs/repair`, failed tasks
//!   only), guarded by `latest_repair_id`, which Databricks checks.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ids::{IdempotencyToken, PromiseId};

/// What a trigger (or the configuration) writes.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "retry policy",
    description = "Another attempt when a run ends in a retryable way: the promise stays PENDING and runbridge starts the next attempt after the backoff. The promise's timeout covers every attempt."
)]
pub struct RetryMessage {
    /// Attempts in all, the first included (1: no retry).
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: u32,
    /// Which endings are retried: a run's result state (FAILED,
    /// INTERNAL_ERROR, TIMEDOUT, ...), a termination code (CLUSTER_ERROR,
    /// DRIVER_ERROR, ...), or NOTEBOOK_REJECTED for a notebook's `reject`
    /// that does not say `final`. Default: FAILED, INTERNAL_ERROR,
    /// NOTEBOOK_REJECTED.
    #[serde(default)]
    #[schemars(
        length(min = 1, max = 32),
        inner(regex(pattern = r"^[A-Z][A-Z0-9_]{0,63}$"))
    )]
    pub on: Option<Vec<String>>,
    /// The wait before attempt n+1: initial × multiplier^(n-1), at most max.
    #[serde(default)]
    pub backoff: Option<BackoffMessage>,
    /// "rerun" (a new run per attempt; the default) or "repair" (the same
    /// run, its failed tasks again; job_id triggers only).
    #[serde(default)]
    pub mode: Option<RetryMode>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackoffMessage {
    /// Seconds before the second attempt (default 30).
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub initial_seconds: Option<f64>,
    /// Each later wait is this many times the one before (default 2).
    #[serde(default)]
    #[schemars(range(min = 1, max = 10))]
    pub multiplier: Option<f64>,
    /// The longest wait in seconds (default 600).
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub max_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    Rerun,
    Repair,
}

impl RetryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryMode::Rerun => "rerun",
            RetryMode::Repair => "repair",
        }
    }
}

/// The ending a notebook's non-final `reject` stands for in `on`.
pub const NOTEBOOK_REJECTED: &str = "NOTEBOOK_REJECTED";

const DEFAULT_ON: [&str; 3] = ["FAILED", "INTERNAL_ERROR", NOTEBOOK_REJECTED];
pub const MAX_ATTEMPTS: u32 = 20;

/// A checked policy, as stored on the promise (field `rt`, compact JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    #[serde(rename = "n")]
    max_attempts: u32,
    on: Vec<String>,
    /// Initial and longest wait (ms), multiplier.
    #[serde(rename = "b")]
    backoff: (u64, f64, u64),
    #[serde(rename = "m")]
    mode: RetryMode,
}

fn seconds(name: &str, v: Option<f64>, default: f64) -> Result<u64, String> {
    let v = v.unwrap_or(default);
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!("retry.backoff.{name} must be between 0 and 86400"));
    }
    Ok((v * 1000.0).round() as u64)
}

impl RetryPolicy {
    /// Checks what a trigger or the configuration wrote. `job_run`: the
    /// trigger names a job (repair needs one: a one-time run is not
    /// repaired).
    pub fn parse(m: &RetryMessage, job_run: bool) -> Result<Self, String> {
        if !(1..=MAX_ATTEMPTS).contains(&m.max_attempts) {
            return Err(format!(
                "retry.max_attempts must be between 1 and {MAX_ATTEMPTS}"
            ));
        }
        let on = match &m.on {
            None => DEFAULT_ON.iter().map(|s| (*s).to_owned()).collect(),
            Some(on) if on.is_empty() || on.len() > 32 => {
                return Err("retry.on needs 1 to 32 result states or termination codes".into());
            }
            Some(on) => {
                for s in on {
                    let ok = s.len() <= 64
                        && s.starts_with(|c: char| c.is_ascii_uppercase())
                        && s.chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                    if !ok {
                        return Err(format!(
                            "retry.on: {s:?} is not a result state or termination code (upper case, like FAILED or CLUSTER_ERROR)"
                        ));
                    }
                }
                on.clone()
            }
        };
        let b = m.backoff.clone().unwrap_or(BackoffMessage {
            initial_seconds: None,
            multiplier: None,
            max_seconds: None,
        });
        let initial = seconds("initial_seconds", b.initial_seconds, 30.0)?;
        let max = seconds("max_seconds", b.max_seconds, 600.0)?;
        let multiplier = b.multiplier.unwrap_or(2.0);
        if !(1.0..=10.0).contains(&multiplier) {
            return Err("retry.backoff.multiplier must be between 1 and 10".into());
        }
        let mode = m.mode.unwrap_or(RetryMode::Rerun);
        if mode == RetryMode::Repair && !job_run {
            return Err(
                "retry.mode \"repair\" needs a job_id trigger (a one-time run is not repaired): use \"rerun\"".into(),
            );
        }
        Ok(Self {
            max_attempts: m.max_attempts,
            on,
            backoff: (initial, multiplier, max.max(initial)),
            mode,
        })
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn mode(&self) -> RetryMode {
        self.mode
    }

    pub fn on(&self) -> &[String] {
        &self.on
    }

    /// Is an ending (a result state, a termination code, or
    /// [`NOTEBOOK_REJECTED`]) one this policy retries?
    pub fn retries(&self, endings: &[&str]) -> bool {
        endings
            .iter()
            .any(|e| !e.is_empty() && self.on.iter().any(|o| o == e))
    }

    /// The wait after attempt `failed` (1 for the first) failed.
    pub fn backoff(&self, failed: u32) -> Duration {
        let (initial, multiplier, max) = self.backoff;
        let exp = multiplier.powi(failed.saturating_sub(1).min(64) as i32);
        let ms = (initial as f64 * exp).min(max as f64);
        Duration::from_millis(ms as u64)
    }

    /// The stored form (field `rt`).
    pub fn to_stored(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_stored(s: &str) -> Option<Self> {
        serde_json::from_str(s).ok()
    }

    /// As the API and the console show it.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "max_attempts": self.max_attempts,
            "on": self.on,
            "backoff": {
                "initial_seconds": self.backoff.0 as f64 / 1000.0,
                "multiplier": self.backoff.1,
                "max_seconds": self.backoff.2 as f64 / 1000.0,
            },
            "mode": self.mode.as_str(),
        })
    }
}

/// The configuration's policies (`[retry]`): for a job, else for a
/// workspace, else the default. A `repair` policy applies to job runs only;
/// a one-time run falls through to the next that is not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryDefaults {
    default: Option<RetryPolicy>,
    workspaces: BTreeMap<String, RetryPolicy>,
    jobs: BTreeMap<u64, RetryPolicy>,
}

impl RetryDefaults {
    /// Checks the configuration's policies; the error names the one at fault.
    pub fn parse(
        default: Option<&RetryMessage>,
        workspaces: &BTreeMap<String, RetryMessage>,
        jobs: &BTreeMap<String, RetryMessage>,
    ) -> Result<Self, String> {
        let check = |name: String, m: &RetryMessage| {
            RetryPolicy::parse(m, true).map_err(|e| format!("{name}: {e}"))
        };
        Ok(Self {
            default: default
                .map(|m| check("retry.default".into(), m))
                .transpose()?,
            workspaces: workspaces
                .iter()
                .map(|(w, m)| Ok((w.clone(), check(format!("retry.workspaces.{w}"), m)?)))
                .collect::<Result<_, String>>()?,
            jobs: jobs
                .iter()
                .map(|(j, m)| {
                    let id = j
                        .parse::<u64>()
                        .map_err(|_| format!("retry.jobs.{j}: the key must be a job id"))?;
                    Ok((id, check(format!("retry.jobs.{j}"), m)?))
                })
                .collect::<Result<_, String>>()?,
        })
    }

    /// The policy for a run of `job_id` (none: a one-time run) in `workspace`.
    pub fn lookup(&self, workspace: &str, job_id: Option<u64>) -> Option<RetryPolicy> {
        let by_job = job_id.and_then(|j| self.jobs.get(&j));
        [
            by_job,
            self.workspaces.get(workspace),
            self.default.as_ref(),
        ]
        .into_iter()
        .flatten()
        .find(|p| job_id.is_some() || p.mode == RetryMode::Rerun)
        .cloned()
    }
}

impl IdempotencyToken {
    /// The token of attempt `n` of a `rerun` policy: attempt 1 keeps the
    /// promise's own token; later ones add the attempt number, so each
    /// attempt has one run however often its launch is repeated.
    pub fn for_attempt(base: &IdempotencyToken, promise: &PromiseId, n: u32) -> Self {
        if n <= 1 {
            return base.clone();
        }
        IdempotencyToken::derive_attempt(base, promise, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(v: Value) -> RetryMessage {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_backoff() {
        let p = RetryPolicy::parse(&msg(serde_json::json!({"max_attempts": 3})), true).unwrap();
        assert_eq!(p.mode(), RetryMode::Rerun);
        assert!(p.retries(&["FAILED"]));
        assert!(p.retries(&["", NOTEBOOK_REJECTED]));
        assert!(!p.retries(&["CANCELED", "USER_CANCELED"]));
        assert_eq!(p.backoff(1), Duration::from_secs(30));
        assert_eq!(p.backoff(2), Duration::from_secs(60));
        assert_eq!(p.backoff(10), Duration::from_secs(600));
        assert_eq!(RetryPolicy::from_stored(&p.to_stored()), Some(p));
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        for (v, job, why) in [
            (serde_json::json!({"max_attempts": 0}), true, "max_attempts"),
            (
                serde_json::json!({"max_attempts": 21}),
                true,
                "max_attempts",
            ),
            (
                serde_json::json!({"max_attempts": 2, "on": []}),
                true,
                "retry.on",
            ),
            (
                serde_json::json!({"max_attempts": 2, "on": ["failed"]}),
                true,
                "retry.on",
            ),
            (
                serde_json::json!({"max_attempts": 2, "backoff": {"multiplier": 0.5}}),
                true,
                "multiplier",
            ),
            (
                serde_json::json!({"max_attempts": 2, "backoff": {"initial_seconds": -1}}),
                true,
                "initial_seconds",
            ),
            (
                serde_json::json!({"max_attempts": 2, "mode": "repair"}),
                false,
                "job_id",
            ),
        ] {
            let e = RetryPolicy::parse(&msg(v.clone()), job).unwrap_err();
            assert!(e.contains(why), "{v}: {e}");
        }
        assert!(
            serde_json::from_value::<RetryMessage>(
                serde_json::json!({"max_attempts": 2, "mode": "again"})
            )
            .is_err()
        );
    }

    #[test]
    fn attempt_tokens_differ_per_attempt_and_repeat() {
        let id = PromiseId::parse("p-1").unwrap();
        let base = IdempotencyToken::derive_v2("default", &id, 5);
        assert_eq!(IdempotencyToken::for_attempt(&base, &id, 1), base);
        let t2 = IdempotencyToken::for_attempt(&base, &id, 2);
        let t3 = IdempotencyToken::for_attempt(&base, &id, 3);
        assert_ne!(t2, base);
        assert_ne!(t2, t3);
        assert_eq!(t2, IdempotencyToken::for_attempt(&base, &id, 2));
        assert!(t3.as_str().len() <= 64);
    }
}
